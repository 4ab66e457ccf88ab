"""Budget rule 3 ("block_recall"): the reference against brute force, its oracles, the plan, the Triton needs kernel
(TRITON_INTERPRET=1 on the CPU, small shapes) against the reference, and the engines that run it."""

import math

import pytest
import torch

import proxyattn as pa
from proxyattn import ProxyAttnConfig, reference
from proxyattn.plan import compact_plan_needs
from proxyattn.testing import need_mismatches
from tests.helpers import assert_close, qkv_inputs


def _qk(kind, b, s, hq, hkv, d, seed, dtype=torch.float32):
    return qkv_inputs(kind, b, s, hq, hkv, d, seed, dtype)[:2]


def _brute_needs(q, k, scores, bs, gamma, scale, rows, keep_sink=True, keep_diagonal=True, columns=None):
    """Per (b, h, m) with Python loops: softmax of each measured row (token by token), block sums, the block's
    ranking sorted by hand (forced blocks first, then score, ties to the lower index), the first prefix >= gamma.
    columns `[B, G, C]`: the row's mass on head h's columns (row h // (Hq / G)) starts the sum, and each block sums
    only its other keys."""
    b, s, hq, _ = q.shape
    nb = -(-s // bs)
    rep = hq // scores.shape[1]
    out = torch.zeros(b, hq, nb, dtype=torch.int32)
    for bi in range(b):
        for h in range(hq):
            kh = k[bi, :, h // (hq // k.shape[2])].double()
            for m in range(nb):
                row = scores[bi, h // rep, m].double()
                forced = [n for n, on in ((0, keep_sink), (m, keep_diagonal)) if on]

                def rank(n, row=row):
                    return -row[n].item(), n

                ranked = sorted(set(forced), key=rank) + sorted(set(range(m + 1)) - set(forced), key=rank)
                step = bs // rows
                need = 0
                for t in (min(s, (m + 1) * bs) - 1 - i * step for i in range(rows)):
                    if t < m * bs:
                        continue
                    w = torch.softmax(kh[: t + 1] @ q[bi, t, h].double() * scale, dim=0)
                    total, j = 0.0, 0
                    if columns is not None:
                        cols = {int(c) for c in columns[bi, h // (hq // columns.shape[1])] if c <= t}
                        total = float(sum(w[c] for c in cols))
                        w = w.clone()
                        w[sorted(cols)] = 0.0
                    mass = [float(w[n * bs : (n + 1) * bs].sum()) for n in range(m + 1)]
                    while j < m + 1 and total < gamma:
                        total += mass[ranked[j]]
                        j += 1
                    need = max(need, max(j, 1))
                out[bi, h, m] = need
    return out


# (kind, B, S, Hq, Hkv, D, block, rows, gamma): ragged S, GQA 1/4/7/8, D 64/128/256, B > 1, rows 1..8.
REF_CASES = [
    ("random", 2, 300, 4, 1, 64, 64, 4, 0.9),
    ("structured", 1, 517, 8, 8, 128, 128, 8, 0.95),
    ("random", 1, 200, 7, 1, 256, 64, 2, 0.8),
    ("structured", 2, 333, 8, 1, 64, 64, 1, 0.95),
]


@pytest.mark.parametrize("case", REF_CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_needs_equal_brute_force(case):
    kind, b, s, hq, hkv, d, bs, rows, gamma = case
    q, k = _qk(kind, b, s, hq, hkv, d, seed=1)
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=1, block_size=bs, stride=4, scale=scale)
    got = reference.block_needs(q, k, scores, block_size=bs, gamma=gamma, scale=scale, rows=rows, keep_sink=True, keep_diagonal=True)
    brute = _brute_needs(q, k, scores, bs, gamma, scale, rows)
    # fp32 against float64 sums: a row whose cumulative mass passes gamma within rounding may differ by a block.
    rows_cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, recall_rows=rows)
    assert int((got != brute).sum()) == 0 or need_mismatches(got, q, k, scores, rows_cfg, scale) == 0
    assert (got >= 1).all() and (got <= torch.arange(1, got.shape[-1] + 1)).all()


def _random_columns(b, g, s, n, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.stack([torch.randperm(s, generator=gen)[:n].sort().values for _ in range(g)]) for _ in range(b)]).int()


# (kind, B, S, Hq, Hkv, G, D, block, rows, gamma, columns): GQA 1/4/7, two proxy heads, ragged S, B > 1.
COLUMN_CASES = [
    ("structured", 2, 333, 8, 2, 2, 64, 64, 4, 0.9, 24),
    ("random", 1, 300, 4, 1, 1, 64, 64, 2, 0.8, 64),
    ("structured", 1, 517, 7, 1, 1, 128, 128, 4, 0.95, 40),
]


@pytest.mark.parametrize("case", COLUMN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_needs_with_columns_equal_brute_force(case):
    kind, b, s, hq, hkv, g, d, bs, rows, gamma, n = case
    q, k = _qk(kind, b, s, hq, hkv, d, seed=2)
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=4, scale=scale)
    cols = _random_columns(b, g, s, n, seed=s)
    kw = dict(block_size=bs, gamma=gamma, scale=scale, rows=rows, keep_sink=True, keep_diagonal=True)
    got = reference.block_needs(q, k, scores, columns=cols, **kw)
    brute = _brute_needs(q, k, scores, bs, gamma, scale, rows, columns=cols)
    rows_cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, recall_rows=rows, proxy_heads=g)
    assert int((got != brute).sum()) == 0 or need_mismatches(got, q, k, scores, rows_cfg, scale, columns=cols) == 0
    # Columns only ever add held mass: no entry needs more blocks than without them, and some need fewer here.
    plain = reference.block_needs(q, k, scores, **kw)
    assert (got <= plain).all() and (got < plain).any()


def test_columns_holding_every_key_need_one_block():
    q, k = _qk("structured", 1, 300, 4, 1, 64, seed=4)
    scores = reference.proxy_scores(q, k, proxy_heads=1, block_size=64, stride=4, scale=0.125)
    every = torch.arange(300, dtype=torch.int32)[None, None]
    kw = dict(block_size=64, gamma=0.95, scale=0.125, rows=4, keep_sink=True, keep_diagonal=True)
    got = reference.block_needs(q, k, scores, columns=every, **kw)
    assert got.eq(1).all()


def test_plan_with_columns_counts_their_mass():
    """plan_blocks (CPU: the reference) with columns ranks the blocks by scores without the column keys and keeps,
    per (head, query block), the needs of the column-aware rule; the same config without columns keeps more."""
    q, k, v = qkv_inputs("structured", 1, 700, 8, 2, 64, 5, torch.float32)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, dense_density=None, column_fraction=0.1)
    plan = pa.plan_blocks(q, k, cfg, scale=0.125)
    cols = pa.proxy_columns(q, k, cfg, scale=0.125)
    assert plan.columns.equal(cols)
    needs = pa.block_needs(q, k, cfg, scale=0.125)
    scores = pa.proxy_scores(q, k, cfg, scale=0.125)  # without the column keys (rule 3 with columns)
    exclude = reference.column_rows(cols, cols.shape[1], 700)
    assert torch.equal(scores, reference.proxy_scores(q, k, proxy_heads=1, block_size=64, stride=4, scale=0.125, exclude=exclude))
    assert need_mismatches(needs, q, k, scores, cfg, 0.125, columns=cols) == 0
    want = compact_plan_needs(scores, needs, plan.budget_blocks, 700, cfg)
    assert plan.counts.equal(want.counts)
    without = pa.plan_blocks(q, k, cfg.replace(column_fraction=0.0), scale=0.125)
    assert plan.counts.sum() < without.counts.sum()


def test_row_positions():
    assert reference.recall_row_positions(0, 1000, 128, 4) == [127, 95, 63, 31]
    assert reference.recall_row_positions(7, 1000, 128, 4) == [999, 967, 935, 903]  # short last block: from its end
    assert reference.recall_row_positions(7, 900, 128, 4) == [899]  # 4 tokens in the block
    assert reference.recall_row_positions(1, 256, 128, 1) == [255]


def test_full_gamma_is_dense_and_plan_matches_brute_force_selection():
    q, k = _qk("structured", 2, 450, 8, 2, 64, seed=4)
    cfg = ProxyAttnConfig(block_size=64, budget_rule=3, gamma=1.0, min_budget_tokens=0, dense_below_tokens=0)
    plan = pa.plan_blocks(q, k, cfg)
    nb = plan.num_blocks
    assert plan.to_mask().equal(torch.ones(nb, nb, dtype=torch.bool).tril().expand(2, 8, nb, nb))
    v = torch.randn(2, 450, 2, 64)
    assert_close(pa.proxy_attention(q, k, v, cfg), reference.dense_attention(q, k, v, 0.125), "fp32", what="gamma 1 = dense")
    cfg = cfg.replace(gamma=0.9, min_budget_tokens=128, proxy_heads=2)
    scores = pa.proxy_scores(q, k, cfg)
    needs = pa.block_needs(q, k, cfg, scores=scores)
    plan = pa.plan_blocks(q, k, cfg)
    brute = reference.select_blocks(scores, plan.budget_blocks, min_blocks=2, keep_sink=True, keep_diagonal=True, needs=needs)
    assert plan.to_mask().equal(brute)
    assert plan.budget_blocks.equal(needs[..., -1].clamp(min=2))
    assert pa.head_budgets(q, k, cfg, scores=scores).equal(plan.budget_blocks)
    assert pa.select_blocks(scores, plan.budget_blocks, 450, cfg, needs=needs).to_mask().equal(brute)


def test_needs_follow_each_query_block():
    # Query block 3 of head 1 copies key block 1 (a token the last block never reads): rule 3 keeps block 1 there,
    # rule 2 (one budget from the last block, scaled by position) keeps fewer blocks in block 3.
    torch.manual_seed(0)
    s, d, bs = 6 * 64, 64, 64
    q = torch.randn(1, s, 2, d) * 0.1
    k = torch.randn(1, s, 1, d) * 0.1
    k[0, 64 + 5, 0] = 4.0 * torch.ones(d) / math.sqrt(d) * 8
    q[0, 3 * 64 : 4 * 64, 1] = k[0, 64 + 5, 0]
    cfg = ProxyAttnConfig(block_size=bs, gamma=0.9, min_budget_tokens=0, dense_below_tokens=0)
    needs = pa.block_needs(q, k, cfg.replace(budget_rule=3))
    plan3 = pa.plan_blocks(q, k, cfg.replace(budget_rule=3))
    assert plan3.to_mask()[0, 1, 3, 1], "rule 3 keeps the block the middle query block copies from"
    assert needs[0, 1, 3] >= 2
    mass3 = reference.recall_row_cum_mass(
        q, k, pa.proxy_scores(q, k, cfg), 3, block_size=bs, scale=0.125, rows=4, keep_sink=True, keep_diagonal=True
    )
    assert (mass3[0, 1, :, int(needs[0, 1, 3]) - 1] >= 0.9).all()


def test_config_and_attrs():
    cfg = ProxyAttnConfig(budget_rule=3, recall_rows=8)
    assert ProxyAttnConfig().budget_rule == 3 and ProxyAttnConfig().recall_rows == 4
    assert ProxyAttnConfig.from_attrs(cfg.to_attrs()) == cfg and cfg.to_attrs()["pa_recall_rows"] == 8
    for bad in (0, 3, 256, True, 4.0):
        with pytest.raises(ValueError, match="recall_rows"):
            ProxyAttnConfig(recall_rows=bad)
    with pytest.raises(
        ValueError,
        match=r"recall_rows=128 must be a power of two dividing block_size=64; "
        r"allowed: \[1, 2, 4, 8, 16, 32, 64\]",
    ):
        ProxyAttnConfig(block_size=64, recall_rows=128)


def test_engines_are_built_with_the_default_config():
    """Every model of the table exports the project's default method (budget rule 3 and the dense fallback); an
    entry changes only what it names."""
    from engines.models import MODELS

    default = ProxyAttnConfig()
    for spec in MODELS.values():
        assert spec.proxyattn.budget_rule == default.budget_rule == 3, spec.name
        assert spec.proxyattn.dense_density == default.dense_density == 0.8, spec.name
        assert spec.proxyattn.recall_rows == default.recall_rows, spec.name
    assert MODELS["llama3-8b"].proxyattn == default


def test_tensorrt_rewrite_takes_block_recall_and_the_dense_fallback():
    from onnx import TensorProto, helper

    from export.contract import encode_attrs
    from plugins.tensorrt import graph

    attrs = encode_attrs(ProxyAttnConfig(), scale=0.125)
    node = helper.make_node("ProxyAttention", ["q", "k", "v"], ["o"], name="attn0", domain="proxy", **attrs)
    g = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"],
        [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)],
    )
    kinds = [n.op_type for n in graph._rewrite_node(node, g, 4096) if n.domain == "proxy"]
    assert kinds == [
        "ProxyPool",
        "ProxyPool",
        "ProxyScores",
        "ProxyRank",
        "ProxyMassStats",
        "ProxyMass",
        "ProxyNeedsMass",
        "ProxyNeedsCut",
        "ProxySparseAttention",
    ]


# ------------------------------------------------------------------------------------------- Triton kernel
# (kind, B, S, Hq, Hkv, D, block, rows, proxy heads, gamma, dtype): Nb above 16 (buckets wider than one
# position), ragged S, GQA 1/4/7/8, D 64/128/256, B > 1, rows 1/2/4/8.
KERNEL_CASES = [
    ("random", 1, 2600, 4, 1, 64, 64, 4, 1, 0.95, torch.bfloat16),
    ("structured", 2, 1700, 4, 2, 64, 64, 2, 2, 0.999, torch.bfloat16),
    ("structured", 1, 2600, 7, 1, 64, 64, 4, 1, 0.9, torch.bfloat16),
    ("random", 2, 300, 8, 1, 128, 64, 8, 1, 0.9, torch.float16),
    ("structured", 1, 517, 8, 8, 128, 128, 1, 2, 0.95, torch.float32),
    ("random", 1, 200, 4, 4, 256, 64, 4, 1, 0.8, torch.bfloat16),
]


def _check_needs_kernel(case, column_fraction=0.0):
    """The needs kernel (and its last-block form and plan) against the reference on one KERNEL_CASES shape; with
    column_fraction, random columns whose mass counts as held (never more blocks than without them)."""
    from proxyattn.kernels import estimate_select as esel

    kind, b, s, hq, hkv, d, bs, rows, g, gamma, dtype = case
    q, k = _qk(kind, b, s, hq, hkv, d, seed=3, dtype=dtype)
    cfg = ProxyAttnConfig(
        block_size=bs,
        budget_rule=3,
        gamma=gamma,
        recall_rows=rows,
        proxy_heads=g,
        min_budget_tokens=0,
        dense_below_tokens=0,
        dense_density=None,
        column_fraction=column_fraction,
    )
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=4, scale=scale)
    cols = _random_columns(b, g, s, cfg.num_columns(s), seed=s) if column_fraction else None
    got = esel.block_needs(q, k, scores, cfg, scale, columns=cols)
    assert got.dtype == torch.int32 and got.shape == (b, hq, -(-s // bs))
    assert need_mismatches(got, q, k, scores, cfg, scale, columns=cols) == 0
    if cols is not None:
        assert (got <= esel.block_needs(q, k, scores, cfg, scale)).all()
    last = esel.block_needs(q, k, scores, cfg, scale, last_only=True, columns=cols)
    assert last[..., -1].equal(got[..., -1]) and not last[..., :-1].any()
    plan = esel.needs_plan(q, k, scores, cfg, scale, columns=cols)
    own = compact_plan_needs(scores, got, plan.budget_blocks, s, cfg)
    assert plan.order.equal(own.order) and plan.counts.equal(own.counts)


@pytest.mark.interpret
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c[:-1])))
def test_needs_kernel_against_reference(case):
    _check_needs_kernel(case)


@pytest.mark.interpret
@pytest.mark.parametrize("case", KERNEL_CASES[:3] + KERNEL_CASES[4:5], ids=lambda c: "-".join(map(str, c[:-1])))
def test_needs_kernel_with_columns_against_reference(case):
    _check_needs_kernel(case, column_fraction=0.05)


@pytest.mark.interpret
def test_needs_kernel_packed_batch_equals_each_sequence_alone():
    from proxyattn.kernels import estimate_scores as es
    from proxyattn.kernels import estimate_select as esel

    lengths = [333, 0, 70, 150]
    hq, hkv, d, bs = 4, 2, 64, 64
    cfg = ProxyAttnConfig(block_size=bs, budget_rule=3, gamma=0.95, min_budget_tokens=64, dense_below_tokens=100)
    scale = 0.125
    qs, ks = zip(*(_qk("random", 1, max(n, 1), hq, hkv, d, seed=10 + i, dtype=torch.bfloat16) for i, n in enumerate(lengths)))
    q = torch.cat([x[0, :n] for x, n in zip(qs, lengths)])
    k = torch.cat([x[0, :n] for x, n in zip(ks, lengths)])
    cu = torch.tensor([0, 333, 333, 403, 553], dtype=torch.int32)
    plan = esel.plan_blocks_varlen(q, k, cu, 333, cfg, scale)
    for i, n in enumerate(lengths):
        nbi = -(-n // bs)
        assert plan.counts[i, :, nbi:].eq(0).all()
        if n == 0:
            continue
        lo = int(cu[i])
        if n <= cfg.dense_below_tokens:  # a packed batch keeps short sequences whole
            assert plan.counts[i, :, :nbi].equal(torch.arange(1, nbi + 1, dtype=torch.int32).expand(hq, nbi))
            continue
        qi, ki = q[None, lo : lo + n], k[None, lo : lo + n]
        alone = esel.needs_plan(qi, ki, es.proxy_scores(qi, ki, cfg, scale), cfg, scale)
        assert plan.counts[i, :, :nbi].equal(alone.counts[0]) and plan.budget_blocks[i].equal(alone.budget_blocks[0])
