#!/usr/bin/env bash
# Reproduce the paper's accuracy tables for Qwen2.5-VL-7B on a GPU machine, through our runtime:
#   Table 2 (free-form VQA, Visual-CoT's 12 subsets, LLM judge) and Table 1 (short-form VQA suites).
# Nothing is downloaded here. Put on disk first (paths are the defaults below; override with the variables):
#   MODEL    Qwen/Qwen2.5-VL-7B-Instruct                       hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir $MODEL
#   MODULE   the released GlimpsePrune module, converted once:  glimpseprune convert --upstream DIR --out $MODULE
#   PLUS     (optional) a GlimpsePrune+ folder (module + LoRA adapter, `glimpseprune train` stage 2)
#   DATA     one folder per benchmark in its public release layout; `glimpseprune tasks` prints what each expects
#   JUDGE_URL / JUDGE_MODEL  an OpenAI-compatible endpoint for the free-form judge, e.g.
#            vllm serve Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8 --max-model-len 2048   (then http://localhost:8000/v1)
# Set COMPARE=1 to also compare the peer methods at 11.1 % (compare --task). Interrupted runs resume (--resume); results go to OUT/<method>/<task>/{samples.jsonl,summary.json}; data-parallel over all GPUs with
#   LAUNCH="accelerate launch --num_processes $(nvidia-smi -L | wc -l)" bash benchmarks/eval_qwen2_5_vl_7b.sh
# The paper judges with temperature 0.7 (stochastic); ours asks the judge at temperature 0 with a cache, so figures
# are repeatable and comparable across methods, not bit-equal to the paper's.
set -euo pipefail
MODEL="${MODEL:-models/qwen2.5-vl-7b}"
MODULE="${MODULE:-models/gp-7b}"
DATA="${DATA:-data}"
OUT="${OUT:-runs/paper_7b}"
JUDGE_URL="${JUDGE_URL:-http://localhost:8000/v1}"
JUDGE_MODEL="${JUDGE_MODEL:-Qwen/Qwen2.5-32B-Instruct-GPTQ-Int8}"
LAUNCH="${LAUNCH:-}"
COMMON=(--model "$MODEL" --dtype bfloat16 --device cuda --batch-size "${BATCH:-8}")
if [ -n "$LAUNCH" ]; then read -r -a CMD <<< "$LAUNCH -m glimpseprune.cli"; else CMD=(glimpseprune); fi
run() {  # run NAME TASK DATA_SUBDIR [extra eval args]
  local name="$1" task="$2" data="$3"; shift 3
  local out="$OUT/$name/$task"
  if [ -f "$out/summary.json" ]; then echo "done: $out"; return; fi
  local resume=(); [ -f "$out/glimpseprune_run.json" ] && resume=(--resume)  # an interrupted run continues
  "${CMD[@]}" eval --task "$task" --data "$DATA/$data" --out "$out" "${COMMON[@]}" "${resume[@]}" "$@"
}
JUDGE=(--judge-url "$JUDGE_URL" --judge-model "$JUDGE_MODEL" --max-new-tokens 1024)
# Table 2: free-form Visual-CoT, full tokens vs GlimpsePrune (dynamic) vs GlimpsePrune+ (if given)
run full visual_cot viscot --method full "${JUDGE[@]}"
run glimpse visual_cot viscot --module "$MODULE" "${JUDGE[@]}"
[ -n "${PLUS:-}" ] && run glimpse_plus visual_cot viscot --module "$PLUS" "${JUDGE[@]}"
# Table 1: short-form suites (lmms-eval prompts; upstream used vqav2_val_lite: add --limit to subsample)
for spec in "vqav2 vqav2" "gqa gqa" "vizwiz_vqa vizwiz" "textvqa textvqa" "docvqa docvqa" "infovqa infovqa" \
            "pope pope" "chartqa chartqa" "mme mme" "scienceqa_img scienceqa" "mmbench_en_dev mmbench" \
            "vstar_bench vstar"; do
  set -- $spec
  run full "$1" "$2" --method full --max-new-tokens 32
  run glimpse "$1" "$2" --module "$MODULE" --max-new-tokens 32
done
# Table 1's peer methods (COMPARE=1): every method at the paper's 11.1 % budget on each short-form suite, one process
# (compare --task runs methods x budgets through the same task path; it resumes an interrupted comparison)
if [ -n "${COMPARE:-}" ]; then
  for spec in "vqav2 vqav2" "gqa gqa" "vizwiz_vqa vizwiz" "textvqa textvqa" "docvqa docvqa" "infovqa infovqa" \
              "pope pope" "chartqa chartqa" "mme mme" "scienceqa_img scienceqa" "mmbench_en_dev mmbench" \
              "vstar_bench vstar"; do
    set -- $spec
    out="$OUT/compare/$1"
    if [ -f "$out/compare.md" ]; then echo "done: $out"; continue; fi
    resume=(); [ -f "$out/glimpseprune_run.json" ] && resume=(--resume)
    glimpseprune compare --task "$1" --data "$DATA/$2" --out "$out" --module "$MODULE" --budgets 0.111 \
      --methods glimpse fastv pdrop visionzip divprune cdpruner vscan random --max-new-tokens 32 "${COMMON[@]}" \
      "${resume[@]}"
  done
fi
echo "summaries: $OUT/*/*/summary.json" ${COMPARE:+"and $OUT/compare/*/compare.md"}
