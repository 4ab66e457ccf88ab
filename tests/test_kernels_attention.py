"""Block-sparse attention kernel (proxyattn.kernels.attention) against the fp32 reference, under the Triton
interpreter on CPU tensors (small shapes). The GPU run of the same checks is tests/gpu/check_attention.py."""

import dataclasses

import numpy as np
import pytest
import torch
import triton.language as tl
import triton.runtime.interpreter as _interp

import proxyattn
from proxyattn import ProxyAttnConfig, reference
from proxyattn.api import _varlen_reference
from proxyattn.kernels import attention as attn
from proxyattn.plan import BlockPlan
from tests.helpers import assert_close

# Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel is defined).
pytestmark = pytest.mark.interpret

# Triton 3.6's interpreter turns a scalar (a 1-element array) into a loop bound with int(array), which numpy 2.5
# rejects for arrays with ndim > 0; take the element instead. Affects only the interpreter.
_orig_patch = _interp._patch_lang_tensor


def _patch_lang_tensor(tensor, scope):
    _orig_patch(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


_interp._patch_lang_tensor = _patch_lang_tensor

# Triton 3.6's interpreter multiplies bfloat16 operands of tl.dot as their raw uint16 bits; widen them to float32
# first (exact), as the GPU's bf16 matrix units do. Affects only the interpreter.
_orig_dot = _interp.InterpreterBuilder.create_dot


def _bf16_to_f32(h):
    if h.dtype != tl.bfloat16:
        return h
    return _interp.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)


def _create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
    return _orig_dot(self, _bf16_to_f32(a), _bf16_to_f32(b), d, input_precision, max_num_imprecise_acc)


_interp.InterpreterBuilder.create_dot = _create_dot

PREC = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def test_kernel_runs_in_the_interpreter():
    assert isinstance(attn._sparse_attn_fwd_kernel, _interp.InterpretedFunction), (
        "proxyattn.kernels was imported before TRITON_INTERPRET=1 was set; run this module in its own process"
    )


def _qkv(b, s, hq, hkv, d, dtype, gen):
    q = torch.randn(b, s, hq, d, generator=gen).to(dtype)
    k = torch.randn(b, s, hkv, d, generator=gen).to(dtype)
    v = torch.randn(b, s, hkv, d, generator=gen).to(dtype)
    return q, k, v


def _random_plan(b, hq, s, bs, density, gen):
    nb = -(-s // bs)
    mask = torch.rand(b, hq, nb, nb, generator=gen) < density
    return BlockPlan.from_mask(mask, block_size=bs, seq_len=s)


def _check(q, k, v, plan, scale, *, use_tma, config=None, what=""):
    out, lse = attn._launch_sparse(
        q, k, v, plan.order, plan.counts, None, q.shape[1], plan.block_size, scale, with_lse=True, use_tma=use_tma, config=config
    )
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(out, ref_out, PREC[q.dtype], what=f"{what} out")
    assert_close(lse, ref_lse, "fp32" if q.dtype == torch.float16 else "fp16", allow_inf=True, what=f"{what} lse")


# (B, S, Hq, Hkv, D, block, dtype, TMA, BLOCK_N): ragged S, GQA 1/4/8 (and 7 via Hq=7, Hkv=1), D 64/128/256, B > 1.
CASES = [
    (1, 200, 4, 1, 64, 64, torch.float16, True, 64),
    (2, 130, 8, 1, 128, 128, torch.bfloat16, False, 64),
    (1, 256, 2, 2, 256, 64, torch.float16, True, 32),
    (2, 300, 4, 4, 64, 128, torch.bfloat16, True, 128),
    (1, 192, 8, 2, 128, 64, torch.float16, False, 64),
    (1, 100, 7, 1, 64, 64, torch.bfloat16, True, 32),
]


@pytest.mark.parametrize("b,s,hq,hkv,d,bs,dtype,tma,bn", CASES)
def test_random_plans_match_reference(b, s, hq, hkv, d, bs, dtype, tma, bn):
    gen = torch.Generator().manual_seed(s * 31 + hq * 7 + d)
    q, k, v = _qkv(b, s, hq, hkv, d, dtype, gen)
    plan = _random_plan(b, hq, s, bs, 0.5, gen)
    _check(q, k, v, plan, 0.7 / d**0.5, use_tma=tma, config={"BLOCK_N": bn}, what=f"case {(b, s, hq, hkv, d, bs)}")


def test_rows_without_kept_blocks_give_zero_and_minus_inf():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _qkv(1, 150, 2, 1, 64, torch.float16, gen)
    nb = 3
    mask = torch.ones(1, 2, nb, nb, dtype=torch.bool)
    mask[0, 1, 1, :] = False  # head 1, query block 1 keeps nothing
    plan = BlockPlan.from_mask(mask, block_size=64, seq_len=150)
    out, lse = attn._launch_sparse(q, k, v, plan.order, plan.counts, None, 150, 64, 0.125, with_lse=True, use_tma=True)
    assert torch.all(out[0, 64:128, 1] == 0) and torch.all(torch.isneginf(lse[0, 1, 64:128]))
    _check(q, k, v, plan, 0.125, use_tma=False, what="empty row")


@pytest.mark.parametrize("proxy_heads,bs", [(1, 64), (2, 128)])
def test_proxy_plans_match_reference(proxy_heads, bs):
    gen = torch.Generator().manual_seed(11 + bs)
    q, k, v = _qkv(2, 3 * bs + 17, 8, 2, 64, torch.bfloat16, gen)
    cfg = ProxyAttnConfig(block_size=bs, proxy_heads=proxy_heads, min_budget_tokens=bs, gamma=0.6)
    plan = proxyattn.plan_blocks(q, k, cfg)  # CPU: the reference plan, R = proxy_heads ranking rows
    assert plan.order.shape[1] == proxy_heads
    _check(q, k, v, plan, 0.125, use_tma=True, what="proxy plan")


@pytest.mark.parametrize("bs,bn", [(64, 32), (128, 64)])
def test_full_plan_equals_dense(bs, bn):
    gen = torch.Generator().manual_seed(5)
    q, k, v = _qkv(1, 2 * bs + 5, 4, 1, 64, torch.float16, gen)
    nb = 3
    plan = BlockPlan.from_mask(torch.ones(1, 4, nb, nb, dtype=torch.bool), block_size=bs, seq_len=q.shape[1])
    out = attn.block_sparse_attention(q, k, v, plan, 0.125)
    assert_close(out, reference.dense_attention(q, k, v, 0.125), "fp16", what="full plan vs dense")


def _random_columns(b, g, s, n, gen):
    return torch.stack([torch.randperm(s, generator=gen)[:n].sort().values for _ in range(b * g)]).view(b, g, n).to(torch.int32)


# (B, S, Hq, Hkv, G column rows, D, block, dtype, columns): ragged S, GQA 1/4/7/8, D 64/128/256, B > 1, a partial
# last column tile, columns in kept blocks and in every row's future.
COLUMN_CASES = [
    (1, 200, 4, 1, 1, 64, 64, torch.float16, 70),
    (2, 130, 8, 1, 1, 128, 128, torch.bfloat16, 64),
    (1, 256, 2, 2, 2, 256, 64, torch.float16, 30),
    (2, 300, 4, 4, 2, 64, 128, torch.bfloat16, 128),
    (1, 100, 7, 1, 1, 64, 64, torch.bfloat16, 100),
]


@pytest.mark.parametrize("b,s,hq,hkv,g,d,bs,dtype,n", COLUMN_CASES)
def test_column_plans_match_reference(b, s, hq, hkv, g, d, bs, dtype, n):
    gen = torch.Generator().manual_seed(s * 13 + n)
    q, k, v = _qkv(b, s, hq, hkv, d, dtype, gen)
    plan = _random_plan(b, hq, s, bs, 0.3, gen)
    plan = dataclasses.replace(plan, columns=_random_columns(b, g, s, n, gen))
    scale = 0.7 / d**0.5
    out, lse = attn.block_sparse_attention_with_lse(q, k, v, plan, scale)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=bs, scale=scale, columns=plan.columns)
    what = f"columns {(b, s, hq, hkv, g, d, bs, n)}"
    assert_close(out, ref_out, PREC[dtype], what=f"{what} out")
    assert_close(lse, ref_lse, "fp32" if dtype == torch.float16 else "fp16", allow_inf=True, what=f"{what} lse")
    assert_close(attn.block_sparse_attention(q, k, v, plan, scale), ref_out, PREC[dtype], what=f"{what} no lse")


def test_columns_on_a_full_plan_change_nothing_and_every_column_gives_dense():
    """Oracles: a full plan with columns is dense attention (a column inside a kept block counts once); the diagonal
    alone with every token as a column is dense attention too."""
    gen = torch.Generator().manual_seed(9)
    s, nb = 150, 3
    q, k, v = _qkv(1, s, 4, 1, 64, torch.float16, gen)
    dense = reference.dense_attention(q, k, v, 0.125)
    full = BlockPlan.from_mask(torch.ones(1, 4, nb, nb, dtype=torch.bool), block_size=64, seq_len=s)
    full = dataclasses.replace(full, columns=_random_columns(1, 1, s, 50, gen))
    assert_close(attn.block_sparse_attention(q, k, v, full, 0.125), dense, "fp16", what="full plan + columns")
    diag = BlockPlan.from_mask(torch.eye(nb, dtype=torch.bool).expand(1, 4, nb, nb), block_size=64, seq_len=s)
    diag = dataclasses.replace(diag, columns=torch.arange(s, dtype=torch.int32).view(1, 1, s))
    assert_close(attn.block_sparse_attention(q, k, v, diag, 0.125), dense, "fp16", what="diagonal + every column")


def test_dense_heads_with_columns_run_in_the_sparse_kernel():
    """A plan with columns and dense heads: every head through the block-sparse kernel, then the columns (the split
    path, which sends dense groups to the dense kernel, is not taken)."""
    gen = torch.Generator().manual_seed(10)
    s, nb = 200, 4
    q, k, v = _qkv(1, s, 4, 2, 64, torch.bfloat16, gen)
    plan = _random_plan(1, 4, s, 64, 0.3, gen)
    counts = plan.counts.clone()
    counts[0, :2] = torch.arange(1, nb + 1, dtype=torch.int32)  # KV group 0 dense
    heads = torch.tensor([[True, True, False, False]])
    plan = dataclasses.replace(plan, counts=counts, dense_heads=heads, columns=_random_columns(1, 1, s, 40, gen))
    ref, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=64, scale=0.125, columns=plan.columns)
    assert_close(attn.block_sparse_attention(q, k, v, plan, 0.125), ref, "bf16", what="dense heads + columns")
    split = attn.block_sparse_attention_split(q, k, v, plan, 0.125, torch.tensor([[True, False]]), torch.tensor([[True, False]]))
    assert_close(split, ref, "bf16", what="split entry + columns")


def test_strided_inputs():
    """q/k/v sliced out of one fused projection (TMA-capable) and a [B, H, S, D] layout (pointer path)."""
    gen = torch.Generator().manual_seed(8)
    b, s, hq, hkv, d = 2, 140, 4, 2, 64
    fused = torch.randn(b, s, hq + 2 * hkv, d, generator=gen).to(torch.float16)
    q, k, v = fused[:, :, :hq], fused[:, :, hq : hq + hkv], fused[:, :, hq + hkv :]
    plan = _random_plan(b, hq, s, 64, 0.6, gen)
    assert attn._tma_ok(q, b * s, True) and attn._tma_ok(k, b * s, True)
    _check(q, k, v, plan, 0.125, use_tma=None, what="fused qkv")
    qt, kt, vt = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))  # [B, H, S, D] storage
    assert not attn._tma_ok(qt, b * s, True)
    _check(qt, kt, vt, plan, 0.125, use_tma=None, what="BHSD storage")


@pytest.mark.parametrize("tma", [True, False])
def test_varlen_matches_per_sequence_reference(tma):
    gen = torch.Generator().manual_seed(21)
    lens = [70, 0, 200, 33]
    hq, hkv, d, bs = 4, 2, 64, 64
    t = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(t, hq, d, generator=gen).to(torch.bfloat16)
    k = torch.randn(t, hkv, d, generator=gen).to(torch.bfloat16)
    v = torch.randn(t, hkv, d, generator=gen).to(torch.bfloat16)
    plan = _random_plan(len(lens), hq, max(lens), bs, 0.6, gen)
    out, lse = attn._launch_sparse(q, k, v, plan.order, plan.counts, cu, max(lens), bs, 0.125, with_lse=True, use_tma=tma)
    ref_out, ref_lse = _varlen_reference(q, k, v, cu, plan, 0.125)
    assert_close(out, ref_out, "bf16", what="varlen out")
    assert_close(lse, ref_lse, "fp16", allow_inf=True, what="varlen lse")


def test_varlen_reference_equals_batched_reference():
    """The varlen reference on equal lengths is the batched reference on the same data."""
    gen = torch.Generator().manual_seed(4)
    b, s, hq, hkv, d = 3, 90, 2, 1, 64
    q, k, v = _qkv(b, s, hq, hkv, d, torch.float32, gen)
    plan = _random_plan(b, hq, s, 64, 0.7, gen)
    cu = torch.arange(0, (b + 1) * s, s, dtype=torch.int32)
    out, lse = proxyattn.block_sparse_attention_varlen_with_lse(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, s, plan)
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=64, scale=d**-0.5)
    assert_close(out, ref_out.flatten(0, 1), "fp32", what="varlen ref out")
    assert_close(lse, ref_lse.permute(1, 0, 2).flatten(1, 2), "fp32", allow_inf=True, what="varlen ref lse")


def test_proxy_attention_varlen_cpu_is_per_sequence_proxy_attention():
    gen = torch.Generator().manual_seed(9)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=64, gamma=0.5, dense_below_tokens=64)
    cu = torch.tensor([0, 40, 340], dtype=torch.int32)
    q = torch.randn(340, 4, 64, generator=gen)
    k = torch.randn(340, 2, 64, generator=gen)
    v = torch.randn(340, 2, 64, generator=gen)
    out = proxyattn.proxy_attention_varlen(q, k, v, cu, 300, cfg)
    for lo, hi in [(0, 40), (40, 340)]:
        ref = proxyattn.proxy_attention(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], cfg)[0]
        assert_close(out[lo:hi], ref, "fp32", what=f"sequence {lo}:{hi}")
    # The padded plan and the varlen attention (reference path) give the same result.
    plan = proxyattn.plan_blocks_varlen(q, k, cu, 300, cfg)
    assert plan.counts.shape == (2, 4, 5) and plan.seq_len == 300
    assert torch.equal(plan.counts[0, :, 0], torch.ones(4, dtype=torch.int32))  # short sequence: full plan
    assert_close(proxyattn.block_sparse_attention_varlen(q, k, v, cu, 300, plan), out, "fp32", what="plan + varlen")


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda a: {**a, "cu_seqlens": a["cu_seqlens"].long()}, "cu_seqlens.dtype"),
        (lambda a: {**a, "cu_seqlens": torch.tensor([0, 50, 40], dtype=torch.int32)}, "must start at 0"),
        (lambda a: {**a, "max_seqlen": 10}, "max_seqlen=10 is below"),
        (lambda a: {**a, "max_seqlen": 0}, "max_seqlen=0"),
        (lambda a: {**a, "q": a["q"][None]}, "q must be a 3-dim"),
        (lambda a: {**a, "k": a["k"][:, :, :32]}, "does not match q shape"),
    ],
)
def test_varlen_errors(change, match):
    cu = torch.tensor([0, 30, 80], dtype=torch.int32)
    args = {"q": torch.randn(80, 2, 64), "k": torch.randn(80, 1, 64), "v": torch.randn(80, 1, 64), "cu_seqlens": cu, "max_seqlen": 50}
    a = change(args)
    with pytest.raises(ValueError, match=match):
        proxyattn.proxy_attention_varlen(a["q"], a["k"], a["v"], a["cu_seqlens"], a["max_seqlen"])


def test_mask_every_tile_variant_and_preallocated_outputs():
    """DIAG_BRANCH=False (mask applied to every tile, no branch) computes the same; outputs can be preallocated."""
    gen = torch.Generator().manual_seed(13)
    q, k, v = _qkv(1, 180, 4, 1, 64, torch.float16, gen)
    plan = _random_plan(1, 4, 180, 64, 0.7, gen)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((1, 4, 180), float("nan"))
    attn._launch_sparse(
        q,
        k,
        v,
        plan.order,
        plan.counts,
        None,
        180,
        64,
        0.125,
        with_lse=True,
        use_tma=True,
        config={"BLOCK_N": 32, "DIAG_BRANCH": False, "num_warps": 8, "maxnreg": 128},
        out=out,
        lse=lse,
    )
    ref_out, ref_lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=64, scale=0.125)
    assert_close(out, ref_out, "fp16", what="mask-all out")
    assert_close(lse, ref_lse, "fp32", allow_inf=True, what="mask-all lse")


@pytest.mark.parametrize(
    "dtype,d,match",
    [(torch.float32, 64, "q.dtype=torch.float32 is not supported"), (torch.float16, 96, "head dim D=96 is not supported")],
)
def test_kernel_rejects_unsupported_inputs(dtype, d, match):
    q = torch.randn(1, 64, 2, d).to(dtype)
    k = torch.randn(1, 64, 1, d).to(dtype)
    plan = BlockPlan.from_mask(torch.ones(1, 2, 1, 1, dtype=torch.bool), block_size=64, seq_len=64)
    with pytest.raises(ValueError, match=match):
        attn.block_sparse_attention(q, k, k, plan, 0.125)
    with pytest.raises(ValueError, match=match):
        attn.block_sparse_attention_varlen(q[0], k[0], k[0], torch.tensor([0, 64], dtype=torch.int32), 64, plan, 0.125)


def test_fixed_configs_are_pruned_autotune_candidates(monkeypatch):
    """Every fixed config of a measured shape (`attention._TUNED`) is one of the autotuner's candidates that survives
    its pruning for that shape and layout (so tests/gpu/check_attention.py's run of every candidate covers it);
    unmeasured shapes have none (autotuned); libproxyattn (pointer loads, no TMA) compiles the register-capped config
    for D 128 / block 128, a pointer-load candidate, and the TensorRT plugin's tactics 1 and 3 are FOUR_WARPS and the
    register-capped config. The pruning drops configs whose fp32 accumulator would take more than 128 registers a
    thread (four warps over block 128 at D 256)."""
    import importlib.util
    import sys

    from plugins.tensorrt import spec
    from tests.helpers import ROOT

    gen_spec = importlib.util.spec_from_file_location("generate_kernels", ROOT / "cpp" / "tools" / "generate_kernels.py")
    gk = importlib.util.module_from_spec(gen_spec)
    monkeypatch.setitem(sys.modules, "generate_kernels", gk)  # its dataclasses look their module up
    gen_spec.loader.exec_module(gk)

    def candidates(d, bs, tma):
        q = torch.empty(1, 1, 1, d, dtype=torch.bfloat16)
        named = {"PLAN_BS": bs, "HEAD_DIM": d, "q_ptr": q, "USE_TMA": tma, "VARLEN": False}
        return {attn.config_tuple(x) for x in attn._prune(attn._configs(), named)}

    assert attn._TUNED
    for (d, bs, tma), c in attn._TUNED.items():
        assert c in candidates(d, bs, tma), c
        assert attn.tuned_config(d, bs, tma) == dict(zip(attn._CONFIG_KEYS, c))
    assert attn._TUNED[(128, 128, True)] == attn.FOUR_WARPS
    lib = gk.attention_config(128, 128)
    assert (lib["BLOCK_N"], lib["num_warps"], lib["num_stages"], lib["maxnreg"]) == attn.REGISTER_CAPPED
    assert attn.REGISTER_CAPPED in candidates(128, 128, False)
    trt = {t: spec._TACTICS["ProxySparseAttention"][t] for t in (1, 3)}
    assert (trt[1]["BLOCK_N"], trt[1]["num_warps"], trt[1]["num_stages"], trt[1].get("maxnreg")) == attn.FOUR_WARPS
    assert (trt[3]["BLOCK_N"], trt[3]["num_warps"], trt[3]["num_stages"], trt[3]["maxnreg"]) == attn.REGISTER_CAPPED
    for d, bs, tma in ((128, 128, True), (128, 128, False), (64, 128, True), (128, 64, False), (256, 64, True)):
        assert attn.FOUR_WARPS in candidates(d, bs, tma), (d, bs, tma)
    assert attn.FOUR_WARPS not in candidates(256, 128, True) and attn.FOUR_WARPS not in candidates(256, 128, False)
    assert candidates(256, 128, True) == {(32, 8, 3, None)}  # shared memory and eight warps (128 accumulator registers)
    assert attn.tuned_config(128, 128, False) is None and attn.tuned_config(64, 128, True) is None


def test_kernel_configs_benchmark_names_the_compared_configs(monkeypatch):
    """benchmarks/kernel_configs.py compares the fixed config with the register-capped one libproxyattn compiles (or
    every candidate of the shape); an unknown choice is a ValueError naming the allowed ones."""
    import importlib.util

    from tests.helpers import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("kernel_configs_benchmark", ROOT / "benchmarks" / "kernel_configs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    q = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16)
    pair = bench.named_configs("tuned,register-capped", q)
    assert list(pair.values()) == [attn.tuned_config(128, 128, True), attn.config_dict(attn.REGISTER_CAPPED)]
    every = bench.named_configs("all", q)
    assert str(attn.FOUR_WARPS) in every and str(attn.REGISTER_CAPPED) in every and len(every) > 2
    with pytest.raises(ValueError, match=r"--configs 'fast': allowed 'tuned,register-capped' or 'all'"):
        bench.named_configs("fast", q)
