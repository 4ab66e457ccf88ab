"""Budget rule 3 ("block_recall") on the GPU: how many leading blocks of its ranking every (head, query block)
needs, with no host synchronisation.

Spec: `proxyattn.reference.block_needs`. For query block m, a program takes `recall_rows` rows of the block
(`reference.recall_row_positions`) for each query head of one KV head, so the heads share every K tile (M =
heads x rows query rows, padded to a power of two >= 16 for the tensor-core dot). Pass 1 runs an online softmax
over key blocks 0..m for each row's log-sum-exp; pass 2 walks the block's ranking (row m of the plan's `order`,
forced blocks first) and adds each key block's probabilities to every row's running mass until every row holds
gamma: a row needs the number of blocks walked when it first reaches gamma (all m + 1 when rounding keeps it
below). The walk stops as soon as every row is done, so pass 2 costs about the kept fraction of pass 1.
The need of a head is the largest over its rows (a torch amax over `[.., heads, rows]`).

Layers: `_needs_kernel` (jit) -> `_launch_needs` (allocate, grid) -> `block_needs` / `block_needs_varlen`
(checks, shapes). Cost: pass 1 reads K once per (KV head, query block), i.e. recall_rows / block_size of a dense
attention's QK^T for each head (1/32 at the default 4 rows and block 128) with tiles of M rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from .estimate_common import _LOG2E, interpreting, qk_layout
from .estimate_scores import _online_max_sum, _seq_base, _seq_bounds

__all__ = ["block_needs", "block_needs_varlen"]


@triton.jit
def _needs_tile(q, k_ptrs, stride_kt, n, length, tpos, offs_n, dmask, qk_scale, BS: tl.constexpr,
                MASKED: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits (log2 units) of the program's rows against key block n; MASKED applies causality and the end."""
    kpos = n * BS + offs_n
    ptrs = k_ptrs + kpos.to(tl.int64)[:, None] * stride_kt
    if MASKED:
        k = tl.load(ptrs, mask=(kpos < length)[:, None] & dmask[None, :], other=0.0)
    else:
        k = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    if UPCAST:  # Triton's CPU interpreter computes bf16 dots wrongly: fp32 there (exact for bf16 values)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        s = tl.where((kpos[None, :] <= tpos[:, None]) & (kpos < length)[None, :], s, float("-inf"))
    return s


@triton.jit
def _needs_kernel(
    q_ptr, k_ptr, cu_ptr, order_ptr, need_ptr,
    seq_len, nb_max, num_kv_heads, kv_per_rank, qk_scale, gamma,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    GROUP: tl.constexpr, ROWS: tl.constexpr, M: tl.constexpr, BS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr, LAST_ONLY: tl.constexpr,
    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hkv + KV head
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    rank = hkv // kv_per_rank  # ranking row of these heads (R divides Hkv)
    num_ranks = num_kv_heads // kv_per_rank
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    q_base = _seq_base(q_ptr, b, start, stride_qb, stride_qt, VARLEN)
    k_base = _seq_base(k_ptr, b, start, stride_kb, stride_kt, VARLEN)
    nb = tl.cdiv(length, BS)
    if LAST_ONLY:
        m = nb - 1
    else:
        m = tl.program_id(1)
    live = m < nb  # packed batches: query blocks past this sequence's end need nothing

    offs_i = tl.arange(0, M)
    head = offs_i // ROWS
    hi = tl.minimum(length, (m + 1) * BS)
    tpos = hi - 1 - (offs_i % ROWS) * (BS // ROWS)
    valid = (head < GROUP) & (tpos >= m * BS) & live
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(q_base + tpos.to(tl.int64)[:, None] * stride_qt + (hkv * GROUP + head)[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=valid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_base + hkv * stride_kh + offs_d[None, :] * stride_kd
    offs_n = tl.arange(0, BS)

    # Pass 1: each row's log-sum-exp over key blocks 0..m (blocks left of m are visible to every row).
    n_full = tl.where(live, m, 0)
    m_i = tl.full([M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    for n in range(0, n_full):
        s = _needs_tile(q, k_ptrs, stride_kt, n, length, tpos, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
        m_i, l_i = _online_max_sum(m_i, l_i, s)
    if live:
        s = _needs_tile(q, k_ptrs, stride_kt, m, length, tpos, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
        m_i, l_i = _online_max_sum(m_i, l_i, s)
    lse = tl.where(valid, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))  # unused rows: exp2(-inf) = 0

    # Pass 2: walk the ranking until every valid row holds gamma of its mass.
    row_order = order_ptr + ((b.to(tl.int64) * num_ranks + rank) * nb_max + m) * nb_max
    cum = tl.zeros([M], dtype=tl.float32)
    need = tl.zeros([M], dtype=tl.int32)
    todo = tl.sum(valid.to(tl.int32), axis=0)
    t = 0
    while (t <= m) & (todo > 0):
        n = tl.load(row_order + t)
        s = _needs_tile(q, k_ptrs, stride_kt, n, length, tpos, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
        cum += tl.sum(tl.exp2(s - lse[:, None]), axis=1)
        need = tl.where(valid & (need == 0) & (cum >= gamma), t + 1, need)
        todo = tl.sum((valid & (need == 0)).to(tl.int32), axis=0)
        t += 1
    need = tl.where(valid & (need == 0), m + 1, need)
    if LAST_ONLY:
        out = need_ptr + pid.to(tl.int64) * M
    else:
        out = need_ptr + (pid.to(tl.int64) * nb_max + m) * M
    tl.store(out + offs_i, need)


def _launch_needs(q, k, cu_seqlens, order, batch: int, seq_len: int, cfg: ProxyAttnConfig, scale: float,
                  last_only: bool) -> torch.Tensor:
    """Needs int32 `[B, Hq, Nb]` (last_only: `[B, Hq, 1]`, each sequence's last query block)."""
    varlen = cu_seqlens is not None
    hq, hkv, d, sq, sk = qk_layout(q, k, varlen)
    bs, rows = cfg.block_size, cfg.recall_rows
    nb = triton.cdiv(seq_len, bs)
    r = order.shape[1]
    assert hkv % r == 0 and order.shape == (batch, r, nb, nb) and order.is_contiguous(), "order must be [B, R, Nb, Nb], R | Hkv"
    group = hq // hkv
    m_rows = max(16, triton.next_power_of_2(group * rows))
    n_q = 1 if last_only else nb
    need = torch.empty(batch * hkv, n_q, m_rows, device=q.device, dtype=torch.int32)
    block_d = triton.next_power_of_2(d)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cu = cu_seqlens if varlen else need
    _needs_kernel[(batch * hkv, n_q)](
        q, k, cu, order, need, seq_len, nb, hkv, hkv // r, scale * _LOG2E, cfg.gamma, *sq, *sk,
        GROUP=group, ROWS=rows, M=m_rows, BS=bs, HEAD_DIM=d, BLOCK_D=block_d, VARLEN=varlen, LAST_ONLY=last_only,
        DOT_PREC=prec, UPCAST=interpreting() and q.dtype == torch.bfloat16, num_warps=4, num_stages=2,
    )
    per_row = need[..., : group * rows].reshape(batch, hkv, n_q, group, rows)
    return per_row.amax(-1).permute(0, 1, 3, 2).reshape(batch, hq, n_q)


def _full_needs(nb_seq: torch.Tensor, hq: int, nb: int, last_only: bool) -> torch.Tensor:
    """gamma = 1: every causal block, m + 1 (0 past a packed sequence's end); last_only: Nb_b."""
    if last_only:
        return nb_seq.reshape(-1, 1, 1).expand(-1, hq, 1).to(torch.int32).contiguous()
    m1 = torch.arange(1, nb + 1, device=nb_seq.device, dtype=torch.int64)
    return torch.where(m1 <= nb_seq.reshape(-1, 1, 1), m1, 0).expand(-1, hq, nb).to(torch.int32).contiguous()


def block_needs(q, k, order, cfg: ProxyAttnConfig, scale: float, *, last_only: bool = False) -> torch.Tensor:
    """Needs of budget rule 3, int32 `[B, Hq, Nb]` (last_only: `[B, Hq, 1]`).

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]`, any strides; scale: softmax scale.
        order: int32 `[B, R, Nb, Nb]`, the plan's rankings (`estimate_select.rank_order`), R dividing Hkv.
    """
    b, s, hq, _ = q.shape
    nb = triton.cdiv(s, cfg.block_size)
    if cfg.gamma >= 1.0:
        return _full_needs(torch.full((b,), nb, device=q.device, dtype=torch.int64), hq, nb, last_only)
    return _launch_needs(q, k, None, order, b, s, cfg, scale, last_only)


def block_needs_varlen(q, k, cu_seqlens, max_seqlen: int, order, cfg: ProxyAttnConfig, scale: float, *,
                       last_only: bool = False) -> torch.Tensor:
    """`block_needs` of a packed batch: q `[T, Hq, D]`, k `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`, order
    `[B, R, Nb, Nb]` with Nb = ceil(max_seqlen / block_size); query blocks past a sequence's end need 0."""
    bsz = cu_seqlens.shape[0] - 1
    if cfg.gamma >= 1.0:
        from .estimate_budgets import seq_blocks

        nb = triton.cdiv(max_seqlen, cfg.block_size)
        return _full_needs(seq_blocks(cu_seqlens, cfg.block_size), q.shape[1], nb, last_only)
    return _launch_needs(q, k, cu_seqlens, order, bsz, max_seqlen, cfg, scale, last_only)
