"""The dense fallback's group decision on the GPU in one launch (spec: `proxyattn.plan.dense_fallback`).

One program per (sequence b, KV group g) sums the counts of the group's heads, decides (the plan keeps at least
dense_density of the group's causal blocks, or the early decision marked it), and writes the counts (every causal
block for a dense group) and the heads' `dense_heads` flags. It replaces some twenty small torch ops of the
reference form, whose launches cost more host time than the planning kernels at 32K-64K tokens.

Layers: `_fallback_kernel` (jit) -> `_launch_fallback` (allocate, grid) -> `dense_fallback` (the plan in, the plan out).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from ..plan import BlockPlan

__all__ = ["dense_fallback"]


@triton.jit
def _fallback_kernel(
    counts_ptr,
    early_ptr,
    nbseq_ptr,
    out_ptr,
    heads_ptr,
    nb_max,
    num_kv_heads,
    permille,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HAS_EARLY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hkv + g: heads pid * GROUP .. pid * GROUP + GROUP - 1, contiguous rows of counts
    nb = tl.load(nbseq_ptr + pid // num_kv_heads).to(tl.int64)
    n = GROUP * nb_max
    base = pid.to(tl.int64) * n
    offs = tl.arange(0, BLOCK)
    kept = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n, BLOCK):
        c = tl.load(counts_ptr + base + start + offs, mask=start + offs < n, other=0)
        kept += c.to(tl.int64)
    causal = GROUP * nb * (nb + 1) // 2
    dense = (tl.sum(kept, axis=0) * 1000 >= permille * causal) & (causal > 0)
    if HAS_EARLY:
        dense = dense | (tl.load(early_ptr + pid) != 0)
    for start in range(0, n, BLOCK):
        at = start + offs
        inside = at < n
        c = tl.load(counts_ptr + base + at, mask=inside, other=0)
        m1 = (at % nb_max + 1).to(tl.int64)
        full = tl.where(m1 <= nb, m1, 0).to(tl.int32)
        tl.store(out_ptr + base + at, tl.where(dense, full, c), mask=inside)
    offs_h = tl.arange(0, GROUP_P2)
    tl.store(heads_ptr + pid.to(tl.int64) * GROUP + offs_h, (offs_h * 0 + dense.to(tl.int32)).to(tl.int8), mask=offs_h < GROUP)


def _launch_fallback(counts: torch.Tensor, early, nb_seq: torch.Tensor, num_kv_heads: int, permille: int):
    b, hq, nb = counts.shape
    counts = counts if counts.is_contiguous() else counts.contiguous()
    out = torch.empty_like(counts)
    heads = torch.empty(b, hq, device=counts.device, dtype=torch.int8)
    group = hq // num_kv_heads
    early_t = early.contiguous() if early is not None else heads  # not read without HAS_EARLY
    _fallback_kernel[(b * num_kv_heads,)](
        counts,
        early_t,
        nb_seq,
        out,
        heads,
        nb,
        num_kv_heads,
        permille,
        GROUP=group,
        GROUP_P2=max(2, triton.next_power_of_2(group)),
        HAS_EARLY=early is not None,
        BLOCK=1024,
        num_warps=4,
    )
    return out, heads.view(torch.bool)


def dense_fallback(
    plan: BlockPlan, num_kv_heads: int, cfg: ProxyAttnConfig, nb_seq: torch.Tensor | None = None, early: torch.Tensor | None = None
) -> BlockPlan:
    """`plan.dense_fallback` in one launch: the plan with counts `[B, Hq, Nb]` int32 covering every causal block for
    the KV groups that keep at least cfg.dense_density of their causal blocks or are marked in `early` (bool
    `[B, Hkv]`), and `dense_heads` bool `[B, Hq]`. nb_seq: int64 `[B]` blocks of each sequence (default Nb)."""
    permille = cfg.dense_density_permille
    if permille == 0:
        return plan
    b, _, nb = plan.counts.shape
    if nb_seq is None:
        nb_seq = torch.full((b,), nb, device=plan.counts.device, dtype=torch.int64)
    counts, heads = _launch_fallback(plan.counts, early, nb_seq, num_kv_heads, permille)
    return dataclasses.replace(plan, counts=counts, dense_heads=heads)
