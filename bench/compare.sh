#!/usr/bin/env bash
# pgkeep next to pgBackRest and pg_basebackup on the same cluster, in one run, tools interleaved.
#
# Usage: bench/compare.sh [SCALE=50] [REPEAT=1]
#   BENCH_DATASET=pgbench|random   pgbench data (compresses ~20x) or a table of random text
#                                  columns (compresses ~3x); default pgbench
#   BENCH_CHUNKS="cdc 256KiB"      pgkeep variants: PGKEEP_RELATION_CHUNK_SIZE of each (one
#                                  repository each); "default" = the built-in default
#   BENCH_DIR=/tmp/bench-compare    work directory (emptied at start; needs ~6x the database size)
#   BENCH_OUT=bench/results        where raw results and the table go
#   BENCH_TPS_SECS=30              length of the uniform-update pgbench run
#
# Per repeat (fresh repositories each time), each step runs every tool, in an order that
# alternates between repeats:
#   full        full backup (pgBackRest type=full, pgkeep backup, pg_basebackup -Ft
#               --compress=server-zstd:level=3)
#   incr-local  incremental after updating 1% of the rows in one key range
#   incr-tpcb   incremental after `pgbench -T $BENCH_TPS_SECS` (uniform random updates)
#   restore     restore of the newest backup into an empty directory
#   delta-same  --delta restore over that identical copy
#   delta-stale --delta restore of the newest backup over a restore of the full backup
# Each measurement: wall seconds, user+sys CPU seconds of the process tree, max RSS of any one
# process (GNU time), and for backups the bytes the repository grew by. pgBackRest's repository
# size counts its backup/ directory (its WAL archive grows with every write, not per backup);
# pgkeep's includes the WAL it stores with each backup. pg_basebackup's server-side compression
# runs in the server, so its CPU column undercounts.
# pgBackRest: compress-type=zst, compress-level=3, process-max=2, start-fast=y, archiving by its
# own archive-push (its normal setup; backups wait for their WAL in its archive).
# pgkeep: an encrypted repository (its default), compression level 3, threads = cores.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
REPEAT=${2:-1}
DATASET=${BENCH_DATASET:-pgbench}
CHUNKS=${BENCH_CHUNKS:-default}
W=${BENCH_DIR:-/tmp/bench-compare}
OUT=${BENCH_OUT:-bench/results}
TPS_SECS=${BENCH_TPS_SECS:-30}
PORT=${BENCH_PORT:-55433}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
RAW="$OUT/raw-$DATASET-s$SCALE-$STAMP.txt"

for t in pgbackrest pg_basebackup /usr/bin/time zstd; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL and pgBackRest run as postgres)" >&2; exit 2; }

cargo build --release -q -p pgkeep
as_pg() { runuser -u postgres -- "$@"; }
cleanup() { as_pg "$PGBIN/pg_ctl" -D "$W/pgdata" -m immediate stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
rm -rf "$W"; mkdir -p "$W/sock" "$W/pgbr/log" "$W/pgbr/lock" "$W/pgbr/spool" "$W/tmp"
# The binary under test is copied: others may rebuild target/ while this runs.
cp target/release/pgkeep "$W/pgkeep"
PGKEEP="$W/pgkeep"
chown -R postgres "$W"; chmod 755 "$W"

PGBR_CONF="$W/pgbr/pgbackrest.conf"
cat > "$PGBR_CONF" <<EOF
[global]
repo1-path=$W/pgbr/repo
log-path=$W/pgbr/log
lock-path=$W/pgbr/lock
spool-path=$W/pgbr/spool
log-level-console=warn
log-level-file=off
compress-type=zst
compress-level=3
process-max=2
start-fast=y
repo1-retention-full=99

[bench]
pg1-path=$W/pgdata
pg1-port=$PORT
pg1-socket-path=$W/sock
EOF
chown postgres "$PGBR_CONF"
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench "$@"; }

echo "== cluster: $DATASET data, scale $SCALE, PostgreSQL $("$PGBIN/postgres" -V | awk '{print $3}')"
as_pg "$PGBIN/initdb" --no-sync --data-checksums -U postgres -D "$W/pgdata" >/dev/null
cat >> "$W/pgdata/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$W/sock'
listen_addresses = ''
max_wal_size = 4GB
archive_mode = on
archive_command = 'pgbackrest --config=$PGBR_CONF --stanza=bench archive-push %p'
EOF
as_pg "$PGBIN/pg_ctl" -D "$W/pgdata" -l "$W/pg.log" -w start >/dev/null
export PGHOST="$W/sock" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$@"; }

if [ "$DATASET" = pgbench ]; then
  "$PGBIN/pgbench" -i -s "$SCALE" -q 2>/dev/null
  TABLE=pgbench_accounts; KEY=aid; ROWS=$((SCALE * 100000))
  CHANGE_LOCAL="update pgbench_accounts set abalance = abalance + 1 where aid between \$LO and \$HI"
  TPS_ARGS=(-c 2 -j 2)
else
  # Random text columns: an md5 (hex: 16 random bytes in 32 characters) and words drawn from a
  # small vocabulary; zstd -3 compresses the table about 3x.
  ROWS=$((SCALE * 100000))
  psql -c "create table docs (id bigint primary key, h text, w text, n int)" \
       -c "insert into docs select g, md5(random()::text),
             (select string_agg(('{alpha,bravo,charlie,delta,echo,foxtrot,golf,hotel,india,juliet,kilo,lima}'::text[])[1 + (random() * 11)::int] || (random() * 99)::int, ' ')
              from generate_series(1, 6 + (g % 3))), (random() * 1e6)::int
             from generate_series(1, $ROWS) g" \
       -c "vacuum analyze docs"
  TABLE=docs; KEY=id
  CHANGE_LOCAL="update docs set h = md5(h) where id between \$LO and \$HI"
  cat > "$W/tmp/upd.sql" <<EOF
\\set id random(1, $ROWS)
update docs set h = md5(random()::text), n = n + 1 where id = :id;
EOF
  chmod 644 "$W/tmp/upd.sql"
  TPS_ARGS=(-c 2 -j 2 -f "$W/tmp/upd.sql")
fi
psql -c checkpoint
DB_BYTES=$(psql -Atc "select pg_database_size('postgres')")
echo "   database: $((DB_BYTES / 1048576)) MiB; zstd -3 of the main table's files:"
TABFILE=$(psql -Atc "select pg_relation_filepath('$TABLE')")
SAMPLE="$W/pgdata/$TABFILE"   # its first 1 GiB segment (or all of it when smaller)
RATIO=$(zstd -3 -c "$SAMPLE" | wc -c)
RAWB=$(stat -c %s "$SAMPLE")
echo "   $(echo "scale=1; $RAWB / $RATIO" | bc)x compressible"
pgbr stanza-create >/dev/null
pgbr check >/dev/null

{
  echo "# compare.sh dataset=$DATASET scale=$SCALE repeat=$REPEAT db_bytes=$DB_BYTES compress_ratio=$(echo "scale=2; $RAWB / $RATIO" | bc) chunks=$CHUNKS cores=$(nproc) $(date -u +%FT%TZ)"
  echo "# $(pgbackrest version), $(pg_basebackup -V), pgkeep $(git rev-parse --short HEAD)"
  echo "# repeat step tool wall_s cpu_s maxrss_kib repo_added_bytes"
} > "$RAW"

# measure REPEAT STEP TOOL REPO_PATH -- command...  (REPO_PATH "-" for none)
measure() {
  local rep=$1 step=$2 tool=$3 repo=$4; shift 5
  local before=0 after=0
  [ "$repo" != - ] && before=$(du -sb "$repo" 2>/dev/null | cut -f1 || echo 0)
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  if ! /usr/bin/time -f "%e %U %S %M" -o "$W/tmp/time" "$@" > "$W/tmp/out" 2>&1; then
    echo "FAILED: $step $tool: $*" >&2; cat "$W/tmp/out" >&2; exit 1
  fi
  [ "$repo" != - ] && after=$(du -sb "$repo" | cut -f1)
  read -r wall usr sys rss < <(tail -1 "$W/tmp/time")
  local cpu; cpu=$(echo "$usr + $sys" | bc)
  printf '%s %s %s %s %s %s %s\n' "$rep" "$step" "$tool" "$wall" "$cpu" "$rss" "$((after - before))" | tee -a "$RAW"
}

variant_env() { # variant -> env assignment for pgkeep
  if [ "$1" = default ]; then echo "PGKEEP_UNUSED=1"; else echo "PGKEEP_RELATION_CHUNK_SIZE=$1"; fi
}
pk() { # variant args...
  local v=$1; shift
  env "$(variant_env "$v")" PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q "$@"
}
fresh_dir() { rm -rf "$1"; }
# Tools of one step in this repeat's order (alternates).
order() { # repeat tools...
  local rep=$1; shift
  if [ $((rep % 2)) = 1 ]; then printf '%s\n' "$@"; else printf '%s\n' "$@" | tac; fi
}

TOOLS=(pgbackrest)
for v in $CHUNKS; do TOOLS+=("pgkeep:$v"); done

for rep in $(seq 1 "$REPEAT"); do
  echo "== repeat $rep/$REPEAT"
  rm -rf "$W"/pk-* "$W/bb"
  for v in $CHUNKS; do pk "$v" repo init >/dev/null; done
  [ "$rep" -gt 1 ] && { pgbr stop >/dev/null 2>&1 || true; rm -rf "$W/pgbr/repo"; mkdir -p "$W/pgbr/repo"; chown postgres "$W/pgbr/repo"; pgbr start >/dev/null 2>&1 || true; pgbr stanza-create >/dev/null; }
  psql -c checkpoint
  # Full.
  for t in $(order "$rep" "${TOOLS[@]}" pg_basebackup); do
    case $t in
      pgbackrest) measure "$rep" full pgbackrest "$W/pgbr/repo/backup" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --type=full backup ;;
      pg_basebackup) mkdir -p "$W/bb"; measure "$rep" full pg_basebackup "$W/bb" -- pg_basebackup -Ft --compress=server-zstd:level=3 -c fast -D "$W/bb/$rep" ;;
      pgkeep:*) v=${t#pgkeep:}; measure "$rep" full "$t" "$W/pk-$v" -- env "$(variant_env "$v")" PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q backup --pgdata "$W/pgdata" ;;
    esac
  done
  FULL_SET=$(pgbr info --output=json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["label"])')
  declare -A FULL_ID=()
  for v in $CHUNKS; do FULL_ID[$v]=$(pk "$v" --json list | python3 -c 'import json,sys; d=json.load(sys.stdin); b=d["backups"] if isinstance(d,dict) else d; print(b[-1]["id"])'); done

  incr() { # step
    for t in $(order "$rep" "${TOOLS[@]}"); do
      case $t in
        pgbackrest) measure "$rep" "$1" pgbackrest "$W/pgbr/repo/backup" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --type=incr backup ;;
        pgkeep:*) v=${t#pgkeep:}; measure "$rep" "$1" "$t" "$W/pk-$v" -- env "$(variant_env "$v")" PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q backup --pgdata "$W/pgdata" ;;
      esac
    done
  }
  # Localized change: 1% of the rows, one key range (a different range each repeat).
  LO=$(( (rep * 7919 % 90) * ROWS / 100 + 1 )); HI=$((LO + ROWS / 100 - 1))
  psql -c "$(eval echo "\"$CHANGE_LOCAL\"")" -c checkpoint
  incr incr-local
  # Uniform random updates.
  "$PGBIN/pgbench" -n -T "$TPS_SECS" "${TPS_ARGS[@]}" 2>/dev/null | grep -E "^tps|transactions actually" | tr '\n' ' '; echo
  psql -c checkpoint
  incr incr-tpcb

  # Restores (of the newest backup), then delta over the same copy, then over a stale copy.
  for t in $(order "$rep" "${TOOLS[@]}"); do
    d="$W/r-${t//:/-}"
    fresh_dir "$d"
    case $t in
      pgbackrest)
        mkdir -p "$d"; chown postgres "$d"; chmod 700 "$d"
        measure "$rep" restore pgbackrest - -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --pg1-path="$d" restore
        measure "$rep" delta-same pgbackrest - -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --pg1-path="$d" --delta restore
        fresh_dir "$d"; mkdir -p "$d"; chown postgres "$d"; chmod 700 "$d"
        pgbr --pg1-path="$d" --set="$FULL_SET" restore
        measure "$rep" delta-stale pgbackrest - -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --pg1-path="$d" --delta restore
        ;;
      pgkeep:*)
        v=${t#pgkeep:}
        measure "$rep" restore "$t" - -- env PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q restore latest --target-dir "$d"
        measure "$rep" delta-same "$t" - -- env PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q restore latest --target-dir "$d" --delta
        fresh_dir "$d"
        pk "$v" restore "${FULL_ID[$v]}" --target-dir "$d" >/dev/null
        measure "$rep" delta-stale "$t" - -- env PGKEEP_REPO="$W/pk-$v" PGKEEP_PASSPHRASE=bench "$PGKEEP" -q restore latest --target-dir "$d" --delta
        ;;
    esac
    rm -rf "$d"
  done
done

echo "== results (medians over $REPEAT repeat(s)); raw: $RAW"
python3 bench/compare_report.py "$RAW" | tee "${RAW%.txt}.table.md"
