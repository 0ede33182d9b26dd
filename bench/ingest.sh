#!/usr/bin/env bash
# Ingest and read-back throughput and peak memory of the repository engine on mixed data
# (half text-like, half random), at 1 and 2 threads, next to `zstd -3 -T1` / `zstd -3 -T2`
# on the same file. Usage: bench/ingest.sh [MiB=1024]
# Targets (issue 2): ingest at 2 threads >= 0.9x zstd -3 -T2; read-back >= 2x ingest;
# peak memory < 300 MiB.
# Then PAIRS (default 5) back-to-back pairs of `zstd -3 -T2` and a 2-thread ingest alone
# (--no-restore), with each side's CPU seconds: on a host with steal time one run of each
# can be 30% apart, and the median of ratios of neighbours is what varies least.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
OUT=${BENCH_OUT:-bench/out}
mkdir -p "$OUT"
DATA="$OUT/mixed-${MIB}M.bin"
cargo build --release -q -p pgkeep-repo --example ingest_bench
BIN=target/release/examples/ingest_bench
[ -f "$DATA" ] || "$BIN" gen "$DATA" "$MIB"
cat "$DATA" > /dev/null   # warm the page cache so every run reads from memory

zstd_time() { # threads
  local s e
  s=$(date +%s.%N); zstd -q -3 "-T$1" -c "$DATA" > /dev/null; e=$(date +%s.%N)
  echo "$e - $s" | bc -l
}
printf '%-26s %10s %10s %12s %10s\n' run "ingest MB/s" "vs zstd" "restore MB/s" "peak MiB"
for t in 1 2; do
  for enc in "" --encrypt; do
    z=$(zstd_time "$t")
    zmb=$(echo "$MIB * 1.048576 / $z" | bc -l)
    r=$("$BIN" run "$DATA" "$t" $enc)
    python3 - "$r" "$zmb" "$t" "$enc" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); z = float(sys.argv[2]); t = sys.argv[3]; enc = sys.argv[4]
name = f"pgkeep T{t}{' encrypted' if enc else ''} (zstd -T{t} {z:.0f})"
print(f"{name:<26} {r['ingest_mb_s']:10.1f} {r['ingest_mb_s']/z:9.2f}x {r['restore_mb_s']:12.1f} {r['peak_rss_mib']:10.1f}"
      f"   restore/ingest {r['restore_mb_s']/r['ingest_mb_s']:.2f}x  stored {r['stored_bytes']/2**20:.0f} MiB")
PY
  done
done

PAIRS=${PAIRS:-5}
[ "$PAIRS" -gt 0 ] || exit 0
echo "pairs: zstd -3 -T2 then pgkeep T2 ingest (--no-restore); wall s, cpu s (user+sys, pgkeep's with repository set-up)"
ratios=()
for i in $(seq "$PAIRS"); do
  /usr/bin/time -f "%e %U %S" -o "$OUT/z.time" zstd -q -3 -T2 -c "$DATA" > /dev/null
  /usr/bin/time -f "%e %U %S" -o "$OUT/p.time" "$BIN" run "$DATA" 2 --no-restore > "$OUT/p.json"
  read -r zw zu zs < "$OUT/z.time"
  read -r _ pu ps < "$OUT/p.time"
  # The ingest's own clock: the process's also counts creating and deleting the repository.
  pw=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ingest_s"])' "$OUT/p.json")
  ratio=$(echo "$zw / $pw" | bc -l)
  ratios+=("$ratio")
  printf 'pair %d: zstd %.2f s (cpu %.2f) | pgkeep %.2f s (cpu %.2f) | throughput ratio %.3fx | cpu ratio %.3fx\n' \
    "$i" "$zw" "$(echo "$zu + $zs" | bc -l)" "$pw" "$(echo "$pu + $ps" | bc -l)" "$ratio" \
    "$(echo "($pu + $ps) / ($zu + $zs)" | bc -l)"
done
python3 -c 'import statistics,sys; r=[float(x) for x in sys.argv[1:]]; print(f"median throughput ratio pgkeep/zstd -T2 over {len(r)} pairs: {statistics.median(r):.3f}x (min {min(r):.3f}, max {max(r):.3f})")' "${ratios[@]}"
