"""The curated public API: every ``__all__`` name imports, package ``__init__``s hold no code,
internals stay private, ``import flaxlab`` gives the subpackages, and the README's and docs'
runnable Python blocks run."""

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flaxlab

ROOT = Path(__file__).resolve().parents[1]
SRC = Path(flaxlab.__file__).parent
PRIVATE = {"leaf_names", "unpack_slots", "validated_eta", "validated_slot_shape", "with_overrides"}


def all_modules():
    names = ["flaxlab"]
    for info in pkgutil.walk_packages([str(SRC)], prefix="flaxlab."):
        names.append(info.name)
    return names


def test_every_public_name_of_every_module_imports():
    checked = 0
    for name in all_modules():
        module = importlib.import_module(name)
        for public in getattr(module, "__all__", ()):
            assert hasattr(module, public), f"{name}.__all__ lists {public!r}, which is missing"
            assert not public.startswith("_") or public == "__version__", (name, public)
            checked += 1
    assert checked > 150


def test_package_inits_list_names_and_hold_no_code():
    for init in SRC.rglob("__init__.py"):
        tree = ast.parse(init.read_text())
        for node in tree.body:
            allowed = isinstance(node, (ast.Import, ast.ImportFrom))
            allowed |= isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            allowed |= isinstance(node, ast.Assign) and all(
                isinstance(t, ast.Name) and t.id in ("__all__", "__version__") for t in node.targets
            )
            assert allowed, f"{init.relative_to(SRC)} line {node.lineno}: {ast.dump(node)[:80]}"


def test_packages_export_their_public_names_and_not_the_internals():
    import flaxlab.models
    import flaxlab.nn
    import flaxlab.optim

    for package in ("flaxlab.nn", "flaxlab.models", "flaxlab.optim", "flaxlab.train"):
        exported = set(importlib.import_module(package).__all__)
        assert not exported & PRIVATE, (package, exported & PRIVATE)
    models = set(flaxlab.models.__all__)
    for name in ("ViT", "Mixer", "VMoE", "VDM", "PerformerLM", "ViTConfig", "VDMConfig"):
        assert name in models
    assert {"amos", "make_optimizer", "scale_by_amos", "OptimizerConfig"} <= set(
        flaxlab.optim.__all__
    )
    assert callable(flaxlab.optim.amos)  # the optimizer function, not the amos package


def test_import_flaxlab_gives_the_subpackages():
    code = (
        "import flaxlab; "
        "print(flaxlab.nn.favor.favor_attention.__name__, flaxlab.models.ViT.__name__, "
        "flaxlab.optim.amos.__name__, flaxlab.train.Estimator.__name__, "
        "flaxlab.data.load_digits.__name__, flaxlab.configs.get_preset.__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == [
        "favor_attention",
        "ViT",
        "amos",
        "Estimator",
        "load_digits",
        "get_preset",
    ], out.stderr[-2000:]


MARKER = "<!-- runnable -->"


def runnable_blocks():
    blocks = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        pattern = re.escape(MARKER) + r"\s*\n```python\n(.*?)\n```"
        for i, match in enumerate(re.finditer(pattern, text, re.S)):
            blocks.append(pytest.param(match.group(1), id=f"{path.name}-{i}"))
    return blocks


def test_docs_mark_runnable_blocks():
    assert len(runnable_blocks()) >= 3


@pytest.mark.parametrize("code", runnable_blocks())
def test_runnable_block(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc block>", "exec"), {"__name__": "__doc_block__"})
