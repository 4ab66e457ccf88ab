"""Ahead-of-time compilation of the plugin kernels to PTX (runs on a CPU machine) and the calling-convention check.

`compile_kernel` compiles one plugin's wrapper kernel for one GPU target with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`; `check_entry` reads the PTX `.entry` parameter list and checks it against
what TensorRT's AOT launcher passes: the plugin's input pointers, its extra int32 scalars and its output pointers,
in that order, followed by exactly two hidden `.u64` pointers that Triton >= 3.5 appends (global scratch, profile
scratch), and both scratch sizes in the kernel metadata 0 (TensorRT allocates no Triton scratch). The same entry
layout is what Triton 3.5.0, the version NVIDIA's quickly_deployable_plugins sample pins since TensorRT 10.16,
emits (checked on this machine against a triton==3.5.0 install; see docs/deploy.md).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import spec as S

__all__ = ["ARCHS", "CompiledKernel", "compile_kernel", "entry_params", "check_entry", "model_shapes", "compile_all", "source_hash"]

ARCHS = (80, 89, 90)
HIDDEN_PARAMS = 2  # Triton's global-scratch and profile-scratch pointers, appended after the kernel's own params


@dataclass(frozen=True)
class CompiledKernel:
    plugin: str
    tactic: int
    arch: int
    name: str
    ptx: str
    num_warps: int
    shared: int
    constants: dict
    signature: dict

    @property
    def block_x(self) -> int:
        return self.num_warps * 32


def compile_kernel(
    plugin: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[str], attrs: dict, tactic: int, arch: int
) -> CompiledKernel:
    """PTX of one plugin kernel for sm_<arch> (B and S in `shapes` may be -1: only static dims are read)."""
    import triton
    from triton.backends.compiler import GPUTarget

    from .kernels import WRAPPERS

    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r} is not supported; allowed: {ARCHS}")
    consts, options = S.constants(plugin, shapes, dtypes, attrs, tactic)
    sig = S.signature(plugin, dtypes, consts)
    fn = WRAPPERS[S.PLUGINS[plugin].kernel]
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError(
            "the plugin kernels were defined under TRITON_INTERPRET=1 (Triton's CPU interpreter); "
            "AOT compilation needs a process without it"
        )
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    check_entry(k.asm["ptx"], sig, metadata=k.metadata)
    return CompiledKernel(plugin, tactic, arch, k.metadata.name, k.asm["ptx"], k.metadata.num_warps, k.metadata.shared, consts, sig)


_ENTRY = re.compile(r"\.visible\s+\.entry\s+([A-Za-z_$][\w$]*)\s*\((.*?)\)", re.S)


def entry_params(ptx: str) -> tuple[str, list[str]]:
    """(kernel name, PTX types of its .entry parameters, e.g. ['.u64', '.u32', ...])."""
    m = _ENTRY.search(ptx)
    if m is None:
        raise ValueError("no .visible .entry in the PTX")
    params = [p.strip() for p in m.group(2).split(",") if p.strip()]
    types = []
    for p in params:
        t = re.match(r"\.param\s+(\.\w+)", p)
        if t is None:
            raise ValueError(f"cannot read PTX parameter {p!r}")
        types.append(t.group(1))
    return m.group(1), types


_PTX_TYPE = {"i32": ".u32"}


def check_entry(ptx: str, signature: dict, *, metadata=None) -> None:
    """ValueError unless the PTX entry is (pointers / i32 scalars in signature order) + 2 hidden .u64 pointers and,
    given the metadata, the kernel needs no global or profile scratch memory."""
    _, types = entry_params(ptx)
    expected = [".u64" if t.startswith("*") else _PTX_TYPE[t] for t in signature.values() if t != "constexpr"]
    expected += [".u64"] * HIDDEN_PARAMS
    if types != expected:
        raise ValueError(f"PTX entry parameters {types} differ from the TensorRT AOT calling convention {expected}")
    if metadata is not None:
        for key in ("global_scratch_size", "profile_scratch_size"):
            size = getattr(metadata, key, 0) or 0
            if size:
                raise ValueError(f"kernel needs {key}={size} bytes; TensorRT's AOT launcher provides no Triton scratch")


def attention_scale(hf_config: dict) -> float:
    if hf_config.get("query_pre_attn_scalar"):
        return float(hf_config["query_pre_attn_scalar"]) ** -0.5
    d = hf_config.get("head_dim") or hf_config["hidden_size"] // hf_config["num_attention_heads"]
    return 1.0 / math.sqrt(d)


def model_shapes(spec, config, precision: str, profiles: Sequence | None = None) -> list[dict[str, Any]]:
    """Every (plugin, static shapes, types, attributes) one full-attention layer of the model needs; B = S = -1.

    `spec` is read for `num_heads`, `num_kv_heads`, `head_dim`, `hf_config` and `profiles` (an
    `engines.models.ModelSpec`); `profiles` (default `spec.profiles`) for each one's `max`."""
    dtype = "float16" if precision == "fp16" else "bfloat16"
    hq, hkv, d, g = spec.num_heads, spec.num_kv_heads, spec.head_dim, config.proxy_heads
    # Only what the kernels read: a change of gamma or budgets does not recompile them.
    attrs = {k: v for k, v in config.to_attrs().items() if k in ("pa_block_size", "pa_stride", "pa_proxy_heads")}
    attrs["scale"] = attention_scale(dict(spec.hf_config))
    q, k = (-1, hq, -1, d), (-1, hkv, -1, d)
    keep = {"pa_keep_sink": int(config.keep_sink), "pa_keep_diagonal": int(config.keep_diagonal)}
    needs_attrs = {"pa_block_size": config.block_size, "pa_recall_rows": config.recall_rows}
    nbx = -1
    entries = [
        {"plugin": "ProxyPool", "shapes": [q], "dtypes": [dtype], "attrs": {"groups": g, "step": config.stride}},
        {"plugin": "ProxyPool", "shapes": [k], "dtypes": [dtype], "attrs": {"groups": g, "step": 1}},
        {"plugin": "ProxyScores", "shapes": [q, (g, -1, d), (g, -1, d)], "dtypes": [dtype, "float16", "float16"], "attrs": attrs},
        {
            "plugin": "ProxySparseAttention",
            "shapes": [q, k, k, (-1, g, nbx, nbx), (-1, hq, nbx)],
            "dtypes": [dtype, dtype, dtype, "int32", "int32"],
            "attrs": attrs,
        },
        # Budget rule 3 (gamma and the minimum budget are extra scalars of ProxyNeedsCut: no recompilation).
        {
            "plugin": "ProxyNeedsMass",
            "shapes": [q, k, (-1, hkv)],
            "dtypes": [dtype, dtype, "int32"],
            "attrs": dict(needs_attrs, scale=attrs["scale"]),
        },
        {
            "plugin": "ProxyNeedsCut",
            "shapes": [q, (-1, -1, -1, -1), (-1, -1, -1), (-1, g, nbx, nbx), (-1, g, nbx), (-1, g, nbx), (-1, hkv)],
            "dtypes": [dtype, "float32", "float32", "int32", "int32", "int32", "int32"],
            "attrs": dict(needs_attrs, **keep),
        },
    ]
    for max_len in sorted({p.max for p in (profiles or spec.profiles)}):
        a = dict(attrs, max_seq_len=max_len)
        entries.append(
            {
                "plugin": "ProxyRank",
                "shapes": [(-1, g, nbx, nbx)],
                "dtypes": ["float32"],
                "attrs": {"pa_block_size": config.block_size, "max_seq_len": max_len, **keep},
            }
        )
        entries.append({"plugin": "ProxyMassStats", "shapes": [q, k], "dtypes": [dtype, dtype], "attrs": a})
        for mass in ("ProxyMass", "ProxyRowMass"):  # budget rules 0/1 and 2: a rule change does not recompile
            entries.append({"plugin": mass, "shapes": [q, k, (-1, config.block_size)], "dtypes": [dtype, dtype, "float32"], "attrs": a})
    return entries


def source_hash() -> str:
    """Hash of the kernel sources the PTX is made from (the wrappers and the project kernels)."""
    import proxyattn.kernels as pk

    h = hashlib.sha256()
    for path in sorted(Path(pk.__file__).parent.glob("*.py")) + [
        Path(__file__).with_name("kernels.py"),
        Path(__file__).with_name("spec.py"),
    ]:
        h.update(path.read_bytes())
    return h.hexdigest()


def compile_all(
    entries: list[dict[str, Any]], out_dir: Path, *, archs: Sequence[int] = ARCHS, progress: Callable | None = None
) -> list[dict[str, Any]]:
    """Compile every entry x tactic x arch into `out_dir` (new or empty; the caller makes it appear atomically):
    `<kernel>.ptx` files and `kernels.json` listing plugin, tactic, arch, kernel name, file, block size, shared memory
    and constants."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"out_dir={str(out_dir)!r} is not empty; the plugin kernels are written into a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(e, t, a) for e in entries for t in S.tactics(e["plugin"]) for a in archs]
    bar = progress(len(jobs), "plugin kernels") if progress else None
    table = []
    for e, tactic, arch in jobs:
        k = compile_kernel(e["plugin"], e["shapes"], e["dtypes"], e["attrs"], tactic, arch)
        key = hashlib.sha256(
            json.dumps([e["plugin"], e["shapes"], e["dtypes"], sorted(e["attrs"].items()), tactic, arch]).encode()
        ).hexdigest()[:12]
        fname = f"{e['plugin']}_t{tactic}_sm{arch}_{key}.ptx"
        (out_dir / fname).write_text(k.ptx)
        table.append(
            {
                "plugin": e["plugin"],
                "tactic": tactic,
                "arch": arch,
                "kernel": k.name,
                "file": fname,
                "block_x": k.block_x,
                "shared_mem": k.shared,
                "dtypes": e["dtypes"],
                "attrs": e["attrs"],
                "constants": {c: v for c, v in k.constants.items()},
            }
        )
        if bar:
            bar.update(1)
    (out_dir / "kernels.json").write_text(json.dumps(table, indent=1, default=str) + "\n")
    if bar:
        bar.close()
    return table
