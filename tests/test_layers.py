"""Imports go one way: the README's code map, checked.

Every module of the package is placed in one row of `LAYERS` (top to bottom, as the README's "Code map"
lists them); a module may import its own row and the rows below it, never a row above. Imports inside
functions count (a lazy import is still a dependency); imports under `if TYPE_CHECKING:` do not (they never
run). A module takes the row of the longest entry naming it or its package; a new top-level module or package
fails `test_every_module_has_a_row` until it is given a row, here and in the README.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evolora

PACKAGE = Path(evolora.__file__).resolve().parent

# Rows of the code map, top to bottom; a module belongs to the row of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("cli",),
    ("deploy",),
    ("api", "export", "export_user"),
    ("deploy.versions",),  # the registry of a deployed run, which api's Recommender reads
    ("experiment", "tracking"),
    ("bundle", "queries", "overrides"),
    (
        "eval.report",
        "eval.runs",
        "eval.plots",
        "eval.bootstrap",
        "eval.matrix_report",
        "eval.costs",
        "eval.metric_tables",
        "eval.summary",
    ),
    ("continual",),
    ("train",),
    ("tasks",),
    ("eval.forgetting", "eval.stored"),
    ("eval.metrics",),
    ("models",),
    ("data",),
    ("config", "io", "locks"),
    ("workers",),
    ("parallel",),
    ("cost",),
    ("allocator",),
    ("progress", "errors"),
]
# The package's own front doors, which import from above by design.
FRONT = {"evolora", "evolora.__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package but namespace-only packages (an `__init__.py` holding no statement but
    a docstring imports nothing and needs no row)."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if not _bare_package(p)}


def _bare_package(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and all(
        isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body
    )


def row_of(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, row)
    for row, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            full = f"evolora.{prefix}"
            if (module == full or module.startswith(full + ".")) and (best is None or len(full) > best[0]):
                best = (len(full), row)
    return None if best is None else best[1]


def _type_checking_only(node: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:`."""
    skipped: set[int] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skipped |= {id(m) for stmt in n.body for m in ast.walk(stmt)}
    return skipped


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package's modules that `path` imports (`from evolora import x` is module evolora.x when x is
    one, else the package itself)."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "evolora"}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "evolora":
                continue
            subs = {f"{node.module}.{a.name}" for a in node.names} & known
            found |= subs or {node.module}
    return found


def test_every_module_has_a_row() -> None:
    unplaced = [m for m in modules() if m not in FRONT and row_of(m) is None]
    assert not unplaced, f"give these modules a row in LAYERS and in the README's code map: {unplaced}"


def test_imports_only_go_down() -> None:
    mods = modules()
    upward = []
    for name, path in mods.items():
        if name in FRONT:
            continue
        for target in imports_of(path, set(mods)):
            if target in FRONT or target == name or target not in mods:
                continue  # not in mods: a namespace-only package, which imports nothing
            if row_of(target) < row_of(name):  # type: ignore[operator]
                upward.append(f"{name} imports {target}")
    assert not upward, "imports up the code map:\n" + "\n".join(sorted(upward))


def test_the_check_sees_lazy_imports_and_skips_type_checking_ones(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "from evolora import cost, errors\n"
        "if TYPE_CHECKING:\n"
        "    from evolora.cli import app\n"
        "def f():\n"
        "    from evolora.experiment import run_experiment\n"
        "    import evolora.data.staging\n"
    )
    known = {"evolora.cost", "evolora.errors", "evolora.experiment", "evolora.data.staging"}
    assert imports_of(source, known) == known
    assert row_of("evolora.deploy.versions") > row_of("evolora.api") > row_of("evolora.deploy.server")  # type: ignore[operator]
