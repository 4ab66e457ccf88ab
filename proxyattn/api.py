"""Public stage functions of ProxyAttn.

Each function validates its inputs, then dispatches: CUDA tensors go to the Triton kernels in
`proxyattn.kernels` (when that backend provides the stage), everything else to the fp32 reference in
`proxyattn.reference`. Shapes: q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]`, Nb = ceil(S / block_size).
"""

from __future__ import annotations

import torch

from . import reference
from ._checks import check_proxy_heads, check_qk, resolve_scale
from .config import ProxyAttnConfig
from .plan import BlockPlan, compact_plan

__all__ = [
    "proxy_scores",
    "head_budgets",
    "select_blocks",
    "plan_blocks",
    "dense_attention",
    "block_sparse_attention",
    "block_sparse_attention_with_lse",
    "proxy_attention",
]


def _config(config: ProxyAttnConfig | None) -> ProxyAttnConfig:
    if config is None:
        return ProxyAttnConfig()
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig or None, got {type(config).__name__}")
    return config


def _kernels(t: torch.Tensor):
    """The GPU backend for CUDA tensors, or None (reference)."""
    if not t.is_cuda:
        return None
    from . import kernels  # imported lazily: needs triton

    return kernels


def proxy_scores(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor:
    """Proxy block scores `[B, G, Nb, Nb]` float32, G = config.proxy_heads; -inf above the diagonal.

    Args:
        q: `[B, S, Hq, D]`; k: `[B, S, Hkv, D]`; scale defaults to 1/sqrt(D).
    """
    cfg = _config(config)
    check_qk(q, k)
    check_proxy_heads(cfg.proxy_heads, k.shape[2])
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "proxy_scores"):
        return backend.proxy_scores(q, k, cfg, sc)
    return reference.proxy_scores(q, k, proxy_heads=cfg.proxy_heads, block_size=cfg.block_size, stride=cfg.stride, scale=sc)


def head_budgets(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor:
    """Per-head budgets in key blocks, int32 `[B, Hq]`; the budget fraction is that over Nb.

    With `config.budget_fraction` set, every head gets ceil(budget_fraction * Nb) blocks.
    """
    cfg = _config(config)
    check_qk(q, k)
    b, s, hq, _ = q.shape
    nb = -(-s // cfg.block_size)
    if cfg.budget_fraction is not None:
        return reference.fraction_budgets(b, hq, nb, cfg.budget_fraction, q.device)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "head_budgets"):
        return backend.head_budgets(q, k, cfg, sc)
    return reference.head_budgets(q, k, block_size=cfg.block_size, gamma=cfg.gamma, scale=sc)


def select_blocks(scores: torch.Tensor, budget_blocks: torch.Tensor, seq_len: int, config: ProxyAttnConfig | None = None) -> BlockPlan:
    """Selection into a `BlockPlan`.

    Args:
        scores: `[B, R, Nb, Nb]` proxy block scores (head h reads row h // (Hq / R)).
        budget_blocks: int `[B, Hq]` budgets in key blocks.
        seq_len: S.
    """
    cfg = _config(config)
    nb = -(-seq_len // cfg.block_size) if isinstance(seq_len, int) and seq_len > 0 else None
    if nb is None:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    if scores.dim() != 4 or scores.shape[-2:] != (nb, nb):
        raise ValueError(f"scores shape {tuple(scores.shape)} must be [B, R, {nb}, {nb}] for seq_len={seq_len}")
    if budget_blocks.dim() != 2 or budget_blocks.shape[0] != scores.shape[0] or budget_blocks.shape[1] % scores.shape[1]:
        raise ValueError(f"budget_blocks shape {tuple(budget_blocks.shape)} must be [B, Hq] with Hq a multiple of R={scores.shape[1]}")
    if budget_blocks.device != scores.device:
        raise ValueError(f"budget_blocks.device={budget_blocks.device} differs from scores.device={scores.device}")
    backend = _kernels(scores)
    if backend is not None and hasattr(backend, "select_blocks"):
        return backend.select_blocks(scores, budget_blocks, seq_len, cfg)
    return compact_plan(scores, budget_blocks, seq_len, cfg)


def plan_blocks(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> BlockPlan:
    """Scores, budgets and selection: the ProxyAttn plan for q `[B, S, Hq, D]`, k `[B, S, Hkv, D]`."""
    cfg = _config(config)
    scores = proxy_scores(q, k, cfg, scale=scale)
    budgets = head_budgets(q, k, cfg, scale=scale)
    return select_blocks(scores, budgets, q.shape[1], cfg)


def _check_plan(q, plan: BlockPlan) -> None:
    if not isinstance(plan, BlockPlan):
        raise ValueError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    b, s, hq, _ = q.shape
    if plan.seq_len != s or plan.counts.shape[:2] != (b, hq):
        raise ValueError(
            f"plan covers B={plan.counts.shape[0]}, Hq={plan.counts.shape[1]}, S={plan.seq_len} "
            f"but q has B={b}, Hq={hq}, S={s}"
        )
    if plan.counts.device != q.device:
        raise ValueError(f"plan is on {plan.counts.device} but q is on {q.device}")


def block_sparse_attention_with_lse(q, k, v, plan: BlockPlan, *, scale: float | None = None):
    """Causal attention restricted to the plan's kept blocks.

    Returns (out `[B, S, Hq, D]` in q.dtype, lse `[B, Hq, S]` float32, natural log of each row's softmax sum).
    """
    check_qk(q, k, v)
    _check_plan(q, plan)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention_with_lse"):
        return backend.block_sparse_attention_with_lse(q, k, v, plan, sc)
    out, lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=sc)
    return out.to(q.dtype), lse


def block_sparse_attention(q, k, v, plan: BlockPlan, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention restricted to the plan's kept blocks: `[B, S, Hq, D]` in q.dtype."""
    check_qk(q, k, v)
    _check_plan(q, plan)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention"):
        return backend.block_sparse_attention(q, k, v, plan, sc)
    out, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=sc)
    return out.to(q.dtype)


def dense_attention(q, k, v, *, scale: float | None = None) -> torch.Tensor:
    """Exact causal attention `[B, S, Hq, D]` in q.dtype (the fastest dense kernel on CUDA)."""
    check_qk(q, k, v)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "dense_attention"):
        return backend.dense_attention(q, k, v, sc)
    return reference.dense_attention(q, k, v, sc).to(q.dtype)


def proxy_attention(q, k, v, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor:
    """ProxyAttn causal prefill: `[B, S, Hq, D]` in q.dtype.

    Sequences with S <= config.dense_below_tokens take the dense path; otherwise plan + block-sparse attention.
    """
    cfg = _config(config)
    check_qk(q, k, v)
    check_proxy_heads(cfg.proxy_heads, k.shape[2])
    if q.shape[1] <= cfg.dense_below_tokens:
        return dense_attention(q, k, v, scale=scale)
    plan = plan_blocks(q, k, cfg, scale=scale)
    return block_sparse_attention(q, k, v, plan, scale=scale)
