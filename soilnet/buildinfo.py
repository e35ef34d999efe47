"""What this install runs on, read without importing torch or DeepSpeed: the CUDA version of the installed torch
build and the loader's native kernel ISA. ``soilnet --version`` prints them; ``soilnet doctor`` adds what needs
the imports (devices, nccl, DeepSpeed's ops).
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import os
from pathlib import Path

# the kernel levels of soilnet/data/native.py (ISAS, SOILNET_NATIVE_ISA) and the CPU flags each needs: the tests of
# pick_plane in soilnet/data/_native.c (__builtin_cpu_supports)
ISA_FLAGS = {
    "avx512": frozenset({"avx512f", "avx512bw", "avx512vl", "f16c"}),
    "avx2": frozenset({"avx2", "f16c"}),
    "scalar": frozenset(),
}


def torch_version_file() -> dict[str, object] | None:
    """The constants of the installed ``torch/version.py`` (``__version__``, ``cuda``, ``hip``), read as text so
    that torch is not imported; None without torch."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "version.py"
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError):
        return None
    values: dict[str, object] = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
        value = getattr(node, "value", None)
        if isinstance(target, ast.Name) and isinstance(value, ast.Constant):
            values[target.id] = value.value
    return values


def torch_cuda() -> str:
    """The CUDA version torch was built for (``12.6``), or why there is none."""
    found = torch_version_file()
    if found is None:
        return "none (torch not installed)"
    if found.get("cuda"):
        return str(found["cuda"])
    if found.get("hip"):
        return f"none (a ROCm {found['hip']} build of torch)"
    return "none (a CPU build of torch)"


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (Linux ``/proc/cpuinfo``); empty where that cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_extension() -> Path | None:
    """The built ``soilnet.data._native`` file (``pip install -e .`` builds it), found without importing
    ``soilnet.data`` (which imports torch)."""
    data = Path(__file__).resolve().parent / "data"
    return next((p for s in importlib.machinery.EXTENSION_SUFFIXES if (p := data / f"_native{s}").is_file()), None)


def native_isa() -> str:
    """The widest conversion kernels the loader's C extension runs here (``avx512``, ``avx2`` or ``scalar``), with
    the SOILNET_NATIVE_ISA cap when one is set, or why the loader converts with torch instead."""
    if os.environ.get("SOILNET_NATIVE", "1") == "0":
        return "off (SOILNET_NATIVE=0: the loader converts with torch)"
    if native_extension() is None:
        return "none (soilnet/data/_native.c is not built: pip install -e .; the loader converts with torch)"
    cap = os.environ.get("SOILNET_NATIVE_ISA")
    levels = list(ISA_FLAGS)
    if cap is not None and cap not in ISA_FLAGS:
        return f"invalid SOILNET_NATIVE_ISA={cap} (one of {', '.join(levels)})"
    flags = cpu_flags()
    isa = next(name for name in levels[levels.index(cap or "avx512") :] if ISA_FLAGS[name] <= flags)
    return f"{isa} (SOILNET_NATIVE_ISA={cap})" if cap else isa
