"""``soilnet --version``: the package version (from git through setuptools-scm), its commit, torch, DeepSpeed, the
CUDA version of the torch build and the loader's native kernel ISA."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys

import tomllib
import torch

import soilnet
from soilnet import cli


def test_version_is_the_installed_metadata():
    try:
        expected = importlib.metadata.version("soilnet")
    except importlib.metadata.PackageNotFoundError:
        expected = "0+unknown"
    assert soilnet.__version__ == expected


def test_version_prints_package_commit_torch_deepspeed_cuda_and_isa_without_importing_them(repo_root):
    code = (
        "import json, sys, contextlib, io\n"
        "from soilnet.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(out):\n"
        "    main(['--version'])\n"
        "print(json.dumps([out.getvalue(), 'torch' in sys.modules, 'deepspeed' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    printed, torch_imported, deepspeed_imported = json.loads(proc.stdout)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=repo_root).stdout.strip()
    lines = printed.splitlines()
    assert lines[:4] == [
        f"soilnet {soilnet.__version__}",
        f"commit {head or 'unknown'}",
        f"torch {importlib.metadata.version('torch')}",
        f"deepspeed {importlib.metadata.version('deepspeed')}",
    ]
    # the CUDA version of the torch build, read from torch/version.py without importing torch
    assert lines[4] == f"cuda {torch.version.cuda or 'none (a CPU build of torch)'}"
    assert lines[5].split()[0] == "native-isa" and lines[5].split()[1] in {"avx512", "avx2", "scalar", "none", "off"}
    assert len(lines) == 6
    assert not torch_imported and not deepspeed_imported


def test_version_report_without_git_takes_the_commit_from_the_version(monkeypatch):
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(cli.subprocess, "run", no_git)
    monkeypatch.setattr(cli, "torch_cuda", lambda: "12.6")
    monkeypatch.setattr(cli, "native_isa", lambda: "avx2")
    monkeypatch.setattr(cli, "__version__", "0.1.1.dev3+g1a2b3c4.d20261201")
    monkeypatch.setattr(cli, "version", lambda dist: {"torch": "2.9.0", "deepspeed": "0.18.0"}[dist])
    assert cli.version_report().splitlines() == [
        "soilnet 0.1.1.dev3+g1a2b3c4.d20261201",
        "commit 1a2b3c4",
        "torch 2.9.0",
        "deepspeed 0.18.0",
        "cuda 12.6",
        "native-isa avx2",
    ]
    monkeypatch.setattr(cli, "__version__", "0.1.0")  # an archive without git: setuptools-scm's fallback
    monkeypatch.setattr(cli, "version", lambda dist: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError()))
    assert cli.version_report().splitlines() == [
        "soilnet 0.1.0",
        "commit unknown",
        "torch not installed",
        "deepspeed not installed",
        "cuda 12.6",
        "native-isa avx2",
    ]


def test_the_version_comes_from_git_through_setuptools_scm(repo_root):
    meta = tomllib.loads((repo_root / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert any(r.startswith("setuptools-scm") for r in meta["build-system"]["requires"])
    assert meta["tool"]["setuptools_scm"]["fallback_version"]
