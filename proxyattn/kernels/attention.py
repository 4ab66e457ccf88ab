"""Block-sparse FlashAttention forward (Triton), the dense path, and variable-length batches.

Layers: `_sparse_attn_fwd_kernel` (jit) -> `_launch_sparse` (allocate, grid, descriptors) -> public functions
(`block_sparse_attention`, `block_sparse_attention_with_lse`, `block_sparse_attention_varlen`,
`dense_attention`).

The kernel reads the compact `BlockPlan` directly: program (b, h, m) walks the first counts[b, h, m] entries of
order[b, h // (Hq / R), m], loading each kept key block by its index (a scalar offset; through a TMA tensor
descriptor when the layout allows it). GQA reads KV head h // (Hq / Hkv) without copying K/V. Only the diagonal
key block is masked (causality; it is also the only block that can hold keys past the sequence end). Programs
are issued heaviest query block first (largest m), with the query heads of one KV head adjacent so that their
shared K/V blocks are served from L2.

Every function here runs on the tensors' own device: CUDA normally, CPU tensors under `TRITON_INTERPRET=1`
(the test suite). The public API in `proxyattn.api` sends only CUDA tensors here.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..plan import BlockPlan
from .columns import merge_columns
from .estimate_common import _SMEM_BUDGET

try:  # Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer path only
    TensorDescriptor = None

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_with_lse",
    "block_sparse_attention_varlen",
    "block_sparse_attention_varlen_with_lse",
    "dense_attention",
]

_LOG2E = 1.4426950408889634


def _env_interpret() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _sparse_attn_fwd_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    lse_ptr,
    q_desc,
    k_desc,
    v_desc,
    order_ptr,
    counts_ptr,
    cu_ptr,
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
    stride_rb,
    stride_rr,
    stride_rm,
    stride_cb,
    stride_ch,
    seq_len,
    num_blocks,
    num_q_heads,
    qk_scale,
    len_bucket,
    GROUP: tl.constexpr,  # query heads per KV head
    RGROUP: tl.constexpr,  # query heads per ranking row of the plan
    PLAN_BS: tl.constexpr,  # plan block size (= BLOCK_M)
    BLOCK_N: tl.constexpr,  # key tile (divides PLAN_BS)
    HEAD_DIM: tl.constexpr,
    USE_TMA: tl.constexpr,
    VARLEN: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DIAG_BRANCH: tl.constexpr = True,  # mask only the diagonal tile (True) or every tile (False: no branch)
):
    BLOCK_M: tl.constexpr = PLAN_BS
    SUB: tl.constexpr = PLAN_BS // BLOCK_N
    pid = tl.program_id(0)
    per_m = tl.num_programs(0) // num_blocks  # B * Hq
    m = num_blocks - 1 - pid // per_m  # heaviest (last) query blocks first
    rem = pid % per_m
    b = rem // num_q_heads
    h = rem % num_q_heads
    hkv = h // GROUP

    if VARLEN:
        tok0 = tl.load(cu_ptr + b)
        n_tok = tl.load(cu_ptr + b + 1) - tok0
        row0 = tok0  # first row of this sequence in the packed [T, H*D] view
        q_base = q_ptr + tok0.to(tl.int64) * stride_qs
        k_base = k_ptr + tok0.to(tl.int64) * stride_ks
        v_base = v_ptr + tok0.to(tl.int64) * stride_vs
        o_base = o_ptr + tok0.to(tl.int64) * stride_os
        l_base = lse_ptr + tok0.to(tl.int64)
        if m * PLAN_BS >= n_tok:  # this sequence is shorter than max_seqlen
            return
    else:
        n_tok = seq_len
        row0 = b * seq_len  # first row of this sequence in the [B*S, H*D] view
        q_base = q_ptr + b.to(tl.int64) * stride_qb
        k_base = k_ptr + b.to(tl.int64) * stride_kb
        v_base = v_ptr + b.to(tl.int64) * stride_vb
        o_base = o_ptr + b.to(tl.int64) * stride_ob
        l_base = lse_ptr + b.to(tl.int64) * stride_lb
    q_start = m * PLAN_BS

    offs_m = q_start + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < n_tok

    if USE_TMA:
        q = q_desc.load([row0 + q_start, h * HEAD_DIM])
    else:
        q_ptrs = q_base + offs_m.to(tl.int64)[:, None] * stride_qs + h * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)

    n_kept = tl.load(counts_ptr + b.to(tl.int64) * stride_cb + h * stride_ch + m)
    order_row = order_ptr + b.to(tl.int64) * stride_rb + (h // RGROUP) * stride_rr + m.to(tl.int64) * stride_rm
    k_ptrs = k_base + offs_n.to(tl.int64)[:, None] * stride_ks + hkv * stride_kh + offs_d[None, :]
    v_ptrs = v_base + offs_n.to(tl.int64)[:, None] * stride_vs + hkv * stride_vh + offs_d[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for t in tl.range(0, n_kept * SUB):
        kb = tl.load(order_row + t // SUB)
        k_start = kb * PLAN_BS + (t % SUB) * BLOCK_N
        if USE_TMA:
            k = k_desc.load([row0 + k_start, hkv * HEAD_DIM])
        else:
            k = tl.load(k_ptrs + k_start.to(tl.int64) * stride_ks, mask=(k_start + offs_n < n_tok)[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k))
        if DIAG_BRANCH:
            if kb == m:  # diagonal block: causal mask (also hides keys past the sequence end)
                keep = (k_start + offs_n)[None, :] <= offs_m[:, None]
                qk = tl.where(keep, qk, -1.0e6)
        else:
            qk = tl.where((k_start + offs_n)[None, :] <= offs_m[:, None], qk, -1.0e6)
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if USE_TMA:
            v = v_desc.load([row0 + k_start, hkv * HEAD_DIM])
        else:
            v = tl.load(v_ptrs + k_start.to(tl.int64) * stride_vs, mask=(k_start + offs_n < n_tok)[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_ij

    has_keys = l_i > 0.0  # rows of a query block with no kept key block give 0 and lse -inf
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    o_ptrs = o_base + offs_m.to(tl.int64)[:, None] * stride_os + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
    if WRITE_LSE:
        lse = tl.where(has_keys, (m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        tl.store(l_base + h * stride_lh + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------- tuning
def _set_block_shapes(nargs) -> None:
    """Autotune pre-hook: TMA descriptors carry the tile shape, which follows the chosen config."""
    if nargs["q_desc"] is None:
        return
    d = nargs["HEAD_DIM"]
    nargs["q_desc"].block_shape = [nargs["PLAN_BS"], d]
    nargs["k_desc"].block_shape = [nargs["BLOCK_N"], d]
    nargs["v_desc"].block_shape = [nargs["BLOCK_N"], d]


def _prune(configs, named_args, **kwargs):
    """Keep configs whose key tile divides the plan block, whose pipelined tiles fit in shared memory and whose fp32
    accumulator (PLAN_BS x D over the program's threads) takes at most 128 registers a thread; register caps (two
    programs per multiprocessor) only where the accumulator leaves room (D <= 128)."""
    args = {**named_args, **kwargs}
    bs, d = args["PLAN_BS"], args["HEAD_DIM"]
    elt = args["q_ptr"].element_size()
    kept = []
    for c in configs:
        bn = c.kwargs["BLOCK_N"]
        smem = bs * d * elt + c.num_stages * 2 * bn * d * elt
        acc_regs = bs * d // (32 * c.num_warps)
        if bs % bn or smem > _SMEM_BUDGET or acc_regs > 128 or (c.maxnreg is not None and d > 128):
            continue
        kept.append(c)
    return kept or [triton.Config({"BLOCK_N": min(64, bs)}, num_warps=4, num_stages=2, pre_hook=_set_block_shapes)]


# (BLOCK_N, num_warps, num_stages, maxnreg). The register-capped ones (128 registers, no spills for D=128 in the
# compiler's report) use under 100 KB of shared memory, so two programs share a multiprocessor and one's Q load and
# output store overlap the other's key loop. FOUR_WARPS (one warpgroup over the 128 query rows, no register cap: 255
# registers and 98 KB of shared memory for D 128 / block 128, so two programs a multiprocessor too) was first measured
# as a "warp-specialised" loop (`tl.range(..., warp_specialize=True)`), but Triton 3.6 compiles that loop for sm_90a
# to PTX and a cubin bitwise equal to the plain loop's (no producer warps: ncu showed 128 threads a program), so the
# switch is gone and its measurements are this config's.
REGISTER_CAPPED = (64, 8, 2, 128)
FOUR_WARPS = (64, 4, 2, None)
_CONFIGS = [
    (128, 8, 2, None),
    (64, 8, 3, None),
    (64, 8, 4, None),
    (32, 8, 3, None),
    REGISTER_CAPPED,
    (32, 8, 3, 128),
    (32, 8, 4, 128),
    FOUR_WARPS,
]
_CONFIG_KEYS = ("BLOCK_N", "num_warps", "num_stages", "maxnreg")


def _configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s, maxnreg=r, pre_hook=_set_block_shapes) for bn, w, s, r in _CONFIGS]


def config_tuple(c: triton.Config) -> tuple:
    """A candidate as its `_CONFIGS` entry."""
    return (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages, c.maxnreg)


def config_dict(c: tuple) -> dict:
    """A `_CONFIGS` entry as `_launch_sparse`'s `config`."""
    return dict(zip(_CONFIG_KEYS, c))


def candidate_configs(q: torch.Tensor, block_size: int, use_tma: bool, varlen: bool = False) -> list[tuple]:
    """The `_CONFIGS` entries the autotuner keeps for q's head dim and dtype, the plan block and the layout."""
    named = {"PLAN_BS": block_size, "HEAD_DIM": q.shape[-1], "q_ptr": q, "USE_TMA": use_tma, "VARLEN": varlen}
    return [config_tuple(c) for c in _prune(_configs(), named)]


# Measured shapes run a fixed config: (HEAD_DIM, PLAN_BS, USE_TMA) -> one of _CONFIGS. A fixed pick keeps the
# autotuner's run-to-run choice out of the timings; other shapes are autotuned over _CONFIGS. D 128 / block 128 with
# TMA loads (the Llama-3-8B shape): FOUR_WARPS. On the H100 (benchmarks/kernel_configs.py, same process and plans,
# outputs bitwise equal; measured under its earlier name, the warp-specialised loop, whose code was the same) it ran
# 423 / 448 / 465 TFLOP/s at 5 / 10 / 20 % density at 32K and 453 / 465 / 474 at 128K (commit 3b48b1a) against
# 423 / 445 / 463 and 447 / 463 / 462 for REGISTER_CAPPED, which had been the fastest of the other candidates at 32K
# and 128K in both variant studies (H100 and H200) and is what libproxyattn compiles for pointer loads. With every
# candidate (commit 2a9fb82, kernel_configs_all_h100.json): again 1-2 % faster at 128K, within +-4 % of
# REGISTER_CAPPED at 32K, the other six 5-20 % slower.
_TUNED = {(128, 128, True): FOUR_WARPS}


def tuned_config(head_dim: int, block_size: int, use_tma: bool) -> dict | None:
    """The fixed launch config of a measured shape (`_TUNED`), or None: autotune."""
    c = _TUNED.get((head_dim, block_size, use_tma))
    return None if c is None else config_dict(c)


_sparse_attn_fwd_tuned = triton.autotune(
    configs=_configs(),
    key=["HEAD_DIM", "PLAN_BS", "GROUP", "USE_TMA", "VARLEN", "len_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)(_sparse_attn_fwd_kernel)


# ----------------------------------------------------------------------------------------------- launch
def _tma_ok(x: torch.Tensor, rows: int, batched: bool) -> bool:
    """Can x (`[B, S, H, D]` or `[T, H, D]`) be read as a 2D `[rows, H*D]` TMA tensor?"""
    if TensorDescriptor is None:
        return False
    st = x.stride()
    s_ax = 1 if batched else 0
    d = x.shape[-1]
    if st[-1] != 1 or st[-2] != d or (batched and x.shape[0] > 1 and st[0] != x.shape[1] * st[1]):
        return False
    return x.data_ptr() % 16 == 0 and (st[s_ax] * x.element_size()) % 16 == 0 and rows > 0


def _descriptor(x: torch.Tensor, rows: int, batched: bool, block_rows: int):
    h, d = x.shape[-2], x.shape[-1]
    stride_s = x.stride(1 if batched else 0)
    return TensorDescriptor(x, [rows, h * d], [stride_s, 1], [block_rows, d])


def _launch_sparse(
    q,
    k,
    v,
    order,
    counts,
    cu_seqlens,
    seq_len: int,
    block_size: int,
    scale: float,
    *,
    with_lse: bool,
    use_tma: bool | None = None,
    config: dict | None = None,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
):
    """Allocate outputs and launch the block-sparse kernel.

    Batched (cu_seqlens None): q `[B, S, Hq, D]`, k/v `[B, S, Hkv, D]`, out like q, lse `[B, Hq, S]`.
    Varlen: q `[T, Hq, D]`, k/v `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`, seq_len = max_seqlen; out like q,
    lse `[Hq, T]`.
    order int32 `[B, R, Nb, Nb]`, counts int32 `[B, Hq, Nb]` with Nb = ceil(seq_len / block_size).
    `use_tma` None picks TMA when the layout allows it; `config` (BLOCK_N, num_warps, num_stages, maxnreg,
    DIAG_BRANCH) skips autotuning (always the case under the interpreter); without it a measured shape runs its
    `tuned_config`, any other is autotuned. `out` / `lse` are optional preallocated contiguous outputs.
    """
    varlen = cu_seqlens is not None
    batched = not varlen
    hq, d = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if batched:
        bsz = q.shape[0]
        rows = bsz * seq_len
    else:
        bsz = cu_seqlens.shape[0] - 1
        rows = q.shape[0]
    nb = -(-seq_len // block_size)
    r = order.shape[1]
    assert order.dtype == torch.int32 and counts.dtype == torch.int32
    assert order.shape == (bsz, r, nb, nb) and counts.shape == (bsz, hq, nb), (order.shape, counts.shape, bsz, nb)
    assert hq % hkv == 0 and hq % r == 0 and d in (64, 128, 256) and block_size in (64, 128)
    order = order if order.stride(-1) == 1 else order.contiguous()
    counts = counts if counts.stride(-1) == 1 else counts.contiguous()

    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
    lse_shape = (bsz, hq, seq_len) if batched else (hq, rows)
    if with_lse and lse is None:
        lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if with_lse:
        assert lse.shape == lse_shape and lse.dtype == torch.float32 and lse.stride(-1) == 1
        ls = (lse.stride(0), lse.stride(1)) if batched else (0, lse.stride(0))
    else:
        lse, ls = out, (0, 0)  # unused pointer
    if rows == 0:
        return out, lse

    if use_tma is None:
        use_tma = all(_tma_ok(x, rows, batched) for x in (q, k, v))
    if config is None and not _env_interpret():
        config = tuned_config(d, block_size, use_tma)
    if use_tma:
        bn0 = (config or {}).get("BLOCK_N", min(64, block_size))
        q_desc = _descriptor(q, rows, batched, block_size)
        k_desc = _descriptor(k, rows, batched, bn0)
        v_desc = _descriptor(v, rows, batched, bn0)
    else:
        q_desc = k_desc = v_desc = None

    def bsh(x):  # (batch, token, head) strides; varlen has no batch stride
        return (x.stride(0), x.stride(1), x.stride(2)) if batched else (0, x.stride(0), x.stride(1))

    grid = (bsz * hq * nb,)
    args = (
        q,
        k,
        v,
        out,
        lse,
        q_desc,
        k_desc,
        v_desc,
        order,
        counts,
        cu_seqlens if varlen else counts,
        *bsh(q),
        *bsh(k),
        *bsh(v),
        *bsh(out),
        *ls,
        order.stride(0),
        order.stride(1),
        order.stride(2),
        counts.stride(0),
        counts.stride(1),
        seq_len,
        nb,
        hq,
        scale * _LOG2E,
        max(4096, triton.next_power_of_2(seq_len)),
    )
    meta = dict(GROUP=hq // hkv, RGROUP=hq // r, PLAN_BS=block_size, HEAD_DIM=d, USE_TMA=use_tma, VARLEN=varlen, WRITE_LSE=with_lse)
    if config is None and not _env_interpret():
        _sparse_attn_fwd_tuned[grid](*args, **meta)
    else:
        cfg = dict(BLOCK_N=min(64, block_size), num_warps=4, num_stages=2)
        cfg.update(config or {})
        if cfg.get("maxnreg", 0) is None:
            del cfg["maxnreg"]
        if use_tma:
            q_desc.block_shape = [block_size, d]
            k_desc.block_shape = [cfg["BLOCK_N"], d]
            v_desc.block_shape = [cfg["BLOCK_N"], d]
        _sparse_attn_fwd_kernel[grid](*args, **meta, **cfg)
    return out, lse


# ----------------------------------------------------------------------------------------------- public
KERNEL_DTYPES = (torch.float16, torch.bfloat16)
KERNEL_HEAD_DIMS = (64, 128, 256)


def _check_kernel_inputs(q, k, v) -> None:
    """What the kernel supports (the API has already checked shapes and devices)."""
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"q.dtype={q.dtype} is not supported by the block-sparse kernel; allowed: {KERNEL_DTYPES}")
    if q.shape[-1] not in KERNEL_HEAD_DIMS:
        raise ValueError(f"head dim D={q.shape[-1]} is not supported by the block-sparse kernel; allowed: {KERNEL_HEAD_DIMS}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}.stride(-1)={t.stride(-1)}: the head dim must be contiguous (stride 1)")


def block_sparse_attention_with_lse(q, k, v, plan: BlockPlan, scale: float):
    """Causal attention on the plan's kept blocks.

    Args:
        q: `[B, S, Hq, D]`; k, v: `[B, S, Hkv, D]` (any strides with a contiguous head dim; bf16 or fp16;
            D in 64, 128, 256; anything else raises ValueError).
        plan: `BlockPlan` with order `[B, R, Nb, Nb]`, counts `[B, Hq, Nb]`, block_size 64 or 128.
        scale: softmax scale.
    Returns:
        (out `[B, S, Hq, D]` in q.dtype, lse `[B, Hq, S]` float32 natural log; -inf for rows with no kept key).
    """
    _check_kernel_inputs(q, k, v)
    out, lse = _launch_sparse(q, k, v, plan.order, plan.counts, None, q.shape[1], plan.block_size, scale, with_lse=True)
    if plan.columns is not None:
        merge_columns(q, k, v, out, lse, plan, scale)
    return out, lse


def block_sparse_attention(q, k, v, plan: BlockPlan, scale: float) -> torch.Tensor:
    """Causal attention on the plan's kept blocks: `[B, S, Hq, D]` in q.dtype (shapes as the `_with_lse` form).

    Heads in `plan.dense_heads` (the dense fallback) run through the dense kernel (cuDNN), KV group by KV group, and
    the others through the block-sparse kernel. Which groups is read on the host (one small device-to-host copy): in
    eager mode only; while a CUDA graph is being captured every head runs in the block-sparse kernel, the dense
    heads walking all their causal blocks (same result, at the block-sparse kernel's speed). A plan with columns
    runs every head through the block-sparse kernel, then the column kernel (`columns.merge_columns`), which leaves
    full rows as they are."""
    _check_kernel_inputs(q, k, v)
    if plan.columns is not None:
        return block_sparse_attention_with_lse(q, k, v, plan, scale)[0]
    if plan.dense_heads is None or (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return _launch_sparse(q, k, v, plan.order, plan.counts, None, q.shape[1], plan.block_size, scale, with_lse=False)[0]
    return _with_dense_groups(q, k, v, plan, scale)


def _with_dense_groups(q, k, v, plan: BlockPlan, scale: float) -> torch.Tensor:
    """Eager mixed execution: dense groups through `dense_attention`, the rest through the block-sparse kernel."""
    b, hq = plan.dense_heads.shape
    hkv = k.shape[2]
    groups = plan.dense_heads.reshape(b, hkv, hq // hkv)[..., 0].cpu()  # the host read of the eager fallback
    return _split(q, k, v, plan, scale, plan.dense_heads, groups)


def block_sparse_attention_split(q, k, v, plan: BlockPlan, scale: float, groups: torch.Tensor, groups_host: torch.Tensor):
    """Eager mixed execution with the dense KV groups already known on the host (the dense fallback's early decision,
    `api.early_dense_groups`): those groups through `dense_attention`, every other head through the block-sparse
    kernel, including heads the plan marked dense later (their counts cover every causal block). No device
    synchronisation. A plan with columns runs as `block_sparse_attention` runs it.

    Args:
        q: `[B, S, Hq, D]`; k, v: `[B, S, Hkv, D]`; plan: `BlockPlan` as `block_sparse_attention_with_lse`.
        groups: bool `[B, Hkv]` on q's device; groups_host: the same values on the CPU.
    Returns:
        out `[B, S, Hq, D]` in q.dtype.
    """
    _check_kernel_inputs(q, k, v)
    if plan.columns is not None:
        return block_sparse_attention_with_lse(q, k, v, plan, scale)[0]
    heads = groups[:, :, None].expand(-1, -1, q.shape[2] // k.shape[2]).reshape(q.shape[0], q.shape[2])
    return _split(q, k, v, plan, scale, heads, groups_host)


def _split(q, k, v, plan: BlockPlan, scale: float, heads: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Heads `heads` (bool `[B, Hq]`, on q's device) of the KV groups `groups` (bool `[B, Hkv]`, on the host) through
    `dense_attention`, the others through the block-sparse kernel."""
    b, s, hq, _ = q.shape
    hkv = k.shape[2]
    if not bool(groups.any()):
        return _launch_sparse(q, k, v, plan.order, plan.counts, None, s, plan.block_size, scale, with_lse=False)[0]
    if bool(groups.all()):
        return dense_attention(q, k, v, scale)
    counts = torch.where(heads[..., None], 0, plan.counts)  # the sparse launch skips the dense heads
    out = _launch_sparse(q, k, v, plan.order, counts, None, s, plan.block_size, scale, with_lse=False)[0]
    g = hq // hkv
    for bi in range(b):
        kv = groups[bi].nonzero().flatten()
        if kv.numel() == 0:
            continue
        heads = (kv[:, None] * g + torch.arange(g)).flatten().to(q.device)
        kv = kv.to(q.device)
        sub = dense_attention(
            q[bi : bi + 1].index_select(2, heads), k[bi : bi + 1].index_select(2, kv), v[bi : bi + 1].index_select(2, kv), scale
        )
        out[bi : bi + 1].index_copy_(2, heads, sub)
    return out


def block_sparse_attention_varlen_with_lse(q, k, v, cu_seqlens, max_seqlen: int, plan: BlockPlan, scale: float):
    """Block-sparse causal attention over a packed batch of sequences.

    Args:
        q: `[T, Hq, D]`; k, v: `[T, Hkv, D]`; sequence i holds tokens cu_seqlens[i]..cu_seqlens[i+1]-1.
        cu_seqlens: int32 `[B+1]` on q's device, cu_seqlens[0] = 0, non-decreasing, cu_seqlens[B] = T.
        max_seqlen: host int >= every sequence length (not checked on the device: no host sync).
        plan: `BlockPlan` padded to max_seqlen: order `[B, R, Nb, Nb]`, counts `[B, Hq, Nb]`,
            Nb = ceil(max_seqlen / block_size), plan.seq_len = max_seqlen; row b covers sequence b, entries of
            query blocks past its length are unused.
        scale: softmax scale.
    Returns:
        (out `[T, Hq, D]` in q.dtype, lse `[Hq, T]` float32 natural log).
    """
    _check_kernel_inputs(q, k, v)
    return _launch_sparse(q, k, v, plan.order, plan.counts, cu_seqlens, max_seqlen, plan.block_size, scale, with_lse=True)


def block_sparse_attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, plan: BlockPlan, scale: float) -> torch.Tensor:
    """Packed-batch block-sparse attention: out `[T, Hq, D]` (arguments as the `_with_lse` form)."""
    _check_kernel_inputs(q, k, v)
    return _launch_sparse(q, k, v, plan.order, plan.counts, cu_seqlens, max_seqlen, plan.block_size, scale, with_lse=False)[0]


# ----------------------------------------------------------------------------------------------- dense
_DENSE_MODE: dict = {}


def _dense_mode(q, k, v) -> str:
    """'gqa' (cuDNN reads the KV heads directly), 'expand' (cuDNN on expanded K/V) or 'sdpa' (SDPA picks).

    Decided once per (dtype, D, GQA) from what the installed PyTorch reports cuDNN can run (a host-side check,
    no device work).
    """
    key = (q.dtype, q.shape[-1], q.shape[2] != k.shape[2])
    if key in _DENSE_MODE:
        return _DENSE_MODE[key]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    mode = "sdpa"
    can = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if q.is_cuda and can is not None and torch.backends.cuda.cudnn_sdp_enabled():
        try:
            if can(torch.backends.cuda.SDPAParams(qt, kt, vt, None, 0.0, True, key[2])):
                mode = "gqa"
            elif key[2]:
                ke = kt.repeat_interleave(q.shape[2] // k.shape[2], dim=1)  # once per mode key
                if can(torch.backends.cuda.SDPAParams(qt, ke, ke, None, 0.0, True, False)):
                    mode = "expand"
        except TypeError:  # SDPAParams' signature differs in this PyTorch: let SDPA choose
            mode = "sdpa"
    _DENSE_MODE[key] = mode
    return mode


def dense_attention(q, k, v, scale: float) -> torch.Tensor:
    """Exact causal attention through PyTorch SDPA, cuDNN first: q `[B, S, Hq, D]`, k/v `[B, S, Hkv, D]` ->
    `[B, S, Hq, D]` in q.dtype (a transposed view of SDPA's output, no copy)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    mode = _dense_mode(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    gqa = q.shape[2] != k.shape[2]
    if mode == "expand":
        rep = q.shape[2] // k.shape[2]
        kt = kt[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
        vt = vt[:, :, None].expand(-1, -1, rep, -1, -1).flatten(1, 2)
        gqa = False
    # The default scale goes as None, so that the call is exactly a plain SDPA call (the H200 benchmark measured this
    # path 5-7% slower than plain cuDNN SDPA at 8K with the scale passed explicitly; cause not established).
    sdpa_scale = None if scale == 1.0 / math.sqrt(q.shape[-1]) else scale
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=sdpa_scale, enable_gqa=gqa)
    return out.transpose(1, 2)
