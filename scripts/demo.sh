#!/usr/bin/env bash
# Set up advkit (first run only) and run the demo: train or load a small MNIST CNN,
# attack it with FGSM and PGD, and write advkit-output/demo/report.html.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/advkit demo "$@"
