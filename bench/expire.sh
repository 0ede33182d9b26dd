#!/usr/bin/env bash
# pgkeep expire + prune next to `restic forget --prune` on the same data directories.
#
# Usage: bench/expire.sh [SCALE=10] [BACKUPS=60] [KEEP=10]
#   BENCH_OUT=bench/results   where the raw figures go (default bench/out)
#   NO_BUILD=1                use target/release/pgkeep as is
#
# A pgbench cluster at SCALE changes before each of BACKUPS rounds (1% of the accounts, a
# different slice each round, then a checkpoint); each round backs the data directory up
# with pgkeep (an encrypted repository, `backup`) and restic (`restic backup` of the same
# directory right after). Then each tool keeps the newest KEEP and removes the rest with its
# data: `pgkeep expire --kind physical --keep-last KEEP --grace 0` (pgkeep's grace period
# would otherwise keep the fresh packs) and `restic forget --keep-last KEEP --prune`. Both
# repack packs that are more than 5% unused (their defaults). Measured with GNU time (wall,
# user+sys, max RSS) and the repository sizes before and after (du).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SCALE=${1:-10}
BACKUPS=${2:-60}
KEEP=${3:-10}
for t in restic /usr/bin/time bc; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL runs as postgres)" >&2; exit 2; }
bench_setup expire
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT/expire-s$SCALE-$STAMP.txt"

as_pg "$PGBIN/initdb" --no-sync --data-checksums -U postgres -D "$W/data" >/dev/null
cat >> "$W/data/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$W'
listen_addresses = ''
max_wal_size = 4GB
EOF
as_pg "$PGBIN/pg_ctl" -D "$W/data" -l "$W/pg.log" -w start >/dev/null
export PGHOST=$W PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
"$PGBIN/pgbench" -i -s "$SCALE" -q 2>/dev/null
echo bench-passphrase > "$W/pass"; chmod 600 "$W/pass"
: > "$W/empty.toml"
export PGKEEP_PASSPHRASE_FILE=$W/pass PGKEEP_CONFIG=$W/empty.toml PGKEEP_REPO=$W/pgkeep-repo
export RESTIC_PASSWORD_FILE=$W/pass RESTIC_REPOSITORY=$W/restic-repo RESTIC_CACHE_DIR=$W/restic-cache
"$BIN" repo init >/dev/null
restic init -q

rows=$((SCALE * 100000)); slice=$((rows / 100))
for i in $(seq 1 "$BACKUPS"); do
  lo=$(( (i * 7919 % 100) * slice + 1 )); hi=$((lo + slice - 1))
  psql -X -q -c "update pgbench_accounts set abalance = abalance + 1 where aid between $lo and $hi" -c checkpoint
  "$BIN" -q backup --pgdata "$W/data" >/dev/null
  restic backup -q "$W/data" >/dev/null
  [ $((i % 10)) = 0 ] && echo "  $i backups each"
done

size() { du -sb "$1" | cut -f1; }
measure() { # name command...
  local name=$1; shift
  /usr/bin/time -f "%e %U %S %M" -o "$W/time" "$@" >"$W/out" 2>"$W/err" || { cat "$W/err" >&2; exit 1; }
  read -r wall user sys rss < "$W/time"
  echo "$name $wall $(echo "$user + $sys" | bc) $rss"
}
pk_before=$(size "$W/pgkeep-repo"); rs_before=$(size "$W/restic-repo")
pk=$(measure pgkeep "$BIN" expire --kind physical --keep-last "$KEEP" --grace 0)
rs=$(measure restic restic forget -q --keep-last "$KEEP" --prune)
pk_after=$(size "$W/pgkeep-repo"); rs_after=$(size "$W/restic-repo")
pk_left=$("$BIN" --json list | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["backups"]))')
rs_left=$(restic snapshots --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
{
  echo "# expire.sh scale=$SCALE backups=$BACKUPS keep=$KEEP $(date -u +%FT%TZ) cores=$(nproc)"
  echo "# $("$BIN" --version) ($(git rev-parse --short HEAD)); $(restic version | head -1)"
  echo "# tool wall_s cpu_s maxrss_kib repo_before_bytes repo_after_bytes backups_left"
  echo "$pk $pk_before $pk_after $pk_left"
  echo "$rs $rs_before $rs_after $rs_left"
} | tee "$RAW"
read -r _ pw pc pm _ <<<"$pk"; read -r _ rw rc rm _ <<<"$rs"
mib() { echo "scale=1; $1 / 1048576" | bc; }
{
  echo
  echo "| tool | wall s | CPU s | peak MiB | repository before MiB | after MiB | returned MiB | backups left |"
  echo "|---|---|---|---|---|---|---|---|"
  echo "| pgkeep expire | $pw | $pc | $((pm / 1024)) | $(mib "$pk_before") | $(mib "$pk_after") | $(mib $((pk_before - pk_after))) | $pk_left |"
  echo "| restic forget --prune | $rw | $rc | $((rm / 1024)) | $(mib "$rs_before") | $(mib "$rs_after") | $(mib $((rs_before - rs_after))) | $rs_left |"
  echo
  echo "pgkeep/restic: wall $(echo "scale=2; $pw / $rw" | bc)x, peak memory $(echo "scale=2; $pm / $rm" | bc)x"
} | tee -a "$RAW.table.md"
echo "raw figures: $RAW"
