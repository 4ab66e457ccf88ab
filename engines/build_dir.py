"""What a build directory holds, what of it build.py owns, and `build.py --check`.

A build directory holds `manifest.json` plus one output per stage (`OUTPUTS`: `onnx/`, `parity.json`, `plugins/`,
`engines/`, `ort/`, `model_repository/`). build.py writes only into a directory that is new, empty, or a build of
its own (its manifest.json carries `artifacts.GENERATOR`), and there only these names. Inside them it owns exactly
the files its manifest lists (`Manifest.owned_files`); a file it did not write (say, a model a user added to
`model_repository/`) makes the build stop with a named error instead of being replaced. Temporaries of an
interrupted build (`artifacts.is_temporary`) are its own and are removed by the next build.

    check_out_dir(path)          # ValueError unless build.py may write there (reads only)
    clean_temporaries(path)      # removes an earlier run's temporaries; returns what it removed
    verify_build(path)           # [differences]: what `build.py --check` prints (empty: the build is intact)
"""

from __future__ import annotations

import os
from pathlib import Path

from proxyattn.config import ProxyAttnConfig

from .artifacts import MANIFEST_NAME, Manifest, file_sha256, is_temporary, remove_atomically, tool_versions

__all__ = ["OUTPUTS", "OWNED_NAMES", "check_out_dir", "foreign_files", "temporaries", "clean_temporaries", "verify_build"]

# Stage -> its output, relative to the build directory (a file or a directory, always replaced whole).
OUTPUTS = {
    "export": "onnx",
    "parity": "parity.json",
    "plugin_kernels": "plugins",
    "engines": "engines",
    "ort_models": "ort",
    "repository": "model_repository",
}
OWNED_NAMES = (MANIFEST_NAME, *OUTPUTS.values())
_STATUSES = ("built", "not run")


def _files_under(root: Path, base: Path) -> list[str]:
    """Files (and symlinks) under `root`, relative to `base`, skipping temporaries and what they contain."""
    if root.is_symlink() or root.is_file():
        return [root.relative_to(base).as_posix()]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not is_temporary(d)]
        for name in filenames:
            if not is_temporary(name):
                out.append((Path(dirpath) / name).relative_to(base).as_posix())
    return sorted(out)


def foreign_files(out: Path, owned: set[str]) -> list[str]:
    """Files under the build's own names that are not in `owned` (a manifest's `owned_files()`: someone else wrote
    them)."""
    found = []
    for name in OUTPUTS.values():
        root = out / name
        if root.exists() or root.is_symlink():
            found += [f for f in _files_under(root, out) if f not in owned]
    return found


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def check_out_dir(out: Path) -> None:
    """ValueError unless build.py may write build directory `out`: it is new (its nearest existing parent a writable
    directory), empty, or a build of ours whose outputs hold only files its manifest lists. Reads only."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory; give a new or empty directory, or an earlier build's")
    if out.is_dir():
        manifest = Manifest.read(out)
        if manifest is None and any(out.iterdir()):
            what = "manifest.json is not a ProxyAttn build manifest" if (out / MANIFEST_NAME).exists() else "no manifest.json"
            raise ValueError(
                f"--out {out} is a non-empty directory that build.py did not create ({what}); "
                f"build.py writes only into a new or empty directory or one of its own builds"
            )
        if manifest is not None:
            foreign = foreign_files(out, manifest.owned_files())
            if foreign:
                more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
                raise ValueError(
                    f"--out {out}: {foreign[0]}{more} is not a file of this build (not in its manifest.json); "
                    f"build.py replaces {foreign[0].split('/')[0]} whole and never removes what it did not "
                    f"write: move it out of {out}"
                )
    target = _nearest_existing(out)
    if not target.is_dir():
        raise ValueError(f"--out {out}: {target} is not a directory")
    if not os.access(target, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {target} is not writable by this user")


def temporaries(out: Path) -> list[Path]:
    """An interrupted build's temporaries: `.<own name>.*.tmp|old` beside the outputs, and any temporary inside them."""
    if not out.is_dir():
        return []
    found = [p for p in out.iterdir() if is_temporary(p.name) and any(p.name.startswith(f".{n}.") for n in OWNED_NAMES)]
    for name in OUTPUTS.values():
        root = out / name
        if root.is_dir() and not root.is_symlink():
            for dirpath, dirnames, filenames in os.walk(root):
                for n in dirnames + filenames:
                    if is_temporary(n):
                        found.append(Path(dirpath) / n)
                dirnames[:] = [d for d in dirnames if not is_temporary(d)]
    return sorted(found)


def clean_temporaries(out: Path) -> list[Path]:
    """Remove the temporaries an interrupted build left in its own directory; returns them."""
    found = temporaries(out)
    for p in found:
        remove_atomically(p)
    return found


def _onnx_configs(path: Path) -> list[dict]:
    """The `pa_` attributes of every ProxyAttention node of an exported model."""
    import onnx

    from export.contract import DOMAIN, OP_TYPE

    proto = onnx.load(str(path), load_external_data=False)
    nodes = [n for n in proto.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]
    return [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute if a.name.startswith("pa_")} for n in nodes]


def verify_build(out: Path) -> list[str]:
    """Every difference between build directory `out` and its manifest (empty when the build is intact):
    the last build finished; every stage recorded as built or not run; every listed file present with its
    recorded sha256; no unlisted file or leftover temporary under the build's names; the recorded config valid and
    equal to the exported model's node attributes; the recorded tool versions equal to the installed ones.
    ValueError when `out` is not a build directory at all."""
    if not out.is_dir():
        raise ValueError(f"--check {out}: {'not a directory' if out.exists() else 'no such directory'}; give a build directory")
    manifest = Manifest.read(out)
    if manifest is None:
        raise ValueError(f"--check {out}: not a ProxyAttn build (no build manifest.json there)")
    data, diffs = manifest.data, []
    state = data.get("build", {}).get("state")
    if state != "complete":
        diffs.append(f"build: the last build did not finish (state {state!r}); run build.py again")
    for stage in OUTPUTS:
        rec = manifest.stage(stage)
        if rec is None:
            diffs.append(f"{stage}: no record")
        elif rec.get("status") not in _STATUSES:
            diffs.append(f"{stage}: status {rec.get('status')!r} (expected one of {_STATUSES})")
    for rel, digest in sorted((r, d) for s in OUTPUTS for r, d in manifest.artifact_hashes(s).items()):
        p = out / rel
        if not p.is_file():
            diffs.append(f"{rel}: listed in the manifest but missing")
        elif file_sha256(p) != digest:
            diffs.append(f"{rel}: sha256 differs from the manifest")
    listed = {r for s in OUTPUTS for r in manifest.artifact_hashes(s)}
    diffs += [f"{rel}: not listed in the manifest" for rel in foreign_files(out, listed)]
    diffs += [f"{p.relative_to(out).as_posix()}: temporary left by an interrupted build" for p in temporaries(out)]
    diffs += _config_differences(out, manifest)
    installed = tool_versions()
    for tool, recorded in sorted(data.get("tools", {}).items()):
        if installed.get(tool, recorded) != recorded:
            diffs.append(f"tools: {tool} {recorded} recorded, {installed.get(tool)} installed")
    return diffs


def _config_differences(out: Path, manifest: Manifest) -> list[str]:
    attrs = manifest.data.get("config")
    try:
        config = ProxyAttnConfig.from_attrs(attrs if isinstance(attrs, dict) else {})
    except ValueError as e:
        return [f"config: the recorded config is invalid: {e}"]
    diffs = []
    for stage in ("export", "parity"):
        rec = manifest.stage(stage)
        if rec and rec.get("status") == "built" and rec["inputs"].get("config") != attrs:
            diffs.append(f"{stage}: built with config {rec['inputs'].get('config')}, the manifest records {attrs}")
    onnx_path = out / OUTPUTS["export"] / "model.onnx"
    if onnx_path.is_file():
        want = config.to_attrs()
        for i, node in enumerate(_onnx_configs(onnx_path)):
            try:
                got = ProxyAttnConfig.from_attrs({k: float(f"{v:.7g}") if isinstance(v, float) else v for k, v in node.items()}).to_attrs()
            except ValueError as e:
                diffs.append(f"onnx/model.onnx: ProxyAttention node {i}: {e}")
                continue
            if got != want:
                bad = sorted(k for k in want if got.get(k) != want[k])
                diffs.append(f"onnx/model.onnx: ProxyAttention node {i} differs from the recorded config in {bad}")
                break
    return diffs
