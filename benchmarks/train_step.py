"""Pretraining step costs: DeepSpeed's overhead over a plain torch loop, 2-process vs 1-process throughput, and
the share of a step spent in the gather-with-grad of the embeddings; or, with ``--device cuda``, the model's
samples/s per GPU and its MFU.

    .venv/bin/python benchmarks/train_step.py [--config configs/pretrain/demo.yaml] [--steps 30]
    .venv/bin/python benchmarks/train_step.py --device cuda [--config configs/pretrain/vit_b8_gpu.yaml] [--micro 128]

Needs shards (``data.shards`` of the config; ``make demo`` packs outputs/demo/shards). The last line printed is one
JSON object: ``deepspeed_overhead`` (DeepSpeed step time / plain-torch step time, one process; 1.10 = 10 % slower),
``scaling_2v1`` (samples/s with 2 processes / samples/s with 1, same global batch), ``allgather_share`` (time of
the embeddings' all-gather forward + all-reduce backward / step time, 2 processes) and the raw figures.

Every process runs one intra-op thread: the loader's reader thread needs the other core, and two OpenMP threads
beside it on 2 cores made the GRU's many small kernels 10x slower (spin-waiting), which would measure the
oversubscription rather than the training loop.

``--device cuda`` (or ``--model-step`` on the CPU) times the model step alone: one process, the config's model and
loss in a DeepSpeed engine as pretraining builds it (bf16 and ZeRO stage 1 for the reference ViT-B/8 + climate
Transformer), one micro-batch of ``--micro`` synthetic samples already on the device per step (forward, backward,
optimizer step; no loader, which ``benchmarks/loader.py`` measures, and no all-gather over GPUs). Its JSON line:
``samples_per_s_per_device``, ``flops_per_step`` (counted by ``torch.utils.flop_counter.FlopCounterMode`` on one
step's forward and backward: matrix products, convolutions and attention, not element-wise ops nor the optimizer),
``achieved_tflops`` and ``mfu`` = achieved / the GPU's dense bf16 peak (:data:`BF16_PEAK_TFLOPS`, by device name;
null with ``mfu_reason`` for a device not in the table, an fp32 run or the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from soilnet.config.base import load_config
from soilnet.config.pretrain import PretrainConfig
from soilnet.data import build_loader, open_shards
from soilnet.data.device import DeviceBatches
from soilnet.distributed import init_distributed, leave_process_group
from soilnet.losses import ContrastiveLoss
from soilnet.models import build_contrastive_model
from soilnet.schema import SampleSchema
from soilnet.train.pretrain import build_engine, loader_spec, plan_resume, precision

REPO = Path(__file__).resolve().parents[1]
CPU_CONFIG = REPO / "configs/pretrain/demo.yaml"
GPU_CONFIG = REPO / "configs/pretrain/vit_b8_gpu.yaml"

# Dense (no sparsity) bf16 tensor-core peak per GPU in TFLOP/s, from the vendor's data sheets, by a fragment of
# torch.cuda.get_device_name(); the first fragment found wins, so the specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GH200", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # SXM
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),  # SXM and PCIe
    ("L40S", 362.0),
)
FLOP_COUNT = (
    "torch.utils.flop_counter.FlopCounterMode over one step's forward and backward of the micro-batch (matrix "
    "products, convolutions, attention; not element-wise ops nor the optimizer step)"
)


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
    spec = loader_spec(cfg, 0, 1)
    # pretraining's loader and its augmentation on the device: only the training loop differs
    it = iter(DeviceBatches(build_loader(shards, spec), spec, "cpu"))
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


def bf16_peak(name: str) -> tuple[float | None, str]:
    """The dense bf16 peak (TFLOP/s) of the GPU named ``name`` and where it comes from; None when not known."""
    for fragment, peak in BF16_PEAK_TFLOPS:
        if fragment in name:
            return peak, f"{peak:g} TFLOP/s dense bf16 ('{fragment}' in the device name; vendor data sheet)"
    known = ", ".join(f for f, _ in BF16_PEAK_TFLOPS)
    return None, f"no known dense bf16 peak for '{name}' (known: {known})"


def model_step_config(a: argparse.Namespace) -> PretrainConfig:
    """The config with one micro-batch of ``a.micro`` per step on one process (no accumulation)."""
    micro = a.micro or 128
    extra = [f"train.global_batch_size={micro}", f"train.micro_batch_size={micro}", f"train.precision={a.precision}"]
    backend = "nccl" if a.device == "cuda" else "gloo"
    return load_config(PretrainConfig, a.config, [*extra, f"distributed.backend={backend}", *a.overrides])


def synthetic_batch(schema: SampleSchema, micro: int, device: torch.device, dtype: torch.dtype):
    """image (micro, C, H, W) and climate (micro, T, F) of standard-normal values, on ``device`` in ``dtype``."""
    g = torch.Generator().manual_seed(0)
    image = torch.randn(micro, *schema.image_shape, generator=g)
    climate = torch.randn(micro, *schema.climate_shape, generator=g)
    return image.to(device, dtype), climate.to(device, dtype)


def engine_step(engine, image: torch.Tensor, climate: torch.Tensor, count: bool = False) -> int | None:
    """One training step (forward, backward, optimizer); with ``count``, the FLOPs of its forward and backward."""
    counter = FlopCounterMode(display=False) if count else None
    if counter is not None:
        with counter:
            engine.backward(engine(image, climate)[0])
    else:
        engine.backward(engine(image, climate)[0])
    engine.step()
    return counter.get_total_flops() if counter is not None else None


def timed_steps(engine, image, climate, device: torch.device, steps: int) -> float:
    """Seconds per step over ``steps`` steps, the device synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine_step(engine, image, climate)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def mfu(flops: int, step_s: float, name: str, prec: str, device: torch.device) -> dict:
    """Achieved TFLOP/s and MFU against the device's bf16 peak (null with the reason when there is none)."""
    achieved = flops / step_s / 1e12
    peak, source = bf16_peak(name) if device.type == "cuda" else (None, "MFU is against a GPU's peak; this is the CPU")
    reason = source if peak is None else None
    if peak is not None and prec != "bf16":
        peak, reason = None, f"the peaks are bf16 and this run is {prec}"
    return {
        "achieved_tflops": achieved,
        "peak_tflops_bf16": peak,
        "peak_source": source,
        "mfu": achieved / peak if peak else None,
        "mfu_reason": reason,
    }


def model_step(a: argparse.Namespace) -> dict:
    """The model step alone on one device (module docstring): samples/s, FLOPs and MFU."""
    cfg = model_step_config(a)
    info = init_distributed(cfg.distributed.backend)
    schema = cfg.data.schema_.build()
    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_resume(cfg, info, Path(tmp))  # a fresh start: no checkpoint
    prec = precision(cfg, info)
    engine, _ = build_engine(cfg, info, schema, plan, prec, cfg.train.lr)
    dtype = torch.bfloat16 if prec == "bf16" else torch.float32
    image, climate = synthetic_batch(schema, plan.micro, info.device, dtype)
    flops = engine_step(engine, image, climate, count=True)  # the first warm-up step, counted
    for _ in range(a.warmup):
        engine_step(engine, image, climate)
    step_s = timed_steps(engine, image, climate, info.device, a.steps)
    name = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "device": str(info.device),
        "device_name": name,
        "precision": prec,
        "zero_stage": plan.stage,
        "config": str(a.config),
        "micro_batch": plan.micro,
        "steps": a.steps,
        "warmup_steps": a.warmup + 1,
        "parameters": sum(p.numel() for p in engine.module.parameters()),
        "step_s": step_s,
        "samples_per_s_per_device": plan.micro / step_s,
        "flops_per_step": flops,
        "flops_per_sample": flops / plan.micro if flops is not None else None,
        "flop_count": FLOP_COUNT,
        **mfu(flops or 0, step_s, name, prec, info.device),
        "max_memory_gib": torch.cuda.max_memory_allocated(info.device) / 2**30 if info.device.type == "cuda" else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    leave_process_group()
    return result


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=None, help=f"default: {CPU_CONFIG.name}; {GPU_CONFIG.name} with --device cuda")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: the model step on one GPU")
    p.add_argument("--model-step", action="store_true", help="the model step alone (always with --device cuda)")
    p.add_argument("--micro", type=int, default=None, help="model step: samples per step (default 128)")
    p.add_argument("--warmup", type=int, default=3, help="model step: untimed steps after the counted one")
    p.add_argument("--precision", choices=["bf16", "fp32"], default=None, help="model step: default bf16 on cuda")
    p.add_argument("--steps", type=int, default=40)
    # the same for every run; at the demo's 32 the fixed per-step costs hide the model
    p.add_argument("--global-batch", type=int, default=256, help="samples per step in every run")
    p.add_argument("--repeats", type=int, default=2, help="alternate the three runs this often; medians are kept")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    a.model_step = a.model_step or a.device == "cuda"
    a.config = a.config or str(GPU_CONFIG if a.device == "cuda" else CPU_CONFIG)
    a.precision = a.precision or ("bf16" if a.device == "cuda" else "fp32")
    return a


def main() -> None:
    a = parse_args()
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda: torch {torch.__version__} (CUDA build {torch.version.cuda}) sees no GPU")
    os.environ.setdefault("DS_ACCELERATOR", a.device)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    if a.model_step:
        print(json.dumps(model_step(a)))
        return
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
