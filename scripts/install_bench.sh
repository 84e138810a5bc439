#!/usr/bin/env bash
# Install the peer libraries that benchmarks/attacks.py compares advkit with:
# torchattacks, Foolbox and ART, pinned, without letting pip touch torch.
#
# Why not `pip install advkit[bench]`: torchattacks declares torch and torchvision
# as requirements (and pins requests~=2.25.1); resolving them would pull a second,
# CUDA build of torch plus torchvision (gigabytes) over the CPU torch already
# installed. So the peers go in with --no-deps, and then the runtime needs each one
# really has (read from their METADATA Requires-Dist, minus torch/torchvision), none
# of which depends on torch:
#   torchattacks 3.5.1                  scipy, tqdm, numpy  (imports no torchvision)
#   foolbox 3.3.4                       eagerpy, GitPython, requests, scipy, numpy,
#                                       setuptools, typing-extensions
#   adversarial-robustness-toolbox 1.20.1  numpy, scipy, scikit-learn, six, setuptools, tqdm
#                                       (+ multiprocess, imported by its AutoAttack)
#   auto-lirpa 0.3 (benchmarks/verify_bounds.py)  numpy, appdirs; it declares torch<1.13,
#                                       torchvision, pylint, pytest-order, ninja, pyyaml,
#                                       none of which its IBP/CROWN import. On torch 2.13 and
#                                       numpy 2 it imports only through three shims that the
#                                       benchmark applies (so it is not import-checked below)
# The lists below must equal the pyproject `bench` extra (checked before installing).
# Idempotent: pip skips what is already installed at these versions. The script
# refuses to run without torch, and fails if the torch version changed.
set -euo pipefail

PY="${PYTHON:-python}"

if ! torch_before="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"; then
    echo "error: torch is not importable with $PY; install advkit (and the torch build" \
         "you want) first" >&2
    exit 1
fi

PEERS=(
    "torchattacks==3.5.1"
    "foolbox==3.3.4"
    "eagerpy==0.30.0"
    "adversarial-robustness-toolbox==1.20.1"
    "auto-lirpa==0.3"
)
RUNTIME=(
    "numpy>=1.24"
    "scipy>=1.10"
    "scikit-learn>=1.3"
    "six"
    "setuptools"
    "tqdm>=4.56.1"
    "GitPython>=3.0.7"
    "requests>=2.24.0"
    "typing-extensions>=3.7.4.1"
    "multiprocess>=0.70"
    "appdirs>=1.4"
)

# The pyproject `bench` extra documents the same list; refuse to install if they drift apart.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -f "$ROOT/pyproject.toml" ]; then
    "$PY" - "$ROOT/pyproject.toml" "${PEERS[@]}" "${RUNTIME[@]}" <<'EOF'
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    extra = tomllib.load(f)["project"]["optional-dependencies"]["bench"]
if sorted(extra) != sorted(sys.argv[2:]):
    sys.exit("error: scripts/install_bench.sh and the pyproject `bench` extra differ: "
             f"{sorted(set(extra) ^ set(sys.argv[2:]))}")
EOF
fi

"$PY" -m pip install --quiet --no-deps "${PEERS[@]}"
# None of these depends on torch, so letting pip resolve their own needs is safe.
"$PY" -m pip install --quiet "${RUNTIME[@]}"

torch_after="$("$PY" -c 'import torch; print(torch.__version__)')"
if [ "$torch_before" != "$torch_after" ]; then
    echo "error: torch changed from $torch_before to $torch_after during the install" >&2
    exit 1
fi

"$PY" - <<'EOF'
import importlib

for name in ("torchattacks", "foolbox", "art"):
    module = importlib.import_module(name)
    print(f"{name} {getattr(module, '__version__', '?')} OK")
EOF
echo "bench peers installed (torch $torch_after untouched)"
