#!/usr/bin/env bash
# Issue 12's GPU checks as ONE bounded command for a lent GPU machine (device time is short and a machine start costs
# minutes): the runtime's overhead beside stock transformers on the Qwen2.5-VL-7B shape (random weights, bf16, SDPA,
# one 71x71 image = 5,041 visual + 33 text tokens; `glimpseprune bench overhead`), then paper Table 7
# (`benchmarks/table7_gpu.sh`). Each step has its own timeout and runs whatever the one before it did; everything is
# logged (tee) under OUT_DIR with the device, torch and transformers versions, and each step's exit code is in
# OUT_DIR/steps.txt. Total bound: OVERHEAD_TIMEOUT_S + TABLE7 TIMEOUT_S + 40 (+ seconds of set-up) = 7.7 min by
# default, leaving a lease of 15 device minutes room for a machine start and one rerun. OUT_DIR ends up with 7 files
# (env.txt log.txt steps.txt overhead/{result.json,table.md} table7/{result.json,table.md}): the device tool brings
# back at most 8, so Table 7's plots are not drawn there (`glimpseprune.bench.report.write_plots` redraws them here
# from result.json);
# the scratch install and the `glimpseprune` shim live in a temporary folder outside OUT_DIR.
# Pass the commit the run measures as COMMIT=<hash> (the device's copy of the tree has no .git); it goes to env.txt
# and into each result.json's metadata (GLIMPSEPRUNE_COMMIT).
#
# The lent machine has no network and its own torch / transformers (2026-11-30: torch 2.11 + cu130, transformers
# 5.17). This project needs transformers >= 5.19, so carry a tested wheel (5.23.0 or 5.24.0) and the script installs
# it into a scratch folder there and runs the package from `src` (no pip resolution, no pins). Rehearsed on CPU with
# that machine's versions (a venv with torch 2.11.0+cu130 and transformers 5.17.0, the 5.24.0 wheel carried, the tiny
# shape below): both steps ran, env.txt naming transformers 5.24.0 from the scratch folder.
#   here:   pip download --no-deps --only-binary=:all: --python-version 3.12 --dest wheels transformers==5.24.0
#   device: bash benchmarks/issue12_device.sh "$OUT/issue12"        (device tool: carry ["wheels"])
# Then commit OUT_DIR's result.json / table.md files under results/ with the device named (env.txt).
# Dry run on CPU (what the test suite does, tiny shape): DEVICE=cpu DTYPE=float32 SHAPE=tiny.json NVIS=36 GRID=6x6 ...
#   bash benchmarks/issue12_device.sh [OUT_DIR]
# Environment (defaults in brackets): DEVICE [cuda] DTYPE [bfloat16] SHAPE [qwen2_5_vl_7b] NVIS [5041] NTEXT [33]
#   KEEP [0.034] OVERHEAD_REPS [8] OVERHEAD_DECODE [16] OVERHEAD_TIMEOUT_S [180] WHEELS [wheels] COMMIT [unknown];
#   table7_gpu.sh's own variables (GRID BATCHES REPS E2E_REPS WARMUP NEW_TOKENS BUDGET_S TIMEOUT_S) pass through to
#   it, TIMEOUT_S [240 here] and BUDGET_S [150 here] included.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/bench/issue12_device}"
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: $OUT already holds files (another run?); choose a new OUT_DIR" >&2
  exit 2
fi
mkdir -p "$OUT" || { echo "error: cannot create $OUT" >&2; exit 2; }
OUT="$(cd "$OUT" && pwd)"
export DEVICE="${DEVICE:-cuda}" DTYPE="${DTYPE:-bfloat16}" SHAPE="${SHAPE:-qwen2_5_vl_7b}"
NVIS="${NVIS:-5041}" NTEXT="${NTEXT:-33}" KEEP="${KEEP:-0.034}" OVERHEAD_REPS="${OVERHEAD_REPS:-8}"
OVERHEAD_DECODE="${OVERHEAD_DECODE:-16}" OVERHEAD_TIMEOUT_S="${OVERHEAD_TIMEOUT_S:-180}" WHEELS="${WHEELS:-wheels}"
export NTEXT TIMEOUT_S="${TIMEOUT_S:-240}" BUDGET_S="${BUDGET_S:-150}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 GLIMPSEPRUNE_COMMIT="${COMMIT:-${GLIMPSEPRUNE_COMMIT:-}}"
LOG="$OUT/log.txt"
PY="${PYTHON:-python3}"
command -v "$PY" >/dev/null || PY=python
PY="$(cd "$(dirname "$(command -v "$PY")")" && pwd)/$(basename "$PY")"

# a carried transformers wheel, installed beside (not over) the machine's packages, in a temporary folder (not under
# OUT_DIR, whose files the device tool counts); the package runs from src
TMPD="$(mktemp -d)"
trap 'rm -rf "$TMPD"' EXIT
SCRATCH="$TMPD/site"
if compgen -G "$WHEELS/transformers-*.whl" >/dev/null; then
  if ! "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SCRATCH" \
      "$WHEELS"/transformers-*.whl >>"$LOG" 2>&1; then
    echo "error: could not install $(ls "$WHEELS"/transformers-*.whl) into $SCRATCH (see $LOG)" | tee -a "$LOG" >&2
    exit 2
  fi
  export PYTHONPATH="$SCRATCH:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PY" -c 'import sys, transformers; v = tuple(int(x) for x in transformers.__version__.split(".")[:2])
sys.exit(0 if v >= (5, 19) else 1)' >>"$LOG" 2>&1; then
  echo "error: this project needs transformers >= 5.19 and $PY has $("$PY" -c 'import transformers
print(transformers.__version__)' 2>&1); carry a wheel in $WHEELS/ (see this script's header)" | tee -a "$LOG" >&2
  exit 2
fi
export PATH="$TMPD/bin:$PATH"  # `glimpseprune` for the scripts below, from src, with this python
mkdir -p "$TMPD/bin"
printf '#!/usr/bin/env bash\nexec %q -m glimpseprune.cli "$@"\n' "$PY" > "$TMPD/bin/glimpseprune"
chmod +x "$TMPD/bin/glimpseprune"

{
  date -u
  echo "commit ${GLIMPSEPRUNE_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, transformers, glimpseprune
print("python", sys.version.split()[0], "torch", torch.__version__, "transformers", transformers.__version__,
      "from", transformers.__file__, "glimpseprune from", glimpseprune.__file__)
print("device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")'
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"

step() {  # step NAME TIMEOUT_S command...: bounded, logged, its exit code recorded; later steps run regardless
  local name="$1" limit="$2"
  shift 2
  echo "== $name (timeout ${limit}s): $*" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "$name rc=$rc seconds=$((SECONDS - t0))" | tee -a "$OUT/steps.txt" "$LOG"
}

step overhead "$OVERHEAD_TIMEOUT_S" glimpseprune bench overhead --shape "$SHAPE" --device "$DEVICE" --dtype "$DTYPE" \
  --n-vis "$NVIS" --n-text "$NTEXT" --keep "$KEEP" --warmup 2 --reps "$OVERHEAD_REPS" \
  --decode-steps "$OVERHEAD_DECODE" --out "$OUT/overhead"
# table7_gpu.sh bounds itself (BUDGET_S, TIMEOUT_S); the outer timeout only catches its set-up
# no PNGs: at most 8 files come back from the device (redraw them here from result.json, see report.write_plots)
export NO_PLOTS=1
step table7 "$(( TIMEOUT_S + 40 ))" bash benchmarks/table7_gpu.sh "$OUT/table7"
cat "$OUT/steps.txt"
! grep -qv " rc=0 " "$OUT/steps.txt"
