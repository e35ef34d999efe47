"""Faults injected into real pretraining runs (DeepSpeed on CPU, gloo, 2 ranks, real shards), each checked for
nothing lost: kill -9 in the middle of a checkpoint save, a full disk during a save, truncated and bit-flipped
shards, a non-finite loss; and ``soilnet verify`` against the manifest's sha256.

Ranks are plain processes with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, as in test_pretrain.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from pretrain_kit import cpu_env, free_port, pretrain_command

from soilnet.data.order import batch_ids
from soilnet.data.tarindex import index_shard
from soilnet.train import checkpoint

pytest.importorskip("deepspeed")
REPO = Path(__file__).resolve().parents[2]
G = 16  # global batch: 4 steps an epoch of the 64 samples

# ``soilnet`` whose rank 0 SIGKILLs itself right after writing the first file of the checkpoint folder named in
# SOILNET_TEST_KILL_SAVING: a kill -9 in the middle of a save, with some of its files written and others not
KILL_IN_SAVE = """
import os, signal, sys
import torch
from soilnet.cli import main
target, save = os.environ["SOILNET_TEST_KILL_SAVING"], torch.save
def save_then_die(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    if target in str(f) and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_then_die
sys.exit(main(sys.argv[1:]))
"""


def start(out: Path, shards: Path, world: int, *overrides: str, kill_saving: str | None = None):
    port = str(free_port())
    entry = ["-c", KILL_IN_SAVE] if kill_saving else ["-m", "soilnet.cli"]
    steps = ["train.steps=6", f"train.global_batch_size={G}", "train.plot=false"]
    args = pretrain_command(entry, out, shards, *steps, *overrides)
    extra = {"SOILNET_TEST_KILL_SAVING": kill_saving} if kill_saving else {}
    procs = []
    for r in range(world):
        env = cpu_env(
            RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **extra
        )
        log = open(out.parent / f"{out.name}.rank{r}.log", "ab")
        procs.append(subprocess.Popen(args, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
    return procs


def run(out: Path, shards: Path, world: int, *overrides: str, kill_saving: str | None = None) -> list[int]:
    out.parent.mkdir(parents=True, exist_ok=True)
    procs = start(out, shards, world, *overrides, kill_saving=kill_saving)
    try:
        return [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def log_of(out: Path, rank: int = 0) -> str:
    return (out.parent / f"{out.name}.rank{rank}.log").read_text(errors="replace")


def sample_sequence(out: Path) -> list[list[int]]:
    return [json.loads(ln)["ids"] for ln in (out / "samples.jsonl").read_text().splitlines()]


def tensors(tree, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a nested dict/list, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list | tuple) else []
    return {k: v for key, sub in items for k, v in tensors(sub, f"{prefix}/{key}").items()}


def state(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor a checkpoint folder holds: model and buffers, optimizer partitions, each rank's RNG states."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    found = {}
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):  # DeepSpeed's, in ZeRO files
        for f in sorted(folder.glob("*.pt")):
            found.update(tensors(torch.load(f, map_location="cpu", weights_only=True), f.name))
    assert any("optim_states" in k for k in found) and any("rng_rank1" in k for k in found)
    return found


def assert_equal_states(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Every tensor equal, but numpy's global RNG: no run seeds it (nothing in training draws from it), so two
    processes start it differently; a resumed run restores it like the others."""
    assert a.keys() == b.keys()
    different = [k for k in a if not k.endswith("/numpy_key") and not torch.equal(a[k], b[k])]
    assert not different, different[:10]


def resumed_from(out: Path, tag: str) -> bool:
    return f"resumed from {out / 'checkpoints' / tag} at step {int(tag.split('_')[1])}" in log_of(out)


@pytest.fixture(scope="module")
def straight(shards, tmp_path_factory) -> Path:
    """6 steps on 2 ranks without a fault: the run every faulty run must end up equal to."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run(out, shards, 2) == [0, 0], log_of(out)[-3000:]
    return out


@pytest.mark.slow
def test_kill_minus_9_in_the_middle_of_a_save_resumes_from_the_previous_complete_checkpoint(straight, shards, tmp_path):

    out = tmp_path / "run"
    codes = run(out, shards, 2, kill_saving="step_00000006")
    assert codes[0] == -signal.SIGKILL and codes[1] != 0, (codes, log_of(out, 1)[-2000:])
    root = out / "checkpoints"
    partial = root / "step_00000006"
    assert (partial / "mp_rank_00_model_states.pt").is_file()  # the save had begun ...
    assert not (partial / "soilnet.json").exists() and checkpoint.complete(partial) is None  # ... and is not complete
    assert (root / "latest").read_text() == "step_00000003" and checkpoint.latest(root).tag == "step_00000003"

    assert run(out, shards, 2) == [0, 0], log_of(out)[-3000:]
    assert resumed_from(out, "step_00000003")
    assert checkpoint.latest(root).tag == "step_00000006"
    assert sample_sequence(out) == sample_sequence(straight)
    assert_equal_states(state(root / "step_00000006"), state(straight / "checkpoints" / "step_00000006"))


@pytest.mark.slow
def test_a_checkpoint_marked_complete_but_missing_a_file_is_never_picked(straight, tmp_path):
    """The completion marker lists every file with its size: a checkpoint that lost or truncated one (a pruning
    or copy cut short) is passed over for the newest complete one, whatever ``latest`` says."""

    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    newest = root / "step_00000006"
    listed = json.loads((newest / "soilnet.json").read_text())["files"]
    assert {"mp_rank_00_model_states.pt", "rng_rank0.pt", "rng_rank1.pt"} <= listed.keys()
    with open(newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(100)
    assert checkpoint.latest(root).tag == "step_00000003"
    (newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    assert checkpoint.latest(root).tag == "step_00000003"
    checkpoint.prune(root, keep_last=2)
    assert not newest.exists() and checkpoint.latest(root).tag == "step_00000003"


def _pages(folder: Path) -> int:
    """Bytes ``folder``'s files take on a tmpfs (whole pages)."""
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in folder.rglob("*") if f.is_file())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A tmpfs for the checkpoints of a run in tmp_path/run: mount(size) and remount(size)."""
    where = tmp_path / "run" / "checkpoints"
    where.mkdir(parents=True)
    mounted = []

    def mount(size: int, remount: bool = False) -> Path:
        opts = f"remount,size={size}" if remount else f"size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True, text=True)
        if proc.returncode != 0:
            if remount:
                pytest.fail(f"remounting {where}: {proc.stderr}")
            pytest.skip(f"cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN): {proc.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow
def test_disk_full_during_a_save_names_the_path_and_free_space_and_keeps_the_previous_checkpoint(
    straight, shards, tmp_path, small_tmpfs
):

    ref = straight / "checkpoints"
    # room for one checkpoint (and DeepSpeed's scripts beside it), plus half of the next
    one = _pages(ref) - _pages(ref / "step_00000006")
    root = small_tmpfs(one + _pages(ref / "step_00000003") // 2)
    out = root.parent
    # keep_last=1: the save of step 6 is the one that would prune step 3
    codes = run(out, shards, 2, "checkpoint.keep_last=1")
    assert all(c != 0 for c in codes), codes
    logs = log_of(out, 0) + log_of(out, 1)
    failed = re.search(
        r"could not write checkpoint file (\S+): .*; ([\d.]+ \w+) free of [\d.]+ \w+ on the file "
        r"system of (\S+)\. Nothing of this save is used",
        logs,
    )
    assert failed, logs[-4000:]
    assert "step_00000006" in failed.group(1) and failed.group(3) == str(root)
    assert f"the checkpoint in charge is still {root / 'step_00000003'} (step 3)" in logs
    assert checkpoint.latest(root).tag == "step_00000003"  # intact: every listed file there, with its size
    assert checkpoint.complete(root / "step_00000006") is None

    # with room again the rerun resumes from step 3 (the partial save removed) and ends where the straight run does
    small_tmpfs(64 << 20, remount=True)
    assert run(out, shards, 2, "checkpoint.keep_last=1") == [0, 0], log_of(out)[-3000:]
    assert resumed_from(out, "step_00000003")
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == ["step_00000006"]
    assert sample_sequence(out) == sample_sequence(straight)
    assert_equal_states(state(root / "step_00000006"), state(ref / "step_00000006"))


def _members(shard: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {suffix: (data offset, size)})] in tar order."""

    return index_shard(str(shard))


def _header_offset(shard: Path, position: int) -> int:
    """Where the headers of sample ``position``'s first member begin (the pax header ShardWriter puts first)."""
    key = _members(shard)[position][0]
    with tarfile.open(shard) as tar:
        return next(m.offset for m in tar.getmembers() if m.name.startswith(key + "."))


def _flip_bit(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _damage(folder: Path) -> dict[int, str]:
    """Damage three samples of a copied shard set the ways storage does; {global id: shard name}.

    - shard-000001, sample 5: one bit flipped in its image's .npy header (the shape changes);
    - shard-000002, sample 15: one bit flipped in the first tar header of its first member (the checksum fails;
      tar readers stop there, so the shard holds fewer samples than the manifest promises);
    - shard-000003: cut short in the middle of its last sample's image.
    """
    one = folder / "shard-000001.tar"
    offset, _ = _members(one)[5][1]["image.npy"]
    header = open(one, "rb").read()[offset : offset + 128]
    digit = header.index(b"(") + header[header.index(b"(") :].index(b"64")  # the first '6' of a 64 in the shape
    _flip_bit(one, offset + digit, 0)  # '6' -> '7'
    two = folder / "shard-000002.tar"
    _flip_bit(two, _header_offset(two, 15) + 100, 3)  # the mode field of its first header: the checksum fails
    three = folder / "shard-000003.tar"
    off, size = _members(three)[15][1]["image.npy"]
    os.truncate(three, off + size // 2)
    return {16 + 5: "shard-000001.tar", 32 + 15: "shard-000002.tar", 48 + 15: "shard-000003.tar"}


def test_truncated_and_bit_flipped_shards_below_the_threshold_replace_count_and_log_the_bad_samples(shards, tmp_path):

    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    bad = _damage(folder)
    out = tmp_path / "run"
    assert run(out, folder, 2, "data.max_corrupt_fraction=0.2") == [0, 0], log_of(out)[-3000:]
    seed = json.loads((out / "checkpoints" / "step_00000006" / "soilnet.json").read_text())["loader"]["seed"]
    expected = sum(int(np.isin(batch_ids(seed, 64, G, k), list(bad)).sum()) for k in range(6))
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["corrupt_samples"] == expected >= 3  # each bad sample once per epoch it is read in
    logs = log_of(out, 0) + log_of(out, 1)
    warnings = [ln for ln in logs.splitlines() if "skipped a corrupt sample" in ln]
    assert len(warnings) == expected
    for name in bad.values():
        assert any(name in w for w in warnings), (name, warnings)
    assert any("shard-000003.tar" in w and "truncated" in w for w in warnings), warnings
    # replaced, not dropped: every step still had the whole global batch
    assert all(len(ids) == G for ids in sample_sequence(out))


def verify(target: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "soilnet.cli", "verify", "--shards", str(target)],
        env=cpu_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
    )


def test_verify_names_each_bad_or_missing_shard_and_fails_else_prints_one_line(shards, tmp_path):
    folder = tmp_path / "shards"
    shutil.copytree(shards, folder)
    good = verify(folder)
    assert good.returncode == 0, good.stderr
    mib = sum(f.stat().st_size for f in folder.glob("shard-*.tar")) / 2**20
    assert good.stdout.strip() == f"4 shards ok (64 samples, {mib:.1f} MiB) against {folder / 'manifest.json'}"
    assert not good.stderr.strip()

    # one bit flipped inside an image's values: no reader notices (the header and sizes are intact), sha256 does
    zero = folder / "shard-000000.tar"
    offset, size = _members(zero)[2][1]["image.npy"]
    _flip_bit(zero, offset + size - 2, 6)
    (folder / "shard-000001.tar").rename(folder / "elsewhere.tar")
    os.truncate(folder / "shard-000003.tar", 10_000)
    bad = verify(folder / "manifest.json")
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert len(lines) == 3, bad.stderr
    assert lines[0].startswith("BAD shard-000000.tar: sha256 ") and "where the manifest records" in lines[0]
    assert lines[1] == f"BAD shard-000001.tar: missing: {folder / 'shard-000001.tar'} does not exist"
    assert lines[2].startswith("BAD shard-000003.tar: sha256 ") and "(10000 bytes)" in lines[2]
    assert bad.stdout.strip() == f"3 of 4 shards bad (48 of 64 samples) against {folder / 'manifest.json'}"

    missing = verify(tmp_path / "nowhere")
    assert missing.returncode == 2 and "manifest not found" in missing.stderr


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_rank_with_the_state_before_that_step_saved(shards, tmp_path):
    """A learning rate far too high makes the weights overflow after a few steps, and the loss becomes NaN. Every
    rank stops before the optimizer takes that step, saves the state of before it (parameters, optimizer, BatchNorm
    statistics, RNG states: equal to a run that stops there by itself), names the step and exits non-zero; the
    rerun resumes from that checkpoint and meets the same step again."""
    blowup = ("train.lr=1e5", "train.warmup_samples=0", "train.min_lr_ratio=1.0", "checkpoint.every_steps=100")
    out = tmp_path / "run"
    assert run(out, shards, 2, *blowup) == [2, 2], log_of(out)[-3000:]
    said = re.search(
        r"step (\d+): the loss is not finite on (\d) of 2 rank\(s\); the optimizer did not take that step",
        log_of(out, 0),
    )
    assert said, log_of(out)[-3000:]
    bad_step = int(said.group(1))
    assert 1 < bad_step <= 6
    assert said.group(0) in log_of(out, 1)  # both ranks stopped at the same step
    tag = f"step_{bad_step - 1:08d}"
    root = out / "checkpoints"
    assert f"The state before it is saved as {root / tag} (step {bad_step - 1})" in log_of(out, 0)
    assert sorted(d.name for d in root.iterdir() if d.is_dir()) == [tag]
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, bad_step)) and all(np.isfinite(r["loss"]) for r in rows)
    saved = state(root / tag)
    assert all(bool(torch.isfinite(v).all()) for k, v in saved.items() if v.is_floating_point()), "NaN saved"

    # the same run told to stop before the bad step: its last checkpoint is the same state, tensor for tensor
    before = tmp_path / "before"
    assert run(before, shards, 2, *blowup, f"train.steps={bad_step - 1}") == [0, 0], log_of(before)[-3000:]
    assert_equal_states(saved, state(before / "checkpoints" / tag))

    # resuming from it works: it continues from that step and meets the same non-finite loss there
    written = (root / tag / "soilnet.json").read_text()
    assert run(out, shards, 2, *blowup) == [2, 2]
    assert resumed_from(out, tag)
    assert log_of(out, 0).count(said.group(0)) == 2
    assert (root / tag / "soilnet.json").read_text() == written  # the same state, not saved again
