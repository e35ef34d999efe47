"""The habits of docs/architecture.md that no linter checks: short functions and few hand-laid lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("soilnet", "shards", "launch", "tools")
MAX_FUNCTION_LINES = 60  # CONTRIBUTING.md: split longer functions into named steps
MAX_FMT_SKIPS = 30  # in the whole repository, tests included
ARGUMENT_PARSERS = {"build_parser", "parse_args"}  # a flat list of options reads best as one function


def _sources(*roots: str) -> list[Path]:
    return sorted(p for root in roots for p in (REPO / root).rglob("*.py"))


def test_no_function_is_longer_than_60_lines_except_argument_parsers():
    long = []
    for path in _sources(*PACKAGES):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name not in ARGUMENT_PARSERS:
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_at_most_30_fmt_skip_comments_in_the_repository():
    marker = "fmt: " + "skip"  # split so that this file does not count itself
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in _sources(*PACKAGES, "tests", "benchmarks", "scripts")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if marker in line
    ]
    assert len(found) <= MAX_FMT_SKIPS, f"{len(found)} hand-laid lines (at most {MAX_FMT_SKIPS}): {found}"
