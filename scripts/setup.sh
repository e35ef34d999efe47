#!/usr/bin/env bash
# Set-up for a fresh machine: Debian packages (as root, when missing), then .venv: torch and torchvision first, in
# the build TORCH_BUILD chooses, then the project with every other dependency at the exact version of
# constraints.txt. Safe to rerun; it skips what is done (and redoes it when constraints.txt, pyproject.toml, the C
# extension or TORCH_BUILD changes).
#
# TORCH_BUILD (environment, or `make setup TORCH_BUILD=cu126`); docs/install.md:
#   default  pip's own index and wheel folders (PyPI, or a site mirror): on this repo's CI machines the CPU wheel
#   cpu      the CPU build from https://download.pytorch.org/whl/cpu
#   cuXYZ    the CUDA X.Y build from https://download.pytorch.org/whl/cuXYZ (cu126, cu128, ...: the cluster's CUDA)
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}  # the release paired with torch 2.13
TORCH_BUILD=${TORCH_BUILD:-default}
SYSTEM_PACKAGES=(slurm-wlm munge openmpi-bin libopenmpi-dev iproute2 nginx)

case "$TORCH_BUILD" in
    default) torch_args=("torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}") ;;
    cpu | cu[0-9]* | rocm[0-9]*)
        torch_args=("torch==${TORCH_VERSION}+${TORCH_BUILD}" "torchvision==${TORCHVISION_VERSION}+${TORCH_BUILD}"
            --index-url "https://download.pytorch.org/whl/${TORCH_BUILD}") ;;
    *) echo "setup: TORCH_BUILD=$TORCH_BUILD: expected default, cpu or cuXYZ (e.g. cu126)" >&2; exit 2 ;;
esac

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
        echo "setup: not root (or no apt-get); skipping Debian packages ${missing[*]}: the Slurm, MPI and HTTP (nginx) tests will skip"
    fi
fi

# the stamp holds the torch build it installed; it is older than any input that changed since
stamp=.venv/.installed
want="torch ${TORCH_VERSION} torchvision ${TORCHVISION_VERSION} build ${TORCH_BUILD}"
fresh=1
for input in pyproject.toml setup.py constraints.txt soilnet/data/_native.c; do
    [ -f "$stamp" ] && [ "$stamp" -nt "$input" ] || fresh=0
done
if [ "$fresh" = 1 ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # another build installed before (the stamp says which): out first, since `torch==X` accepts any X+build
    [ -s "$stamp" ] && .venv/bin/python -m pip uninstall -q -y torch torchvision
    echo "setup: installing ${torch_args[*]}"
    # torch's own dependencies (filelock, sympy, ...) from the lock too; its CUDA packages come with the build
    .venv/bin/python -m pip install -q -c constraints.txt "${torch_args[@]}"
fi
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev,mpi]"
echo "$want" >"$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null))"
