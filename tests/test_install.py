"""The reproducible install: constraints.txt locks the whole tree, pyproject builds without setuptools' warnings,
TORCH_BUILD is checked, and soilnet/buildinfo.py reads the torch build and the native ISA without importing torch."""

from __future__ import annotations

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from setuptools.config.pyprojecttoml import apply_configuration
from setuptools.dist import Distribution
from setuptools.warnings import SetuptoolsWarning

from soilnet import buildinfo

CHOSEN_BUILD = {"torch", "torchvision"}  # installed first by scripts/setup.sh, in the build TORCH_BUILD names


def locked(repo_root: Path) -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (repo_root / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, sep, pinned = line.partition("==")
            assert sep and pinned and " " not in line, f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = pinned
    return pins


def test_constraints_pin_every_declared_dependency_within_its_floor(repo_root):
    project = tomllib.loads((repo_root / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    pins = locked(repo_root)
    for text in declared:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name in CHOSEN_BUILD:
            continue
        assert name in pins, f"{req.name} is not in constraints.txt (make lock)"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {text}"
    assert "deepspeed" in pins  # soilnet/train/checkpoint.py reads its internal constants
    chosen = [n for n in pins if n in CHOSEN_BUILD or n.startswith("nvidia-") or n == "triton"]
    assert not chosen, f"the torch build's packages are TORCH_BUILD's choice, not the lock's: {chosen}"


def test_pyproject_applies_without_setuptools_warnings(repo_root, monkeypatch):
    """No deprecated license table, no experimental ext-modules table (setup.py declares the extension)."""
    monkeypatch.chdir(repo_root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dist = apply_configuration(Distribution(), repo_root / "pyproject.toml")
    ours = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, SetuptoolsWarning)]
    assert ours == []
    assert dist.metadata.license_expression == "MIT"
    assert "[[tool.setuptools.ext-modules]]" not in (repo_root / "pyproject.toml").read_text()
    assert 'name="soilnet.data._native"' in (repo_root / "setup.py").read_text()


def test_setup_names_an_unknown_torch_build_before_doing_anything(repo_root):
    env = {**os.environ, "TORCH_BUILD": "cuda12"}
    proc = subprocess.run(["bash", "scripts/setup.sh"], capture_output=True, text=True, cwd=repo_root, env=env)
    assert proc.returncode == 2
    assert "TORCH_BUILD=cuda12: expected default, cpu or cuXYZ (e.g. cu126)" in proc.stderr


def test_the_torch_build_is_read_without_importing_torch():
    assert buildinfo.torch_cuda() == (torch.version.cuda or "none (a CPU build of torch)")
    assert buildinfo.torch_version_file()["__version__"] == torch.__version__


@pytest.mark.parametrize(
    ("flags", "cap", "expected"),
    [
        ({"avx512f", "avx512bw", "avx512vl", "f16c", "avx2"}, None, "avx512"),
        ({"avx512f", "avx512bw", "avx512vl", "f16c", "avx2"}, "avx2", "avx2 (SOILNET_NATIVE_ISA=avx2)"),
        ({"avx512f", "avx2", "f16c"}, None, "avx2"),  # AVX-512 without BW/VL: _native.c's AVX2 kernels
        ({"avx2"}, None, "scalar"),  # no F16C
        ({"sse4_2"}, "avx512", "scalar (SOILNET_NATIVE_ISA=avx512)"),
        (set(), "sse", "invalid SOILNET_NATIVE_ISA=sse (one of avx512, avx2, scalar)"),
    ],
)
def test_native_isa_follows_the_cpu_flags_and_the_cap(monkeypatch, tmp_path, flags, cap, expected):
    monkeypatch.setattr(buildinfo, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(buildinfo, "native_extension", lambda: tmp_path / "_native.so")
    monkeypatch.delenv("SOILNET_NATIVE", raising=False)
    if cap is None:
        monkeypatch.delenv("SOILNET_NATIVE_ISA", raising=False)
    else:
        monkeypatch.setenv("SOILNET_NATIVE_ISA", cap)
    assert buildinfo.native_isa() == expected


def test_native_isa_without_the_extension(monkeypatch):
    monkeypatch.delenv("SOILNET_NATIVE", raising=False)
    monkeypatch.setattr(buildinfo, "native_extension", lambda: None)
    assert buildinfo.native_isa().startswith("none (soilnet/data/_native.c is not built")
