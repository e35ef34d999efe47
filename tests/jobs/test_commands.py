"""The one command registry: every name resolves, and the CLI and the launchers are built from it."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from launch import finetune, pack, pretrain
from soilnet import cli
from soilnet.jobs.commands import COMMANDS, LAUNCHED, resolve


def _targets():
    for name, cmd in COMMANDS.items():
        yield name, cmd.run
        if cmd.config_class:
            yield name, cmd.config_class


@pytest.mark.parametrize("name, target", list(_targets()))
def test_every_registry_entry_names_an_importable_object(name, target):
    """Holds on the merged tree (soilnet.jobs.pretrain/finetune/evaluate come from other branches)."""
    module, attr = target.split(":")
    assert hasattr(importlib.import_module(module), attr), f"{name}: {target}"


def test_the_cli_offers_exactly_the_registry_commands():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS)
    for name, cmd in COMMANDS.items():
        assert sub.choices[name].description == (cmd.description or cmd.help)


def test_the_launchers_are_the_registry_entries():
    specs = {spec.name: spec for spec in (pretrain.SPEC, finetune.SPEC, pack.SPEC)}
    assert set(specs) | {"predict-map"} == set(LAUNCHED)  # predict-map takes arguments: launch.predict_map
    for name, spec in specs.items():
        assert spec.entry_point == COMMANDS[name].run
        assert spec.config_class is resolve(COMMANDS[name].config_class)


def test_help_stays_light(repo_root):
    """``soilnet --help`` and a command's help import neither torch nor the command's code."""
    code = (
        "import sys, contextlib, io\n"
        "from soilnet.cli import main\n"
        "for argv in (['--help'], ['pack', '--help'], ['predict-map', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'shards'))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", "import json\n" + code], capture_output=True, text=True, cwd=repo_root, check=True
    )
    assert json.loads(proc.stdout) == []


def test_a_config_command_runs_its_registry_entry(tmp_path, capsys, repo_root):
    """``soilnet pack`` goes through the registry to soilnet.jobs.pack and prints the packer's summary."""
    rc = cli.main(
        ["pack", "--config", str(repo_root / "configs/preprocess/demo.yaml"), f"output_dir={tmp_path}", "sampling.n=6"]
    )
    assert rc == 0
    assert f"packed 6 samples in 1 shards; rejected: none; failed: 0. Manifest: {tmp_path}" in capsys.readouterr().out
