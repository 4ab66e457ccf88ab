"""Vertical columns (ProxyAttnConfig.column_fraction): the config, the reference selection and attention, the plan's
accounting and the API's dispatch, on the CPU (the Triton column kernel: tests/test_kernels_attention.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import proxyattn
from proxyattn import ProxyAttnConfig, reference
from proxyattn.plan import BlockPlan
from tests.helpers import assert_close, qkv_inputs


# ----------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "fraction,s,want",
    [(0.0, 4096, 0), (0.02, 131072, 2624), (0.02, 8192, 192), (0.001, 1000, 64), (0.5, 100, 64), (0.5, 30, 30), (0.25, 256, 64)],
)
def test_num_columns_rounds_up_to_whole_tiles_and_stops_at_s(fraction, s, want):
    assert ProxyAttnConfig(column_fraction=fraction).num_columns(s) == want


@pytest.mark.parametrize("bad", [-0.01, 0.51, 1.0, float("nan"), float("inf"), "0.1", True, None])
def test_bad_column_fraction_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"column_fraction="):
        ProxyAttnConfig(column_fraction=bad)


def test_columns_need_the_proxy_estimator():
    with pytest.raises(ValueError, match=r"column_fraction=0.02 with estimator=head_max: .* allowed: estimator proxy \(0\)"):
        ProxyAttnConfig(column_fraction=0.02, estimator="head_max")


def test_column_fraction_round_trips_through_attributes():
    for c in (ProxyAttnConfig(), ProxyAttnConfig(column_fraction=0.02, budget_fraction=0.02), ProxyAttnConfig(column_fraction=0)):
        attrs = c.to_attrs()
        assert isinstance(attrs["pa_column_fraction"], float)
        assert ProxyAttnConfig.from_attrs(attrs) == c
    with pytest.raises(ValueError, match="pa_column_fraction"):
        ProxyAttnConfig.from_attrs({k: v for k, v in ProxyAttnConfig().to_attrs().items() if k != "pa_column_fraction"})


# ----------------------------------------------------------------------------------------------- reference
def _brute_columns(q, k, g, n, bs, keep_sink, keep_diagonal):
    """proxy_columns written out per batch, group and key (loops, no shared code with the reference)."""
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    last0 = ((s - 1) // bs) * bs
    out = torch.empty(b, g, n, dtype=torch.int32)
    for bi in range(b):
        for gi in range(g):
            pq = q[bi, :, gi * (hq // g) : (gi + 1) * (hq // g)].double().mean(1)
            pk = k[bi, :, gi * (hkv // g) : (gi + 1) * (hkv // g)].double().mean(1)
            best = torch.zeros(s, dtype=torch.float64)
            for r in range(last0, s):
                p = torch.softmax((pk[: r + 1] @ pq[r]) * d**-0.5, 0)
                best[: r + 1] = torch.maximum(best[: r + 1], p)
            keys = []
            for j in range(s):
                covered = (keep_sink and j < bs) or (keep_diagonal and j >= last0)
                keys.append((0 if covered else 1, best[j].item() if not covered else 0.0, -j))
            top = sorted(range(s), key=lambda j: keys[j], reverse=True)[:n]
            out[bi, gi] = torch.tensor(sorted(top), dtype=torch.int32)
    return out


@pytest.mark.parametrize(
    "b,s,hq,hkv,g,bs,n,sink,diag",
    [(2, 200, 4, 2, 1, 64, 32, True, True), (1, 150, 8, 2, 2, 64, 20, False, True), (1, 96, 7, 1, 1, 64, 96, True, False)],
)
def test_proxy_columns_match_a_brute_force_selection(b, s, hq, hkv, g, bs, n, sink, diag):
    q, k, _ = qkv_inputs("structured", b, s, hq, hkv, 64, seed=s)
    got = reference.proxy_columns(q, k, proxy_heads=g, block_size=bs, num_columns=n, scale=64**-0.5, keep_sink=sink, keep_diagonal=diag)
    assert got.dtype == torch.int32 and got.shape == (b, g, n)
    assert torch.equal(got, _brute_columns(q, k, g, n, bs, sink, diag))
    assert (got[..., 1:] > got[..., :-1]).all()  # ascending, no repeats


def test_covered_keys_are_taken_only_when_nothing_else_is_left():
    q, k, _ = qkv_inputs("structured", 1, 256, 4, 1, 64, seed=2)
    cols = reference.proxy_columns(q, k, proxy_heads=1, block_size=64, num_columns=128, scale=0.125, keep_sink=True, keep_diagonal=True)
    assert torch.equal(cols[0, 0], torch.arange(64, 192, dtype=torch.int32))  # blocks 1 and 2: all that is not covered


def _explicit_attention(q, k, v, allowed, scale):
    """Softmax over an explicit token mask allowed `[B, Hq, S, S]` (causality applied here), fp64, per head."""
    b, s, hq, d = q.shape
    g = hq // k.shape[2]
    out = torch.zeros(b, s, hq, v.shape[-1], dtype=torch.float64)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    for bi in range(b):
        for h in range(hq):
            logits = (q[bi, :, h].double() @ k[bi, :, h // g].double().T) * scale
            logits = logits.masked_fill(~(allowed[bi, h] & causal), float("-inf"))
            out[bi, :, h] = torch.softmax(logits, -1) @ v[bi, :, h // g].double()
    return out


def test_reference_attends_kept_blocks_and_columns_once():
    b, s, hq, hkv, bs = 2, 200, 4, 2, 64
    q, k, v = qkv_inputs("random", b, s, hq, hkv, 32, seed=4)
    gen = torch.Generator().manual_seed(0)
    nb = -(-s // bs)
    mask = torch.rand(b, hq, nb, nb, generator=gen) < 0.4
    mask |= torch.eye(nb, dtype=torch.bool)  # every row keeps its diagonal
    cols = torch.stack([torch.randperm(s, generator=gen)[:40].sort().values for _ in range(b * 2)]).view(b, 2, 40).to(torch.int32)
    out, lse = reference.block_sparse_attention(q, k, v, mask, block_size=bs, scale=0.2, columns=cols)
    tok = torch.arange(s) // bs
    allowed = mask[:, :, tok][:, :, :, tok] | reference.column_rows(cols, hq, s)[:, :, None, :]
    assert_close(out, _explicit_attention(q, k, v, allowed, 0.2), "fp32", what="blocks + columns")
    assert torch.isfinite(lse).all()


def test_columns_covering_every_key_give_dense_attention():
    q, k, v = qkv_inputs("random", 1, 130, 4, 1, 32, seed=5)
    nb = 3
    diag = torch.eye(nb, dtype=torch.bool).expand(1, 4, nb, nb)
    every = torch.arange(130, dtype=torch.int32).view(1, 1, 130)
    out, _ = reference.block_sparse_attention(q, k, v, diag, block_size=64, scale=0.3, columns=every)
    assert_close(out, reference.dense_attention(q, k, v, 0.3), "fp32", what="all columns = dense")


# ----------------------------------------------------------------------------------------------- plan
def test_column_counts_and_density_count_what_the_kernel_reads():
    b, hq, s, bs = 1, 4, 300, 64
    nb = 5
    mask = torch.eye(nb, dtype=torch.bool).expand(b, hq, nb, nb).clone()
    mask[0, 3] = True  # head 3 keeps every causal block: its rows read no columns
    plan = BlockPlan.from_mask(mask, block_size=bs, seq_len=s)
    cols = torch.tensor([[[0, 63, 64, 200, 299]]], dtype=torch.int32)
    plan = dataclasses.replace(plan, columns=cols)
    assert plan.column_counts().tolist() == [[[2, 3, 3, 4, 5]]]  # columns <= 63, 127, 191, 255, 299
    strips = (3 + 3 + 4 + 5) / bs  # query block 0 keeps its one causal block: a full row, nothing to read
    want = torch.tensor([[strips, strips, strips, 0.0]]) / (nb * (nb + 1) / 2)
    assert torch.allclose(plan.column_density(), want)
    assert torch.equal(dataclasses.replace(plan, columns=None).column_density(), torch.zeros(1, 4))


# ----------------------------------------------------------------------------------------------- API
def test_plan_blocks_attaches_columns_only_when_asked():
    q, k, _ = qkv_inputs("structured", 1, 320, 8, 2, 64, seed=6)
    base = ProxyAttnConfig(block_size=64, min_budget_tokens=64, budget_fraction=0.2, dense_density=None)
    assert proxyattn.plan_blocks(q, k, base).columns is None
    cfg = base.replace(column_fraction=0.25, proxy_heads=2)
    plan = proxyattn.plan_blocks(q, k, cfg)
    assert plan.columns.shape == (1, 2, 128)
    assert torch.equal(plan.columns, proxyattn.proxy_columns(q, k, cfg))
    # The blocks rank by scores without the column keys (the public proxy_scores stage computes the same).
    exclude = reference.column_rows(plan.columns, 2, 320)
    scores = reference.proxy_scores(q, k, proxy_heads=2, block_size=64, stride=4, scale=0.125, exclude=exclude)
    assert torch.equal(proxyattn.proxy_scores(q, k, cfg), scores)
    blocks_only = proxyattn.select_blocks(scores, plan.budget_blocks, 320, cfg)
    assert torch.equal(plan.order, blocks_only.order) and torch.equal(plan.counts, blocks_only.counts)
    ref = proxyattn.api.reference_plan(q, k, cfg, scale=0.125)
    assert torch.equal(ref.columns, plan.columns)
    assert proxyattn.proxy_columns(q, k, base) is None
    # Rule 3 (the default) ranks by the same column-free scores and counts the columns' mass as held (fewer blocks
    # here); the last-block rules keep the full ranking and count blocks only.
    rule = ProxyAttnConfig(block_size=64, min_budget_tokens=64, proxy_heads=2, dense_density=None, column_fraction=0.25)
    assert torch.equal(proxyattn.proxy_scores(q, k, rule), scores)
    with_cols = proxyattn.plan_blocks(q, k, rule)
    assert with_cols.columns is not None and torch.equal(with_cols.order, blocks_only.order)
    assert with_cols.counts.sum() < proxyattn.plan_blocks(q, k, rule.replace(column_fraction=0.0)).counts.sum()
    row = rule.replace(budget_rule="row_recall")
    plain = row.replace(column_fraction=0.0)
    assert torch.equal(proxyattn.proxy_scores(q, k, row), proxyattn.proxy_scores(q, k, plain))
    row_plan, plain_plan = proxyattn.plan_blocks(q, k, row), proxyattn.plan_blocks(q, k, plain)
    assert torch.equal(row_plan.order, plain_plan.order) and torch.equal(row_plan.counts, plain_plan.counts)


def test_proxy_attention_with_columns_is_the_reference_and_closer_to_dense():
    """Structured inputs (heavy hitters scattered over the sequence): columns at equal blocks lower the error."""
    q, k, v = qkv_inputs("structured", 2, 640, 8, 2, 64, seed=7)
    base = ProxyAttnConfig(block_size=64, min_budget_tokens=64, budget_fraction=0.1, dense_density=None, dense_below_tokens=0)
    cfg = base.replace(column_fraction=0.1)
    plan = proxyattn.plan_blocks(q, k, cfg)
    out = proxyattn.proxy_attention(q, k, v, cfg)
    want, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=64, scale=0.125, columns=plan.columns)
    assert_close(out, want, "fp32", what="proxy_attention with columns")
    dense = reference.dense_attention(q, k, v, 0.125)
    err = ((out - dense).norm() / dense.norm()).item()
    err_blocks = ((proxyattn.proxy_attention(q, k, v, base) - dense).norm() / dense.norm()).item()
    assert err < 0.5 * err_blocks, (err, err_blocks)


def test_packed_batches_refuse_columns_by_name():
    q, k, v = (t[0] for t in qkv_inputs("random", 1, 128, 4, 1, 32, seed=8))
    cu = torch.tensor([0, 60, 128], dtype=torch.int32)
    cfg = ProxyAttnConfig(block_size=64, column_fraction=0.1)
    with pytest.raises(ValueError, match=r"column_fraction=0.1: proxy_attention_varlen does not take vertical columns; allowed: 0"):
        proxyattn.proxy_attention_varlen(q, k, v, cu, 68, cfg)
    with pytest.raises(ValueError, match=r"column_fraction=0.1: plan_blocks_varlen does not take vertical columns; allowed: 0"):
        proxyattn.plan_blocks_varlen(q, k, cu, 68, cfg)
    plan = proxyattn.plan_blocks_varlen(q, k, cu, 68, cfg.replace(column_fraction=0.0))
    with pytest.raises(ValueError, match=r"plan.columns is set"):
        proxyattn.block_sparse_attention_varlen(q, k, v, cu, 68, dataclasses.replace(plan, columns=torch.zeros(2, 1, 8, dtype=torch.int32)))
