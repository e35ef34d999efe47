#!/usr/bin/env bash
# `make lock`: rewrite constraints.txt from .venv, the exact versions the last install resolved. Run it after a
# deliberate upgrade (the steps are in the header it writes). torch, torchvision and their CUDA
# packages (nvidia-*, triton) stay out: their build is a choice (TORCH_BUILD, scripts/setup.sh), not a lock. So do
# pip's own and the build requirements (setuptools, setuptools-scm, vcs-versioning: pip's isolated build env).
set -euo pipefail
cd "$(dirname "$0")/.."
out=constraints.txt
{
    echo "# Exact versions of every dependency of \`pip install -e \".[dev,mpi]\"\` (Python 3.11, Linux x86_64)."
    echo "# scripts/setup.sh installs with \`pip install -c constraints.txt\`: pyproject.toml keeps the floors, this the lock."
    echo "# Made by \`make lock\` (scripts/lock.sh): \`pip freeze --exclude-editable\` of .venv, less torch, torchvision"
    echo "# and their CUDA packages (nvidia-*, triton), whose build TORCH_BUILD chooses (docs/install.md)."
    echo "# To upgrade or add a dependency: edit pyproject.toml, or .venv/bin/pip install -U <package>; then"
    echo "# .venv/bin/pip install -e \".[dev,mpi]\" (without -c), \`make test\`, \`make lock\`, and commit this file."
    echo "# DeepSpeed is pinned exactly: soilnet/train/checkpoint.py reads its internal universal-checkpoint constants."
    .venv/bin/python -m pip freeze --exclude-editable --all \
        | grep -viE '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|pip|setuptools|setuptools-scm|vcs-versioning|wheel|soilnet)==' \
        | grep -vE '^(-e |#)| @ ' \
        | LC_ALL=C sort -f -t= -k1,1
} >"$out.tmp"
mv "$out.tmp" "$out"
echo "lock: wrote $out ($(grep -vc '^#' "$out") packages)"
