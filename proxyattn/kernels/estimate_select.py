"""Block selection on the GPU into the compact `BlockPlan` form, with torch device ops (no host synchronisation).

Spec: `proxyattn.plan.compact_plan` (itself tested against `reference.select_blocks`). The ranking of row m is
one stable descending sort of a key that is +inf on forced blocks (sink, diagonal), the proxy score on the other
causal blocks and -inf above the diagonal, so `order` holds forced blocks first, then descending score with ties
to the lower index; the two forced blocks are then put in score order, so `order` equals `compact_plan`'s. A head keeps k = `block_counts` top blocks of the score ranking plus the forced blocks that
fall outside them: counts = k + [rank of block 0 >= k] + [rank of block m >= k], the ranks counted with
comparisons instead of a second sort.

Memory: rows of query blocks are processed in chunks of at most `_CHUNK_ELEMS` score entries, so the sort's
int64 indices and the comparison temporaries stay bounded (about 16 bytes per entry of a chunk: 64 MiB at
Nb = 8192, i.e. 1M tokens); the outputs are order int32 `[B, R, Nb, Nb]` and counts int32 `[B, Hq, Nb]`.
At 128K tokens (Nb = 1024, R = 1) that is 4 MiB of plan and about 16 MiB of scratch.

Packed batches: plans are padded to max_seqlen's Nb with one row per sequence. Sequence b uses its own
Nb_b = ceil(len_b / block_size) in the budget rule; its query blocks past Nb_b get counts 0 (no queries there);
sequences with len_b <= dense_below_tokens get full plans (counts m+1), since a packed batch cannot send them to
the dense kernel one by one.
"""

from __future__ import annotations

import torch

from ..config import Estimator, ProxyAttnConfig
from ..plan import BlockPlan
from .estimate_budgets import early_dense_groups_varlen, head_budgets_varlen, seq_blocks
from .estimate_scores import proxy_scores_varlen
from .estimate_head_max import head_max_scores_varlen
from .estimate_needs import block_needs as _needs, needs_plan, needs_plan_varlen
from .estimate_rank import rank_order as _rank_order
from .fallback import dense_fallback

__all__ = ["select_blocks", "select_blocks_varlen", "plan_blocks_varlen", "block_needs", "needs_plan", "torch_rank_order", "VARLEN_SCORES"]

_CHUNK_ELEMS = 1 << 22

# Estimator -> its varlen score kernel (`[T, H, D]` inputs, cu_seqlens): the estimators whose packed batches the GPU
# backend plans in one pass (`proxyattn.api.plan_blocks_varlen` plans the others per sequence).
VARLEN_SCORES = {Estimator.PROXY: proxy_scores_varlen, Estimator.HEAD_MAX: head_max_scores_varlen}


def torch_rank_order(scores: torch.Tensor, keep_sink: bool, keep_diagonal: bool):
    """(order int32 `[B, R, Nb, Nb]`, sink_rank, diag_rank int64 `[B, R, Nb]`) with torch ops: the position of
    block 0 and of block m in row m's ranking by score alone (ties to the lower index). The spec of
    `estimate_rank`'s kernel, and its path for rows longer than it sorts."""
    b, r, nb, _ = scores.shape
    order_out = torch.empty(b, r, nb, nb, device=scores.device, dtype=torch.int32)
    dev = scores.device
    rows_per_chunk = max(1, _CHUNK_ELEMS // max(1, b * r * nb))
    cols = torch.arange(nb, device=dev)
    sink_rank = torch.empty(b, r, nb, device=dev, dtype=torch.int64)
    diag_rank = torch.empty_like(sink_rank)
    for lo in range(0, nb, rows_per_chunk):
        hi = min(nb, lo + rows_per_chunk)
        rows = torch.arange(lo, hi, device=dev)
        causal = cols[None, :] <= rows[:, None]  # [ch, Nb]
        s = scores[:, :, lo:hi].float().masked_fill(~causal, float("-inf"))  # [B, R, ch, Nb]
        forced = torch.zeros_like(causal)
        if keep_sink:
            forced[:, 0] = True
        if keep_diagonal:
            forced |= cols[None, :] == rows[:, None]
        key = s.masked_fill(forced & causal, float("inf"))
        order = torch.sort(key, dim=-1, descending=True, stable=True).indices.to(torch.int32)
        s0 = s[..., :1]
        sr = (s > s0).sum(dim=-1)
        sd = torch.diagonal(s[..., lo:hi], dim1=-2, dim2=-1).unsqueeze(-1)  # s[m, m]
        before = cols[None, :] < rows[:, None]
        dr = (s > sd).sum(dim=-1) + ((s == sd) & before).sum(dim=-1)
        if keep_sink and keep_diagonal and nb > 1:
            # The two forced blocks in score order, as compact_plan (the sort put block 0 first).
            swap = (dr < sr) & (rows > 0)
            first, second = order[..., 0].clone(), order[..., 1].clone()
            order[..., 0] = torch.where(swap, second, first)
            order[..., 1] = torch.where(swap, first, second)
        order_out[:, :, lo:hi] = order
        sink_rank[:, :, lo:hi] = sr
        diag_rank[:, :, lo:hi] = dr
    return order_out, sink_rank, diag_rank


def _top_counts(budget_blocks: torch.Tensor, nb: int, nb_seq: torch.Tensor, min_blocks: int) -> torch.Tensor:
    """k[b, h, m] = clamp(ceil(n_bh (m+1) / Nb_b), min_blocks, m+1) for m < Nb_b, else 0: int64 `[B, Hq, Nb]`."""
    m1 = torch.arange(1, nb + 1, device=budget_blocks.device, dtype=torch.int64)
    n = budget_blocks.to(torch.int64).unsqueeze(-1)
    nbs = nb_seq.to(torch.int64).reshape(-1, 1, 1).clamp_min(1)
    k = (n * m1 + nbs - 1) // nbs
    k = torch.minimum(k.clamp_min(min_blocks), m1.expand_as(k))
    return torch.where(m1 <= nb_seq.reshape(-1, 1, 1), k, 0)


def rank_order(scores: torch.Tensor, cfg: ProxyAttnConfig):
    """(order int32 `[B, R, Nb, Nb]`, sink_rank, diag_rank int32 `[B, R, Nb]`) (`estimate_rank.rank_order`)."""
    order, _, sink_rank, diag_rank = _rank_order(scores, cfg.keep_sink, cfg.keep_diagonal)
    return order, sink_rank, diag_rank


def _select(scores, budget_blocks, seq_len: int, cfg: ProxyAttnConfig, nb_seq, full_seq, ranked=None, needs=None) -> BlockPlan:
    """The plan; `ranked` = `rank_order(scores)` when already computed; `needs` `[B, Hq, Nb]` (budget rule 3):
    top-k min_blocks and at least the first needs[m] blocks of each row (`plan.compact_plan_needs`)."""
    b, r, nb, _ = scores.shape
    hq = budget_blocks.shape[1]
    rep = hq // r
    order, sink_rank, diag_rank = rank_order(scores, cfg) if ranked is None else ranked
    m1 = torch.arange(1, nb + 1, device=scores.device, dtype=torch.int64)
    inside = m1 <= nb_seq.reshape(-1, 1, 1)  # [B, 1, Nb]: query blocks inside each sequence
    if needs is None:
        k = _top_counts(budget_blocks, nb, nb_seq, cfg.min_budget_blocks)  # [B, Hq, Nb]
    else:
        k = torch.where(inside, m1.clamp(max=cfg.min_budget_blocks), 0).expand(b, hq, nb)
    valid = inside.expand_as(k)
    extra = torch.zeros_like(k)
    if cfg.keep_sink:
        extra += (sink_rank.repeat_interleave(rep, dim=1) >= k) & valid
    if cfg.keep_diagonal:
        diag_extra = (diag_rank.repeat_interleave(rep, dim=1) >= k) & valid
        if cfg.keep_sink:
            diag_extra[..., 0] = False  # block 0 is both sink and diagonal in row 0
        extra += diag_extra
    counts = k + extra
    if needs is not None:
        counts = torch.maximum(counts, torch.minimum(needs.to(torch.int64), m1))
    if full_seq is not None:
        full = torch.where(inside, m1, 0).expand_as(counts)
        counts = torch.where(full_seq.reshape(-1, 1, 1), full, counts)
    return BlockPlan(order, counts.to(torch.int32).contiguous(), budget_blocks.to(torch.int32).contiguous(), cfg.block_size, seq_len)


def block_needs(q, k, scores, cfg: ProxyAttnConfig, scale: float, *, last_only: bool = False, columns=None) -> torch.Tensor:
    """Needs of budget rule 3, int32 `[B, Hq, Nb]` (`reference.block_needs`; last_only: only the last query
    block's entry is filled, the rest 0). scores `[B, R, Nb, Nb]` with R dividing Hkv; columns int32 `[B, G, C]`
    (vertical columns) or None."""
    order = rank_order(scores, cfg)[0]
    needs = _needs(q, k, order, cfg, scale, last_only=last_only, columns=columns)
    if not last_only:
        return needs
    out = torch.zeros(needs.shape[0], needs.shape[1], scores.shape[-1], device=q.device, dtype=torch.int32)
    out[..., -1:] = needs
    return out


def select_blocks(
    scores: torch.Tensor, budget_blocks: torch.Tensor, seq_len: int, cfg: ProxyAttnConfig, *, needs: torch.Tensor | None = None
) -> BlockPlan:
    """Selection into a `BlockPlan` (equals `proxyattn.plan.compact_plan` as a set of kept blocks, or
    `compact_plan_needs` with `needs`).

    Args:
        scores: float `[B, R, Nb, Nb]` proxy block scores (head h reads row h // (Hq / R)).
        budget_blocks: int `[B, Hq]` budgets in key blocks. seq_len: S, Nb = ceil(S / block_size).
        needs: int `[B, Hq, Nb]` (budget rule 3) or None.
    """
    nb = scores.shape[-1]
    nb_seq = torch.full((scores.shape[0],), nb, device=scores.device, dtype=torch.int64)
    return _select(scores, budget_blocks, seq_len, cfg, nb_seq, None, needs=needs)


def select_blocks_varlen(scores, budget_blocks, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig) -> BlockPlan:
    """Selection for a packed batch: scores `[B, R, Nb, Nb]`, Nb = ceil(max_seqlen / block_size), one row per
    sequence; see the module docstring for padded rows and short sequences."""
    nb_seq = seq_blocks(cu_seqlens, cfg.block_size)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    full_seq = lengths <= cfg.dense_below_tokens
    return _select(scores, budget_blocks, max_seqlen, cfg, nb_seq, full_seq)


def plan_blocks_varlen(q, k, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig, scale: float) -> BlockPlan:
    """The ProxyAttn plan of a packed batch (scores, budgets, selection), without host synchronisation.

    Args:
        q: `[T, Hq, D]`, k: `[T, Hkv, D]`; sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]-1.
        cu_seqlens: int32 `[B+1]` on q's device, non-decreasing from 0; max_seqlen: host int >= every length.
    Returns:
        `BlockPlan` with seq_len = max_seqlen, order `[B, R, Nb, Nb]`, counts `[B, Hq, Nb]`, budget_blocks
        `[B, Hq]` (a short sequence's budget is its Nb_b), dense_heads (the dense fallback). Row b equals
        `plan_blocks` of sequence b alone, padded.
    """
    assert cfg.estimator in VARLEN_SCORES, f"estimator {cfg.estimator.label} has no varlen kernel"
    scores = VARLEN_SCORES[cfg.estimator](q, k, cu_seqlens, max_seqlen, cfg, scale)
    nb_seq = seq_blocks(cu_seqlens, cfg.block_size)
    early = None
    if cfg.dense_density_permille > 0 and cfg.budget_fraction is None:  # api.early_dense_groups, per sequence
        early = early_dense_groups_varlen(q, k, cu_seqlens, max_seqlen, cfg, scale)
    if cfg.budget_rule.per_query_block and cfg.budget_fraction is None:
        return needs_plan_varlen(q, k, cu_seqlens, max_seqlen, scores, cfg, scale, early=early)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    full_seq = lengths <= cfg.dense_below_tokens
    budgets = head_budgets_varlen(q, k, cu_seqlens, max_seqlen, cfg, scale, scores=scores)
    budgets = torch.where(full_seq[:, None], nb_seq[:, None].to(torch.int32), budgets).contiguous()
    plan = _select(scores, budgets, max_seqlen, cfg, nb_seq, full_seq)
    return dense_fallback(plan, k.shape[1], cfg, nb_seq, early)
