#!/usr/bin/env bash
# What the runtime costs beside stock transformers, on the scaled CPU shape (8 layers x 512, GQA 4:1), one image of
# 1,024 and of 2,025 visual tokens + 64 text tokens, batch 1: stock text model vs runtime `full` (prefill, decode),
# `glimpse` vs `mask` at 4 % kept after layer 5 (VIP + glimpse overhead), measured vs analytic prefill ratio (causal),
# peak memory of each prefill and of the encode with / without vision taps. Paired, interleaved ratios; pass/fail
# bars of issue 12 printed per row, and the VIP timed alone beside its FLOP share; the last stdout line is JSON. 48
# repetitions (at 16, two runs' glimpse/mask ratios differed by 3.5 points): about 12 min on 2 free cores (run it idle).
# On a GPU: bash benchmarks/overhead_cpu.sh OUT --device cuda --dtype bfloat16 --shape qwen2_5_vl_7b --n-vis 5041
# A folder that already holds a run is refused; add --overwrite to regenerate it (e.g. the committed results).
#   bash benchmarks/overhead_cpu.sh [OUT_DIR] [extra bench-overhead options]
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/overhead_cpu}"
shift || true
"${BENCH[@]}" overhead --n-vis 1024 2025 --n-text 64 --keep 0.04 --warmup 2 --reps 48 --decode-steps 16 --out "$OUT" "$@"
