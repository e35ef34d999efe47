"""``soilnet doctor``: the install check of docs/install.md, run as a user runs it (a subprocess, on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import deepspeed
import torch


def doctor(repo_root, env_extra=None, pythonpath=()):
    env = {**os.environ, "DS_ACCELERATOR": "cpu", **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), str(repo_root)])
    cmd = [sys.executable, "-m", "soilnet.cli", "doctor"]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=repo_root, env=env, timeout=300)


def test_doctor_prints_torch_cuda_nccl_deepspeed_ops_and_the_native_isa(repo_root):
    proc = doctor(repo_root)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    assert lines[0] == f"torch {torch.__version__} ({build} build)"
    if torch.cuda.is_available():
        assert lines[1].startswith("cuda available: yes, CUDA ")
        assert any(line.startswith("nccl ") for line in lines)
    else:
        assert lines[1:3] == ["cuda available: no", "nccl none (no CUDA)"]
    assert f"deepspeed {deepspeed.__version__} (accelerator cpu; DS_ACCELERATOR cpu)" in lines
    first = next(i for i, line in enumerate(lines) if line.startswith("deepspeed ops (installed ahead / compatible"))
    ops = {line.split()[0]: line.split()[1:] for line in lines[first + 1 :] if line.startswith("  ")}
    assert ops["cpu_adam"][1] == "/" and {ops["cpu_adam"][0], ops["cpu_adam"][2]} <= {"yes", "no"}
    isa = next(line for line in lines if line.startswith("native-isa "))
    assert isa.split()[1] in {"avx512", "avx2", "scalar", "none"}
    assert any(line.startswith("native extension ") for line in lines)
    assert lines[-1] == "soilnet doctor: ok"


def test_doctor_reports_the_isa_cap_and_the_torch_fallback(repo_root):
    capped = doctor(repo_root, {"SOILNET_NATIVE_ISA": "scalar"})
    assert capped.returncode == 0, capped.stderr
    assert "native-isa scalar (SOILNET_NATIVE_ISA=scalar)" in capped.stdout.splitlines() or (
        "native-isa none (" in capped.stdout
    )
    off = doctor(repo_root, {"SOILNET_NATIVE": "0"})
    assert off.returncode == 0, off.stderr
    assert "native-isa off (SOILNET_NATIVE=0: the loader converts with torch)" in off.stdout.splitlines()
    assert "native extension not loaded: the loader converts with torch (slower)" in off.stdout.splitlines()


def test_doctor_exits_1_naming_deepspeed_when_it_does_not_import(repo_root, tmp_path):
    fake = tmp_path / "deepspeed"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('no DeepSpeed in this test')\n")
    proc = doctor(repo_root, pythonpath=[tmp_path])
    assert proc.returncode == 1
    assert "deepspeed none (ImportError: no DeepSpeed in this test)" in proc.stdout.splitlines()
    assert "soilnet doctor: not usable: deepspeed does not import" in proc.stderr
    assert "soilnet doctor: ok" not in proc.stdout
