"""benchmarks/train_step.py's model step (``--device cuda`` on a GPU, ``--model-step`` on the CPU here): its JSON
line, the FLOP count and the MFU's peak table."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_bench", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_bf16_peak_by_device_name(bench, name, peak):
    found, source = bench.bf16_peak(name)
    assert found == peak
    assert (f"{peak:g} TFLOP/s" in source) if peak else ("no known dense bf16 peak for 'Tesla V100" in source)


def test_mfu_is_null_with_the_reason_for_an_unknown_gpu_an_fp32_run_and_the_cpu(bench):
    cuda = torch.device("cuda", 0)
    assert bench.mfu(int(500e12), 1.0, "NVIDIA H200", "bf16", cuda)["mfu"] == pytest.approx(500 / 989)
    assert bench.mfu(int(1e12), 1.0, "Tesla V100", "bf16", cuda)["mfu"] is None
    fp32 = bench.mfu(int(1e12), 1.0, "NVIDIA H200", "fp32", cuda)
    assert fp32["mfu"] is None and fp32["mfu_reason"] == "the peaks are bf16 and this run is fp32"
    assert bench.mfu(int(1e12), 1.0, "cpu", "fp32", torch.device("cpu"))["mfu_reason"].endswith("this is the CPU")


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_model_step_on_the_cpu_counts_flops_and_reports_samples_per_second():
    proc = run("--model-step", "--micro", "4", "--steps", "2", "--warmup", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["config"].endswith("configs/pretrain/demo.yaml") and out["precision"] == "fp32"
    assert out["micro_batch"] == 4 and out["device"] == "cpu" and out["zero_stage"] == 1
    assert out["flops_per_step"] > 0 and out["flops_per_sample"] == out["flops_per_step"] / 4
    assert "FlopCounterMode" in out["flop_count"]
    assert out["samples_per_s_per_device"] == pytest.approx(4 / out["step_s"])
    assert out["mfu"] is None and out["mfu_reason"].endswith("this is the CPU")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA; this has CUDA")
def test_device_cuda_without_a_gpu_stops_with_the_reason():
    proc = run("--device", "cuda")
    assert proc.returncode == 1 and "sees no GPU" in proc.stderr
