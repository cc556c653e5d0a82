#!/usr/bin/env bash
# Create .venv and install prunefusion (+ client, + dev tools) on a fresh machine.
#   TORCH_SPEC   torch requirement installed first (default torch==2.13.0, the CPU build on these machines;
#                on a CUDA host use your CUDA build, e.g. TORCH_SPEC="torch==2.13.0" with the CUDA index)
#   EXTRAS       extras of prunefusion to install (default: dev,compress,loadtest,pipeline,quality,ray: what the tests need)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev,compress,loadtest,pipeline,quality,ray}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first: anything that depends on it would otherwise pull a multi-GB CUDA build
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -e clients/python -e ".[$EXTRAS]"
.venv/bin/python -c "import torch, transformers, grpc; print(f'prunefusion env ready: torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}')"
