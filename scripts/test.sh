#!/usr/bin/env bash
# Set up advkit with its test tools (first run only) and run the whole test suite.
# Extra arguments go to pytest. Exits non-zero if any test fails or if no test ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
