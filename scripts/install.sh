#!/usr/bin/env bash
# One-step set-up on a fresh machine: CPU torch first when torch is absent, then this package
# with tests. PyPI's Linux x86-64 torch wheel is the CUDA build (several GB of nvidia-*
# packages), so torch comes from PyTorch's CPU-only index; where that index cannot be reached
# the PyPI wheel is installed instead, with a notice saying which build that is.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH="torch==2.13.0"
if ! python -c "import torch" 2>/dev/null; then
  if ! python -m pip install -q "$TORCH" --index-url https://download.pytorch.org/whl/cpu; then
    echo "install.sh: download.pytorch.org/whl/cpu unreachable; installing $TORCH from PyPI" \
         "(on Linux x86-64 this is the CUDA build, several GB; CPU-only on macOS/Windows)" >&2
    python -m pip install -q "$TORCH"
  fi
fi
python -c "import torch; print(f'install.sh: torch {torch.__version__} (CUDA build: {torch.version.cuda is not None})')"
python -m pip install -q -e ".[test]"
