"""Block-score estimators of `proxyattn.variants` (config `estimator`) against brute force, and their dispatch."""

from __future__ import annotations

import math

import pytest
import torch

from proxyattn import ProxyAttnConfig, plan_blocks, proxy_attention, proxy_scores, reference, variants
from tests.helpers import assert_close, qkv_inputs


def _qk(b, s, hq, hkv, d, seed=0):
    return qkv_inputs("random", b, s, hq, hkv, d, seed)[:2]


def _brute_head_max(q, k, groups, bs, stride, scale):
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    nb = math.ceil(s / bs)
    out = torch.full((b, groups, nb, nb), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            g = h // (hq // groups)
            kh = h // (hq // hkv)
            for i in range(0, s, stride):
                logits = (q[bi, i, h].double() @ k[bi, : i + 1, kh].double().T) * scale
                p = torch.softmax(logits, dim=0)
                m = i // bs
                for n in range(m + 1):
                    val = p[n * bs : (n + 1) * bs].max()
                    out[bi, g, m, n] = max(out[bi, g, m, n], val)
    return out


def _brute_block_mean(q, k, bs, scale):
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    nb = math.ceil(s / bs)
    out = torch.full((b, hq, nb, nb), float("-inf"), dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            kh = h // (hq // hkv)
            pq = [q[bi, m * bs : (m + 1) * bs, h].double().mean(0) for m in range(nb)]
            pk = [k[bi, n * bs : (n + 1) * bs, kh].double().mean(0) for n in range(nb)]
            for m in range(nb):
                logits = torch.stack([pq[m] @ pk[n] for n in range(m + 1)]) * scale
                out[bi, h, m, : m + 1] = torch.softmax(logits, 0)
    return out


@pytest.mark.parametrize("b,s,hq,hkv,d,groups,bs", [(1, 150, 4, 1, 16, 1, 64), (2, 131, 8, 2, 8, 2, 64), (1, 200, 7, 7, 16, 7, 64)])
def test_head_max_scores_brute_force(b, s, hq, hkv, d, groups, bs):
    q, k = _qk(b, s, hq, hkv, d)
    got = variants.head_max_scores(q, k, proxy_heads=groups, block_size=bs, stride=4, scale=0.3)
    assert_close(got, _brute_head_max(q, k, groups, bs, 4, 0.3), "fp32", allow_inf=True, what="head_max")


@pytest.mark.parametrize("b,s,hq,hkv,d,bs", [(1, 150, 4, 1, 16, 64), (2, 300, 8, 2, 8, 128)])
def test_block_mean_scores_brute_force(b, s, hq, hkv, d, bs):
    q, k = _qk(b, s, hq, hkv, d, seed=1)
    got = variants.block_mean_scores(q, k, block_size=bs, scale=0.25)
    assert_close(got, _brute_block_mean(q, k, bs, 0.25), "fp32", allow_inf=True, what="block_mean")


def test_head_max_equals_proxy_when_heads_agree():
    """Identical heads: the mean proxy query is that head's query, so both estimators give the same scores."""
    q, k = _qk(1, 260, 1, 1, 16, seed=2)
    q4 = q.expand(-1, -1, 4, -1).contiguous()
    ref = reference.proxy_scores(q4, k, proxy_heads=1, block_size=64, stride=4, scale=0.25)
    got = variants.head_max_scores(q4, k, proxy_heads=1, block_size=64, stride=4, scale=0.25)
    assert_close(got, ref, "fp32", allow_inf=True, what="head_max vs proxy")


def test_head_max_keeps_a_block_only_one_head_wants():
    """Head 0 of four retrieves one far token that the others ignore; the others (and so the mean proxy query)
    prefer another block. With a one-block budget head_max ranks head 0's block first, the mean proxy does not."""
    torch.manual_seed(3)
    s, d, bs = 512, 32, 64
    q = torch.randn(1, s, 4, d) * 0.1
    k = torch.randn(1, s, 1, d) * 0.1
    t1, t2 = torch.zeros(d), torch.zeros(d)
    t1[0], t2[1] = 1.0, 1.0
    k[0, 75, 0] += 8 * t1  # key block 1: one token head 0 looks for
    k[0, 260:270, 0] += 8 * t2  # key block 4: what heads 1-3 look for
    q[0, :, 0] += 8 * t1
    q[0, :, 1:] += 8 * t2 - 8 * t1 / 3  # the mean query is neutral towards block 1 and drawn to block 4
    base = dict(block_size=bs, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.125)
    for estimator, kept in ((0, False), (1, True)):
        mask = plan_blocks(q, k, ProxyAttnConfig(**base, estimator=estimator)).to_mask()
        assert bool(mask[0, 0, 7, 1]) is kept, estimator
        assert int(mask[0, 0, 7].sum()) == 3  # sink, diagonal and the one ranked block


def test_estimator_dispatch_and_full_budget_oracle():
    q, k = _qk(2, 300, 4, 2, 16, seed=4)
    v = torch.randn_like(k)
    for e in (1, 2):
        cfg = ProxyAttnConfig(block_size=64, gamma=1.0, min_budget_tokens=0, dense_below_tokens=0, estimator=e, dense_density=None)
        assert_close(proxy_scores(q, k, cfg), variants.proxy_scores(q, k, cfg, 0.25), "fp32", allow_inf=True, what="dispatch")
        dense = reference.dense_attention(q, k, v, 0.25)
        assert_close(proxy_attention(q, k, v, cfg), dense, "fp32", what=f"estimator {e} full budget")
        plan = plan_blocks(q, k, cfg.replace(gamma=0.5))
        assert plan.order.shape[1] == (4 if e == 2 else 1)  # block_mean ranks per query head (R = Hq)
        assert plan.to_mask()[:, :, :, 0].all() and plan.to_mask().diagonal(dim1=-2, dim2=-1).all()
        # Both ranking rules read this estimator's own ranking (R = G or Hq); row recall never keeps less.
        rows = plan_blocks(q, k, cfg.replace(gamma=0.5, budget_rule=2))
        assert (rows.budget_blocks >= plan.budget_blocks).all() and (rows.counts >= plan.counts).all()


def test_estimator_validation_and_round_trip():
    with pytest.raises(ValueError, match="estimator=3"):
        ProxyAttnConfig(estimator=3)
    with pytest.raises(ValueError, match="estimator=True"):
        ProxyAttnConfig(estimator=True)
    cfg = ProxyAttnConfig(estimator=1, gamma=0.9)
    assert ProxyAttnConfig.from_attrs(cfg.to_attrs()) == cfg
