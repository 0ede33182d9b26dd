#!/usr/bin/env bash
# Restore drill (issue 16): how long a recovery takes, as restore / replay / check seconds, for
# `pgkeep drill` next to the same work done by pgBackRest (restore, then a server replaying the
# archive through its asynchronous archive-get, then pg_amcheck), so the RTO figure has an anchor.
#
# Usage: bench/drill.sh [SCALE=50] [WAL_GIB=1] [REPEAT=2]   (root; needs the postgresql and
#        pgbackrest packages: scripts/install-deps.sh --bench)
#   BENCH_OUT=bench/results     where the raw figures and the table go (default bench/results)
#   NO_BUILD=1                  use target/release/pgkeep as is (it is copied before use)
#   BENCH_PGBR_QUEUE=128MiB     pgBackRest archive-get-queue-max (its asynchronous prefetch; its
#                               default, as deep as pgkeep's prefetch of 8 segments)
#   BENCH_PGKEEP_SPOOL=0        drill with pgkeep's synchronous archive-get (default: a spool
#                               directory, so its archive-get prefetches, as pgBackRest's does)
#   BENCH_CLIENTS=4             pgbench clients generating the WAL
#   BENCH_SETUP_ONLY=1          build the cluster, back it up with both tools and archive the
#                               WAL, then stop (for testing the set-up)
#   BENCH_SKIP_PGKEEP=1         run only the pgBackRest side (before `pgkeep drill` existed)
#
# Set-up, once: a pgbench cluster at SCALE (PostgreSQL 15+, the newest server installed, as
# compare.sh) whose archive_command pushes every segment to both tools, pgkeep first
# (`pgkeep archive-push %p && pgbackrest archive-push %p`), so both archives hold the same WAL.
# A full backup with each (`pgkeep backup`; `pgbackrest backup --type=full`), then pgbench
# (BENCH_CLIENTS clients, synchronous_commit off) until WAL_GIB of WAL has been written after the
# backups (pg_current_wal_lsn differences), then pg_switch_wal() and a wait until that last
# segment is archived by both; the source cluster is then stopped. Both replays start at their
# own backup's checkpoint (pgkeep's backup is taken first) and run to the end of the archive.
#
# Per repeat, tools interleaved (the order alternates between repeats), the page cache dropped
# before each:
#   pgkeep      `pgkeep --json drill latest --scratch-dir DIR`, run as postgres under GNU time,
#               with a configuration that adds `spool_dir` (unless BENCH_PGKEEP_SPOOL=0), so
#               the archive-get of its restore_command prefetches; the spool is emptied first.
#               Its own restore_secs, replay_secs, check_secs, rto_secs and wal_bytes_replayed, plus the
#               command's wall time (it also starts and stops the server and cleans up) and the
#               peak RSS of its process tree (GNU time: the largest of pgkeep and the children
#               it waited for; a server it starts itself and waits for is counted).
#   pgbackrest  restore = `pgbackrest restore` into an empty directory (GNU time, peak RSS);
#               replay = from `pg_ctl start` (port, socket, listen_addresses='', archive_mode=off
#               added; restore_command as pgBackRest wrote it, with archive-async=y,
#               process-max=2 and archive-get-queue-max=BENCH_PGBR_QUEUE for archive-get) until
#               pg_is_in_recovery() is false: recovery to the end of the archive, then promotion;
#               check = `pg_amcheck --all --heapallindexed --install-missing` (the amcheck
#               extension is created where missing); then the server is stopped and removed.
#               WAL replayed = pg_last_wal_replay_lsn() minus the backup_label's start (LSN
#               distances count the unused tails of switched segments); wall = restore until
#               the copy is removed again, as pgkeep's command.
#   floor       the physical floor: pgkeep's backup restored (untimed) with the same WAL already
#               in pg_wal (copied from the source, which kept it with wal_keep_size), no
#               recovery.signal and no restore_command; replay = `pg_ctl start` until
#               pg_is_in_recovery() is false (crash recovery from the backup_label to the end
#               of the WAL). The issue's targets: pgkeep's replay at most 1.15x this floor.
# Both repositories as in compare.sh: pgkeep encrypted (its default), pgBackRest zst level 3,
# process-max 2, unencrypted.
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=${1:-50}
WAL_GIB=${2:-1}
REPEAT=${3:-2}
PGBR_QUEUE=${BENCH_PGBR_QUEUE:-128MiB}
PK_SPOOL=${BENCH_PGKEEP_SPOOL:-1}
CLIENTS=${BENCH_CLIENTS:-4}
export BENCH_OUT=${BENCH_OUT:-bench/results}
for t in pgbackrest /usr/bin/time bc python3; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL and pgBackRest run as postgres)" >&2; exit 2; }
# shellcheck source=bench/common.sh
. bench/common.sh
bench_setup drill
PGVER=$("$PGBIN/postgres" -V | awk '{print $3}')
[ "${PGVER%%.*}" -ge 15 ] || { echo "needs PostgreSQL 15 or later, found $PGVER in $PGBIN" >&2; exit 2; }
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT/drill-s$SCALE-$STAMP.txt"
WAL_TARGET=$(python3 -c "print(int(float('$WAL_GIB') * 2**30))")
# The binary under test is copied: others may rebuild target/ while this runs.
cp "$BIN" "$W/pgkeep"
PGKEEP=$W/pgkeep
R_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
as_pg mkdir -p "$W/sock" "$W/rsock" "$W/tmp" "$W/pgbr/log" "$W/pgbr/lock" "$W/pgbr/spool" "$W/pgbr/repo"

drill_cleanup() {
  as_pg "$PGBIN/pg_ctl" -D "$W/r-pgbr" -m immediate stop >/dev/null 2>&1 || true
  [ -n "${PGBENCH_PID:-}" ] && kill "$PGBENCH_PID" 2>/dev/null || true
  bench_cleanup
}
trap drill_cleanup EXIT

# pgBackRest: compare.sh's settings; archive-get asynchronous, as one would set it up for a fast
# replay ([global:archive-get] applies to archive-get only; archive-push stays synchronous).
PGBR_CONF=$W/pgbr/pgbackrest.conf
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

[global:archive-get]
archive-async=y
archive-get-queue-max=$PGBR_QUEUE
process-max=2

[bench]
pg1-path=$W/data
pg1-port=$PORT
pg1-socket-path=$W/sock
EOF
# pgkeep: a configuration file (repository, passphrase file, cluster) for archive_command and
# backup.
echo "bench drill passphrase" > "$W/pass"
cat > "$W/pgkeep.toml" <<EOF
[[repository]]
name = "bench"
url = "$W/pk-repo"
passphrase_file = "$W/pass"

[[cluster]]
name = "main"
pgdata = "$W/data"
pg = "host=$W/sock port=$PORT user=postgres dbname=postgres"
repository = "bench"
EOF
# The drill's: the same plus a spool directory (archive-get prefetches); archive_command keeps
# the first, so archiving stays synchronous like pgBackRest's.
{ [ "$PK_SPOOL" = 1 ] && printf '[options]\nspool_dir = "%s"\n\n' "$W/pk-spool"; cat "$W/pgkeep.toml"; } > "$W/pgkeep-drill.toml"
chown postgres:postgres "$PGBR_CONF" "$W/pass" "$W/pgkeep.toml" "$W/pgkeep-drill.toml" "$PGKEEP"; chmod 600 "$W/pass"
pk() { as_pg env PGKEEP_CONFIG="$W/pgkeep.toml" "$PGKEEP" "$@"; }
pgbr() { as_pg pgbackrest --config="$PGBR_CONF" --stanza=bench "$@"; }

echo "== cluster: pgbench scale $SCALE, PostgreSQL $PGVER; load $(uptime | sed 's/.*load average: //')"
as_pg "$PGBIN/initdb" --no-sync --data-checksums -U postgres -D "$W/data" >/dev/null
cat >> "$W/data/postgresql.conf" <<EOF
port = $PORT
unix_socket_directories = '$W/sock'
listen_addresses = ''
max_wal_size = 4GB
wal_keep_size = $(( (WAL_TARGET >> 20) + 1024 ))
synchronous_commit = off
archive_mode = on
archive_command = 'PGKEEP_CONFIG=$W/pgkeep.toml $PGKEEP -q archive-push %p && pgbackrest --config=$PGBR_CONF --stanza=bench archive-push %p'
EOF
as_pg "$PGBIN/pg_ctl" -D "$W/data" -l "$W/pg.log" -w start >/dev/null
export PGHOST=$W/sock PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
psql() { command psql -X -q -v ON_ERROR_STOP=1 "$@"; }
pk repo init >/dev/null
pgbr stanza-create >/dev/null
pgbr check >/dev/null
"$PGBIN/pgbench" -i -s "$SCALE" -q 2>/dev/null
psql -c "vacuum analyze" -c checkpoint
DB_BYTES=$(psql -Atc "select sum(pg_database_size(datname)) from pg_database")

echo "== full backups"
pk -q backup >/dev/null
pgbr --type=full backup
PK_BACKUP=$(pk --json list | python3 -c 'import json,sys; print(json.load(sys.stdin)["backups"][-1]["id"])')
PGBR_SET=$(pgbr info --output=json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["label"])')

echo "== pgbench -c $CLIENTS until $WAL_GIB GiB of WAL after the backups"
LSN0=$(psql -Atc "select pg_current_wal_lsn()")
T0=$(date +%s.%N)
"$PGBIN/pgbench" -n -c "$CLIENTS" -j 2 -T 100000 >"$W/tmp/pgbench.out" 2>&1 &
PGBENCH_PID=$!
while :; do
  sleep 0.5
  written=$(psql -Atc "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$LSN0')::bigint")
  [ "$written" -ge "$WAL_TARGET" ] && break
  kill -0 "$PGBENCH_PID" 2>/dev/null || { echo "pgbench stopped early:" >&2; cat "$W/tmp/pgbench.out" >&2; exit 1; }
done
kill -TERM "$PGBENCH_PID" 2>/dev/null || true
wait "$PGBENCH_PID" 2>/dev/null || true
PGBENCH_PID=
GEN_SECS=$(echo "$(date +%s.%N) - $T0" | bc)
LAST=$(psql -Atc "select pg_walfile_name(pg_current_wal_lsn())")
WAL_BYTES=$(psql -Atc "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$LSN0')::bigint")
psql -Atc "select pg_switch_wal()" >/dev/null
echo "   $((WAL_BYTES / 1048576)) MiB of WAL in ${GEN_SECS%.*} s; waiting for $LAST in both archives"
T0=$(date +%s)
until [ "$(psql -Atc "select coalesce(last_archived_wal, '') >= '$LAST' from pg_stat_archiver")" = t ]; do
  sleep 0.5
  if [ $(( $(date +%s) - T0 )) -gt 1800 ]; then
    echo "archiving did not catch up in 30 minutes:" >&2
    psql -c "select * from pg_stat_archiver" >&2; tail -20 "$W/pg.log" >&2; exit 1
  fi
done
FAILED=$(psql -Atc "select failed_count from pg_stat_archiver")
echo "   archived after $(( $(date +%s) - T0 )) s more (archive_command failures: $FAILED)"
PK_WAL=$(du -sb "$W/pk-repo" | cut -f1)
PGBR_WAL=$(du -sb "$W/pgbr/repo/archive" | cut -f1)
# The source cluster is not needed any more: stop it, so it takes no CPU or memory.
as_pg "$PGBIN/pg_ctl" -D "$W/data" -m fast -w stop >/dev/null
unset PGHOST PGPORT
# The floor's WAL: the segments both archives hold, kept in the source's pg_wal by wal_keep_size.
as_pg mkdir -m 700 "$W/walcopy"
for f in "$W/data/pg_wal/"????????????????????????; do
  n=$(basename "$f")
  [[ "$n" > "$LAST" ]] || as_pg cp "$f" "$W/walcopy/$n"
done

{
  echo "# drill.sh scale=$SCALE wal_gib=$WAL_GIB repeat=$REPEAT db_bytes=$DB_BYTES wal_bytes_after_backups=$WAL_BYTES clients=$CLIENTS cores=$(nproc) $(date -u +%FT%TZ)"
  echo "# PostgreSQL $PGVER, $(pgbackrest version) (archive-get async, process-max 2, queue $PGBR_QUEUE), pgkeep $("$PGKEEP" --version | awk '{print $2}') ($(git describe --always --dirty); archive-get $([ "$PK_SPOOL" = 1 ] && echo "with a spool (prefetch)" || echo synchronous)); pgkeep backup $PK_BACKUP, pgBackRest set $PGBR_SET"
  echo "# repository bytes after archiving: pgkeep (whole repository) $PK_WAL, pgBackRest archive/ $PGBR_WAL; load $(uptime | sed 's/.*load average: //')"
  echo "# repeat tool restore_s replay_s check_s total_s wall_s maxrss_kib wal_bytes_replayed result"
} > "$RAW"
[ -n "${BENCH_SETUP_ONLY:-}" ] && { echo "set-up done (BENCH_SETUP_ONLY); raw header: $RAW"; cat "$RAW"; exit 0; }

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }
now() { date +%s.%N; }
secs() { echo "scale=3; ($2 - $1) / 1" | bc | sed 's/^\./0./'; }

run_pgkeep() { # repeat
  local rep=$1
  rm -rf "$W/pk-spool" "$W/scratch"
  as_pg mkdir -m 700 "$W/scratch"
  drop_caches
  set +e
  as_pg /usr/bin/time -f "%e %M" -o "$W/tmp/time" env PGKEEP_CONFIG="$W/pgkeep-drill.toml" \
    "$PGKEEP" --json drill latest --scratch-dir "$W/scratch" > "$W/tmp/drill.json" 2> "$W/tmp/drill.err"
  local rc=$?
  set -e
  local wall rss; read -r wall rss < <(tail -1 "$W/tmp/time")
  if ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$W/tmp/drill.json" 2>/dev/null; then
    echo "pgkeep drill (exit $rc) wrote no JSON report:" >&2; cat "$W/tmp/drill.err" "$W/tmp/drill.json" >&2; exit 1
  fi
  [ "$rc" = 0 ] || { echo "pgkeep drill exit $rc:" >&2; tail -20 "$W/tmp/drill.err" >&2; }
  if [ "$rep" = 1 ]; then
    echo "# pgkeep drill exit $rc; its spool after the drill: $(cd "$W" && find pk-spool -maxdepth 3 2>/dev/null | tr '\n' ' ' | cut -c1-300)" >> "$RAW"
  fi
  python3 - "$W/tmp/drill.json" "$rep" "$wall" "$rss" <<'PY' | tee -a "$RAW"
import json, sys
d = json.load(open(sys.argv[1]))
rep, wall, rss = sys.argv[2:5]
f = lambda k: "na" if d.get(k) is None else f"{float(d[k]):.3f}"
print(f"{rep} pgkeep {f('restore_secs')} {f('replay_secs')} {f('check_secs')} {f('rto_secs')} "
      f"{wall} {rss} {d.get('wal_bytes_replayed', 'na')} {d.get('result', 'na')}")
print(f"# pgkeep-json {rep} " + json.dumps(d, separators=(",", ":")))
PY
}

# Waits until the server on $R_PORT of data directory $1 is out of recovery. Polled with a fresh
# connection every 0.05 s, in one shell running as postgres: connections are refused until
# recovery is consistent, and a session held open through the replay would be cancelled by
# recovery conflicts. A server that is not running for 2 s in a row (its pid file may not exist
# yet) has failed.
wait_promoted() { # datadir
  as_pg bash -c 'down=0; until [ "$(psql -X -h "$1" -p "$2" -d postgres -Atc "select pg_is_in_recovery()" 2>/dev/null)" = f ]; do
      if "$3/pg_ctl" -D "$4" status >/dev/null 2>&1; then down=0; else down=$((down + 1)); [ $down -lt 40 ] || exit 1; fi
      sleep 0.05; done' _ "$W/rsock" "$R_PORT" "$PGBIN" "$1"
}

run_pgbackrest() { # repeat
  local rep=$1 d=$W/r-pgbr
  rm -rf "$d" "$W/pgbr/spool/archive"
  as_pg mkdir -m 700 "$d"
  drop_caches
  as_pg /usr/bin/time -f "%e %M" -o "$W/tmp/time" pgbackrest --config="$PGBR_CONF" --stanza=bench \
    --pg1-path="$d" --set="$PGBR_SET" --archive-mode=off restore > "$W/tmp/pgbr.out" 2>&1 || {
    echo "pgbackrest restore failed:" >&2; cat "$W/tmp/pgbr.out" >&2; exit 1; }
  local restore rss; read -r restore rss < <(tail -1 "$W/tmp/time")
  local start_lsn; start_lsn=$(awk '/^START WAL LOCATION:/ {print $4}' "$d/backup_label")
  cat >> "$d/postgresql.auto.conf" <<EOF
port = $R_PORT
unix_socket_directories = '$W/rsock'
listen_addresses = ''
archive_mode = off
EOF
  local t0 t1 t2
  t0=$(now)
  as_pg "$PGBIN/pg_ctl" -D "$d" -l "$W/r-pgbr.log" -W start >/dev/null
  wait_promoted "$d" || {
    echo "the restored server stopped:" >&2; tail -20 "$W/r-pgbr.log" >&2; exit 1; }
  t1=$(now)
  local replayed; replayed=$(as_pg psql -X -h "$W/rsock" -p "$R_PORT" -d postgres -Atc \
    "select pg_wal_lsn_diff(pg_last_wal_replay_lsn(), '$start_lsn')::bigint")
  local check=na result=ok tc
  tc=$(now)
  if [ -x "$PGBIN/pg_amcheck" ]; then
    as_pg "$PGBIN/pg_amcheck" -h "$W/rsock" -p "$R_PORT" --all --heapallindexed --install-missing \
      > "$W/tmp/amcheck.out" 2>&1 || { result=failed; echo "pg_amcheck found problems:" >&2; head -20 "$W/tmp/amcheck.out" >&2; }
    t2=$(now)
    check=$(secs "$tc" "$t2")
  else
    t2=$tc
  fi
  as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null
  if [ "$rep" = 1 ]; then
    echo "# pgbackrest $(grep '^restore_command' "$d/postgresql.auto.conf"); asynchronous archive-get spool used: $([ -d "$W/pgbr/spool/archive/bench/in" ] && echo yes || echo no)" >> "$RAW"
  fi
  rm -rf "$d"
  local t3 replay total wall
  t3=$(now)
  replay=$(secs "$t0" "$t1")
  total=$(echo "scale=3; ($restore + $replay + $([ "$check" = na ] && echo 0 || echo "$check")) / 1" | bc | sed 's/^\./0./')
  wall=$(echo "scale=3; $restore + $(secs "$t0" "$t3") / 1" | bc | sed 's/^\./0./')
  echo "$rep pgbackrest $restore $replay $check $total $wall $rss $replayed $result" | tee -a "$RAW"
}

# The physical floor: pgkeep's backup restored (untimed), the archived segments copied into
# its pg_wal, recovery.signal and restore_command removed, so the server replays from pg_wal
# alone (crash recovery from the backup_label) to the end of the WAL: the least any
# restore_command can add to.
run_floor() { # repeat
  local rep=$1 d=$W/r-floor
  rm -rf "$d"
  as_pg mkdir -m 700 "$d"
  pk -q restore "$PK_BACKUP" --target-dir "$d" >/dev/null
  as_pg rm -f "$d/recovery.signal" "$d/standby.signal"
  as_pg sed -i '/^restore_command/d;/^recovery_target/d' "$d/postgresql.auto.conf"
  local start_lsn first f
  start_lsn=$(awk '/^START WAL LOCATION:/ {print $4}' "$d/backup_label")
  first=$(sed -n 's/^START WAL LOCATION:.*(file \([0-9A-F]*\)).*/\1/p' "$d/backup_label")
  for f in "$W/walcopy/"*; do
    [[ "$(basename "$f")" < "$first" ]] || as_pg cp "$f" "$d/pg_wal/"
  done
  as_pg tee -a "$d/postgresql.auto.conf" >/dev/null <<EOF
port = $R_PORT
unix_socket_directories = '$W/rsock'
listen_addresses = ''
archive_mode = off
EOF
  drop_caches
  local t0 t1
  t0=$(now)
  as_pg "$PGBIN/pg_ctl" -D "$d" -l "$W/r-floor.log" -W start >/dev/null
  wait_promoted "$d" || {
    echo "the floor's server stopped:" >&2; tail -20 "$W/r-floor.log" >&2; exit 1; }
  t1=$(now)
  # After crash recovery there is no replay position; the insert position (past the end-of-
  # recovery checkpoint) is where replay ended, within a record or two.
  local replayed; replayed=$(as_pg psql -X -h "$W/rsock" -p "$R_PORT" -d postgres -Atc \
    "select pg_wal_lsn_diff(coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn()), '$start_lsn')::bigint")
  as_pg "$PGBIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null
  rm -rf "$d"
  local replay; replay=$(secs "$t0" "$t1")
  echo "$rep floor na $replay na $replay $replay 0 $replayed ok" | tee -a "$RAW"
}

for rep in $(seq 1 "$REPEAT"); do
  echo "== repeat $rep/$REPEAT (load $(uptime | sed 's/.*load average: //'))"
  order="floor pgkeep pgbackrest"; [ $((rep % 2)) = 0 ] && order="pgbackrest pgkeep floor"
  for t in $order; do
    [ "$t" = pgkeep ] && [ -n "${BENCH_SKIP_PGKEEP:-}" ] && continue
    "run_$t" "$rep"
  done
done
[ -x "$PGBIN/pg_amcheck" ] || echo "# pg_amcheck absent: no check phase for pgBackRest" >> "$RAW"

python3 - "$RAW" <<'PY' | tee "$RAW.table.md"
import statistics, sys
from collections import defaultdict
rows, header = defaultdict(list), []
for line in open(sys.argv[1]):
    if line.startswith("#"):
        if not line.startswith("# pgkeep-json") and not line.startswith("# repeat"):
            header.append(line[1:].strip())
        continue
    rep, tool, *vals = line.split()
    rows[tool].append(vals)
for h in header:
    print(f"`{h}`  ")
print()
def med(tool, i):
    v = [float(r[i]) for r in rows.get(tool, []) if r[i] != "na"]
    return statistics.median(v) if v else None
cols = [("restore s", 0), ("replay s", 1), ("check s", 2), ("total (RTO) s", 3), ("wall s", 4)]
print("| tool | n | " + " | ".join(c for c, _ in cols) + " | peak MiB | WAL replayed MiB | results |")
print("|---|---|" + "---|" * (len(cols) + 3))
for tool in ("pgkeep", "pgbackrest", "floor"):
    if tool not in rows:
        continue
    cells = [("-" if med(tool, i) is None else f"{med(tool, i):.2f}") for _, i in cols]
    rss = med(tool, 5); wal = med(tool, 6)
    res = ",".join(sorted({r[7] for r in rows[tool]}))
    print(f"| {tool} | {len(rows[tool])} | " + " | ".join(cells) +
          f" | {'-' if rss is None else f'{rss / 1024:.0f}'} | {'-' if wal is None else f'{wal / 2**20:.0f}'} | {res} |")
if "pgkeep" in rows and "pgbackrest" in rows:
    ratio = []
    for _, i in cols:
        a, b = med("pgkeep", i), med("pgbackrest", i)
        ratio.append(f"**{a / b:.2f}x**" if a is not None and b else "-")
    print(f"| pgkeep/pgBackRest | | " + " | ".join(ratio) + " | | | |")
if "pgkeep" in rows and "floor" in rows:
    b = med("floor", 1)
    for tool, name in (("pgkeep", "**{:.2f}x**"), ("pgbackrest", "{:.2f}x")):
        a = med(tool, 1)
        if a is not None:
            print(f"| {tool}/floor (replay) | | | " + name.format(a / b) + " | | | | | | |")
print()
print("Medians over the repeats. total = restore + replay + check (pgkeep: its rto_secs); wall = "
      "everything up to a clean directory again (pgkeep: the `drill` command; pgBackRest: total plus "
      "stopping the server and removing the copy). Peak: the largest process of pgkeep drill's tree; "
      "pgBackRest: its restore (its archive-get processes are not measured). floor: pgkeep's "
      "backup with the same WAL already in pg_wal, replayed without restore_command (crash "
      "recovery from the backup_label), the physical floor of the replay.")
PY
echo "raw: $RAW"
