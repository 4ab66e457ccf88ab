"""One method in every backend that runs on the CPU: the same inputs give the same kept blocks and outputs.

Backends (each against the fp32 reference plan `api.reference_plan` and its block-sparse output):

* reference: `proxyattn.proxy_attention` on CPU tensors (output);
* Triton: the GPU path's kernels in Triton's interpreter (TRITON_INTERPRET=1): scores, budgets or rule 3's needs,
  selection, the dense fallback and the block-sparse kernel (full rows for dense groups), padded and packed
  (varlen) batches;
* ONNX Runtime: a `proxy::ProxyAttention` node through the custom op (`plugins.onnxruntime.make_session`);
* TensorRT graph: the engine graph of the node (`plugins.tensorrt.graph`) in ONNX's reference evaluator, its plugin
  nodes run by their AOT-convention Triton kernels (tests/test_trt_plugin_interpret.py);
* libproxyattn's CUDA C helpers, compiled for the host: the dense fallback's decisions, budgets (every rule) and
  selection from the reference's mass, scores and rule-3 needs.

Tolerances (written down once): kept blocks must be equal, block for block, to the reference plan's on these
structured inputs (fp16 proxies move scores by ~1e-4 relative; the inputs have no block pair that close at a
selection boundary, which the equality itself checks); outputs within tests.helpers.assert_close's "fp16" tolerance
of the reference output (fp16 operands, fp32 accumulation). Shapes are ugly on purpose: S not a multiple of the
block, GQA 1/4/7/8, two proxy heads, batch 2 (packed batches of two different lengths where the backend has them).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from proxyattn import ProxyAttnConfig, api, reference
from proxyattn.plan import BlockPlan
from proxyattn.testing import structured_qkv
from tests.helpers import assert_close

BS = 64

# (budget rule, B, S, Hq, Hkv, proxy heads, gamma, dense_density): every rule, GQA 1/4/7/8, the fallback on and off.
CASES = [
    (0, 2, 330, 4, 4, 2, 0.9, None),
    (1, 2, 300, 4, 1, 1, 0.9, 0.8),  # the fallback takes one sequence's group, not the other's
    (2, 2, 330, 7, 1, 1, 0.8, 0.67),  # likewise
    (2, 1, 300, 8, 1, 1, 0.9, None),
    (3, 2, 330, 8, 1, 1, 0.9, 0.9),  # the default dense_density (no group that dense here)
    (3, 2, 300, 4, 4, 2, 0.8, 0.75),  # one of eight groups dense
    (3, 1, 330, 7, 1, 1, 0.8, None),
]


def _cfg(rule, gamma, g, density) -> ProxyAttnConfig:
    return ProxyAttnConfig(
        block_size=BS,
        stride=4,
        proxy_heads=g,
        gamma=gamma,
        min_budget_tokens=BS,
        dense_below_tokens=BS,
        budget_rule=rule,
        recall_rows=4,
        dense_density=density,
    )


def _inputs(b, s, hq, hkv, d=64, seed=0):
    """Structured fp16 inputs `[B, S, H, D]` (sinks, locality, heavy hitters: budgets well below Nb)."""
    return structured_qkv(b, s, hq, hkv, d, dtype=torch.float16, seed=seed)


def _reference(q, k, v, cfg, scale):
    plan = api.reference_plan(q, k, cfg, scale=scale)
    out, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=BS, scale=scale)
    return plan, out


def _assert_same_blocks(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    diff = (got != want).any(dim=-1)
    assert not diff.any(), f"{what}: kept blocks differ from the reference in rows (b, h, m) {diff.nonzero().tolist()[:8]}"


def _triton_plan(q, k, cfg, scale) -> BlockPlan:
    """`api.plan_blocks` with the GPU backend (`proxyattn.kernels`) on CPU tensors, step by step as `api._plan`."""
    from proxyattn import kernels
    from proxyattn.plan import dense_fallback

    early = None
    nb = -(-q.shape[1] // cfg.block_size)
    if cfg.dense_density_permille and cfg.budget_fraction is None:
        first = kernels.head_budgets(q, k, cfg.replace(budget_rule=0), scale)
        early = reference.early_dense_groups(first, k.shape[2], cfg.dense_density_permille, torch.full((q.shape[0],), nb))
    scores = kernels.proxy_scores(q, k, cfg, scale)
    if cfg.budget_rule == 3:
        return kernels.needs_plan(q, k, scores, cfg, scale, early=early)
    budgets = kernels.head_budgets(q, k, cfg, scale, scores=scores)
    return dense_fallback(kernels.select_blocks(scores, budgets, q.shape[1], cfg), k.shape[2], cfg, early=early)


@pytest.mark.interpret
@pytest.mark.parametrize("case", CASES, ids=lambda c: "rule{}-B{}-S{}-{}x{}-g{}-gamma{}-dd{}".format(*c))
def test_every_backend_keeps_the_same_blocks(case, tmp_path):
    from plugins.onnxruntime import make_session
    from tests.test_trt_plugin_interpret import _attention_model, _run_graph

    from plugins.tensorrt.graph import to_tensorrt_graph

    rule, b, s, hq, hkv, g, gamma, density = case
    cfg = _cfg(rule, gamma, g, density)
    d = 64
    scale = 1.0 / math.sqrt(d)
    q, k, v = _inputs(b, s, hq, hkv, d, seed=s + hq)
    ref_plan, ref_out = _reference(q, k, v, cfg, scale)
    want = ref_plan.to_mask()
    assert (ref_plan.density() < 1).any(), "the case must drop blocks somewhere"
    if density is not None:
        assert ref_plan.dense_heads is not None and not ref_plan.dense_heads.all()
        assert ref_plan.dense_heads.any() or density == 0.9, "the case must send some group to the dense fallback"

    # reference API (the CPU dispatch of proxy_attention)
    assert_close(api.proxy_attention(q, k, v, cfg, scale=scale), ref_out, "fp16", what="proxy_attention (reference)")

    # Triton kernels (interpreter): plan and the block-sparse kernel (dense groups as full rows)
    from proxyattn import kernels

    tplan = _triton_plan(q, k, cfg, scale)
    _assert_same_blocks(tplan.to_mask(), want, "Triton kernels")
    if density is not None:
        assert torch.equal(tplan.dense_heads, ref_plan.dense_heads)
    tout, _ = kernels.block_sparse_attention_with_lse(q, k, v, tplan, scale)
    assert_close(tout, ref_out, "fp16", what="Triton block-sparse kernel")

    # ONNX Runtime custom op (the node in the [B, H, S, D] layout)
    model = _attention_model(b, s, hq, hkv, d, cfg, scale)
    import onnx

    onnx.save(model, tmp_path / "node.onnx")
    feeds = {n: t.transpose(1, 2).contiguous().numpy() for n, t in (("q", q), ("k", k), ("v", v))}
    (ort_out,) = make_session(tmp_path / "node.onnx", sparse=True).run(None, feeds)
    assert_close(torch.from_numpy(ort_out).transpose(1, 2), ref_out, "fp16", what="ONNX Runtime custom op")

    # TensorRT engine graph (plugins run by their kernels in the interpreter)
    graph = to_tensorrt_graph(model, max_seq_len=1024)
    gout, t = _run_graph(graph, *(torch.from_numpy(feeds[n]) for n in "qkv"))
    gplan = BlockPlan(t["ProxyRank"].contiguous(), t["counts"].contiguous(), t["budgets"].to(torch.int32), BS, s)
    _assert_same_blocks(gplan.to_mask(), want, "TensorRT graph")
    if density is not None:
        assert torch.equal(t["dense_heads"], ref_plan.dense_heads)
    assert_close(gout.transpose(1, 2), ref_out, "fp16", what="TensorRT graph output")


@pytest.mark.interpret
@pytest.mark.parametrize("rule,density", [(0, None), (1, 0.6), (2, None), (3, 0.9), (3, None)])
def test_packed_batch_of_two_lengths(rule, density):
    """Varlen: two sequences of different lengths (one ragged, one shorter than the other by blocks) in one packed
    batch through the Triton kernels equal each sequence planned alone by the reference."""
    from proxyattn import kernels

    hq, hkv, d = 4, 1, 64
    lengths = (330, 200)
    cfg = _cfg(rule, 0.9, 1, density)
    scale = 1.0 / math.sqrt(d)
    seqs = [_inputs(1, n, hq, hkv, d, seed=n) for n in lengths]
    q, k, v = (torch.cat([x[i][0] for x in seqs]) for i in range(3))
    cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
    plan = kernels.plan_blocks_varlen(q, k, cu, max(lengths), cfg, scale)
    out, _ = kernels.block_sparse_attention_varlen_with_lse(q, k, v, cu, max(lengths), plan, scale)
    for i, (sq, sk, sv) in enumerate(seqs):
        n = lengths[i]
        nb = -(-n // BS)
        ref_plan, ref_out = _reference(sq, sk, sv, cfg, scale)
        row = api._sequence_plan(plan, i, n)
        _assert_same_blocks(row.to_mask(), ref_plan.to_mask(), f"packed sequence {i}")
        assert (plan.counts[i, :, nb:] == 0).all()
        if density is not None:
            assert torch.equal(plan.dense_heads[i : i + 1], ref_plan.dense_heads)
        lo = int(cu[i])
        assert_close(out[lo : lo + n], ref_out[0], "fp16", what=f"packed sequence {i} output")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "rule{}-B{}-S{}-{}x{}-g{}-gamma{}-dd{}".format(*c))
def test_c_helpers_plan_equals_the_reference(cpp_build, case):
    """libproxyattn's CUDA C helpers (host build), chained as the library launches them, on the reference's mass,
    scores and (rule 3) needs give the reference plan exactly, dense fallback included: the early decision
    (pa_budgets with rule 0 + pa_early_dense), the budgets (pa_budgets, or pa_needs_budgets for rule 3), the selection
    (pa_select; rule 3's counts come from the Triton cut kernel, here the reference's compact_plan_needs) and the late
    decision (pa_dense_fallback). The Triton kernels in between are checked by the Triton rows above and, as launched
    by the library, only on a GPU (tests/gpu/check_cpp.py)."""
    from proxyattn.plan import compact_plan_needs
    from tests.cpp.libproxyattn import load_host
    from tests.cpp.test_host_helpers import (
        _host_budgets,
        _host_dense_fallback,
        _host_early,
        _host_needs_budgets,
        _host_select,
    )

    rule, b, s, hq, hkv, g, gamma, density = case
    host = load_host(cpp_build)
    d = 64
    cfg = _cfg(rule, gamma, g, density)
    scale = 1.0 / math.sqrt(d)
    q, k, _ = _inputs(b, s, hq, hkv, d, seed=s + hq)
    nb = -(-s // BS)
    want = api.reference_plan(q, k, cfg, scale=scale)
    scores = reference.proxy_scores(q, k, proxy_heads=g, block_size=BS, stride=cfg.stride, scale=scale)
    permille = cfg.dense_density_permille
    early = None
    if permille:
        mass = reference.last_block_mass(q, k, block_size=BS, scale=scale)
        first = _host_budgets(host, mass.numpy(), s, BS, cfg.gamma, rule=0, dense_below=-1)
        early = _host_early(host, first, hkv, s, BS, permille)
        ref_first = reference.rule_budgets(
            q, k, None, block_size=BS, gamma=cfg.gamma, scale=scale, budget_rule=0, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal
        )
        np.testing.assert_array_equal(early, reference.early_dense_groups(ref_first, hkv, permille, torch.full((b,), nb)).int().numpy())
    if rule == 3:
        needs = api._reference_needs(q, k, scores, cfg, scale, None if early is None else torch.from_numpy(early).bool())
        budgets = _host_needs_budgets(host, needs.numpy(), s, BS, cfg.min_budget_blocks)
        part = compact_plan_needs(scores, needs, torch.from_numpy(budgets), s, cfg)
        order, counts = part.order.numpy(), part.counts.numpy()
    else:
        mass = (reference.last_block_row_mass if rule == 2 else reference.last_block_mass)(q, k, block_size=BS, scale=scale)
        budgets = _host_budgets(host, mass.numpy(), s, BS, cfg.gamma, scores=scores.numpy(), rule=rule, dense_below=BS)
        order, counts = _host_select(host, scores.numpy(), budgets, cfg, s, dense_below=BS)
    if permille:
        counts = _host_dense_fallback(host, counts, early, hkv, s, BS, permille)
    np.testing.assert_array_equal(budgets, want.budget_blocks.numpy())
    np.testing.assert_array_equal(order, want.order.numpy())
    np.testing.assert_array_equal(counts, want.counts.numpy())
    if density is not None:
        assert want.dense_heads.any() or density == 0.9  # the cases send some group dense (as above)


def test_c_library_accepts_the_default_config(cpp_build):
    """The library's default config is ProxyAttnConfig() (budget rule 3, the dense fallback at 0.9) and validates;
    a budget rule outside 0-3 is refused by name."""
    import ctypes as C

    from tests.cpp.libproxyattn import INVALID, SUCCESS, Config, load_lib

    lib = load_lib(cpp_build)
    c = Config()
    lib.proxyattn_config_default(C.byref(c))
    want = ProxyAttnConfig()
    assert (c.budget_rule, c.recall_rows, round(c.dense_density * 1000)) == (
        want.budget_rule,
        want.recall_rows,
        want.dense_density_permille,
    )
    assert lib.proxyattn_config_validate(C.byref(c)) == SUCCESS
    c.budget_rule = 4
    assert lib.proxyattn_config_validate(C.byref(c)) == INVALID
    assert b"budget_rule=4 is not supported" in lib.proxyattn_last_error()
