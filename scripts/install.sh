#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first when torch is absent (a bare
# `torch` requirement would pull a multi-GB CUDA build), then this package with tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
