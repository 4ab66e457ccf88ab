#!/usr/bin/env python3
"""GPU check and benchmark of the estimation kernels (run on the H200 through the device tool, not in the CPU suite).

1. Correctness, 4K-32K, fresh random and structured inputs: proxy scores, block mass / budgets and the plan
   against the fp32 reference computed on the GPU (chunked). Outputs are poisoned with NaN before each run; NaN
   (an unwritten element) fails. Plans must equal the reference plan up to ties (`proxyattn.testing`), also for a
   packed (varlen) batch, and for structured inputs at 128K (gamma 0.9 and 0.95).
   `--recall`: only what is new since the first H200 run: budget_rule 1 ("recall"), its budgets against the mass
   accumulated along the last row's ranking of the GPU's own scores (4K-128K, packed batch); the head_max score
   kernel (estimator 1) against its PyTorch reference (8K-32K, D 64/128/256); plan_blocks time with rule 0 vs 1
   and with head_max at stride 4/16/32 (32K, 128K).
2. CUDA graph: `proxyattn.plan_blocks` captured in a graph (fails if anything synchronises with the host), the
   replay equals the eager plan.
3. Timing, 32K-128K, Llama-3-8B shapes (32 q heads, 8 KV heads, D 128, bf16, B 1), default config: each stage
   (scores, budgets, selection) and the whole `plan_blocks`, `do_bench` median over rotated input sets; a small
   sweep of the scores kernel's tile/warps/stages at 128K; peak extra memory of `plan_blocks` at 128K.

    python3 -m tests.gpu.check_estimation --out DIR [--commit SHA]

Writes DIR/estimation_<date>.json (GPU name, date, commit, command, versions, every figure) and prints a table.
Exit status 1 on any failed check. Run from the repository root as `python3 -m tests.gpu.check_estimation`; the
checks (not the timings) also run under pytest as tests/gpu/test_gpu_estimation.py (`pytest -m gpu tests/gpu`).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import sys
import time

import torch
import triton
from triton.testing import do_bench


import proxyattn
from proxyattn import ProxyAttnConfig, reference
from proxyattn.kernels import estimate_budgets as eb
from proxyattn.kernels import estimate_scores as es
from proxyattn.kernels import estimate_select as esel
from proxyattn.plan import compact_plan, compact_plan_needs, dense_fallback
from proxyattn.testing import budget_mismatches, need_mismatches, plan_mismatches, row_budget_mismatches, structured_qkv

ref_scores_fn = None  # set below (ref_scores)
RESULTS: list[dict] = []
TIMINGS: list[dict] = []
DEV = "cuda"


def record(name: str, fn) -> None:
    t0 = time.perf_counter()
    entry = {"check": name}
    try:
        info = fn()
        entry.update(ok=True, seconds=round(time.perf_counter() - t0, 1), info=info)
    except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the script at the end
        entry.update(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
    if DEV == "cuda":
        torch.cuda.synchronize()
    RESULTS.append(entry)
    print(("PASS " if entry["ok"] else "FAIL ") + name + "  " + str(entry.get("info", entry.get("error"))), flush=True)


def rel_err(a: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    a, e = a.double(), e.double()
    fin = torch.isfinite(e)
    assert torch.equal(torch.isinf(a), torch.isinf(e)), "inf (above-diagonal) positions differ"
    assert not torch.isnan(a).any(), "NaN in output (unwritten element?)"
    d = a[fin] - e[fin]
    return float(d.norm() / e[fin].norm().clamp_min(1e-30)), float(d.abs().max()) if d.numel() else 0.0


def inputs(kind, b, s, hq, hkv, d, seed, dtype=torch.bfloat16):
    if kind == "structured":
        q, k, _ = structured_qkv(b, s, hq, hkv, d, dtype=dtype, device=DEV, seed=seed)
        return q, k
    g = torch.Generator(device=DEV).manual_seed(seed)
    return (torch.randn(b, s, hq, d, generator=g, device=DEV).to(dtype), torch.randn(b, s, hkv, d, generator=g, device=DEV).to(dtype))


def ref_scores(q, k, g, bs, st, scale):
    """reference.proxy_scores computed the same way (fp32, per query block) without its [S, S] causal-mask
    helper, so that it runs at 128K; checked equal to reference.proxy_scores in the first case."""
    b, s = q.shape[:2]
    nb = -(-s // bs)
    pq, pk = reference.proxy_queries_keys(q, k, g)
    out = torch.full((b, g, nb, nb), float("-inf"), device=q.device)
    for m in range(nb):
        hi = min(s, (m + 1) * bs)
        rows = torch.arange(m * bs, hi, st, device=q.device)
        lg = torch.einsum("brgd,bkgd->bgrk", pq[:, rows], pk[:, :hi]) * scale
        lg = lg.masked_fill(torch.arange(hi, device=q.device)[None, :] > rows[:, None], float("-inf"))
        p = torch.nn.functional.pad(torch.softmax(lg, dim=-1), (0, (m + 1) * bs - hi))
        out[:, :, m, : m + 1] = p.reshape(b, g, len(rows), m + 1, bs).amax(dim=(2, 4))
    return out


ref_scores_fn = ref_scores


def ref_mass(q, k, bs, scale, chunk_heads=8):
    """Reference mass per key block of each head's last query block, fp32 on the GPU, chunked over heads."""
    b, s, hq, _ = q.shape
    nb = -(-s // bs)
    rows = torch.arange(s - min(bs, s), s, device=q.device)
    grp = hq // k.shape[2]
    out = torch.empty(b, hq, nb, device=q.device)
    keys = torch.arange(s, device=q.device)
    for h0 in range(0, hq, chunk_heads):
        hs = range(h0, min(hq, h0 + chunk_heads))
        kx = torch.stack([k[:, :, h // grp] for h in hs], dim=2).float()
        lg = torch.einsum("brhd,bkhd->bhrk", q[:, rows][:, :, h0 : h0 + len(hs)].float(), kx) * scale
        lg = lg.masked_fill(keys[None, :] > rows[:, None], float("-inf"))
        m = torch.softmax(lg, dim=-1).mean(dim=2)
        out[:, h0 : h0 + len(hs)] = torch.nn.functional.pad(m, (0, nb * bs - s)).reshape(b, len(hs), nb, bs).sum(-1)
    return out


def check_case(kind, b, s, hq, hkv, d, bs, st, g, gamma, seed, dtype=torch.bfloat16, rule=0):
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, gamma=gamma, budget_rule=rule)
    scale = 1.0 / math.sqrt(d)
    q, k = inputs(kind, b, s, hq, hkv, d, seed, dtype)
    nb = -(-s // bs)
    out = torch.full((b, g, nb, nb), float("nan"), device=DEV)
    scores = es.proxy_scores(q, k, cfg, scale, out=out)
    ref_scores = ref_scores_fn(q, k, g, bs, st, scale)
    if s <= 4096:
        exact = reference.proxy_scores(q, k, proxy_heads=g, block_size=bs, stride=st, scale=scale)
        r0, _ = rel_err(ref_scores, exact)
        assert r0 < 1e-6, f"script's chunked reference differs from reference.proxy_scores: {r0:.1e}"
    rel, mx = rel_err(scores, ref_scores)
    assert rel <= 5e-4 and mx <= 5e-3, f"scores rel {rel:.2e} max abs {mx:.2e} beyond the tf32 tolerance"
    mass_out = torch.full((b, hq, nb), float("nan"), device=DEV)
    mass = eb._launch_mass(q, k, None, b, s, bs, scale, mass=mass_out)
    rmass = ref_mass(q, k, bs, scale)
    mrel, mmx = rel_err(mass, rmass)
    assert mrel <= 1e-4 and mmx <= 1e-4, f"mass rel {mrel:.2e} max abs {mmx:.2e}"
    budgets = proxyattn.head_budgets(q, k, cfg, scale=scale, scores=scores)
    order = None
    if rule == 1:  # the mass along the last row's ranking of the GPU's own scores
        order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True).repeat_interleave(hq // g, dim=1)
        assert (budgets >= proxyattn.head_budgets(q, k, cfg.replace(budget_rule=0), scale=scale)).all()
    if rule == 2:  # every row's mass of the last block, and the longest prefix any row needs
        order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True).repeat_interleave(hq // g, dim=1)
        rows = eb._launch_mass(q, k, None, b, s, bs, scale, rows=True)
        rep = hq // hkv  # one KV head (and its query heads) at a time bounds the reference's memory
        rrows = torch.cat(
            [
                reference.last_block_row_mass(q[:, :, j * rep : (j + 1) * rep], k[:, :, j : j + 1], block_size=bs, scale=scale)
                for j in range(hkv)
            ],
            dim=1,
        )
        rrel, rmx = rel_err(rows[:, :, : rrows.shape[2]], rrows)
        assert rrel <= 1e-4 and rmx <= 1e-4, f"row mass rel {rrel:.2e} max abs {rmx:.2e}"
        bad_b = row_budget_mismatches(budgets, rrows, gamma, order)
        assert (budgets >= proxyattn.head_budgets(q, k, cfg.replace(budget_rule=1), scale=scale, scores=scores)).all()
    else:
        bad_b = budget_mismatches(budgets, rmass, gamma, order=order)
    assert bad_b == 0, f"{bad_b} budgets differ beyond ties"
    plan = proxyattn.plan_blocks(q, k, cfg, scale=scale)
    assert plan.budget_blocks.equal(budgets)
    # Selection is exact: the GPU plan equals the compact_plan of the GPU's own scores, with the dense fallback.
    own = dense_fallback(compact_plan(scores, budgets, s, cfg), hkv, cfg)
    assert plan.order.equal(own.order) and plan.counts.equal(own.counts), "GPU selection differs from compact_plan on its own scores"
    ref_plan = dense_fallback(compact_plan(ref_scores, budgets, s, cfg), hkv, cfg)
    # Against the fp32 reference plan: rows may differ only where the measured score error explains the swap.
    bad_p = plan_mismatches(plan, ref_plan, ref_scores, cfg.min_budget_blocks, scores=scores)
    assert bad_p == 0, f"{bad_p} plan rows differ beyond ties"
    same = int((plan.to_mask() == ref_plan.to_mask()).all(dim=-1).sum())
    rows_total = plan.counts.numel()
    return {
        "scores_rel": f"{rel:.1e}",
        "scores_maxabs": f"{mx:.1e}",
        "mass_rel": f"{mrel:.1e}",
        "budgets_ref": reference_budgets_summary(budgets),
        "rows_identical": f"{same}/{rows_total}",
        "density": round(float(plan.density().mean()), 4),
    }


def reference_budgets_summary(budgets):
    return f"min {int(budgets.min())} max {int(budgets.max())}"


def packed_inputs(lengths, hq, hkv, d):
    """Structured bf16 q `[T, Hq, D]`, k `[T, Hkv, D]` of packed sequences (seeds 100 + i) and their cu_seqlens."""
    qs, ks = [], []
    for i, n in enumerate(lengths):
        q, k, _ = structured_qkv(1, max(n, 1), hq, hkv, d, dtype=torch.bfloat16, device=DEV, seed=100 + i)
        qs.append(q[0, :n])
        ks.append(k[0, :n])
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=DEV)
    return torch.cat(qs), torch.cat(ks), cu


def check_varlen(small=False, rule=0):
    lengths = [300, 70, 520, 0, 128] if small else [4096 + 33, 1000, 9000, 0, 2048]
    hq, hkv, d, bs = (4, 2, 64, 64) if small else (32, 8, 128, 128)
    cfg = ProxyAttnConfig(gamma=0.9, block_size=bs, min_budget_tokens=128 if small else 2048, budget_rule=rule)
    scale = 1.0 / math.sqrt(d)
    q, k, cu = packed_inputs(lengths, hq, hkv, d)
    max_len = max(lengths)
    nb = -(-max_len // bs)
    out = torch.full((len(lengths), 1, nb, nb), float("nan"), device=DEV)
    scores = es.proxy_scores_varlen(q, k, cu, max_len, cfg, scale, out=out)
    assert not torch.isnan(scores).any(), "NaN in varlen scores"
    if DEV == "cuda":
        plan = proxyattn.api.plan_blocks_varlen(q, k, cu, max_len, cfg, scale=scale)
    else:
        plan = esel.plan_blocks_varlen(q, k, cu, max_len, cfg, scale)
    worst = 0.0
    bad = 0
    for i, n in enumerate(lengths):
        nbi = -(-n // bs)
        assert torch.isneginf(scores[i, :, nbi:]).all(), f"seq {i}: rows past the end must be -inf"
        if n == 0:
            assert plan.counts[i].eq(0).all()
            continue
        lo = int(sum(lengths[:i]))
        qi, ki = q[None, lo : lo + n], k[None, lo : lo + n]
        rs = ref_scores_fn(qi, ki, 1, bs, cfg.stride, scale)
        rel, _ = rel_err(scores[i : i + 1, :, :nbi, :nbi], rs)
        worst = max(worst, rel)
        assert rel <= 5e-4, f"seq {i}: scores rel {rel:.2e}"
        if n <= cfg.dense_below_tokens:
            assert plan.counts[i, :, :nbi].equal(torch.arange(1, nbi + 1, dtype=torch.int32, device=DEV).expand(hq, nbi))
            continue
        order = None
        if rule == 1:
            order = reference.last_row_order(scores[i : i + 1, :, :nbi, :nbi], keep_sink=True, keep_diagonal=True)
            order = order.repeat_interleave(hq, dim=1)
        rb = budget_mismatches(plan.budget_blocks[i : i + 1], ref_mass(qi, ki, bs, scale), cfg.gamma, order=order)
        assert rb == 0, f"seq {i}: {rb} budgets differ beyond ties"
        sub = proxyattn.plan.BlockPlan(
            plan.order[i : i + 1, :, :nbi, :nbi].contiguous(),
            plan.counts[i : i + 1, :, :nbi].contiguous(),
            plan.budget_blocks[i : i + 1].contiguous(),
            bs,
            n,
        )
        ref_plan = compact_plan(rs, plan.budget_blocks[i : i + 1], n, cfg)
        bad += plan_mismatches(sub, ref_plan, rs, cfg.min_budget_blocks)
        assert plan.counts[i, :, nbi:].eq(0).all()
    assert bad == 0, f"{bad} varlen plan rows differ beyond ties"
    return {"lengths": lengths, "worst_scores_rel": f"{worst:.1e}"}


def check_graph(cfg=None, timed=True):
    """`plan_blocks` under `cfg` (default: the default config) captured in a CUDA graph at 32K: the replay equals
    eager (and its time)."""
    cfg = cfg or ProxyAttnConfig(gamma=0.95)
    s, hq, hkv, d = 32768, 32, 8, 128
    q, k = inputs("structured", 1, s, hq, hkv, d, seed=7)
    eager = proxyattn.plan_blocks(q, k, cfg)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            proxyattn.plan_blocks(q, k, cfg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = proxyattn.plan_blocks(q, k, cfg)
    graph.replay()
    torch.cuda.synchronize()
    assert captured.counts.equal(eager.counts) and captured.order.equal(eager.order), "graph replay differs from eager"
    assert captured.budget_blocks.equal(eager.budget_blocks)
    if not timed:
        return {"ok": True}
    ms_graph = do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    TIMINGS.append({"stage": "plan_blocks (CUDA graph replay)", "seq_len": s, "ms": round(ms_graph, 4)})
    return {"graph_replay_ms": round(ms_graph, 3)}


def check_head_max(s, hq, hkv, d, st, g, seed):
    """The head_max kernel against `proxyattn.variants.head_max_scores` (fp32 PyTorch on the GPU)."""
    from proxyattn import variants

    cfg = ProxyAttnConfig(stride=st, proxy_heads=g, estimator=1)
    scale = 1.0 / math.sqrt(d)
    q, k = inputs("structured", 1, s, hq, hkv, d, seed)
    got = proxyattn.proxy_scores(q, k, cfg)
    ref = variants.head_max_scores(q, k, proxy_heads=g, block_size=cfg.block_size, stride=st, scale=scale)
    assert not torch.isnan(got).any(), "NaN in head_max scores"
    assert torch.isinf(got).equal(torch.isinf(ref)), "-inf pattern differs"
    rel, mx = rel_err(got, ref)
    assert rel <= 5e-4 and mx <= 5e-3, f"head_max scores rel {rel:.2e} max abs {mx:.2e}"
    return {"scores_rel": f"{rel:.1e}", "scores_maxabs": f"{mx:.1e}"}


def recall_timings():
    """plan_blocks with budget_rule 0 and 1 (same inputs), Llama-3-8B shapes, 32K and 128K."""
    hq, hkv, d = 32, 8, 128
    for s in (16384, 32768, 131072):
        sets = [inputs("structured", 1, s, hq, hkv, d, seed=300 + i) for i in range(2)]
        for label, cfg in [
            ("budget_rule=0", ProxyAttnConfig(budget_rule=0)),
            ("budget_rule=1", ProxyAttnConfig(budget_rule=1)),
            ("budget_rule=2", ProxyAttnConfig(budget_rule=2)),
            ("head_max stride 4", ProxyAttnConfig(estimator=1)),
            ("head_max+row_recall stride 4", ProxyAttnConfig(estimator=1, budget_rule=2)),
            ("head_max stride 16", ProxyAttnConfig(estimator=1, stride=16)),
            ("head_max stride 32", ProxyAttnConfig(estimator=1, stride=32)),
        ]:
            ms = bench(lambda q, k: proxyattn.plan_blocks(q, k, cfg), sets)
            dens = float(proxyattn.plan_blocks(*sets[0], cfg).density().mean())
            TIMINGS.append({"stage": f"plan_blocks (total) {label}", "seq_len": s, "ms": round(ms, 4), "density": round(dens, 4)})
            print(f"  plan_blocks {label} S={s}: {ms:.3f} ms, density {dens:.3f}", flush=True)
        del sets
        torch.cuda.empty_cache()


def check_needs_case(kind, b, s, hq, hkv, d, bs, st, g, gamma, seed, rows=4):
    """Budget rule 3: the needs kernel against the fp32 reference (every query block up to 256 blocks, else 48
    sampled ones plus the first and last), the plan against compact_plan_needs of the GPU's own scores and needs;
    with the dense fallback, the plan against the reference's early and late decisions on those needs."""
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, gamma=gamma, budget_rule=3, recall_rows=rows, dense_density=None)
    scale = 1.0 / math.sqrt(d)
    q, k = inputs(kind, b, s, hq, hkv, d, seed)
    nb = -(-s // bs)
    scores = es.proxy_scores(q, k, cfg, scale)
    needs = esel.block_needs(q, k, scores, cfg, scale)
    m1 = torch.arange(1, nb + 1, device=DEV)
    assert needs.dtype == torch.int32 and (needs >= 1).all() and (needs <= m1).all(), "needs outside 1..m+1"
    gen = torch.Generator().manual_seed(seed)
    blocks = None if nb <= 256 else sorted({0, nb - 1} | set(torch.randperm(nb, generator=gen)[:48].tolist()))
    bad = need_mismatches(needs, q, k, scores, cfg, scale, blocks=blocks)
    assert bad == 0, f"{bad} needs differ beyond rounding"
    plan = proxyattn.plan_blocks(q, k, cfg, scale=scale)
    own = compact_plan_needs(scores, needs, plan.budget_blocks, s, cfg)
    assert plan.order.equal(own.order) and plan.counts.equal(own.counts), "GPU plan differs from compact_plan_needs"
    assert proxyattn.head_budgets(q, k, cfg, scale=scale, scores=scores).equal(plan.budget_blocks)
    dens2 = float(proxyattn.plan_blocks(q, k, cfg.replace(budget_rule=2), scale=scale).density().mean())
    # The dense fallback (default dense_density): early decision on the last block's needs, late one on the counts.
    fb = cfg.replace(dense_density=ProxyAttnConfig().dense_density)
    nb_seq = torch.full((b,), nb, device=DEV, dtype=torch.int64)
    first = eb.head_budgets(q, k, fb.replace(budget_rule=0), scale)  # the early decision: paper's last-block budgets
    early = reference.early_dense_groups(first, hkv, fb.dense_density_permille, nb_seq)
    assert early.equal(proxyattn.early_dense_groups(q, k, fb, scale=scale)), "early decision differs from the API's"
    heads = early.repeat_interleave(hq // hkv, dim=1)[..., None]
    skipped_needs = torch.where(heads, m1.to(torch.int32), needs)
    want = dense_fallback(
        compact_plan_needs(scores, skipped_needs, reference.needs_budgets(skipped_needs, fb.min_budget_blocks), s, fb), hkv, fb, early=early
    )
    got = proxyattn.plan_blocks(q, k, fb, scale=scale)
    assert got.dense_heads.equal(want.dense_heads), "dense groups differ from the reference decisions"
    live = ~want.dense_heads[..., None].expand_as(want.counts)
    assert got.counts[~live].equal(want.counts[~live]), "dense heads must keep every causal block"
    assert got.counts[live].equal(want.counts[live]), "the fallback plan's sparse heads differ"
    return {
        "blocks_checked": nb if blocks is None else len(blocks),
        "needs_mean": round(float(needs.float().mean()), 2),
        "density": round(float(plan.density().mean()), 4),
        "density_row_recall": round(dens2, 4),
        "dense_groups_early": int(early.sum()),
        "dense_groups": int(want.dense_heads.sum()) // (hq // hkv),
        "density_with_fallback": round(float(got.density().mean()), 4),
    }


def check_needs_columns_case(kind, b, s, hq, hkv, d, bs, st, g, gamma, seed, fraction=0.02):
    """Budget rule 3 with vertical columns: the ranking from scores without the column keys (as the API's), the needs
    kernel against the fp32 reference with the columns' mass held (sampled query blocks past 256), never more than
    without columns on the same ranking, and plan_blocks' plan equal to compact_plan_needs of those needs, with the
    API's columns attached."""
    cfg = ProxyAttnConfig(
        block_size=bs, stride=st, proxy_heads=g, gamma=gamma, dense_density=None, dense_below_tokens=0, column_fraction=fraction
    )
    scale = 1.0 / math.sqrt(d)
    q, k = inputs(kind, b, s, hq, hkv, d, seed)
    nb = -(-s // bs)
    cols = proxyattn.proxy_columns(q, k, cfg, scale=scale)
    exclude = reference.column_rows(cols, cols.shape[1], s)
    scores = es.proxy_scores(q, k, cfg, scale, exclude=exclude)  # rule 3 ranks without the column keys
    assert torch.equal(scores, proxyattn.proxy_scores(q, k, cfg, scale=scale)), "the API's scores keep the column keys"
    needs = esel.block_needs(q, k, scores, cfg, scale, columns=cols)
    plain = esel.block_needs(q, k, scores, cfg, scale)
    assert (needs <= plain).all(), "columns raised a need"
    gen = torch.Generator().manual_seed(seed)
    blocks = None if nb <= 256 else sorted({0, nb - 1} | set(torch.randperm(nb, generator=gen)[:48].tolist()))
    bad = need_mismatches(needs, q, k, scores, cfg, scale, blocks=blocks, columns=cols)
    assert bad == 0, f"{bad} needs with columns differ beyond rounding"
    plan = proxyattn.plan_blocks(q, k, cfg, scale=scale)
    assert plan.columns is not None and plan.columns.equal(cols), "plan_blocks' columns differ from proxy_columns"
    own = compact_plan_needs(scores, needs, plan.budget_blocks, s, cfg)
    assert plan.order.equal(own.order) and plan.counts.equal(own.counts), "GPU plan differs from compact_plan_needs"
    return {
        "blocks_checked": nb if blocks is None else len(blocks),
        "needs_mean": round(float(needs.float().mean()), 2),
        "needs_mean_without_columns": round(float(plain.float().mean()), 2),
        "density": round(float(plan.density().mean()), 4),
        "column_density": round(float(plan.column_density().mean()), 4),
    }


def check_rank_kernel():
    """The ranking kernel against the torch ranking: random scores with ties, Nb from 1 to 4096, sink/diagonal on
    and off."""
    from proxyattn.kernels import estimate_rank as er

    out = {}
    sizes = [
        (1, 1, True, True),
        (7, 2, True, False),
        (33, 1, False, True),
        (256, 4, True, True),
        (1024, 1, True, True),
        (4096, 1, True, True),
    ]
    for nb, r, sink, diag in sizes[:4] if DEV == "cpu" else sizes:
        gen = torch.Generator().manual_seed(nb)
        sc = torch.randint(0, 5, (2, r, nb, nb), generator=gen).float().to(DEV) / 4  # many ties
        order, rank, sr, dr = er._launch_rank(sc, sink, diag)
        o2, sr2, dr2 = esel.torch_rank_order(sc, sink, diag)
        assert order.equal(o2) and sr.equal(sr2.to(torch.int32)) and dr.equal(dr2.to(torch.int32)), f"Nb={nb}"
        inv = torch.empty_like(o2).scatter_(-1, o2.long(), torch.arange(nb, device=DEV, dtype=torch.int32).expand_as(o2))
        assert rank.equal(inv), f"rank is not the inverse of order at Nb={nb}"
        out[nb] = "equal"
    return out


def check_fallback_attention():
    """Mixed execution: a plan with some dense KV groups runs them through cuDNN (eager) and the rest through the
    block-sparse kernel; equal (bf16 tolerance) to the same plan run whole in the block-sparse kernel (what a CUDA
    graph replays) and, on the dense heads, to dense attention."""
    s, hq, hkv, d = 16384, 32, 8, 128
    q, k = inputs("structured", 1, s, hq, hkv, d, seed=77)
    v = torch.randn_like(k)
    cfg = ProxyAttnConfig(budget_fraction=0.1, dense_density=None)
    plan = proxyattn.plan_blocks(q, k, cfg)
    groups = torch.tensor([[True, False, True, False, False, False, False, True]], device=DEV)
    counts, heads = reference.apply_dense_groups(plan.counts, groups)
    mixed = proxyattn.plan.BlockPlan(plan.order, counts, plan.budget_blocks, plan.block_size, s, heads)
    eager = proxyattn.block_sparse_attention(q, k, v, mixed)
    whole = proxyattn.block_sparse_attention(q, k, v, proxyattn.plan.BlockPlan(plan.order, counts, plan.budget_blocks, plan.block_size, s))
    dense = proxyattn.dense_attention(q, k, v)
    e1, _ = rel_err(eager.float(), whole.float())
    hsel = heads[0].nonzero().flatten()
    e2, _ = rel_err(eager[:, :, hsel].float(), dense[:, :, hsel].float())
    assert e1 < 2e-2 and e2 < 1e-6, (e1, e2)
    return {"rel_err_vs_sparse_kernel": e1, "rel_err_dense_heads_vs_dense": e2}


def check_needs_varlen():
    """Rule 3 on a packed batch: every sequence's rows equal plan_blocks of that sequence alone."""
    lengths = [4096 + 33, 1000, 9000, 0, 20000]
    hq, hkv, d, bs = 32, 8, 128, 128
    cfg = ProxyAttnConfig(gamma=0.9, budget_rule=3, dense_below_tokens=2048)
    scale = 1.0 / math.sqrt(d)
    q, k, cu = packed_inputs(lengths, hq, hkv, d)
    plan = proxyattn.api.plan_blocks_varlen(q, k, cu, max(lengths), cfg, scale=scale)
    for i, n in enumerate(lengths):
        nbi = -(-n // bs)
        assert plan.counts[i, :, nbi:].eq(0).all(), f"seq {i}: counts past the end"
        if n <= cfg.dense_below_tokens:
            continue
        lo = int(sum(lengths[:i]))
        alone = proxyattn.plan_blocks(q[None, lo : lo + n], k[None, lo : lo + n], cfg, scale=scale)
        assert plan.counts[i, :, :nbi].equal(alone.counts[0]), f"seq {i}: counts differ from the sequence alone"
        assert plan.budget_blocks[i].equal(alone.budget_blocks[0]), f"seq {i}: budgets differ"
        got = proxyattn.plan.BlockPlan(
            plan.order[i : i + 1, :, :nbi, :nbi].contiguous(),
            plan.counts[i : i + 1, :, :nbi].contiguous(),
            plan.budget_blocks[i : i + 1].contiguous(),
            bs,
            n,
        )
        assert got.to_mask().equal(alone.to_mask()), f"seq {i}: kept blocks differ from the sequence alone"
    return {"lengths": lengths}


def needs_timings():
    """plan_blocks with rule 2 and rule 3 (4 / 8 rows), and the needs kernel alone, Llama-3-8B shapes."""
    hq, hkv, d = 32, 8, 128
    scale = 1.0 / math.sqrt(d)
    for s in (16384, 32768, 131072):
        sets = [inputs("structured", 1, s, hq, hkv, d, seed=300 + i) for i in range(2)]
        for label, cfg in [
            ("budget_rule=2", ProxyAttnConfig(budget_rule=2, dense_density=None)),
            ("budget_rule=3 rows 4, no fallback", ProxyAttnConfig(budget_rule=3, dense_density=None)),
            ("budget_rule=3 rows 2, no fallback", ProxyAttnConfig(budget_rule=3, recall_rows=2, dense_density=None)),
            ("default (rule 3, fallback)", ProxyAttnConfig()),
        ]:
            ms = bench(lambda q, k: proxyattn.plan_blocks(q, k, cfg), sets)
            dens = float(proxyattn.plan_blocks(*sets[0], cfg).density().mean())
            TIMINGS.append({"stage": f"plan_blocks (total) {label}", "seq_len": s, "ms": round(ms, 4), "density": round(dens, 4)})
            print(f"  plan_blocks {label} S={s}: {ms:.3f} ms, density {dens:.3f}", flush=True)
        cfg = ProxyAttnConfig(budget_rule=3, dense_density=None)
        ranked = [(q, k, esel.rank_order(es.proxy_scores(q, k, cfg, scale), cfg)) for q, k in sets]
        from proxyattn.kernels import estimate_needs as en
        from proxyattn.kernels import estimate_rank as er

        scs = [(es.proxy_scores(q, k, cfg, scale),) for q, k in sets]
        default = ProxyAttnConfig()
        for stage, fn, args_ in [
            ("early dense decision (kernels)", lambda q, k: eb.early_dense_groups(q, k, default, scale), sets),
            ("early dense decision + host read", lambda q, k: bool(proxyattn.early_dense_groups(q, k).cpu().all()), sets),
            ("scores", lambda q, k: es.proxy_scores(q, k, cfg, scale), sets),
            ("rank kernel", lambda sc: er._launch_rank(sc, True, True), scs),
            ("rank torch", lambda sc: esel.torch_rank_order(sc, True, True), scs),
        ]:
            ms = bench(fn, args_)
            TIMINGS.append({"stage": stage, "seq_len": s, "ms": round(ms, 4)})
            print(f"  {stage} S={s}: {ms:.3f} ms", flush=True)
        sweep = [(8, 4, 2)] if s < 131072 else [(4, 4, 2), (8, 4, 2), (8, 4, 3), (8, 8, 2), (4, 8, 3), (16, 4, 2), (16, 8, 3)]
        for qbv, nw, ns in sweep:
            try:
                ms = bench(
                    lambda q, k, r: en._launch_needs(
                        q, k, None, r[0], 1, s, cfg, scale, last_only=False, ranks=r[1:], counts=True, qb=qbv, num_warps=nw, num_stages=ns
                    ),
                    ranked,
                )
                TIMINGS.append({"stage": f"needs+counts kernels rows 4 qb={qbv} warps={nw} stages={ns}", "seq_len": s, "ms": round(ms, 4)})
                print(f"  needs+counts qb={qbv} warps={nw} stages={ns} S={s}: {ms:.3f} ms", flush=True)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                TIMINGS.append({"stage": f"needs+counts qb={qbv} warps={nw} stages={ns}", "seq_len": s, "error": str(e)[:200]})
        # CUDA graph replay of the default plan (no host launch overhead)
        q, k = sets[0]
        g = torch.cuda.CUDAGraph()
        st_ = torch.cuda.Stream()
        st_.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st_):
            proxyattn.plan_blocks(q, k, ProxyAttnConfig())
        torch.cuda.current_stream().wait_stream(st_)
        with torch.cuda.graph(g):
            proxyattn.plan_blocks(q, k, ProxyAttnConfig())
        ms = do_bench(g.replay, warmup=10, rep=50, return_mode="median")
        TIMINGS.append({"stage": "plan_blocks default, CUDA graph replay", "seq_len": s, "ms": round(ms, 4)})
        print(f"  plan_blocks default graph S={s}: {ms:.3f} ms", flush=True)
        del sets, ranked, scs
        torch.cuda.empty_cache()


def bench(fn, sets):
    it = itertools.cycle(sets)
    return do_bench(lambda: fn(*next(it)), warmup=25, rep=100, return_mode="median")


def timings():
    hq, hkv, d = 32, 8, 128
    cfg = ProxyAttnConfig()  # block 128, stride 4, 1 proxy head, gamma 0.95
    scale = 1.0 / math.sqrt(d)
    for s in (32768, 65536, 131072):
        nsets = 3 if s < 131072 else 2
        sets = [inputs("structured", 1, s, hq, hkv, d, seed=200 + i) for i in range(nsets)]
        sc_sets = [(es.proxy_scores(q, k, cfg, scale),) for q, k in sets]
        bu_sets = [(proxyattn.head_budgets(q, k, cfg, scale=scale),) for q, k in sets]
        rows = {
            "scores": bench(lambda q, k: es.proxy_scores(q, k, cfg, scale), sets),
            "budgets": bench(lambda q, k: proxyattn.head_budgets(q, k, cfg, scale=scale), sets),
            "selection": bench(lambda sc, bu: esel.select_blocks(sc, bu, s, cfg), [(a[0], b_[0]) for a, b_ in zip(sc_sets, bu_sets)]),
            "plan_blocks (total)": bench(lambda q, k: proxyattn.plan_blocks(q, k, cfg), sets),
        }
        for stage, ms in rows.items():
            TIMINGS.append({"stage": stage, "seq_len": s, "ms": round(ms, 4)})
            print(f"  time {stage:22s} S={s:6d}: {ms:.3f} ms", flush=True)
        if s == 131072:
            q, k = sets[0]
            # Scores kernel sweep: (query blocks per program, warps, stages).
            for qb, nw, ns in [(2, 4, 2), (2, 4, 3), (2, 8, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3)]:
                try:
                    ms = bench(lambda q, k: es._launch_scores(q, k, None, 1, s, cfg, scale, qb=qb, num_warps=nw, num_stages=ns), sets)
                    TIMINGS.append({"stage": f"scores sweep qb={qb} warps={nw} stages={ns}", "seq_len": s, "ms": round(ms, 4)})
                    print(f"  sweep qb={qb} warps={nw} stages={ns}: {ms:.3f} ms", flush=True)
                except Exception as e:  # noqa: BLE001 - a config that does not compile is reported, not fatal
                    TIMINGS.append({"stage": f"scores sweep qb={qb} warps={nw} stages={ns}", "seq_len": s, "error": str(e)[:200]})
            for cbv in (16, 32, 64):
                ms = bench(lambda q, k: eb._launch_mass(q, k, None, 1, s, cfg.block_size, scale, cb=cbv), sets)
                TIMINGS.append({"stage": f"budget mass sweep cb={cbv}", "seq_len": s, "ms": round(ms, 4)})
                print(f"  mass cb={cbv}: {ms:.3f} ms", flush=True)
            # Peak extra memory of plan_blocks over q, k, v bytes.
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            plan = proxyattn.plan_blocks(q, k, cfg)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            qkv_bytes = q.numel() * q.element_size() + 2 * k.numel() * k.element_size()
            plan_bytes = sum(t.numel() * t.element_size() for t in (plan.order, plan.counts, plan.budget_blocks))
            TIMINGS.append(
                {
                    "stage": "memory plan_blocks",
                    "seq_len": s,
                    "peak_extra_bytes": peak,
                    "plan_bytes": plan_bytes,
                    "qkv_bytes": qkv_bytes,
                    "peak_over_qkv": round(peak / qkv_bytes, 4),
                }
            )
            print(
                f"  memory: peak extra {peak / 2**20:.1f} MiB, plan {plan_bytes / 2**20:.1f} MiB, "
                f"{100 * peak / qkv_bytes:.2f}% of q,k,v ({qkv_bytes / 2**30:.2f} GiB)",
                flush=True,
            )
        del sets, sc_sets, bu_sets
        torch.cuda.empty_cache()


# Correctness, 4K-128K: (kind, B, S, Hq, Hkv, D, block, stride, proxy heads, gamma, seed)
CASES = [
    ("random", 1, 4096, 32, 8, 128, 128, 4, 1, 0.95, 1),
    ("structured", 1, 4096, 32, 8, 128, 128, 4, 1, 0.9, 2),
    ("structured", 2, 8192 + 77, 16, 2, 64, 64, 4, 2, 0.95, 3),
    ("random", 1, 8192, 8, 1, 256, 128, 1, 1, 0.9, 4),
    ("structured", 1, 16384, 32, 8, 128, 128, 4, 4, 0.95, 5),
    ("structured", 1, 32768, 32, 8, 128, 128, 4, 1, 0.95, 6),
    ("random", 1, 32768 - 5, 32, 8, 128, 128, 4, 1, 0.9, 7),
    ("structured", 1, 131072, 32, 8, 128, 128, 4, 1, 0.9, 8),
    ("structured", 1, 131072, 32, 8, 128, 128, 4, 1, 0.95, 8),
]
SMOKE_CASES = [("random", 1, 300, 4, 1, 64, 64, 4, 1, 0.95, 1), ("structured", 2, 333, 4, 2, 64, 64, 4, 2, 0.9, 2)]
FP16_CASE = ("structured", 1, 8192, 32, 8, 128, 128, 4, 1, 0.95, 9)
# --recall: budget rule 1 on these, rule 2 on the first two and the last; the head_max kernel (S, Hq, Hkv, D, stride,
# proxy heads, seed).
RECALL_CASES = [c for c in CASES if c[2] in (4096, 8192 + 77, 32768, 131072)]
ROW_RECALL_CASES = list(dict.fromkeys(RECALL_CASES[:2] + RECALL_CASES[-1:]))
HEAD_MAX_CASES = [
    (8192, 32, 8, 128, 4, 1, 11),
    (8192 + 77, 16, 2, 64, 16, 2, 12),
    (32768, 32, 8, 128, 16, 1, 13),
    (16384, 4, 1, 256, 4, 1, 14),
]
# --needs: budget rule 3 on these, and with 8 rows on one more.
NEEDS_CASES = [c for c in CASES if c[2] in (4096, 8192 + 77, 8192, 32768 - 5, 131072)]
NEEDS_ROWS8_CASE = ("structured", 1, 16384, 32, 8, 128, 128, 4, 1, 0.95, 5)
NEEDS_COLUMNS_CASES = [("structured", 1, 16384, 32, 8, 128, 128, 4, 1, 0.83, 7), ("random", 2, 8192 + 77, 8, 2, 64, 64, 4, 2, 0.9, 3)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--recall", action="store_true", help="only the budget_rule=1 checks and timings")
    ap.add_argument("--needs", action="store_true", help="only the budget_rule=3 checks and timings")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1 (script check)")
    args = ap.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
    t_start = time.time()
    cases = SMOKE_CASES if args.smoke else CASES
    if args.needs:
        needs_cases = cases if args.smoke else NEEDS_CASES
        for c in needs_cases:
            record("block_recall case " + "-".join(map(str, c)), lambda c=c: check_needs_case(*c))
        r8 = ("structured", 1, 400, 4, 1, 64, 64, 4, 1, 0.95, 5) if args.smoke else NEEDS_ROWS8_CASE
        record("block_recall case rows 8 " + "-".join(map(str, r8)), lambda: check_needs_case(*r8, rows=8))
        for c in [("structured", 1, 400, 4, 1, 64, 64, 4, 1, 0.83, 5)] if args.smoke else NEEDS_COLUMNS_CASES:
            record("block_recall with columns " + "-".join(map(str, c)), lambda c=c: check_needs_columns_case(*c))
        record("rank kernel vs torch ranking", check_rank_kernel)
        if not args.smoke:
            record("dense fallback: mixed execution", check_fallback_attention)
        if not args.smoke:
            record("block_recall varlen packed batch", check_needs_varlen)
            record("block_recall CUDA graph capture (32K)", lambda: check_graph(ProxyAttnConfig(gamma=0.95, budget_rule=3), timed=False))
            if not args.skip_timing:
                record("block_recall timings", needs_timings)
        cases = []
    if args.recall:
        if not args.smoke:
            cases = RECALL_CASES
        for c in cases:
            record("recall case " + "-".join(map(str, c)), lambda c=c: check_case(*c, rule=1))
        for c in dict.fromkeys(cases[:2] + cases[-1:]):
            record("row_recall case " + "-".join(map(str, c)), lambda c=c: check_case(*c, rule=2))
        record("recall varlen packed batch", lambda: check_varlen(small=args.smoke, rule=1))
        if not args.smoke:
            for hm in HEAD_MAX_CASES:
                record("head_max kernel " + "-".join(map(str, hm)), lambda hm=hm: check_head_max(*hm))
        if not args.smoke and not args.skip_timing:
            record("recall timings", recall_timings)
        cases = []
    for c in cases:
        record("case " + "-".join(map(str, c)), lambda c=c: check_case(*c))
    if args.smoke:
        if not args.recall and not args.needs:
            record("varlen packed batch (small)", lambda: check_varlen(small=True))
        print(RESULTS)
        sys.exit(0 if all(r["ok"] for r in RESULTS) else 1)
    if not args.recall and not args.needs:
        record("case fp16 structured-1-8192-32-8-128-128-4-1-0.95", lambda: check_case(*FP16_CASE, torch.float16))
        record("varlen packed batch", check_varlen)
        record("CUDA graph capture of plan_blocks (32K)", check_graph)
        if not args.skip_timing:
            record("timings 32K-128K", timings)
    props = torch.cuda.get_device_properties(0)
    report = {
        "what": "ProxyAttn estimation kernels: correctness vs fp32 reference and stage timings",
        "gpu": torch.cuda.get_device_name(0),
        "sms": props.multi_processor_count,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "command": "python3 -m tests.gpu.check_estimation --out $OUT --commit <sha>",
        "versions": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "shapes_timing": "B=1, Hq=32, Hkv=8, D=128, bf16, block 128, stride 4, proxy_heads 1, gamma 0.95, structured inputs",
        "timing_method": "triton.testing.do_bench median (warmup 25 ms, rep 100 ms), inputs rotated over 2-3 sets",
        "checks": RESULTS,
        "timings": TIMINGS,
        "wall_s": round(time.time() - t_start, 1),
    }
    date = datetime.date.today().isoformat()
    path = os.path.join(args.out, f"estimation{'_recall' if args.recall else '_needs' if args.needs else ''}_{date}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)
    print("\n=== summary ===")
    for r in RESULTS:
        print(("PASS " if r["ok"] else "FAIL ") + r["check"])
    for t in TIMINGS:
        if "ms" in t:
            print(f"{t['stage']:40s} S={t['seq_len']:6d} {t['ms']:.3f} ms")
    print(f"wrote {path}")
    sys.exit(0 if all(r["ok"] for r in RESULTS) else 1)


if __name__ == "__main__":
    main()
