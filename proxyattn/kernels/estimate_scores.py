"""Proxy block scores on the GPU (Triton): pooled proxy heads, then causal softmax statistics and max-pool.

Layers: `_pool_heads_kernel`, `_proxy_rows_kernel` (or `_proxy_rows_excl_kernel`, vertical columns left out of the
max-pool) + `_scores_from_rows_kernel` and `_proxy_scores_kernel` (jit) ->
`_launch_pool` / `_launch_scores` (allocate, grid) -> `proxy_scores` / `proxy_scores_varlen` (checks, shapes).

1. Pooling. The proxy query of group g on token t is the mean of the group's query heads, its proxy key the mean
   of the group's KV heads (fp32 sums). Only the strided query rows are pooled. Proxies are stored in float16:
   an 11-bit mantissa, the precision of a tf32 product, at the fp16 tensor-core rate (|values| must stay below
   65504, true of attention activations). Layout: `[G, rows, D]` with sequence b's rows starting at
   `tok0_b // step + b` (tok0_b its first packed token; step = stride for queries, 1 for keys), which fits
   every sequence of a packed batch in `T // step + B` rows without a host-side prefix sum.
2. Scores, one sweep over the keys. `_proxy_rows_kernel`: one program per (batch, group, tile of QB query blocks)
   streams its strided proxy rows (BLOCK_M = QB * block_size / stride rows) over the causal key blocks once,
   keeping each row's online max and sum (log-sum-exp) and writing each row's max logit per key block to a scratch
   `[B*G, Nb, rows of the chunk]` (tiles are processed in chunks whose scratch stays within 256 MiB: one chunk
   holds a 128K-token sequence at stride 4). `_scores_from_rows_kernel` then writes, per (query block m, key block
   n), the max over m's rows of exp(row max logit - row lse): the exponential is taken once per row and key block.
   Every element of the output is written (-inf above the diagonal and on rows past a sequence's end).
   `_proxy_scores_kernel` is the older form with two sweeps (the second recomputes the logits instead of reading
   the row maxima): the same scores, kept for the TensorRT plugin (one kernel per plugin) and the speed comparison.

Every function runs on the tensors' device: CUDA, or CPU tensors under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from .estimate_common import _LOG2E, _SMEM_BUDGET, tile_warps

__all__ = ["proxy_scores", "proxy_scores_varlen", "pool_proxies"]

# Row maxima of one chunk of query tiles in the one-sweep scores (`_proxy_rows_kernel`): 256 MiB holds a whole
# 128K-token sequence at stride 4 with one proxy group ([1, 1024, 32768] float32 = 128 MiB); longer ones chunk.
_ROWS_SCRATCH_BYTES = 256 * 1024**2
_ROWS_BLOCK_C = 64  # key blocks per program of `_scores_from_rows_kernel` (and of the -inf fill of the two sweeps)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _seq_bounds(cu_ptr, b, seq_len, VARLEN: tl.constexpr):
    """(first packed token, length) of sequence b."""
    if VARLEN:
        start = tl.load(cu_ptr + b)
        length = tl.load(cu_ptr + b + 1) - start
    else:
        start = b * seq_len
        length = seq_len
    return start, length


@triton.jit
def _seq_base(ptr, b, start, stride_b, stride_t, VARLEN: tl.constexpr):
    """Pointer to sequence b's first token: packed rows from `start` (VARLEN) or batch entry b."""
    if VARLEN:
        base = ptr + start.to(tl.int64) * stride_t
    else:
        base = ptr + b.to(tl.int64) * stride_b
    return base


@triton.jit
def _online_max_sum(m_i, l_i, s):
    """One key tile of an online softmax (log2 units): the rows' running max and rescaled sum after the logits s."""
    return _online_update(m_i, l_i, s, tl.max(s, axis=1))


@triton.jit
def _online_update(m_i, l_i, s, s_max):
    """`_online_max_sum` with the tile's row maxima s_max already taken."""
    m_new = tl.maximum(m_i, s_max)
    l_new = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), axis=1)
    return m_new, l_new


@triton.jit
def _pool_heads_kernel(
    x_ptr,
    out_ptr,
    cu_ptr,
    seq_len,
    stride_xb,
    stride_xt,
    stride_xh,
    stride_xd,
    stride_og,
    stride_or,
    HPG: tl.constexpr,
    STEP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
    VARLEN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    x_base = _seq_base(x_ptr, b, start, stride_xb, stride_xt, VARLEN)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    tpos = rows * STEP
    ok = tpos < length
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    ptrs = x_base + tpos.to(tl.int64)[:, None] * stride_xt + offs_d[None, :] * stride_xd
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for j in range(0, HPG):
        h = g * HPG + j
        acc += tl.load(ptrs + h * stride_xh, mask=ok[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    acc = acc / HPG
    out_rows = (start // STEP + b + rows).to(tl.int64)
    out_ptrs = out_ptr + g * stride_og + out_rows[:, None] * stride_or + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok[:, None] & dmask[None, :])


@triton.jit
def _score_tile(q, k_base, stride_kr, n, length, tpos, offs_n, offs_d, dmask, qk_scale, BS: tl.constexpr, MASKED: tl.constexpr):
    """Logits (log2 units) of the tile's rows against key block n; MASKED applies causality and the sequence end."""
    kpos = n * BS + offs_n
    ptrs = k_base + kpos.to(tl.int64)[:, None] * stride_kr + offs_d[None, :]
    if MASKED:
        k = tl.load(ptrs, mask=(kpos < length)[:, None] & dmask[None, :], other=0.0)
    else:
        k = tl.load(ptrs, mask=dmask[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if MASKED:
        s = tl.where(kpos[None, :] <= tpos[:, None], s, float("-inf"))
    return s


@triton.jit
def _store_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, qb_ok, row_store, QB: tl.constexpr, RPB: tl.constexpr):
    row_max = tl.max(s, axis=1)
    p = tl.where(row_ok & (row_max > float("-inf")), tl.exp2(row_max - lse), 0.0)  # [BLOCK_M]
    blk_max = tl.max(tl.reshape(p, [QB, RPB]), axis=1)  # [QB]
    val = tl.where((n <= offs_qb) & qb_ok, blk_max, float("-inf"))
    tl.store(out_base + offs_qb.to(tl.int64) * stride_om + n, val, mask=row_store)


@triton.jit
def _tile_rows(
    pq_ptr,
    pk_ptr,
    cu_ptr,
    seq_len,
    b,
    g,
    m0,
    stride_pqg,
    stride_pqr,
    stride_pkg,
    stride_pkr,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """A program's tile of the scores kernels: the strided proxy rows of query blocks m0 .. m0 + QB - 1 of sequence b,
    group g (loaded, `[QB * RPB, BLOCK_D]`), its keys' base pointer, the sequence's length and block count, and the
    key blocks it sweeps: [0, n_full) left of the tile (no causal mask), [n_full, n_end) on its diagonal."""
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    nb = tl.cdiv(length, BS)
    offs_r = tl.arange(0, QB * RPB)
    tpos = (m0 * RPB + offs_r) * STRIDE  # token position of each strided row
    row_ok = tpos < length
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q_rows = (start // STRIDE + b + m0 * RPB + offs_r).to(tl.int64)
    q = tl.load(pq_ptr + g * stride_pqg + q_rows[:, None] * stride_pqr + offs_d[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
    k_base = pk_ptr + g * stride_pkg + (start + b).to(tl.int64) * stride_pkr
    offs_n = tl.arange(0, BS)
    n_end = tl.minimum(m0 + QB, nb)  # key blocks any row of the tile can see
    n_full = tl.minimum(m0, n_end)
    return q, k_base, length, nb, tpos, row_ok, offs_r, offs_n, offs_d, dmask, n_full, n_end


@triton.jit
def _proxy_scores_kernel(
    pq_ptr,
    pk_ptr,
    cu_ptr,
    out_ptr,
    seq_len,
    nb_max,
    num_groups,
    qk_scale,
    stride_pqg,
    stride_pqr,
    stride_pkg,
    stride_pkr,
    stride_ob,
    stride_og,
    stride_om,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VARLEN: tl.constexpr,
):
    BLOCK_M: tl.constexpr = QB * RPB
    n_tiles = tl.cdiv(nb_max, QB)
    tile = n_tiles - 1 - tl.program_id(0)  # heaviest tiles (most key blocks) first
    bg = tl.program_id(1)
    b = bg // num_groups
    g = bg % num_groups
    m0 = tile * QB
    q, k_base, length, nb, tpos, row_ok, offs_r, offs_n, offs_d, dmask, n_full, n_end = _tile_rows(
        pq_ptr,
        pk_ptr,
        cu_ptr,
        seq_len,
        b,
        g,
        m0,
        stride_pqg,
        stride_pqr,
        stride_pkg,
        stride_pkr,
        STRIDE,
        BS,
        RPB,
        QB,
        HEAD_DIM,
        BLOCK_D,
        VARLEN,
    )

    # Pass 1: online row max and sum, in log2 units. Key blocks left of the tile need no causal mask.
    lse = _rows_sweep(
        q, k_base, stride_pkr, length, tpos, offs_n, offs_d, dmask, qk_scale, n_full, n_end, pq_ptr, 0, pq_ptr, BS, BLOCK_M, False, False
    )

    # Pass 2: per key block, max over the tile's rows of each query block of exp(max logit - lse):
    # the exponential is taken once per row, after the max over the block's keys.
    offs_qb = m0 + tl.arange(0, QB)
    out_base = out_ptr + b.to(tl.int64) * stride_ob + g * stride_og
    row_store = offs_qb < nb_max
    qb_ok = offs_qb < nb
    for n in range(0, n_full):
        s = _score_tile(q, k_base, stride_pkr, n, length, tpos, offs_n, offs_d, dmask, qk_scale, BS, False)
        _store_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, qb_ok, row_store, QB, RPB)
    for n in range(n_full, n_end):
        s = _score_tile(q, k_base, stride_pkr, n, length, tpos, offs_n, offs_d, dmask, qk_scale, BS, True)
        _store_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, qb_ok, row_store, QB, RPB)
    # Everything right of the visited key blocks is above the diagonal (or past the sequence): -inf.
    offs_c = tl.arange(0, BLOCK_C)
    neg = tl.full([QB, BLOCK_C], float("-inf"), dtype=tl.float32)
    for c0 in range(n_end, nb_max, BLOCK_C):
        cols = c0 + offs_c
        ptrs = out_base + offs_qb.to(tl.int64)[:, None] * stride_om + cols[None, :]
        tl.store(ptrs, neg, mask=row_store[:, None] & (cols < nb_max)[None, :])


@triton.jit
def _proxy_rows_program(
    pq_ptr,
    pk_ptr,
    cu_ptr,
    rmax_ptr,
    lse_ptr,
    seq_len,
    nb_max,
    num_groups,
    qk_scale,
    stride_pqg,
    stride_pqr,
    stride_pkg,
    stride_pkr,
    tile_lo,
    chunk_rows,
    excl_ptr,
    stride_eb,
    stride_eg,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    EXCLUDE: tl.constexpr,
):
    """`_proxy_rows_kernel`'s program, with the columns' exclusion of `_proxy_rows_excl_kernel`. The scores' one sweep
    over the keys (`_scores_from_rows_kernel` finishes them): the program's strided proxy
    rows (tile tile_lo + pid, QB query blocks) against the causal key blocks, writing each row's max logit per key
    block, rmax `[B*G, nb_max, chunk_rows]` (log2 units, -inf where the row sees none of the block), and each row's
    log-sum-exp, lse `[B*G, chunk_rows]`; row i of the chunk is strided row tile_lo * QB * RPB + i. EXCLUDE: the
    keys flagged in excl `[B, G, S]` int8 (batched layout only) are left out of the row maxima (vertical columns)."""
    BLOCK_M: tl.constexpr = QB * RPB
    slot = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest tiles (most key blocks) first
    tile = tile_lo + slot
    bg = tl.program_id(1)
    b = bg // num_groups
    g = bg % num_groups
    m0 = tile * QB
    q, k_base, length, nb, tpos, row_ok, offs_r, offs_n, offs_d, dmask, n_full, n_end = _tile_rows(
        pq_ptr,
        pk_ptr,
        cu_ptr,
        seq_len,
        b,
        g,
        m0,
        stride_pqg,
        stride_pqr,
        stride_pkg,
        stride_pkr,
        STRIDE,
        BS,
        RPB,
        QB,
        HEAD_DIM,
        BLOCK_D,
        VARLEN,
    )
    row_at = rmax_ptr + bg.to(tl.int64) * nb_max * chunk_rows + slot * BLOCK_M + offs_r  # + n * chunk_rows
    excl_base = excl_ptr + b.to(tl.int64) * stride_eb + g * stride_eg
    lse = _rows_sweep(
        q,
        k_base,
        stride_pkr,
        length,
        tpos,
        offs_n,
        offs_d,
        dmask,
        qk_scale,
        n_full,
        n_end,
        row_at,
        chunk_rows,
        excl_base,
        BS,
        BLOCK_M,
        True,
        EXCLUDE,
    )
    tl.store(lse_ptr + bg.to(tl.int64) * chunk_rows + slot * BLOCK_M + offs_r, lse)


@triton.jit
def _proxy_rows_kernel(
    pq_ptr,
    pk_ptr,
    cu_ptr,
    rmax_ptr,
    lse_ptr,
    seq_len,
    nb_max,
    num_groups,
    qk_scale,
    stride_pqg,
    stride_pqr,
    stride_pkg,
    stride_pkr,
    tile_lo,
    chunk_rows,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """The scores' one sweep over the keys (`_proxy_rows_program`): each row's max logit per key block and its
    log-sum-exp. The TensorRT-free C library compiles this kernel ahead of time (cpp/tools/generate_kernels.py)."""
    _proxy_rows_program(
        pq_ptr,
        pk_ptr,
        cu_ptr,
        rmax_ptr,
        lse_ptr,
        seq_len,
        nb_max,
        num_groups,
        qk_scale,
        stride_pqg,
        stride_pqr,
        stride_pkg,
        stride_pkr,
        tile_lo,
        chunk_rows,
        pq_ptr,
        0,
        0,
        STRIDE,
        BS,
        RPB,
        QB,
        HEAD_DIM,
        BLOCK_D,
        VARLEN,
        False,
    )


@triton.jit
def _proxy_rows_excl_kernel(
    pq_ptr,
    pk_ptr,
    cu_ptr,
    rmax_ptr,
    lse_ptr,
    seq_len,
    nb_max,
    num_groups,
    qk_scale,
    stride_pqg,
    stride_pqr,
    stride_pkg,
    stride_pkr,
    tile_lo,
    chunk_rows,
    excl_ptr,
    stride_eb,
    stride_eg,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """`_proxy_rows_kernel` with the keys flagged in excl `[B, G, S]` int8 left out of the row maxima (vertical
    columns; batched layout)."""
    _proxy_rows_program(
        pq_ptr,
        pk_ptr,
        cu_ptr,
        rmax_ptr,
        lse_ptr,
        seq_len,
        nb_max,
        num_groups,
        qk_scale,
        stride_pqg,
        stride_pqr,
        stride_pkg,
        stride_pkr,
        tile_lo,
        chunk_rows,
        excl_ptr,
        stride_eb,
        stride_eg,
        STRIDE,
        BS,
        RPB,
        QB,
        HEAD_DIM,
        BLOCK_D,
        VARLEN,
        True,
    )


@triton.jit
def _rows_sweep(
    q,
    k_base,
    stride_kr,
    length,
    tpos,
    offs_n,
    offs_d,
    dmask,
    qk_scale,
    n_full,
    n_end,
    rmax_at,
    row_stride,
    excl_base,
    BS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    STORE: tl.constexpr,
    EXCLUDE: tl.constexpr,
):
    """The tile's rows against key blocks 0 .. n_end - 1 (masked from n_full on): their log-sum-exp (log2 units); with
    STORE each row's max logit of key block n is written at rmax_at + n * row_stride. With EXCLUDE the keys flagged
    (int8, non-zero) at excl_base + key position are left out of that max (-inf when all are), not out of the lse."""
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n in range(0, n_full):
        s = _score_tile(q, k_base, stride_kr, n, length, tpos, offs_n, offs_d, dmask, qk_scale, BS, False)
        s_max = tl.max(s, axis=1)
        if STORE:
            tl.store(rmax_at + n * row_stride, _kept_max(s, s_max, excl_base, n, length, offs_n, BS, EXCLUDE))
        m_i, l_i = _online_update(m_i, l_i, s, s_max)
    for n in range(n_full, n_end):
        s = _score_tile(q, k_base, stride_kr, n, length, tpos, offs_n, offs_d, dmask, qk_scale, BS, True)
        s_max = tl.max(s, axis=1)
        if STORE:
            tl.store(rmax_at + n * row_stride, _kept_max(s, s_max, excl_base, n, length, offs_n, BS, EXCLUDE))
        m_i, l_i = _online_update(m_i, l_i, s, s_max)
    return m_i + tl.log2(tl.maximum(l_i, 1.0e-30))


@triton.jit
def _kept_max(s, s_max, excl_base, n, length, offs_n, BS: tl.constexpr, EXCLUDE: tl.constexpr):
    """Each row's max logit of key block n over the keys not excluded (s_max itself without EXCLUDE)."""
    if EXCLUDE:
        kpos = n * BS + offs_n
        ex = tl.load(excl_base + kpos, mask=kpos < length, other=0)
        return tl.max(tl.where(ex[None, :] != 0, float("-inf"), s), axis=1)
    return s_max


@triton.jit
def _scores_from_rows_kernel(
    rmax_ptr,
    lse_ptr,
    cu_ptr,
    out_ptr,
    seq_len,
    nb_max,
    num_groups,
    stride_ob,
    stride_og,
    stride_om,
    m_lo,
    chunk_rows,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    BLOCK_C: tl.constexpr,
    VARLEN: tl.constexpr,
):
    """Scores of query block m_lo + pid (`_proxy_rows_kernel`'s chunk starting at query block m_lo), BLOCK_C key
    blocks per program: max over the block's strided rows of exp2(row max logit - row lse); -inf above the diagonal,
    past the sequence's end and on query blocks past it. The same values as `_proxy_scores_kernel`'s second sweep."""
    m = m_lo + tl.program_id(0)
    bg = tl.program_id(1)
    c = tl.program_id(2)
    b = bg // num_groups
    g = bg % num_groups
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    nb = tl.cdiv(length, BS)
    offs_r = tl.arange(0, RPB)
    row_ok = (m * RPB + offs_r) * STRIDE < length
    slot_rows = (m - m_lo) * RPB + offs_r
    lse = tl.load(lse_ptr + bg.to(tl.int64) * chunk_rows + slot_rows)
    cols = c * BLOCK_C + tl.arange(0, BLOCK_C)
    see = (cols <= m) & (m < nb)
    at = rmax_ptr + bg.to(tl.int64) * nb_max * chunk_rows + cols.to(tl.int64)[:, None] * chunk_rows + slot_rows[None, :]
    rm = tl.load(at, mask=see[:, None] & row_ok[None, :], other=float("-inf"))  # [BLOCK_C, RPB]
    p = tl.where(row_ok[None, :] & (rm > float("-inf")), tl.exp2(rm - lse[None, :]), 0.0)
    val = tl.where(see, tl.max(p, axis=1), float("-inf"))
    out_row = out_ptr + b.to(tl.int64) * stride_ob + g * stride_og + m.to(tl.int64) * stride_om
    tl.store(out_row + cols, val, mask=cols < nb_max)


# ----------------------------------------------------------------------------------------------- launch
def _pool_rows(total_tokens: int, batch: int, step: int) -> int:
    return total_tokens // step + batch


def _launch_pool(x, cu_seqlens, batch: int, seq_len: int, groups: int, step: int, out=None):
    """Pooled heads of x (`[B, S, H, D]`, or `[T, H, D]` with cu_seqlens): float16 `[G, T // step + B, D]`."""
    varlen = cu_seqlens is not None
    if varlen:
        total, heads, d = x.shape
        sxb, (sxt, sxh, sxd) = 0, x.stride()
    else:
        _, _, heads, d = x.shape
        total = batch * seq_len
        sxb, sxt, sxh, sxd = x.stride()
    rows = _pool_rows(total, batch, step)
    if out is None:
        out = torch.empty(groups, rows, d, device=x.device, dtype=torch.float16)
    assert out.shape == (groups, rows, d) and out.stride(-1) == 1, (out.shape, groups, rows, d)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(64, 8192 // block_d))
    grid = (triton.cdiv(triton.cdiv(seq_len, step), block_t), batch, groups)
    _pool_heads_kernel[grid](
        x,
        out,
        cu_seqlens if varlen else x,
        seq_len,
        sxb,
        sxt,
        sxh,
        sxd,
        out.stride(0),
        out.stride(1),
        HPG=heads // groups,
        STEP=step,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        BLOCK_T=block_t,
        VARLEN=varlen,
        num_warps=4,
    )
    return out


def _tile_blocks(block_size: int, stride: int) -> int:
    """Query blocks per scores program: enough strided rows (>= 64) for a tensor-core tile."""
    rpb = block_size // stride
    return max(1, 64 // rpb)


def _launch_scores(
    q,
    k,
    cu_seqlens,
    batch: int,
    seq_len: int,
    cfg: ProxyAttnConfig,
    scale: float,
    *,
    out=None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    qb: int | None = None,
    one_pass: bool = True,
    scratch_bytes: int = _ROWS_SCRATCH_BYTES,
    exclude: torch.Tensor | None = None,
):
    """Scores `[B, G, Nb, Nb]` float32 of q/k in batched (`[B, S, H, D]`) or packed (`[T, H, D]`) layout.

    seq_len is S (batched) or max_seqlen (packed); Nb = ceil(seq_len / block_size). One sweep over the keys
    (`_proxy_rows_kernel` + `_scores_from_rows_kernel`, per chunk of query tiles whose row maxima fit scratch_bytes);
    `one_pass=False` runs `_proxy_scores_kernel`'s two sweeps instead (the TensorRT plugin's kernel; the same
    scores), which benchmarks/profile_plan.py --sweep-scores times beside it. exclude: bool `[B, G, S]` keys left
    out of the max-pool (batched layout, one pass only).
    """
    assert exclude is None or (cu_seqlens is None and one_pass and exclude.shape == (batch, cfg.proxy_heads, seq_len))
    excl = exclude.view(torch.int8) if exclude is not None else None
    g, bs, st = cfg.proxy_heads, cfg.block_size, cfg.stride
    varlen = cu_seqlens is not None
    d = q.shape[-1]
    nb = triton.cdiv(seq_len, bs)
    pq = _launch_pool(q, cu_seqlens, batch, seq_len, g, st)
    pk = _launch_pool(k, cu_seqlens, batch, seq_len, g, 1)
    if out is None:
        out = torch.empty(batch, g, nb, nb, device=q.device, dtype=torch.float32)
    assert out.shape == (batch, g, nb, nb) and out.dtype == torch.float32 and out.stride(-1) == 1
    rpb = bs // st
    qb = qb or _tile_blocks(bs, st)
    block_d = triton.next_power_of_2(d)
    if num_warps is None:
        num_warps = tile_warps(qb * rpb, block_d)
    cu = cu_seqlens if varlen else pq
    n_tiles = triton.cdiv(nb, qb)
    if num_stages is None:
        num_stages = rows_stages(qb * rpb, block_d, bs, pk.element_size()) if one_pass else 2
    common = dict(STRIDE=st, BS=bs, RPB=rpb, num_warps=num_warps, num_stages=num_stages)
    if not one_pass:
        _proxy_scores_kernel[(n_tiles, batch * g)](
            pq,
            pk,
            cu,
            out,
            seq_len,
            nb,
            g,
            scale * _LOG2E,
            pq.stride(0),
            pq.stride(1),
            pk.stride(0),
            pk.stride(1),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            QB=qb,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            BLOCK_C=_ROWS_BLOCK_C,
            VARLEN=varlen,
            **common,
        )
        return out
    tiles = rows_chunk_tiles(batch * g, nb, qb * rpb, n_tiles, scratch_bytes)
    chunk_rows = tiles * qb * rpb
    rmax = torch.empty(batch * g, nb, chunk_rows, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch * g, chunk_rows, device=q.device, dtype=torch.float32)
    for tile_lo in reversed(range(0, n_tiles, tiles)):  # the heaviest chunk first
        n_chunk = min(tiles, n_tiles - tile_lo)
        args = (pq, pk, cu, rmax, lse, seq_len, nb, g, scale * _LOG2E, pq.stride(0), pq.stride(1), pk.stride(0), pk.stride(1))
        meta = dict(QB=qb, HEAD_DIM=d, BLOCK_D=block_d, VARLEN=varlen, **common)
        if excl is None:
            _proxy_rows_kernel[(n_chunk, batch * g)](*args, tile_lo, chunk_rows, **meta)
        else:
            _proxy_rows_excl_kernel[(n_chunk, batch * g)](*args, tile_lo, chunk_rows, excl, excl.stride(0), excl.stride(1), **meta)
        m_lo = tile_lo * qb
        _scores_from_rows_kernel[(min(n_chunk * qb, nb - m_lo), batch * g, triton.cdiv(nb, _ROWS_BLOCK_C))](
            rmax,
            lse,
            cu,
            out,
            seq_len,
            nb,
            g,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            m_lo,
            chunk_rows,
            STRIDE=st,
            BS=bs,
            RPB=rpb,
            BLOCK_C=_ROWS_BLOCK_C,
            VARLEN=varlen,
            num_warps=4,
        )
    return out


def rows_stages(rows: int, block_d: int, block_size: int, elt: int = 2) -> int:
    """Pipeline stages of `_proxy_rows_kernel`: 3 (two K tiles load ahead) when a program's strided query rows and
    three K tiles fit in shared memory, else 2. H100, 128K tokens, Llama-3-8B shape (64 rows, D 128): 1.60 ms against
    2.18 ms with 2 stages, the same scores (benchmarks/profile_plan.py --sweep-scores)."""
    return 3 if (rows + 3 * block_size) * block_d * elt <= _SMEM_BUDGET else 2


def rows_chunk_tiles(groups: int, nb: int, tile_rows: int, n_tiles: int, scratch_bytes: int = _ROWS_SCRATCH_BYTES) -> int:
    """Query tiles per chunk of the one-sweep scores: as many as keep the row maxima `[groups, nb, tiles x
    tile_rows]` float32 within scratch_bytes, at least one, at most all n_tiles."""
    return max(1, min(n_tiles, scratch_bytes // (groups * nb * tile_rows * 4)))


def pool_proxies(q, k, cfg: ProxyAttnConfig):
    """Pooled proxies of batched q `[B, S, Hq, D]`, k `[B, S, Hkv, D]` (for tests): float16
    (pq `[G, B*S // stride + B, D]`, pk `[G, B*S + B, D]`), layout as in the module docstring."""
    b, s = q.shape[:2]
    return (_launch_pool(q, None, b, s, cfg.proxy_heads, cfg.stride), _launch_pool(k, None, b, s, cfg.proxy_heads, 1))


# ----------------------------------------------------------------------------------------------- public
def proxy_scores(q, k, cfg: ProxyAttnConfig, scale: float, *, out=None, exclude=None) -> torch.Tensor:
    """Proxy block scores `[B, G, Nb, Nb]` float32 (-inf above the diagonal), G = cfg.proxy_heads.

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]` (fp16/bf16/fp32, any strides); Hkv divisible by G.
        scale: softmax scale. out: optional float32 `[B, G, Nb, Nb]` to write into (every element is written).
        exclude: optional bool `[B, G, S]`, contiguous: keys left out of the max-pool (vertical columns; the softmax
            still covers them), as `reference.proxy_scores`.
    """
    b, s, hq, d = q.shape
    if k.shape[2] % cfg.proxy_heads:
        raise ValueError(f"proxy_heads={cfg.proxy_heads} must divide Hkv={k.shape[2]}")
    if exclude is not None:
        exclude = exclude.contiguous()
    return _launch_scores(q, k, None, b, s, cfg, scale, out=out, exclude=exclude)


def proxy_scores_varlen(q, k, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig, scale: float, *, out=None) -> torch.Tensor:
    """Proxy block scores of a packed batch: `[B, G, Nb, Nb]` float32, Nb = ceil(max_seqlen / block_size).

    Args:
        q: `[T, Hq, D]`, k: `[T, Hkv, D]`; sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]-1.
        cu_seqlens: int32 `[B+1]` on q's device; max_seqlen: host int >= every length (not checked on device).
    Row b covers sequence b; its query blocks past the sequence's end hold -inf.
    """
    if k.shape[1] % cfg.proxy_heads:
        raise ValueError(f"proxy_heads={cfg.proxy_heads} must divide Hkv={k.shape[1]}")
    return _launch_scores(q, k, cu_seqlens, cu_seqlens.shape[0] - 1, max_seqlen, cfg, scale, out=out)
