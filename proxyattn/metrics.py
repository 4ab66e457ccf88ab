"""Metrics that judge a block plan against exact attention."""

from __future__ import annotations

import torch

from ._checks import check_qk, resolve_scale
from .plan import BlockPlan
from .reference import _expand_kv


def attention_recall(q, k, plan: BlockPlan, *, scale: float | None = None, chunk: int = 256) -> torch.Tensor:
    """Share of each head's true causal attention mass that falls in its kept blocks, averaged over queries.

    Args:
        q: `[B, S, Hq, D]`; k: `[B, S, Hkv, D]`; plan: a `BlockPlan` for them.
        chunk: query rows per step (memory: B * Hq * chunk * S floats).
    Returns:
        `[B, Hq]` float32 in [0, 1]; 1 means the plan loses no attention mass.
    """
    check_qk(q, k)
    b, s, hq, _ = q.shape
    if plan.seq_len != s or plan.counts.shape[:2] != (b, hq):
        raise ValueError(f"plan (B, Hq, S)={(plan.counts.shape[0], plan.num_heads, plan.seq_len)} does not match q {(b, hq, s)}")
    sc = resolve_scale(scale, q.shape[-1])
    mask = plan.to_mask()  # [B, Hq, Nb, Nb]
    kx = _expand_kv(k, hq)
    token_block = torch.arange(s, device=q.device) // plan.block_size
    total = torch.zeros(b, hq, device=q.device)
    keys = torch.arange(s, device=q.device)
    for lo in range(0, s, chunk):
        hi = min(s, lo + chunk)
        logits = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi].float(), kx.float()) * sc
        causal = keys[None, :] <= torch.arange(lo, hi, device=q.device)[:, None]
        probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
        kept = mask[:, :, token_block[lo:hi]][:, :, :, token_block]
        total += (probs * kept).sum(dim=-1).sum(dim=-1)
    return total / s
