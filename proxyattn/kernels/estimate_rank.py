"""The rankings of a plan on the GPU: one program per (batch, ranking row r, query block m), one launch.

Spec: `proxyattn.plan.compact_plan` (ranking part) and `estimate_select`'s torch form, which stays as the path for
Nb > `MAX_SORT_BLOCKS`. Row m is sorted by a key that is +inf on the forced blocks (sink, diagonal), the proxy score
on the other causal blocks and -inf above the diagonal, descending, ties to the lower index (a stable sort): the
program packs (order-preserving bits of the key, Nb - 1 - index) into one int64 and sorts it with `tl.sort`. When
both forced blocks are kept they are then put in score order, as compact_plan does. The same program writes

* `order [B, R, Nb, Nb]` int32: the ranking;
* `rank [B, R, Nb, Nb]` int32: its inverse (position of key block n in row m's ranking; the needs kernels read it);
* `sink_rank`, `diag_rank` `[B, R, Nb]` int32: the position of block 0 and of block m in row m's ranking by score
  alone (ties to the lower index), which the selection uses to count forced blocks outside a top-k.

Layers: `_rank_kernel` (jit) -> `_launch_rank` (allocate, grid) -> `rank_order` (checks, dispatch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["rank_order", "MAX_SORT_BLOCKS"]

# Rows up to this many key blocks (512K tokens at block 128) are sorted in registers; longer ones use torch.sort.
MAX_SORT_BLOCKS = 4096


@triton.jit
def _rank_kernel(
    scores_ptr, order_ptr, rank_ptr, sink_ptr, diag_ptr, nb, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0)  # (b * R + r) * Nb + m
    m = row % nb
    base = row.to(tl.int64) * nb
    offs = tl.arange(0, BLOCK)
    causal = offs <= m
    s = tl.load(scores_ptr + base + offs, mask=causal, other=float("-inf")).to(tl.float32)
    s = tl.where(causal, s + 0.0, float("-inf"))  # + 0.0: -0.0 sorts as 0.0, as in torch.sort
    forced = (offs == 0) & KEEP_SINK
    forced = forced | ((offs == m) & KEEP_DIAG)
    key = tl.where(forced & causal, float("inf"), s)
    bits = key.to(tl.int32, bitcast=True)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # signed-int order equals float order
    packed = (ordered.to(tl.int64) << 32) | (BLOCK - 1 - offs).to(tl.int64)
    packed = tl.sort(packed, descending=True)
    idx = (BLOCK - 1 - (packed & 0xFFFFFFFF)).to(tl.int32)  # [BLOCK]: positions >= Nb hold padding

    s0 = tl.sum(tl.where(offs == 0, s, 0.0), axis=0)
    sd = tl.max(tl.where(offs == m, s, float("-inf")), axis=0)
    sink_rank = tl.sum((s > s0).to(tl.int32), axis=0)
    diag_rank = tl.sum((s > sd).to(tl.int32), axis=0) + tl.sum(((s == sd) & (offs < m)).to(tl.int32), axis=0)
    if KEEP_SINK and KEEP_DIAG:  # both forced blocks kept: in score order (the sort put block 0 first)
        swap = (diag_rank < sink_rank) & (m > 0)
        first = tl.sum(tl.where(offs == 0, idx, 0), axis=0)
        second = tl.sum(tl.where(offs == 1, idx, 0), axis=0)
        idx = tl.where(swap & (offs == 0), second, idx)
        idx = tl.where(swap & (offs == 1), first, idx)
    inside = offs < nb
    tl.store(order_ptr + base + offs, idx, mask=inside)
    tl.store(rank_ptr + base + idx, offs, mask=inside)
    tl.store(sink_ptr + row, sink_rank)
    tl.store(diag_ptr + row, diag_rank)


def _launch_rank(scores: torch.Tensor, keep_sink: bool, keep_diagonal: bool):
    b, r, nb, _ = scores.shape
    scores = scores if scores.is_contiguous() else scores.contiguous()
    order = torch.empty(b, r, nb, nb, device=scores.device, dtype=torch.int32)
    rank = torch.empty_like(order)
    sink_rank = torch.empty(b, r, nb, device=scores.device, dtype=torch.int32)
    diag_rank = torch.empty_like(sink_rank)
    block = max(16, triton.next_power_of_2(nb))
    _rank_kernel[(b * r * nb,)](
        scores,
        order,
        rank,
        sink_rank,
        diag_rank,
        nb,
        KEEP_SINK=keep_sink,
        KEEP_DIAG=keep_diagonal,
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )
    return order, rank, sink_rank, diag_rank


def rank_order(scores: torch.Tensor, keep_sink: bool, keep_diagonal: bool):
    """(order, rank) int32 `[B, R, Nb, Nb]` and (sink_rank, diag_rank) int32 `[B, R, Nb]` of proxy block scores
    `[B, R, Nb, Nb]` (float; entries above the diagonal are ignored). See the module docstring."""
    nb = scores.shape[-1]
    if nb <= MAX_SORT_BLOCKS:
        return _launch_rank(scores, keep_sink, keep_diagonal)
    from .estimate_select import torch_rank_order

    order, sink_rank, diag_rank = torch_rank_order(scores, keep_sink, keep_diagonal)
    rank = torch.empty_like(order).scatter_(-1, order.long(), torch.arange(nb, device=scores.device, dtype=torch.int32).expand_as(order))
    return order, rank, sink_rank.to(torch.int32), diag_rank.to(torch.int32)
