"""Head-max block scores on the GPU (Triton): `ProxyAttnConfig.estimator = "head_max"` (1).

The scores of `proxyattn.variants.head_max_scores`: for every query head, the causal softmax of its own strided
query rows (0, stride, 2*stride, ...) against its KV head's keys, max-pooled per (query block, key block), then the
max over the query heads of each proxy group. A block that any head of the group attends to strongly ranks high.

Layers: `_head_max_kernel` (jit) -> `_launch_head_max` (allocate, grid) -> `head_max_scores` /
`head_max_scores_varlen` (checks, shapes).

One program per (batch, query head, tile of QB query blocks), like the proxy score kernel
(`estimate_scores._proxy_scores_kernel`) but reading q and k in place (no pooled copies: a per-head copy of the
strided rows would cost Hq * S / stride * D elements): pass 1 keeps each row's online max and sum over the causal
key blocks, pass 2 recomputes the logits and folds, per key block, the max over the tile's rows of exp(logit -
lse) into the group's output with an atomic max (order-independent, so the result is deterministic). The output
starts at -inf, which is what stays above the diagonal and on rows past a sequence's end.

Cost: Hq / G times the proxy kernel's dot products at the same stride; a larger `stride` (16, 32) brings it back
towards the proxy estimator's.

Every function runs on the tensors' device: CUDA, or CPU tensors under `TRITON_INTERPRET=1` (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..config import ProxyAttnConfig
from .estimate_budgets import _budget_tile
from .estimate_common import _LOG2E, interpreting, qk_layout, tile_warps
from .estimate_scores import _online_max_sum, _seq_base, _seq_bounds, _tile_blocks

__all__ = ["head_max_scores", "head_max_scores_varlen"]


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _fold_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, ok_qb, QB: tl.constexpr, RPB: tl.constexpr):
    """out[m, n] = max(out[m, n], max over the rows of query block m of exp(max logit of key block n - lse))."""
    row_max = tl.max(s, axis=1)
    p = tl.where(row_ok & (row_max > float("-inf")), tl.exp2(row_max - lse), 0.0)
    blk_max = tl.max(tl.reshape(p, [QB, RPB]), axis=1)  # [QB]
    tl.atomic_max(out_base + offs_qb.to(tl.int64) * stride_om + n, blk_max, mask=ok_qb & (n <= offs_qb))


@triton.jit
def _head_max_kernel(
    q_ptr,
    k_ptr,
    cu_ptr,
    out_ptr,
    seq_len,
    nb_max,
    num_q_heads,
    qk_scale,
    stride_qb,
    stride_qt,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_kd,
    stride_ob,
    stride_og,
    stride_om,
    QPK: tl.constexpr,
    HPG: tl.constexpr,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    RPB: tl.constexpr,
    QB: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    BLOCK_M: tl.constexpr = QB * RPB
    n_tiles = tl.cdiv(nb_max, QB)
    tile = n_tiles - 1 - tl.program_id(0)  # heaviest tiles (most key blocks) first
    bh = tl.program_id(1)
    b = bh // num_q_heads
    h = bh % num_q_heads
    start, length = _seq_bounds(cu_ptr, b, seq_len, VARLEN)
    q_base = _seq_base(q_ptr, b, start, stride_qb, stride_qt, VARLEN)
    k_base = _seq_base(k_ptr, b, start, stride_kb, stride_kt, VARLEN)
    nb = tl.cdiv(length, BS)
    m0 = tile * QB

    offs_r = tl.arange(0, BLOCK_M)
    tpos = (m0 * RPB + offs_r) * STRIDE  # token position of each strided row
    row_ok = tpos < length
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM
    q = tl.load(
        q_base + h * stride_qh + tpos.to(tl.int64)[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    k_ptrs = k_base + (h // QPK) * stride_kh + offs_d[None, :] * stride_kd
    offs_n = tl.arange(0, BS)
    n_end = tl.minimum(m0 + QB, nb)  # key blocks any row of the tile can see
    n_full = tl.minimum(m0, n_end)  # left of the tile: no causal mask

    # Pass 1: online row max and sum, in log2 units.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n in range(0, n_full):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
        m_i, l_i = _online_max_sum(m_i, l_i, s)
    for n in range(n_full, n_end):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
        m_i, l_i = _online_max_sum(m_i, l_i, s)
    lse = m_i + tl.log2(tl.maximum(l_i, 1.0e-30))

    # Pass 2: per key block, max over each query block's rows of exp(max logit - lse), folded into the group's row.
    offs_qb = m0 + tl.arange(0, QB)
    out_base = out_ptr + b.to(tl.int64) * stride_ob + (h // HPG) * stride_og
    ok_qb = (offs_qb < nb) & (offs_qb < nb_max)
    for n in range(0, n_full):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, False, UPCAST, DOT_PREC)
        _fold_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, ok_qb, QB, RPB)
    for n in range(n_full, n_end):
        s = _budget_tile(q, k_ptrs, stride_kt, n, length, tpos, row_ok, offs_n, dmask, qk_scale, BS, True, UPCAST, DOT_PREC)
        _fold_block_max(s, lse, row_ok, out_base, offs_qb, stride_om, n, ok_qb, QB, RPB)


# ----------------------------------------------------------------------------------------------- launch
def _launch_head_max(q, k, cu_seqlens, batch: int, seq_len: int, cfg: ProxyAttnConfig, scale: float):
    """Scores `[B, G, Nb, Nb]` float32 of q/k in batched (`[B, S, H, D]`) or packed (`[T, H, D]`) layout."""
    varlen = cu_seqlens is not None
    hq, hkv, d, sq, sk = qk_layout(q, k, varlen)
    g, bs, st = cfg.proxy_heads, cfg.block_size, cfg.stride
    nb = triton.cdiv(seq_len, bs)
    out = torch.full((batch, g, nb, nb), float("-inf"), device=q.device, dtype=torch.float32)
    rpb = bs // st
    qb = _tile_blocks(bs, st)
    block_d = triton.next_power_of_2(d)
    num_warps = tile_warps(qb * rpb, block_d)
    grid = (triton.cdiv(nb, qb), batch * hq)
    _head_max_kernel[grid](
        q,
        k,
        cu_seqlens if varlen else q,
        out,
        seq_len,
        nb,
        hq,
        scale * _LOG2E,
        *sq,
        *sk,
        out.stride(0),
        out.stride(1),
        out.stride(2),
        QPK=hq // hkv,
        HPG=hq // g,
        STRIDE=st,
        BS=bs,
        RPB=rpb,
        QB=qb,
        HEAD_DIM=d,
        BLOCK_D=block_d,
        VARLEN=varlen,
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        DOT_PREC="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
        num_stages=2,
    )
    return out


# ----------------------------------------------------------------------------------------------- public
def head_max_scores(q, k, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """Head-max block scores `[B, G, Nb, Nb]` float32 (-inf above the diagonal), G = cfg.proxy_heads.

    Args:
        q: `[B, S, Hq, D]`, k: `[B, S, Hkv, D]` (fp16/bf16/fp32, any strides); G divides Hkv.
        scale: softmax scale.
    """
    b, s, _, _ = q.shape
    if k.shape[2] % cfg.proxy_heads:
        raise ValueError(f"proxy_heads={cfg.proxy_heads} must divide Hkv={k.shape[2]}")
    return _launch_head_max(q, k, None, b, s, cfg, scale)


def head_max_scores_varlen(q, k, cu_seqlens, max_seqlen: int, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """Head-max block scores of a packed batch: `[B, G, Nb, Nb]` float32, Nb = ceil(max_seqlen / block_size).

    Args:
        q: `[T, Hq, D]`, k: `[T, Hkv, D]`; sequence b holds tokens cu_seqlens[b] .. cu_seqlens[b+1]-1.
        cu_seqlens: int32 `[B+1]` on q's device; max_seqlen: host int >= every length.
    """
    if k.shape[1] % cfg.proxy_heads:
        raise ValueError(f"proxy_heads={cfg.proxy_heads} must divide Hkv={k.shape[1]}")
    return _launch_head_max(q, k, cu_seqlens, cu_seqlens.shape[0] - 1, max_seqlen, cfg, scale)
