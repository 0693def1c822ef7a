#!/usr/bin/env bash
# One-step set-up on a fresh machine: torch first when it is absent, then this package with
# tests. `pip install torch==2.13.0` takes whatever wheel the configured package index serves:
# the CPU build where the machine's index provides one (as on the project's CI machines),
# otherwise PyPI's Linux x86-64 wheel, which is the multi-GB CUDA build. The line printed
# at the end says which build was installed. Set TORCH_INDEX_URL to a CPU-only index to
# force the CPU build elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
TORCH="torch==2.13.0"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "$TORCH" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
python -c "import torch; print(f'install.sh: torch {torch.__version__} (CUDA build: {torch.version.cuda is not None})')"
python -m pip install -q -e ".[test]"
