"""The public API on the CPU: oracles, selection against brute force, plan invariants, config, errors."""

from __future__ import annotations

import math

import pytest
import torch

import proxyattn as pa
from proxyattn import reference as ref
from proxyattn.plan import BlockPlan
from tests.helpers import assert_close
from tests.test_reference import SHAPES, make_qkv


def shape_id(s):
    return "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s)


def small_config(bs, **kw):
    base = dict(block_size=bs, min_budget_tokens=bs, dense_below_tokens=0)
    base.update(kw)
    return pa.ProxyAttnConfig(**base)


# ----------------------------------------------------------------------------------------------- oracles
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_full_budget_is_dense(shape):
    b, s, hq, hkv, d, bs = shape
    q, k, v = make_qkv(b, s, hq, hkv, d, seed=10)
    cfg = pa.ProxyAttnConfig(block_size=bs, gamma=1.0, min_budget_tokens=0, dense_below_tokens=0)
    plan = pa.plan_blocks(q, k, cfg)
    assert torch.all(plan.density() == 1.0)
    assert_close(pa.proxy_attention(q, k, v, cfg), pa.dense_attention(q, k, v), "fp32")


def test_short_sequences_take_dense_path():
    q, k, v = make_qkv(1, 200, 4, 2, 64, seed=11)
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.1, min_budget_tokens=0, dense_below_tokens=200, dense_density=None)
    assert_close(pa.proxy_attention(q, k, v, cfg), pa.dense_attention(q, k, v), "fp32")
    sparse = pa.proxy_attention(q, k, v, cfg.replace(dense_below_tokens=199))
    assert (sparse - pa.dense_attention(q, k, v)).abs().max() > 1e-3  # really took the sparse path


# ------------------------------------------------------------------------------------- stages vs brute force
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("sink,diag", [(True, True), (False, False), (True, False)])
def test_selection_matches_brute_force(shape, sink, diag):
    b, s, hq, hkv, d, bs = shape
    q, k, v = make_qkv(b, s, hq, hkv, d, seed=12, temperature=6.0)
    for proxy_heads in sorted({1, hkv}):
        cfg = small_config(bs, gamma=0.6, keep_sink=sink, keep_diagonal=diag, proxy_heads=proxy_heads, min_budget_tokens=0)
        scores = pa.proxy_scores(q, k, cfg)
        budgets = pa.head_budgets(q, k, cfg)
        plan = pa.select_blocks(scores, budgets, s, cfg)
        want = ref.select_blocks(scores, budgets, min_blocks=0, keep_sink=sink, keep_diagonal=diag)
        assert torch.equal(plan.to_mask(), want)
        # And the attention over that plan is the brute-force masked attention.
        out = pa.block_sparse_attention(q, k, v, plan)
        want_out, _ = ref.block_sparse_attention(q, k, v, want, block_size=bs, scale=1 / math.sqrt(d))
        assert_close(out, want_out, "fp32")


def test_selection_ties_prefer_lower_index():
    scores = torch.zeros(1, 1, 4, 4)  # every causal block ties
    plan = pa.select_blocks(
        scores, torch.tensor([[2]], dtype=torch.int32), 4 * 64, small_config(64, keep_sink=False, keep_diagonal=False, min_budget_tokens=0)
    )
    mask = plan.to_mask()[0, 0]
    # Row 3 keeps ceil(2*4/4) = 2 blocks: the two lowest indices.
    assert mask[3].tolist() == [True, True, False, False]


def test_lse_matches_logsumexp():
    q, k, v = make_qkv(2, 200, 4, 2, 64, seed=13)
    plan = pa.plan_blocks(q, k, small_config(64, gamma=0.7))
    out, lse = pa.block_sparse_attention_with_lse(q, k, v, plan)
    mask = plan.to_mask()
    kx = k.repeat_interleave(2, dim=2)
    logits = torch.einsum("bqhd,bkhd->bhqk", q, kx) / 8.0
    tb = torch.arange(200) // 64
    allowed = mask[:, :, tb][:, :, :, tb] & torch.ones(200, 200, dtype=torch.bool).tril()
    assert_close(lse, torch.logsumexp(logits.masked_fill(~allowed, float("-inf")), -1), "fp32")
    assert_close(out, pa.block_sparse_attention(q, k, v, plan), "fp32")


# ------------------------------------------------------------------------------------------ plan invariants
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_plan_invariants(shape):
    b, s, hq, hkv, d, bs = shape
    q, k, _ = make_qkv(b, s, hq, hkv, d, seed=14, temperature=6.0)
    cfg = small_config(bs, gamma=0.7, min_budget_tokens=bs * 2)
    plan = pa.plan_blocks(q, k, cfg)
    nb = plan.num_blocks
    assert plan.budget_blocks.shape == (b, hq) and plan.counts.shape == (b, hq, nb)
    assert torch.all((plan.budget_blocks >= 1) & (plan.budget_blocks <= nb))
    m1 = torch.arange(1, nb + 1)
    assert torch.all(plan.counts <= m1) and torch.all(plan.counts >= torch.clamp(m1, max=2))
    mask = plan.to_mask()
    assert torch.all(mask[..., 0]), "sink block kept in every row"
    assert torch.all(mask.diagonal(dim1=-2, dim2=-1)), "diagonal block kept in every row"
    assert not torch.any(mask & ~torch.ones(nb, nb, dtype=torch.bool).tril()), "nothing above the diagonal"
    assert torch.equal(mask.sum(-1).int(), plan.counts)
    assert torch.all((plan.budgets > 0) & (plan.budgets <= 1))


def test_recall_rises_and_density_falls_with_gamma():
    q, k, _ = make_qkv(2, 640, 8, 2, 64, seed=15, temperature=8.0)
    densities, recalls = [], []
    for gamma in (0.3, 0.6, 0.9, 0.99):
        plan = pa.plan_blocks(q, k, small_config(64, gamma=gamma, min_budget_tokens=0))
        densities.append(plan.density().mean().item())
        recalls.append(pa.metrics.attention_recall(q, k, plan).mean().item())
    assert densities == sorted(densities) and densities[0] < densities[-1]
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1] and recalls[-1] > 0.98


def test_recall_of_full_plan_is_one():
    q, k, _ = make_qkv(1, 200, 4, 1, 64, seed=16)
    plan = pa.plan_blocks(q, k, small_config(64, gamma=1.0))
    assert_close(pa.metrics.attention_recall(q, k, plan), torch.ones(1, 4), "fp32")


def test_budget_fraction_is_static():
    q, k, _ = make_qkv(1, 640, 4, 2, 64, seed=17, temperature=8.0)
    plan = pa.plan_blocks(q, k, small_config(64, budget_fraction=0.3, min_budget_tokens=0))
    assert torch.all(plan.budget_blocks == math.ceil(0.3 * 10))


def test_plan_from_mask_round_trip():
    g = torch.Generator().manual_seed(18)
    mask = (torch.rand(2, 3, 5, 5, generator=g) < 0.5) & torch.ones(5, 5, dtype=torch.bool).tril()
    plan = BlockPlan.from_mask(mask, block_size=64, seq_len=300)
    assert torch.equal(plan.to_mask(), mask)


# ---------------------------------------------------------------------------------------------- config
def test_config_defaults_and_round_trip():
    cfg = pa.ProxyAttnConfig()
    assert (cfg.block_size, cfg.stride, cfg.proxy_heads, cfg.gamma, cfg.min_budget_tokens) == (128, 4, 1, 0.83, 2048)
    assert cfg.keep_sink and cfg.keep_diagonal and cfg.dense_below_tokens == 32768 and cfg.budget_fraction is None
    for c in (cfg, pa.ProxyAttnConfig(block_size=64, stride=2, gamma=0.9, budget_fraction=0.1, keep_sink=False, dense_below_tokens=0)):
        attrs = c.to_attrs()
        assert all(type(v) in (int, float) for v in attrs.values())
        assert pa.ProxyAttnConfig.from_attrs(attrs) == c
    assert pa.ProxyAttnConfig(min_budget_tokens=65536).dense_below_tokens == 65536
    assert cfg.replace(min_budget_tokens=4096).dense_below_tokens == 32768
    assert cfg.replace(dense_below_tokens=100).replace(min_budget_tokens=4096).dense_below_tokens == 100


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(block_size=96), "block_size=96"),
        (dict(stride=3), "stride=3"),
        (dict(stride=0), "stride=0"),
        (dict(gamma=0.0), "gamma=0.0"),
        (dict(gamma=1.5), "gamma=1.5"),
        (dict(gamma=float("nan")), "gamma=nan"),
        (dict(proxy_heads=0), "proxy_heads=0"),
        (dict(min_budget_tokens=-1), "min_budget_tokens=-1"),
        (dict(budget_fraction=0.0), "budget_fraction=0.0"),
        (dict(keep_sink=1), "keep_sink=1"),
        (dict(dense_below_tokens=-5), "dense_below_tokens=-5"),
    ],
)
def test_config_errors(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        pa.ProxyAttnConfig(**kwargs)


def test_from_attrs_rejects_unknown_key():
    with pytest.raises(ValueError, match="pa_bogus"):
        pa.ProxyAttnConfig.from_attrs({"pa_bogus": 1})


def _qkv(b=1, s=64, hq=4, hkv=2, d=64, dtype=torch.float32):
    return torch.randn(b, s, hq, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype)


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda: (_qkv()[0][0], *_qkv()[1:]), "q must have 4 dims"),
        (lambda: (_qkv()[0], _qkv(s=32)[1], _qkv()[2]), "k shape"),
        (lambda: (_qkv()[0], _qkv()[1], _qkv(s=32)[2]), "v shape"),
        (lambda: _qkv(hq=6, hkv=4), "Hq=6 must be a multiple of KV heads Hkv=4"),
        (lambda: (_qkv()[0], _qkv(dtype=torch.float16)[1], _qkv()[2]), "k.dtype=torch.float16 differs"),
        (lambda: (_qkv()[0].int(), *_qkv()[1:]), "q.dtype=torch.int32 is not supported"),
        (lambda: _qkv(s=0), "S=0"),
        (lambda: (_qkv()[0] * float("nan"), *_qkv()[1:]), "q contains non-finite"),
        (lambda: (_qkv()[0], _qkv()[1] * float("inf"), _qkv()[2]), "k contains non-finite"),
        (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "k.device=meta differs"),
    ],
)
def test_input_errors(make, needle):
    q, k, v = make()
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        pa.proxy_attention(q, k, v, pa.ProxyAttnConfig(block_size=64, dense_below_tokens=0))


def test_proxy_heads_must_divide_kv_heads():
    q, k, v = _qkv(hq=6, hkv=3)
    with pytest.raises(ValueError, match="proxy_heads=2 must divide the number of KV heads Hkv=3"):
        pa.proxy_attention(q, k, v, pa.ProxyAttnConfig(block_size=64, proxy_heads=2, dense_below_tokens=0))


def test_bad_scale_and_plan_mismatch():
    q, k, v = _qkv(s=200)
    with pytest.raises(ValueError, match="scale=-1"):
        pa.proxy_attention(q, k, v, scale=-1.0)
    plan = pa.plan_blocks(q, k, small_config(64))
    q2, k2, v2 = _qkv(s=150)
    with pytest.raises(ValueError, match="plan covers"):
        pa.block_sparse_attention(q2, k2, v2, plan)
    with pytest.raises(ValueError, match="config must be a ProxyAttnConfig"):
        pa.plan_blocks(q, k, {"gamma": 0.9})


def test_recall_budget_rule_scores_and_validation():
    q, k, _ = make_qkv(1, 200, 4, 2, 64, seed=3, temperature=4.0)
    cfg = pa.ProxyAttnConfig(block_size=64, gamma=0.9, budget_rule=1, min_budget_tokens=64, dense_below_tokens=0)
    with pytest.raises(ValueError, match="scores shape"):
        pa.head_budgets(q, k, cfg, scores=torch.zeros(1, 1, 2, 2))
    scores = pa.proxy_scores(q, k, cfg)
    recall = pa.head_budgets(q, k, cfg, scores=scores)
    assert pa.head_budgets(q, k, cfg).equal(recall)  # scores computed when not given
    assert (recall >= pa.head_budgets(q, k, cfg.replace(budget_rule=0))).all()
    plan = pa.plan_blocks(q, k, cfg)
    assert plan.budget_blocks.equal(recall)
    # gamma = 1 and fixed fractions need no scores.
    assert pa.head_budgets(q, k, cfg.replace(gamma=1.0)).min() == plan.num_blocks
    pa.head_budgets(q, k, cfg.replace(budget_fraction=0.5))
    with pytest.raises(ValueError, match=r"budget_rule=4 .*allowed: mass \(0\), recall \(1\), row_recall \(2\), block_recall \(3\)"):
        pa.ProxyAttnConfig(budget_rule=4)
    assert pa.ProxyAttnConfig.from_attrs(cfg.to_attrs()) == cfg and cfg.to_attrs()["pa_budget_rule"] == 1
