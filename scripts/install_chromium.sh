#!/usr/bin/env bash
# Install headless Chromium (Debian's `chromium` package) for the HTML report's
# rendering test. Idempotent: does nothing when `chromium` is already on PATH.
# Without root we cannot apt-get, so we say so and exit 0: the test then skips
# (except under CI=true, where it fails on purpose so CI always exercises it).
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "chromium already installed: $(command -v chromium)"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "chromium is not installed and this script is not running as root;" \
         "install it with: sudo apt-get install -y chromium" >&2
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    echo "error: apt-get update failed; cannot install chromium" >&2
    exit 1
fi
if ! apt-get install -y -qq --no-install-recommends chromium >/dev/null; then
    echo "error: apt-get install chromium failed" >&2
    exit 1
fi
if ! command -v chromium >/dev/null 2>&1; then
    echo "error: chromium package installed but 'chromium' is not on PATH" >&2
    exit 1
fi
echo "chromium installed: $(chromium --version 2>/dev/null || command -v chromium)"
