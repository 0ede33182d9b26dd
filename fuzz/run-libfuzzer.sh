#!/usr/bin/env bash
# Runs the fuzz targets under libFuzzer (cargo-fuzz, nightly), coverage-guided, each for
# SECONDS (default 180), starting from fuzz/corpus/<target>. New inputs go to a scratch
# corpus ($PGKEEP_FUZZ_WORK, default target/fuzz-work/<target>), never into the kept one;
# crashes go to fuzz/libfuzzer/artifacts/<target>/. Prints each target's executions and
# what it found. See docs/fuzzing.md.
#
#   fuzz/run-libfuzzer.sh [SECONDS] [TARGET...]      (default: every target)
#
# Limits as the stable harness's: one input at most 10 s, one allocation at most 256 MiB,
# 2 GiB resident.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-180}
shift || true
targets=("$@")
if [ ${#targets[@]} = 0 ]; then
  mapfile -t targets < <(ls fuzz/libfuzzer/fuzz_targets | sed 's/\.rs$//')
fi
command -v cargo-fuzz >/dev/null || {
  echo "run-libfuzzer: cargo-fuzz is missing: cargo install cargo-fuzz" >&2
  exit 1
}
work=${PGKEEP_FUZZ_WORK:-$PWD/target/fuzz-work}
status=0
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  log="$work/$t.log"
  echo "== $t: $secs s"
  if cargo +nightly fuzz run --fuzz-dir fuzz/libfuzzer "$t" "$work/$t" "fuzz/corpus/$t" -- \
      -max_total_time="$secs" -timeout=10 -malloc_limit_mb=256 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    result=ok
  else
    result=FAILED
    status=1
  fi
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  echo "   $result: $execs executions, $cov, $(ls "$work/$t" | wc -l) inputs in the scratch corpus (log $log)"
  if [ $result = FAILED ]; then
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written|==[0-9]+==' "$log" | head -8 | sed 's/^/   /'
  fi
done
exit $status
