"""docs/environment.md lists every environment variable the code reads."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE = ["soilnet", "shards", "launch", "slurm", "scripts", "Makefile"]
SUFFIXES = {".py", ".sh", ".c", ""}
# os.environ["X"], os.environ.get("X"), os.getenv("X"), "X" in os.environ (also through `env = os.environ`)
LOOKUPS = re.compile(
    r"""(?:environ|\benv)(?:\.get\(|\.setdefault\(|\[)\s*["']([A-Z][A-Z0-9_]+)["']"""
    r"""|getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""
    r"""|["']([A-Z][A-Z0-9_]+)["']\s+(?:not\s+)?in\s+(?:os\.environ|env)\b"""
)
# names that are environment variables wherever they appear (Python or shell)
PREFIXED = re.compile(r"\b(?:SOILNET|SLURM)_[A-Z0-9_]*[A-Z0-9]\b")
# a shell default `${X:-...}` and a Makefile `X ?=`: a setting the environment may override
OVERRIDABLE = re.compile(r"\$\{([A-Z][A-Z0-9_]+):-|^(?:export\s+)?([A-Z][A-Z0-9_]+)\s*\?=", re.MULTILINE)


def _code_files() -> list[Path]:
    files = []
    for name in CODE:
        path = REPO / name
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in found if p.suffix in SUFFIXES and "__pycache__" not in p.parts]
    return files


def _read_by_the_code() -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in _code_files():
        text = path.read_text(errors="replace")
        for name in PREFIXED.findall(text):
            names.setdefault(name, path)
        for match in [*LOOKUPS.finditer(text), *OVERRIDABLE.finditer(text)]:
            names.setdefault(next(g for g in match.groups() if g), path)
    return names


def test_every_variable_the_code_reads_is_documented():
    doc = (REPO / "docs" / "environment.md").read_text()
    names = _read_by_the_code()
    assert {"SOILNET_DEBUG", "SOILNET_NATIVE", "SOILNET_NATIVE_ISA", "SOILNET_MASTER_ADDR"} <= set(names)
    missing = {n: str(p.relative_to(REPO)) for n, p in names.items() if f"`{n}`" not in doc}
    assert not missing, f"add these to docs/environment.md: {missing}"


def test_the_doc_is_linked_from_the_readme_and_the_cluster_guide():
    assert "docs/environment.md" in (REPO / "README.md").read_text()
    assert "environment.md" in (REPO / "docs" / "cluster.md").read_text()
