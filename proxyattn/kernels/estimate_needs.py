"""Budget rule 3 ("block_recall") on the GPU: how many leading blocks of its ranking every (head, query block)
needs, and the plan's counts, with no host synchronisation.

Spec: `proxyattn.reference.block_needs` (and `plan.compact_plan_needs` for the counts). A measured row of query
block m needs the shortest prefix of the block's ranking (row m of the plan's `order`, forced blocks first) holding
gamma of its attention mass; a head's need is the largest over its rows. Two kernels:

* `_mass_kernel` sweeps the key blocks in sequence (one K tile serves every row of the program; programs of one KV
  head share K through L2). A program takes QB consecutive query blocks of one KV head and, for each,
  `recall_rows` rows (`reference.recall_row_positions`) of every query head of that KV head (M = QB x RB rows,
  RB = heads x rows padded to a power of two). For every row and key block it writes the block's unnormalised
  log2 mass, max + log2(sum exp2(logit - max)), to a scratch `[.., Nb, RB]` and keeps an online log-sum-exp.
  One pass: recall_rows / block_size of a dense QK^T per head, K read once per QB query blocks.
* `_cut_kernel`, one program per (KV head, query block): walks the block's ranking in chunks, gathers each row's
  block masses in ranking order, accumulates exp2(mass - lse) and counts the positions still below gamma (it
  stops once every row reached gamma). It writes the needs and, for a plan, the counts (min_budget_tokens' top
  blocks, the forced blocks outside them, at least the need; `estimate_select`'s rule for needs).

Long sequences are processed in chunks of query blocks so that the scratch stays within `_SCRATCH_BYTES` (512 MiB).

Dense fallback (`ProxyAttnConfig.dense_density`): the KV groups of the early decision (`api.early_dense_groups`,
made before the proxy scores) are skipped by both kernels and keep every causal block; `fallback.dense_fallback` then
marks them and the groups whose plan is dense enough.

Layers: `_mass_kernel`, `_cut_kernel` (jit) -> `_launch_needs` (allocate, chunk, grid) -> `block_needs`,
`block_needs_varlen`, `needs_plan`, `needs_plan_varlen` (shapes).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from ..plan import BlockPlan
from ..reference import needs_budgets
from .estimate_budgets import _budget_tile, _mass_step, seq_blocks
from .estimate_common import _LOG2E, _SMEM_BUDGET, interpreting, qk_layout, tile_warps
from .estimate_rank import rank_order
from .fallback import dense_fallback
from .estimate_scores import _seq_base, _seq_bounds

__all__ = ["block_needs", "block_needs_varlen", "needs_plan", "needs_plan_varlen"]

# Block masses of one chunk of query blocks. 512 MiB holds every query block of a 128K-token Llama-3-8B sequence
# (B * Hkv * Nb^2 * RB * 4 bytes): one launch of 1024 programs and one tail instead of four launches of 256
# (benchmarks/profile_plan.py --sweep-needs, H100: 6.7 ms against 7.6 ms, the same needs). Longer sequences chunk.
_SCRATCH_BYTES = 512 * 1024**2
_CUT_CHUNK = 128  # ranking positions per step of the cut kernel


def mass_stages(qb: int, rb: int, block_d: int, block_size: int, elt: int = 2) -> int:
    """Pipeline stages of `_mass_kernel`: 2 (the next K tile loads while this one is used) when the query rows and two
    K tiles fit in shared memory, else 1 (e.g. head dim 256 with 8 query heads per KV head: 256 rows x 256)."""
    return 2 if (qb * rb + 2 * block_size) * block_d * elt <= _SMEM_BUDGET else 1


def mass_warps(qb: int, rb: int, block_d: int) -> int:
    """Warps of `_mass_kernel`: 8 from 128 rows of head dim 128 per program (QB x RB x BLOCK_D >= 128 x 128), else 4.
    H100, 128K tokens, Llama-3-8B shape (QB 8, RB 16, D 128): 5.54 ms with 8 warps against 5.86 ms with 4, the same
    needs (benchmarks/profile_plan.py --sweep-needs)."""
    return tile_warps(qb * rb, block_d)


@triton.jit
def _mass_program(
    q_ptr,
    k_ptr,
    cu_ptr,
    skip_ptr,
    col_ptr,
    mass_ptr,
    lse_ptr,
    held_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    col_rows,
    m_lo,
    n_slots,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    QB: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
    COLS: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hkv + KV head
    pq = tl.program_id(1)  # group of QB query blocks of the chunk
    if HEAVY_FIRST:  # the latest query blocks (the most key blocks) start first: a shorter tail
        pq = tl.num_programs(1) - 1 - pq
    if SKIP:
        if tl.load(skip_ptr + pid) != 0:
            return
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    q_base = _seq_base(q_ptr, b, start, stride_qb, stride_qt, VARLEN)
    k_base = _seq_base(k_ptr, b, start, stride_kb, stride_kt, VARLEN)
    nb = tl.cdiv(length, BS)
    if LAST_ONLY:
        m0 = nb - 1
        m_end = nb
    else:
        m0 = m_lo + pq * QB
        m_end = tl.minimum(nb, m_lo + n_slots)

    M: tl.constexpr = QB * RB
    offs_i = tl.arange(0, M)
    offs_r = offs_i % RB
    row_m = m0 + offs_i // RB  # query block of each row
    head = offs_r // ROWS
    hi = tl.minimum(length, (row_m + 1) * BS)
    tpos = hi - 1 - (offs_r % ROWS) * (BS // ROWS)
    valid = (head < GROUP) & (tpos >= row_m * BS) & (row_m < m_end) & (row_m >= 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(
        q_base + tpos.to(tl.int64)[:, None] * stride_qt + (hkv * GROUP + head)[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=valid[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_base + hkv * stride_kh + offs_d[None, :] * stride_kd
    offs_n = tl.arange(0, BS)
    m_last = tl.minimum(m0 + QB, m_end) - 1
    n_full = tl.maximum(tl.minimum(m0, m_last + 1), 0)  # key blocks every row sees whole
    if LAST_ONLY:
        slot = row_m - m0  # 0 for the program's rows
    else:
        slot = row_m - m_lo  # row's query block within the chunk
    row_base = ((pid.to(tl.int64) * n_slots + slot) * nb_max) * RB + offs_r  # mass[pid, slot, n, r] at + n * RB

    m_i = tl.full([M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([M], dtype=tl.float32)
    c_i = tl.zeros([M], dtype=tl.float32)  # COLS: the rows' sum over column keys, scaled like l_i
    col_base = col_ptr + (b * col_rows + hkv // (num_kv_heads // col_rows)).to(tl.int64) * seq_len
    # Two loops, no branch inside either (COLS is a constant): the compiler pipelines their K loads (cp.async) only
    # at a loop's top level.
    for n in range(0, n_full):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, valid, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
        if COLS:
            is_col = tl.load(col_base + n * BS + offs_n) != 0
            m_i, l_i, c_i = _held_mass_step(s, is_col, m_i, l_i, c_i, mass_ptr + row_base + n * RB, valid & (n <= row_m))
        else:
            m_i, l_i = _mass_step(s, m_i, l_i, mass_ptr + row_base + n * RB, valid & (n <= row_m))
    for n in range(n_full, m_last + 1):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, valid, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
        if COLS:
            is_col = tl.load(col_base + n * BS + offs_n, mask=n * BS + offs_n < length, other=0) != 0
            m_i, l_i, c_i = _held_mass_step(s, is_col, m_i, l_i, c_i, mass_ptr + row_base + n * RB, valid & (n <= row_m))
        else:
            m_i, l_i = _mass_step(s, m_i, l_i, mass_ptr + row_base + n * RB, valid & (n <= row_m))
    lse = tl.where(valid, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("inf"))
    stat_at = (pid.to(tl.int64) * n_slots + slot) * RB + offs_r
    tl.store(lse_ptr + stat_at, lse, mask=(row_m < m_end) & (row_m >= 0))
    if COLS:  # log2 of the column keys' unnormalised mass (-inf for none)
        held = tl.where(valid & (c_i > 0.0), m_i + tl.log2(tl.maximum(c_i, 1e-30)), float("-inf"))
        tl.store(held_ptr + stat_at, held, mask=(row_m < m_end) & (row_m >= 0))


@triton.jit
def _held_mass_step(s, is_col, m_i, l_i, c_i, mass_at, store_ok):
    """`_mass_step` with vertical columns: the block's stored mass leaves its column keys (is_col `[BS]`) out, and
    their sum goes to c_i (the rows' column mass, scaled like l_i)."""
    bm = tl.max(s, axis=1)
    bm_safe = tl.where(bm > -1.0e30, bm, 0.0)  # a row that sees none of this block
    e = tl.exp2(s - bm_safe[:, None])
    pc = tl.sum(tl.where(is_col[None, :], e, 0.0), axis=1)
    pb = tl.sum(tl.where(is_col[None, :], 0.0, e), axis=1)
    ps = pb + pc
    tl.store(mass_at, tl.where(pb > 0.0, bm_safe + tl.log2(tl.maximum(pb, 1e-30)), float("-inf")), mask=store_ok)
    m_new = tl.maximum(m_i, bm)
    alpha = tl.exp2(m_i - m_new)
    beta = tl.exp2(bm - m_new)
    return m_new, l_i * alpha + ps * beta, c_i * alpha + pc * beta


@triton.jit
def _cut_program(
    mass_ptr,
    lse_ptr,
    held_ptr,
    order_ptr,
    sink_ptr,
    diag_ptr,
    cu_ptr,
    skip_ptr,
    need_ptr,
    counts_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    kv_per_rank,
    m_lo,
    n_slots,
    gamma,
    min_blocks,
    dense_below,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    BS: tl.constexpr,
    CH: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    COUNTS: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
    COLS: tl.constexpr,
):
    pid = tl.program_id(0)  # b * Hkv + KV head
    slot = tl.program_id(1)  # query block m_lo + slot (LAST_ONLY: the sequence's last)
    b = pid // num_kv_heads
    hkv = pid % num_kv_heads
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    nb = tl.cdiv(length, BS)
    if LAST_ONLY:
        m = nb - 1
    else:
        m = m_lo + slot
    HB: tl.constexpr = RB // ROWS  # heads, padded
    offs_h = tl.arange(0, HB)
    head_ok = offs_h < GROUP
    h_out = b.to(tl.int64) * num_kv_heads * GROUP + hkv * GROUP + offs_h  # [B, Hq] index of each head
    if LAST_ONLY:
        need_at = h_out
    else:
        need_at = h_out * nb_max + m
    if (m >= nb) | (m < 0):  # past this sequence's end, or an empty sequence (a packed batch)
        tl.store(need_ptr + need_at, tl.zeros([HB], dtype=tl.int32), mask=head_ok)
        if COUNTS:
            tl.store(counts_ptr + need_at, tl.zeros([HB], dtype=tl.int32), mask=head_ok)
        return

    offs_r = tl.arange(0, RB)
    hi = tl.minimum(length, (m + 1) * BS)
    valid = ((offs_r // ROWS) < GROUP) & (hi - 1 - (offs_r % ROWS) * (BS // ROWS) >= m * BS)
    skipped = False
    if SKIP:
        skipped = tl.load(skip_ptr + pid) != 0
    full = False
    if VARLEN:
        full = length <= dense_below  # a packed batch keeps short sequences whole
    need = tl.full([HB], 0, dtype=tl.int32) + m + 1
    if not (skipped or full):
        lse = tl.load(lse_ptr + (pid.to(tl.int64) * n_slots + slot) * RB + offs_r)
        rank_row = hkv // kv_per_rank
        num_ranks = num_kv_heads // kv_per_rank
        order_row = order_ptr + ((b.to(tl.int64) * num_ranks + rank_row) * nb_max + m) * nb_max
        mass_row = mass_ptr + (pid.to(tl.int64) * n_slots + slot) * nb_max * RB + offs_r
        carry = tl.zeros([RB], dtype=tl.float32)
        if COLS:  # the columns' mass is held before any block
            carry = tl.exp2(tl.load(held_ptr + (pid.to(tl.int64) * n_slots + slot) * RB + offs_r) - lse)
            carry = tl.where(valid, carry, 0.0)
        below = tl.zeros([RB], dtype=tl.int32)
        offs_c = tl.arange(0, CH)
        j = m * 0
        pending = tl.sum((valid & (carry < gamma)).to(tl.int32), axis=0)
        while (j <= m) & (pending > 0):
            in_j = j + offs_c <= m
            blk = tl.load(order_row + j + offs_c, mask=in_j, other=0)
            lm = tl.load(mass_row[:, None] + blk[None, :] * RB, mask=valid[:, None] & in_j[None, :], other=float("-inf"))
            p = tl.exp2(lm - lse[:, None])
            cum = carry[:, None] + tl.cumsum(p, axis=1)
            below += tl.sum(((cum < gamma) & in_j[None, :]).to(tl.int32), axis=1)
            carry += tl.sum(p, axis=1)
            j += CH
            pending = tl.sum((valid & (carry < gamma)).to(tl.int32), axis=0)
        row_need = tl.where(valid, tl.minimum(below + 1, m + 1), 0)
        need = tl.max(tl.reshape(row_need, [HB, ROWS]), axis=1)
    tl.store(need_ptr + need_at, need, mask=head_ok)
    if COUNTS:
        k = tl.minimum(m + 1, min_blocks)
        rank_at = (b.to(tl.int64) * (num_kv_heads // kv_per_rank) + hkv // kv_per_rank) * nb_max + m
        extra = 0
        if KEEP_SINK:
            extra += (tl.load(sink_ptr + rank_at) >= k).to(tl.int32)
        if KEEP_DIAG:
            diag = (tl.load(diag_ptr + rank_at) >= k).to(tl.int32)
            if KEEP_SINK:
                diag = tl.where(m == 0, 0, diag)  # block 0 is both sink and diagonal in row 0
            extra += diag
        counts = tl.maximum(k + extra, tl.minimum(need, m + 1))
        if skipped or full:
            counts = tl.full([HB], 0, dtype=tl.int32) + m + 1
        tl.store(counts_ptr + need_at, counts, mask=head_ok)


@triton.jit
def _mass_kernel(
    q_ptr,
    k_ptr,
    cu_ptr,
    skip_ptr,
    mass_ptr,
    lse_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    m_lo,
    n_slots,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    QB: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    """`_mass_program` without vertical columns (the signature libproxyattn compiles ahead of time)."""
    _mass_program(
        q_ptr,
        k_ptr,
        cu_ptr,
        skip_ptr,
        q_ptr,
        mass_ptr,
        lse_ptr,
        lse_ptr,
        seq_len,
        nb_max,
        num_kv_heads,
        1,
        m_lo,
        n_slots,
        qk_scale,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_kd,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        QB=QB,
        BS=BS,
        HEAD_DIM=HEAD_DIM,
        BLOCK_D=BLOCK_D,
        VARLEN=VARLEN,
        LAST_ONLY=LAST_ONLY,
        SKIP=SKIP,
        DOT_PREC=DOT_PREC,
        UPCAST=UPCAST,
        HEAVY_FIRST=HEAVY_FIRST,
        COLS=False,
    )


@triton.jit
def _mass_held_kernel(
    q_ptr,
    k_ptr,
    cu_ptr,
    skip_ptr,
    col_ptr,
    mass_ptr,
    lse_ptr,
    held_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    col_rows,
    m_lo,
    n_slots,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    QB: tl.constexpr,
    BS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    HEAVY_FIRST: tl.constexpr,
):
    """`_mass_program` with vertical columns: col_ptr int8 `[B, col_rows, S]` marks each proxy head's column keys; their
    mass goes to held_ptr (log2, like lse_ptr) and is left out of the block masses."""
    _mass_program(
        q_ptr,
        k_ptr,
        cu_ptr,
        skip_ptr,
        col_ptr,
        mass_ptr,
        lse_ptr,
        held_ptr,
        seq_len,
        nb_max,
        num_kv_heads,
        col_rows,
        m_lo,
        n_slots,
        qk_scale,
        stride_qb,
        stride_qt,
        stride_qh,
        stride_qd,
        stride_kb,
        stride_kt,
        stride_kh,
        stride_kd,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        QB=QB,
        BS=BS,
        HEAD_DIM=HEAD_DIM,
        BLOCK_D=BLOCK_D,
        VARLEN=VARLEN,
        LAST_ONLY=LAST_ONLY,
        SKIP=SKIP,
        DOT_PREC=DOT_PREC,
        UPCAST=UPCAST,
        HEAVY_FIRST=HEAVY_FIRST,
        COLS=True,
    )


@triton.jit
def _cut_kernel(
    mass_ptr,
    lse_ptr,
    order_ptr,
    sink_ptr,
    diag_ptr,
    cu_ptr,
    skip_ptr,
    need_ptr,
    counts_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    kv_per_rank,
    m_lo,
    n_slots,
    gamma,
    min_blocks,
    dense_below,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    BS: tl.constexpr,
    CH: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    COUNTS: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
):
    """`_cut_program` without vertical columns (the signature libproxyattn compiles ahead of time)."""
    _cut_program(
        mass_ptr,
        lse_ptr,
        lse_ptr,
        order_ptr,
        sink_ptr,
        diag_ptr,
        cu_ptr,
        skip_ptr,
        need_ptr,
        counts_ptr,
        seq_len,
        nb_max,
        num_kv_heads,
        kv_per_rank,
        m_lo,
        n_slots,
        gamma,
        min_blocks,
        dense_below,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        BS=BS,
        CH=CH,
        VARLEN=VARLEN,
        LAST_ONLY=LAST_ONLY,
        SKIP=SKIP,
        COUNTS=COUNTS,
        KEEP_SINK=KEEP_SINK,
        KEEP_DIAG=KEEP_DIAG,
        COLS=False,
    )


@triton.jit
def _cut_held_kernel(
    mass_ptr,
    lse_ptr,
    held_ptr,
    order_ptr,
    sink_ptr,
    diag_ptr,
    cu_ptr,
    skip_ptr,
    need_ptr,
    counts_ptr,
    seq_len,
    nb_max,
    num_kv_heads,
    kv_per_rank,
    m_lo,
    n_slots,
    gamma,
    min_blocks,
    dense_below,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    BS: tl.constexpr,
    CH: tl.constexpr,
    VARLEN: tl.constexpr,
    LAST_ONLY: tl.constexpr,
    SKIP: tl.constexpr,
    COUNTS: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
):
    """`_cut_program` with vertical columns: each row starts from the mass its columns hold (held_ptr)."""
    _cut_program(
        mass_ptr,
        lse_ptr,
        held_ptr,
        order_ptr,
        sink_ptr,
        diag_ptr,
        cu_ptr,
        skip_ptr,
        need_ptr,
        counts_ptr,
        seq_len,
        nb_max,
        num_kv_heads,
        kv_per_rank,
        m_lo,
        n_slots,
        gamma,
        min_blocks,
        dense_below,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        BS=BS,
        CH=CH,
        VARLEN=VARLEN,
        LAST_ONLY=LAST_ONLY,
        SKIP=SKIP,
        COUNTS=COUNTS,
        KEEP_SINK=KEEP_SINK,
        KEEP_DIAG=KEEP_DIAG,
        COLS=True,
    )


def _launch_needs(
    q,
    k,
    cu_seqlens,
    order,
    batch: int,
    seq_len: int,
    cfg: ProxyAttnConfig,
    scale: float,
    *,
    last_only: bool,
    ranks=None,
    skip=None,
    counts: bool = False,
    qb: int = 8,
    num_warps: int | None = None,
    num_stages: int | None = None,
    scratch_bytes: int = _SCRATCH_BYTES,
    heavy_first: bool = True,
    columns=None,
):
    """Needs int32 `[B, Hq, Nb]` (last_only: `[B, Hq]`, each sequence's last query block) and, with `counts`, the
    plan's counts `[B, Hq, Nb]`. `ranks` = (sink_rank, diag_rank) of `rank_order` (needed by counts); `skip` int32
    `[B * Hkv]`: groups not measured (they need every block); `columns` int32 `[B, G, C]` (vertical columns, G
    dividing Hkv; not with cu_seqlens): their mass counts as held before any block. The launch parameters
    (qb .. heavy_first) are benchmarks/profile_plan.py's sweep (None: `mass_warps`, `mass_stages`); scratch_bytes
    bounds the block masses of one chunk of query blocks."""
    varlen = cu_seqlens is not None
    assert columns is None or not varlen, "vertical columns are not supported in packed batches"
    hq, hkv, d, sq, sk = qk_layout(q, k, varlen)
    bs, rows = cfg.block_size, cfg.recall_rows
    nb = triton.cdiv(seq_len, bs)
    r = order.shape[1]
    assert hkv % r == 0 and order.shape == (batch, r, nb, nb) and order.is_contiguous(), "order must be [B, R, Nb, Nb], R | Hkv"
    group = hq // hkv
    rb = triton.next_power_of_2(group * rows)
    qb = 1 if last_only else min(qb, triton.next_power_of_2(nb))
    qb = max(qb, triton.cdiv(16, rb))  # tl.dot needs at least 16 rows
    if num_warps is None:
        num_warps = mass_warps(qb, rb, triton.next_power_of_2(d))
    if num_stages is None:
        num_stages = mass_stages(qb, rb, triton.next_power_of_2(d), bs, q.element_size())
    dev = q.device
    need = torch.empty((batch, hq) if last_only else (batch, hq, nb), device=dev, dtype=torch.int32)
    cnt = torch.empty_like(need) if counts else need
    if last_only:
        slots_per_chunk = 1
    else:
        per_slot = batch * hkv * nb * rb * 4
        slots_per_chunk = max(qb, (scratch_bytes // per_slot) // qb * qb)
        slots_per_chunk = min(slots_per_chunk, triton.cdiv(nb, qb) * qb)
    mass = torch.empty(batch * hkv, slots_per_chunk, nb, rb, device=dev, dtype=torch.float32)
    lse = torch.empty(batch * hkv, slots_per_chunk, rb, device=dev, dtype=torch.float32)
    # Without columns the kernels libproxyattn compiles; with them the held-mass pair, which also read each proxy
    # head's column keys (int8 bitmap [B, G, S]) and pass each row's column mass (`held`) from one to the other.
    mass_kernel, cut_kernel, mass_io, cut_io = _mass_kernel, _cut_kernel, (mass, lse, seq_len, nb, hkv), (mass, lse)
    if columns is not None:
        col_rows = columns.shape[1]
        assert columns.shape[0] == batch and hkv % col_rows == 0, "columns must be [B, G, C] with G dividing Hkv"
        col_keys = torch.zeros(batch, col_rows, seq_len, device=dev, dtype=torch.int8).scatter_(-1, columns.long(), 1)
        held = torch.empty_like(lse)
        mass_kernel, cut_kernel = _mass_held_kernel, _cut_held_kernel
        mass_io, cut_io = (col_keys, mass, lse, held, seq_len, nb, hkv, col_rows), (mass, lse, held)
    cu = cu_seqlens if varlen else need
    skip_t = skip if skip is not None else need
    sink_rank, diag_rank = ranks if ranks is not None else (need, need)
    common = dict(GROUP=group, ROWS=rows, RB=rb, BS=bs, VARLEN=varlen, LAST_ONLY=last_only, SKIP=skip is not None)
    upcast = interpreting() and q.dtype == torch.bfloat16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    dense_below = cfg.dense_below_tokens if varlen else -1
    for m_lo in range(0, 1 if last_only else nb, slots_per_chunk):
        n_slots = 1 if last_only else min(slots_per_chunk, nb - m_lo)
        mass_kernel[(batch * hkv, 1 if last_only else triton.cdiv(n_slots, qb))](
            q,
            k,
            cu,
            skip_t,
            *mass_io,
            m_lo,
            slots_per_chunk,
            scale * _LOG2E,
            *sq,
            *sk,
            QB=qb,
            HEAD_DIM=d,
            BLOCK_D=triton.next_power_of_2(d),
            DOT_PREC=prec,
            UPCAST=upcast,
            HEAVY_FIRST=heavy_first,
            **common,
            num_warps=num_warps,
            num_stages=num_stages,
        )
        cut_kernel[(batch * hkv, n_slots)](
            *cut_io,
            order,
            sink_rank,
            diag_rank,
            cu,
            skip_t,
            need,
            cnt,
            seq_len,
            nb,
            hkv,
            hkv // r,
            m_lo,
            slots_per_chunk,
            cfg.gamma,
            cfg.min_budget_blocks,
            dense_below,
            CH=_CUT_CHUNK,
            COUNTS=counts,
            KEEP_SINK=cfg.keep_sink,
            KEEP_DIAG=cfg.keep_diagonal,
            **common,
            num_warps=4,
        )
    return (need, cnt) if counts else need


def _full_needs(nb_seq: torch.Tensor, hq: int, nb: int, last_only: bool) -> torch.Tensor:
    """gamma = 1: every causal block, m + 1 (0 past a packed sequence's end); last_only: Nb_b."""
    if last_only:
        return nb_seq.reshape(-1, 1, 1).expand(-1, hq, 1).to(torch.int32).contiguous()
    m1 = torch.arange(1, nb + 1, device=nb_seq.device, dtype=torch.int64)
    return torch.where(m1 <= nb_seq.reshape(-1, 1, 1), m1, 0).expand(-1, hq, nb).to(torch.int32).contiguous()


def block_needs(q, k, order, cfg: ProxyAttnConfig, scale: float, *, last_only: bool = False, columns=None) -> torch.Tensor:
    """Needs of budget rule 3, int32 `[B, Hq, Nb]` (last_only: `[B, Hq, 1]`).

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]`, any strides; scale: softmax scale.
        order: int32 `[B, R, Nb, Nb]`, the plan's rankings (`estimate_rank.rank_order`), R dividing Hkv.
        columns: int32 `[B, G, C]` vertical columns (`api.proxy_columns`) or None; their mass counts as held.
    """
    b, s, hq, _ = q.shape
    nb = triton.cdiv(s, cfg.block_size)
    if cfg.gamma >= 1.0:
        return _full_needs(torch.full((b,), nb, device=q.device, dtype=torch.int64), hq, nb, last_only)
    need = _launch_needs(q, k, None, order, b, s, cfg, scale, last_only=last_only, columns=columns)
    return need[..., None] if last_only else need


def block_needs_varlen(
    q, k, cu_seqlens, max_seqlen: int, order, cfg: ProxyAttnConfig, scale: float, *, last_only: bool = False
) -> torch.Tensor:
    """`block_needs` of a packed batch: q `[T, Hq, D]`, k `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`, order
    `[B, R, Nb, Nb]` with Nb = ceil(max_seqlen / block_size); query blocks past a sequence's end need 0."""
    bsz = cu_seqlens.shape[0] - 1
    if cfg.gamma >= 1.0:
        nb = triton.cdiv(max_seqlen, cfg.block_size)
        return _full_needs(seq_blocks(cu_seqlens, cfg.block_size), q.shape[1], nb, last_only)
    need = _launch_needs(q, k, cu_seqlens, order, bsz, max_seqlen, cfg, scale, last_only=last_only)
    return need[..., None] if last_only else need


def _plan(q, k, cu_seqlens, scores, batch: int, seq_len: int, cfg: ProxyAttnConfig, scale: float, nb_seq, early, columns=None) -> BlockPlan:
    nb = scores.shape[-1]
    hq, hkv = (q.shape[1], k.shape[1]) if cu_seqlens is not None else (q.shape[2], k.shape[2])
    order, _, sink_rank, diag_rank = rank_order(scores, cfg.keep_sink, cfg.keep_diagonal)
    if cfg.gamma >= 1.0:  # every causal block: the selection's counts from full needs
        need = _full_needs(nb_seq, hq, nb, last_only=False)
        counts = need.clone()
    else:
        skip = None if early is None else early.reshape(-1).to(torch.int32)
        need, counts = _launch_needs(
            q,
            k,
            cu_seqlens,
            order,
            batch,
            seq_len,
            cfg,
            scale,
            last_only=False,
            ranks=(sink_rank, diag_rank),
            skip=skip,
            counts=True,
            columns=columns,
        )
    budgets = needs_budgets(need, cfg.min_budget_blocks, nb_seq)
    if cu_seqlens is not None:
        full_seq = ((cu_seqlens[1:] - cu_seqlens[:-1]) <= cfg.dense_below_tokens)[:, None]
        budgets = torch.where(full_seq, nb_seq[:, None].to(torch.int32), budgets).contiguous()
    plan = BlockPlan(order, counts, budgets, cfg.block_size, seq_len)
    return dense_fallback(plan, hkv, cfg, nb_seq, early)


def needs_plan(q, k, scores, cfg: ProxyAttnConfig, scale: float, *, early=None, columns=None) -> BlockPlan:
    """The plan of budget rule 3 (with the dense fallback) from `[B, R, Nb, Nb]` scores: rankings, needs and
    counts in three launches (per chunk of query blocks) and a few device ops. early: bool `[B, Hkv]` groups
    decided dense before the scores (`api.early_dense_groups`), not measured. columns: int32 `[B, G, C]` vertical
    columns or None: their mass counts as held before any block (the plan does not carry them; `api` attaches)."""
    b, s = q.shape[0], q.shape[1]
    nb_seq = torch.full((b,), scores.shape[-1], device=q.device, dtype=torch.int64)
    return _plan(q, k, None, scores, b, s, cfg, scale, nb_seq, early, columns)


def needs_plan_varlen(q, k, cu_seqlens, max_seqlen: int, scores, cfg: ProxyAttnConfig, scale: float, *, early=None) -> BlockPlan:
    """`needs_plan` of a packed batch (q `[T, Hq, D]`, k `[T, Hkv, D]`); sequences of at most dense_below_tokens
    keep every causal block."""
    return _plan(q, k, cu_seqlens, scores, cu_seqlens.shape[0] - 1, max_seqlen, cfg, scale, seq_blocks(cu_seqlens, cfg.block_size), early)
