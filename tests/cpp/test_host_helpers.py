"""The CUDA C helper kernels' bodies (cpp/src/helpers_impl.h: block selection, budgets of rules 0-2, the LSE
combine, the dense fallback's early and late decisions, budget rule 3's reported budgets) run on the CPU through
libproxyattn_host, against the PyTorch code they replace on the GPU path and the fp32 reference, padded and packed
(varlen) batches, ties included."""

from __future__ import annotations

import ctypes as C
import dataclasses
import math

import numpy as np
import pytest
import torch

from proxyattn import ProxyAttnConfig, reference
from proxyattn.plan import compact_plan
from tests.cpp.libproxyattn import ptr


def _host_select(host, scores, budgets, cfg: ProxyAttnConfig, seq_len, cu=None, dense_below=-1):
    b, r, nb, _ = scores.shape
    hq = budgets.shape[1]
    order = np.full((b, r, nb, nb), -7, dtype=np.int32)
    counts = np.full((b, hq, nb), -7, dtype=np.int32)
    sc = np.ascontiguousarray(scores, dtype=np.float32)
    bu = np.ascontiguousarray(budgets, dtype=np.int32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    host.pa_host_select(
        C.c_void_p(ptr(sc)),
        C.c_void_p(ptr(bu)),
        C.c_void_p(ptr(order)),
        C.c_void_p(ptr(counts)),
        None if cu_arr is None else C.c_void_p(ptr(cu_arr)),
        b,
        r,
        seq_len,
        cfg.block_size,
        nb,
        hq,
        cfg.min_budget_blocks,
        int(cfg.keep_sink),
        int(cfg.keep_diagonal),
        dense_below,
    )
    return order, counts


def _random_scores(b, r, nb, gen, ties: bool):
    s = torch.rand(b, r, nb, nb, generator=gen)
    if ties:
        s = (s * 4).floor() / 4  # only 4 distinct values: many ties, broken by the lower index
    return s.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf"))


@pytest.mark.parametrize(
    "nb,r,hq,sink,diag,min_tokens,ties",
    [
        (1, 1, 4, True, True, 0, False),
        (7, 1, 4, True, True, 128, True),
        (13, 2, 8, True, False, 0, True),
        (13, 2, 8, False, True, 256, False),
        (9, 4, 4, False, False, 0, True),
        (33, 1, 7, True, True, 512, True),
    ],
)
def test_select_equals_compact_plan(host, nb, r, hq, sink, diag, min_tokens, ties):
    gen = torch.Generator().manual_seed(nb * 31 + r)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=min_tokens, keep_sink=sink, keep_diagonal=diag, dense_below_tokens=0)
    seq_len = nb * 64 - 5  # last block partial
    b = 2
    scores = _random_scores(b, r, nb, gen, ties)
    budgets = torch.randint(1, nb + 1, (b, hq), generator=gen, dtype=torch.int32)
    want = compact_plan(scores, budgets, seq_len, cfg)
    order, counts = _host_select(host, scores.numpy(), budgets.numpy(), cfg, seq_len)
    np.testing.assert_array_equal(counts, want.counts.numpy())
    np.testing.assert_array_equal(order, want.order.numpy())


def test_select_varlen_plans_each_sequence_alone(host):
    gen = torch.Generator().manual_seed(5)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=128, dense_below_tokens=300)
    lengths = [700, 64, 290, 1000]  # 290 <= dense_below: keep-everything plan
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / 64)
    b, r, hq = len(lengths), 2, 4
    scores = _random_scores(b, r, nb_max, gen, ties=True)
    budgets = torch.randint(1, nb_max + 1, (b, hq), generator=gen, dtype=torch.int32)
    order, counts = _host_select(host, scores.numpy(), budgets.numpy(), cfg, max_len, cu=cu, dense_below=300)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 64)
        if n <= 300:
            np.testing.assert_array_equal(counts[i, :, :nb], np.broadcast_to(np.arange(1, nb + 1), (hq, nb)))
            np.testing.assert_array_equal(order[i, :, :nb], np.broadcast_to(np.arange(nb_max), (r, nb, nb_max)))
        else:
            bud = budgets[i : i + 1].clamp(max=nb)
            want = compact_plan(scores[i : i + 1, :, :nb, :nb].contiguous(), bud, n, cfg)
            np.testing.assert_array_equal(counts[i, :, :nb], want.counts[0].numpy())
            np.testing.assert_array_equal(order[i, :, :nb, :nb], want.order[0].numpy())
        assert (counts[i, :, nb:] == -7).all() and (order[i, :, nb:] == -7).all()  # rows past the end untouched


def _host_budgets(host, mass, seq_len, block_size, gamma, fraction=0.0, cu=None, dense_below=-1, scores=None, rule=0, sink=True, diag=True):
    """pa_budgets on the CPU; rules 1 ("recall") and 2 ("row_recall") read `scores` [B, R, Nb, Nb]; rule 2 reads
    the mass of every row, `[B, Hq, block_size, Nb]`."""
    if rule == 2:
        b, hq, rows, nb = mass.shape
        assert rows == block_size
    else:
        b, hq, nb = mass.shape
    out = np.full((b, hq), -7, dtype=np.int32)
    m = np.ascontiguousarray(mass, dtype=np.float32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    sc = None if scores is None else np.ascontiguousarray(scores, dtype=np.float32)
    assert sc is None or sc.shape[0] == b and sc.shape[2:] == (nb, nb) and hq % sc.shape[1] == 0
    host.pa_host_budgets(
        ptr(m),
        ptr(out),
        None if cu_arr is None else ptr(cu_arr),
        b,
        hq,
        seq_len,
        block_size,
        nb,
        1,
        gamma,
        fraction,
        dense_below,
        None if sc is None else ptr(sc),
        1 if sc is None else sc.shape[1],
        rule,
        int(sink),
        int(diag),
    )
    return out


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.95, 0.999, 1.0])
def test_budgets_equal_the_torch_ops_of_the_gpu_path(host, gamma):
    from proxyattn.kernels.estimate_budgets import _budgets_from_mass

    gen = torch.Generator().manual_seed(int(gamma * 1000))
    b, hq, nb = 3, 5, 40
    logits = torch.randn(b, hq, nb, generator=gen) * 3
    mass = torch.softmax(logits, dim=-1)
    mass[0, 0] = 1.0 / nb  # all equal: ties
    got = _host_budgets(host, mass.numpy(), nb * 128, 128, gamma)
    if gamma >= 1.0:
        want = torch.full((b, hq), nb, dtype=torch.int32)
    else:
        want = _budgets_from_mass(mass, gamma, torch.full((1, 1), nb, dtype=torch.int64))
    np.testing.assert_array_equal(got, want.numpy())


def test_budgets_fraction_and_dense_and_varlen(host):
    from proxyattn import reference

    lengths = [130, 1000, 5000]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    nb_max = math.ceil(5000 / 128)
    mass = np.zeros((3, 2, nb_max), np.float32)
    for frac in (0.01, 0.3, 0.77, 1.0):
        got = _host_budgets(host, mass, 5000, 128, 0.9, fraction=frac, cu=cu, dense_below=0)
        for i, n in enumerate(lengths):
            nb = math.ceil(n / 128)
            want = reference.fraction_budgets(1, 2, nb, frac, "cpu")
            np.testing.assert_array_equal(got[i], want[0].numpy())
    got = _host_budgets(host, mass, 5000, 128, 0.9, cu=cu, dense_below=1000)
    assert got[0].tolist() == [2, 2] and got[1].tolist() == [8, 8]  # dense sequences keep every block
    gen = torch.Generator().manual_seed(0)
    mass = torch.zeros(3, 2, nb_max)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 128)
        mass[i, :, :nb] = torch.softmax(torch.randn(2, nb, generator=gen) * 2, dim=-1)
    got = _host_budgets(host, mass.numpy(), 5000, 128, 0.9, cu=cu, dense_below=0)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 128)
        cum = mass[i, :, :nb].sort(dim=-1, descending=True).values.cumsum(-1)
        np.testing.assert_array_equal(got[i], ((cum < 0.9).sum(-1) + 1).clamp(max=nb).numpy())


def _recall_inputs(b, s, hq, hkv, r, block_size, gen, d=16):
    """Structured q, k `[B, S, H, D]`, their proxy scores `[B, R, Nb, Nb]` and last-block mass `[B, Hq, Nb]` from the
    fp32 reference, and the scale. Every query head attends mostly to 3 "hot" keys of its own (a direction u_h in q and
    in those keys), so budgets lie well below Nb and the heads of one ranking look at different blocks: the shared
    ranking of the last query block then misses some of a head's mass (rule 1 > rule 0)."""
    from proxyattn import reference

    q = torch.randn(b, s, hq, d, generator=gen) * 0.5
    k = torch.randn(b, s, hkv, d, generator=gen) * 0.5
    u = torch.nn.functional.normalize(torch.randn(b, hq, d, generator=gen), dim=-1) * 6
    for bi in range(b):
        for h in range(hq):
            q[bi, :, h] += u[bi, h]
            hot = torch.randint(0, s, (3,), generator=gen)
            k[bi, hot, h // (hq // hkv)] += u[bi, h]
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=r, block_size=block_size, stride=4, scale=scale)
    mass = reference.last_block_mass(q, k, block_size=block_size, scale=scale)
    return q, k, scale, scores, mass


def _reference_recall(q, k, scores, cfg: ProxyAttnConfig, scale):
    from proxyattn import reference

    order = reference.last_row_order(scores, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal)
    return reference.head_budgets(q, k, block_size=cfg.block_size, gamma=cfg.gamma, scale=scale, last_order=order)


@pytest.mark.parametrize(
    "nb,r,hq,hkv,sink,diag,ties,gamma",
    [
        (1, 1, 4, 2, True, True, False, 0.9),
        (2, 1, 4, 2, True, True, True, 0.5),
        (9, 1, 4, 2, True, True, False, 0.95),
        (13, 2, 8, 2, True, False, True, 0.9),
        (13, 2, 8, 4, False, True, False, 0.8),
        (11, 4, 4, 4, False, False, True, 0.7),
        (24, 1, 7, 7, True, True, True, 0.999),
        (17, 2, 6, 2, True, True, False, 0.3),
    ],
)
def test_recall_budgets_equal_the_reference(host, nb, r, hq, hkv, sink, diag, ties, gamma):
    """budget_rule 1 of pa_budgets == reference.head_budgets(last_order=last_row_order(scores)) and the GPU path's
    torch ops (estimate_budgets._recall_budgets), on the reference's scores and on tie-heavy random scores."""
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(nb * 131 + r * 7 + hq)
    bs, b = 64, 2
    s = nb * bs - 5 if nb > 1 else 40  # last block partial
    cfg = ProxyAttnConfig(
        block_size=bs, gamma=gamma, keep_sink=sink, keep_diagonal=diag, proxy_heads=r, budget_rule=1, dense_below_tokens=0
    )
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    score_sets = [scores]
    if ties:
        score_sets.append(_random_scores(b, r, nb, gen, ties=True))  # forced and free blocks tied with others
    for sc in score_sets:
        want = _reference_recall(q, k, sc, cfg, scale)
        got = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=sc.numpy(), rule=1, sink=sink, diag=diag, dense_below=0)
        np.testing.assert_array_equal(got, want.numpy())
        torch_ops = _recall_budgets(mass, sc, cfg, torch.full((b,), nb, dtype=torch.int64))
        np.testing.assert_array_equal(got, torch_ops.numpy())
    # Rule 0 on the same mass is still the sorted-mass rule (scores unread: NULL).
    rule0 = _host_budgets(host, mass.numpy(), s, bs, gamma, dense_below=0)
    from proxyattn import reference

    want0 = reference.head_budgets(q, k, block_size=bs, gamma=gamma, scale=scale)
    np.testing.assert_array_equal(rule0, want0.numpy())


def test_recall_budgets_differ_from_the_mass_rule(host):
    """A head whose mass sits where the shared ranking does not look: rule 1 needs more blocks than rule 0."""
    nb, hq = 8, 2
    scores = torch.full((1, 1, nb, nb), float("-inf"))
    scores[0, 0] = torch.tril(torch.ones(nb, nb)) * 0.01
    scores[0, 0, nb - 1, :nb] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    mass = torch.zeros(1, hq, nb)
    mass[0, 0] = torch.tensor([0.04, 0.86, 0.05, 0.0, 0.0, 0.0, 0.0, 0.05])  # follows the ranking
    mass[0, 1] = torch.tensor([0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.85, 0.1])  # attends where the ranking looks last
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    # ranking: 7 (diagonal, 0.3) and 0 (sink, 0.1) first, then 1, 2, 3, 4, 5, 6
    assert got.tolist() == [[3, 8]]
    assert _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, dense_below=0).tolist() == [[2, 2]]
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, sink=False, diag=False, dense_below=0)
    assert got.tolist() == [[2, 7]]  # ranking 1, 2, 3, 4, 5, 6, 7, 0
    # Sink and diagonal tied: the lower index (the sink) ranks first, so the diagonal's mass counts second.
    scores[0, 0, nb - 1, nb - 1] = scores[0, 0, nb - 1, 0]
    mass[0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.95])
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got.tolist() == [[3, 2]]
    scores[0, 0, nb - 1, nb - 1] = float(np.nextafter(np.float32(0.1), np.float32(1)))  # now above the sink: first
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got.tolist() == [[3, 1]]


def _reference_row_recall(q, k, scores, cfg: ProxyAttnConfig, scale):
    from proxyattn import reference

    order = reference.last_row_order(scores, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal)
    return reference.head_budgets(q, k, block_size=cfg.block_size, gamma=cfg.gamma, scale=scale, last_order=order, per_row=True)


@pytest.mark.parametrize(
    "nb,r,hq,hkv,sink,diag,ties,gamma",
    [
        (1, 1, 4, 2, True, True, False, 0.9),
        (2, 1, 4, 2, True, True, True, 0.5),
        (9, 1, 4, 2, True, True, False, 0.95),
        (13, 2, 8, 2, True, False, True, 0.9),
        (11, 4, 4, 4, False, False, True, 0.7),
        (24, 1, 7, 7, True, True, True, 0.999),
    ],
)
def test_row_recall_budgets_equal_the_reference(host, nb, r, hq, hkv, sink, diag, ties, gamma):
    """budget_rule 2 of pa_budgets (mass of every row of the last query block) == reference.head_budgets(per_row=True)
    and the GPU path's torch ops (estimate_budgets._recall_budgets on [B, Hq, rows, Nb]); never below rule 1."""
    from proxyattn import reference
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(nb * 17 + r * 3 + hq)
    bs, b = 64, 2
    s = nb * bs - 5 if nb > 1 else 40  # last block partial; nb = 1: fewer rows than the block, the rest hold no mass
    cfg = ProxyAttnConfig(
        block_size=bs, gamma=gamma, keep_sink=sink, keep_diagonal=diag, proxy_heads=r, budget_rule=2, dense_below_tokens=0
    )
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    rows = torch.zeros(b, hq, bs, nb)
    ref_rows = reference.last_block_row_mass(q, k, block_size=bs, scale=scale)  # [B, Hq, min(S, bs), Nb]
    rows[:, :, : ref_rows.shape[2]] = ref_rows
    score_sets = [scores] + ([_random_scores(b, r, nb, gen, ties=True)] if ties else [])
    for sc in score_sets:
        want = _reference_row_recall(q, k, sc, cfg, scale)
        got = _host_budgets(host, rows.numpy(), s, bs, gamma, scores=sc.numpy(), rule=2, sink=sink, diag=diag, dense_below=0)
        np.testing.assert_array_equal(got, want.numpy())
        np.testing.assert_array_equal(got, _recall_budgets(rows, sc, cfg, torch.full((b,), nb, dtype=torch.int64)).numpy())
        rule1 = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=sc.numpy(), rule=1, sink=sink, diag=diag, dense_below=0)
        assert (got >= rule1).all()


def test_row_recall_keeps_a_row_the_mean_hides(host):
    """One row of the last block attends where the ranking looks last: its mass is diluted in the mean (rule 1
    stops early), rule 2 extends the prefix to that row's block."""
    nb, bs = 8, 64
    scores = torch.full((1, 1, nb, nb), float("-inf"))
    scores[0, 0] = torch.tril(torch.ones(nb, nb)) * 0.01
    scores[0, 0, nb - 1, :nb] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])  # ranking 7, 0, 1, 2, ..., 6
    rows = torch.zeros(1, 1, bs, nb)
    rows[0, 0, :, 1] = 1.0  # every row on block 1 ...
    rows[0, 0, 5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # ... but row 5 on block 6 (last ranked)
    got = _host_budgets(host, rows.numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=2, dense_below=0)
    assert got.tolist() == [[8]]
    got1 = _host_budgets(host, rows.mean(dim=2).numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got1.tolist() == [[3]]
    rows[0, 0, 5] = 0.0  # a row without mass (past a sequence's end) needs nothing
    got = _host_budgets(host, rows.numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=2, dense_below=0)
    assert got.tolist() == [[3]]


def test_row_recall_budgets_of_packed_sequences(host):
    """Packed batch, rule 2: each sequence reads its own rows and blocks; garbage past each end is never read;
    a sequence shorter than one block has rows without mass; dense sequences keep every block."""
    from proxyattn import reference

    gen = torch.Generator().manual_seed(5)
    bs, r, hq, hkv, gamma, dense_below = 64, 2, 4, 2, 0.85, 30
    lengths = [700, 40, 290, 90, 1]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / bs)
    b = len(lengths)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, proxy_heads=r, budget_rule=2, dense_below_tokens=dense_below)
    scores = torch.rand(b, r, nb_max, nb_max, generator=gen) + 5.0  # garbage beyond each sequence: never read
    rows = torch.full((b, hq, bs, nb_max), 0.75)
    want = []
    for i, n in enumerate(lengths):
        nb = math.ceil(n / bs)
        q, k, scale, sc, _ = _recall_inputs(1, n, hq, hkv, r, bs, gen)
        scores[i, :, :nb, :nb] = sc[0]
        rm = reference.last_block_row_mass(q, k, block_size=bs, scale=scale)
        rows[i, :, :, :nb] = 0.0
        rows[i, :, : rm.shape[2], :nb] = rm[0]
        want.append([nb] * hq if n <= dense_below else _reference_row_recall(q, k, sc, cfg, scale)[0].tolist())
    got = _host_budgets(host, rows.numpy(), max_len, bs, gamma, cu=cu, dense_below=dense_below, scores=scores.numpy(), rule=2)
    assert got.tolist() == want
    assert want[2] != [math.ceil(290 / bs)] * hq  # the sparse short sequence drops blocks


@pytest.mark.parametrize(
    "r,hq,hkv,sink,diag,gamma,min_tokens",
    [
        (1, 4, 2, True, True, 0.9, 128),
        (2, 8, 4, True, False, 0.95, 0),
        (2, 4, 2, False, True, 0.6, 256),
        (1, 4, 4, False, False, 0.8, 0),
    ],
)
def test_recall_plan_equals_plan_blocks(host, r, hq, hkv, sink, diag, gamma, min_tokens):
    """The C helpers' plan with budget_rule 1 (pa_budgets then pa_select) == api.plan_blocks on the CPU."""
    from proxyattn import api

    gen = torch.Generator().manual_seed(hq * 10 + r)
    bs, b, nb = 64, 2, 15
    s = nb * bs - 17
    cfg = ProxyAttnConfig(
        block_size=bs,
        gamma=gamma,
        keep_sink=sink,
        keep_diagonal=diag,
        proxy_heads=r,
        min_budget_tokens=min_tokens,
        budget_rule=1,
        dense_below_tokens=0,
        dense_density=None,
    )  # the C library implements no dense fallback
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    want = api.plan_blocks(q, k, cfg, scale=scale)
    assert want.dense_heads is None or not want.dense_heads.any()
    budgets = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=scores.numpy(), rule=1, sink=sink, diag=diag, dense_below=0)
    np.testing.assert_array_equal(budgets, api.head_budgets(q, k, cfg, scale=scale, scores=scores).numpy())
    order, counts = _host_select(host, scores.numpy(), budgets, cfg, s, dense_below=0)
    np.testing.assert_array_equal(counts, want.counts.numpy())
    np.testing.assert_array_equal(order, want.order.numpy())
    # The rule matters here: the mass rule gives other budgets for some head.
    mass_rule = api.head_budgets(q, k, dataclasses.replace(cfg, budget_rule=0), scale=scale)
    assert (torch.from_numpy(budgets) >= mass_rule).all() and (torch.from_numpy(budgets) != mass_rule).any()


@pytest.mark.parametrize("dense_below", [0, 300])
def test_recall_budgets_and_plans_of_packed_sequences(host, dense_below):
    """Packed varlen batch: each sequence's budgets read its own last query block (row Nb_b - 1 of its scores) and
    its own blocks only; garbage past each sequence's end (scores and mass) is never read. Sparse sequences equal
    the reference / plan_blocks on the sequence alone, dense ones (length <= dense_below) keep every block."""
    from proxyattn import api
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(11 + dense_below)
    bs, r, hq, hkv, gamma = 64, 2, 4, 2, 0.85
    lengths = [700, 64, 290, 1000, 130, 1]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / bs)
    b = len(lengths)
    cfg = ProxyAttnConfig(
        block_size=bs, gamma=gamma, proxy_heads=r, min_budget_tokens=128, budget_rule=1, dense_below_tokens=dense_below, dense_density=None
    )  # the C library: no dense fallback
    scores = torch.rand(b, r, nb_max, nb_max, generator=gen) + 5.0  # garbage beyond each sequence: never read
    mass = torch.full((b, hq, nb_max), 0.75)
    per_seq = []
    for i, n in enumerate(lengths):
        nb = math.ceil(n / bs)
        q, k, scale, sc, m = _recall_inputs(1, n, hq, hkv, r, bs, gen)
        scores[i, :, :nb, :nb] = sc[0]
        mass[i, :, :nb] = m[0]
        per_seq.append((q, k, scale, sc, nb))
    got = _host_budgets(host, mass.numpy(), max_len, bs, gamma, cu=cu, dense_below=dense_below, scores=scores.numpy(), rule=1)
    budgets_packed = np.full((b, hq), -7, dtype=np.int32)
    for i, (q, k, scale, sc, nb) in enumerate(per_seq):
        if lengths[i] <= dense_below:
            assert got[i].tolist() == [nb] * hq
        else:
            np.testing.assert_array_equal(got[i], _reference_recall(q, k, sc, cfg, scale)[0].numpy())
        budgets_packed[i] = got[i]
    # The GPU path's torch ops on the packed batch (zero mass past each end) agree on every sparse sequence.
    nb_seq = torch.tensor([math.ceil(n / bs) for n in lengths], dtype=torch.int64)
    packed_mass = torch.where(torch.arange(nb_max) < nb_seq[:, None, None], mass, 0.0)
    torch_ops = _recall_budgets(packed_mass, scores, cfg, nb_seq).numpy()
    sparse = [i for i, n in enumerate(lengths) if n > dense_below]
    np.testing.assert_array_equal(got[sparse], torch_ops[sparse])
    # Plans: the packed selection == plan_blocks of each sparse sequence alone.
    order, counts = _host_select(host, scores.numpy(), budgets_packed, cfg, max_len, cu=cu, dense_below=dense_below)
    for i, (q, k, scale, _, nb) in enumerate(per_seq):
        if lengths[i] <= dense_below:
            np.testing.assert_array_equal(counts[i, :, :nb], np.broadcast_to(np.arange(1, nb + 1), (hq, nb)))
            continue
        want = api.plan_blocks(q, k, cfg, scale=scale)
        assert want.dense_heads is None or not want.dense_heads.any()
        np.testing.assert_array_equal(counts[i, :, :nb], want.counts[0].numpy())
        np.testing.assert_array_equal(order[i, :, :nb, :nb], want.order[0].numpy())


def test_combine_lse_equals_the_torch_ops_of_the_gpu_path(host):
    gen = torch.Generator().manual_seed(3)
    rows, nchunk, bs = 6, 5, 64
    mstat = torch.randn(rows, nchunk, bs, generator=gen) * 4
    lstat = torch.rand(rows, nchunk, bs, generator=gen) * 10 + 0.5
    mstat[0, :, :3] = -1.0e30  # rows with no visible key in any chunk: l = 0
    lstat[0, :, :3] = 0.0
    lse = np.zeros((rows, bs), np.float32)
    host.pa_host_combine_lse(ptr(mstat.numpy()), ptr(lstat.numpy()), ptr(lse), rows, nchunk, bs)
    # proxyattn/kernels/estimate_budgets.py::_launch_mass, between PASS 0 and the finish kernel:
    top = mstat.amax(dim=1, keepdim=True)
    total = (lstat * torch.exp2(mstat - top)).sum(dim=1)
    want = torch.where(total > 0, top.squeeze(1) + torch.log2(total.clamp_min(1e-30)), float("-inf"))
    assert np.isneginf(lse[0, :3]).all()
    np.testing.assert_allclose(lse, want.numpy(), rtol=2e-6, atol=1e-5)


# ------------------------------------------------------------------------------- budget rule 3 and the dense fallback
def _host_early(host, budgets0, num_kv_heads, seq_len, block_size, permille, cu=None):
    b, hq = budgets0.shape
    flags = np.full(b * num_kv_heads, -7, np.int32)
    bu = np.ascontiguousarray(budgets0, dtype=np.int32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    host.pa_host_early_dense(
        ptr(bu), ptr(flags), None if cu_arr is None else ptr(cu_arr), b, seq_len, block_size, hq, num_kv_heads, permille
    )
    return flags.reshape(b, num_kv_heads)


def _host_needs_budgets(host, need, seq_len, block_size, min_blocks, dense_below=-1, cu=None, full=0):
    b, hq, nb = need.shape
    out = np.full((b, hq), -7, np.int32)
    nd = np.ascontiguousarray(need, dtype=np.int32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    host.pa_host_needs_budgets(
        ptr(nd), ptr(out), None if cu_arr is None else ptr(cu_arr), b, seq_len, block_size, nb, hq, min_blocks, dense_below, full
    )
    return out


def _host_dense_fallback(host, counts, early, num_kv_heads, seq_len, block_size, permille, cu=None):
    """pa_dense_fallback on a copy of counts `[B, Hq, Nb]`; early bool/int `[B, Hkv]` or None."""
    b, hq, nb = counts.shape
    out = np.ascontiguousarray(counts, dtype=np.int32).copy()
    ea = None if early is None else np.ascontiguousarray(early, dtype=np.int32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    host.pa_host_dense_fallback(
        ptr(out),
        None if ea is None else ptr(ea),
        None if cu_arr is None else ptr(cu_arr),
        b,
        num_kv_heads,
        seq_len,
        block_size,
        nb,
        hq,
        permille,
    )
    return out


@pytest.mark.parametrize("permille", [1, 500, 875, 900, 1000])
def test_early_dense_equals_the_reference(host, permille):
    gen = torch.Generator().manual_seed(permille)
    lengths = [64 * 9 - 3, 64 * 16, 1, 64 * 16 - 64]  # Nb_b 9, 16, 1, 15 in a packed batch
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    nb_seq = torch.tensor([math.ceil(n / 64) for n in lengths])
    hq, hkv = 8, 2
    budgets = torch.minimum(torch.randint(1, 17, (4, hq), generator=gen, dtype=torch.int32), nb_seq[:, None].int())
    budgets[1, :4] = torch.tensor([14, 14, 14, 14])  # 56 of 64 = 875 permille exactly: the boundary
    want = reference.early_dense_groups(budgets, hkv, permille, nb_seq)
    got = _host_early(host, budgets.numpy(), hkv, max(lengths), 64, permille, cu=cu)
    np.testing.assert_array_equal(got, want.int().numpy())
    if permille == 875:
        assert got[1, 0] == 1 and _host_early(host, budgets.numpy(), hkv, max(lengths), 64, 876, cu=cu)[1, 0] == 0
    # Padded batch: every sequence has Nb blocks; permille 0 (no fallback): nothing is dense.
    pad = _host_early(host, budgets.numpy(), hkv, 16 * 64, 64, permille)
    np.testing.assert_array_equal(pad, reference.early_dense_groups(budgets, hkv, permille, torch.full((4,), 16)).int().numpy())
    assert not _host_early(host, np.full((4, hq), 16, np.int32), hkv, 16 * 64, 64, 0).any()


def test_needs_budgets_equal_the_reference(host):
    gen = torch.Generator().manual_seed(11)
    b, hq, nb = 4, 6, 12
    need = torch.randint(0, nb + 1, (b, hq, nb), generator=gen, dtype=torch.int32)
    for mb in (0, 3, 20):
        got = _host_needs_budgets(host, need.numpy(), nb * 64, 64, mb)
        np.testing.assert_array_equal(got, reference.needs_budgets(need, mb).numpy())
    lengths = [700, 64, 0, 200]  # Nb_b 11, 1, 0 (empty), 4; 200 <= dense_below 250: every block
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    nb_seq = torch.tensor([math.ceil(n / 64) for n in lengths])
    got = _host_needs_budgets(host, need.numpy(), 700, 64, 3, dense_below=250, cu=cu)
    want = reference.needs_budgets(need, 3, nb_seq)
    want = torch.where(torch.tensor(lengths)[:, None] <= 250, nb_seq[:, None].int(), want)  # estimate_needs._plan
    np.testing.assert_array_equal(got, want.numpy())
    full = _host_needs_budgets(host, need.numpy(), 700, 64, 3, cu=cu, full=1)  # gamma >= 1: Nb_b, need unread
    np.testing.assert_array_equal(full, np.broadcast_to(nb_seq.numpy()[:, None], (b, hq)))


@pytest.mark.parametrize("permille,with_early", [(1, False), (700, True), (850, False), (1000, True), (0, True)])
def test_dense_fallback_equals_the_reference(host, permille, with_early):
    """pa_dense_fallback == plan.dense_fallback (reference.dense_groups | early, apply_dense_groups), padded and
    packed (query blocks past a sequence's end hold garbage here: never read, never written)."""
    from proxyattn.plan import BlockPlan, dense_fallback

    gen = torch.Generator().manual_seed(permille + with_early)
    b, hq, hkv, nb = 3, 8, 4, 10
    m1 = torch.arange(1, nb + 1, dtype=torch.int32)
    keep = torch.rand(b, hq, nb, generator=gen)
    counts = torch.minimum(torch.ceil(keep * m1 * 1.3).int(), m1).clamp_min(1)
    counts[0, 2:4] = m1  # group 1 of sequence 0 already keeps every block
    counts[1, 4:6] = torch.minimum(m1, torch.full_like(m1, 9))  # 2 x (55 - 1) = 108 of 110: 981 permille
    early = torch.rand(b, hkv, generator=gen) < 0.3 if with_early else None
    cfg = ProxyAttnConfig(block_size=64, dense_density=None if permille == 0 else permille / 1000)
    assert cfg.dense_density_permille == permille
    plan = BlockPlan(torch.zeros(b, 1, nb, nb, dtype=torch.int32), counts, counts[..., -1].contiguous(), 64, nb * 64)
    want = dense_fallback(plan, hkv, cfg, early=early).counts if permille else counts.clone()
    if permille == 0 and early is not None:  # the library applies early flags whatever permille (rule 3, gamma 1)
        want = reference.apply_dense_groups(counts, early)[0]
    got = _host_dense_fallback(host, counts.numpy(), None if early is None else early.numpy(), hkv, nb * 64, 64, permille)
    np.testing.assert_array_equal(got, want.numpy())
    # Packed: sequences of 10, 3 and 0 blocks; entries past each end are garbage (-7) and stay untouched.
    lengths = [640, 150, 0]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    nb_seq = torch.tensor([math.ceil(n / 64) for n in lengths])
    packed = torch.where(m1 <= nb_seq[:, None, None], counts, torch.full_like(counts, -7))
    got = _host_dense_fallback(host, packed.numpy(), None if early is None else early.numpy(), hkv, 640, 64, permille, cu=cu)
    zeroed = torch.where(m1 <= nb_seq[:, None, None], counts, 0)  # the Python path's padding: 0
    if permille:
        want = dense_fallback(dataclasses.replace(plan, counts=zeroed), hkv, cfg, nb_seq, early=early).counts
    else:
        want = zeroed if early is None else reference.apply_dense_groups(zeroed, early, nb_seq)[0]
    inside = (m1 <= nb_seq[:, None, None]).expand_as(counts).numpy()
    np.testing.assert_array_equal(got[inside], want.numpy()[inside])
    assert (got[~inside] == -7).all()
