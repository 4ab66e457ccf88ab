"""AOT entry kernels for the TensorRT plugins: thin @triton.jit wrappers around the project's Triton kernels.

TensorRT's AOT launcher calls a kernel with (input pointers..., extra int32 scalars..., output pointers...) and
nothing else; floats must be compile-time constants. The kernels in `proxyattn.kernels` take strides, dummy
pointers and a float scale in their own order, so each plugin gets a wrapper in that calling convention that
computes the strides of TensorRT's dense row-major `[B, H, S, D]` tensors from the shape scalars and calls the
project kernel (inlined by Triton). The wrappers add no arithmetic beyond strides: the kernels are the ones the
GPU tests of `proxyattn.kernels` check.
"""

from __future__ import annotations

import triton
import triton.language as tl

from proxyattn.kernels.attention import _sparse_attn_fwd_kernel
from proxyattn.kernels.estimate_budgets import _budget_kernel
from proxyattn.kernels.estimate_needs import _cut_kernel, _mass_kernel
from proxyattn.kernels.estimate_rank import _rank_kernel
from proxyattn.kernels.estimate_scores import _pool_heads_kernel, _proxy_scores_kernel

__all__ = [
    "trt_pool",
    "trt_scores",
    "trt_mass_stats",
    "trt_mass",
    "trt_rank",
    "trt_needs_mass",
    "trt_needs_cut",
    "trt_sparse_attention",
    "WRAPPERS",
]


@triton.jit
def trt_pool(
    x_ptr,
    seq_len,
    batch,
    out_ptr,
    H: tl.constexpr,
    G: tl.constexpr,
    STEP: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """x `[B, H, S, D]` -> out float16 `[G, B*S // STEP + B, D]` (grid: cdiv(cdiv(S, STEP), BLOCK_T), B, G)."""
    rows = (batch * seq_len) // STEP + batch
    _pool_heads_kernel(
        x_ptr,
        out_ptr,
        x_ptr,
        seq_len,
        H * seq_len * D,
        D,
        seq_len * D,
        1,
        rows * D,
        D,
        HPG=H // G,
        STEP=STEP,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_T=BLOCK_T,
        VARLEN=False,
    )


@triton.jit
def trt_scores(
    q_ptr,
    pq_ptr,
    pk_ptr,
    seq_len,
    batch,
    out_ptr,
    G: tl.constexpr,
    STRIDE: tl.constexpr,
    BS: tl.constexpr,
    QB: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_SCALE: tl.constexpr,
):
    """pq `[G, B*S//STRIDE + B, D]`, pk `[G, B*S + B, D]` -> scores float32 `[B, G, Nb, Nb]` (grid: cdiv(Nb, QB), B*G).

    q `[B, Hq, S, D]` is not read: it is an input so that TensorRT can derive B and S (the extra scalars) from it."""
    nb = tl.cdiv(seq_len, BS)
    rows_q = (batch * seq_len) // STRIDE + batch
    rows_k = batch * seq_len + batch
    _proxy_scores_kernel(
        pq_ptr,
        pk_ptr,
        pq_ptr,
        out_ptr,
        seq_len,
        nb,
        G,
        QK_SCALE,
        rows_q * D,
        D,
        rows_k * D,
        D,
        G * nb * nb,
        nb * nb,
        nb,
        STRIDE=STRIDE,
        BS=BS,
        RPB=BS // STRIDE,
        QB=QB,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        BLOCK_C=64,
        VARLEN=False,
    )


@triton.jit
def trt_mass_stats(
    q_ptr,
    k_ptr,
    seq_len,
    mstat_ptr,
    lstat_ptr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    CB: tl.constexpr,
    NCHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    QK_SCALE: tl.constexpr,
):
    """Pass 0 of the budget estimate: per-chunk row max / sum `[B*Hq, NCHUNK, BS]` float32 (grid: B*Hq, NCHUNK)."""
    nb = tl.cdiv(seq_len, BS)
    _budget_kernel(
        q_ptr,
        k_ptr,
        q_ptr,
        mstat_ptr,
        lstat_ptr,
        mstat_ptr,
        mstat_ptr,
        seq_len,
        nb,
        HQ,
        QK_SCALE,
        HQ * seq_len * D,
        D,
        seq_len * D,
        1,
        HKV * seq_len * D,
        D,
        seq_len * D,
        1,
        GROUP=HQ // HKV,
        NCHUNK=NCHUNK,
        CB=CB,
        BS=BS,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        VARLEN=False,
        PASS=0,
        DOT_PREC=DOT_PREC,
        UPCAST=False,
        ROWS=False,
    )


@triton.jit
def trt_mass(
    q_ptr,
    k_ptr,
    lse_ptr,
    seq_len,
    mass_ptr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    CB: tl.constexpr,
    NCHUNK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    QK_SCALE: tl.constexpr,
    ROWS: tl.constexpr,
):
    """Pass 1: attention mass per key block of each head's last query block, float32 `[B, Hq, Nb]` (ProxyMass), or
    with ROWS of every row of that block, `[B, Hq, BS, Nb]`, rows past a sequence shorter than one block 0
    (ProxyRowMass, budget_rule "row_recall") (grid: B*Hq, NCHUNK)."""
    nb = tl.cdiv(seq_len, BS)
    _budget_kernel(
        q_ptr,
        k_ptr,
        q_ptr,
        lse_ptr,
        lse_ptr,
        lse_ptr,
        mass_ptr,
        seq_len,
        nb,
        HQ,
        QK_SCALE,
        HQ * seq_len * D,
        D,
        seq_len * D,
        1,
        HKV * seq_len * D,
        D,
        seq_len * D,
        1,
        GROUP=HQ // HKV,
        NCHUNK=NCHUNK,
        CB=CB,
        BS=BS,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        VARLEN=False,
        PASS=1,
        DOT_PREC=DOT_PREC,
        UPCAST=False,
        ROWS=ROWS,
    )


@triton.jit
def trt_rank(
    scores_ptr, nb, order_ptr, rank_ptr, sink_ptr, diag_ptr, KEEP_SINK: tl.constexpr, KEEP_DIAG: tl.constexpr, BLOCK: tl.constexpr
):
    """scores float32 `[B, G, Nb, Nb]` -> order, rank int32 `[B, G, Nb, Nb]`, sink_rank, diag_rank int32 `[B, G, Nb]`
    (`estimate_rank.rank_order`; grid: B*G*Nb; BLOCK >= Nb, fixed per profile)."""
    _rank_kernel(scores_ptr, order_ptr, rank_ptr, sink_ptr, diag_ptr, nb, KEEP_SINK=KEEP_SINK, KEEP_DIAG=KEEP_DIAG, BLOCK=BLOCK)


@triton.jit
def trt_needs_mass(
    q_ptr,
    k_ptr,
    skip_ptr,
    seq_len,
    mass_ptr,
    lse_ptr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    QB: tl.constexpr,
    BS: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
    QK_SCALE: tl.constexpr,
):
    """Budget rule 3, pass 1 (`estimate_needs._mass_kernel`, every query block in one chunk): q `[B, Hq, S, D]`, k
    `[B, Hkv, S, D]`, skip int32 `[B, Hkv]` (groups not measured) -> mass float32 `[B*Hkv, Nb, Nb, RB]` (log2 block
    masses), lse float32 `[B*Hkv, Nb, RB]` (grid: B*Hkv, cdiv(Nb, QB))."""
    nb = tl.cdiv(seq_len, BS)
    _mass_kernel(
        q_ptr,
        k_ptr,
        q_ptr,
        skip_ptr,
        mass_ptr,
        lse_ptr,
        seq_len,
        nb,
        HKV,
        0,
        nb,
        QK_SCALE,
        HQ * seq_len * D,
        D,
        seq_len * D,
        1,
        HKV * seq_len * D,
        D,
        seq_len * D,
        1,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        QB=QB,
        BS=BS,
        HEAD_DIM=D,
        BLOCK_D=BLOCK_D,
        VARLEN=False,
        LAST_ONLY=False,
        SKIP=True,
        DOT_PREC=DOT_PREC,
        UPCAST=False,
        HEAVY_FIRST=True,
    )


@triton.jit
def trt_needs_cut(
    q_ptr,
    mass_ptr,
    lse_ptr,
    order_ptr,
    sink_ptr,
    diag_ptr,
    skip_ptr,
    seq_len,
    gamma_bits,
    min_blocks,
    need_ptr,
    counts_ptr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    R: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    RB: tl.constexpr,
    BS: tl.constexpr,
    CH: tl.constexpr,
    KEEP_SINK: tl.constexpr,
    KEEP_DIAG: tl.constexpr,
):
    """Budget rule 3, pass 2 (`estimate_needs._cut_kernel` with COUNTS): the masses of `trt_needs_mass`, the rankings
    and forced-block ranks of `trt_rank` -> need, counts int32 `[B, Hq, Nb]` (grid: B*Hkv, Nb). gamma arrives as the
    bits of a float32 (AOT scalars are int32); q is not read (TensorRT derives S from it)."""
    nb = tl.cdiv(seq_len, BS)
    gamma = gamma_bits.to(tl.float32, bitcast=True)
    _cut_kernel(
        mass_ptr,
        lse_ptr,
        order_ptr,
        sink_ptr,
        diag_ptr,
        skip_ptr,
        skip_ptr,
        need_ptr,
        counts_ptr,
        seq_len,
        nb,
        HKV,
        HKV // R,
        0,
        nb,
        gamma,
        min_blocks,
        -1,
        GROUP=GROUP,
        ROWS=ROWS,
        RB=RB,
        BS=BS,
        CH=CH,
        VARLEN=False,
        LAST_ONLY=False,
        SKIP=True,
        COUNTS=True,
        KEEP_SINK=KEEP_SINK,
        KEEP_DIAG=KEEP_DIAG,
    )


@triton.jit
def trt_sparse_attention(
    q_ptr,
    k_ptr,
    v_ptr,
    order_ptr,
    counts_ptr,
    seq_len,
    o_ptr,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    R: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QK_SCALE: tl.constexpr,
):
    """q `[B, Hq, S, D]`, k/v `[B, Hkv, S, D]`, order int32 `[B, R, Nb, Nb]`, counts int32 `[B, Hq, Nb]` ->
    out `[B, Hq, S, D]` (grid: Nb * B * Hq)."""
    nb = tl.cdiv(seq_len, BS)
    sq_b = HQ * seq_len * D
    sk_b = HKV * seq_len * D
    _sparse_attn_fwd_kernel(
        q_ptr,
        k_ptr,
        v_ptr,
        o_ptr,
        o_ptr,
        None,
        None,
        None,
        order_ptr,
        counts_ptr,
        counts_ptr,
        sq_b,
        D,
        seq_len * D,
        sk_b,
        D,
        seq_len * D,
        sk_b,
        D,
        seq_len * D,
        sq_b,
        D,
        seq_len * D,
        0,
        0,
        R * nb * nb,
        nb * nb,
        nb,
        HQ * nb,
        nb,
        seq_len,
        nb,
        HQ,
        QK_SCALE,
        0,
        GROUP=HQ // HKV,
        RGROUP=HQ // R,
        PLAN_BS=BS,
        BLOCK_N=BLOCK_N,
        HEAD_DIM=D,
        USE_TMA=False,
        VARLEN=False,
        WRITE_LSE=False,
    )


WRAPPERS = {
    "trt_pool": trt_pool,
    "trt_scores": trt_scores,
    "trt_mass_stats": trt_mass_stats,
    "trt_mass": trt_mass,
    "trt_rank": trt_rank,
    "trt_needs_mass": trt_needs_mass,
    "trt_needs_cut": trt_needs_cut,
    "trt_sparse_attention": trt_sparse_attention,
}
