"""The package layout is the architecture: stages import only what lies upstream of them."""

import ast
from pathlib import Path

import pytest

import tracer

PACKAGE = Path(tracer.__file__).parent
LOWER = ("inputs", "judging", "store")
"""Stages that work from data alone (files, numbers, sequences)."""
UPPER = ("esm", "capture", "runner", "campaigns")
"""Stages that hold the model or run it."""


def tracer_imports(path: Path) -> set[str]:
    """Every ``tracer.*`` module a file imports, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tracer"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("tracer"))
    return out


@pytest.mark.parametrize("stage", LOWER)
def test_data_stages_never_import_the_model_stages(stage):
    offenders = {}
    for path in sorted((PACKAGE / stage).glob("*.py")):
        bad = sorted(m for m in tracer_imports(path) if any(m == f"tracer.{u}" or m.startswith(f"tracer.{u}.") for u in UPPER))
        if bad:
            offenders[path.name] = bad
    assert not offenders, f"tracer.{stage} must not import {UPPER}: {offenders}"


def test_every_subpackage_says_what_it_is_for():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.splitlines()) == 1, f"{init.parent.name}/__init__.py needs a one-line responsibility"


def test_modules_stay_small():
    # one module per concept: a module past ~500 lines holds more than one
    sizes = {p.relative_to(PACKAGE).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert not {k: v for k, v in sizes.items() if v > 600}, sizes
