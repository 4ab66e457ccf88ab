"""Budget rule 3 ("block_recall") on the GPU: how many leading blocks of its ranking every (head, query block)
needs, with no host synchronisation.

Spec: `proxyattn.reference.block_needs`. A row of query block m needs the shortest prefix of the block's ranking
(row m of the plan's `order`, forced blocks first) holding gamma of its attention mass. Walking the ranking
block by block would read K in a random order, once per query block; instead both passes below sweep the key
blocks in sequence, so that one K tile serves every row of the program and programs of one KV head share K
through L2:

* a program takes QB consecutive query blocks of one KV head and, for each, `recall_rows` rows
  (`reference.recall_row_positions`) of every query head of that KV head (M = QB x RB rows, RB = heads x rows
  padded to a power of two);
* pass 1 runs an online softmax over key blocks 0..m of each row and accumulates each row's unnormalised mass
  into NBUCKET buckets of ranking positions (bucket = rank // W, W = ceil((m+1) / NBUCKET); rank =
  position of the key block in the row's ranking, the inverse of `order`), rescaled like FlashAttention's
  output accumulator; at the end each row knows its log-sum-exp, the bucket where its cumulative mass first
  reaches gamma and the mass before that bucket;
* pass 2 sweeps again with the probabilities exp2(s - lse) and adds each key block whose rank falls in the row's
  crossing bucket to that position of a W-wide histogram; the need is the bucket's start plus the positions
  whose cumulative mass (from the mass before the bucket) stays below gamma, plus one.

So each row's need is exact up to the summation order, and each pass costs recall_rows / block_size of a dense
QK^T per head with K read once per QB query blocks. A head's need is the largest over its rows (a torch amax).

Layers: `_needs_kernel` (jit, PASS 1/2) -> `_launch_needs` (allocate, grid) -> `block_needs` /
`block_needs_varlen` (checks, shapes).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from .estimate_budgets import _budget_tile, seq_blocks
from .estimate_common import _LOG2E, interpreting, qk_layout
from .estimate_scores import _seq_base, _seq_bounds

__all__ = ["block_needs", "block_needs_varlen"]


@triton.jit
def _row_tile(q, k_ptrs, stride_kt, n, n_full, length, tpos, valid, offs_n, dmask, qk_scale, BS: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    """Logits of the program's rows against key block n (`_budget_tile`): without masks when every row sees the
    whole block (n < n_full), with them on the query blocks' own tiles. A branch per key block: the form measured
    on the H200 (two loops, whole tiles then masked ones, would let the first pipeline; not measured yet)."""
    if n < n_full:
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, valid, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
    else:
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, valid, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
    return s


@triton.jit
def _bucket_step(s, m_i, l_i, acc, rank_base, n, valid, row_m, width, offs_u):
    """Pass 1 on key block n: online max / sum, and the block's unnormalised mass added to the bucket of its
    ranking position, the accumulator rescaled to the new max."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
    bucket = tl.load(rank_base + n, mask=valid & (n <= row_m), other=0) // width
    acc = acc * alpha[:, None] + tl.where(offs_u[None, :] == bucket[:, None], p[:, None], 0.0)
    return m_new, l_i * alpha + p, acc


@triton.jit
def _position_step(s, lse, hist, rank_base, n, valid, row_m, first, offs_w):
    """Pass 2 on key block n: its probability mass added at its position inside the row's crossing bucket."""
    p = tl.sum(tl.exp2(s - lse[:, None]), axis=1)
    pos = tl.load(rank_base + n, mask=valid & (n <= row_m), other=-1) - first
    return hist + tl.where(offs_w[None, :] == pos[:, None], p[:, None], 0.0)


@triton.jit
def _needs_kernel(
    q_ptr, k_ptr, cu_ptr, rank_ptr, need_ptr, stat_ptr,
    seq_len, nb_max, num_kv_heads, kv_per_rank, qk_scale, gamma,
    stride_qb, stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    GROUP: tl.constexpr, ROWS: tl.constexpr, RB: tl.constexpr, QB: tl.constexpr, NBUCKET: tl.constexpr,
    WMAX: tl.constexpr, BS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr, PASS: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hkv + KV head
    pq = tl.program_id(1)  # group of QB query blocks
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    rank_row = hkv // kv_per_rank  # ranking row of these heads (R divides Hkv)
    num_ranks = num_kv_heads // kv_per_rank
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    q_base = _seq_base(q_ptr, b, start, stride_qb, stride_qt, VARLEN)
    k_base = _seq_base(k_ptr, b, start, stride_kb, stride_kt, VARLEN)
    nb = tl.cdiv(length, BS)
    if LAST_ONLY:
        m0 = nb - 1
    else:
        m0 = pq * QB

    M: tl.constexpr = QB * RB
    offs_i = tl.arange(0, M)
    row_m = m0 + offs_i // RB  # query block of each row
    head = (offs_i % RB) // ROWS
    hi = tl.minimum(length, (row_m + 1) * BS)
    tpos = hi - 1 - (offs_i % ROWS) * (BS // ROWS)
    valid = (head < GROUP) & (tpos >= row_m * BS) & (row_m < nb)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(q_base + tpos.to(tl.int64)[:, None] * stride_qt + (hkv * GROUP + head)[:, None] * stride_qh
                + offs_d[None, :] * stride_qd, mask=valid[:, None] & dmask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_base + hkv * stride_kh + offs_d[None, :] * stride_kd
    offs_n = tl.arange(0, BS)
    width = tl.cdiv(row_m + 1, NBUCKET)  # W: ranking positions per bucket of each row
    rank_base = rank_ptr + ((b.to(tl.int64) * num_ranks + rank_row) * nb_max + tl.minimum(row_m, nb_max - 1)) * nb_max
    m_last = tl.minimum(m0 + QB, nb) - 1
    n_full = tl.maximum(tl.minimum(m0, m_last + 1), 0)  # key blocks every row sees whole
    stat = stat_ptr + (pid.to(tl.int64) * tl.num_programs(1) + pq) * M + offs_i
    plane = tl.num_programs(0) * tl.num_programs(1) * M  # stat holds lse, mass before the crossing, crossing
    offs_u = tl.arange(0, NBUCKET)
    offs_w = tl.arange(0, WMAX)

    if PASS == 1:
        m_i = tl.full([M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([M], dtype=tl.float32)
        acc = tl.zeros([M, NBUCKET], dtype=tl.float32)
        for n in range(0, m_last + 1):
            s = _row_tile(q, k_ptrs, stride_kt, n, n_full, length, tpos, valid, offs_n, dmask, qk_scale, BS, UPCAST, DOT_PREC)
            m_i, l_i, acc = _bucket_step(s, m_i, l_i, acc, rank_base, n, valid, row_m, width, offs_u)
        inv = 1.0 / tl.maximum(l_i, 1e-30)
        cum = tl.cumsum(acc * inv[:, None], axis=1)
        below = cum < gamma
        crossing = tl.sum(below.to(tl.int32), axis=1)  # first bucket whose end reaches gamma (NBUCKET: none)
        before = tl.sum(tl.where(below, acc * inv[:, None], 0.0), axis=1)
        tl.store(stat, tl.where(valid, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf")))
        tl.store(stat + plane, before)
        tl.store(stat + 2 * plane, crossing.to(tl.float32))
    else:
        lse = tl.load(stat)
        before = tl.load(stat + plane)
        crossing = tl.load(stat + 2 * plane).to(tl.int32)
        first = crossing * width  # ranking position where the crossing bucket starts
        hist = tl.zeros([M, WMAX], dtype=tl.float32)
        for n in range(0, m_last + 1):
            s = _row_tile(q, k_ptrs, stride_kt, n, n_full, length, tpos, valid, offs_n, dmask, qk_scale, BS, UPCAST, DOT_PREC)
            hist = _position_step(s, lse, hist, rank_base, n, valid, row_m, first, offs_w)
        cum = before[:, None] + tl.cumsum(hist, axis=1)
        inside = (cum < gamma) & (offs_w[None, :] < width[:, None])
        need = first + tl.sum(inside.to(tl.int32), axis=1) + 1
        need = tl.minimum(need, tl.minimum(first + width, row_m + 1))
        need = tl.where(crossing >= NBUCKET, row_m + 1, need)  # rounding kept the total below gamma
        need = tl.where(valid, need, 0)
        out = need_ptr + (pid.to(tl.int64) * tl.num_programs(1) + pq) * M + offs_i
        tl.store(out, need)


def _buckets(nb: int) -> tuple[int, int]:
    """(NBUCKET, WMAX): about sqrt(Nb) buckets (at least 16) of at most WMAX ranking positions each (powers of
    two, at least 16: Triton 3.6 fails to compile the cumsum of a 2-wide histogram for sm_90)."""
    nbucket = max(16, triton.next_power_of_2(math.isqrt(max(nb - 1, 0)) + 1))
    return nbucket, max(16, triton.next_power_of_2(-(-nb // nbucket)))  # dims below 16 fail to compile


def _launch_needs(q, k, cu_seqlens, order, batch: int, seq_len: int, cfg: ProxyAttnConfig, scale: float,
                  last_only: bool, qb: int = 4, num_warps: int | None = None, num_stages: int = 2) -> torch.Tensor:
    """Needs int32 `[B, Hq, Nb]` (last_only: `[B, Hq, 1]`, each sequence's last query block)."""
    varlen = cu_seqlens is not None
    hq, hkv, d, sq, sk = qk_layout(q, k, varlen)
    bs, rows = cfg.block_size, cfg.recall_rows
    nb = triton.cdiv(seq_len, bs)
    r = order.shape[1]
    assert hkv % r == 0 and order.shape == (batch, r, nb, nb) and order.is_contiguous(), "order must be [B, R, Nb, Nb], R | Hkv"
    group = hq // hkv
    rb = triton.next_power_of_2(group * rows)
    qb = 1 if last_only else min(qb, triton.next_power_of_2(nb))
    qb = max(qb, triton.cdiv(16, rb))  # tl.dot needs at least 16 rows
    n_q = 1 if last_only else triton.cdiv(nb, qb)
    m_rows = qb * rb
    # rank[b, r, m, n]: position of key block n in row m's ranking (the inverse permutation of order).
    rank = torch.empty_like(order).scatter_(-1, order.long(), torch.arange(nb, device=q.device, dtype=torch.int32).expand_as(order))
    stat = torch.empty(3, batch * hkv, n_q, m_rows, device=q.device, dtype=torch.float32)
    need = torch.empty(batch * hkv, n_q, m_rows, device=q.device, dtype=torch.int32)
    nbucket, wmax = _buckets(nb)
    block_d = triton.next_power_of_2(d)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    cu = cu_seqlens if varlen else need
    args = (q, k, cu, rank, need, stat, seq_len, nb, hkv, hkv // r, scale * _LOG2E, cfg.gamma, *sq, *sk)
    common = dict(GROUP=group, ROWS=rows, RB=rb, QB=qb, NBUCKET=nbucket, WMAX=wmax, BS=bs, HEAD_DIM=d, BLOCK_D=block_d,
                  VARLEN=varlen, LAST_ONLY=last_only, DOT_PREC=prec, UPCAST=interpreting() and q.dtype == torch.bfloat16,
                  num_warps=num_warps or (4 if m_rows <= 64 else 8), num_stages=num_stages)
    _needs_kernel[(batch * hkv, n_q)](*args, PASS=1, **common)
    _needs_kernel[(batch * hkv, n_q)](*args, PASS=2, **common)
    per_row = need.reshape(batch, hkv, n_q * qb, rb)[:, :, : (1 if last_only else nb), : group * rows]
    per_row = per_row.reshape(batch, hkv, -1, group, rows)
    return per_row.amax(-1).permute(0, 1, 3, 2).reshape(batch, hq, -1)


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
        nb = triton.cdiv(max_seqlen, cfg.block_size)
        return _full_needs(seq_blocks(cu_seqlens, cfg.block_size), q.shape[1], nb, last_only)
    return _launch_needs(q, k, cu_seqlens, order, bsz, max_seqlen, cfg, scale, last_only)
