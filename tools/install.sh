#!/usr/bin/env bash
# Fresh-machine install: a venv in .venv with the CPU build of torch 2.13 and qvlq (editable, dev extras).
# On a CUDA machine install the CUDA torch of your choice first; pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
# With the CPU torch, also triton: its interpreter (TRITON_INTERPRET=1) runs the tests of qvlq's Triton int4
# kernel on the CPU (3.6.0: the version CUDA torch 2.11 ships). A CUDA torch brings its own triton.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
    && .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)" \
    && ! .venv/bin/python -c "import triton" 2>/dev/null; then
    .venv/bin/python -m pip install -q triton==3.6.0 || echo "install.sh: no triton wheel; the Triton kernel tests will skip"
fi
# Likewise NVRTC (CUDA torch wheels depend on it): the tests compile qvlq's CUDA int4 kernel through it.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] \
    && .venv/bin/python -c "import sys, torch; sys.exit(0 if torch.version.cuda is None else 1)"; then
    .venv/bin/python -m pip install -q nvidia-cuda-nvrtc==13.0.88 || echo "install.sh: no NVRTC wheel; its test will skip"
fi
