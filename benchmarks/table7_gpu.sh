#!/usr/bin/env bash
# Paper Table 7 on one GPU: Qwen2.5-VL-7B shape (random weights, bf16), one image of 71x71 = 5041 visual tokens +
# 33 text tokens = 5074 (paper: 5073.9 on DocVQA), GlimpsePrune keeping 3.4 % (171 tokens -> KV 204; paper 202.5)
# after layer 18; also the same schedule without glimpse/VIP (mask) and fixed 11.1 % before the LLM.
# Prefill (LLM part), decode ms/token (22 steps ~ the paper's 22 generated tokens), end-to-end tokens/s and peak
# memory (torch.cuda.max_memory_allocated) at batch 1/4/8/16. Writes result.json, table.md, PNGs to OUT_DIR.
#   bash benchmarks/table7_gpu.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
source benchmarks/_bench_cmd.sh
OUT="${1:-runs/bench/table7_gpu}"
"${BENCH[@]}" flops --shape qwen2_5_vl_7b --grid 71x71 --n-text 33 --keep 0.034 --new-tokens 22
"${BENCH[@]}" run --shape qwen2_5_vl_7b --device cuda --dtype bfloat16 --grid 71x71 --n-text 33 \
  --variants full glimpse:0.034 mask:0.034 fixed:0.111 --batch-sizes 1 4 8 16 \
  --warmup 2 --reps 5 --new-tokens 22 --out "$OUT"
