#!/usr/bin/env bash
# Regenerates the fuzz corpus (fuzz/corpus/<target>/) from real sources, once; the files are
# committed and `cargo test` only reads them. Needs root (the clusters run as `postgres`),
# PostgreSQL 15 in /usr/lib/postgresql and, for the other majors, $PGKEEP_PG_CACHE
# (scripts/install-deps.sh fills it).
#
# - From throwaway clusters of every major present (13 to 18): the first pages of a WAL
#   segment holding commits, an abort, COMMIT/ROLLBACK PREPARED, a restore point and a commit
#   with 300 subtransactions (a record crossing a page), and pg_control.
# - From a PostgreSQL 15 cluster: a real `pgkeep backup` and `pgkeep dump` into a plain
#   repository (manifests, index files, `config`), the backup_label of pg_basebackup and of
#   `pgkeep restore`, timeline history files (two archive recoveries of the base backup:
#   timelines 2 and 3), pg_dump custom archives (-Z0 from pg_dump 15 and 18, and a compressed
#   one).
# - The repository targets' seeds made by pgkeep's own writers (fuzz/examples/make_corpus.rs).
#
# Kept by hand, left alone here: the configuration files (the examples of docs/config.md and
# the README), the WAL file names, and the `nested-*` inputs (2000 levels of brackets: the
# TOML and JSON parsers must refuse them without running out of stack). Files this script
# writes replace those of the same name; remove a target's directory first to drop old ones.
#
#   fuzz/make-corpus.sh        (from the repository root or anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CORPUS=$ROOT/fuzz/corpus
PG_CACHE=${PGKEEP_PG_CACHE:-/var/cache/pgkeep/pg}
PG15=/usr/lib/postgresql/15/bin
CLIENT=$PG_CACHE/18/bin
[ -x "$CLIENT/psql" ] || CLIENT=$PG15
[ "$(id -u)" = 0 ] || { echo "make-corpus: run as root" >&2; exit 1; }

cargo build -q --bin pgkeep
PGKEEP=$ROOT/target/debug/pgkeep

W=$(mktemp -d /tmp/pgkeep-corpus.XXXXXX)
chmod 755 "$W"
started=()
cleanup() {
  for d in "${started[@]}"; do
    runuser -u postgres -- "${d%%|*}/pg_ctl" -D "${d#*|}" -m immediate stop >/dev/null 2>&1 || true
  done
  rm -rf "$W"
}
trap cleanup EXIT

put() { # target name source-file
  mkdir -p "$CORPUS/$1"
  cp "$3" "$CORPUS/$1/$2"
  echo "$1/$2: $(stat -c %s "$CORPUS/$1/$2") bytes"
}

# start BIN DIR PORT: initdb and start a cluster in DIR (socket in DIR).
start() {
  local bin=$1 dir=$2 port=$3
  mkdir -p "$dir"
  chown postgres "$dir"
  runuser -u postgres -- "$bin/initdb" --no-sync -A trust -U postgres -D "$dir/data" >/dev/null
  cat >>"$dir/data/postgresql.conf" <<EOF
port = $port
listen_addresses = ''
unix_socket_directories = '$dir'
max_prepared_transactions = 5
wal_level = replica
fsync = off
EOF
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w start >/dev/null
  started+=("$bin|$dir/data")
}

sql() { # DIR PORT SQL
  "$CLIENT/psql" -X -q -t -A -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres -d postgres -c "$3"
}

# The records the WAL targets look for, in a fresh segment; prints the segment's name.
workload() { # DIR PORT
  local dir=$1 port=$2
  sql "$dir" "$port" "CREATE TABLE t (id int PRIMARY KEY, v text)" >/dev/null
  sql "$dir" "$port" "SELECT pg_switch_wal()" >/dev/null
  sql "$dir" "$port" "INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 50) g"
  sql "$dir" "$port" "BEGIN; INSERT INTO t VALUES (1000, 'x'); ROLLBACK"
  sql "$dir" "$port" "BEGIN; INSERT INTO t VALUES (1001, 'p'); PREPARE TRANSACTION 'fuzz1'"
  sql "$dir" "$port" "COMMIT PREPARED 'fuzz1'"
  sql "$dir" "$port" "BEGIN; INSERT INTO t VALUES (1002, 'q'); PREPARE TRANSACTION 'fuzz2'"
  sql "$dir" "$port" "ROLLBACK PREPARED 'fuzz2'"
  sql "$dir" "$port" "SELECT pg_create_restore_point('fuzz restore point')" >/dev/null
  sql "$dir" "$port" "DO \$\$ BEGIN FOR i IN 1..300 LOOP BEGIN INSERT INTO t VALUES (2000 + i, 'sub'); EXCEPTION WHEN others THEN NULL; END; END LOOP; END \$\$"
  sql "$dir" "$port" "SELECT pg_walfile_name(pg_current_wal_lsn())"
}

port=55431
for major in 13 14 15 16 17 18; do
  bin=$PG_CACHE/$major/bin
  [ "$major" = 15 ] && [ -x "$PG15/postgres" ] && bin=$PG15
  [ -x "$bin/postgres" ] || { echo "make-corpus: no PostgreSQL $major, skipped" >&2; continue; }
  dir=$W/pg$major
  start "$bin" "$dir" "$port"
  seg=$(workload "$dir" "$port")
  # Five 8 KiB pages: the long header, the records, the page-crossing commit.
  head -c 40960 "$dir/data/pg_wal/$seg" >"$W/seg"
  put wal_segment "pg$major-$seg" "$W/seg"
  runuser -u postgres -- "$bin/pg_ctl" -D "$dir/data" -m fast stop >/dev/null
  printf '\0' | cat - "$dir/data/global/pg_control" >"$W/ctl"
  put pg_control "pg$major-shut-down" "$W/ctl"
  port=$((port + 1))
done

# PostgreSQL 15 through pgkeep.
dir=$W/main
start "$PG15" "$dir" "$port"
sql "$dir" "$port" "CREATE TABLE orders (id int PRIMARY KEY, note text); INSERT INTO orders SELECT g, md5(g::text) FROM generate_series(1, 200) g; SELECT lo_from_bytea(0, 'a large object')" >/dev/null
cat >"$W/pgkeep.toml" <<EOF
[[repository]]
name = "local"
url = "$W/repo"

[[cluster]]
name = "main"
pgdata = "$dir/data"
pg = "host=$dir port=$port user=postgres dbname=postgres"
repository = "local"
EOF
chmod 600 "$W/pgkeep.toml"
pk() { "$PGKEEP" --config "$W/pgkeep.toml" -q "$@"; }
pk repo init --no-encryption >/dev/null
pk backup >/dev/null
pk dump --db postgres >/dev/null
pk restore latest --target-dir "$W/restored" >/dev/null
put backup_label pgkeep-restore "$W/restored/backup_label"
printf '\0' | cat - "$dir/data/global/pg_control" >"$W/ctl"
put pg_control pg15-in-production "$W/ctl"
(cd "$ROOT" && cargo run -q -p pgkeep-fuzz --example make_corpus -- --from-repo "$W/repo")
put repo_config pgkeep-repo-init "$W/repo/config"

"$CLIENT/pg_basebackup" -h "$dir" -p "$port" -U postgres -D "$W/bb" -X stream -c fast
put backup_label pg_basebackup "$W/bb/backup_label"
"$CLIENT/pg_dump" -h "$dir" -p "$port" -U postgres -Fc -Z0 -f "$W/dump18" postgres
put dump_archive pg_dump18-Z0 "$W/dump18"
"$CLIENT/pg_dump" -h "$dir" -p "$port" -U postgres -Fc -f "$W/dump18z" postgres
put dump_archive pg_dump18-compressed "$W/dump18z"
if [ -x /usr/lib/postgresql/15/bin/pg_dump ]; then
  /usr/lib/postgresql/15/bin/pg_dump -h "$dir" -p "$port" -U postgres -Fc -Z0 -f "$W/dump15" postgres
  put dump_archive pg_dump15-Z0 "$W/dump15"
fi

# Archive recovery of the base backup from an empty archive (restore_command fails): it
# replays pg_wal, then starts a new timeline (2); a second one makes timeline 3, whose
# history has two lines.
chown -R postgres "$W/bb"
chmod 700 "$W/bb"
mkdir "$W/bblog"
chown postgres "$W/bblog"
port=$((port + 1))
for tli in 2 3; do
  runuser -u postgres -- touch "$W/bb/recovery.signal"
  runuser -u postgres -- "$PG15/pg_ctl" -D "$W/bb" -l "$W/bblog/log" -w start \
    -o "-p $port -k $W/bblog -c listen_addresses='' -c restore_command=false" >/dev/null ||
    { cat "$W/bblog/log" >&2; exit 1; }
  started+=("$PG15|$W/bb")
  until [ -f "$W/bb/pg_wal/0000000$tli.history" ] && [ ! -f "$W/bb/recovery.signal" ]; do sleep 0.2; done
  runuser -u postgres -- "$PG15/pg_ctl" -D "$W/bb" -m fast stop >/dev/null
  # The timeline (u32 LE), then the file.
  printf "\\x0$tli\\x00\\x00\\x00" | cat - "$W/bb/pg_wal/0000000$tli.history" >"$W/hist"
  put timeline_history "0000000$tli.history" "$W/hist"
done
printf '\0' | cat - "$W/bb/global/pg_control" >"$W/ctl"
put pg_control pg15-timeline-3 "$W/ctl"
du -sh "$CORPUS"
