"""Layers point one way: proxyattn <- export <- plugins <- engines <- build.py (cpp/ beside, outside the check).

Every `import` / `from ... import` in every .py file of the four packages and build.py (module level or inside a
function, read with `ast`, so lazy imports count too) may name only its own layer or one below it. What two
layers share lives in the lower one (the ONNX contract in export/, atomic writes in plugins/, the model tables in
engines/); the algorithm package reaches the exporter only through `proxyattn.hf.set_export_attention`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"proxyattn": 0, "export": 1, "plugins": 2, "engines": 3, "build": 4}
PACKAGES = ("proxyattn", "export", "plugins", "engines")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return files + [ROOT / "build.py"]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file; relative imports stay inside their package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def upward_imports(files, root: Path = ROOT) -> list[str]:
    """`file:line imports module` for every import of a layer above the file's own."""
    bad = []
    for path in files:
        rel = path.relative_to(root)
        own = LAYERS[rel.parts[0].removesuffix(".py")]
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if LAYERS.get(top, -1) > own:
                bad.append(f"{rel}:{line} imports {module} (layer {top} is above {rel.parts[0]})")
    return bad


def test_every_layer_is_scanned():
    files = _sources()
    assert {p.relative_to(ROOT).parts[0] for p in files} == {*PACKAGES, "build.py"}
    assert len(files) > 40  # the packages' modules, not an empty glob


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(_sources()) == []


@pytest.mark.parametrize(
    "source, layer, bad",
    [
        ("from export.contract import emit_proxy_attention\n", "proxyattn/x.py", True),
        ("def f():\n    import engines.models\n", "plugins/tensorrt/x.py", True),
        ("import build\n", "engines/x.py", True),
        ("from proxyattn import hf\nfrom . import contract\n", "export/x.py", False),
        ("from engines.models import MODELS\n", "build.py", False),
        ("import torch\nfrom ..atomic import atomic_write_bytes\n", "plugins/tensorrt/x.py", False),
    ],
)
def test_the_check_finds_upward_imports(tmp_path, source, layer, bad):
    """The checker itself: an upward import (also a lazy one inside a function) is found, downward ones are not."""
    path = tmp_path / layer
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    assert bool(upward_imports([path], root=tmp_path)) == bad
