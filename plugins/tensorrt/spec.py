"""All TensorRT plugin logic as plain functions: attributes, output shapes and types, launch grids, extra kernel
scalars, tactics and the compile-time constants of each kernel. `registration.py` only forwards TensorRT's
arguments to these; the CPU tests call them with ints.

Shape arithmetic goes through an `ops` object (`INT_OPS` here; `registration.TRT_OPS` over `tensorrt.plugin`
shape expressions), so the same function gives concrete shapes in tests and symbolic ones in TensorRT.

Plugins (namespace `proxy`, version "1"), one AOT Triton kernel each; tensors are dense row-major, `[B, H, S, D]`
as in the `proxy::ProxyAttention` contract, Nb = ceil(S / block_size):

| plugin                 | inputs                                  | outputs                                   |
|------------------------|-----------------------------------------|-------------------------------------------|
| ProxyPool              | x `[B, H, S, D]`                        | pooled fp16 `[G, B*S // step + B, D]`     |
| ProxyScores            | query, pooled q, pooled k               | scores fp32 `[B, G, Nb, Nb]`              |
| ProxyMassStats         | query, key                              | row max, row sum fp32 `[B*Hq, NCHUNK, BS]`|
| ProxyMass              | query, key, lse fp32 `[B*Hq, BS]`       | mass fp32 `[B, Hq, Nb]`                   |
| ProxyRowMass           | query, key, lse fp32 `[B*Hq, BS]`       | mass per row fp32 `[B, Hq, BS, Nb]`       |
| ProxySparseAttention   | query, key, value, order, counts (int32)| out `[B, Hq, S, D]`, query's type         |
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = [
    "NAMESPACE",
    "VERSION",
    "PLUGINS",
    "PluginDef",
    "IntOps",
    "INT_OPS",
    "parse_attrs",
    "output_shapes",
    "output_dtypes",
    "launch",
    "extra_args",
    "tactics",
    "constants",
    "mass_chunks",
    "signature",
]

NAMESPACE = "proxy"
VERSION = "1"
FLOAT_TYPES = ("float16", "bfloat16")  # the kernels' operand types (fp32 activations are cast by the graph)
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32"}
_LOG2E = 1.4426950408889634


class IntOps:
    """Shape arithmetic on Python ints (what TensorRT does on shape expressions)."""

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def floordiv(a, b):
        return a // b


INT_OPS = IntOps()


@dataclass(frozen=True)
class PluginDef:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernel: str  # key of plugins.tensorrt.kernels.WRAPPERS
    attrs: tuple[str, ...]  # attributes the plugin reads (INT or FLOAT)


PLUGINS: dict[str, PluginDef] = {
    p.name: p
    for p in (
        PluginDef("ProxyPool", ("x",), ("pooled",), "trt_pool", ("groups", "step")),
        PluginDef("ProxyScores", ("query", "pooled_q", "pooled_k"), ("scores",), "trt_scores",
                  ("pa_proxy_heads", "pa_block_size", "pa_stride", "scale")),
        PluginDef("ProxyMassStats", ("query", "key"), ("row_max", "row_sum"), "trt_mass_stats",
                  ("pa_block_size", "scale", "max_seq_len")),
        PluginDef("ProxyMass", ("query", "key", "lse"), ("mass",), "trt_mass",
                  ("pa_block_size", "scale", "max_seq_len")),
        PluginDef("ProxyRowMass", ("query", "key", "lse"), ("mass",), "trt_mass",
                  ("pa_block_size", "scale", "max_seq_len")),
        PluginDef("ProxySparseAttention", ("query", "key", "value", "order", "counts"), ("output",), "trt_sparse_attention",
                  ("pa_block_size", "scale")),
    )
}

_INT_ATTRS = {"groups", "step", "pa_proxy_heads", "pa_block_size", "pa_stride", "max_seq_len"}
_FLOAT_ATTRS = {"scale"}


def _plugin(name: str) -> PluginDef:
    if name not in PLUGINS:
        raise ValueError(f"unknown plugin {name!r}; known: {sorted(PLUGINS)}")
    return PLUGINS[name]


def _scalar(value: Any):
    """TensorRT hands attributes over as numpy scalars or 1-element arrays; ONNX as Python values."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        if len(value) != 1:
            raise ValueError(f"expected one value, got {value!r}")
        value = value[0]
    return value


def parse_attrs(plugin: str, attrs: Mapping[str, Any]) -> dict[str, int | float]:
    """The typed attributes a plugin reads; ValueError naming a missing or bad one. Others are ignored."""
    p = _plugin(plugin)
    out: dict[str, int | float] = {}
    for key in p.attrs:
        if key not in attrs:
            raise ValueError(f"plugin {plugin}: attribute {key!r} is missing; it needs {list(p.attrs)}")
        v = _scalar(attrs[key])
        if key in _INT_ATTRS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v) or int(v) < 1:
                raise ValueError(f"plugin {plugin}: attribute {key}={v!r} must be a positive integer")
            out[key] = int(v)
        else:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"plugin {plugin}: attribute {key}={v!r} must be a positive finite number")
            out[key] = float(v)
    if "pa_block_size" in out and out["pa_block_size"] not in (64, 128):
        raise ValueError(f"plugin {plugin}: pa_block_size={out['pa_block_size']} is not supported; allowed: (64, 128)")
    if "pa_stride" in out and out["pa_block_size"] % out["pa_stride"]:
        raise ValueError(f"plugin {plugin}: pa_stride={out['pa_stride']} must divide pa_block_size={out['pa_block_size']}")
    return out


def _check_rank(plugin: str, shapes: Sequence[Sequence[Any]]) -> None:
    p = _plugin(plugin)
    if len(shapes) != len(p.inputs):
        raise ValueError(f"plugin {plugin} takes {len(p.inputs)} inputs {p.inputs}, got {len(shapes)}")
    ranks = {"x": 4, "query": 4, "key": 4, "value": 4, "order": 4, "counts": 3, "pooled_q": 3, "pooled_k": 3, "lse": 2}
    for name, shape in zip(p.inputs, shapes):
        if len(shape) != ranks[name]:
            raise ValueError(f"plugin {plugin}: input {name!r} must have rank {ranks[name]}, got {len(shape)}")


def mass_chunks(block_size: int, max_seq_len: int) -> tuple[int, int]:
    """(CB key blocks per chunk, NCHUNK chunks) of the budget estimate for sequences up to max_seq_len: about 16
    chunks, fixed per engine profile so the intermediate statistics have a fixed size."""
    nb_max = -(-max_seq_len // block_size)
    cb = -(-nb_max // 16)
    return cb, -(-nb_max // cb)


def output_shapes(plugin: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any], ops=INT_OPS) -> list[tuple]:
    """Output shapes from input shapes (ints, or TensorRT shape expressions with `ops`)."""
    _check_rank(plugin, shapes)
    a = parse_attrs(plugin, attrs)
    if plugin == "ProxyPool":
        b, _, s, d = shapes[0]
        return [(a["groups"], ops.floordiv(b * s, a["step"]) + b, d)]
    b, hq, s, d = shapes[0]
    bs = a["pa_block_size"]
    nb = ops.cdiv(s, bs)
    if plugin == "ProxyScores":
        return [(b, a["pa_proxy_heads"], nb, nb)]
    if plugin == "ProxyMassStats":
        _, nchunk = mass_chunks(bs, a["max_seq_len"])
        return [(b * hq, nchunk, bs), (b * hq, nchunk, bs)]
    if plugin == "ProxyMass":
        return [(b, hq, nb)]
    if plugin == "ProxyRowMass":
        return [(b, hq, bs, nb)]
    return [tuple(shapes[0])]  # ProxySparseAttention


def output_dtypes(plugin: str, dtypes: Sequence[str]) -> list[str]:
    """Output element types (numpy names) from input types; ValueError for a combination the kernels lack."""
    p = _plugin(plugin)
    if len(dtypes) != len(p.inputs):
        raise ValueError(f"plugin {plugin} takes {len(p.inputs)} inputs, got {len(dtypes)} types")
    first = dtypes[0]
    if first not in FLOAT_TYPES:
        raise ValueError(f"plugin {plugin}: input {p.inputs[0]!r} has type {first}; allowed: {FLOAT_TYPES}")
    expected = {
        "ProxyPool": [first],
        "ProxyScores": [first, "float16", "float16"],
        "ProxyMassStats": [first, first],
        "ProxyMass": [first, first, "float32"],
        "ProxyRowMass": [first, first, "float32"],
        "ProxySparseAttention": [first, first, first, "int32", "int32"],
    }[plugin]
    if list(dtypes) != expected:
        raise ValueError(f"plugin {plugin}: input types {list(dtypes)} are not supported; expected {expected}")
    return {
        "ProxyPool": ["float16"],
        "ProxyScores": ["float32"],
        "ProxyMassStats": ["float32", "float32"],
        "ProxyMass": ["float32"],
        "ProxyRowMass": ["float32"],
        "ProxySparseAttention": [first],
    }[plugin]


# Tactic -> kernel options. Tactic ids are TensorRT custom tactics (positive ints).
_TACTICS: dict[str, dict[int, dict[str, int]]] = {
    "ProxyPool": {1: {"num_warps": 4, "num_stages": 2}},
    "ProxyScores": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyMassStats": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyMass": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyRowMass": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxySparseAttention": {1: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}, 2: {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2}},
}


def tactics(plugin: str, head_dim: int | None = None) -> list[int]:
    """Tactics TensorRT may time for the plugin."""
    _plugin(plugin)
    return sorted(_TACTICS[plugin])


def _tactic(plugin: str, tactic: int) -> dict[str, int]:
    table = _TACTICS[plugin]
    if tactic not in table:
        raise ValueError(f"plugin {plugin}: tactic {tactic} unknown; known: {sorted(table)}")
    return table[tactic]


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def constants(plugin: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[str], attrs: Mapping[str, Any],
              tactic: int) -> tuple[dict[str, Any], dict[str, int]]:
    """(constexpr values, compile options num_warps / num_stages) of the plugin's kernel.

    Needs only the static dims (heads, head dim); B and S may be anything (-1).
    """
    _check_rank(plugin, shapes)
    a = parse_attrs(plugin, attrs)
    opt = dict(_tactic(plugin, tactic))
    block_n = opt.pop("BLOCK_N", None)
    if plugin == "ProxyPool":
        _, h, _, d = shapes[0]
        if h % a["groups"]:
            raise ValueError(f"ProxyPool: groups={a['groups']} must divide the {h} heads")
        bd = _pow2(d)
        return {"H": h, "G": a["groups"], "STEP": a["step"], "D": d, "BLOCK_D": bd, "BLOCK_T": max(1, min(64, 8192 // bd))}, opt
    _, hq, _, d = shapes[0]
    bs = a["pa_block_size"]
    qk = a["scale"] * _LOG2E
    if plugin == "ProxyScores":
        rpb = bs // a["pa_stride"]
        return {"G": a["pa_proxy_heads"], "STRIDE": a["pa_stride"], "BS": bs, "QB": max(1, 64 // rpb), "D": d,
                "BLOCK_D": _pow2(d), "QK_SCALE": qk}, opt
    hkv = shapes[1][1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{plugin}: query heads {hq} must be a multiple of key heads {hkv}")
    if plugin in ("ProxyMassStats", "ProxyMass", "ProxyRowMass"):
        cb, nchunk = mass_chunks(bs, a["max_seq_len"])
        prec = "ieee" if dtypes[0] == "float32" else "tf32"
        out = {"HQ": hq, "HKV": hkv, "D": d, "BS": bs, "CB": cb, "NCHUNK": nchunk, "BLOCK_D": _pow2(d),
               "DOT_PREC": prec, "QK_SCALE": qk}
        if plugin != "ProxyMassStats":
            out["ROWS"] = plugin == "ProxyRowMass"  # one wrapper, trt_mass, for both mass plugins
        return out, opt
    r = shapes[3][1]
    if hq % r:
        raise ValueError(f"ProxySparseAttention: ranking rows R={r} must divide the {hq} query heads")
    if bs % block_n:
        block_n = bs
    if d not in (64, 128, 256):
        raise ValueError(f"ProxySparseAttention: head dim {d} is not supported; allowed: (64, 128, 256)")
    return {"HQ": hq, "HKV": hkv, "R": r, "D": d, "BS": bs, "BLOCK_N": block_n, "QK_SCALE": qk}, opt


def extra_args(plugin: str, shapes: Sequence[Sequence[Any]]) -> list[Any]:
    """The int32 scalars passed between the input and output pointers (TensorRT: symbolic in the input dims)."""
    b, s = shapes[0][0], shapes[0][2]
    if plugin in ("ProxyPool", "ProxyScores"):
        return [s, b]
    _plugin(plugin)
    return [s]


def launch(plugin: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any], consts: Mapping[str, Any], ops=INT_OPS) -> tuple:
    """Grid (x, y, z) of the kernel launch."""
    b, h, s, _ = shapes[0]
    if plugin == "ProxyPool":
        return (ops.cdiv(ops.cdiv(s, consts["STEP"]), consts["BLOCK_T"]), b, consts["G"])
    nb = ops.cdiv(s, consts["BS"])
    if plugin == "ProxyScores":
        return (ops.cdiv(nb, consts["QB"]), b * consts["G"], 1)
    if plugin in ("ProxyMassStats", "ProxyMass", "ProxyRowMass"):
        return (b * h, consts["NCHUNK"], 1)
    if plugin == "ProxySparseAttention":
        return (nb * b * h, 1, 1)
    raise ValueError(f"unknown plugin {plugin!r}; known: {sorted(PLUGINS)}")


def signature(plugin: str, dtypes: Sequence[str], consts: Mapping[str, Any]) -> dict[str, str]:
    """Triton signature of the wrapper kernel: pointer types of inputs, i32 scalars, outputs, then constexprs."""
    from .kernels import WRAPPERS

    fn = WRAPPERS[_plugin(plugin).kernel]
    outs = output_dtypes(plugin, dtypes)
    ptr = iter([f"*{_TRITON_TYPES[t]}" for t in list(dtypes) + outs])
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = next(ptr)
        else:
            sig[name] = "i32"
    return sig
