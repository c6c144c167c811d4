#!/usr/bin/env bash
# Prefill cost vs pruning layer K. Analytic for Qwen2.5-VL-3B and -7B (the paper's 3B ablation: K = 18/24/30/36
# layers before pruning, here 0-based K = 17/23/29/35), then measured on the scaled CPU shape (mask method, fixed
# keep masks, interleaved with full; ~2 min on 2 free cores).
#   bash benchmarks/prune_layer_sweep.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/sweep}"
"${BENCH[@]}" sweep --shape qwen2_5_vl_3b --grid 70x70 --n-text 33 --keep 0.082 --out "$OUT/3b"
"${BENCH[@]}" sweep --shape qwen2_5_vl_7b --grid 71x71 --n-text 33 --keep 0.034 --out "$OUT/7b"
"${BENCH[@]}" sweep --shape qwen2_5_vl_scaled_cpu --grid 45x45 --n-text 64 --keep 0.04 --layers -1 1 3 5 7 \
  --measure --reps 3 --out "$OUT/scaled_cpu"
