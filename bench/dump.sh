#!/usr/bin/env bash
# Logical dumps, day by day: repository growth of `pgkeep dump` against the sum of plain
# `pg_dump -Fc` files, and dump / restore wall time against `pg_dump -Fc` to a local file /
# `pg_restore` from it, as ratios. Two workloads:
#   orders  - an ordering system: ROWS orders; each day appends 2% new rows and updates 0.5%
#             of the rows among the newest 10%; dumped after each of DAYS days.
#   pgbench - pgbench's uniform random updates (where chunk deduplication helps least):
#             scale SCALE, each day runs PGB_TX transactions, PGB_DAYS days.
# Usage: bench/dump.sh [ROWS=1000000] [DAYS=30] [SCALE=10] [PGB_DAYS=10]
# Targets (issue 5): orders: 30 dumps <= 0.15x the space of 30 pg_dump -Fc files; dump time
# <= 0.8x pg_dump -Fc; restore-dump <= 1.1x pg_restore.
# The server runs with fsync=off so that timings measure the tools, not this machine's disk.
# Needs root (PostgreSQL runs as `postgres` via runuser) and the PostgreSQL 15 binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROWS=${1:-1000000}
DAYS=${2:-30}
SCALE=${3:-10}
PGB_DAYS=${4:-10}
PGB_TX=${PGB_TX:-$((SCALE * 2000))}
PGBIN=${PGKEEP_PG_BIN:-$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)}
OUT=${BENCH_OUT:-bench/out}
mkdir -p "$OUT"
if [ -z "${PGKEEP_BIN:-}" ]; then
  cargo build --release -q -p pgkeep
  # Honour CARGO_TARGET_DIR, where cargo put the binary.
  PGKEEP_BIN=${CARGO_TARGET_DIR:-$PWD/target}/release/pgkeep
fi

WORK=$(mktemp -d /tmp/pgkeep-dump-bench.XXXXXX)
chown postgres "$WORK"
PGPID=
cleanup() {
  # Signal the postmaster itself: runuser in between does not forward SIGINT.
  if [ -f "$WORK/data/postmaster.pid" ]; then
    kill -INT "$(head -1 "$WORK/data/postmaster.pid")" 2>/dev/null || true
  fi
  if [ -n "$PGPID" ]; then wait "$PGPID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
runuser -u postgres -- "$PGBIN/initdb" --no-sync -A trust -U postgres -D "$WORK/data" > "$WORK/initdb.log"
mkdir -p "$WORK/sock" && chown postgres "$WORK/sock"
runuser -u postgres -- "$PGBIN/postgres" -D "$WORK/data" -p "$PORT" -k "$WORK/sock" \
  -c listen_addresses= -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
  -c shared_buffers=256MB -c max_wal_size=4GB > "$WORK/server.log" 2>&1 &
PGPID=$!
export PGHOST="$WORK/sock" PGPORT="$PORT" PGUSER=postgres PGDATABASE=postgres
for _ in $(seq 100); do pg_isready -q && break; sleep 0.1; done

now() { date +%s.%N; }
psqlq() { psql -XAtq -v ON_ERROR_STOP=1 "$@"; }
bytes_of() { du -sb "$1" | cut -f1; }

# run_days NAME DB DAYS DAYFN: after each day, interleaved: pg_dump -Fc to a file, pgkeep dump.
# Prints per-day lines and leaves totals in $OUT/NAME.csv.
run_days() {
  local name=$1 db=$2 days=$3 dayfn=$4
  local repo="$WORK/repo-$name" files="$WORK/files-$name"
  mkdir -p "$files"
  export PGKEEP_REPO="$repo"
  "$PGKEEP_BIN" -q repo init --no-encryption > /dev/null
  local base; base=$(bytes_of "$repo")
  local csv="$OUT/dump-$name.csv"
  echo "day,pg_dump_bytes,pg_dump_secs,pgkeep_repo_growth,pgkeep_new_bytes,pgkeep_secs" > "$csv"
  local d
  for d in $(seq 1 "$days"); do
    $dayfn "$d"
    psqlq -d "$db" -c "CHECKPOINT" > /dev/null
    local s e f pd pk
    s=$(now); pg_dump -Fc -d "$db" -f "$files/day$d.dump"; e=$(now)
    pd=$(echo "$e - $s" | bc -l)
    f=$(stat -c %s "$files/day$d.dump")
    s=$(now); "$PGKEEP_BIN" -q --json dump --db "$db" --label daily > "$WORK/last.json"; e=$(now)
    pk=$(echo "$e - $s" | bc -l)
    # Only the newest file is needed (for the restore); its size is in the CSV. Keeping 30
    # of them would take gigabytes of a disk the benchmark shares.
    if [ "$d" -gt 1 ]; then rm -f "$files/day$((d - 1)).dump"; fi
    local newb; newb=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["totals"]["new_bytes"])' "$WORK/last.json")
    local grow=$(( $(bytes_of "$repo") - base ))
    echo "$d,$f,$pd,$grow,$newb,$pk" >> "$csv"
    printf '%s day %2d: pg_dump -Fc %8.1f MiB %6.2f s | pgkeep dump: repo +%8.1f MiB total, %7.2f MiB new, %6.2f s\n' \
      "$name" "$d" "$(echo "$f/1048576" | bc -l)" "$pd" "$(echo "$grow/1048576" | bc -l)" \
      "$(echo "$newb/1048576" | bc -l)" "$pk"
  done
  # Restore of the last day, interleaved three times each; medians. `restore-dump --create`
  # creates the database, so the plain side is timed with and without its CREATE DATABASE.
  local last="$files/day$days.dump" i m rc=() rp=() rk=()
  for i in 1 2 3; do
    psqlq -c "DROP DATABASE IF EXISTS r_plain" 2> /dev/null
    s=$(now); psqlq -c "CREATE DATABASE r_plain"; m=$(now)
    pg_restore --exit-on-error -d r_plain "$last"; e=$(now)
    rc+=("$(echo "$m - $s" | bc -l)")
    rp+=("$(echo "$e - $m" | bc -l)")
    psqlq -c "DROP DATABASE IF EXISTS r_keep" 2> /dev/null
    s=$(now); "$PGKEEP_BIN" -q restore-dump latest --target-db r_keep --create > /dev/null; e=$(now)
    rk+=("$(echo "$e - $s" | bc -l)")
  done
  python3 - "$csv" "$name" "${rp[*]}" "${rk[*]}" "${rc[*]}" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1])))
name = sys.argv[2]
rp = [float(x) for x in sys.argv[3].split()]
rk = [float(x) for x in sys.argv[4].split()]
rc = [float(x) for x in sys.argv[5].split()]
rpc = [a + b for a, b in zip(rp, rc)]
files = sum(int(r["pg_dump_bytes"]) for r in rows)
repo = int(rows[-1]["pgkeep_repo_growth"])
pd = sum(float(r["pg_dump_secs"]) for r in rows)
pk = sum(float(r["pgkeep_secs"]) for r in rows)
mib = 1 << 20
print(f"== {name}: {len(rows)} days")
print(f"space:   {len(rows)} pg_dump -Fc files {files/mib:9.1f} MiB | pgkeep repository {repo/mib:9.1f} MiB | ratio {repo/files:.3f}x")
print(f"dump:    pg_dump -Fc {pd:8.1f} s total | pgkeep dump {pk:8.1f} s total | ratio {pk/pd:.2f}x "
      f"(median per day {statistics.median(float(r['pgkeep_secs']) for r in rows):.2f} s vs "
      f"{statistics.median(float(r['pg_dump_secs']) for r in rows):.2f} s)")
kr, pr, pcr = statistics.median(rk), statistics.median(rp), statistics.median(rpc)
print(f"restore: pg_restore {pr:8.2f} s (with its CREATE DATABASE {pcr:.2f} s) | pgkeep restore-dump --create {kr:8.2f} s | "
      f"ratio {kr/pr:.2f}x ({kr/pcr:.2f}x with CREATE DATABASE; pgkeep also checks every table's row count)")
PY
}

# --- orders workload ---
psqlq -c "CREATE DATABASE orders"
psqlq -d orders <<SQL
CREATE TABLE orders (
  id bigserial PRIMARY KEY,
  customer_id int NOT NULL,
  status text NOT NULL,
  total numeric(12,2) NOT NULL,
  created_at timestamptz NOT NULL,
  shipping_address text NOT NULL,
  items jsonb NOT NULL
);
INSERT INTO orders (customer_id, status, total, created_at, shipping_address, items)
SELECT (random() * 100000)::int, 'new', (random() * 500)::numeric(12,2),
       '2026-01-01'::timestamptz + g * interval '2 seconds',
       md5(g::text) || ' street ' || (g % 997) || ', city ' || (g % 113),
       jsonb_build_array(jsonb_build_object('sku', g % 5000, 'qty', 1 + g % 3, 'price', (g % 97) + 0.99))
FROM generate_series(1, $ROWS) g;
CREATE INDEX ON orders (customer_id);
VACUUM ANALYZE orders;
SQL
orders_day() {
  psqlq -d orders <<SQL
INSERT INTO orders (customer_id, status, total, created_at, shipping_address, items)
SELECT (random() * 100000)::int, 'new', (random() * 500)::numeric(12,2),
       now() + g * interval '1 second',
       md5(random()::text) || ' street ' || (g % 997),
       jsonb_build_array(jsonb_build_object('sku', g % 5000, 'qty', 1 + g % 3, 'price', (g % 97) + 0.99))
FROM generate_series(1, ($ROWS * 2 / 100)) g;
WITH recent AS (
  SELECT id FROM orders WHERE id > (SELECT max(id) FROM orders) - (SELECT count(*) FROM orders) / 10
  ORDER BY random() LIMIT (SELECT count(*) / 200 FROM orders)
)
UPDATE orders o SET status = 'shipped', total = o.total + 1 FROM recent WHERE o.id = recent.id;
SQL
}
run_days orders orders "$DAYS" orders_day

# --- pgbench uniform random updates ---
psqlq -c "CREATE DATABASE bench"
"$PGBIN/pgbench" -q -i -s "$SCALE" bench > /dev/null 2>&1
pgbench_day() {
  "$PGBIN/pgbench" -n -c 2 -t "$((PGB_TX / 2))" bench > /dev/null
}
run_days pgbench bench "$PGB_DAYS" pgbench_day
