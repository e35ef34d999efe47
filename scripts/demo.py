"""`make demo`: the whole pipeline end to end at toy scale on CPU, through the same commands a user runs.

    pack (synthetic world -> WebDataset shards + manifest)
      -> pretrain (DeepSpeed, gloo, 2 tasks via submitit's local executor)
      -> export (encoders as safetensors)
      -> finetune + evaluate (metrics.json, observed-vs-predicted plot)

Outputs go to ``outputs/demo``. A second run reuses the shards (packing is resumable and finds nothing left to
do) and replaces the pretraining and fine-tuning outputs; it says which.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ {' '.join(argv)}", flush=True)
    start = time.time()
    proc = subprocess.run(argv, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"demo: step '{title}' failed with exit code {proc.returncode}")
    print(f"=== {title}: done in {time.time() - start:.0f} s", flush=True)


def replace(path: Path) -> None:
    if path.exists():
        print(f"demo: replacing previous outputs in {path}")
        shutil.rmtree(path)


def run_pipeline(out: Path, tasks: int) -> None:
    """pack -> pretrain -> export -> fine-tune, each through the command a user runs."""
    shards, pretrain, finetune = out / "shards", out / "pretrain", out / "finetune"
    encoders = out / "encoders.safetensors"
    soilnet = [sys.executable, "-m", "soilnet.cli"]

    if (shards / "manifest.json").exists():
        print(f"demo: reusing the shards in {shards} (pack resumes and only adds what is missing)")
    step(
        "pack the synthetic world",
        [*soilnet, "pack", "--config", "configs/preprocess/demo.yaml", f"output_dir={shards}"],
    )

    replace(pretrain)
    launch = [sys.executable, "-m", "launch.pretrain", "--config", "configs/pretrain/demo.yaml"]
    local = ["--cluster", "local", "--tasks-per-node", str(tasks), "--wait"]
    pretrain_overrides = [f"output_dir={pretrain}", f"data.shards={shards}"]
    step("pretrain with DeepSpeed (submitit local executor)", [*launch, *local, *pretrain_overrides])

    step("export the pretrained encoders", [*soilnet, "export", "--checkpoint", str(pretrain), "--out", str(encoders)])

    replace(finetune)
    finetune_overrides = [f"data.shards={shards}", f"output_dir={finetune}", f"pretrained={encoders}"]
    finetune_config = ["--config", "configs/finetune/demo.yaml"]
    step("fine-tune and evaluate", [*soilnet, "finetune", *finetune_config, *finetune_overrides])


def print_results(out: Path) -> None:
    """Where every output went, and the model's and the forest's metrics."""
    shards, pretrain, finetune = out / "shards", out / "pretrain", out / "finetune"
    metrics = json.loads((finetune / "metrics.json").read_text())
    latest = pretrain / "checkpoints" / "latest"
    checkpoint = pretrain / "checkpoints" / latest.read_text().strip() if latest.exists() else pretrain
    print("\n=== demo finished. Results:")
    print(f"  shards + manifest : {shards}/manifest.json")
    print(f"  DeepSpeed ckpt    : {checkpoint}")
    print(f"  encoders          : {out / 'encoders.safetensors'}")
    print(f"  metrics           : {finetune / 'metrics.json'}")
    for png in sorted(finetune.rglob("*.png")):
        print(f"  plot              : {png}")
    model, rf = metrics["model"], metrics["baseline_rf"]
    print(f"  model       R2 {model['r2']:.3f}  RMSE {model['rmse']:.3f}  MAE {model['mae']:.3f}  (n={model['n']})")
    print(f"  baseline RF R2 {rf['r2']:.3f}  RMSE {rf['rmse']:.3f}  MAE {rf['mae']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/demo", help="where every output goes")
    parser.add_argument("--tasks", type=int, default=2, help="pretraining processes (submitit local tasks)")
    args = parser.parse_args()

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_extensions"))
    out = (REPO / args.out).resolve()
    run_pipeline(out, args.tasks)
    print_results(out)


if __name__ == "__main__":
    main()
