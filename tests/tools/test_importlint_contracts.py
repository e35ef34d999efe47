"""The custom import-linter contract (tools/importlint_contracts.py) on a tiny temporary package."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

from importlinter.domain.contract import InvalidContractOptions  # noqa: E402

from tools.importlint_contracts import lazy_imports, parse_allowed  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"

CONFIG = """\
[importlinter]
root_packages =
    toypkg
contract_types =
    module_level_imports: tools.importlint_contracts.ModuleLevelImportsContract

[importlinter:contract:lazy]
name = No imports inside functions
type = module_level_imports
allowed_lazy =
    json: a stand-in for an optional dependency
"""


def write_package(root: Path, files: dict[str, str]) -> None:
    (root / "toypkg").mkdir()
    (root / "toypkg" / "__init__.py").write_text("")
    for name, text in files.items():
        (root / "toypkg" / name).write_text(textwrap.dedent(text))
    (root / ".importlinter").write_text(CONFIG)


def lint(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{REPO_ROOT}"}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=root, env=env, capture_output=True, text=True
    )


CLEAN = """\
import os

from toypkg import other


def f():
    import json

    return json.dumps(os.sep), other
"""

BROKEN = """\
import os


class Thing:
    def method(self):
        from toypkg import other

        return other


def outer():
    def inner():
        import subprocess

        return subprocess

    from . import other

    return inner, other
"""


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="lint-imports is not installed beside this Python")
def test_module_level_imports_and_an_allowed_optional_dependency_pass(tmp_path):
    write_package(tmp_path, {"other.py": "", "mod.py": CLEAN})
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


@pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="lint-imports is not installed beside this Python")
def test_first_party_and_unlisted_imports_inside_functions_fail_with_file_line_and_module(tmp_path):
    write_package(tmp_path, {"other.py": "", "mod.py": BROKEN})
    result = lint(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "toypkg/mod.py:6: toypkg" in result.stdout
    assert "toypkg/mod.py:13: subprocess" in result.stdout
    assert "toypkg/mod.py:17: ." in result.stdout


def test_lazy_imports_finds_only_function_bodies(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text(BROKEN)
    found = sorted((item.line, item.module) for item in lazy_imports(path, "mod.py"))
    assert found == [(6, "toypkg"), (13, "subprocess"), (17, ".")]


def test_allowed_entries_need_a_reason_and_must_be_third_party():
    assert parse_allowed(["deepspeed: heavy at import"], ["soilnet"]) == {"deepspeed": "heavy at import"}
    with pytest.raises(InvalidContractOptions, match="the reason"):
        parse_allowed(["deepspeed"], ["soilnet"])
    with pytest.raises(InvalidContractOptions, match="first-party"):
        parse_allowed(["soilnet.train: cycles"], ["soilnet"])
