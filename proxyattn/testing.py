"""Synthetic inputs that look like long-context attention, for tests and benchmarks.

Random q/k give nearly uniform attention, on which every sparse method looks bad and every plan looks alike.
`structured_qkv` builds inputs with the structure real prefill attention has:

* sinks: the first `num_sinks` tokens carry a key direction every query points at (attention sinks);
* locality: token content is a smooth random walk over positions (neighbouring tokens share content) and
  RoPE (theta 500000, as Llama 3) is applied to q and k, so nearby keys score higher;
* heavy hitters: about 1% of the tokens carry a second shared key direction; every head points at it, with a
  per-head pull (from weak to strong), so heads agree on which tokens matter but differ in how concentrated
  their attention is, and hence in their budgets.

The sink and heavy-hitter directions live in the lowest RoPE frequencies, which rotate by well under a radian
over 128K tokens, so their pull does not fade with distance.
"""

from __future__ import annotations

import math

import torch

__all__ = ["structured_qkv", "rope", "random_weights_"]

ROPE_THETA = 500000.0


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x `[B, S, H, D]` float at `positions` `[S]`."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)  # [D/2]
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [S, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], dim=-1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], dim=-1)[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos + rot * sin


def _smooth_walk(batch: int, seq_len: int, dim: int, period: int, gen: torch.Generator, device) -> torch.Tensor:
    """[B, S, dim] unit-variance content that changes smoothly: random anchors every `period` tokens, linearly
    interpolated, plus a little token noise."""
    n_anchor = seq_len // period + 2
    anchors = torch.randn(batch, n_anchor, dim, generator=gen, device=device)
    pos = torch.arange(seq_len, device=device, dtype=torch.float32) / period
    lo = pos.floor().long()
    w = (pos - lo.float())[None, :, None]
    # Interpolating between independent anchors halves the variance at midpoints; renormalise.
    walk = anchors[:, lo] * (1 - w) + anchors[:, lo + 1] * w
    walk = walk / torch.sqrt((1 - w) ** 2 + w**2)
    noise = torch.randn(batch, seq_len, dim, generator=gen, device=device)
    return 0.9 * walk + math.sqrt(1 - 0.81) * noise


def structured_qkv(
    batch: int,
    seq_len: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device="cpu",
    seed: int = 0,
    num_sinks: int = 4,
    heavy_fraction: float = 0.01,
):
    """Structured (q, k, v): q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]` in `dtype` on `device`.

    Deterministic for a given seed (the random numbers are drawn on the CPU, then moved). Logits q.k/sqrt(D) are
    of order 10 for sinks, 2..11 (by head) for heavy hitters, about 8 for local content.
    """
    if q_heads % kv_heads:
        raise ValueError(f"q_heads={q_heads} must be a multiple of kv_heads={kv_heads}")
    if head_dim < 16 or head_dim % 8:
        raise ValueError(f"head_dim={head_dim} must be a multiple of 8 and >= 16")
    gen = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    dev = torch.device(device)
    d, half = head_dim, head_dim // 2
    b, s = batch, seq_len
    content_dim = 32
    # Random numbers are drawn on the CPU (same values on every device); the arithmetic runs on `device`.
    content = _smooth_walk(b, s, content_dim, 64, gen, cpu).to(dev)  # [B, S, C]
    # Projections: a shared part (so q and k of one position align) plus a per-head part.
    shared = torch.randn(content_dim, d, generator=gen) / math.sqrt(content_dim)
    wq = (shared + 0.5 * torch.randn(q_heads, content_dim, d, generator=gen) / math.sqrt(content_dim)).to(dev)
    wk = (shared + 0.5 * torch.randn(kv_heads, content_dim, d, generator=gen) / math.sqrt(content_dim)).to(dev)
    # Scale so that a query and a key of the same content score about 8 after the 1/sqrt(D) softmax scale.
    f = math.sqrt(8.0 / math.sqrt(d))
    q = torch.einsum("bsc,hcd->bshd", content, wq) * f
    k = torch.einsum("bsc,hcd->bshd", content, wk) * f
    del content
    # Special directions in the lowest RoPE frequency pairs (indices half-1 and d-1; half-2 and d-2).
    sink_dir = torch.zeros(d, device=dev)
    sink_dir[half - 1] = 1.0
    sink_dir[d - 1] = 1.0
    hh_dir = torch.zeros(d, device=dev)
    hh_dir[half - 2] = 1.0
    hh_dir[d - 2] = 1.0
    for t in (q, k):
        t[..., half - 2 : half] = 0.0
        t[..., d - 2 :] = 0.0
    root = math.sqrt(d)
    # Every query points at both directions; the heavy-hitter pull differs per head (weak .. strong).
    pull = torch.linspace(0.15, 1.0, q_heads)[torch.randperm(q_heads, generator=gen)].to(dev)
    q += (root * 2.5) * sink_dir + (root * 2.5) * pull[None, None, :, None] * hh_dir
    sink_strength = 2.0
    k[:, :num_sinks] += sink_strength * sink_dir
    n_heavy = max(1, round(heavy_fraction * s))
    heavy = torch.randperm(s, generator=gen)[:n_heavy].to(dev)
    hh_strength = (2.2 + 0.3 * torch.rand(b, n_heavy, 1, 1, generator=gen)).to(dev)
    k[:, heavy] += hh_strength * hh_dir
    v = torch.randn(b, s, kv_heads, d, generator=gen).to(device=dev, dtype=dtype)
    pos = torch.arange(s, device=dev)
    q = rope(q, pos).to(dtype)
    k = rope(k, pos).to(dtype)
    return q.contiguous(), k.contiguous(), v.contiguous()


# ----------------------------------------------------------------------------------------------- plan comparison
def budget_mismatches(got: torch.Tensor, mass: torch.Tensor, gamma: float, tol: float = 1e-4, order: torch.Tensor | None = None) -> int:
    """Heads whose budget differs from the gamma rule on the reference `mass` `[B, Hq, Nb]` by more than a tie.

    The cumulative mass runs in descending mass order (budget_rule "mass"), or along `order` `[B, Hq, Nb]` (each
    head's ranking of the last query block, budget_rule "recall"). A budget n is accepted when the reference's
    cumulative mass crosses gamma within `tol` of both n and the reference budget (rounding can move a crossing
    that close to gamma by one block or more).
    """
    if order is None:
        cum = mass.double().sort(dim=-1, descending=True).values.cumsum(dim=-1)
    else:
        cum = mass.double().gather(-1, order.to(mass.device).long()).cumsum(dim=-1)
    nb = mass.shape[-1]
    ref = ((cum < gamma).sum(dim=-1) + 1).clamp(max=nb)
    got = got.to(ref.device, torch.int64)
    lo, hi = torch.minimum(got, ref), torch.maximum(got, ref)
    # Every cumulative sum at positions lo-1 .. hi-2 (the ones that decide between lo and hi) must sit within tol of gamma.
    pos = torch.arange(nb, device=cum.device)
    between = (pos >= lo.unsqueeze(-1) - 1) & (pos <= hi.unsqueeze(-1) - 2)
    near = ((cum - gamma).abs() <= tol) | ~between
    bad = (got != ref) & ~near.all(dim=-1)
    return int(bad.sum())


def row_budget_mismatches(got: torch.Tensor, row_mass: torch.Tensor, gamma: float, order: torch.Tensor, tol: float = 1e-4) -> int:
    """Heads whose budget breaks rule "row_recall" on the reference `row_mass` `[B, Hq, rows, Nb]` beyond ties.

    A row needs the shortest prefix of `order` `[B, Hq, Nb]` whose mass reaches gamma; the head's budget is the
    largest need over its rows with any mass. A budget is accepted when it lies between that budget counted at
    gamma - tol and at gamma + tol (rounding moves a crossing that close to gamma).
    """
    mass = row_mass.double()
    cum = mass.gather(-1, order.to(mass.device).long().unsqueeze(2).expand_as(mass)).cumsum(dim=-1)
    nb = mass.shape[-1]
    has_mass = cum[..., -1] > 0

    def budget(g):
        need = torch.where(has_mass, (cum < g).sum(dim=-1) + 1, 0)
        return need.amax(dim=-1).clamp(max=nb)

    got = got.to(cum.device, torch.int64)
    return int(((got < budget(gamma - tol)) | (got > budget(gamma + tol))).sum())


def need_mismatches(
    got: torch.Tensor, q, k, scores: torch.Tensor, cfg, scale: float, tol: float = 1e-4, lengths=None, blocks=None, columns=None
) -> int:
    """(b, h, m) entries of budget rule block_recall's needs `[B, Hq, Nb]` that break the rule beyond rounding.

    Each measured row needs the shortest prefix of its block's ranking (from `scores` `[B, R, Nb, Nb]`) whose
    reference mass (`reference.recall_row_cum_mass`) reaches gamma; the head's need is the largest over its rows.
    A need is accepted when it lies between that need counted at gamma - tol and at gamma + tol. lengths:
    optional token count of each sequence (a padded batch `[B, S, H, D]`); entries past a sequence must be 0.
    blocks: optional query blocks to check (default all). columns: optional vertical columns int `[B, G, C]`
    (their mass counts as held, `reference.block_needs`).
    """
    from .reference import column_rows, recall_row_cum_mass

    b, s, hq, _ = q.shape
    got = got.cpu().to(torch.int64)
    bad = 0
    for bi in range(b):
        s_b = s if lengths is None else int(lengths[bi])
        nbs = -(-s_b // cfg.block_size)
        bad += int((got[bi, :, nbs:] != 0).sum())
        column_keys = None if columns is None else column_rows(columns[bi : bi + 1].to(q.device), hq, s_b)
        for m in range(nbs) if blocks is None else [m for m in blocks if m < nbs]:
            cum = (
                recall_row_cum_mass(
                    q[bi : bi + 1, :s_b],
                    k[bi : bi + 1, :s_b],
                    scores[bi : bi + 1, :, :nbs, :nbs],
                    m,
                    block_size=cfg.block_size,
                    scale=scale,
                    rows=cfg.recall_rows,
                    keep_sink=cfg.keep_sink,
                    keep_diagonal=cfg.keep_diagonal,
                    column_keys=column_keys,
                )
                .double()
                .cpu()[0]
            )

            def need(g):
                return ((cum < g).sum(-1) + 1).clamp(max=m + 1).amax(-1)

            gm = got[bi, :, m]
            bad += int(((gm < need(cfg.gamma - tol)) | (gm > need(cfg.gamma + tol))).sum())
    return bad


def plan_mismatches(
    plan, ref_plan, ref_scores: torch.Tensor, min_blocks: int, rtol: float = 2e-3, rows=None, seq_blocks=None, scores=None
) -> int:
    """Rows (b, h, m) whose kept key blocks differ between `plan` and `ref_plan` by more than score ties.

    Both plans keep the sink and diagonal blocks and use ref_plan's budgets. With k the row's top-k size
    (`reference.block_counts` of the budget, `min_blocks`) and T the k-th largest reference score of the row, a
    row is accepted when it keeps both forced blocks and every block kept by `plan` but not by `ref_plan` scores
    at least T (1 - rtol), every block kept by `ref_plan` but not by `plan` at most T (1 + rtol). Counts may
    then differ: a forced block scoring at T can fall inside the top-k in one plan and outside it (kept as an
    extra) in the other.

    Why a tolerance: the kernels round the pooled proxies to fp16 (relative 2^-11), which moves a score by about
    1e-4 relative (a few 1e-4 on large logits); blocks whose reference scores are closer than that can swap.
    rows: optional bool `[B, Nb]` of query-block rows to compare; seq_blocks: optional `[B]` blocks of each
    sequence (packed batches; default Nb). scores: optional, the scores `plan` was selected from (same shape as
    ref_scores); then the tolerance of a row is also at least twice that row's largest |scores - ref_scores|
    (when both a block's score and the threshold move by at most e, blocks within 2e of the threshold can swap),
    so a swap is accepted exactly when the measured score error explains it.
    """
    from .reference import block_counts

    a, e = plan.to_mask().cpu(), ref_plan.to_mask().cpu()
    b, hq, nb, _ = e.shape
    if rows is None:
        rows = torch.ones(b, nb, dtype=torch.bool)
    nbs = [nb] * b if seq_blocks is None else [int(x) for x in seq_blocks]
    k = torch.zeros(b, hq, nb, dtype=torch.int64)
    for bi in range(b):
        if nbs[bi] > 0:
            k[bi, :, : nbs[bi]] = block_counts(ref_plan.budget_blocks[bi : bi + 1].cpu(), nbs[bi], min_blocks)[0]
    sel = rows.cpu()[:, None, :].expand(b, hq, nb)
    sc = ref_scores.float().cpu()
    err = None if scores is None else (scores.float().cpu() - sc).nan_to_num(0.0, 0.0, 0.0).abs()
    rep = hq // sc.shape[1]
    diff = ((a != e).any(dim=-1) | (plan.counts.cpu() != ref_plan.counts.cpu())) & sel
    bad = 0
    for bi, h, m in diff.nonzero().tolist():
        row = sc[bi, h // rep, m, : m + 1]
        ka, ke = a[bi, h, m, : m + 1], e[bi, h, m, : m + 1]
        if not bool(ka[0] and ka[m] and ke[0] and ke[m]):
            bad += 1
            continue
        t = row.sort(descending=True).values[int(k[bi, h, m]) - 1]
        added, dropped = row[ka & ~ke], row[ke & ~ka]
        tol = rtol * t.abs().clamp_min(1e-30)
        if err is not None:
            tol = torch.maximum(tol, 2 * err[bi, h // rep, m, : m + 1].max())
        if not (bool((added >= t - tol).all()) and bool((dropped <= t + tol).all())):
            bad += 1
    return bad


# ----------------------------------------------------------------------------------------- random weights
@torch.no_grad()
def random_weights_(model: torch.nn.Module, generator: torch.Generator) -> torch.nn.Module:
    """Fill every parameter of `model` in place for speed benchmarks without a checkpoint: norm weights 1, the rest
    normal(0, 0.02) drawn from `generator` (on the parameters' device). Returns the model."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=generator)
    return model
