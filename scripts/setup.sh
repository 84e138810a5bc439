#!/usr/bin/env bash
# Set up advkit in a virtual environment at .venv (created if missing).
# Usage: bash scripts/setup.sh [test]   ("test" adds the test tools and the browser)
# torch goes in first, pinned to the CPU build: a plain `torch` requirement resolved
# with no torch installed would pull several GB of CUDA packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -qq --disable-pip-version-check)

if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    "${PIP[@]}" "torch==2.13.0"
fi
if [ "${1:-}" = "test" ]; then
    "${PIP[@]}" -e ".[test]"
    # onnx2torch declares torchvision (which would pull a CUDA torch) for two detection
    # operators that classifiers never use; advkit's ONNX loader works without it.
    "${PIP[@]}" --no-deps "onnx2torch==1.5.15"
    bash scripts/install_chromium.sh
else
    "${PIP[@]}" -e .
fi
