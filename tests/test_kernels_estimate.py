"""Estimation kernels (proxy scores, head budgets, selection, packed batches) against the fp32 reference.

The Triton kernels run on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before
any test module is imported), so shapes are small. Budgets and plans must equal the reference exactly up to
documented ties (`proxyattn.testing.budget_mismatches` / `plan_mismatches`).
"""

import math

import pytest
import torch

from proxyattn import ProxyAttnConfig, reference
from proxyattn.api import plan_blocks_varlen as api_plan_blocks_varlen
from proxyattn.kernels import estimate_budgets as eb
from proxyattn.kernels import estimate_scores as es
from proxyattn.kernels import estimate_select as esel
from proxyattn.plan import compact_plan
from proxyattn.testing import budget_mismatches, plan_mismatches, row_budget_mismatches, structured_qkv
from tests.helpers import assert_close, qkv_inputs

pytestmark = pytest.mark.interpret

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _inputs(kind, b, s, hq, hkv, d, dtype, seed):
    return qkv_inputs(kind, b, s, hq, hkv, d, seed, dtype)[:2]


def _ref_mass(q, k, block_size, scale):
    """Brute-force mass per key block of each head's last query block (the first half of reference.head_budgets)."""
    b, s, hq, _ = q.shape
    nb = -(-s // block_size)
    rows = torch.arange(s - min(block_size, s), s)
    logits = torch.einsum("brhd,bkhd->bhrk", q.float()[:, rows], reference._expand_kv(k.float(), hq)) * scale
    logits = logits.masked_fill(torch.arange(s)[None, :] > rows[:, None], float("-inf"))
    mass = torch.softmax(logits, dim=-1).mean(dim=2)
    return torch.nn.functional.pad(mass, (0, nb * block_size - s)).reshape(b, hq, nb, block_size).sum(-1)


# (kind, B, S, Hq, Hkv, D, block, stride, proxy_heads, dtype): ragged S, GQA 1/4/8, D 64/128/256, B > 1.
SCORE_CASES = [
    ("random", 2, 300, 4, 1, 64, 64, 4, 1, "bf16"),
    ("structured", 1, 517, 8, 8, 128, 128, 4, 2, "fp16"),
    ("random", 1, 200, 8, 1, 256, 64, 1, 1, "bf16"),
    ("structured", 2, 130, 8, 2, 64, 128, 4, 2, "fp32"),
    ("structured", 1, 390, 4, 4, 64, 64, 16, 4, "bf16"),
]


@pytest.mark.parametrize("case", SCORE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_proxy_scores_match_reference(case):
    kind, b, s, hq, hkv, d, bs, st, g, dt = case
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=s)
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g)
    scale = 1.0 / math.sqrt(d)
    nb = -(-s // bs)
    out = torch.full((b, g, nb, nb), float("nan"))  # poisoned: every element must be written
    got = es.proxy_scores(q, k, cfg, scale, out=out)
    ref = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=st, scale=scale)
    # Proxies are rounded to fp16 (11-bit mantissa, as a tf32 product): the "tf32" tolerance.
    assert_close(got, ref, "tf32", allow_inf=True, what=f"proxy_scores {case}")
    assert torch.isinf(got).logical_and(got < 0).equal(torch.ones(nb, nb, dtype=torch.bool).triu(1).expand(b, g, nb, nb))


@pytest.mark.parametrize("g,bs", [(1, 64), (2, 128)])
def test_scores_without_column_keys_match_reference(g, bs):
    """Vertical columns left out of the max-pool (`exclude`): the kernel against the reference, columns in every block
    position, a block made only of columns (its score is 0), ragged S, B 2."""
    b, s = 2, 2 * bs + 37
    q, k = _inputs("structured", b, s, 8, 2, 64, torch.bfloat16, seed=s)
    cfg = ProxyAttnConfig(block_size=bs, stride=4, proxy_heads=g)
    gen = torch.Generator().manual_seed(g)
    exclude = torch.rand(b, g, s, generator=gen) < 0.2
    exclude[0, 0, bs : 2 * bs] = True  # every key of block 1
    got = es.proxy_scores(q, k, cfg, 0.125, exclude=exclude)
    ref = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=4, scale=0.125, exclude=exclude)
    assert_close(got, ref, "tf32", allow_inf=True, what="scores without column keys")
    assert (got[0, 0, 1:, 1] == 0).all()
    plain = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=4, scale=0.125)
    assert (ref <= plain).all() and not torch.equal(ref, plain)


def test_one_sweep_scores_equal_the_two_sweeps():
    """The scores' one sweep (row maxima + `_scores_from_rows_kernel`) gives exactly the two-sweep kernel's scores:
    one chunk, chunks of one query tile (the scratch bound forcing them), and a packed batch."""
    q, k = _inputs("structured", 2, 517, 8, 2, 64, torch.bfloat16, seed=7)
    cfg = ProxyAttnConfig(block_size=64, stride=4, proxy_heads=2)
    scale = 1.0 / math.sqrt(64)
    two = es._launch_scores(q, k, None, 2, 517, cfg, scale, one_pass=False)
    one = es._launch_scores(q, k, None, 2, 517, cfg, scale)
    assert torch.equal(one, two)
    tile_bytes = 2 * 2 * 9 * 64 * 4  # B*G x Nb x (QB x RPB rows) x 4: one query tile per chunk
    assert es.rows_chunk_tiles(4, 9, 64, 5, tile_bytes) == 1 and es.rows_chunk_tiles(4, 9, 64, 5, 10**9) == 5
    chunked = es._launch_scores(q, k, None, 2, 517, cfg, scale, scratch_bytes=tile_bytes)
    assert torch.equal(chunked, two)
    lens = [300, 0, 517]
    cu = torch.tensor([0, 300, 300, 817], dtype=torch.int32)
    qp, kp = _inputs("random", 1, 817, 8, 2, 64, torch.bfloat16, seed=8)
    qp, kp = qp[0], kp[0]
    two = es._launch_scores(qp, kp, cu, len(lens), 517, cfg, scale, one_pass=False)
    for sb in (tile_bytes * 3 // 2, 10**9):
        assert torch.equal(es._launch_scores(qp, kp, cu, len(lens), 517, cfg, scale, scratch_bytes=sb), two)


# (kind, B, S, Hq, Hkv, D, block, stride, proxy_heads, dtype): GQA 1/4/7/8, D 64/128/256, ragged S, B > 1.
HEAD_MAX_CASES = [
    ("random", 2, 300, 4, 1, 64, 64, 4, 1, "bf16"),
    ("structured", 1, 517, 8, 8, 128, 128, 4, 2, "fp16"),
    ("random", 1, 200, 7, 1, 256, 64, 1, 1, "bf16"),
    ("structured", 2, 330, 16, 2, 64, 128, 16, 2, "fp32"),
    ("structured", 1, 390, 8, 2, 64, 64, 16, 1, "bf16"),
]


@pytest.mark.parametrize("case", HEAD_MAX_CASES, ids=lambda c: "-".join(map(str, c)))
def test_head_max_scores_match_reference(case):
    from proxyattn import variants
    from proxyattn.kernels import estimate_head_max as ehm

    kind, b, s, hq, hkv, d, bs, st, g, dt = case
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=s + 5)
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, estimator=1)
    scale = 1.0 / math.sqrt(d)
    nb = -(-s // bs)
    got = ehm.head_max_scores(q, k, cfg, scale)
    ref = variants.head_max_scores(q, k, proxy_heads=g, block_size=bs, stride=st, scale=scale)
    # q and k are read in their own dtype (the reference upcasts the same values): products as a tf32 dot.
    assert_close(got, ref, "tf32", allow_inf=True, what=f"head_max_scores {case}")
    assert torch.isinf(got).logical_and(got < 0).equal(torch.ones(nb, nb, dtype=torch.bool).triu(1).expand(b, g, nb, nb))


def test_head_max_scores_varlen_and_dispatch():
    from proxyattn import variants
    from proxyattn.kernels import estimate_head_max as ehm

    lengths, hq, hkv, d, bs = [300, 70, 0, 200], 8, 2, 64, 64
    q, k, cu = _packed(lengths, hq, hkv, d, torch.bfloat16, seed=21)
    cfg = ProxyAttnConfig(
        block_size=bs,
        stride=4,
        proxy_heads=2,
        estimator=1,
        gamma=0.9,
        min_budget_tokens=64,
        dense_below_tokens=0,
        budget_rule=2,
        dense_density=None,
    )
    scale = 1.0 / math.sqrt(d)
    nb = -(-300 // bs)
    got = ehm.head_max_scores_varlen(q, k, cu, 300, cfg, scale)
    assert got.shape == (4, 2, nb, nb)
    for i, n in enumerate(lengths):
        nbi = -(-n // bs)
        assert torch.isneginf(got[i, :, nbi:]).all() and torch.isneginf(got[i, :, :, nbi:]).all()
        if n:
            lo = int(cu[i])
            ref = variants.head_max_scores(q[None, lo : lo + n], k[None, lo : lo + n], proxy_heads=2, block_size=bs, stride=4, scale=scale)
            assert_close(got[i : i + 1, :, :nbi, :nbi], ref, "tf32", allow_inf=True, what=f"varlen head_max seq {i}")
    # The packed plan uses the kernel's scores: equal to planning each sequence alone with the same kernel.
    plan = esel.plan_blocks_varlen(q, k, cu, 300, cfg, scale)
    for i, n in enumerate(lengths):
        if n == 0:
            continue
        lo, nbi = int(cu[i]), -(-n // bs)
        qi, ki = q[None, lo : lo + n], k[None, lo : lo + n]
        scores = ehm.head_max_scores(qi, ki, cfg, scale)
        one = esel.select_blocks(scores, eb.head_budgets(qi, ki, cfg, scale, scores=scores), n, cfg)
        assert plan.counts[i : i + 1, :, :nbi].equal(one.counts) and plan.budget_blocks[i : i + 1].equal(one.budget_blocks)


def test_pooled_proxies_are_group_means():
    q, k = _inputs("random", 2, 70, 8, 4, 64, torch.bfloat16, seed=3)
    cfg = ProxyAttnConfig(block_size=64, stride=4, proxy_heads=2)
    pq, pk = es.pool_proxies(q, k, cfg)
    rq, rk = reference.proxy_queries_keys(q, k, 2)  # [B, S, G, D]
    for bi in range(2):
        rows_q = (bi * 70) // 4 + bi + torch.arange(-(-70 // 4))
        rows_k = bi * 70 + bi + torch.arange(70)
        assert_close(pq[:, rows_q].float(), rq[bi, ::4].transpose(0, 1), "fp16", what="pooled q")
        assert_close(pk[:, rows_k].float(), rk[bi].transpose(0, 1), "fp16", what="pooled k")


# (kind, B, S, Hq, Hkv, D, block, gamma, dtype)
BUDGET_CASES = [
    ("structured", 2, 300, 4, 1, 64, 64, 0.9, "bf16"),
    ("structured", 1, 517, 8, 8, 128, 128, 0.95, "fp16"),
    ("structured", 1, 260, 8, 1, 256, 64, 0.9, "bf16"),
    ("random", 2, 200, 4, 4, 64, 64, 0.95, "fp32"),
    ("structured", 1, 50, 4, 1, 64, 64, 0.9, "bf16"),  # S shorter than one block
]


@pytest.mark.parametrize("case", BUDGET_CASES, ids=lambda c: "-".join(map(str, c)))
def test_head_budgets_match_reference(case):
    kind, b, s, hq, hkv, d, bs, gamma, dt = case
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=s + 1)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, budget_rule=0)
    scale = 1.0 / math.sqrt(d)
    mass = eb.block_mass(q, k, cfg, scale)
    ref_mass = _ref_mass(q, k, bs, scale)
    assert_close(mass, ref_mass, "fp32", what=f"block mass {case}")
    got = eb.head_budgets(q, k, cfg, scale)
    ref = reference.head_budgets(q, k, block_size=bs, gamma=gamma, scale=scale)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert budget_mismatches(got, ref_mass, gamma) == 0, (got.tolist(), ref.tolist())


@pytest.mark.parametrize("case", BUDGET_CASES[:3] + BUDGET_CASES[4:], ids=lambda c: "-".join(map(str, c)))
def test_recall_budgets_match_reference(case):
    """budget_rule 1: the mass accumulated along the last row's ranking of the kernel's own scores."""
    kind, b, s, hq, hkv, d, bs, gamma, dt = case
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=s + 2)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, proxy_heads=hkv, budget_rule=1)
    scale = 1.0 / math.sqrt(d)
    scores = es.proxy_scores(q, k, cfg, scale)
    got = eb.head_budgets(q, k, cfg, scale, scores=scores)
    order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True)
    ref = reference.head_budgets(q, k, block_size=bs, gamma=gamma, scale=scale, last_order=order)
    head_order = order.repeat_interleave(hq // hkv, dim=1)
    assert got.dtype == torch.int32 and got.shape == ref.shape
    assert budget_mismatches(got, _ref_mass(q, k, bs, scale), gamma, order=head_order) == 0, (got.tolist(), ref.tolist())
    assert (got.long() >= eb.head_budgets(q, k, cfg.replace(budget_rule=0), scale).long()).all()


@pytest.mark.parametrize("case", BUDGET_CASES, ids=lambda c: "-".join(map(str, c)))
def test_row_recall_budgets_match_reference(case):
    """budget_rule 2: every row's mass of the last block (kernel, ROWS) and the longest prefix any row needs."""
    kind, b, s, hq, hkv, d, bs, gamma, dt = case
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=s + 3)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, proxy_heads=hkv, budget_rule=2)
    scale = 1.0 / math.sqrt(d)
    ref_rows = reference.last_block_row_mass(q, k, block_size=bs, scale=scale)
    rows = eb._launch_mass(q, k, None, b, s, bs, scale, rows=True)
    assert_close(rows[:, :, : ref_rows.shape[2]], ref_rows, "fp32", what=f"row mass {case}")
    assert rows[:, :, ref_rows.shape[2] :].eq(0).all()  # rows past a sequence shorter than one block
    scores = es.proxy_scores(q, k, cfg, scale)
    got = eb.head_budgets(q, k, cfg, scale, scores=scores)
    order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True).repeat_interleave(hq // hkv, dim=1)
    assert got.dtype == torch.int32 and got.shape == (b, hq)
    assert row_budget_mismatches(got, ref_rows, gamma, order) == 0, got.tolist()
    assert (got.long() >= eb.head_budgets(q, k, cfg.replace(budget_rule=1), scale, scores=scores).long()).all()


def test_recall_budgets_order_forced_blocks_by_exact_score():
    """Sink and diagonal scores 4e-8 apart: the diagonal (higher) comes first, as in reference.last_row_order."""
    nb = 4
    scores = torch.full((1, 1, nb, nb), float("-inf"))
    scores[0, 0, nb - 1] = torch.tensor([0.3, 0.9, 0.5, 0.30000004])
    mass = torch.tensor([[[0.01, 0.02, 0.02, 0.95]]])
    cfg = ProxyAttnConfig(block_size=64, gamma=0.9, budget_rule=1)
    got = eb._recall_budgets(mass, scores, cfg, torch.tensor([nb]))
    order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True)
    assert order[0, 0].tolist() == [3, 0, 1, 2]
    assert got.tolist() == [[1]]


def test_head_budgets_fraction_and_gamma_one():
    q, k = _inputs("random", 2, 300, 4, 2, 64, torch.bfloat16, seed=5)
    nb = 5
    full = eb.head_budgets(q, k, ProxyAttnConfig(block_size=64, gamma=1.0), 0.125)
    assert full.tolist() == [[nb] * 4] * 2
    frac = eb.head_budgets(q, k, ProxyAttnConfig(block_size=64, budget_fraction=0.3), 0.125)
    assert frac.equal(reference.fraction_budgets(2, 4, nb, 0.3, "cpu"))


def _tied_scores(b, r, nb, seed):
    """Scores with many exact ties (quantised), -inf above the diagonal."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(b, r, nb, nb, generator=g) * 6).floor() / 6
    return s.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))


@pytest.mark.parametrize("keep_sink,keep_diagonal", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("r,hq,nb,min_tokens", [(1, 4, 9, 128), (2, 8, 17, 0), (4, 4, 6, 640)])
def test_select_blocks_equals_compact_plan(keep_sink, keep_diagonal, r, hq, nb, min_tokens, monkeypatch):
    monkeypatch.setattr(esel, "_CHUNK_ELEMS", 2 * r * nb * 3)  # several row chunks
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=min_tokens, keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    scores = _tied_scores(2, r, nb, seed=nb)
    g = torch.Generator().manual_seed(nb)
    budgets = torch.randint(1, nb + 1, (2, hq), generator=g, dtype=torch.int32)
    s = nb * 64 - 10
    got = esel.select_blocks(scores, budgets, s, cfg)
    want = compact_plan(scores, budgets, s, cfg)
    assert got.order.dtype == torch.int32 and got.counts.dtype == torch.int32
    assert got.counts.equal(want.counts)
    assert got.to_mask().equal(want.to_mask())
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    assert got.order[..., causal].equal(want.order[..., causal]), "keep order as compact_plan (entries past m unused)"
    brute = reference.select_blocks(scores, budgets, min_blocks=cfg.min_budget_blocks, keep_sink=keep_sink, keep_diagonal=keep_diagonal)
    assert got.to_mask().equal(brute)
    # Keep order: forced blocks first, then descending score with ties to the lower index.
    order = got.head_orders()
    for bi, h, m in [(0, 0, nb - 1), (1, hq - 1, nb // 2)]:
        row = order[bi, h, m, : m + 1].tolist()
        sc = scores[bi, h // (hq // r), m]
        forced = sorted({n for n in (0, m) if (n == 0 and keep_sink) or (n == m and keep_diagonal)}, key=lambda n: (-sc[n].item(), n))
        assert row[: len(forced)] == forced
        rest = row[len(forced) :]
        assert rest == sorted(rest, key=lambda n: (-sc[n].item(), n))


@pytest.mark.parametrize(
    "kind,b,s,hq,hkv,d,bs,st,g,gamma,dt",
    [
        ("structured", 2, 700, 8, 2, 64, 64, 4, 1, 0.9, "bf16"),
        ("structured", 1, 600, 4, 4, 128, 64, 4, 2, 0.95, "fp16"),
        ("random", 1, 520, 8, 1, 64, 128, 4, 1, 0.9, "bf16"),
    ],
)
@pytest.mark.parametrize("rule", [0, 1])
def test_plan_matches_reference_plan(kind, b, s, hq, hkv, d, bs, st, g, gamma, dt, rule):
    q, k = _inputs(kind, b, s, hq, hkv, d, DTYPES[dt], seed=7)
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, gamma=gamma, min_budget_tokens=128, budget_rule=rule)
    scale = 1.0 / math.sqrt(d)
    scores = es.proxy_scores(q, k, cfg, scale)
    budgets = eb.head_budgets(q, k, cfg, scale, scores=scores)
    plan = esel.select_blocks(scores, budgets, s, cfg)
    ref_scores = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=st, scale=scale)
    order = None
    if rule == 1:
        order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True).repeat_interleave(hq // g, dim=1)
    assert budget_mismatches(budgets, _ref_mass(q, k, bs, scale), gamma, order=order) == 0
    # Reference plan with the (tie-equal) budgets, so that counts agree; kept sets must agree up to score ties.
    ref_plan = compact_plan(ref_scores, budgets, s, cfg)
    assert plan_mismatches(plan, ref_plan, ref_scores, cfg.min_budget_blocks) == 0
    assert 0 < float(plan.density().min()) and float(plan.density().max()) <= 1


def _packed(lengths, hq, hkv, d, dtype, seed):
    qs, ks = [], []
    for i, n in enumerate(lengths):
        q, k, _ = structured_qkv(1, n, hq, hkv, d, dtype=dtype, seed=seed + i)
        qs.append(q[0])
        ks.append(k[0])
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    return torch.cat(qs), torch.cat(ks), cu


def test_varlen_scores_budgets_and_plan():
    lengths, hq, hkv, d, bs = [300, 70, 520, 0], 4, 2, 64, 64
    q, k, cu = _packed(lengths, hq, hkv, d, torch.bfloat16, seed=11)
    cfg = ProxyAttnConfig(block_size=bs, stride=4, proxy_heads=2, gamma=0.9, min_budget_tokens=128, dense_below_tokens=100, budget_rule=0)
    scale = 1.0 / math.sqrt(d)
    max_len = 520
    nb = -(-max_len // bs)
    out = torch.full((len(lengths), 2, nb, nb), float("nan"))
    scores = es.proxy_scores_varlen(q, k, cu, max_len, cfg, scale, out=out)
    budgets = eb.head_budgets_varlen(q, k, cu, max_len, cfg, scale)
    plan = esel.plan_blocks_varlen(q, k, cu, max_len, cfg, scale)
    ref_plan = api_plan_blocks_varlen(q, k, cu, max_len, cfg, scale=scale)  # CPU path: reference per sequence
    rows = torch.zeros(len(lengths), nb, dtype=torch.bool)
    ref_scores = torch.full_like(scores, float("-inf"))
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        nbi = -(-n // bs)
        rows[i, :nbi] = True
        assert torch.isneginf(scores[i, :, nbi:]).all(), "rows past the sequence must be -inf"
        if n == 0:
            assert budgets[i].eq(0).all()
            continue
        qi, ki = q[None, lo : lo + n], k[None, lo : lo + n]
        ref = reference.proxy_scores(qi, ki, proxy_heads=2, block_size=bs, stride=4, scale=scale)
        ref_scores[i, :, :nbi, :nbi] = ref[0]
        assert_close(scores[i : i + 1, :, :nbi, :nbi], ref, "tf32", allow_inf=True, what=f"varlen scores seq {i}")
        assert budget_mismatches(budgets[i : i + 1], _ref_mass(qi, ki, bs, scale), cfg.gamma) == 0
        if n <= cfg.dense_below_tokens:
            assert plan.counts[i, :, :nbi].equal(torch.arange(1, nbi + 1, dtype=torch.int32).expand(hq, nbi))
    assert plan.seq_len == max_len and plan.counts.shape == (len(lengths), hq, nb)
    assert plan.counts[~rows[:, None, :].expand(-1, hq, -1)].eq(0).all()
    assert plan_mismatches(plan, ref_plan, ref_scores, cfg.min_budget_blocks, rows=rows, seq_blocks=[-(-n // bs) for n in lengths]) == 0


@pytest.mark.parametrize("rule", [1, 2])
def test_varlen_recall_budgets_match_each_sequence(rule):
    lengths, hq, hkv, d, bs = [300, 70, 520, 0], 4, 2, 64, 64
    q, k, cu = _packed(lengths, hq, hkv, d, torch.bfloat16, seed=12)
    cfg = ProxyAttnConfig(
        block_size=bs, stride=4, proxy_heads=2, gamma=0.9, min_budget_tokens=128, dense_below_tokens=100, budget_rule=rule
    )
    scale = 1.0 / math.sqrt(d)
    scores = es.proxy_scores_varlen(q, k, cu, 520, cfg, scale)
    budgets = eb.head_budgets_varlen(q, k, cu, 520, cfg, scale, scores=scores)
    plan = esel.plan_blocks_varlen(q, k, cu, 520, cfg, scale)
    for i, n in enumerate(lengths):
        lo, nbi = int(cu[i]), -(-n // bs)
        if n == 0:
            assert budgets[i].eq(0).all()
            continue
        qi, ki = q[None, lo : lo + n], k[None, lo : lo + n]
        order = reference.last_row_order(scores[i : i + 1, :, :nbi, :nbi], keep_sink=True, keep_diagonal=True)
        if rule == 1:
            mass = _ref_mass(qi, ki, bs, scale)
            assert budget_mismatches(budgets[i : i + 1], mass, cfg.gamma, order=order.repeat_interleave(2, dim=1)) == 0
        else:
            rows = reference.last_block_row_mass(qi, ki, block_size=bs, scale=scale)
            assert row_budget_mismatches(budgets[i : i + 1], rows, cfg.gamma, order.repeat_interleave(2, dim=1)) == 0
        want = nbi if n <= cfg.dense_below_tokens else budgets[i]
        assert plan.budget_blocks[i].eq(want).all(), (i, plan.budget_blocks[i], want)


def test_structured_qkv_has_the_intended_structure():
    b, s, hq, hkv, d = 1, 2048, 8, 2, 64
    q, k, v = structured_qkv(b, s, hq, hkv, d, dtype=torch.float32, seed=0)
    assert q.shape == (b, s, hq, d) and k.shape == v.shape == (b, s, hkv, d)
    q2, _, _ = structured_qkv(b, s, hq, hkv, d, dtype=torch.float32, seed=0)
    assert q.equal(q2), "deterministic for a seed"
    scale = d**-0.5
    budgets = reference.head_budgets(q, k, block_size=64, gamma=0.9, scale=scale)
    assert len(set(budgets[0].tolist())) >= 3, f"per-head budgets should differ: {budgets.tolist()}"
    rows = torch.arange(s - 64, s)
    p = torch.softmax(
        (torch.einsum("rhd,khd->hrk", q[0, rows], reference._expand_kv(k, hq)[0]) * scale).masked_fill(
            torch.arange(s)[None, None, :] > rows[None, :, None], float("-inf")
        ),
        dim=-1,
    ).mean(1)  # [Hq, S]
    assert float(p[:, :4].sum(-1).max()) > 0.3, "sink tokens draw attention"
    # Heads agree on which distant tokens matter (most heads share top keys outside the sink and the local window)
    # but differ in how much attention they give them.
    far = p[:, 4 : s - 256]
    votes = torch.zeros(far.shape[1])
    for h in range(hq):
        votes[far[h].topk(20).indices] += 1
    assert int((votes >= hq - 2).sum()) >= 5, "heavy hitters are shared by the heads"
    far_mass = far.sum(-1)
    assert float(far_mass.max() / far_mass.min()) > 3, f"heads differ in concentration: {far_mass.tolist()}"
    # Locality: a query's own neighbourhood (64 keys back) draws more than a random 64-key window far away.
    local = torch.stack([p[:, r - 63 : r + 1].sum(-1) for r in [s - 1]]).mean()
    assert float(local) > 64.0 / s


def test_plan_comparison_helpers_detect_real_differences():
    """The tie-aware comparisons accept swaps of (nearly) tied blocks and reject anything else."""
    nb = 8
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=0)
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1, 1, nb, nb, generator=g) + 0.1
    scores = scores.masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    budgets = torch.tensor([[3, 5]], dtype=torch.int32)
    ref = compact_plan(scores, budgets, nb * 64, cfg)
    assert plan_mismatches(ref, ref, scores, 0) == 0
    # Swap the scores of the last block kept by score and the first left out in row 7 (a tie, after 1e-5 apart).
    row = scores[0, 0, 7, :8]
    order = ref.order[0, 0, 7].tolist()
    inner, outer = order[int(ref.counts[0, 0, 7]) - 1], order[int(ref.counts[0, 0, 7])]
    tied = scores.clone()
    tied[0, 0, 7, inner], tied[0, 0, 7, outer] = row[outer], row[inner]
    swapped = compact_plan(tied, budgets, nb * 64, cfg)
    assert not swapped.to_mask().equal(ref.to_mask())
    near = scores.clone()
    near[0, 0, 7, outer] = row[inner] * (1 - 1e-5)
    assert plan_mismatches(swapped, ref, near, 0) == 0, "a swap of blocks 1e-5 apart is a tie"
    assert plan_mismatches(swapped, ref, scores, 0) >= 1, "a swap of well-separated blocks is a mismatch"
    # A plan that drops a forced block, or keeps a far block, is rejected.
    mask = ref.to_mask().clone()
    mask[0, 1, 5, 5] = False
    assert plan_mismatches(proxyattn_plan_from_mask(mask, nb), ref, scores, 0) >= 1
    # Budgets: a tie only when the cumulative mass crosses gamma within the tolerance.
    mass = torch.tensor([[[0.5, 0.3, 0.15, 0.05]]])
    assert budget_mismatches(torch.tensor([[3]]), mass, 0.95) == 0
    assert budget_mismatches(torch.tensor([[2]]), mass, 0.95) == 1
    assert budget_mismatches(torch.tensor([[2]]), mass, 0.80003) == 0  # 0.8 vs 0.80003: a tie


def proxyattn_plan_from_mask(mask, nb):
    from proxyattn.plan import BlockPlan

    return BlockPlan.from_mask(mask, block_size=64, seq_len=nb * 64)
