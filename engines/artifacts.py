"""Atomic writes, content hashes and the build manifest.

Every artifact is written to a temporary sibling path and renamed into place, so a reader (or a crash) never
sees a half-written file or directory (files: `plugins.atomic.atomic_write_bytes`, which the TensorRT engines use
too; text, directories and removals: here). The manifest records, per stage, a hash of the stage's inputs and the hash
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
from typing import Any, Callable, Iterator, Mapping

from plugins.atomic import TEMPORARY_NAME, atomic_write_bytes, fsync_dir

__all__ = [
    "GENERATOR",
    "is_temporary",
    "atomic_write_text",
    "atomic_dir",
    "remove_atomically",
    "file_sha256",
    "tree_hashes",
    "json_hash",
    "tool_versions",
    "Manifest",
    "MANIFEST_NAME",
]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Written into every manifest: a directory whose manifest.json carries it is a build of ours (build.py refuses to
# write anywhere else unless the directory is new or empty).
GENERATOR = "proxyattn build.py"
_TOOLS = (
    "torch",
    "triton",
    "numpy",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "transformers",
    "tensorrt",
    "tritonclient",
    "nvidia-pytriton",
    "protobuf",
)


def is_temporary(name: str) -> bool:
    """True for the name of a temporary file or directory made by the atomic writers (this module's and
    `plugins.atomic`'s: `plugins.atomic.TEMPORARY_NAME`)."""
    return bool(TEMPORARY_NAME.match(name))


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under `root` (before it is renamed into place)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath) / name
            if p.is_symlink():
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON at `path`, written to a temporary sibling and renamed (the benchmarks' result files)."""
    return atomic_write_text(path, json.dumps(data, indent=1))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, before_swap: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a fresh temporary directory next to `path`; on success it replaces `path` whole, on error it is removed.

    The new tree is fsynced, then `before_swap(tmp)` runs (the build records the files it is about to own), then an
    existing `path` is moved aside and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if before_swap is not None:
            before_swap(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "x")
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old is not None:
        shutil.rmtree(old)


def remove_atomically(path: str | os.PathLike) -> None:
    """Remove file or directory `path` (if present): renamed to a temporary first, so an interrupted removal
    leaves a temporary (cleaned by the next build), never a half-deleted artifact."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old / "x")
        fsync_dir(path.parent)
        shutil.rmtree(old)
    elif path.exists() or path.is_symlink():
        path.unlink()
        fsync_dir(path.parent)


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


def _is_build_manifest(data: Any) -> bool:
    """A manifest.json written by build.py: ours by its generator field (or, for builds made before the field existed,
    by the format and the keys every build writes)."""
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("stages"), dict):
        return False
    return data.get("generator") == GENERATOR or {"tools", "model", "config"} <= data.keys()


class Manifest:
    """`<out>/manifest.json`: tools, model, config, profiles, the build's state and one record per stage.

    A stage record is `{"inputs": {...}, "inputs_hash": str, "status": str, "artifacts": {relpath: sha256},
    "info": {...}}`. Paths are relative to the output directory. `pending` lists files a stage is about to put in
    place (recorded before the rename, so that a build killed between the rename and the stage record still knows
    them as its own). `build` is `{"state": "running" | "complete" | "failed" | "interrupted", ...}`.
    """

    def __init__(self, out_dir: str | os.PathLike, data: Mapping[str, Any] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.data: dict[str, Any] = dict(data) if data else {"format": MANIFEST_FORMAT, "stages": {}}
        self.data.setdefault("stages", {})
        self.data["generator"] = GENERATOR

    @property
    def path(self) -> Path:
        return self.out_dir / MANIFEST_NAME

    @staticmethod
    def read(out_dir: str | os.PathLike) -> "Manifest | None":
        """The build manifest in `out_dir`, or None when there is none or manifest.json is not one of ours."""
        path = Path(out_dir) / MANIFEST_NAME
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return Manifest(out_dir, data) if _is_build_manifest(data) else None

    @classmethod
    def load(cls, out_dir: str | os.PathLike) -> "Manifest":
        """The manifest in `out_dir`, or an empty one when there is none or it is not a build manifest of ours."""
        return cls.read(out_dir) or cls(out_dir)

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

    def record(
        self,
        name: str,
        inputs: Mapping[str, Any],
        *,
        status: str,
        artifacts: Mapping[str, str] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
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

    def owned_files(self) -> set[str]:
        """Every path (relative to the output directory) this build wrote: the stages' artifacts and pending files."""
        owned = set(self.data.get("pending", []))
        for rec in self.data["stages"].values():
            owned.update(rec.get("artifacts", {}))
        return owned

    def claim(self, relpaths: Iterator[str] | list[str]) -> None:
        """Record `relpaths` as this build's before they are put in place (saved at once)."""
        self.data["pending"] = sorted(set(self.data.get("pending", [])) | set(relpaths))
        self.save()

    def save(self) -> Path:
        return atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")
