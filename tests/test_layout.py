"""Package layout rules from the product card."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_preprocessing_never_imports_salad_med():
    offenders = [p.name for p in (ROOT / "preprocessing").rglob("*.py") if "salad_med" in _imported_modules(p)]
    assert offenders == []


def test_product_layout_exists():
    for name in ("salad_med", "preprocessing", "configs", "tests", "data_manifests", "benchmarks",
                 "pyproject.toml", "README.md", ".ci/run"):
        assert (ROOT / name).exists(), name


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "make test" in readme and "make demo" in readme
    assert "make test" in ci
