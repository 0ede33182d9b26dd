# Shared set-up of the benchmarks that run their own throwaway cluster (sourced, not run).
# After `bench_setup NAME`: PGBIN (newest server, or PGKEEP_PG_BIN), OUT (BENCH_OUT, default
# bench/out), BIN (the release pgkeep, built unless NO_BUILD is set), W (a work directory the
# postgres user owns, removed with its cluster $W/data on exit), PORT (a free port), and
# as_pg to run a command as the postgres user.
bench_setup() {
  PGBIN=${PGKEEP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
  OUT=${BENCH_OUT:-bench/out}
  mkdir -p "$OUT"
  [ -n "${NO_BUILD:-}" ] || cargo build --release -q --bin pgkeep
  BIN=$PWD/target/release/pgkeep
  W=$(mktemp -d "/tmp/pgkeep-bench-$1.XXXXXX")
  chmod 711 "$W"
  chown postgres:postgres "$W"
  trap bench_cleanup EXIT
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
}
as_pg() { runuser -u postgres -- "$@"; }
bench_cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$W/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$W"
}
