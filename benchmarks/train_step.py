"""Pretraining step costs: DeepSpeed's overhead over a plain torch loop, 2-process vs 1-process throughput, and
the share of a step spent in the gather-with-grad of the embeddings.

    .venv/bin/python benchmarks/train_step.py [--config configs/pretrain/demo.yaml] [--steps 30] [--device cpu]

Needs shards (``data.shards`` of the config; ``make demo`` packs outputs/demo/shards). The last line printed is one
JSON object: ``deepspeed_overhead`` (DeepSpeed step time / plain-torch step time, one process; 1.10 = 10 % slower),
``scaling_2v1`` (samples/s with 2 processes / samples/s with 1, same global batch), ``allgather_share`` (time of
the embeddings' all-gather forward + all-reduce backward / step time, 2 processes) and the raw figures.

Every process runs one intra-op thread: the loader's reader thread needs the other core, and two OpenMP threads
beside it on 2 cores made the GRU's many small kernels 10x slower (spin-waiting), which would measure the
oversubscription rather than the training loop.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from soilnet.config.base import load_config
from soilnet.config.pretrain import PretrainConfig
from soilnet.data import build_loader, open_shards
from soilnet.losses import ContrastiveLoss
from soilnet.models import build_contrastive_model
from soilnet.train.pretrain import loader_spec

REPO = Path(__file__).resolve().parents[1]


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def pretrain(config: str, world: int, steps: int, out: Path, extra: list[str]) -> list[dict]:
    port = _port()
    args = [
        *(sys.executable, "-m", "soilnet.cli", "pretrain", "--config", config, f"output_dir={out}"),
        *(f"train.steps={steps}", f"checkpoint.every_steps={steps * 10}", "train.progress=false"),
        *("train.tensorboard=false", "train.plot=false", *extra),
    ]
    procs = []
    for r in range(world):
        ranks = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r)}
        env = dict(os.environ, **ranks, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"pretrain with {world} process(es) failed:\n{err.decode()[-3000:]}")
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def steady_sps(rows: list[dict]) -> float:
    tail = rows[len(rows) // 3 :]  # skip start-up steps
    return statistics.harmonic_mean([r["samples_per_s"] for r in tail])  # = samples / time over the tail


def plain_torch_sps(config: str, steps: int, extra: list[str]) -> float:
    """The same model, loss, data and AdamW in a plain single-process torch loop."""
    cfg = load_config(PretrainConfig, config, extra)
    shards = open_shards(cfg.data.shards, cfg.data.schema_)
    torch.manual_seed(0)
    model = build_contrastive_model(cfg.model, shards.schema)
    loss_fn = ContrastiveLoss(cfg.loss.temperature)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    it = iter(build_loader(shards, loader_spec(cfg, 0, 1)))  # pretraining's loader: only the training loop differs
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        b = next(it)
        loss, _ = loss_fn(*model(b["image"], b["climate"]))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        times.append(time.perf_counter() - t0)
    tail = times[len(times) // 3 :]
    return cfg.train.global_batch_size / (sum(tail) / len(tail))


GATHER_CODE = """
import os, sys, time, torch, torch.distributed as dist
from soilnet.distributed import gather_with_grad
dist.init_process_group("gloo")
b, d, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
x = torch.randn(b, d, requires_grad=True)
for i in range(n + 3):
    if i == 3: t0 = time.perf_counter()
    gather_with_grad(x).sum().backward()
dist.barrier()
if dist.get_rank() == 0: print((time.perf_counter() - t0) / n)
"""


def gather_seconds(micro_batch: int, dim: int, n: int = 50) -> float:
    port = _port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GATHER_CODE, str(micro_batch), str(dim), str(n)],
            cwd=REPO,
            env=dict(
                os.environ, RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1"
            ),
            stdout=subprocess.PIPE,
        )
        for r in range(2)
    ]
    outs = [p.communicate()[0].decode().strip() for p in procs]
    return float(outs[0])


def plain_in_subprocess(config: str, steps: int, extra: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--plain", "--config", config, "--steps", str(steps), *extra]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs/pretrain/demo.yaml"))
    p.add_argument("--steps", type=int, default=40)
    # the same for every run; at the demo's 32 the fixed per-step costs hide the model
    p.add_argument("--global-batch", type=int, default=256, help="samples per step in every run")
    p.add_argument("--repeats", type=int, default=2, help="alternate the three runs this often; medians are kept")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    extra = ["deepspeed.zero_optimization.stage=0", f"train.global_batch_size={a.global_batch}", *a.overrides]
    if a.plain:
        print(plain_torch_sps(a.config, a.steps, extra))
        return
    runs: dict[str, list[float]] = {"torch": [], "ds1": [], "ds2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):  # alternating, so load from elsewhere on the machine hits all three alike
            runs["torch"].append(plain_in_subprocess(a.config, a.steps, extra))
            runs["ds1"].append(steady_sps(pretrain(a.config, 1, a.steps, Path(tmp) / f"w1-{i}", extra)))
            runs["ds2"].append(steady_sps(pretrain(a.config, 2, a.steps, Path(tmp) / f"w2-{i}", extra)))
    torch_sps, sps1, sps2 = (statistics.median(runs[k]) for k in ("torch", "ds1", "ds2"))
    cfg = load_config(PretrainConfig, a.config, extra)
    dim = cfg.model.projection_dim or 64
    g = gather_seconds(cfg.train.global_batch_size // 2, dim)
    step2 = cfg.train.global_batch_size / sps2
    result = {
        "deepspeed_overhead": torch_sps / sps1,  # step-time ratio: (1 / sps1) / (1 / torch_sps)
        "scaling_2v1": sps2 / sps1,
        "allgather_share": g * 2 / step2,  # two gathers per step (image and climate embeddings)
        "samples_per_s_torch_1": torch_sps,
        "samples_per_s_deepspeed_1": sps1,
        "samples_per_s_deepspeed_2": sps2,
        "gather_seconds": g,
        "global_batch_size": cfg.train.global_batch_size,
        "steps": a.steps,
        "repeats": a.repeats,
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
