"""Validation at the public boundary: every problem raises ValueError naming the bad value."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_qk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]`, same dtype and device, B, S, Hq, Hkv, D >= 1, Hq a multiple
    of Hkv."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, S, H, D], got shape {tuple(t.shape)}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name}.dtype={t.dtype} is not supported; allowed: {FLOAT_DTYPES}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise ValueError(f"{name}.dtype={t.dtype} differs from q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}.device={t.device} differs from q.device={q.device}")
    b, s, hq, d = q.shape
    if s == 0:
        raise ValueError("sequence length S=0: q must hold at least one token")
    if b == 0:
        raise ValueError("batch size B=0: q must hold at least one sequence")
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)} in B, S or D")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    hkv = k.shape[2]
    if hq < 1 or hkv < 1:
        raise ValueError(f"query heads Hq={hq} and KV heads Hkv={hkv} must both be >= 1 (q [B, S, Hq, D], k [B, S, Hkv, D])")
    if hq % hkv != 0:
        raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={hkv}")
    if d < 1:
        raise ValueError(
            f"head dim D={d} is not supported: q, k and v need D >= 1 (the default scale is 1/sqrt(D)); CUDA tensors "
            "additionally need D in (64, 128, 256), the head dims the Triton kernels are built for "
            "(proxyattn.kernels.attention.KERNEL_HEAD_DIMS)"
        )
    if not q.is_cuda:
        # A finiteness check reads the data back to the host; on CUDA that is a device synchronisation, which the
        # hot path must not do, so it only runs for CPU tensors.
        for name, t in named:
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains non-finite values (NaN or inf)")


def check_proxy_heads(proxy_heads: int, num_kv_heads: int) -> None:
    if num_kv_heads % proxy_heads != 0:
        raise ValueError(
            f"proxy_heads={proxy_heads} must divide the number of KV heads Hkv={num_kv_heads}; "
            f"allowed: {[g for g in range(1, num_kv_heads + 1) if num_kv_heads % g == 0]}"
        )


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite number or None (1/sqrt(D))")
    return float(scale)
