#!/usr/bin/env bash
# Fresh-machine install: a venv in .venv with the CPU build of torch 2.13 and qvlq (editable, dev extras).
# On a CUDA machine install the CUDA torch of your choice first; pip keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
