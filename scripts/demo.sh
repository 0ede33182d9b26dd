#!/usr/bin/env bash
# pgkeep end to end on a fresh machine: makes a throwaway PostgreSQL cluster with pgbench data,
# backs it up while pgbench keeps writing into an encrypted repository, restores the backup
# into a new directory, starts the restored copy and checks that it holds the same data.
# Everything lives under ${DEMO_DIR:-/tmp/pgkeep-demo} and is removed at the start of a run.
# PGKEEP_DEMO_PROFILE=dev uses the (optimized) dev build the tests already made: CI runs the
# demo after the tests and saves a second full compile.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
if [ "${PGKEEP_DEMO_PROFILE:-release}" = dev ]; then
  cargo build -q --bin pgkeep
  PGKEEP="$PWD/target/debug/pgkeep"
else
  cargo build --release -q
  PGKEEP="$PWD/target/release/pgkeep"
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
DEMO=${DEMO_DIR:-/tmp/pgkeep-demo}
PORT=${DEMO_PORT:-54329}; PORT2=$((PORT + 1))

as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$DEMO/restored" -m immediate stop >/dev/null 2>&1 || true
  as_pg "$PGBIN/pg_ctl" -D "$DEMO/pgdata" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
cleanup
rm -rf "$DEMO"; mkdir -p "$DEMO/sock"
[ "$(id -u)" = 0 ] && chown -R postgres "$DEMO" && chmod 755 "$DEMO"

echo "== 1. a PostgreSQL cluster with data checksums and pgbench data (scale 20, ~300 MB)"
as_pg "$PGBIN/initdb" --no-sync --data-checksums -U postgres -D "$DEMO/pgdata" >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$DEMO/pgdata" -l "$DEMO/pg.log" -w \
  -o "-p $PORT -k $DEMO/sock -c listen_addresses=''" start >/dev/null
export PGHOST="$DEMO/sock" PGUSER=postgres PGDATABASE=postgres
"$PGBIN/pgbench" -p "$PORT" -i -s 20 -q 2>/dev/null

echo "== 2. an encrypted repository"
export PGKEEP_REPO="$DEMO/repo" PGKEEP_PASSPHRASE="demo passphrase, use PGKEEP_PASSPHRASE_FILE in real life"
"$PGKEEP" repo init

echo "== 3. a backup of the live cluster while pgbench writes"
"$PGBIN/pgbench" -p "$PORT" -T 300 -c 2 >/dev/null 2>&1 &
LOAD=$!
sleep 2
"$PGKEEP" backup --pgdata "$DEMO/pgdata" --pg "port=$PORT" --label demo
kill $LOAD; wait $LOAD 2>/dev/null || true
psql -p "$PORT" -q -c "vacuum" -c "checkpoint"
echo "== 4. a second backup after a small change: only what changed is stored"
"$PGKEEP" backup --pgdata "$DEMO/pgdata" --pg "port=$PORT" --label after-load
psql -p "$PORT" -qc "update pgbench_branches set bbalance = bbalance + 1"
"$PGKEEP" backup --pgdata "$DEMO/pgdata" --pg "port=$PORT" --label small-change
"$PGKEEP" list
# What the restored copy must hold: the data as of the second backup's end.
EXPECTED=$(psql -p "$PORT" -Atc "select count(*), sum(abalance), sum(bbalance) from pgbench_accounts, (select sum(bbalance) bbalance from pgbench_branches) b")

echo "== 5. restore the latest backup into a new directory and start it"
"$PGKEEP" restore latest --target-dir "$DEMO/restored"
[ "$(id -u)" = 0 ] && chown -R postgres "$DEMO/restored"
as_pg "$PGBIN/pg_ctl" -D "$DEMO/restored" -l "$DEMO/restored.log" -w -t 120 \
  -o "-p $PORT2 -k $DEMO/sock -c listen_addresses=''" start >/dev/null
GOT=$(psql -p "$PORT2" -Atc "select count(*), sum(abalance), sum(bbalance) from pgbench_accounts, (select sum(bbalance) bbalance from pgbench_branches) b")
echo "original: $EXPECTED"
echo "restored: $GOT"
[ "$EXPECTED" = "$GOT" ] || { echo "MISMATCH: the restored cluster differs" >&2; exit 1; }

echo "== 6. verify every byte in the repository"
"$PGKEEP" repo check --read-data
"$PGKEEP" repo info
echo "demo: OK: the restored cluster holds exactly the backed-up data"
