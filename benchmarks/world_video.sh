#!/usr/bin/env bash
# Video pruning on the embedded default: 200 clips of the video world (the question's evidence visible in one moment
# of 4 frames), GlimpsePrune (the image-trained module, scoring all frames jointly) vs full tokens, then every method
# at matched budgets. Writes results/world_video/{eval,compare}. ~5 min on 2 CPU cores.
#   bash benchmarks/world_video.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-results/world_video}"
DATA="${DATA:-runs/world_video_split}"
[ -f "$DATA/video_records.jsonl" ] || glimpseprune make-world --video --out "$DATA" --n 200 --seed 1
glimpseprune eval --task world_video --data "$DATA" --out "$OUT/eval" --compare-full --max-new-tokens 8 --overwrite
glimpseprune compare --task world_video --data "$DATA" --out "$OUT/compare" --max-new-tokens 8 --overwrite \
  --methods glimpse glimpse_attn fastv pdrop visionzip divprune random --budgets 0.056 0.111 0.222
# the VIP's video variant: each frame-group scored alone (as separate images) instead of jointly across the clip
glimpseprune eval --task world_video --data "$DATA" --out "$OUT/eval_per_frame" --max-new-tokens 8 --overwrite \
  --method glimpse --method-arg video=per_frame
# the masks against the ground truth: the oracle (evidence-box tokens only) and GlimpsePrune's recall / moment share
python benchmarks/world_video_oracle.py --data "$DATA" --out "$OUT/oracle.json"
