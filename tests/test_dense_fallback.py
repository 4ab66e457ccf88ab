"""The dense fallback (`ProxyAttnConfig.dense_density`): KV groups whose plan is dense enough run dense.

Oracles: a plan dense enough runs the dense path and its output equals dense attention; the decisions against
hand-counted blocks (the threshold at its exact boundary); rule 3's early decision (groups whose last query block
needs the share are not measured); the Triton planning kernels (TRITON_INTERPRET=1, small ugly shapes) give the
reference's plan with the fallback; the eager mixed execution (dense groups through SDPA, the rest through the
block-sparse kernel) equals the whole plan run in the block-sparse kernel; bad values are named.
"""

import math

import pytest
import torch

import proxyattn as pa
from proxyattn import ProxyAttnConfig, reference
from proxyattn.plan import BlockPlan, compact_plan_needs, dense_fallback
from tests.helpers import assert_close, qkv_inputs


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.7"])
def test_bad_dense_density_is_named(value):
    with pytest.raises(ValueError, match=r"dense_density=.* must be (None \(no dense fallback\) or lie in \(0, 1\]|a finite number)"):
        ProxyAttnConfig(dense_density=value)


def test_config_default_round_trip_and_permille():
    cfg = ProxyAttnConfig()
    assert cfg.dense_density == 0.8 and cfg.dense_density_permille == 800
    assert ProxyAttnConfig(dense_density=None).dense_density_permille == 0
    assert ProxyAttnConfig(dense_density=1.0).dense_density_permille == 1000
    assert ProxyAttnConfig(dense_density=0.0004).dense_density_permille == 1  # never rounds to "off"
    for c in (cfg, ProxyAttnConfig(dense_density=None), ProxyAttnConfig(dense_density=0.55)):
        attrs = c.to_attrs()
        assert ProxyAttnConfig.from_attrs(attrs) == c
    assert ProxyAttnConfig(dense_density=None).to_attrs()["pa_dense_density"] == 0.0


def test_group_decisions_against_hand_counts():
    # B=1, Hq=4, Hkv=2 (groups of 2 heads), Nb=4: 10 causal blocks per head, 20 per group.
    full = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    counts = torch.stack([full, full, torch.tensor([1, 1, 1, 1]), torch.tensor([1, 2, 2, 2])]).to(torch.int32)[None]
    # group 0 keeps 20/20, group 1 keeps 4 + 7 = 11/20 = 0.55
    assert reference.dense_groups(counts, 2, 550).tolist() == [[True, True]]  # 11 * 1000 >= 550 * 20: the boundary
    assert reference.dense_groups(counts, 2, 551).tolist() == [[True, False]]
    assert reference.dense_groups(counts, 2, 1000).tolist() == [[True, False]]
    assert reference.dense_groups(counts, 2, 0).tolist() == [[False, False]]  # off
    new, heads = reference.apply_dense_groups(counts, torch.tensor([[False, True]]))
    assert heads.tolist() == [[False, False, True, True]]
    assert new[0, 2:].tolist() == [[1, 2, 3, 4]] * 2 and new[0, :2].equal(counts[0, :2])
    # A packed batch: a sequence of 2 blocks (3 causal blocks per head), query blocks past its end count 0.
    packed = torch.tensor([[[1, 2, 0, 0], [1, 1, 0, 0]]], dtype=torch.int32)
    assert reference.dense_groups(packed, 1, 833, torch.tensor([2])).tolist() == [[True]]  # 5/6 = 0.8333
    assert reference.dense_groups(packed, 1, 834, torch.tensor([2])).tolist() == [[False]]
    new, _ = reference.apply_dense_groups(packed, torch.tensor([[True]]), torch.tensor([2]))
    assert new.tolist() == [[[1, 2, 0, 0], [1, 2, 0, 0]]]
    # Early decision: the heads' last-block budgets (paper's rule) summed over the group against group x Nb_b.
    needs_last = torch.tensor([[4, 3, 1, 2]], dtype=torch.int32)  # groups: 7/8, 3/8
    assert reference.early_dense_groups(needs_last, 2, 875, torch.tensor([4])).tolist() == [[True, False]]
    assert reference.early_dense_groups(needs_last, 2, 876, torch.tensor([4])).tolist() == [[False, False]]
    assert reference.early_dense_groups(needs_last, 2, 375, torch.tensor([4])).tolist() == [[True, True]]


@pytest.mark.parametrize(
    "cfg",
    [
        ProxyAttnConfig(block_size=64, min_budget_tokens=64, dense_below_tokens=0, dense_density=0.7),
        ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, budget_rule=2, gamma=0.9, dense_density=0.7),
        ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.6, dense_density=0.7),
    ],
    ids=["rule3", "rule2", "fraction"],
)
def test_diffuse_attention_runs_dense_and_equals_dense(cfg):
    """Random q/k (near-uniform attention): every plan is dense enough, every head runs dense, output = dense."""
    q, k, v = qkv_inputs("random", 2, 517, 8, 2, 64, seed=1)
    plan = pa.plan_blocks(q, k, cfg)
    nb = plan.num_blocks
    assert plan.dense_heads is not None and plan.dense_heads.all()
    assert plan.counts.equal(torch.arange(1, nb + 1, dtype=torch.int32).expand_as(plan.counts))
    assert plan.density().eq(1.0).all()
    dense = reference.dense_attention(q, k, v, 1 / 8)
    assert_close(pa.proxy_attention(q, k, v, cfg), dense, "fp32", what="fallback output vs dense")
    off = pa.plan_blocks(q, k, cfg.replace(dense_density=None))
    assert off.dense_heads is None
    assert reference.dense_groups(off.counts, 2, cfg.dense_density_permille).all()  # the late decision alone suffices


def test_structured_plan_keeps_sparse_groups_unchanged():
    q, k, _ = qkv_inputs("structured", 1, 1100, 8, 4, 64, seed=2)
    base = ProxyAttnConfig(block_size=64, min_budget_tokens=64, dense_below_tokens=0, dense_density=None)
    off = pa.plan_blocks(q, k, base)
    for dd in (0.3, 0.7, 1.0):
        on = pa.plan_blocks(q, k, base.replace(dense_density=dd))
        heads = on.dense_heads
        assert heads is not None
        # Groups decide together; a sparse group's plan is the plan without the fallback, and the decision is the
        # documented one: at least dense_density of the group's causal blocks (rule 3's early skip aside, which only
        # makes a group dense).
        groups = heads.reshape(1, 4, 2)
        assert (groups == groups[..., :1]).all()
        assert on.counts[~heads].equal(off.counts[~heads])
        late = reference.dense_groups(off.counts, 4, on_permille(dd))
        assert (late.repeat_interleave(2, dim=1) <= heads).all()  # every late-dense group is dense
    assert (
        pa.plan_blocks(q, k, base.replace(dense_density=1.0)).dense_heads.sum()
        <= pa.plan_blocks(q, k, base.replace(dense_density=0.3)).dense_heads.sum()
    )


def on_permille(dd: float) -> int:
    return ProxyAttnConfig(dense_density=dd).dense_density_permille


def test_early_decision_is_made_before_the_scores_and_skips_measuring():
    """The early decision reads only the paper's last-block budgets; its groups run dense in every rule, and rule 3
    does not measure them: their needs are m + 1 everywhere, also where the measured need would be small."""
    q, k, v = qkv_inputs("structured", 1, 900, 4, 2, 64, seed=3)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, gamma=0.9, dense_density=0.3)
    first = reference.rule_budgets(q, k, None, block_size=64, gamma=0.9, scale=1 / 8, budget_rule=0, keep_sink=True, keep_diagonal=True)
    early = pa.early_dense_groups(q, k, cfg)
    assert early.equal(reference.early_dense_groups(first, 2, 300, torch.tensor([15])))
    for rule in (0, 2, 3):
        plan = pa.plan_blocks(q, k, cfg.replace(budget_rule=rule))
        assert (plan.dense_heads.reshape(1, 2, 2)[..., 0] >= early).all(), rule  # early groups are dense
    assert pa.early_dense_groups(q, k, cfg.replace(budget_fraction=0.2)) is None  # a fixed budget decides nothing
    assert pa.early_dense_groups(q, k, cfg.replace(dense_density=None)) is None
    q, k, _ = qkv_inputs("structured", 1, 900, 4, 2, 64, seed=3)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, gamma=0.9)
    scores = pa.proxy_scores(q, k, cfg)
    kw = dict(block_size=64, gamma=0.9, scale=1 / 8, rows=4, keep_sink=True, keep_diagonal=True)
    plain = reference.block_needs(q, k, scores, **kw)
    skip = torch.tensor([[True, False]])
    skipped = reference.block_needs(q, k, scores, skip_groups=skip, **kw)
    nb = scores.shape[-1]
    assert skipped[0, :2].equal(torch.arange(1, nb + 1, dtype=torch.int32).expand(2, nb))
    assert skipped[0, 2:].equal(plain[0, 2:])
    assert (plain[0, :2] < torch.arange(1, nb + 1)).any()  # measuring would have kept fewer


# ------------------------------------------------------------------------------------------- Triton kernels
# (kind, B, S, Hq, Hkv, D, block, rows, proxy heads, gamma, dense_density): ragged S, GQA 1/4/7/8, D 64/128/256,
# B > 1; densities that split groups, none, all.
KERNEL_CASES = [
    ("structured", 2, 1100, 8, 2, 64, 64, 4, 1, 0.95, 0.6),
    ("structured", 1, 700, 7, 1, 128, 64, 2, 1, 0.9, 0.5),
    ("random", 1, 600, 8, 8, 64, 64, 4, 2, 0.95, 0.7),
    ("structured", 2, 517, 8, 1, 256, 128, 1, 1, 0.95, 0.9),
    ("structured", 1, 1300, 4, 4, 64, 64, 4, 1, 0.9, 0.3),
]


@pytest.mark.interpret
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_plan_with_fallback_equals_the_reference(case):
    from proxyattn.kernels import estimate_budgets as eb
    from proxyattn.kernels import estimate_needs as en
    from proxyattn.kernels import estimate_select as esel

    kind, b, s, hq, hkv, d, bs, rows, g, gamma, dd = case
    q, k, _ = qkv_inputs(kind, b, s, hq, hkv, d, seed=5, dtype=torch.bfloat16)
    cfg = ProxyAttnConfig(
        block_size=bs, gamma=gamma, recall_rows=rows, proxy_heads=g, min_budget_tokens=bs, dense_below_tokens=0, dense_density=dd
    )
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=4, scale=scale)
    nb = scores.shape[-1]
    nb_seq = torch.full((b,), nb, dtype=torch.int64)
    first = eb.head_budgets(q, k, cfg.replace(budget_rule=0), scale)  # the early decision's budgets (GPU kernel)
    early = reference.early_dense_groups(first, hkv, cfg.dense_density_permille, nb_seq)
    assert early.equal(pa.early_dense_groups(q, k, cfg, scale=scale))  # the API (reference on the CPU)
    assert eb.early_dense_groups(q, k, cfg, scale).equal(early)  # the fused decision kernel (what CUDA tensors run)
    got = en.needs_plan(q, k, scores, cfg, scale, early=early)
    # The reference decisions on the kernel's own needs (the needs themselves are checked against the reference in
    # tests/test_block_recall.py): the early groups need every block, then compact_plan_needs, then the late decision.
    needs = esel.block_needs(q, k, scores, cfg, scale)
    full = torch.arange(1, nb + 1, dtype=torch.int32)
    needs = torch.where(early.repeat_interleave(hq // hkv, dim=1)[..., None], full, needs)
    want = dense_fallback(
        compact_plan_needs(scores, needs, reference.needs_budgets(needs, cfg.min_budget_blocks), s, cfg), hkv, cfg, early=early
    )
    assert got.order.equal(want.order) and got.counts.equal(want.counts)
    assert got.dense_heads.equal(want.dense_heads) and got.budget_blocks.equal(want.budget_blocks)


@pytest.mark.interpret
@pytest.mark.parametrize("gamma,dd", [(0.9, 0.3), (0.95, 0.6), (1.0, 0.9)])
def test_early_decision_kernel_of_a_packed_batch_equals_the_reference_per_sequence(gamma, dd):
    from proxyattn.kernels import estimate_budgets as eb

    lengths = [700, 0, 129, 333]  # ragged, an empty sequence, one block and one row
    hq, hkv, d, bs = 8, 2, 64, 64
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, min_budget_tokens=bs, dense_below_tokens=0, dense_density=dd)
    scale = 1.0 / math.sqrt(d)
    seqs = [qkv_inputs("structured", 1, n, hq, hkv, d, seed=20 + i, dtype=torch.bfloat16)[:2] for i, n in enumerate(lengths) if n]
    q = torch.cat([x[0][0] for x in seqs])
    k = torch.cat([x[1][0] for x in seqs])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    got = eb.early_dense_groups_varlen(q, k, cu, max(lengths), cfg, scale)
    want, it = [], iter(seqs)
    for n in lengths:
        if n == 0:
            want.append(torch.zeros(1, hkv, dtype=torch.bool))
            continue
        qi, ki = next(it)
        first = reference.rule_budgets(
            qi.float(), ki.float(), None, block_size=bs, gamma=gamma, scale=scale, budget_rule=0, keep_sink=True, keep_diagonal=True
        )
        want.append(reference.early_dense_groups(first, hkv, cfg.dense_density_permille, torch.tensor([-(-n // bs)])))
    assert got.dtype == torch.bool and got.equal(torch.cat(want))


@pytest.mark.interpret
@pytest.mark.parametrize("hq,hkv,permille,with_early", [(8, 2, 600, True), (7, 1, 500, False), (8, 8, 900, True), (16, 4, 1000, False)])
def test_fallback_kernel_equals_the_reference(hq, hkv, permille, with_early):
    from proxyattn.kernels import fallback as fb

    gen = torch.Generator().manual_seed(hq * 100 + permille)
    b, nb = 3, 37
    nb_seq = torch.tensor([37, 5, 0])  # a padded packed batch: a short sequence and an empty one
    m1 = torch.arange(1, nb + 1)
    counts = (torch.rand(b, hq, nb, generator=gen) * (m1 + 1)).floor().clamp(min=1).minimum(m1).to(torch.int32)
    counts[:, :, :][m1.expand(b, hq, nb) > nb_seq.reshape(-1, 1, 1)] = 0  # nothing past a sequence's end
    counts[0, : hq // hkv] = m1.to(torch.int32)  # group 0 of sequence 0 keeps every block: dense at any density
    early = torch.rand(b, hkv, generator=gen) < 0.3 if with_early else None
    cfg = ProxyAttnConfig(dense_density=permille / 1000)
    plan = BlockPlan(torch.zeros(b, 1, nb, nb, dtype=torch.int32), counts, torch.zeros(b, hq, dtype=torch.int32), 64, nb * 64)
    got = fb.dense_fallback(plan, hkv, cfg, nb_seq, early)
    want = dense_fallback(plan, hkv, cfg, nb_seq, early)
    assert got.counts.equal(want.counts) and got.dense_heads.equal(want.dense_heads)
    assert want.dense_heads[0, 0] and not want.dense_heads.all()  # the case decides both ways


@pytest.mark.interpret
def test_eager_mixed_execution_equals_the_whole_plan_in_the_sparse_kernel():
    from proxyattn.kernels import attention as attn

    q, k, v = qkv_inputs("structured", 2, 333, 8, 4, 64, seed=6, dtype=torch.float16)
    cfg = ProxyAttnConfig(block_size=64, budget_fraction=0.3, min_budget_tokens=0, dense_below_tokens=0, dense_density=None)
    plan = pa.plan_blocks(q.float(), k.float(), cfg)
    groups = torch.tensor([[True, False, False, True], [False, False, False, False]])
    counts, heads = reference.apply_dense_groups(plan.counts, groups)
    mixed = BlockPlan(plan.order, counts, plan.budget_blocks, 64, 333, heads)
    got = attn.block_sparse_attention(q, k, v, mixed, 0.125)  # dense groups through SDPA, the rest sparse
    whole = attn.block_sparse_attention(q, k, v, BlockPlan(plan.order, counts, plan.budget_blocks, 64, 333), 0.125)
    assert_close(got.float(), whole.float(), "fp16", what="mixed vs whole plan")
    want = reference.block_sparse_attention(q.float(), k.float(), v.float(), mixed.to_mask(), block_size=64, scale=0.125)[0]
    assert_close(got.float(), want, "fp16", what="mixed vs reference")
    dense = reference.dense_attention(q.float(), k.float(), v.float(), 0.125)
    assert_close(got[0, :, :2].float(), dense[0, :, :2], "fp16", what="dense group 0 vs dense attention")


@pytest.mark.interpret
def test_split_execution_runs_early_groups_dense_and_late_dense_groups_as_full_rows():
    from proxyattn.kernels import attention as attn

    q, k, v = qkv_inputs("structured", 2, 333, 8, 4, 64, seed=7, dtype=torch.float16)
    cfg = ProxyAttnConfig(block_size=64, budget_fraction=0.3, min_budget_tokens=0, dense_below_tokens=0, dense_density=None)
    plan = pa.plan_blocks(q.float(), k.float(), cfg)
    early = torch.tensor([[True, False, False, False], [False, False, False, False]])  # known before the plan
    late = torch.tensor([[False, False, True, False], [False, True, False, False]])  # found dense by the plan
    counts, heads = reference.apply_dense_groups(plan.counts, early | late)
    mixed = BlockPlan(plan.order, counts, plan.budget_blocks, 64, 333, heads)
    got = attn.block_sparse_attention_split(q, k, v, mixed, 0.125, early, early.clone())
    want = reference.block_sparse_attention(q.float(), k.float(), v.float(), mixed.to_mask(), block_size=64, scale=0.125)[0]
    assert_close(got.float(), want, "fp16", what="split execution vs reference")
    dense = reference.dense_attention(q.float(), k.float(), v.float(), 0.125)
    for b, g in ((0, 0), (0, 2), (1, 1)):  # early (dense kernel) and late (full rows) groups equal dense attention
        assert_close(got[b, :, 2 * g : 2 * g + 2].float(), dense[b, :, 2 * g : 2 * g + 2], "fp16", what=f"group {g} of sequence {b}")
    assert (plan.counts != counts).any()  # the plan alone would have skipped blocks of those groups
