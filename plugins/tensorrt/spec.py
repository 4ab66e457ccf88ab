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
| ProxyRank              | scores fp32 `[B, G, Nb, Nb]`            | order, rank int32 `[B, G, Nb, Nb]`; sink_rank, diag_rank `[B, G, Nb]` |
| ProxyNeedsMass         | query, key, skip int32 `[B, Hkv]`       | mass fp32 `[B*Hkv, Nb, Nb, RB]`, lse fp32 `[B*Hkv, Nb, RB]` |
| ProxyNeedsCut          | query, mass, lse, order, sink_rank, diag_rank, skip | need, counts int32 `[B, Hq, Nb]` |
| ProxySparseAttention   | query, key, value, order, counts (int32)| out `[B, Hq, S, D]`, query's type         |

ProxyRank is `proxyattn.kernels.estimate_rank._rank_kernel` (the plan's rankings for every budget rule; rows up to
`MAX_RANK_BLOCKS` key blocks); ProxyNeedsMass and ProxyNeedsCut are `estimate_needs._mass_kernel` and `_cut_kernel`
(budget rule 3, "block_recall"), launched over every query block at once (one chunk: the mass scratch is
B * Hkv * Nb^2 * RB float32, RB = next power of two of (Hq / Hkv) * recall_rows). `skip` marks the KV groups the
dense fallback decided dense before any score (not measured, every causal block kept).
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
    "needs_rows",
    "MAX_RANK_BLOCKS",
]

NAMESPACE = "proxy"
VERSION = "1"
FLOAT_TYPES = ("float16", "bfloat16")  # the kernels' operand types (fp32 activations are cast by the graph)
_TRITON_TYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "int32": "i32"}
_LOG2E = 1.4426950408889634
# ProxyRank sorts a row of key blocks in registers (estimate_rank.MAX_SORT_BLOCKS): the profile's Nb must fit.
MAX_RANK_BLOCKS = 4096
# Ranking positions per step of ProxyNeedsCut (estimate_needs._CUT_CHUNK).
_CUT_CHUNK = 128
# Shared memory ProxyNeedsMass' pipelined K tiles may use (estimate_common._SMEM_BUDGET).
_NEEDS_SMEM_BUDGET = 220 * 1024


def mass_stages(qb: int, rb: int, block_d: int, block_size: int, elt: int = 2) -> int:
    """`estimate_needs.mass_stages`: 2 pipeline stages when the query rows and two K tiles fit, else 1."""
    return 2 if (qb * rb + 2 * block_size) * block_d * elt <= _NEEDS_SMEM_BUDGET else 1


def mass_warps(qb: int, rb: int, block_d: int) -> int:
    """`estimate_needs.mass_warps`: 8 warps from QB x RB x BLOCK_D >= 128 x 128, else 4."""
    return 8 if qb * rb * block_d >= 128 * 128 else 4


class IntOps:
    """Shape arithmetic on Python ints (what TensorRT does on shape expressions)."""

    @staticmethod
    def cdiv(a, b):
        return -(-a // b)

    @staticmethod
    def floordiv(a, b):
        return a // b

    @staticmethod
    def static(a):
        """The value of a build-time dimension (TensorRT: a constant shape expression)."""
        return a


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
        PluginDef(
            "ProxyScores",
            ("query", "pooled_q", "pooled_k"),
            ("scores",),
            "trt_scores",
            ("pa_proxy_heads", "pa_block_size", "pa_stride", "scale"),
        ),
        PluginDef("ProxyMassStats", ("query", "key"), ("row_max", "row_sum"), "trt_mass_stats", ("pa_block_size", "scale", "max_seq_len")),
        PluginDef("ProxyMass", ("query", "key", "lse"), ("mass",), "trt_mass", ("pa_block_size", "scale", "max_seq_len")),
        PluginDef("ProxyRowMass", ("query", "key", "lse"), ("mass",), "trt_mass", ("pa_block_size", "scale", "max_seq_len")),
        PluginDef(
            "ProxyRank",
            ("scores",),
            ("order", "rank", "sink_rank", "diag_rank"),
            "trt_rank",
            ("pa_block_size", "pa_keep_sink", "pa_keep_diagonal", "max_seq_len"),
        ),
        PluginDef(
            "ProxyNeedsMass", ("query", "key", "skip"), ("mass", "lse"), "trt_needs_mass", ("pa_block_size", "pa_recall_rows", "scale")
        ),
        PluginDef(
            "ProxyNeedsCut",
            ("query", "mass", "lse", "order", "sink_rank", "diag_rank", "skip"),
            ("need", "counts"),
            "trt_needs_cut",
            ("pa_block_size", "pa_recall_rows", "pa_gamma", "pa_min_budget_tokens", "pa_keep_sink", "pa_keep_diagonal"),
        ),
        PluginDef(
            "ProxySparseAttention",
            ("query", "key", "value", "order", "counts"),
            ("output",),
            "trt_sparse_attention",
            ("pa_block_size", "scale"),
        ),
    )
}

# Attributes that reach a kernel as extra int32 scalars, not as compile-time constants (`extra_args`): the kernel's
# PTX does not depend on them, so `constants` (compilation) does not need them.
RUNTIME_ATTRS = {"ProxyNeedsCut": {"pa_gamma": 1.0, "pa_min_budget_tokens": 0}}

_INT_ATTRS = {"groups", "step", "pa_proxy_heads", "pa_block_size", "pa_stride", "max_seq_len", "pa_recall_rows"}
_NONNEG_INT_ATTRS = {"pa_min_budget_tokens"}
_BOOL_ATTRS = {"pa_keep_sink", "pa_keep_diagonal"}
_FLOAT_ATTRS = {"scale", "pa_gamma"}


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
        if key in _BOOL_ATTRS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v not in (0, 1):
                raise ValueError(f"plugin {plugin}: attribute {key}={v!r} must be 0 or 1")
            out[key] = int(v)
        elif key in _NONNEG_INT_ATTRS:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or float(v) != int(v) or int(v) < 0:
                raise ValueError(f"plugin {plugin}: attribute {key}={v!r} must be an integer >= 0")
            out[key] = int(v)
        elif key in _INT_ATTRS:
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
    if "pa_recall_rows" in out:
        rows, bs = out["pa_recall_rows"], out["pa_block_size"]
        if rows & (rows - 1) or bs % rows:
            raise ValueError(f"plugin {plugin}: pa_recall_rows={rows} must be a power of two dividing pa_block_size={bs}")
    if "pa_gamma" in out and out["pa_gamma"] > 1.0:
        raise ValueError(f"plugin {plugin}: pa_gamma={out['pa_gamma']} must lie in (0, 1]")
    if plugin == "ProxyRank":
        nb_max = -(-out["max_seq_len"] // out["pa_block_size"])
        if nb_max > MAX_RANK_BLOCKS:
            raise ValueError(
                f"plugin {plugin}: max_seq_len={out['max_seq_len']} gives {nb_max} key blocks; the ranking "
                f"kernel sorts at most {MAX_RANK_BLOCKS} (max_seq_len <= {MAX_RANK_BLOCKS * out['pa_block_size']})"
            )
    return out


def _check_rank(plugin: str, shapes: Sequence[Sequence[Any]]) -> None:
    p = _plugin(plugin)
    if len(shapes) != len(p.inputs):
        raise ValueError(f"plugin {plugin} takes {len(p.inputs)} inputs {p.inputs}, got {len(shapes)}")
    ranks = {
        "x": 4,
        "query": 4,
        "key": 4,
        "value": 4,
        "order": 4,
        "counts": 3,
        "pooled_q": 3,
        "pooled_k": 3,
        "lse": 2,
        "scores": 4,
        "skip": 2,
        "mass": 4,
        "sink_rank": 3,
        "diag_rank": 3,
    }
    if plugin == "ProxyNeedsCut":
        ranks = dict(ranks, lse=3)
    for name, shape in zip(p.inputs, shapes):
        if len(shape) != ranks[name]:
            raise ValueError(f"plugin {plugin}: input {name!r} must have rank {ranks[name]}, got {len(shape)}")


def mass_chunks(block_size: int, max_seq_len: int) -> tuple[int, int]:
    """(CB key blocks per chunk, NCHUNK chunks) of the budget estimate for sequences up to max_seq_len: about 16
    chunks, fixed per engine profile so the intermediate statistics have a fixed size."""
    nb_max = -(-max_seq_len // block_size)
    cb = -(-nb_max // 16)
    return cb, -(-nb_max // cb)


def needs_rows(group: int, recall_rows: int) -> int:
    """RB of budget rule 3's kernels: the measured rows of one KV group's heads, (Hq / Hkv) * recall_rows, padded to a
    power of two (`estimate_needs._launch_needs`)."""
    return _pow2(group * recall_rows)


def output_shapes(plugin: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any], ops=INT_OPS) -> list[tuple]:
    """Output shapes from input shapes (ints, or TensorRT shape expressions with `ops`).

    ProxyNeedsMass needs the static head counts (RB depends on Hq / Hkv); B and S may be expressions."""
    _check_rank(plugin, shapes)
    a = parse_attrs(plugin, attrs)
    if plugin == "ProxyPool":
        b, _, s, d = shapes[0]
        return [(a["groups"], ops.floordiv(b * s, a["step"]) + b, d)]
    if plugin == "ProxyRank":
        b, g, nb, _ = shapes[0]
        return [(b, g, nb, nb), (b, g, nb, nb), (b, g, nb), (b, g, nb)]
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
    if plugin == "ProxyNeedsMass":
        hkv = shapes[1][1]
        rb = needs_rows(
            _static_int(plugin, "query heads", ops.static(hq)) // _static_int(plugin, "key heads", ops.static(hkv)), a["pa_recall_rows"]
        )
        return [(b * hkv, nb, nb, rb), (b * hkv, nb, rb)]
    if plugin == "ProxyNeedsCut":
        return [(b, hq, nb), (b, hq, nb)]
    return [tuple(shapes[0])]  # ProxySparseAttention


def _static_int(plugin: str, what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"plugin {plugin}: {what}={value!r} must be a static positive int (build-time dimension)")
    return value


def output_dtypes(plugin: str, dtypes: Sequence[str]) -> list[str]:
    """Output element types (numpy names) from input types; ValueError for a combination the kernels lack."""
    p = _plugin(plugin)
    if len(dtypes) != len(p.inputs):
        raise ValueError(f"plugin {plugin} takes {len(p.inputs)} inputs, got {len(dtypes)} types")
    first = dtypes[0]
    if plugin == "ProxyRank":
        if list(dtypes) != ["float32"]:
            raise ValueError(f"plugin {plugin}: input types {list(dtypes)} are not supported; expected ['float32']")
        return ["int32"] * 4
    if first not in FLOAT_TYPES:
        raise ValueError(f"plugin {plugin}: input {p.inputs[0]!r} has type {first}; allowed: {FLOAT_TYPES}")
    expected = {
        "ProxyPool": [first],
        "ProxyScores": [first, "float16", "float16"],
        "ProxyMassStats": [first, first],
        "ProxyMass": [first, first, "float32"],
        "ProxyRowMass": [first, first, "float32"],
        "ProxyNeedsMass": [first, first, "int32"],
        "ProxyNeedsCut": [first, "float32", "float32", "int32", "int32", "int32", "int32"],
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
        "ProxyNeedsMass": ["float32", "float32"],
        "ProxyNeedsCut": ["int32", "int32"],
        "ProxySparseAttention": [first],
    }[plugin]


# Tactic -> kernel options. Tactic ids are TensorRT custom tactics (positive ints).
_TACTICS: dict[str, dict[int, dict[str, int]]] = {
    "ProxyPool": {1: {"num_warps": 4, "num_stages": 2}},
    "ProxyScores": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyMassStats": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyMass": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyRowMass": {1: {"num_warps": 4, "num_stages": 2}, 2: {"num_warps": 8, "num_stages": 2}},
    "ProxyRank": {1: {}},  # num_warps from the row length, as estimate_rank._launch_rank
    "ProxyNeedsMass": {1: {}},  # estimate_needs._launch_needs' defaults (mass_warps, mass_stages)
    "ProxyNeedsCut": {1: {"num_warps": 4, "num_stages": 2}},
    # Tactic 1 is attention.FOUR_WARPS (the Python path's fixed config of head dim 128 / block 128 with TMA loads; the
    # plugin loads through pointers), tactic 3 the register-capped config (attention.REGISTER_CAPPED, libproxyattn's),
    # whose register cap applies only up to head dim 128, as in attention._prune.
    "ProxySparseAttention": {
        1: {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
        2: {"BLOCK_N": 128, "num_warps": 8, "num_stages": 2},
        3: {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2, "maxnreg": 128},
    },
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


def constants(
    plugin: str, shapes: Sequence[Sequence[int]], dtypes: Sequence[str], attrs: Mapping[str, Any], tactic: int
) -> tuple[dict[str, Any], dict[str, int]]:
    """(constexpr values, compile options num_warps / num_stages) of the plugin's kernel.

    Needs only the static dims (heads, head dim); B and S may be anything (-1); attributes of `RUNTIME_ATTRS` may be
    left out.
    """
    _check_rank(plugin, shapes)
    a = parse_attrs(plugin, {**RUNTIME_ATTRS.get(plugin, {}), **attrs})
    opt = dict(_tactic(plugin, tactic))
    block_n = opt.pop("BLOCK_N", None)
    if plugin == "ProxyPool":
        _, h, _, d = shapes[0]
        if h % a["groups"]:
            raise ValueError(f"ProxyPool: groups={a['groups']} must divide the {h} heads")
        bd = _pow2(d)
        return {"H": h, "G": a["groups"], "STEP": a["step"], "D": d, "BLOCK_D": bd, "BLOCK_T": max(1, min(64, 8192 // bd))}, opt
    if plugin == "ProxyRank":
        block = max(16, _pow2(-(-a["max_seq_len"] // a["pa_block_size"])))
        opt = {"num_warps": 4 if block <= 1024 else 8, "num_stages": 2}
        return {"KEEP_SINK": bool(a["pa_keep_sink"]), "KEEP_DIAG": bool(a["pa_keep_diagonal"]), "BLOCK": block}, opt
    _, hq, _, d = shapes[0]
    bs = a["pa_block_size"]
    if plugin == "ProxyNeedsCut":
        hkv, r = shapes[6][1], shapes[3][1]
        if hkv < 1 or hq % hkv or r < 1 or hkv % r:
            raise ValueError(f"{plugin}: query heads {hq}, key heads {hkv} and rankings {r} must nest (R | Hkv | Hq)")
        group, rows = hq // hkv, a["pa_recall_rows"]
        return {
            "HQ": hq,
            "HKV": hkv,
            "R": r,
            "GROUP": group,
            "ROWS": rows,
            "RB": needs_rows(group, rows),
            "BS": bs,
            "CH": _CUT_CHUNK,
            "KEEP_SINK": bool(a["pa_keep_sink"]),
            "KEEP_DIAG": bool(a["pa_keep_diagonal"]),
        }, opt
    qk = a["scale"] * _LOG2E
    if plugin == "ProxyNeedsMass":
        hkv = shapes[1][1]
        if hkv < 1 or hq % hkv or shapes[2][1] != hkv:
            raise ValueError(f"{plugin}: query heads {hq} must be a multiple of key heads {hkv}, skip [B, {hkv}]")
        group, rows = hq // hkv, a["pa_recall_rows"]
        rb = needs_rows(group, rows)
        prec = "ieee" if dtypes[0] == "float32" else "tf32"
        qb = max(8, -(-16 // rb))
        opt["num_warps"] = mass_warps(qb, rb, _pow2(d))
        opt["num_stages"] = mass_stages(qb, rb, _pow2(d), bs, 4 if dtypes[0] == "float32" else 2)
        return {
            "HQ": hq,
            "HKV": hkv,
            "GROUP": group,
            "ROWS": rows,
            "RB": rb,
            "QB": qb,
            "BS": bs,
            "D": d,
            "BLOCK_D": _pow2(d),
            "DOT_PREC": prec,
            "QK_SCALE": qk,
        }, opt
    if plugin == "ProxyScores":
        rpb = bs // a["pa_stride"]
        return {
            "G": a["pa_proxy_heads"],
            "STRIDE": a["pa_stride"],
            "BS": bs,
            "QB": max(1, 64 // rpb),
            "D": d,
            "BLOCK_D": _pow2(d),
            "QK_SCALE": qk,
        }, opt
    hkv = shapes[1][1]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"{plugin}: query heads {hq} must be a multiple of key heads {hkv}")
    if plugin in ("ProxyMassStats", "ProxyMass", "ProxyRowMass"):
        cb, nchunk = mass_chunks(bs, a["max_seq_len"])
        prec = "ieee" if dtypes[0] == "float32" else "tf32"
        out = {"HQ": hq, "HKV": hkv, "D": d, "BS": bs, "CB": cb, "NCHUNK": nchunk, "BLOCK_D": _pow2(d), "DOT_PREC": prec, "QK_SCALE": qk}
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
    if d > 128:
        opt.pop("maxnreg", None)
    return {"HQ": hq, "HKV": hkv, "R": r, "D": d, "BS": bs, "BLOCK_N": block_n, "QK_SCALE": qk}, opt


def float_bits(x: float) -> int:
    """The float32 bit pattern of x as a signed int32 (how ProxyNeedsCut receives gamma: AOT scalars are int32)."""
    import struct

    return struct.unpack("<i", struct.pack("<f", float(x)))[0]


def extra_args(plugin: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any] | None = None) -> list[Any]:
    """The int32 scalars passed between the input and output pointers (TensorRT: symbolic in the input dims).

    ProxyRank: [Nb] (from the scores); ProxyNeedsCut: [S, float32 bits of gamma, min_budget_blocks] (so that a new
    gamma or minimum budget does not recompile the kernel; needs `attrs`); the others [S] or [S, B]."""
    p = _plugin(plugin)
    if plugin == "ProxyRank":
        return [shapes[0][2]]
    b, s = shapes[0][0], shapes[0][2]
    if plugin in ("ProxyPool", "ProxyScores"):
        return [s, b]
    if plugin == "ProxyNeedsCut":
        if attrs is None:
            raise ValueError(f"plugin {plugin}: extra_args needs the attributes {list(p.attrs)}")
        a = parse_attrs(plugin, attrs)
        return [s, float_bits(a["pa_gamma"]), -(-a["pa_min_budget_tokens"] // a["pa_block_size"])]
    return [s]


def launch(plugin: str, shapes: Sequence[Sequence[Any]], attrs: Mapping[str, Any], consts: Mapping[str, Any], ops=INT_OPS) -> tuple:
    """Grid (x, y, z) of the kernel launch."""
    b, h, s, _ = shapes[0]
    if plugin == "ProxyPool":
        return (ops.cdiv(ops.cdiv(s, consts["STEP"]), consts["BLOCK_T"]), b, consts["G"])
    if plugin == "ProxyRank":  # shapes[0] is the scores [B, G, Nb, Nb]: one program per ranking row
        return (b * h * s, 1, 1)
    nb = ops.cdiv(s, consts["BS"])
    if plugin == "ProxyScores":
        return (ops.cdiv(nb, consts["QB"]), b * consts["G"], 1)
    if plugin in ("ProxyMassStats", "ProxyMass", "ProxyRowMass"):
        return (b * h, consts["NCHUNK"], 1)
    if plugin == "ProxyNeedsMass":
        return (b * consts["HKV"], ops.cdiv(nb, consts["QB"]), 1)
    if plugin == "ProxyNeedsCut":
        return (b * consts["HKV"], nb, 1)
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
