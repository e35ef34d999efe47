#!/usr/bin/env bash
# Set-up for a fresh machine: Debian packages (as root, when missing), then .venv with the CPU build of torch
# installed before deepspeed so that pip never pulls a CUDA build. Safe to rerun; it skips what is done.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}  # the release paired with torch 2.13
SYSTEM_PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev iproute2)

missing=()
for pkg in "${SYSTEM_PACKAGES[@]}"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "setup: not root (or no apt-get); skipping Debian packages ${missing[*]}: the Slurm and MPI tests will skip"
    fi
fi

stamp=.venv/.installed
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt soilnet/data/_native.c ]; then
    exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
.venv/bin/python -m pip install -q -e ".[dev]"
touch "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
