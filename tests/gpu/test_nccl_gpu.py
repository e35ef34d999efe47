"""Global negatives over nccl: 2 ranks x B on 2 GPUs give the loss and every gradient of 1 rank x 2B, as the CPU
test does on gloo (tests/train/test_loss.py, whose data, model and reference this reuses). nccl refuses two ranks
on one device, so this needs 2 GPUs; tests/gpu/test_pretrain_gpu.py runs nccl on every visible GPU, one too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gpu_kit import gpu_env, needs_cuda, needs_gpus
from pretrain_kit import free_port
from test_loss import _data, _loss_and_grads

pytestmark = [pytest.mark.gpu, needs_cuda]
REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("nt_xent_ranks.py")


@needs_gpus(2)
def test_two_gpu_ranks_times_b_equal_one_rank_times_2b_loss_and_every_gradient(tmp_path):
    out, port = tmp_path / "ranks.pt", str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out)],
            env=gpu_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    logs = [p.communicate(timeout=180)[0].decode(errors="replace")[-2000:] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    got = torch.load(out, weights_only=True)
    expected_loss, expected = _loss_and_grads(*_data())  # one process, the whole batch, on the CPU
    assert torch.allclose(got["loss"], expected_loss, atol=1e-5)
    assert got["grads"].keys() == expected.keys()
    for k in expected:
        assert torch.allclose(got["grads"][k], expected[k], rtol=1e-4, atol=1e-5), k
