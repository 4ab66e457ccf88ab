"""Every stage of the fp32 reference against an independent brute-force computation (plain loops)."""

from __future__ import annotations

import math

import pytest
import torch

import proxyattn as pa
from proxyattn import reference as ref
from tests.helpers import assert_close, qkv_inputs

# (B, S, Hq, Hkv, D, block_size): ragged lengths, GQA ratios 1/4/7/8, head dims 64/128/256, B > 1.
SHAPES = [
    (1, 200, 4, 4, 64, 64),  # GQA 1, S not divisible by the block
    (2, 257, 8, 2, 64, 64),  # GQA 4, B > 1, one token past a block
    (1, 190, 7, 1, 128, 64),  # GQA 7
    (2, 300, 16, 2, 64, 128),  # GQA 8, block 128, ragged
    (1, 130, 4, 1, 256, 128),  # head dim 256
]


def make_qkv(b, s, hq, hkv, d, seed=0, temperature=None):
    """Random inputs; per-head temperatures make heads differ in how concentrated their attention is."""
    q, k, v = qkv_inputs("random", b, s, hq, hkv, d, seed)
    if temperature is not None:
        q = q * torch.linspace(0.5, temperature, hq).view(1, 1, hq, 1)
    return q, k, v


def brute_scores(q, k, proxy_heads, block_size, stride, scale):
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    nb = math.ceil(s / block_size)
    out = torch.full((b, proxy_heads, nb, nb), float("-inf"), dtype=torch.float64)
    qh, kh = hq // proxy_heads, hkv // proxy_heads
    for bi in range(b):
        for g in range(proxy_heads):
            pq = q[bi, :, g * qh : (g + 1) * qh].double().mean(dim=1)
            pk = k[bi, :, g * kh : (g + 1) * kh].double().mean(dim=1)
            for r in range(0, s, stride):
                p = torch.softmax(pk[: r + 1] @ pq[r] * scale, dim=0)
                m = r // block_size
                for n in range(m + 1):
                    seg = p[n * block_size : min(r + 1, (n + 1) * block_size)]
                    out[bi, g, m, n] = max(out[bi, g, m, n].item(), seg.max().item())
    return out


def brute_mass(q, k, bi, h, block_size, scale):
    """Mass per key block of head h's last query block, summed token by token in float64 (a list of Nb floats)."""
    s = q.shape[1]
    rep = q.shape[2] // k.shape[2]
    mass = [0.0] * math.ceil(s / block_size)
    rows = list(range(max(0, s - block_size), s))
    for r in rows:
        p = torch.softmax(k[bi, : r + 1, h // rep].double() @ q[bi, r, h].double() * scale, dim=0).tolist()
        for j in range(r + 1):
            mass[j // block_size] += p[j] / len(rows)
    return mass


def brute_budgets(q, k, block_size, gamma, scale):
    b, s, hq, d = q.shape
    nb = math.ceil(s / block_size)
    out = torch.zeros(b, hq, dtype=torch.int64)
    for bi in range(b):
        for h in range(hq):
            mass = brute_mass(q, k, bi, h, block_size, scale)
            total, n = 0.0, 0
            for x in sorted(mass, reverse=True):
                if gamma >= 1.0 or total < gamma:
                    total += x
                    n += 1
            out[bi, h] = n if gamma < 1.0 else nb
    return out


def brute_attention(q, k, v, mask, block_size, scale):
    b, s, hq, d = q.shape
    rep = hq // k.shape[2]
    out = torch.zeros(b, s, hq, d, dtype=torch.float64)
    lse = torch.full((b, hq, s), float("-inf"), dtype=torch.float64)
    kept = mask.tolist()
    for bi in range(b):
        for h in range(hq):
            for i in range(s):
                row = kept[bi][h][i // block_size]
                keys = [j for j in range(i + 1) if row[j // block_size]]
                if not keys:
                    continue
                kk = k[bi, keys, h // rep].double()
                logits = kk @ q[bi, i, h].double() * scale
                lse[bi, h, i] = torch.logsumexp(logits, 0)
                out[bi, i, h] = torch.softmax(logits, 0) @ v[bi, keys, h // rep].double()
    return out, lse


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s))
def test_proxy_scores_brute_force(shape):
    b, s, hq, hkv, d, bs = shape
    q, k, _ = make_qkv(b, s, hq, hkv, d)
    for proxy_heads in sorted({1, hkv}):
        for stride in (1, 4):
            scale = 1 / math.sqrt(d)
            got = ref.proxy_scores(q, k, proxy_heads=proxy_heads, block_size=bs, stride=stride, scale=scale)
            want = brute_scores(q, k, proxy_heads, bs, stride, scale)
            assert_close(got, want, "fp32", allow_inf=True, what=f"scores g={proxy_heads} stride={stride}")


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s))
@pytest.mark.parametrize("gamma", [0.5, 0.9, 1.0])
def test_head_budgets_brute_force(shape, gamma):
    b, s, hq, hkv, d, bs = shape
    q, k, _ = make_qkv(b, s, hq, hkv, d, seed=1, temperature=4.0)
    got = ref.head_budgets(q, k, block_size=bs, gamma=gamma, scale=1 / math.sqrt(d))
    want = brute_budgets(q, k, bs, gamma, 1 / math.sqrt(d))
    assert torch.equal(got.long(), want), (got, want)


def brute_ranking(row, nb, keep_sink, keep_diagonal):
    """The last row's keep order by hand: forced blocks (sink, diagonal) first, each part by descending score."""
    forced = sorted({n for n, keep in ((0, keep_sink), (nb - 1, keep_diagonal)) if keep}, key=lambda n: (-row[n], n))
    return forced + sorted((n for n in range(nb) if n not in forced), key=lambda n: (-row[n], n))


def brute_prefix(mass, ranking, gamma):
    """Blocks taken along `ranking` until their mass reaches gamma."""
    total, n_kept = 0.0, 0
    for j in ranking:
        if total < gamma:
            total += mass[j]
            n_kept += 1
    return n_kept


def brute_recall_budgets(q, k, scores, block_size, gamma, scale, keep_sink, keep_diagonal):
    """Rule "recall" by hand: the head's mass accumulated along the last row's ranking (forced blocks first)."""
    b, s, hq, _ = q.shape
    rep_r = hq // scores.shape[1]
    nb = math.ceil(s / block_size)
    out = torch.zeros(b, hq, dtype=torch.int64)
    for bi in range(b):
        for h in range(hq):
            ranking = brute_ranking(scores[bi, h // rep_r, nb - 1].tolist(), nb, keep_sink, keep_diagonal)
            out[bi, h] = brute_prefix(brute_mass(q, k, bi, h, block_size, scale), ranking, gamma)
    return out


def test_recall_budget_grows_for_a_head_the_ranking_misses():
    """Head 0 attends (last block) to key block 1 only; a ranking that puts block 1 last must give head 0 the
    whole row, while the paper's rule gives it 1 block."""
    s, d, bs = 256, 64, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, 2, d, generator=g) * 0.01
    k = torch.randn(1, s, 1, d, generator=g) * 0.01
    key = torch.randn(d, generator=g)
    k[0, 64:128, 0] += key * 4
    q[0, -bs:, 0] = key * 4
    nb = s // bs
    scale = 1 / math.sqrt(d)
    paper = ref.head_budgets(q, k, block_size=bs, gamma=0.9, scale=scale)
    assert paper[0, 0] == 1
    order = torch.tensor([[[3, 0, 2, 1]]])  # the shared ranking of the last row puts block 1 last
    recall = ref.head_budgets(q, k, block_size=bs, gamma=0.9, scale=scale, last_order=order)
    assert recall[0, 0] == nb


def brute_row_recall_budgets(q, k, scores, block_size, gamma, scale, keep_sink, keep_diagonal):
    """Rule "row_recall" by hand: per row of the last block, its float64 mass accumulated along the last row's
    ranking (forced blocks first); the head needs the longest prefix any row needs."""
    b, s, hq, _ = q.shape
    rep, rep_r = hq // k.shape[2], hq // scores.shape[1]
    nb = math.ceil(s / block_size)
    out = torch.zeros(b, hq, dtype=torch.int64)
    for bi in range(b):
        for h in range(hq):
            ranking = brute_ranking(scores[bi, h // rep_r, nb - 1].tolist(), nb, keep_sink, keep_diagonal)
            for r in range(max(0, s - block_size), s):
                p = torch.softmax(k[bi, : r + 1, h // rep].double() @ q[bi, r, h].double() * scale, dim=0).tolist()
                mass = [0.0] * nb
                for j in range(r + 1):
                    mass[j // block_size] += p[j]
                out[bi, h] = max(int(out[bi, h]), brute_prefix(mass, ranking, gamma))
    return out


@pytest.mark.parametrize("shape", SHAPES[:4], ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s))
@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("forced", [(True, True), (False, False)], ids=["forced", "unforced"])
@pytest.mark.parametrize("rule", [1, 2], ids=["recall", "row_recall"])
def test_ranking_rule_budgets_brute_force(shape, gamma, forced, rule):
    b, s, hq, hkv, d, bs = shape
    q, k, _ = make_qkv(b, s, hq, hkv, d, seed=2, temperature=4.0)
    scale = 1 / math.sqrt(d)
    scores = ref.proxy_scores(q, k, proxy_heads=hkv, block_size=bs, stride=4, scale=scale)
    brute = brute_recall_budgets if rule == 1 else brute_row_recall_budgets
    got = ref.rule_budgets(
        q, k, scores, block_size=bs, gamma=gamma, scale=scale, budget_rule=rule, keep_sink=forced[0], keep_diagonal=forced[1]
    )
    want = brute(q, k, scores, bs, gamma, scale, *forced)
    assert torch.equal(got.long(), want), (got, want)
    # Rule 1: any ranking needs at least the head's own descending order (the paper's budget). Rule 2: every row
    # holding gamma implies their mean does, so never below rule 1.
    lower = ref.rule_budgets(
        q, k, scores, block_size=bs, gamma=gamma, scale=scale, budget_rule=rule - 1, keep_sink=forced[0], keep_diagonal=forced[1]
    )
    assert (got >= lower).all()


def test_row_recall_budget_covers_a_single_row_the_mean_hides():
    """One row of head 0's last block attends to key block 1 only, the others to the diagonal block: the mean
    reaches gamma 0.9 without block 1 (rule "recall": 1 block), every row only with it (rule "row_recall")."""
    s, d, bs = 256, 64, 64
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, s, 1, d, generator=g) * 0.01
    k = torch.randn(1, s, 1, d, generator=g) * 0.01
    far, near = torch.randn(d, generator=g), torch.randn(d, generator=g)
    k[0, 64:128, 0] += far * 4
    k[0, 192:, 0] += near * 4
    q[0, -bs:, 0] = near * 4
    q[0, -1, 0] = far * 4  # the last row looks far back
    scale = 1 / math.sqrt(d)
    order = torch.tensor([[[3, 0, 2, 1]]])  # block 1 last in the shared ranking
    recall = ref.head_budgets(q, k, block_size=bs, gamma=0.9, scale=scale, last_order=order)
    rows = ref.head_budgets(q, k, block_size=bs, gamma=0.9, scale=scale, last_order=order, per_row=True)
    assert recall[0, 0] == 1 and rows[0, 0] == 4


def test_block_counts_formula():
    nb = 10
    budget = torch.tensor([[1, 3, 10]], dtype=torch.int32)
    counts = ref.block_counts(budget, nb, min_blocks=2)
    for h, n in enumerate([1, 3, 10]):
        for m in range(nb):
            want = min(max(math.ceil(n * (m + 1) / nb), 2), m + 1)
            assert counts[0, h, m].item() == want


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s))
def test_block_sparse_attention_brute_force(shape):
    b, s, hq, hkv, d, bs = shape
    q, k, v = make_qkv(b, s, hq, hkv, d, seed=2)
    nb = math.ceil(s / bs)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(b, hq, nb, nb, generator=g) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)  # every row keeps at least its diagonal
    scale = 1 / math.sqrt(d)
    out, lse = ref.block_sparse_attention(q, k, v, mask, block_size=bs, scale=scale)
    want_out, want_lse = brute_attention(q, k, v, mask, bs, scale)
    assert_close(out, want_out, "fp32", what="out")
    assert_close(lse, want_lse, "fp32", what="lse")


def test_empty_rows_give_zero_and_minus_inf_lse():
    q, k, v = make_qkv(1, 128, 2, 1, 64)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[:, :, 1, 1] = True  # query block 0 keeps nothing
    out, lse = ref.block_sparse_attention(q, k, v, mask, block_size=64, scale=0.125)
    assert torch.all(out[:, :64] == 0) and torch.all(torch.isneginf(lse[..., :64]))
    assert torch.isfinite(lse[..., 64:]).all()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_S{}_Hq{}_Hkv{}_D{}_bs{}".format(*s))
def test_dense_equals_sdpa(shape):
    b, s, hq, hkv, d, _ = shape
    q, k, v = make_qkv(b, s, hq, hkv, d, seed=4)
    got = pa.dense_attention(q, k, v)
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, enable_gqa=True
    ).transpose(1, 2)
    assert_close(got, want, "fp32")
