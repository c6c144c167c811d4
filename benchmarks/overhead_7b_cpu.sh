#!/usr/bin/env bash
# The runtime's overhead on the real Qwen2.5-VL-7B shape, on a CPU: random weights in bf16 (~17 GB of RAM), one 71 x 71
# = 5,041-token image + 33 text tokens, batch 1, 3.4 % kept after layer 18 (the paper's Table 7 setting). Stock text
# model vs runtime `full`, `mask` vs `glimpse` at the same kept count, measured vs analytic prefill ratio, decode; no
# peak-memory runs (each would be one more ~100 s prefill). 1 warm-up + 4 interleaved repetitions: ~75 min on 2 idle
# cores of an AMD EPYC VM (a prefill takes 80-130 s there; each decode repetition re-runs its prefill). Four
# repetitions decide only large effects: the run's intervals say which.
#   bash benchmarks/overhead_7b_cpu.sh [OUT_DIR] [extra bench-overhead options]
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/overhead_7b_cpu_bf16}"
shift || true
"${BENCH[@]}" overhead --shape qwen2_5_vl_7b --dtype bfloat16 --n-vis 5041 --n-text 33 --keep 0.034 --warmup 1 \
  --reps 4 --decode-steps 4 --no-memory --out "$OUT" "$@"
