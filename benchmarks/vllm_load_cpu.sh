#!/usr/bin/env bash
# vLLM under load on this CPU machine: stock Qwen2.5-VL vs early-glimpse pruning to 11.1 % before the LLM, scaled
# CPU shape (random weights), 896 px images (1,024 visual tokens), 2 rounds x 12 requests (stock and pruned
# interleaved), 4 in flight, 32 tokens each. Needs the vLLM environment (scripts/setup_vllm_env.sh). About 8 min on
# 2 idle cores. Writes results/vllm_load/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-results/vllm_load}"
.venv/bin/python benchmarks/vllm_load.py --out "$OUT" --shape qwen2_5_vl_scaled_cpu --method early_glimpse \
  --keep-ratio 0.111 --image-px 896 --requests 12 --rounds 2 --concurrency 4 --max-tokens 32
