#!/usr/bin/env bash
# Does archiving keep up with a cluster writing WAL as fast as it can? pgbench (TPC-B-like,
# 4 clients) runs for SECONDS against a real cluster whose archive_command is, in turn:
# pgkeep synchronous, pgkeep asynchronous (--spool-dir, 4 jobs) and pgBackRest asynchronous
# (archive-async, process-max 4). Every second the script samples how many segments wait in
# pg_wal/archive_status (.ready) and the size of pg_wal; it reports the WAL generated, the
# segments archived, the peak backlog, the backlog left when pgbench stops, and failures.
# Small max_wal_size and checkpoint_timeout make checkpoints frequent, so full-page images
# swell the WAL as on a busy server, and synchronous_commit=off lets pgbench write WAL as fast as
# the machine allows (the archiver's worst case). Target (issue 4): async keeps up with pgbench at full speed
# with no growth of pg_wal beyond a few segments.
# Usage: bench/archive_load.sh [SECONDS=60] [SCALE=20]   (root; postgresql and pgbackrest packages)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-60}
SCALE=${2:-20}
# shellcheck source=bench/common.sh
. bench/common.sh
bench_setup archload
as_pg mkdir -p "$W/sock" "$W/pgbr-log" "$W/pgbr-lock" "$W/spool-pgbr" "$W/spool-pgkeep"
as_pg "$PGBIN/initdb" --no-sync -D "$W/data" -U postgres --auth=trust >/dev/null
cat >> "$W/data/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$W/sock'
listen_addresses = ''
archive_mode = on
archive_command = '/bin/true'
max_wal_size = 256MB
min_wal_size = 80MB
checkpoint_timeout = 30s
shared_buffers = 256MB
synchronous_commit = off
EOF
as_pg "$PGBIN/pg_ctl" -D "$W/data" -l "$W/pg.log" -w start >/dev/null
PSQL=(psql -h "$W/sock" -p "$PORT" -U postgres -Xq -v ON_ERROR_STOP=1)
as_pg "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -i -q -s "$SCALE" postgres >/dev/null 2>&1

: > "$W/empty.toml"; chown postgres:postgres "$W/empty.toml"
as_pg "$BIN" --config "$W/empty.toml" --repo "$W/pgkeep-sync" repo init --no-encryption >/dev/null
as_pg "$BIN" --config "$W/empty.toml" --repo "$W/pgkeep-async" repo init --no-encryption >/dev/null
{
  echo "[global]"
  echo "repo1-path=$W/pgbr-repo"
  echo "log-path=$W/pgbr-log"; echo "lock-path=$W/pgbr-lock"; echo "spool-path=$W/spool-pgbr"
  echo "log-level-console=warn"; echo "log-level-file=off"
  echo "compress-type=zst"; echo "compress-level=3"
  echo "archive-async=y"; echo "process-max=4"
  echo "[bench]"
  echo "pg1-path=$W/data"; echo "pg1-port=$PORT"; echo "pg1-socket-path=$W/sock"
} > "$W/pgbr.conf"
chown postgres:postgres "$W/pgbr.conf"
as_pg pgbackrest --config="$W/pgbr.conf" --stanza=bench stanza-create >/dev/null

declare -A CMD=(
  [pgkeep-sync]="$BIN --config $W/empty.toml --repo $W/pgkeep-sync archive-push %p"
  [pgkeep-async]="$BIN --config $W/empty.toml --repo $W/pgkeep-async archive-push --spool-dir $W/spool-pgkeep --jobs 4 %p"
  [pgbackrest-async]="pgbackrest --config=$W/pgbr.conf --stanza=bench archive-push %p"
)
RESULT="$OUT/archive-load-$(date -u +%Y%m%dT%H%M%SZ).txt"
{
  echo "# archive_load.sh seconds=$SECS scale=$SCALE cores=$(nproc) $(date -u +%FT%TZ) load: $(uptime | sed 's/.*load average: //')"
  echo "# $(pgbackrest version), $("$PGBIN/postgres" --version), pgkeep $(git rev-parse --short HEAD)"
  printf '%-17s %6s %9s %9s %10s %10s %11s %20s %8s\n' tool tps wal_MiB segments archived ready_peak ready_at_end pg_wal_MiB_start/peak failed
} | tee "$RESULT"

for tool in pgkeep-sync pgkeep-async pgbackrest-async; do
  "${PSQL[@]}" -c "ALTER SYSTEM SET archive_command = '${CMD[$tool]}'" -c "SELECT pg_reload_conf()" >/dev/null
  # Let the new command drain what the previous one left, then start from a clean count.
  for _ in $(seq 1 60); do
    [ "$(ls "$W/data/pg_wal/archive_status" | grep -c '\.ready$' || true)" -eq 0 ] && break; sleep 1
  done
  "${PSQL[@]}" -c "CHECKPOINT" -c "SELECT pg_stat_reset_shared('archiver')" >/dev/null
  lsn0=$("${PSQL[@]}" -Atc "SELECT pg_current_wal_lsn()")
  as_pg "$PGBIN/pgbench" -h "$W/sock" -p "$PORT" -U postgres -c 4 -j 2 -T "$SECS" -n postgres > "$W/pgbench-$tool.txt" 2>&1 &
  pid=$!
  peak=0; wal_peak=0; wal_start=$(du -sm "$W/data/pg_wal" | cut -f1)
  while kill -0 "$pid" 2>/dev/null; do
    r=$(ls "$W/data/pg_wal/archive_status" | grep -c '\.ready$' || true)
    s=$(du -sm "$W/data/pg_wal" | cut -f1)
    [ "$r" -gt "$peak" ] && peak=$r
    [ "$s" -gt "$wal_peak" ] && wal_peak=$s
    sleep 1
  done
  wait "$pid"
  at_end=$(ls "$W/data/pg_wal/archive_status" | grep -c '\.ready$' || true)
  lsn1=$("${PSQL[@]}" -Atc "SELECT pg_current_wal_lsn()")
  wal=$("${PSQL[@]}" -Atc "SELECT round(pg_wal_lsn_diff('$lsn1', '$lsn0') / 1048576.0)")
  segs=$("${PSQL[@]}" -Atc "SELECT floor(pg_wal_lsn_diff('$lsn1', '$lsn0') / 16777216.0)")
  read -r archived failed < <("${PSQL[@]}" -F ' ' -Atc "SELECT archived_count, failed_count FROM pg_stat_archiver")
  tps=$(grep -oP 'tps = \K[0-9.]+' "$W/pgbench-$tool.txt" | head -1)
  printf '%-17s %6.0f %9s %9s %10s %10s %11s %20s %8s\n' "$tool" "$tps" "$wal" "$segs" "$archived" "$peak" "$at_end" "$wal_start/$wal_peak" "$failed" | tee -a "$RESULT"
done
echo "ready_peak: most segments waiting in pg_wal at one time (sampled each second); archived counts what was acknowledged while pgbench ran; pg_wal holds up to max_wal_size (256 MB) of recycled segments whatever the archiver does" | tee -a "$RESULT"
echo "written to $RESULT"
