"""The import picture of `spo/` (DESIGN 2): arrows point down only.

    cli -> stages -> training / evaluation / digits / standins -> models / diffusion / data -> tracking -> config

A module may import its own layer or a lower one; lazy imports inside functions count too.
"""

import ast
from pathlib import Path

import pytest
from conftest import REPO_ROOT

SPO = REPO_ROOT / "spo"
LAYERS = {
    "spo": 0, "spo.config": 0, "spo.atomic_write": 0,
    "spo.tracking": 1,
    "spo.data": 2, "spo.models": 2, "spo.diffusion": 2,
    "spo.training": 3, "spo.evaluation": 3, "spo.digits": 3, "spo.standins": 3,
    "spo.stages": 4,
    "spo.cli": 5,
}
SUBPACKAGES = ("data", "models", "diffusion", "training", "evaluation", "tracking", "digits", "standins", "stages")


def layer_of(module: str) -> tuple[str, int]:
    """The most specific LAYERS key that `module` falls under."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return key, LAYERS[key]
    raise KeyError(module)


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO_ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def spo_imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return [n for n in names if n == "spo" or n.startswith("spo.")]


SOURCES = sorted(SPO.rglob("*.py"))


def test_every_module_belongs_to_a_layer():
    for path in SOURCES:
        layer_of(module_name(path))
    top_level = sorted(p.name for p in SPO.glob("*.py"))
    assert top_level == ["__init__.py", "asset_paths.py", "atomic_write.py", "cli.py", "config.py"]  # the rest lives in sub-packages
    assert all((SPO / name / "__init__.py").is_file() for name in SUBPACKAGES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_imports_point_down(path):
    here, rank = layer_of(module_name(path))
    upward = []
    for name in spo_imports(path):
        try:
            there, other = layer_of(name)
        except KeyError:
            continue  # `from spo.x import name` also yields spo.x.name, which may be a symbol
        if other > rank:
            upward.append(f"{name} ({there}, layer {other})")
    assert not upward, f"{here} (layer {rank}) imports upward: {upward}"


def test_spo_never_imports_kfp():
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "kfp" or n.startswith("kfp.") for n in names), path
