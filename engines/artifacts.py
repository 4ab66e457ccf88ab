"""Atomic writes, content hashes and the build manifest.

Every artifact is written to a temporary sibling path and renamed into place, so a reader (or a crash) never
sees a half-written file or directory. The manifest records, per stage, a hash of the stage's inputs and the hash
of every file it wrote; `Manifest.up_to_date(stage, inputs)` is True only when the inputs hash is unchanged and
every recorded artifact is still on disk with the recorded hash, which is how `build.py` skips unchanged stages.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_dir",
    "file_sha256",
    "tree_hashes",
    "json_hash",
    "tool_versions",
    "Manifest",
    "MANIFEST_NAME",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
_TOOLS = ("torch", "triton", "numpy", "onnx", "onnxruntime", "onnxscript", "transformers", "tensorrt", "tritonclient", "nvidia-pytriton", "protobuf")


def _tmp_sibling(path: Path, suffix: str = "") -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` through a temporary sibling and a rename; returns the path."""
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
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` whole, on error it is removed.

    An existing `path` is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "x")
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def tree_hashes(root: str | os.PathLike, base: str | os.PathLike) -> dict[str, str]:
    """sha256 of every file under `root` (or of `root` itself if it is a file), keyed by path relative to `base`."""
    root, base = Path(root), Path(base)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(base).as_posix(): file_sha256(p) for p in files}


def json_hash(value: Any) -> str:
    """sha256 of a canonical JSON encoding (sorted keys)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def tool_versions() -> dict[str, str | None]:
    """Installed versions of the tools a build depends on (None where absent)."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _TOOLS:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class Manifest:
    """`<out>/manifest.json`: tools, model, config, profiles and one record per stage.

    A stage record is `{"inputs": {...}, "inputs_hash": str, "status": str, "artifacts": {relpath: sha256},
    "info": {...}}`. Paths are relative to the output directory.
    """

    def __init__(self, out_dir: str | os.PathLike, data: Mapping[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.data: dict[str, Any] = dict(data) if data else {"format": MANIFEST_FORMAT, "stages": {}}
        self.data.setdefault("stages", {})

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "Manifest":
        """The manifest in `out_dir`, or an empty one when there is none or it is from another format."""
        path = Path(out_dir) / MANIFEST_NAME
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                data = None
            if isinstance(data, dict) and data.get("format") == MANIFEST_FORMAT:
                return cls(out_dir, data)
        return cls(out_dir)

    def stage(self, name: str) -> dict[str, Any] | None:
        return self.data["stages"].get(name)

    def up_to_date(self, name: str, inputs: Mapping[str, Any]) -> bool:
        """True when stage `name` last ran with these inputs and all its artifacts are intact."""
        rec = self.stage(name)
        if not rec or rec.get("status") != "built" or rec.get("inputs_hash") != json_hash(inputs):
            return False
        for rel, digest in rec.get("artifacts", {}).items():
            p = self.out_dir / rel
            if not p.is_file() or file_sha256(p) != digest:
                return False
        return True

    def record(self, name: str, inputs: Mapping[str, Any], *, status: str, artifacts: Mapping[str, str] | None = None, info: Mapping[str, Any] | None = None) -> None:
        self.data["stages"][name] = {
            "inputs": json.loads(json.dumps(inputs, default=str)),
            "inputs_hash": json_hash(inputs),
            "status": status,
            "artifacts": dict(artifacts or {}),
            "info": json.loads(json.dumps(info or {}, default=str)),
        }

    def artifact_hashes(self, name: str) -> dict[str, str]:
        rec = self.stage(name)
        return dict(rec.get("artifacts", {})) if rec else {}

    def save(self) -> Path:
        return atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
