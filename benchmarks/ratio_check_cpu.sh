#!/usr/bin/env bash
# Measured vs analytic prefill-cost ratio, full vs GlimpsePrune (glimpse token + VIP, random weights), on the scaled
# CPU shape: 45x45 = 2025 visual + 64 text tokens, 4 % of the visual tokens kept after layer 5 of 8. Full and pruned
# prefills are timed in one process, interleaved, 7 reps after 1 warm-up; prints both ratios and their relative
# difference (acceptance: within 15 %); the last stdout line is JSON. About 1 min on 2 free cores.
#   bash benchmarks/ratio_check_cpu.sh [OUT_DIR] [extra bench ratio-check options, e.g. --overwrite]  (run idle)
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/ratio_check_cpu}"
shift || true
"${BENCH[@]}" ratio-check --shape qwen2_5_vl_scaled_cpu --grid 45x45 --n-text 64 --keep 0.04 \
  --warmup 1 --reps 7 --with-mask --out "$OUT" "$@"
