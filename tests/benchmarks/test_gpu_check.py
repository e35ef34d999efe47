"""benchmarks/gpu_check.sh on a machine without CUDA: its arguments, the layout of what it writes under its output
folder, a step cut by its budget, a stop on SIGTERM, and the skips of the ``gpu`` tests with their reasons.

What needs a GPU (the steps themselves) runs on a GPU machine only; here every CUDA step must say that it was
skipped and why, and the figures must stay null.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
STEPS = ["env", "train_step", "loader", "predict_map", "pytest"]
CUDA_STEPS = STEPS[1:]
no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without CUDA; this has CUDA")


def check(*args: str, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("OUT", "SOILNET_PYTHON")}
    full.update(env)
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=180)


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_help_names_every_option_and_step():
    proc = check("--help")
    assert proc.returncode == 0, proc.stderr
    for word in ("--out", "--budget", "--step NAME=SECONDS", "--only", "--python", "--wheels", "summary.json", *STEPS):
        assert word in proc.stdout, word


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "0"], "--budget needs whole seconds, 1..3600"),
        (["--budget", "3601"], "--budget needs whole seconds, 1..3600"),
        (["--budget", "5m"], "--budget needs whole seconds, 1..3600"),
        (["--step", "gpu=3"], "--step: no step 'gpu'"),
        (["--step", "env=0"], "--step env: whole seconds, 1..3600"),
        (["--step", "env"], "--step needs NAME=SECONDS"),
        (["--only", "env,maps"], "--only: no step 'maps'"),
        (["--wheels", "/nonexistent/wheels"], "--wheels needs a folder of wheels"),
        (["--out"], "--out needs a folder"),
        (["--gpus", "2"], "unknown argument '--gpus'"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(args, message, tmp_path):
    out = tmp_path / "out"
    proc = check(*args, "--out", str(out)) if args != ["--out"] else check(*args)
    assert proc.returncode == 2 and message in proc.stderr, (proc.returncode, proc.stderr)
    assert not out.exists()


@no_cuda_here
def test_without_cuda_every_gpu_step_is_skipped_with_the_reason_and_no_figure_is_made(tmp_path):
    """The default output folder is $OUT and the interpreter $SOILNET_PYTHON; the environment report runs; every
    CUDA step says why it did not."""
    out = tmp_path / "out"
    proc = check("--budget", "60", OUT=str(out), SOILNET_PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(out)
    assert s["gpus"] == 0 and s["budget_s"] == 60 and s["python"] == sys.executable
    assert s["python_choice"] == f"{sys.executable} imports torch" and "0 GPU(s)" in s["cuda"]
    assert list(s["steps"]) == STEPS
    assert s["steps"]["env"]["status"] == "passed", (out / "env.log").read_text()
    for name in CUDA_STEPS:
        step = s["steps"][name]
        assert step["status"].startswith("skipped: no CUDA (torch "), step
        assert step["result"] is None and step["seconds"] is None and step["log"] is None
        assert not (out / f"{name}.json").exists()
    fig = s["figures"]
    assert fig["samples_per_s_per_gpu"] is None and fig["mfu"] is None and fig["headroom"] is None
    assert fig["mfu_reason"] and fig["headroom_reason"]
    env_log = (out / "env.log").read_text()
    for part in ("== nvidia-smi", "== python:", "== soilnet doctor", "soilnet doctor: ok"):
        assert part in env_log, part
    assert {p.name for p in out.iterdir()} == {"summary.json", "figures.json", "env.log"}


def test_a_step_over_its_budget_is_cut_and_the_run_goes_on(tmp_path):
    out = tmp_path / "out"
    proc = check("--out", str(out), "--budget", "60", "--step", "env=1")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step timed out; skips alone would give 0
    s = summary(out)
    assert s["steps"]["env"]["status"] == "timed out after 1 s"
    assert s["steps"]["env"]["budget_s"] == 1
    assert all(s["steps"][n]["status"].startswith("skipped: ") for n in CUDA_STEPS)


def test_only_and_a_python_without_torch_say_what_did_not_run(tmp_path):
    out = tmp_path / "out"
    proc = check("--out", str(out), "--only", "pytest", "--python", "/nonexistent/python", "--budget", "30")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = summary(out)
    assert s["python_choice"] == "no python that imports torch: /nonexistent/python: not found"
    assert s["python"] is None
    assert s["steps"]["pytest"]["status"] == "skipped: no python that imports torch"
    assert s["steps"]["train_step"]["status"] == "skipped: not in --only"
    assert s["steps"]["env"]["status"] == "passed"  # it reports what it found, even without a python
    assert s["figures"] is None


def test_wheels_are_installed_offline_into_a_venv_or_the_run_says_it_went_without(tmp_path):
    """A wheel folder whose only wheel is not one: the attempt is logged, and the run goes on with what it has."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "broken-1.0-py3-none-any.whl").write_bytes(b"not a zip")
    out = tmp_path / "out"
    proc = check("--out", str(out), "--wheels", str(wheels), "--only", "pytest", "--budget", "90", "--step", "env=5")
    s = summary(out)
    assert proc.returncode == (0 if s["steps"]["env"]["status"] == "passed" else 1), proc.stdout + proc.stderr
    assert f"== offline install of {wheels}/*.whl into {out}/venv" in (out / "env.log").read_text()
    assert f"the wheels of {wheels}" in s["python_choice"]
    assert s["python"] is not None


def test_sigterm_ends_the_step_and_leaves_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--out", str(out), "--budget", "60"], cwd=REPO)
    deadline = time.monotonic() + 60
    while not ((out / "summary.json").is_file() and summary(out)["steps"]["env"]["status"].startswith("running")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 124
    s = summary(out)
    assert s["steps"]["env"]["status"] == "cut by the overall time limit"
    assert all(s["steps"][n]["status"] in ("not reached", "cut by the overall time limit") for n in CUDA_STEPS)


@no_cuda_here
def test_the_gpu_tests_are_skipped_with_their_reason(tmp_path):
    xml = tmp_path / "gpu.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}"]
    proc = subprocess.run([*cmd, str(REPO / "tests" / "gpu")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases = list(ET.parse(xml).getroot().iter("testcase"))
    skips = {c.get("name"): c.find("skipped") for c in cases}
    assert len(cases) >= 10 and all(s is not None for s in skips.values()), skips
    for name, skip in skips.items():
        reason = skip.get("message") or ""
        assert "needs a CUDA GPU: torch" in reason or "CUDA GPUs, one per rank" in reason, (name, reason)
    nt_xent = skips["test_two_gpu_ranks_times_b_equal_one_rank_times_2b_loss_and_every_gradient"]
    assert "needs 2 CUDA GPUs" in nt_xent.get("message")
