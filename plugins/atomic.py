"""Atomic file writes: a temporary sibling, fsync, then a rename, so a reader (or a crash) never sees a half-written
file.

The lowest layer that writes artifacts (the TensorRT engines, `plugins.tensorrt.engine`) owns these; the build
(`engines.artifacts`) builds its text, directory and removal helpers on them. Temporaries are named
`.<name>.<random>.tmp` (files and directories), `.<name>.<random>.old` (a replaced directory waiting for deletion)
or `.<name>.<random>.tmp.<ext>` where a tool needs an extension: `TEMPORARY_NAME` matches exactly those.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

__all__ = ["TEMPORARY_NAME", "fsync_dir", "atomic_write_bytes"]

TEMPORARY_NAME = re.compile(r"^\..+\.(tmp|old)(\.[A-Za-z0-9]+)?$")


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside directory `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling, fsync and a rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
