#!/usr/bin/env bash
# Decode and end-to-end throughput vs batch size on the scaled CPU shape (random weights; timings do not depend on
# them): one 32x32 = 1024-visual-token image + 64 text tokens per sample, 32 generated tokens, full vs GlimpsePrune
# keeping 4 % after layer 5 of 8 vs a fixed 11.1 % before the LLM. At batch 16 the full run's KV cache (16 x 1088
# entries x 8 layers) is read at every decode step, so decode time is dominated by it; the pruned runs' is ~20x
# shorter. Decode-only throughput (B / ms per decode step of the batch) is timed beside end-to-end. Peak memory on
# CPU is the rise of the process RSS peak (VmHWM, reset per run), stated as such in result.json. About 10 min on 2
# free cores.
#   bash benchmarks/throughput_cpu.sh [OUT_DIR] [extra bench run options, e.g. --overwrite]  (run idle)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/throughput_cpu}"
shift || true
"${BENCH[@]}" run --shape qwen2_5_vl_scaled_cpu --grid 32x32 --n-text 64 \
  --variants full glimpse:0.04 fixed:0.111 --batch-sizes 1 4 16 \
  --warmup 1 --reps 2 --new-tokens 32 --out "$OUT" "$@"
