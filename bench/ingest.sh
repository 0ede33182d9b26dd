#!/usr/bin/env bash
# Ingest and read-back throughput and peak memory of the repository engine on mixed data
# (half text-like, half random), at 1 and 2 threads, next to `zstd -3 -T1` / `zstd -3 -T2`
# on the same file. Usage: bench/ingest.sh [MiB=1024]
# Targets (issue 2): ingest at 2 threads >= 0.9x zstd -3 -T2; read-back >= 2x ingest;
# peak memory < 300 MiB.
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
