"""A custom import-linter contract: no imports inside functions, except listed optional dependencies.

An import inside a function hides a dependency from the module's head and from the layers contract's reader, so
the project keeps every import at module level. The only exception is a third-party optional dependency (a heavy
engine, a client that is not always installed), each listed in ``pyproject.toml`` with the reason it is imported
late::

    [[tool.importlinter.contracts]]
    name = "No imports inside functions, except optional dependencies"
    type = "module_level_imports"
    allowed_lazy = ["deepspeed: heavy, builds its accelerator ops at import; only training processes import it"]

An entry allows the module and its submodules (``deepspeed`` allows ``deepspeed.comm``). A first-party module
(one of the root packages) or a relative import is never allowed, whatever the list says. ``lint-imports`` puts
the working directory on ``sys.path``, so this module loads as ``tools.importlint_contracts`` from the repo root.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output
from importlinter.domain.contract import InvalidContractOptions

FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass(frozen=True)
class LazyImport:
    """One import statement inside a function body."""

    path: str
    line: int
    module: str

    def render(self) -> str:
        return f"{self.path}:{self.line}: {self.module}"


def parse_allowed(entries: list[str], root_packages: list[str]) -> dict[str, str]:
    """``{module: reason}`` from ``"module: reason"`` entries; each needs a reason and must be third-party."""
    allowed: dict[str, str] = {}
    errors = []
    for entry in entries:
        module, _, reason = (part.strip() for part in entry.partition(":"))
        if not module or not reason:
            errors.append(f"{entry!r}: write it as 'module: the reason it is imported inside a function'")
        elif is_within(module, root_packages):
            errors.append(f"{entry!r}: a first-party module is never imported inside a function")
        else:
            allowed[module] = reason
    if errors:
        raise InvalidContractOptions({"allowed_lazy": "; ".join(errors)})
    return allowed


def is_within(module: str, packages: list[str] | dict[str, str]) -> bool:
    """Whether ``module`` is one of ``packages`` or a submodule of one."""
    return any(module == package or module.startswith(package + ".") for package in packages)


def package_files(package: str) -> list[Path]:
    """The ``.py`` files of a top-level package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"root package {package!r} is not an importable package")
    files: list[Path] = []
    for location in spec.submodule_search_locations:
        files.extend(p for p in Path(location).rglob("*.py") if "__pycache__" not in p.parts)
    return sorted(files)


def imported_modules(node: ast.Import | ast.ImportFrom) -> list[str]:
    """The modules an import statement names; a relative import keeps its leading dots (always first-party)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    return ["." * node.level + (node.module or "")]


def lazy_imports(path: Path, shown_as: str) -> Iterator[LazyImport]:
    """Every import statement of ``path`` that sits inside a function or method body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    inside: list[ast.AST] = [node for node in ast.walk(tree) if isinstance(node, FUNCTIONS)]
    seen: set[int] = set()
    for function in inside:
        for node in ast.walk(function):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in seen:
                seen.add(id(node))
                for module in imported_modules(node):
                    yield LazyImport(shown_as, node.lineno, module)


def shown_path(path: Path) -> str:
    """The path relative to the working directory when it lies below it, else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


class ModuleLevelImportsContract(Contract):
    """Fails on any import inside a function body unless the module is an allowed optional dependency.

    Configuration options:

        - allowed_lazy: ``"module: reason"`` entries, third-party modules only. (Optional.)
    """

    type_name = "module_level_imports"

    allowed_lazy = fields.ListField(subfield=fields.StringField(), required=False)

    def validate(self) -> None:
        entries = cast(list[str] | None, self.allowed_lazy) or []
        self.allowed = parse_allowed(entries, self.root_packages())

    def root_packages(self) -> list[str]:
        roots = self.session_options.get("root_packages") or [self.session_options["root_package"]]
        return list(roots)

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        found: list[LazyImport] = []
        for package in self.root_packages():
            for path in package_files(package):
                found.extend(lazy_imports(path, shown_path(path)))
        broken = [item for item in found if item.module.startswith(".") or not is_within(item.module, self.allowed)]
        broken.sort(key=lambda item: (item.path, item.line, item.module))
        output.verbose_print(verbose, f"{len(found)} imports inside functions, {len(broken)} not allowed")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print("Imports inside functions (move them to the module's head; only listed optional")
        output.print("dependencies may be imported late):")
        output.new_line()
        for item in check.metadata["broken"]:
            output.print(item.render())
        output.new_line()
