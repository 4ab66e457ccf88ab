"""Vertical columns (Triton): the attention of key tokens outside a plan's kept blocks, merged into its output.

Layers: `_column_attn_kernel` (jit) -> `_launch_columns` (kept-block bitmap, column counts, grid) ->
`merge_columns` (checks, shapes).

The block-sparse kernel first writes each row's output and log-sum-exp over its kept blocks; program (b, h, m) here
starts its online softmax from that state (running max = lse, sum = 1, accumulator = output), walks the columns of
proxy row h // (Hq / G) at or before the query block's last row in tiles of `COLUMN_CONFIG['BLOCK_C']` tokens, gathering their
K/V rows by index (GQA: KV head h // (Hq / Hkv)), and masks a column that lies in the future of a query row or in a
key block the head keeps for that query block (so no key counts twice). It writes the merged output (and lse) in
place. A (head, query block) that keeps every causal block (e.g. a dense head) has nothing to add and returns at
once. Runs under `TRITON_INTERPRET=1` on CPU tensors (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..plan import BlockPlan
from .estimate_common import _LOG2E


@triton.jit
def _column_attn_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    cols_ptr,
    ncols_ptr,
    kept_ptr,
    counts_ptr,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_ob,
    stride_os,
    stride_oh,
    stride_lb,
    stride_lh,
    stride_cb,
    stride_cg,
    stride_nb,
    stride_ng,
    stride_kpb,
    stride_kph,
    stride_kpm,
    stride_tb,
    stride_th,
    seq_len,
    num_blocks,
    num_q_heads,
    qk_scale,  # softmax scale * log2(e)
    GROUP: tl.constexpr,  # query heads per KV head
    CGROUP: tl.constexpr,  # query heads per column row
    BLOCK_M: tl.constexpr,  # plan block size
    BLOCK_C: tl.constexpr,  # columns per tile
    HEAD_DIM: tl.constexpr,
):
    pid = tl.program_id(0)
    per_m = tl.num_programs(0) // num_blocks
    m = num_blocks - 1 - pid // per_m  # heaviest query blocks first
    rem = pid % per_m
    b = rem // num_q_heads
    h = rem % num_q_heads
    hkv = h // GROUP
    g = h // CGROUP

    n_cols = tl.load(ncols_ptr + b.to(tl.int64) * stride_nb + g * stride_ng + m)
    n_kept = tl.load(counts_ptr + b.to(tl.int64) * stride_tb + h * stride_th + m)
    if n_cols == 0 or n_kept >= m + 1:  # no column visible, or a full row: nothing to add
        return

    offs_m = m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + offs_m.to(tl.int64)[:, None] * stride_qs + h * stride_qh + offs_d[None, :]
    q = tl.load(q_rows, mask=row_ok[:, None], other=0.0)
    o_rows = o_ptr + b.to(tl.int64) * stride_ob + offs_m.to(tl.int64)[:, None] * stride_os + h * stride_oh + offs_d[None, :]
    acc = tl.load(o_rows, mask=row_ok[:, None], other=0.0).to(tl.float32)
    l_rows = lse_ptr + b.to(tl.int64) * stride_lb + h * stride_lh + offs_m
    lse0 = tl.load(l_rows, mask=row_ok, other=0.0)
    has = lse0 > float("-inf")
    m_i = tl.where(has, lse0 * 1.4426950408889634, -1.0e30)  # log2 domain; every causal row has a kept key
    l_i = tl.where(has, 1.0, 0.0)

    col_row = cols_ptr + b.to(tl.int64) * stride_cb + g * stride_cg
    kept_row = kept_ptr + b.to(tl.int64) * stride_kpb + h * stride_kph + m.to(tl.int64) * stride_kpm
    k_base = k_ptr + b.to(tl.int64) * stride_kb + hkv * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + hkv * stride_vh
    offs_c = tl.arange(0, BLOCK_C)
    for t in tl.range(0, tl.cdiv(n_cols, BLOCK_C)):
        c = t * BLOCK_C + offs_c
        in_list = c < n_cols
        idx = tl.load(col_row + c, mask=in_list, other=0)
        in_kept = tl.load(kept_row + idx // BLOCK_M, mask=in_list, other=1)
        use = in_list & (in_kept == 0)
        k = tl.load(k_base + idx.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=use[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        ok = use[None, :] & (idx[None, :] <= offs_m[:, None])
        qk = tl.where(ok, qk, -1.0e30)
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.where(ok, tl.math.exp2(qk - m_ij[:, None]), 0.0)
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_base + idx.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=use[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    lse = tl.where(has, (m_i + tl.math.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(l_rows, lse, mask=row_ok)


# The column kernel's launch: columns per tile, warps, pipeline stages (`_launch_columns`' config overrides them).
# benchmarks/column_configs.py's loop at 128K (Llama-3-8B shape, 2,624 columns), H100: 32 / 4 / 2 took 13.7 ms, the
# earlier 64 / 8 / 2 16.7 ms, 128 / 4 / 2 26.4 ms (docs/kernels.md).
COLUMN_CONFIG = dict(BLOCK_C=32, num_warps=4, num_stages=2)


def _launch_columns(q, k, v, out, lse, plan: BlockPlan, scale: float, config: dict | None = None) -> None:
    """Launch the column kernel over `out` / `lse` in place (shapes as `merge_columns`); `config` overrides
    `COLUMN_CONFIG` (benchmarks compare launches)."""
    bsz, s, hq, d = q.shape
    hkv = k.shape[2]
    nb = plan.num_blocks
    cols = plan.columns
    g = cols.shape[1]
    assert cols.dtype == torch.int32 and cols.stride(-1) == 1 and hq % g == 0 and hq % hkv == 0
    assert lse.shape == (bsz, hq, s) and lse.dtype == torch.float32 and lse.stride(-1) == 1
    ncols = plan.column_counts()  # [B, G, Nb], device op
    kept = plan.to_mask().view(torch.int8)  # [B, Hq, Nb, Nb]; 1 = the head keeps key block n for query block m
    counts = plan.counts
    grid = (bsz * hq * nb,)
    _column_attn_kernel[grid](
        q,
        k,
        v,
        out,
        lse,
        cols,
        ncols,
        kept,
        counts,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        lse.stride(0),
        lse.stride(1),
        cols.stride(0),
        cols.stride(1),
        ncols.stride(0),
        ncols.stride(1),
        kept.stride(0),
        kept.stride(1),
        kept.stride(2),
        counts.stride(0),
        counts.stride(1),
        s,
        nb,
        hq,
        scale * _LOG2E,
        GROUP=hq // hkv,
        CGROUP=hq // g,
        BLOCK_M=plan.block_size,
        HEAD_DIM=d,
        **{**COLUMN_CONFIG, **(config or {})},
    )


def merge_columns(q, k, v, out, lse, plan: BlockPlan, scale: float) -> None:
    """Add the plan's columns to the block-sparse result, in place.

    Args:
        q: `[B, S, Hq, D]`; k, v: `[B, S, Hkv, D]` (contiguous head dim; bf16 or fp16; D 64, 128 or 256).
        out: `[B, S, Hq, D]` in q.dtype and lse `[B, Hq, S]` float32 (natural log): the block-sparse kernel's result
            over the plan's kept blocks (`block_sparse_attention_with_lse`); overwritten with the result over kept
            blocks and columns.
        plan: a `BlockPlan` whose `columns` is int32 `[B, G, C]`, each row ascending.
        scale: softmax scale.
    """
    assert plan.columns is not None
    if q.shape[1] == 0:
        return
    _launch_columns(q, k, v, out, lse, plan, scale)
