"""Publishing a model written into a staging directory beside its destination (the exporter, the rewrite and the
ONNX Runtime optimization write `<name>.onnx` and its external data there first)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["move_into_place"]


def move_into_place(staging: Path, out_path: Path) -> None:
    """Move every file of `staging` into `out_path`'s directory: the external data first, the file named
    `out_path.name` last, so that a reader that sees the model sees its data too."""
    for f in sorted(staging.iterdir(), key=lambda f: (f.name == out_path.name, f.name)):
        os.replace(f, out_path.parent / f.name)
