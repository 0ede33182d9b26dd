#!/usr/bin/env bash
# pgkeep against an older pgkeep on the same cluster, in one run, interleaved: did a change
# make backups or restores slower? Ratios new/old of wall time, CPU time and peak memory.
#
# Usage: PGKEEP_OLD_BIN=/path/to/old/pgkeep bench/regress.sh [SCALE=50] [REPEAT=3]
#   The new binary is this tree's release build (NO_BUILD=1 uses target/release/pgkeep as is).
#   Build an old one with: git worktree add /tmp/old REV && cargo build --release
#   --manifest-path /tmp/old/Cargo.toml --target-dir /tmp/old-target
#   BENCH_OUT=bench/results   where the raw figures go (default bench/out)
#
# Per repeat and binary (order alternating between repeats): `repo init` (encrypted), a full
# backup of pgbench at SCALE, an incremental after updating 1% of the rows, and a restore of
# the newest backup into an empty directory (`--target-immediate`, as both versions restore
# the backup's end point). Each measured with GNU time: wall s, user+sys s, max RSS KiB.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/common.sh
SCALE=${1:-50}
REPEAT=${2:-3}
OLD=${PGKEEP_OLD_BIN:?set PGKEEP_OLD_BIN to the older pgkeep binary}
[ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL runs as postgres)" >&2; exit 2; }
bench_setup regress
cp "$BIN" "$W/new"; cp "$OLD" "$W/old"
chown postgres "$W/new" "$W/old"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RAW="$OUT/regress-s$SCALE-$STAMP.txt"
{
  echo "# regress.sh scale=$SCALE repeat=$REPEAT $(date -u +%FT%TZ)"
  echo "# new: $("$W/new" --version) ($(git rev-parse --short HEAD)); old: $("$W/old" --version) ($OLD)"
  echo "# repeat step bin wall_s cpu_s maxrss_kib"
} > "$RAW"

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
echo secret-bench-passphrase > "$W/pass"; chmod 600 "$W/pass"
: > "$W/empty.toml"
export PGKEEP_PASSPHRASE_FILE=$W/pass PGKEEP_CONFIG=$W/empty.toml

measure() { # repeat step bin command...
  local r=$1 step=$2 bin=$3; shift 3
  /usr/bin/time -f "%e %U %S %M" -o "$W/time" "$@" >/dev/null 2>"$W/err" || {
    cat "$W/err" >&2; exit 1; }
  read -r wall user sys rss < "$W/time"
  echo "$r $step $bin $wall $(echo "$user + $sys" | bc) $rss" | tee -a "$RAW"
}

for r in $(seq 1 "$REPEAT"); do
  order="old new"; [ $((r % 2)) = 0 ] && order="new old"
  for b in $order; do
    rm -rf "$W/repo-$b"; "$W/$b" --repo "$W/repo-$b" repo init >/dev/null
    measure "$r" full "$b" "$W/$b" --repo "$W/repo-$b" backup --pgdata "$W/data" --pg "host=$W port=$PORT user=postgres"
  done
  lo=$(( (r - 1) * SCALE * 1000 + 1 )); hi=$(( lo + SCALE * 1000 - 1 ))
  psql -X -q -c "update pgbench_accounts set abalance = abalance + 1 where aid between $lo and $hi"
  psql -X -q -c checkpoint
  for b in $order; do
    measure "$r" incr "$b" "$W/$b" --repo "$W/repo-$b" backup --pgdata "$W/data" --pg "host=$W port=$PORT user=postgres"
  done
  for b in $order; do
    rm -rf "$W/restore-$b"
    measure "$r" restore "$b" "$W/$b" --repo "$W/repo-$b" restore latest --target-immediate --target-dir "$W/restore-$b"
    rm -rf "$W/restore-$b"
  done
done

echo
echo "| step | old wall s | new wall s | new/old wall | old CPU s | new CPU s | new/old CPU | old MiB | new MiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for step in full incr restore; do
  awk -v s="$step" '
    function median(a, n,   i, j, t) { for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (a[j] < a[i]) { t = a[i]; a[i] = a[j]; a[j] = t }
      return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2 }
    $1 !~ /^#/ && $2 == s { k = $3; n[k]++; w[k, n[k]] = $4; c[k, n[k]] = $5; if ($6 > m[k]) m[k] = $6 }
    END {
      for (k in n) { for (i = 1; i <= n[k]; i++) { ww[i] = w[k, i]; cc[i] = c[k, i] } W[k] = median(ww, n[k]); C[k] = median(cc, n[k]) }
      printf "| %s | %.2f | %.2f | %.2fx | %.2f | %.2f | %.2fx | %d | %d |\n", s, W["old"], W["new"], W["new"] / W["old"], C["old"], C["new"], C["new"] / C["old"], m["old"] / 1024, m["new"] / 1024
    }' "$RAW"
done | tee -a "$RAW.table.md"
echo "raw figures: $RAW"
