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


def _python_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def test_no_method_name_comparisons_outside_methods():
    """Callers ask the method registry; only salad_med/methods/ knows method names (issue 12)."""
    from salad_med.methods.registry import available_methods

    names = set(available_methods())
    offenders = []
    for path in _python_files("salad_med"):
        if "methods" in path.relative_to(ROOT / "salad_med").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                if any(isinstance(v, str) and v in names for v in consts):
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert offenders == []


def test_trainer_does_not_depend_on_inference():
    imported = _imported_names(ROOT / "salad_med" / "engine" / "trainer.py")
    assert not any(n.startswith("salad_med.evaluation.inference") for n in imported)


def _imported_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_one_eq4_and_one_topk_implementation():
    """Eq. 4 is computed in one function and top-k search in one class: nobody else calls arccos on
    similarities or builds a faiss index."""
    offenders = []
    for path in [*_python_files("salad_med"), *_python_files("preprocessing")]:
        text = path.read_text(encoding="utf-8")
        rel = str(path.relative_to(ROOT))
        if rel == "salad_med/scoring/knn.py":
            continue
        if "IndexFlatIP" in text or "torch.acos" in text or "np.arccos" in text:
            offenders.append(rel)
    assert offenders == []


def test_no_private_names_imported_across_modules():
    offenders = []
    for path in [*_python_files("salad_med"), *_python_files("preprocessing")]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    node.module.split(".")[0] in ("salad_med", "preprocessing"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}.{private}")
    assert offenders == []
