"""The layering of the code (README, Layout) as a test: who may import whom.

Every first-party module's AST is walked, imports inside functions included (a
deferred import still is a dependency; it only hides a cycle until the day someone
moves it). Imports under ``if TYPE_CHECKING:`` are left out: they never run.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package name it is installed as (see pyproject.toml)
PACKAGES = {"cdfkd": "cdfkd", "tune": "cdfkd.tune", "reports": "cdfkd.reports"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> list[tuple[str, bool]]:
    """``(imported module, inside a function)`` for every import that can run."""
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child, in_function)
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, in_function) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, in_function))
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


IMPORTS = {name: _imports(path) for name, path in MODULES.items()}


def _in_core(name: str) -> bool:
    """A module of the folder cdfkd/ (not the tune/ and reports/ layers above it)."""
    return MODULES[name].is_relative_to(ROOT / "cdfkd")


def test_every_module_is_found():
    assert {
        "cdfkd.train",
        "cdfkd.tracking.mlflow_logger",
        "cdfkd.tune.run",
        "cdfkd.reports.build",
    } <= set(MODULES)


def test_no_import_cycle_among_first_party_modules():
    graph = {
        name: sorted({m for m, _ in IMPORTS[name] if m in MODULES and m != name})
        for name in MODULES
    }
    state: dict[str, str] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt) :] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            dfs(name)


def _offenders(rule) -> list[str]:
    return sorted(
        f"{MODULES[name].relative_to(ROOT)} imports {mod}"
        for name, imports in IMPORTS.items()
        for mod, in_function in imports
        if rule(name, mod, in_function)
    )


def _top(mod: str) -> str:
    return mod.split(".")[0]


def test_ray_and_optuna_stay_out_of_the_core():
    assert _offenders(lambda n, m, _: _in_core(n) and _top(m) in ("ray", "optuna")) == []


def test_optuna_only_in_the_sweep_layer_and_the_reports_importances():
    allowed = ("cdfkd.tune", "cdfkd.reports.importance")
    assert _offenders(lambda n, m, _: _top(m) == "optuna" and not n.startswith(allowed)) == []


def test_mlflow_only_in_tracking_and_reports():
    allowed = ("cdfkd.tracking", "cdfkd.reports")
    assert _offenders(lambda n, m, _: _top(m) == "mlflow" and not n.startswith(allowed)) == []


def test_only_cli_handlers_name_the_layers_above_the_core():
    def above(m: str) -> bool:
        return m.startswith(("cdfkd.tune", "cdfkd.reports"))

    in_core_outside_cli = _offenders(
        lambda n, m, _: _in_core(n) and not n.startswith("cdfkd.cli") and above(m)
    )
    assert in_core_outside_cli == []
    # Inside cdfkd/cli/, only inside handlers: `cdfkd --help` never imports Ray.
    assert _offenders(lambda n, m, f: n.startswith("cdfkd.cli") and above(m) and not f) == []


def test_the_layers_above_never_import_the_cli():
    assert _offenders(lambda n, m, _: not _in_core(n) and m.startswith("cdfkd.cli")) == []


def test_the_engine_imports_no_ray_mlflow_or_optuna():
    code = (
        "import sys, cdfkd.train, cdfkd.methods, cdfkd.cli\n"
        "print(sorted(m for m in ('ray', 'mlflow', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
