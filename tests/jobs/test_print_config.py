"""``--print-config``: the resolved config as YAML (what the run would save), then exit, importing no job."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from soilnet.config.base import load_config, to_plain
from soilnet.jobs.commands import COMMANDS, resolve

# run `main` in a fresh interpreter and report what it printed, its exit code and what it imported
PROBE = (
    "import contextlib, io, json, sys\n"
    "from {module} import main\n"
    "out, err = io.StringIO(), io.StringIO()\n"
    "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
    "    rc = main({args})\n"
    "print(json.dumps([rc, out.getvalue(), err.getvalue(), 'torch' in sys.modules, {job!r} in sys.modules]))\n"
)


def _probe(repo_root, module: str, args: list[str], job: str) -> tuple[int, str, str, bool, bool]:
    code = PROBE.format(module=module, args=repr(args), job=job)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root, check=True)
    rc, out, err, torch_imported, job_imported = json.loads(proc.stdout)
    return rc, out, err, torch_imported, job_imported


CASES = [
    ("pretrain", "configs/pretrain/demo.yaml", "train.steps=7"),
    ("finetune", "configs/finetune/demo.yaml", "train.epochs=3"),
    ("evaluate", "configs/finetune/demo.yaml", "train.epochs=3"),
    ("model-summary", "configs/finetune/demo.yaml", "train.epochs=3"),
    ("pack", "configs/preprocess/demo.yaml", "shard.max_samples=17"),
]


def test_every_config_command_is_covered():
    assert {c for c, cmd in COMMANDS.items() if cmd.config_class} == {case[0] for case in CASES}


@pytest.mark.parametrize(("command", "config", "override"), CASES)
def test_print_config_is_the_resolved_config_and_runs_nothing(repo_root, tmp_path, command, config, override):
    out_dir = tmp_path / "run"
    args = [command, "--config", config, override, f"output_dir={out_dir}", "--print-config"]
    job = COMMANDS[command].run.split(":")[0]
    rc, printed, err, torch_imported, job_imported = _probe(repo_root, "soilnet.cli", args, job)
    assert rc == 0, err
    cls = resolve(COMMANDS[command].config_class)
    expected = to_plain(load_config(cls, repo_root / config, [override, f"output_dir={out_dir}"]))
    assert yaml.safe_load(printed) == expected
    key, value = override.split("=")
    node = yaml.safe_load(printed)
    for part in key.split("."):
        node = node[part]
    assert node == yaml.safe_load(value)
    assert not out_dir.exists()
    assert not torch_imported and not job_imported


def test_print_config_reports_a_config_error_in_one_line(repo_root, tmp_path):
    args = ["pretrain", "--config", "configs/pretrain/demo.yaml", "train.no_such_key=1", "--print-config"]
    rc, printed, err, _, _ = _probe(repo_root, "soilnet.cli", args, "soilnet.jobs.pretrain")
    assert rc == 2 and printed == ""
    assert err.count("\n") == 1 and "unknown key 'train.no_such_key'" in err


def test_launch_print_config_submits_nothing(repo_root, tmp_path):
    out_dir = tmp_path / "run"
    code = (
        "import sys\n"
        "from launch.pack import SPEC\n"
        "from launch.submit import main\n"
        f"sys.exit(main(SPEC, ['--config', 'configs/preprocess/demo.yaml', 'output_dir={out_dir}', '--print-config', "
        "'shard.max_samples=17']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    cls = resolve(COMMANDS["pack"].config_class)
    overrides = [f"output_dir={out_dir}", "shard.max_samples=17"]
    cfg = load_config(cls, repo_root / "configs/preprocess/demo.yaml", overrides)
    assert yaml.safe_load(proc.stdout) == to_plain(cfg)
    assert not out_dir.exists()
