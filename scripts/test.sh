#!/usr/bin/env bash
# Installs the test dependencies, then runs pgkeep's whole test suite: unit tests, the storage
# conformance suite on local disk, SeaweedFS (S3) and Azurite (Azure), and the integration
# tests against real PostgreSQL clusters.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --workspace --all-targets --no-fail-fast -- --test-threads="${PGKEEP_TEST_THREADS:-4}"
