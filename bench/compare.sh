#!/usr/bin/env bash
# pgkeep next to pgBackRest and pg_basebackup on the same cluster, in one run, tools interleaved.
#
# Usage: bench/compare.sh [SCALE=50] [REPEAT=1]
#   BENCH_DATASET=pgbench|random|tables   pgbench data (compresses ~20x), a table of random
#                                  text columns (compresses ~3x), or BENCH_TABLES small tables
#                                  (many small files) next to pgbench data; default pgbench
#   BENCH_TABLES=20000             tables of the `tables` dataset (100 rows each)
#   BENCH_STORE=local|s3|azure     where the repositories live: local disk (default); SeaweedFS
#                                  over HTTPS for both tools; or Azurite for pgkeep with
#                                  pgBackRest on SeaweedFS (see start_seaweedfs below)
#   BENCH_VARIANTS="default plain 256KiB"  pgkeep variants, one repository each: default (an
#                                  encrypted repository, the built-in chunk size), plain (an
#                                  unencrypted repository), or a PGKEEP_RELATION_CHUNK_SIZE
#                                  (encrypted); BENCH_CHUNKS is the old name
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
#   restore     restore of the newest backup into an empty directory; beside it the write floor
#               (`floor`: the restored files written again from memory and synced once)
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
CHUNKS=${BENCH_VARIANTS:-${BENCH_CHUNKS:-default}}
STORE=${BENCH_STORE:-local}
NTABLES=${BENCH_TABLES:-20000}
W=${BENCH_DIR:-/tmp/bench-compare}
OUT=${BENCH_OUT:-bench/results}
TPS_SECS=${BENCH_TPS_SECS:-30}
PORT=${BENCH_PORT:-55433}
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
RAW="$OUT/raw-$DATASET-s$SCALE$([ "$STORE" = local ] || echo "-$STORE")-$STAMP.txt"

for t in pgbackrest pg_basebackup /usr/bin/time zstd; do
  command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "run as root (PostgreSQL and pgBackRest run as postgres)" >&2; exit 2; }

cargo build --release -q -p pgkeep
as_pg() { runuser -u postgres -- "$@"; }
cleanup() { as_pg "$PGBIN/pg_ctl" -D "$W/pgdata" -m immediate stop >/dev/null 2>&1 || true; stop_stores; }
stop_stores() { :; }
trap cleanup EXIT
cleanup
rm -rf "$W"; mkdir -p "$W/sock" "$W/pgbr/log" "$W/pgbr/lock" "$W/pgbr/spool" "$W/tmp"
# The binary under test is copied: others may rebuild target/ while this runs.
cp target/release/pgkeep "$W/pgkeep"
PGKEEP="$W/pgkeep"
chown -R postgres "$W"; chmod 755 "$W"

# Object storage (BENCH_STORE=s3|azure): a server on loopback for this run, its data on the
# same disk as the cluster. S3: SeaweedFS serving HTTPS with a certificate made here, used by
# both tools (pgBackRest insists on TLS; pgkeep trusts the certificate through SSL_CERT_FILE,
# as a user with a private CA would). Azure: Azurite (plain HTTP, its emulator account) for
# pgkeep; pgBackRest then stays on SeaweedFS S3, the anchor users would compare with.
STORE_ENV=()
start_seaweedfs() {
  local tls=$W/s3/tls
  mkdir -p "$W/s3/data" "$tls"
  # A CA of our own and a server certificate it signs (a self-signed server certificate is
  # refused by webpki as a CA used as an end entity).
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=pgkeep bench CA" \
    -keyout "$tls/ca.key" -out "$tls/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout "$tls/key.pem" \
    -out "$tls/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' > "$tls/ext"
  openssl x509 -req -in "$tls/server.csr" -CA "$tls/ca.pem" -CAkey "$tls/ca.key" \
    -CAcreateserial -days 2 -extfile "$tls/ext" -out "$tls/cert.pem" 2>/dev/null
  chmod 755 "$W/s3" "$tls"; chmod 644 "$tls/ca.pem" "$tls/cert.pem"
  # The system's roots plus our CA: pgkeep's HTTP client reads SSL_CERT_FILE, as it would for
  # a user's private CA.
  cat /etc/ssl/certs/ca-certificates.crt "$tls/ca.pem" > "$tls/bundle.pem" 2>/dev/null ||
    cp "$tls/ca.pem" "$tls/bundle.pem"
  S3_PORT=${BENCH_S3_PORT:-18333}
  (cd "$W/s3" && AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret-key exec weed mini \
    -dir="$W/s3/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port=$((S3_PORT + 1)) \
    -s3.port.https="$S3_PORT" -s3.cert.file="$tls/cert.pem" -s3.key.file="$tls/key.pem" \
    -bucket=pgkeep,pgbr -webdav=false -admin.ui=false -master.telemetry=false \
    -s3.port.iceberg=0 -s3.port.lance=0 -metricsPort="$((S3_PORT + 2))" > "$W/s3/weed.log" 2>&1) &
  WEED_PID=$!
  for _ in $(seq 1 100); do
    curl -s -o /dev/null --cacert "$tls/ca.pem" "https://localhost:$S3_PORT/" && break
    sleep 0.2
  done
  curl -s -o /dev/null --cacert "$tls/ca.pem" "https://localhost:$S3_PORT/" ||
    { echo "SeaweedFS did not start:" >&2; tail -20 "$W/s3/weed.log" >&2; exit 1; }
}
start_azurite() {
  mkdir -p "$W/az"
  AZ_PORT=${BENCH_AZURE_PORT:-10100}
  azurite-blob --blobHost 127.0.0.1 --blobPort "$AZ_PORT" --location "$W/az" --silent \
    --disableTelemetry --skipApiVersionCheck --loose > "$W/az.log" 2>&1 &
  AZURITE_PID=$!
  for _ in $(seq 1 100); do
    curl -s -o /dev/null "http://127.0.0.1:$AZ_PORT/" && break
    sleep 0.2
  done
  # object_store cannot create containers: one SharedKey-signed PUT (the emulator's public
  # development account).
  python3 - "$AZ_PORT" <<'PY'
import base64, hashlib, hmac, sys, urllib.request
from email.utils import formatdate
port, account = sys.argv[1], "devstoreaccount1"
key = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
date, version = formatdate(usegmt=True), "2021-08-06"
to_sign = ("PUT\n" + "\n" * 11 + f"x-ms-date:{date}\nx-ms-version:{version}\n"
           f"/{account}/{account}/pgkeep\nrestype:container")
sig = base64.b64encode(hmac.new(key, to_sign.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/{account}/pgkeep?restype=container", method="PUT",
    headers={"x-ms-date": date, "x-ms-version": version, "Authorization": f"SharedKey {account}:{sig}",
             "Content-Length": "0"})
try:
    urllib.request.urlopen(req)
except urllib.error.HTTPError as e:
    if e.code != 409:
        raise
PY
}
stop_stores() {
  [ -n "${WEED_PID:-}" ] && kill "$WEED_PID" 2>/dev/null
  [ -n "${AZURITE_PID:-}" ] && kill "$AZURITE_PID" 2>/dev/null
  pkill -f "weed mini -dir=$W/s3/data" 2>/dev/null || true
  return 0
}
case $STORE in
  local) ;;
  s3)
    start_seaweedfs
    STORE_ENV=(PGKEEP_REPO_ENDPOINT="https://localhost:$S3_PORT" PGKEEP_REPO_REGION=us-east-1
      PGKEEP_REPO_FORCE_PATH_STYLE=true AWS_ACCESS_KEY_ID=bench
      AWS_SECRET_ACCESS_KEY=bench-secret-key SSL_CERT_FILE="$W/s3/tls/bundle.pem") ;;
  azure)
    start_seaweedfs
    start_azurite
    STORE_ENV=(PGKEEP_REPO_AZURE_USE_EMULATOR=true PGKEEP_REPO_ALLOW_HTTP=true
      AZURITE_BLOB_STORAGE_URL="http://127.0.0.1:$AZ_PORT") ;;
  *) echo "BENCH_STORE must be local, s3 or azure, not $STORE" >&2; exit 2 ;;
esac

# pgkeep's repository of a variant in this repeat, and the command line that runs pgkeep on it.
pk_url() { # variant
  case $STORE in
    local) echo "$W/pk-$1" ;;
    s3) echo "s3://pgkeep/r$rep-$1" ;;
    azure) echo "az://pgkeep/r$rep-$1" ;;
  esac
}
pk_argv() { # variant -> PK_ARGV
  PK_ARGV=(env "$(variant_env "$1")" "PGKEEP_REPO=$(pk_url "$1")" "${STORE_ENV[@]}")
  [ "$1" = plain ] || PK_ARGV+=(PGKEEP_PASSPHRASE=bench)
  PK_ARGV+=("$PGKEEP")
}
pk_size_path() { # variant -> what `measure` sizes ("-" on object storage)
  if [ "$STORE" = local ]; then echo "$W/pk-$1"; else echo -; fi
}

PGBR_CONF="$W/pgbr/pgbackrest.conf"
if [ "$STORE" = local ]; then
  PGBR_REPO="repo1-path=$W/pgbr/repo"
else
  PGBR_REPO="repo1-type=s3
repo1-path=/r1
repo1-s3-bucket=pgbr
repo1-s3-endpoint=localhost
repo1-storage-port=$S3_PORT
repo1-storage-ca-file=$W/s3/tls/ca.pem
repo1-s3-region=us-east-1
repo1-s3-uri-style=path
repo1-s3-key=bench
repo1-s3-key-secret=bench-secret-key"
fi
cat > "$PGBR_CONF" <<EOF
[global]
$PGBR_REPO
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
if [ "$STORE" = local ]; then PGBR_SIZE=$W/pgbr/repo/backup; else PGBR_SIZE=-; fi
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

if [ "$DATASET" = pgbench ] || [ "$DATASET" = tables ]; then
  "$PGBIN/pgbench" -i -s "$SCALE" -q 2>/dev/null
  TABLE=pgbench_accounts; KEY=aid; ROWS=$((SCALE * 100000))
  CHANGE_LOCAL="update pgbench_accounts set abalance = abalance + 1 where aid between \$LO and \$HI"
  TPS_ARGS=(-c 2 -j 2)
  if [ "$DATASET" = tables ]; then
    # Many small files: each table a heap, a primary key and a TOAST table with its index.
    # Batches of 500 per transaction stay within the lock table.
    for lo in $(seq 1 500 "$NTABLES"); do
      hi=$((lo + 499)); [ "$hi" -gt "$NTABLES" ] && hi=$NTABLES
      psql -c "do \$\$ begin for i in $lo..$hi loop
        execute format('create table small_%s (id int primary key, v text)', i);
        execute format('insert into small_%s select g, md5(g::text) from generate_series(1, 100) g', i);
        end loop; end \$\$"
    done
    echo "   $NTABLES small tables; files in the data directory: $(find "$W/pgdata/base" -type f | wc -l)"
  fi
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
# A restore, the write floor beside it and the repositories need about 3x the database on top
# of the cluster itself: stop now rather than fail on a full disk halfway through the steps.
FREE=$(df -B1 --output=avail "$W" | tail -1)
if [ "$FREE" -lt $((DB_BYTES * 3)) ]; then
  echo "compare.sh: $W has $((FREE >> 20)) MiB free, needs about $((DB_BYTES * 3 >> 20)) MiB (3x the database); free some space or set BENCH_DIR" >&2
  exit 1
fi
echo "   database: $((DB_BYTES / 1048576)) MiB; zstd -3 of the main table's files:"
TABFILE=$(psql -Atc "select pg_relation_filepath('$TABLE')")
SAMPLE="$W/pgdata/$TABFILE"   # its first 1 GiB segment (or all of it when smaller)
RATIO=$(zstd -3 -c "$SAMPLE" | wc -c)
RAWB=$(stat -c %s "$SAMPLE")
echo "   $(echo "scale=1; $RAWB / $RATIO" | bc)x compressible"
pgbr stanza-create >/dev/null
pgbr check >/dev/null

{
  echo "# compare.sh store=$STORE dataset=$DATASET scale=$SCALE repeat=$REPEAT db_bytes=$DB_BYTES compress_ratio=$(echo "scale=2; $RAWB / $RATIO" | bc) chunks=$CHUNKS cores=$(nproc) $(date -u +%FT%TZ)"
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
  case $1 in
    default|plain) echo "PGKEEP_UNUSED=1" ;;
    *) echo "PGKEEP_RELATION_CHUNK_SIZE=$1" ;;
  esac
}
pk() { # variant args...
  local v=$1; shift
  pk_argv "$v"
  "${PK_ARGV[@]}" -q "$@"
}
# The storage requests of the variant's last backup (its run record), on object storage.
log_requests() { # repeat step tool variant
  [ "$STORE" = local ] && return 0
  pk "$4" --json history --kind backup | python3 -c '
import json, sys
r = json.load(sys.stdin)["records"][-1].get("storage_requests") or {}
print(" ".join(f"{k}={v}" for k, v in sorted(r.items())), sum(r.values()))' |
    { read -r line; echo "# requests $1 $2 $3 $line" | tee -a "$RAW"; }
}
# pgBackRest keeps no request count: on S3 take it from SeaweedFS's own counter of requests
# to pgBackRest's bucket (SeaweedFS_s3_request_total{bucket="pgbr"}), by request type. Its
# archive-push of the backup's WAL, in the same window, is counted with it.
pgbr_request_counts() { # -> "Type=n ..." totals so far
  curl -s "http://127.0.0.1:$((S3_PORT + 2))/metrics" | python3 -c '
import re, sys, collections
c = collections.Counter()
for line in sys.stdin:
    m = re.match(r"SeaweedFS_s3_request_total\{(.*)\} (\S+)", line)
    if m and "bucket=\"pgbr\"" in m.group(1):
        t = re.search(r"type=\"([^\"]*)\"", m.group(1))
        c[t.group(1) if t else "?"] += int(float(m.group(2)))
print(" ".join(f"{k}={v}" for k, v in sorted(c.items())))'
}
measure_pgbr_backup() { # repeat step type
  local before after
  [ "$STORE" = s3 ] && before=$(pgbr_request_counts)
  measure "$1" "$2" pgbackrest "$PGBR_SIZE" -- runuser -u postgres -- pgbackrest --config="$PGBR_CONF" --stanza=bench --type="$3" backup
  [ "$STORE" = s3 ] || return 0
  after=$(pgbr_request_counts)
  python3 - "$1" "$2" "$before" "$after" <<'PY' | tee -a "$RAW"
import sys
rep, step, before, after = sys.argv[1:5]
parse = lambda s: {k: int(v) for k, v in (kv.split("=") for kv in s.split())}
b, a = parse(before), parse(after)
d = {k: a[k] - b.get(k, 0) for k in a if a[k] - b.get(k, 0) > 0}
print(f"# requests {rep} {step} pgbackrest", " ".join(f"{k}={v}" for k, v in sorted(d.items())), sum(d.values()))
PY
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
  for v in $CHUNKS; do
    if [ "$v" = plain ]; then pk "$v" repo init --no-encryption >/dev/null; else pk "$v" repo init >/dev/null; fi
  done
  if [ "$rep" -gt 1 ]; then
    pgbr stop >/dev/null 2>&1 || true
    if [ "$STORE" = local ]; then
      rm -rf "$W/pgbr/repo"; mkdir -p "$W/pgbr/repo"; chown postgres "$W/pgbr/repo"
    else
      sed -i "s|^repo1-path=.*|repo1-path=/r$rep|" "$PGBR_CONF"
    fi
    pgbr start >/dev/null 2>&1 || true; pgbr stanza-create >/dev/null
  fi
  psql -c checkpoint
  # Full.
  for t in $(order "$rep" "${TOOLS[@]}" pg_basebackup); do
    case $t in
      pgbackrest) measure_pgbr_backup "$rep" full full ;;
      pg_basebackup) mkdir -p "$W/bb"; measure "$rep" full pg_basebackup "$W/bb" -- pg_basebackup -Ft --compress=server-zstd:level=3 -c fast -D "$W/bb/$rep" ;;
      pgkeep:*) v=${t#pgkeep:}; pk_argv "$v"; measure "$rep" full "$t" "$(pk_size_path "$v")" -- "${PK_ARGV[@]}" -q backup --pgdata "$W/pgdata"; log_requests "$rep" full "$t" "$v" ;;
    esac
  done
  FULL_SET=$(pgbr info --output=json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["backup"][-1]["label"])')
  declare -A FULL_ID=()
  for v in $CHUNKS; do FULL_ID[$v]=$(pk "$v" --json list | python3 -c 'import json,sys; d=json.load(sys.stdin); b=d["backups"] if isinstance(d,dict) else d; print(b[-1]["id"])'); done

  incr() { # step
    for t in $(order "$rep" "${TOOLS[@]}"); do
      case $t in
        pgbackrest) measure_pgbr_backup "$rep" "$1" incr ;;
        pgkeep:*) v=${t#pgkeep:}; pk_argv "$v"; measure "$rep" "$1" "$t" "$(pk_size_path "$v")" -- "${PK_ARGV[@]}" -q backup --pgdata "$W/pgdata"; log_requests "$rep" "$1" "$t" "$v" ;;
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
        pk_argv "$v"
        measure "$rep" restore "$t" - -- "${PK_ARGV[@]}" -q restore latest --target-dir "$d"
        if [ "$v" = "${CHUNKS%% *}" ]; then
          # The write floor: the same files written from memory and synced (bench/write_floor.py).
          measure "$rep" restore floor - -- python3 bench/write_floor.py "$d" "$W/r-floor"
          rm -rf "$W/r-floor"
        fi
        measure "$rep" delta-same "$t" - -- "${PK_ARGV[@]}" -q restore latest --target-dir "$d" --delta
        fresh_dir "$d"
        pk "$v" restore "${FULL_ID[$v]}" --target-dir "$d" >/dev/null
        measure "$rep" delta-stale "$t" - -- "${PK_ARGV[@]}" -q restore latest --target-dir "$d" --delta
        ;;
    esac
    rm -rf "$d"
  done
done

echo "== results (medians over $REPEAT repeat(s)); raw: $RAW"
python3 bench/compare_report.py "$RAW" | tee "${RAW%.txt}.table.md"
