"""``soilnet doctor``: what this install can run. torch (version, build), CUDA (available, version, devices),
nccl, DeepSpeed (version, accelerator, its ops as ``ds_report`` lists them) and the loader's native kernel ISA.
Exits 0 when torch and DeepSpeed import, else 1 with a line naming what is missing (docs/install.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.cuda.nccl

from soilnet.buildinfo import native_isa
from soilnet.data import native


def torch_lines() -> list[str]:
    """torch's version and build, and the CUDA devices it sees."""
    hip = getattr(torch.version, "hip", None)
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else f"ROCm {hip}" if hip else "CPU"
    lines = [f"torch {torch.__version__} ({build} build)"]
    if not torch.cuda.is_available():
        return [*lines, "cuda available: no", "nccl none (no CUDA)"]
    count = torch.cuda.device_count()
    lines.append(f"cuda available: yes, CUDA {torch.version.cuda}, {count} device(s)")
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        lines.append(
            f"  cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB, capability {props.major}.{props.minor}"
        )
    try:
        found = torch.cuda.nccl.version()  # (2, 21, 5); an int in older torch
        nccl = ".".join(map(str, found)) if isinstance(found, tuple) else str(found)
    except (AttributeError, RuntimeError) as err:  # a build without NCCL
        nccl = f"none ({err})"
    return [*lines, f"nccl {nccl}"]


def deepspeed_lines() -> tuple[list[str], str | None]:
    """DeepSpeed's version, accelerator and ops (installed ahead of time, or compatible with a JIT build here);
    the second item names the problem when DeepSpeed does not import."""
    try:
        import deepspeed
        from deepspeed.accelerator import get_accelerator
        from deepspeed.git_version_info import accelerator_name, installed_ops
        from deepspeed.ops.op_builder.all_ops import ALL_OPS
        from deepspeed.ops.op_builder.builder import probe_is_compatible
    except Exception as err:  # any failure to import is the finding (an ImportError, a CUDA probe that raises)
        return [f"deepspeed none ({type(err).__name__}: {err})"], "deepspeed does not import"
    chosen, accel = os.environ.get("DS_ACCELERATOR", "unset: detected"), get_accelerator()._name
    lines = [f"deepspeed {deepspeed.__version__} (accelerator {accel}; DS_ACCELERATOR {chosen})"]
    lines.append("deepspeed ops (installed ahead / compatible with a JIT build here), as ds_report lists them:")
    for name, builder in ALL_OPS.items():
        # installed ahead of time, and for this accelerator (ds_report's test)
        installed = bool(installed_ops.get(name)) and accelerator_name == accel
        compatible = probe_is_compatible(builder)
        lines.append(f"  {name:<26} {'yes' if installed else 'no':<3} / {'yes' if compatible else 'no'}")
    lines.append("deepspeed ops soilnet needs: none (its optimizer is torch's AdamW: torch_adam)")
    return lines, None


def native_lines() -> list[str]:
    """The loader's native kernels: the ISA they run here, and whether the extension loads."""
    loaded = "loaded" if native.available() else "not loaded: the loader converts with torch (slower)"
    return [f"native-isa {native_isa()}", f"native extension {loaded}"]


def run(args: argparse.Namespace) -> int:
    """Print the report; 0 when a run can start here, 1 naming what is missing."""
    ds, missing = deepspeed_lines()
    for line in [*torch_lines(), *ds, *native_lines()]:
        print(line)
    if missing:
        print(
            f"soilnet doctor: not usable: {missing}; install with scripts/setup.sh (docs/install.md)", file=sys.stderr
        )
        return 1
    print("soilnet doctor: ok")
    return 0
