"""The TensorRT plugin logic as plain functions (plugins.tensorrt.spec) and TensorRT's lazy import."""

import itertools
import math

import pytest

from plugins.tensorrt import spec as S
from proxyattn.config import ProxyAttnConfig

CFG = ProxyAttnConfig()
ATTRS = dict(CFG.to_attrs(), scale=1 / math.sqrt(128))


def test_output_shapes_of_every_plugin():
    b, hq, hkv, s, d = 2, 32, 8, 1000, 128
    q, k = (b, hq, s, d), (b, hkv, s, d)
    nb = 8  # ceil(1000 / 128)
    assert S.output_shapes("ProxyPool", [q], {"groups": 1, "step": 4}) == [(1, 2 * 1000 // 4 + 2, d)]
    assert S.output_shapes("ProxyScores", [q, (1, 502, d), (1, 2002, d)], ATTRS) == [(b, 1, nb, nb)]
    cb, nchunk = S.mass_chunks(128, 32768)
    assert (cb, nchunk) == (16, 16)
    assert S.output_shapes("ProxyMassStats", [q, k], dict(ATTRS, max_seq_len=32768)) == [(b * hq, 16, 128)] * 2
    assert S.output_shapes("ProxyMass", [q, k, (b * hq, 128)], dict(ATTRS, max_seq_len=32768)) == [(b, hq, nb)]
    assert S.output_shapes("ProxyRowMass", [q, k, (b * hq, 128)], dict(ATTRS, max_seq_len=32768)) == [(b, hq, 128, nb)]
    assert S.output_shapes("ProxySparseAttention", [q, k, k, (b, 1, nb, nb), (b, hq, nb)], ATTRS) == [q]


def test_output_shapes_are_symbolic_friendly():
    """The shape rules use only +, *, and the ops' cdiv / floordiv, so TensorRT shape expressions work too."""

    class Sym:
        def __init__(self, text):
            self.t = text

        def __add__(self, o):
            return Sym(f"({self.t}+{getattr(o, 't', o)})")

        __radd__ = __add__

        def __mul__(self, o):
            return Sym(f"({self.t}*{getattr(o, 't', o)})")

        __rmul__ = __mul__

    class SymOps:
        @staticmethod
        def cdiv(a, b):
            return Sym(f"cdiv({getattr(a, 't', a)},{getattr(b, 't', b)})")

        @staticmethod
        def floordiv(a, b):
            return Sym(f"floordiv({getattr(a, 't', a)},{getattr(b, 't', b)})")

    B, S_ = Sym("B"), Sym("S")
    (shape,) = S.output_shapes("ProxyScores", [(B, 32, S_, 128), (1, 5, 128), (1, 5, 128)], ATTRS, SymOps)
    assert [getattr(x, "t", x) for x in shape] == ["B", 1, "cdiv(S,128)", "cdiv(S,128)"]
    (pool,) = S.output_shapes("ProxyPool", [(B, 32, S_, 128)], {"groups": 1, "step": 4}, SymOps)
    assert pool[1].t == "(floordiv((B*S),4)+B)"
    grid = S.launch("ProxySparseAttention", [(B, 32, S_, 128)], ATTRS, {"BS": 128}, SymOps)
    assert grid[0].t == "((cdiv(S,128)*B)*32)"


def test_output_types_and_refusals():
    assert S.output_dtypes("ProxySparseAttention", ["bfloat16"] * 3 + ["int32"] * 2) == ["bfloat16"]
    assert S.output_dtypes("ProxyPool", ["float16"]) == ["float16"]
    assert S.output_dtypes("ProxyMassStats", ["bfloat16"] * 2) == ["float32", "float32"]
    with pytest.raises(ValueError, match="allowed"):
        S.output_dtypes("ProxyPool", ["float32"])
    with pytest.raises(ValueError, match="not supported; expected"):
        S.output_dtypes("ProxySparseAttention", ["float16", "bfloat16", "float16", "int32", "int32"])
    with pytest.raises(ValueError, match="takes 5 inputs"):
        S.output_dtypes("ProxySparseAttention", ["float16"])


def test_attribute_parsing_accepts_tensorrt_forms():
    import numpy as np

    trt_like = {k: np.array([v], dtype=np.float32 if isinstance(v, float) else np.int32) for k, v in ATTRS.items()}
    a = S.parse_attrs("ProxyScores", trt_like)
    assert a == {"pa_proxy_heads": 1, "pa_block_size": 128, "pa_stride": 4, "scale": pytest.approx(1 / math.sqrt(128))}
    assert isinstance(a["pa_block_size"], int) and isinstance(a["scale"], float)


@pytest.mark.parametrize(
    "attrs, match",
    [
        ({}, "attribute 'groups' is missing"),
        ({"groups": 0, "step": 4}, "groups=0 must be a positive integer"),
        ({"groups": 1, "step": 2.5}, "step=2.5"),
    ],
)
def test_bad_attributes(attrs, match):
    with pytest.raises(ValueError, match=match):
        S.parse_attrs("ProxyPool", attrs)


def test_bad_plugin_attrs_and_names():
    with pytest.raises(ValueError, match="pa_block_size=96"):
        S.parse_attrs("ProxySparseAttention", dict(ATTRS, pa_block_size=96))
    with pytest.raises(ValueError, match="scale=-1.0"):
        S.parse_attrs("ProxySparseAttention", dict(ATTRS, scale=-1.0))
    with pytest.raises(ValueError, match="unknown plugin 'Nope'"):
        S.parse_attrs("Nope", {})
    with pytest.raises(ValueError, match="rank 4"):
        S.output_shapes("ProxyPool", [(2, 3)], {"groups": 1, "step": 4})


def test_launch_grids_extra_args_and_tactics():
    q, k = (3, 32, 1000, 128), (3, 8, 1000, 128)
    consts, opts = S.constants("ProxySparseAttention", [q, k, k, (3, 1, 8, 8), (3, 32, 8)], ["bfloat16"] * 3 + ["int32"] * 2, ATTRS, 2)
    assert consts["BLOCK_N"] == 128 and opts == {"num_warps": 8, "num_stages": 2}
    assert S.tactics("ProxySparseAttention") == [1, 2, 3]
    consts, opts = S.constants("ProxySparseAttention", [q, k, k, (3, 1, 8, 8), (3, 32, 8)], ["bfloat16"] * 3 + ["int32"] * 2, ATTRS, 3)
    assert consts["BLOCK_N"] == 64 and opts == {"num_warps": 8, "num_stages": 2, "maxnreg": 128}  # attention.REGISTER_CAPPED
    q256, k256 = (3, 32, 1000, 256), (3, 8, 1000, 256)
    _, opts = S.constants("ProxySparseAttention", [q256, k256, k256, (3, 1, 8, 8), (3, 32, 8)], ["bfloat16"] * 3 + ["int32"] * 2, ATTRS, 3)
    assert opts == {"num_warps": 8, "num_stages": 2}  # no register cap for head dim 256
    assert consts["QK_SCALE"] == pytest.approx(ATTRS["scale"] * math.log2(math.e))
    assert S.launch("ProxySparseAttention", [q], ATTRS, consts) == (8 * 3 * 32, 1, 1)
    assert S.extra_args("ProxySparseAttention", [q]) == [1000]
    pc, _ = S.constants("ProxyPool", [q], ["bfloat16"], {"groups": 1, "step": 4}, 1)
    assert S.launch("ProxyPool", [q], {}, pc) == (-(-250 // pc["BLOCK_T"]), 3, 1)
    assert S.extra_args("ProxyPool", [q]) == [1000, 3]
    mc, _ = S.constants("ProxyMass", [q, k, (96, 128)], ["bfloat16", "bfloat16", "float32"], dict(ATTRS, max_seq_len=8192), 1)
    assert S.launch("ProxyMass", [q], {}, mc) == (96, mc["NCHUNK"], 1) and mc["NCHUNK"] * mc["CB"] >= 8192 // 128
    rc, _ = S.constants("ProxyRowMass", [q, k, (96, 128)], ["bfloat16", "bfloat16", "float32"], dict(ATTRS, max_seq_len=8192), 1)
    assert rc == dict(mc, ROWS=True) and mc["ROWS"] is False and S.launch("ProxyRowMass", [q], {}, rc) == (96, rc["NCHUNK"], 1)
    assert S.output_dtypes("ProxyRowMass", ["bfloat16", "bfloat16", "float32"]) == ["float32"]
    with pytest.raises(ValueError, match="tactic 9 unknown"):
        S.constants("ProxyPool", [q], ["bfloat16"], {"groups": 1, "step": 4}, 9)
    with pytest.raises(ValueError, match="head dim 96"):
        S.constants(
            "ProxySparseAttention",
            [(1, 4, 10, 96), (1, 4, 10, 96), (1, 4, 10, 96), (1, 1, 1, 1), (1, 4, 1)],
            ["float16"] * 3 + ["int32"] * 2,
            ATTRS,
            1,
        )


def test_tensorrt_absent_gives_one_clear_message():
    import importlib.util

    from plugins.tensorrt import TensorRTMissing, register_plugins

    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT message cannot be observed")
    with pytest.raises(TensorRTMissing, match="TensorRT is not installed .*embedded default backend"):
        register_plugins()


def test_engine_profile_shapes():
    from engines.models import Profile
    from plugins.tensorrt.engine import profile_shapes

    assert profile_shapes(Profile("p", 2049, 4096, 8192), 8) == ((1, 2049), (4, 4096), (8, 8192))
    assert profile_shapes(Profile("p", 1, 1, 1), 1) == ((1, 1), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="max_batch=0"):
        profile_shapes(Profile("p", 1, 1, 1), 0)


def test_rule3_and_ranking_plugins():
    """ProxyRank / ProxyNeedsMass / ProxyNeedsCut: shapes, types, grids, constants and extra scalars (gamma as float32
    bits and the minimum budget in blocks travel as int32 scalars, so they do not change the compiled kernel)."""
    import struct

    b, hq, hkv, s, d, nb = 3, 28, 4, 1000, 128, 8  # GQA 7: RB = next power of two of 7 * 4 = 32
    q, k = (b, hq, s, d), (b, hkv, s, d)
    rank_attrs = {"pa_block_size": 128, "pa_keep_sink": 1, "pa_keep_diagonal": 0, "max_seq_len": 32768}
    assert S.output_shapes("ProxyRank", [(b, 2, nb, nb)], rank_attrs) == [(b, 2, nb, nb)] * 2 + [(b, 2, nb)] * 2
    assert S.output_dtypes("ProxyRank", ["float32"]) == ["int32"] * 4
    consts, opt = S.constants("ProxyRank", [(b, 2, nb, nb)], ["float32"], rank_attrs, 1)
    assert consts == {"KEEP_SINK": True, "KEEP_DIAG": False, "BLOCK": 256} and opt["num_warps"] == 4
    assert S.launch("ProxyRank", [(b, 2, nb, nb)], rank_attrs, consts) == (b * 2 * nb, 1, 1)
    assert S.extra_args("ProxyRank", [(b, 2, nb, nb)]) == [nb]
    with pytest.raises(ValueError, match="ranking kernel sorts at most 4096"):
        S.parse_attrs("ProxyRank", dict(rank_attrs, max_seq_len=4097 * 128))

    mass_attrs = {"pa_block_size": 128, "pa_recall_rows": 4, "scale": 0.1}
    assert S.output_shapes("ProxyNeedsMass", [q, k, (b, hkv)], mass_attrs) == [(b * hkv, nb, nb, 32), (b * hkv, nb, 32)]
    consts, opt = S.constants("ProxyNeedsMass", [q, k, (b, hkv)], ["bfloat16", "bfloat16", "int32"], mass_attrs, 1)
    assert (consts["GROUP"], consts["RB"], consts["QB"], consts["ROWS"]) == (7, 32, 8, 4)
    assert opt == {"num_warps": 8, "num_stages": 2}  # 256 query rows x 128: 8 warps; they and two K tiles fit shared memory
    _, opt = S.constants("ProxyNeedsMass", [(b, hq, s, 256), (b, hkv, s, 256), (b, hkv)], ["bfloat16"] * 2 + ["int32"], mass_attrs, 1)
    assert opt["num_stages"] == 1  # head dim 256: they do not
    assert S.launch("ProxyNeedsMass", [q], mass_attrs, consts) == (b * hkv, 1, 1)
    cut_attrs = {
        "pa_block_size": 128,
        "pa_recall_rows": 4,
        "pa_gamma": 0.95,
        "pa_min_budget_tokens": 2048,
        "pa_keep_sink": 1,
        "pa_keep_diagonal": 1,
    }
    cut_in = [q, (b * hkv, nb, nb, 32), (b * hkv, nb, 32), (b, 1, nb, nb), (b, 1, nb), (b, 1, nb), (b, hkv)]
    assert S.output_shapes("ProxyNeedsCut", cut_in, cut_attrs) == [(b, hq, nb)] * 2
    consts, _ = S.constants(
        "ProxyNeedsCut",
        cut_in,
        ["bfloat16", "float32", "float32"] + ["int32"] * 4,
        {k2: v for k2, v in cut_attrs.items() if k2 not in S.RUNTIME_ATTRS["ProxyNeedsCut"]},
        1,
    )
    assert (consts["HKV"], consts["R"], consts["RB"], consts["CH"]) == (hkv, 1, 32, 128)
    assert S.launch("ProxyNeedsCut", [q], cut_attrs, consts) == (b * hkv, nb, 1)
    s_, bits, min_blocks = S.extra_args("ProxyNeedsCut", cut_in, cut_attrs)
    assert (s_, min_blocks) == (s, 16) and struct.unpack("<f", struct.pack("<i", bits))[0] == pytest.approx(0.95)
    assert bits == S.float_bits(0.95) and struct.pack("<i", bits) == struct.pack("<f", 0.95)
    with pytest.raises(ValueError, match="extra_args needs the attributes"):
        S.extra_args("ProxyNeedsCut", cut_in)
    with pytest.raises(ValueError, match="pa_keep_sink=2 must be 0 or 1"):
        S.parse_attrs("ProxyNeedsCut", dict(cut_attrs, pa_keep_sink=2))
    with pytest.raises(ValueError, match="pa_recall_rows=3 must be a power of two"):
        S.parse_attrs("ProxyNeedsCut", dict(cut_attrs, pa_recall_rows=3))


def test_needs_mass_needs_static_head_counts():
    class Sym:  # a shape expression that is not a build-time constant
        pass

    class SymOps(S.IntOps):
        @staticmethod
        def static(a):
            return -1 if isinstance(a, Sym) else a

    attrs = {"pa_block_size": 128, "pa_recall_rows": 4, "scale": 0.1}
    with pytest.raises(ValueError, match="query heads=-1 must be a static positive int"):
        S.output_shapes("ProxyNeedsMass", [(1, Sym(), 256, 64), (1, 2, 256, 64), (1, 2)], attrs, SymOps())


def test_needs_mass_stages_follow_the_kernel_module():
    """The spec restates estimate_needs.mass_stages and mass_warps (it imports nothing of proxyattn): both agree on every shape the
    plugins compile."""
    from proxyattn.kernels import estimate_needs as EN

    for qb, rb, bd, bs, elt in itertools.product((8, 16), (4, 8, 16, 32), (64, 128, 256), (64, 128), (2, 4)):
        assert S.mass_stages(qb, rb, bd, bs, elt) == EN.mass_stages(qb, rb, bd, bs, elt), (qb, rb, bd, bs, elt)
        assert S.mass_warps(qb, rb, bd) == EN.mass_warps(qb, rb, bd), (qb, rb, bd)
