"""The package layout shows the flow and the dependencies point one way (docs/ARCHITECTURE.md)."""
from __future__ import annotations

import ast
from pathlib import Path

FITTING = Path(__file__).resolve().parents[1] / "fitting"
# Stages in flow order: a package may import itself and the packages before it, never after.
ORDER = ["core", "reference", "measure", "describe", "render", "materials", "fit", "output", "validate", "cli"]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``fitting.*`` module a file imports, at any depth (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                raise AssertionError(f"{path}: relative import; the layout uses absolute fitting.* imports")
            out.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
    return out


def _package(path: Path) -> str:
    rel = path.relative_to(FITTING).parts
    return rel[0] if len(rel) > 1 else ""


def test_every_module_lives_in_a_stage_package():
    loose = [p.name for p in FITTING.glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside the stage packages: {loose}"
    assert sorted(p.name for p in FITTING.iterdir() if p.is_dir() and p.name != "__pycache__") == sorted(ORDER)


def test_imports_point_back_along_the_flow():
    bad = []
    for path in FITTING.rglob("*.py"):
        here = _package(path)
        for line, mod in _imports(path):
            parts = mod.split(".")
            if parts[0] != "fitting" or len(parts) < 2:
                continue
            there = parts[1]
            if here and ORDER.index(there) > ORDER.index(here):
                bad.append(f"{path.relative_to(FITTING.parent)}:{line} ({here}) imports {mod} ({there})")
    assert not bad, "imports against the flow:\n" + "\n".join(bad)


def test_the_engine_never_imports_qt():
    qt = [f"{p.relative_to(FITTING.parent)}:{line} {mod}" for p in FITTING.rglob("*.py")
          for line, mod in _imports(p) if mod.split(".")[0] in ("PySide6", "PyQt5", "PyQt6", "app")]
    assert not qt, qt
