#!/usr/bin/env bash
# Per-segment wall time of `archive-push` (synchronous, one process per segment as PostgreSQL
# runs archive_command): pgkeep vs pgBackRest 2.45 on the same real WAL segments, plain and
# encrypted, interleaved so the noise of this machine hits both alike. Reports medians and the
# ratio (pgBackRest time / pgkeep time: above 1 means pgkeep is faster). The machine is shared:
# read the medians, and compare runs only taken at similar load (uptime is printed).
# Target (issue 4): sync archive-push >= 2x pgBackRest's segments per second.
# Usage: bench/archive.sh [SEGMENTS=20]   (root; needs the postgresql and pgbackrest packages)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
# shellcheck source=bench/common.sh
. bench/common.sh
bench_setup archive
as_pg mkdir -p "$W/segs" "$W/sock" "$W/pgbr-log" "$W/pgbr-lock" "$W/pgbr-spool"
as_pg "$PGBIN/initdb" --no-sync -D "$W/data" -U postgres --auth=trust >/dev/null
as_pg "$PGBIN/pg_ctl" -D "$W/data" -l "$W/pg.log" -w -o "-p $PORT -c unix_socket_directories=$W/sock \
  -c listen_addresses='' -c fsync=off -c archive_mode=on -c archive_command='cp %p $W/segs/%f'" start >/dev/null
PSQL=(psql -h "$W/sock" -p "$PORT" -U postgres -Xq -v ON_ERROR_STOP=1)

# N segments of realistic, moderately compressible WAL (md5 text rows, their index).
"${PSQL[@]}" -c "CREATE TABLE t (id bigint, a text, b text); CREATE INDEX ON t (a)"
for i in $(seq 1 "$N"); do
  "${PSQL[@]}" -c "INSERT INTO t SELECT g, md5(g::text), md5((g * 7)::text) || md5(random()::text) FROM generate_series(1, 60000) g" \
               -c "SELECT pg_switch_wal()" >/dev/null
done
until [ "$("${PSQL[@]}" -Atc "SELECT archived_count FROM pg_stat_archiver")" -ge "$N" ]; do sleep 0.1; done
mapfile -t SEGS < <(ls "$W/segs" | grep -E '^[0-9A-F]{24}$' | sort | head -n "$N")
echo "load: $(uptime | sed 's/.*load average: //')"
echo "segments: ${#SEGS[@]} x 16 MiB; $(zstd -3 -q -c "$W/segs/${SEGS[0]}" | wc -c | awk '{printf "zstd -3 ratio %.1fx", 16777216/$1}')"

# pgBackRest: one stanza per repository: plain and encrypted at its zst default (level 3), and
# plain at level 1, the level pgkeep uses for WAL (WAL_COMPRESSION_LEVEL), for a like-for-like row.
for v in plain enc l1; do
  {
    echo "[global]"
    echo "repo1-path=$W/pgbr-repo-$v"
    echo "log-path=$W/pgbr-log"; echo "lock-path=$W/pgbr-lock"; echo "spool-path=$W/pgbr-spool"
    echo "log-level-console=warn"; echo "log-level-file=off"
    echo "compress-type=zst"; echo "compress-level=$([ "$v" = l1 ] && echo 1 || echo 3)"
    if [ "$v" = enc ]; then echo "repo1-cipher-type=aes-256-cbc"; echo "repo1-cipher-pass=bench-cipher-pass"; fi
    echo "[bench]"
    echo "pg1-path=$W/data"; echo "pg1-port=$PORT"; echo "pg1-socket-path=$W/sock"
  } > "$W/pgbr-$v.conf"
  chown postgres:postgres "$W/pgbr-$v.conf"
  as_pg pgbackrest --config="$W/pgbr-$v.conf" --stanza=bench stanza-create >/dev/null
done
# pgkeep: a plain and an encrypted repository (passphrase from a file, as a server would).
: > "$W/empty.toml"; echo "bench passphrase" > "$W/pass"; chmod 600 "$W/pass"
chown postgres:postgres "$W/empty.toml" "$W/pass"
as_pg "$BIN" --config "$W/empty.toml" --repo "$W/pgkeep-plain" repo init --no-encryption >/dev/null
as_pg env PGKEEP_PASSPHRASE_FILE="$W/pass" "$BIN" --config "$W/empty.toml" --repo "$W/pgkeep-enc" repo init >/dev/null

# The timing loop runs as postgres in one shell, so no runuser cost is inside the timings.
cat > "$W/loop.sh" <<EOF
set -euo pipefail
t() { local s e; s=\$(date +%s%N); "\$@" >/dev/null; e=\$(date +%s%N); echo \$(( (e - s) / 1000 )); }
for seg in ${SEGS[*]}; do
  f=$W/segs/\$seg
  a=\$(t $BIN --config $W/empty.toml --repo $W/pgkeep-plain archive-push \$f)
  b=\$(t pgbackrest --config=$W/pgbr-plain.conf --stanza=bench archive-push \$f)
  c=\$(t env PGKEEP_PASSPHRASE_FILE=$W/pass $BIN --config $W/empty.toml --repo $W/pgkeep-enc archive-push \$f)
  d=\$(t pgbackrest --config=$W/pgbr-enc.conf --stanza=bench archive-push \$f)
  e=\$(t pgbackrest --config=$W/pgbr-l1.conf --stanza=bench archive-push \$f)
  echo "\$seg \$a \$b \$c \$d \$e"
done
EOF
chown postgres:postgres "$W/loop.sh"
as_pg bash "$W/loop.sh" > "$W/times"
# Asynchronous mode, as PostgreSQL drives it: every segment is marked .ready in a pg_wal,
# archive_command is called for each in order, and .ready becomes .done after exit 0. The
# background pushers (pgkeep's --spool-dir, pgBackRest's archive-async) push ahead in
# parallel (4 jobs each). The tools run one after the other, each on its own copy.
for tool in pgkeep pgbr; do
  f=$W/fake-$tool
  mkdir -p "$f/global" "$f/pg_wal/archive_status" "$W/spool-$tool"
  cp "$W/data/global/pg_control" "$f/global/"; cp "$W/data/PG_VERSION" "$f/"
  for seg in "${SEGS[@]}"; do cp "$W/segs/$seg" "$f/pg_wal/"; : > "$f/pg_wal/archive_status/$seg.ready"; done
  chown -R postgres:postgres "$f" "$W/spool-$tool"
done
sed -e "s|pg1-path=$W/data|pg1-path=$W/fake-pgbr|" -e "s|repo1-path=$W/pgbr-repo-plain|repo1-path=$W/pgbr-repo-async|" \
    -e "s|spool-path=$W/pgbr-spool|spool-path=$W/spool-pgbr\narchive-async=y\nprocess-max=4|" "$W/pgbr-plain.conf" > "$W/pgbr-async.conf"
# stanza-create checks pg1-path against the running server: create with the real path.
sed -e "s|repo1-path=$W/pgbr-repo-plain|repo1-path=$W/pgbr-repo-async|" "$W/pgbr-plain.conf" > "$W/pgbr-async-create.conf"
chown postgres:postgres "$W/pgbr-async.conf" "$W/pgbr-async-create.conf"
as_pg pgbackrest --config="$W/pgbr-async-create.conf" --stanza=bench stanza-create >/dev/null
as_pg "$BIN" --config "$W/empty.toml" --repo "$W/pgkeep-async" repo init --no-encryption >/dev/null
cat > "$W/async.sh" <<EOF
set -euo pipefail
run() { # tool command...
  local tool=\$1; shift; local s e
  s=\$(date +%s%N)
  for seg in ${SEGS[*]}; do
    "\$@" $W/fake-\$tool/pg_wal/\$seg >/dev/null
    mv $W/fake-\$tool/pg_wal/archive_status/\$seg.ready $W/fake-\$tool/pg_wal/archive_status/\$seg.done
  done
  e=\$(date +%s%N); echo "\$tool \$(( (e - s) / 1000 ))"
}
run pgkeep $BIN --config $W/empty.toml --repo $W/pgkeep-async archive-push --spool-dir $W/spool-pgkeep --jobs 4
run pgbr pgbackrest --config=$W/pgbr-async.conf --stanza=bench archive-push
EOF
chown postgres:postgres "$W/async.sh"
as_pg bash "$W/async.sh" > "$W/async-times"

RESULT="$OUT/archive-$(date -u +%Y%m%dT%H%M%SZ).txt"
python3 - "$W/times" "$(du -sb "$W/pgkeep-plain/wal" | cut -f1)" "$(du -sb "$W/pgbr-repo-plain/archive" | cut -f1)" "$W/async-times" <<'PY' | tee "$RESULT"
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
cols = {name: [int(r[i]) / 1000 for r in rows] for i, name in
        enumerate(["pgkeep", "pgbackrest", "pgkeep encrypted", "pgbackrest encrypted",
                   "pgbackrest zst level 1"], start=1)}
print(f"{len(rows)} segments, per-segment archive-push wall time (ms), one process per segment")
print(f"{'tool':<22} {'median':>8} {'mean':>8} {'min':>8} {'max':>8} {'seg/s':>7}")
for k, v in cols.items():
    med = statistics.median(v)
    print(f"{k:<22} {med:8.1f} {statistics.mean(v):8.1f} {min(v):8.1f} {max(v):8.1f} {1000/med:7.1f}")
for a, b in [("pgkeep", "pgbackrest"), ("pgkeep encrypted", "pgbackrest encrypted"),
             ("pgkeep", "pgbackrest zst level 1")]:
    print(f"ratio {b} / {a} (median): {statistics.median(cols[b]) / statistics.median(cols[a]):.2f}x")
print(f"stored: pgkeep {int(sys.argv[2]) / 2**20:.1f} MiB, pgbackrest {int(sys.argv[3]) / 2**20:.1f} MiB")
a = {l.split()[0]: int(l.split()[1]) / 1000 / len(rows) for l in open(sys.argv[4])}
print(f"async (4 jobs, driven like PostgreSQL, {len(rows)} ready segments): "
      f"pgkeep {a['pgkeep']:.1f} ms/segment ({1000/a['pgkeep']:.1f} seg/s), "
      f"pgbackrest {a['pgbr']:.1f} ms/segment ({1000/a['pgbr']:.1f} seg/s), ratio {a['pgbr']/a['pgkeep']:.2f}x")
PY
echo "written to $RESULT"
