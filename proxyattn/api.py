"""Public stage functions of ProxyAttn.

Each function validates its inputs, then dispatches: CUDA tensors go to the Triton kernels in
`proxyattn.kernels` (when that backend provides the stage), everything else to the fp32 reference in
`proxyattn.reference`. Shapes: q `[B, S, Hq, D]`, k and v `[B, S, Hkv, D]`, Nb = ceil(S / block_size).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import torch

from . import reference
from ._checks import check_proxy_heads, check_qk, resolve_scale
from .config import BudgetRule, Estimator, ProxyAttnConfig
from .plan import BlockPlan, compact_plan, compact_plan_needs, dense_fallback

__all__ = [
    "proxy_scores",
    "head_budgets",
    "block_needs",
    "select_blocks",
    "proxy_columns",
    "plan_blocks",
    "early_dense_groups",
    "dense_attention",
    "block_sparse_attention",
    "block_sparse_attention_with_lse",
    "proxy_attention",
    "plan_blocks_varlen",
    "block_sparse_attention_varlen",
    "block_sparse_attention_varlen_with_lse",
    "proxy_attention_varlen",
]


def _config(config: ProxyAttnConfig | None) -> ProxyAttnConfig:
    if config is None:
        return ProxyAttnConfig()
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig or None, got {type(config).__name__}")
    return config


def _check_inputs(q, k, v=None) -> None:
    """`check_qk`: shapes, dtypes, devices, every size >= 1 (D = 0 would reach the default scale 1/sqrt(D))."""
    check_qk(q, k, v)


def _check_rankings(scores) -> None:
    """`scores` must be a tensor `[B, R, Nb, Nb]` with B >= 1 and R >= 1 (R = 0 would divide by zero later)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(f"scores must be a torch.Tensor [B, R, Nb, Nb], got {type(scores).__name__}")
    if scores.dim() == 4 and (scores.shape[0] < 1 or scores.shape[1] < 1):
        raise ValueError(f"scores shape {tuple(scores.shape)} must have B >= 1 and R >= 1 rankings")


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
    _check_inputs(q, k)
    check_proxy_heads(cfg.proxy_heads, k.shape[2])
    return _scores(q, k, cfg, scale, proxy_columns(q, k, cfg, scale=scale) if _excludes_columns(cfg) else None)


def _scores(q, k, cfg: ProxyAttnConfig, scale, columns) -> torch.Tensor:
    """The estimator's block scores; with vertical columns (int32 `[B, G, C]`) and a fixed budget their keys are left
    out of the max-pool (`reference.proxy_scores`' exclude, `_column_exclusion`)."""
    sc = resolve_scale(scale, q.shape[-1])
    exclude = _column_exclusion(cfg, columns, q.shape[1])
    if exclude is None:
        return _SCORES[cfg.estimator](q, k, cfg, sc, _kernels(q))
    return _proxy_estimator_scores(q, k, cfg, sc, _kernels(q), exclude=exclude)


def _column_exclusion(cfg: ProxyAttnConfig, columns, seq_len: int) -> torch.Tensor | None:
    """bool `[B, G, S]` of the column keys the block scores leave out, or None (`_excludes_columns`)."""
    if columns is None or not _excludes_columns(cfg):
        return None
    return reference.column_rows(columns, columns.shape[1], seq_len)


def _excludes_columns(cfg: ProxyAttnConfig) -> bool:
    """Whether the block scores leave the column keys out, so that the blocks rank by the mass the columns do not
    cover: with columns and a fixed budget (the ranking alone picks the blocks) or budget rule 3 (it counts the
    columns' mass as held, so a block is worth its other keys; 16K structured inputs, 2 % columns: density 0.283 at
    error 0.050 against 0.291 at 0.054 with the full ranking). The last-block rules count blocks only and keep the
    ranking of every key's mass."""
    if cfg.column_fraction == 0.0:
        return False
    return cfg.budget_fraction is not None or cfg.budget_rule.per_query_block


def _proxy_estimator_scores(q, k, cfg: ProxyAttnConfig, sc: float, backend, exclude=None) -> torch.Tensor:
    if backend is not None and hasattr(backend, "proxy_scores"):
        return backend.proxy_scores(q, k, cfg, sc, exclude=exclude)
    return reference.proxy_scores(
        q, k, proxy_heads=cfg.proxy_heads, block_size=cfg.block_size, stride=cfg.stride, scale=sc, exclude=exclude
    )


def _variant_scores(q, k, cfg: ProxyAttnConfig, sc: float, backend) -> torch.Tensor:
    """The PyTorch estimators of `proxyattn.variants` (head_max off CUDA, block_mean anywhere: `[B, Hq, Nb, Nb]`)."""
    from . import variants

    return variants.proxy_scores(q, k, cfg, sc)


def _head_max_scores(q, k, cfg: ProxyAttnConfig, sc: float, backend) -> torch.Tensor:
    if backend is not None and hasattr(backend, "head_max_scores"):
        return backend.head_max_scores(q, k, cfg, sc)
    return _variant_scores(q, k, cfg, sc, backend)


# Estimator -> block scores `(q, k, cfg, scale, backend or None)`: the Python API's one dispatch on the estimator.
_SCORES: dict[Estimator, Callable[..., torch.Tensor]] = {
    Estimator.PROXY: _proxy_estimator_scores,
    Estimator.HEAD_MAX: _head_max_scores,
    Estimator.BLOCK_MEAN: _variant_scores,
}


def head_budgets(
    q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None, scores: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-head budgets in key blocks, int32 `[B, Hq]`; the budget fraction is that over Nb.

    With `config.budget_fraction` set, every head gets ceil(budget_fraction * Nb) blocks. Otherwise the gamma rule
    `config.budget_rule` (`proxyattn.reference.head_budgets`); "recall" and "row_recall" read the shared ranking of
    the last query block from `scores` (`[B, R, Nb, Nb]`, `proxy_scores`), computed here when not given
    (`plan_blocks` passes the ones it selects with); "block_recall" (the default) reports the last query block's
    need (`block_needs`), at least min_budget_tokens.
    """
    cfg = _config(config)
    _check_inputs(q, k)
    b, s, hq, _ = q.shape
    nb = -(-s // cfg.block_size)
    if cfg.budget_fraction is not None:
        return reference.fraction_budgets(b, hq, nb, cfg.budget_fraction, q.device)
    return _RULES[cfg.budget_rule].budgets(q, k, cfg, scale, scores)


def _last_block_budgets(q, k, cfg: ProxyAttnConfig, scale, scores) -> torch.Tensor:
    """Budgets of mass / recall / row_recall, measured on the last query block."""
    needs_scores = cfg.budget_rule.reads_ranking and cfg.gamma < 1.0
    if needs_scores:
        scores = _checked_scores(q, k, cfg, scale, scores)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "head_budgets"):
        return backend.head_budgets(q, k, cfg, sc, scores=scores if needs_scores else None)
    return reference.rule_budgets(
        q,
        k,
        scores,
        block_size=cfg.block_size,
        gamma=cfg.gamma,
        scale=sc,
        budget_rule=cfg.budget_rule,
        keep_sink=cfg.keep_sink,
        keep_diagonal=cfg.keep_diagonal,
    )


def _block_recall_budgets(q, k, cfg: ProxyAttnConfig, scale, scores) -> torch.Tensor:
    """block_recall's reported budgets: the last query block's need, at least min_budget_blocks."""
    return reference.needs_budgets(block_needs(q, k, cfg, scale=scale, scores=scores, last_only=True), cfg.min_budget_blocks)


def _checked_scores(q, k, cfg: ProxyAttnConfig, scale, scores):
    b, s, hq, _ = q.shape
    nb = -(-s // cfg.block_size)
    if scores is None:
        scores = proxy_scores(q, k, cfg, scale=scale)
    _check_rankings(scores)
    if scores.dim() != 4 or scores.shape[0] != b or scores.shape[-2:] != (nb, nb) or hq % scores.shape[1]:
        raise ValueError(f"scores shape {tuple(scores.shape)} must be [{b}, R, {nb}, {nb}] with R dividing Hq={hq}")
    return scores


def block_needs(
    q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None, scores: torch.Tensor | None = None, last_only: bool = False
) -> torch.Tensor:
    """Budget rule "block_recall": how many leading blocks of its ranking every (head, query block) needs,
    int32 `[B, Hq, Nb]` (`proxyattn.reference.block_needs`; `config.recall_rows` rows measured per block). With
    `config.column_fraction` the mass of the head's vertical columns (`proxy_columns`) counts as held before any block.

    Args:
        q: `[B, S, Hq, D]`; k: `[B, S, Hkv, D]`; scores: `[B, R, Nb, Nb]` (`proxy_scores`, computed when None).
        last_only: compute only the last query block (other entries 0), what `head_budgets` reports.
    """
    cfg = _config(config)
    _check_inputs(q, k)
    columns = proxy_columns(q, k, cfg, scale=scale)  # also checks proxy_heads
    scores = _checked_scores(q, k, cfg, scale, _scores(q, k, cfg, scale, columns) if scores is None else scores)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_needs") and k.shape[2] % scores.shape[1] == 0:
        return backend.block_needs(q, k, scores, cfg, sc, last_only=last_only, columns=columns)
    return _reference_needs(q, k, scores, cfg, sc, last_only=last_only, columns=columns)


def select_blocks(
    scores: torch.Tensor,
    budget_blocks: torch.Tensor,
    seq_len: int,
    config: ProxyAttnConfig | None = None,
    *,
    needs: torch.Tensor | None = None,
) -> BlockPlan:
    """Selection into a `BlockPlan`.

    Args:
        scores: `[B, R, Nb, Nb]` proxy block scores (head h reads row h // (Hq / R)).
        budget_blocks: int `[B, Hq]` budgets in key blocks.
        seq_len: S.
        needs: int `[B, Hq, Nb]` (`block_needs`, budget rule block_recall): every row keeps min_budget_tokens' blocks and at
            least the first needs[m] of its ranking; budget_blocks is then only stored.
    """
    cfg = _config(config)
    nb = -(-seq_len // cfg.block_size) if isinstance(seq_len, int) and seq_len > 0 else None
    if nb is None:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    _check_rankings(scores)
    if scores.dim() != 4 or scores.shape[-2:] != (nb, nb):
        raise ValueError(f"scores shape {tuple(scores.shape)} must be [B, R, {nb}, {nb}] for seq_len={seq_len}")
    if budget_blocks.dim() != 2 or budget_blocks.shape[0] != scores.shape[0] or budget_blocks.shape[1] % scores.shape[1]:
        raise ValueError(f"budget_blocks shape {tuple(budget_blocks.shape)} must be [B, Hq] with Hq a multiple of R={scores.shape[1]}")
    if budget_blocks.device != scores.device:
        raise ValueError(f"budget_blocks.device={budget_blocks.device} differs from scores.device={scores.device}")
    if needs is not None and (needs.shape != (*budget_blocks.shape, nb) or needs.device != scores.device):
        raise ValueError(
            f"needs shape {tuple(needs.shape)} on {needs.device} must be [{budget_blocks.shape[0]}, "
            f"{budget_blocks.shape[1]}, {nb}] on {scores.device}"
        )
    backend = _kernels(scores)
    if backend is not None and hasattr(backend, "select_blocks"):
        return backend.select_blocks(scores, budget_blocks, seq_len, cfg, needs=needs)
    if needs is not None:
        return compact_plan_needs(scores, needs, budget_blocks, seq_len, cfg)
    return compact_plan(scores, budget_blocks, seq_len, cfg)


def plan_blocks(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> BlockPlan:
    """Scores, budgets, selection and the dense fallback: the ProxyAttn plan for q `[B, S, Hq, D]`,
    k `[B, S, Hkv, D]`. `plan.dense_heads` marks the heads of KV groups that run dense
    (`ProxyAttnConfig.dense_density`; their counts cover every causal block). No host synchronisation."""
    cfg = _config(config)
    _check_inputs(q, k)
    return _plan(q, k, cfg, scale, early_dense_groups(q, k, cfg, scale=scale))


def early_dense_groups(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor | None:
    """The dense fallback's first decision, bool `[B, Hkv]` (`reference.early_dense_groups`): KV groups whose heads'
    budgets of the paper's rule on the last query block reach `dense_density` run dense, whatever the scores; None
    when there is nothing to decide (no fallback, or a fixed budget_fraction). Costs the last block's attention
    mass (`head_budgets` with budget_rule "mass"), no proxy scores; no host synchronisation."""
    cfg = _config(config)
    if cfg.dense_density_permille == 0 or cfg.budget_fraction is not None:
        return None
    _check_inputs(q, k)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "early_dense_groups"):
        return backend.early_dense_groups(q, k, cfg, sc)
    return _reference_early_groups(q, k, cfg, sc)


def _plan(q, k, cfg: ProxyAttnConfig, scale, early) -> BlockPlan:
    columns = proxy_columns(q, k, cfg, scale=scale)
    plan = _rule_path(cfg).plan(q, k, cfg, scale, early, _scores(q, k, cfg, scale, columns), columns)
    return plan if columns is None else dataclasses.replace(plan, columns=columns)


def proxy_columns(q, k, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor | None:
    """The vertical columns of `ProxyAttnConfig.column_fraction` (`reference.proxy_columns`): int32 `[B, G, C]`,
    each row ascending, C = config.num_columns(S); None when column_fraction is 0. The same fp32 computation on
    every device (one [B, G, block_size, S] product); no host synchronisation."""
    cfg = _config(config)
    _check_inputs(q, k)
    check_proxy_heads(cfg.proxy_heads, k.shape[2])
    n = cfg.num_columns(q.shape[1])
    if n == 0:
        return None
    return reference.proxy_columns(
        q,
        k,
        proxy_heads=cfg.proxy_heads,
        block_size=cfg.block_size,
        num_columns=n,
        scale=resolve_scale(scale, q.shape[-1]),
        keep_sink=cfg.keep_sink,
        keep_diagonal=cfg.keep_diagonal,
    )


def _budget_plan(q, k, cfg: ProxyAttnConfig, scale, early, scores, columns) -> BlockPlan:
    """Plan of mass / recall / row_recall and of budget_fraction: per-head budgets scaled by position (their
    budgets count blocks only, columns or not)."""
    budgets = head_budgets(q, k, cfg, scale=scale, scores=scores)
    return dense_fallback(select_blocks(scores, budgets, q.shape[1], cfg), k.shape[2], cfg, early=early)


def _needs_plan(q, k, cfg: ProxyAttnConfig, scale, early, scores, columns) -> BlockPlan:
    """Plan of block_recall: every (head, query block) keeps its own need (the mass of the vertical columns, when
    there are any, counts as held)."""
    hkv = k.shape[2]
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "needs_plan") and hkv % scores.shape[1] == 0:
        return backend.needs_plan(q, k, scores, cfg, resolve_scale(scale, q.shape[-1]), early=early, columns=columns)
    needs = _reference_needs(q, k, scores, cfg, resolve_scale(scale, q.shape[-1]), early, columns=columns)
    plan = select_blocks(scores, reference.needs_budgets(needs, cfg.min_budget_blocks), q.shape[1], cfg, needs=needs)
    return dense_fallback(plan, hkv, cfg, early=early)


def reference_plan(q, k, config: ProxyAttnConfig, *, scale: float) -> BlockPlan:
    """`plan_blocks` computed with the fp32 reference on q's device whatever the device (any estimator, every rule,
    the dense fallback): what the transformers reference path (`attn_implementation="proxyattn_ref"`) runs."""
    from . import variants

    early = None
    if config.dense_density_permille > 0 and config.budget_fraction is None:
        early = _reference_early_groups(q, k, config, scale)
    columns = proxy_columns(q, k, config, scale=scale)
    scores = variants.proxy_scores(q, k, config, scale, _column_exclusion(config, columns, q.shape[1]))
    plan = _rule_path(config).reference_plan(q, k, config, scale, early, scores, columns)
    plan = dense_fallback(plan, k.shape[2], config, early=early)
    return plan if columns is None else dataclasses.replace(plan, columns=columns)


def _reference_budget_plan(q, k, config: ProxyAttnConfig, scale: float, early, scores, columns) -> BlockPlan:
    """`reference_plan` of mass / recall / row_recall and of budget_fraction (before the dense fallback)."""
    s, nb = q.shape[1], -(-q.shape[1] // config.block_size)
    if config.budget_fraction is not None:
        budgets = reference.fraction_budgets(q.shape[0], q.shape[2], nb, config.budget_fraction, q.device)
    else:
        budgets = reference.rule_budgets(
            q,
            k,
            scores,
            block_size=config.block_size,
            gamma=config.gamma,
            scale=scale,
            budget_rule=config.budget_rule,
            keep_sink=config.keep_sink,
            keep_diagonal=config.keep_diagonal,
        )
    return compact_plan(scores, budgets, s, config)


def _reference_needs_plan(q, k, config: ProxyAttnConfig, scale: float, early, scores, columns) -> BlockPlan:
    """`reference_plan` of block_recall (before the dense fallback)."""
    needs = _reference_needs(q, k, scores, config, scale, early, columns=columns)
    return compact_plan_needs(scores, needs, reference.needs_budgets(needs, config.min_budget_blocks), q.shape[1], config)


class _RulePath(NamedTuple):
    """What a budget rule runs in the Python API (each called with the arguments its functions above take)."""

    budgets: Callable[..., torch.Tensor]  # head_budgets (budget_fraction unset)
    plan: Callable[..., BlockPlan]  # plan_blocks: GPU backend where it has the stage, else the reference
    reference_plan: Callable[..., BlockPlan]  # reference_plan: the fp32 reference whatever the device


_LAST_BLOCK = _RulePath(_last_block_budgets, _budget_plan, _reference_budget_plan)
_PER_QUERY_BLOCK = _RulePath(_block_recall_budgets, _needs_plan, _reference_needs_plan)

# BudgetRule -> its path: the Python API's one dispatch on the budget rule (budget_fraction takes _LAST_BLOCK).
_RULES: dict[BudgetRule, _RulePath] = {
    BudgetRule.MASS: _LAST_BLOCK,
    BudgetRule.RECALL: _LAST_BLOCK,
    BudgetRule.ROW_RECALL: _LAST_BLOCK,
    BudgetRule.BLOCK_RECALL: _PER_QUERY_BLOCK,
}


def _rule_path(cfg: ProxyAttnConfig) -> _RulePath:
    return _LAST_BLOCK if cfg.budget_fraction is not None else _RULES[cfg.budget_rule]


def _reference_needs(
    q, k, scores, cfg: ProxyAttnConfig, scale: float, early=None, *, last_only: bool = False, columns=None
) -> torch.Tensor:
    """block_recall's needs by the reference, as the plan uses them: the groups of `early` (`early_dense_groups`)
    are not measured and need every block; `columns` (`proxy_columns`) hold their mass before any block."""
    return reference.block_needs(
        q,
        k,
        scores,
        block_size=cfg.block_size,
        gamma=cfg.gamma,
        scale=scale,
        rows=cfg.recall_rows,
        keep_sink=cfg.keep_sink,
        keep_diagonal=cfg.keep_diagonal,
        skip_groups=early,
        last_only=last_only,
        columns=columns,
    )


def _reference_early_groups(q, k, cfg: ProxyAttnConfig, scale: float) -> torch.Tensor:
    """`early_dense_groups` by the reference on q's device: the paper's budgets of the last query block, per group."""
    budgets = reference.rule_budgets(
        q,
        k,
        None,
        block_size=cfg.block_size,
        gamma=cfg.gamma,
        scale=scale,
        budget_rule=BudgetRule.MASS,
        keep_sink=cfg.keep_sink,
        keep_diagonal=cfg.keep_diagonal,
    )
    nb_seq = torch.full((q.shape[0],), -(-q.shape[1] // cfg.block_size), device=q.device, dtype=torch.int64)
    return reference.early_dense_groups(budgets, k.shape[2], cfg.dense_density_permille, nb_seq)


def _check_plan(q, plan: BlockPlan) -> None:
    if not isinstance(plan, BlockPlan):
        raise ValueError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    b, s, hq, _ = q.shape
    if plan.seq_len != s or plan.counts.shape[:2] != (b, hq):
        raise ValueError(
            f"plan covers B={plan.counts.shape[0]}, Hq={plan.counts.shape[1]}, S={plan.seq_len} but q has B={b}, Hq={hq}, S={s}"
        )
    if plan.counts.device != q.device:
        raise ValueError(f"plan is on {plan.counts.device} but q is on {q.device}")
    if plan.columns is not None and plan.columns.device != q.device:
        raise ValueError(f"plan.columns is on {plan.columns.device} but q is on {q.device}")


def _refuse_columns(what: str, column_fraction: float) -> None:
    if column_fraction:
        raise ValueError(
            f"column_fraction={column_fraction}: {what} does not take vertical columns; allowed: 0 "
            "(packed batches run blocks only; pad to one sequence per call to use columns)"
        )


def block_sparse_attention_with_lse(q, k, v, plan: BlockPlan, *, scale: float | None = None):
    """Causal attention restricted to the plan's kept blocks (and its columns, `BlockPlan.columns`).

    Returns (out `[B, S, Hq, D]` in q.dtype, lse `[B, Hq, S]` float32, natural log of each row's softmax sum).
    """
    _check_inputs(q, k, v)
    _check_plan(q, plan)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention_with_lse"):
        return backend.block_sparse_attention_with_lse(q, k, v, plan, sc)
    out, lse = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=sc, columns=plan.columns)
    return out.to(q.dtype), lse


def block_sparse_attention(q, k, v, plan: BlockPlan, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention restricted to the plan's kept blocks (and its columns): `[B, S, Hq, D]` in q.dtype."""
    _check_inputs(q, k, v)
    _check_plan(q, plan)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention"):
        return backend.block_sparse_attention(q, k, v, plan, sc)
    out, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=sc, columns=plan.columns)
    return out.to(q.dtype)


def dense_attention(q, k, v, *, scale: float | None = None) -> torch.Tensor:
    """Exact causal attention `[B, S, Hq, D]` in q.dtype (the fastest dense kernel on CUDA)."""
    _check_inputs(q, k, v)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "dense_attention"):
        return backend.dense_attention(q, k, v, sc)
    return reference.dense_attention(q, k, v, sc).to(q.dtype)


def proxy_attention(q, k, v, config: ProxyAttnConfig | None = None, *, scale: float | None = None) -> torch.Tensor:
    """ProxyAttn causal prefill: `[B, S, Hq, D]` in q.dtype.

    Sequences with S <= config.dense_below_tokens take the dense path; otherwise plan + block-sparse attention, with
    the dense fallback. In eager mode the early decision (`early_dense_groups`, e.g. diffuse attention) is read on
    the host once: when every KV group is dense the dense kernel runs without computing a plan, otherwise the early
    groups run through the dense kernel and every other head through the block-sparse kernel (groups the plan makes
    dense later as full rows). Under CUDA graph capture the plan marks the groups and they run as full rows.
    """
    cfg = _config(config)
    _check_inputs(q, k, v)
    check_proxy_heads(cfg.proxy_heads, k.shape[2])
    if q.shape[1] <= cfg.dense_below_tokens:
        return dense_attention(q, k, v, scale=scale)
    early = early_dense_groups(q, k, cfg, scale=scale)
    capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
    if early is None or capturing:
        return block_sparse_attention(q, k, v, _plan(q, k, cfg, scale, early), scale=scale)
    early_host = early.cpu()  # the one host read of eager mode
    if bool(early_host.all()):
        return dense_attention(q, k, v, scale=scale)
    plan = _plan(q, k, cfg, scale, early)
    backend = _kernels(q)
    if plan.columns is None and backend is not None and hasattr(backend, "block_sparse_attention_split"):
        # The early groups through the dense kernel; groups the plan made dense later run as full rows (no second read).
        return backend.block_sparse_attention_split(q, k, v, plan, resolve_scale(scale, q.shape[-1]), early, early_host)
    return block_sparse_attention(q, k, v, plan, scale=scale)


# ------------------------------------------------------------------------------------------- variable length
# Packed batches as flash-attn's varlen API: q `[T, Hq, D]`, k and v `[T, Hkv, D]`, cu_seqlens int32 `[B+1]`
# (sequence i holds tokens cu_seqlens[i]..cu_seqlens[i+1]-1) and a host int max_seqlen. A varlen plan is a
# BlockPlan padded to max_seqlen: order `[B, R, Nb, Nb]`, counts `[B, Hq, Nb]`, Nb = ceil(max_seqlen /
# block_size), seq_len = max_seqlen; row b covers sequence b and entries of query blocks past its end are unused.


def _check_varlen(q, k, v, cu_seqlens, max_seqlen) -> None:
    named = [("q", q), ("k", k), ("v", v)]
    for name, t in named:
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dim tensor [T, H, D], got {getattr(t, 'shape', type(t).__name__)}")
    _check_inputs(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be a 1-dim tensor [B+1] with B >= 1, got {getattr(cu_seqlens, 'shape', cu_seqlens)}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens.dtype={cu_seqlens.dtype} must be torch.int32")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens.device={cu_seqlens.device} differs from q.device={q.device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 1:
        raise ValueError(f"max_seqlen={max_seqlen!r} must be a positive host int")
    if not q.is_cuda:  # reading cu_seqlens back would synchronise a GPU, so the values are checked on the CPU only
        lens = cu_seqlens[1:] - cu_seqlens[:-1]
        if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0] or bool((lens < 0).any()):
            raise ValueError(f"cu_seqlens={cu_seqlens.tolist()} must start at 0, not decrease and end at T={q.shape[0]}")
        if int(lens.max()) > max_seqlen:
            raise ValueError(f"max_seqlen={max_seqlen} is below the longest sequence ({int(lens.max())} tokens)")


def _check_varlen_plan(plan, batch: int, num_q_heads: int, max_seqlen: int, device) -> None:
    if not isinstance(plan, BlockPlan):
        raise ValueError(f"plan must be a BlockPlan, got {type(plan).__name__}")
    if plan.seq_len != max_seqlen or plan.counts.shape[:2] != (batch, num_q_heads):
        raise ValueError(
            f"varlen plan covers B={plan.counts.shape[0]}, Hq={plan.counts.shape[1]}, S={plan.seq_len} "
            f"but the batch has B={batch}, Hq={num_q_heads}, max_seqlen={max_seqlen}"
        )
    if plan.counts.device != device:
        raise ValueError(f"plan is on {plan.counts.device} but q is on {device}")
    if plan.columns is not None:
        raise ValueError("plan.columns is set: packed batches take plans without vertical columns (columns=None)")


def _sequence_plan(plan: BlockPlan, i: int, length: int) -> BlockPlan:
    """Row i of a varlen plan as the BlockPlan of one sequence of `length` tokens."""
    nb = -(-length // plan.block_size)
    return BlockPlan(
        plan.order[i : i + 1, :, :nb, :nb].contiguous(),
        plan.counts[i : i + 1, :, :nb].contiguous(),
        plan.budget_blocks[i : i + 1].contiguous(),
        plan.block_size,
        length,
    )


def _varlen_reference(q, k, v, cu_seqlens, plan: BlockPlan, scale: float):
    """Loop over the sequences calling the batched reference: (out `[T, Hq, D]` fp32, lse `[Hq, T]` fp32)."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device)
    cu = cu_seqlens.tolist()
    for i in range(len(cu) - 1):
        lo, hi = cu[i], cu[i + 1]
        if hi == lo:
            continue
        p = _sequence_plan(plan, i, hi - lo)
        o, l = reference.block_sparse_attention(
            q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], p.to_mask(), block_size=p.block_size, scale=scale
        )
        out[lo:hi], lse[:, lo:hi] = o[0], l[0]
    return out, lse


def block_sparse_attention_varlen_with_lse(q, k, v, cu_seqlens, max_seqlen: int, plan: BlockPlan, *, scale: float | None = None):
    """Block-sparse causal attention over a packed batch (see the section comment for the layout).

    Returns (out `[T, Hq, D]` in q.dtype, lse `[Hq, T]` float32 natural log).
    """
    _check_varlen(q, k, v, cu_seqlens, max_seqlen)
    _check_varlen_plan(plan, cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen, q.device)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention_varlen_with_lse"):
        return backend.block_sparse_attention_varlen_with_lse(q, k, v, cu_seqlens, max_seqlen, plan, sc)
    out, lse = _varlen_reference(q, k, v, cu_seqlens, plan, sc)
    return out.to(q.dtype), lse


def block_sparse_attention_varlen(q, k, v, cu_seqlens, max_seqlen: int, plan: BlockPlan, *, scale: float | None = None) -> torch.Tensor:
    """Block-sparse causal attention over a packed batch: out `[T, Hq, D]` in q.dtype."""
    _check_varlen(q, k, v, cu_seqlens, max_seqlen)
    _check_varlen_plan(plan, cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen, q.device)
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "block_sparse_attention_varlen"):
        return backend.block_sparse_attention_varlen(q, k, v, cu_seqlens, max_seqlen, plan, sc)
    return _varlen_reference(q, k, v, cu_seqlens, plan, sc)[0].to(q.dtype)


def plan_blocks_varlen(
    q, k, cu_seqlens, max_seqlen: int, config: ProxyAttnConfig | None = None, *, scale: float | None = None
) -> BlockPlan:
    """The ProxyAttn plan of a packed batch, padded to max_seqlen (layout: see the section comment).

    Sequences of at most `config.dense_below_tokens` tokens get the full causal plan (equal to dense attention).
    Uses the GPU backend's `plan_blocks_varlen` when it has one; otherwise plans each sequence with `plan_blocks`,
    which reads cu_seqlens on the host (a device synchronisation on CUDA).
    """
    cfg = _config(config)
    _refuse_columns("plan_blocks_varlen", cfg.column_fraction)
    _check_varlen(q, k, k, cu_seqlens, max_seqlen)
    check_proxy_heads(cfg.proxy_heads, k.shape[1])
    sc = resolve_scale(scale, q.shape[-1])
    backend = _kernels(q)
    if backend is not None and hasattr(backend, "plan_blocks_varlen") and cfg.estimator in backend.VARLEN_SCORES:
        return backend.plan_blocks_varlen(q, k, cu_seqlens, max_seqlen, cfg, sc)
    batch, hq = cu_seqlens.shape[0] - 1, q.shape[1]
    nb = -(-max_seqlen // cfg.block_size)
    # R = Hq rows: short (dense) sequences and planned ones share one layout whatever proxy_heads is.
    order = torch.arange(nb, dtype=torch.int32, device=q.device).expand(batch, hq, nb, nb).contiguous()
    counts = torch.arange(1, nb + 1, dtype=torch.int32, device=q.device).expand(batch, hq, nb).contiguous()
    budgets = torch.full((batch, hq), nb, dtype=torch.int32, device=q.device)
    cu = cu_seqlens.tolist()
    for i in range(batch):
        lo, hi = cu[i], cu[i + 1]
        if hi - lo <= cfg.dense_below_tokens:
            continue
        p = plan_blocks(q[None, lo:hi], k[None, lo:hi], cfg, scale=sc)
        n = p.num_blocks
        order[i, :, :n, :n] = p.head_orders()[0]
        counts[i, :, :n] = p.counts[0]
        counts[i, :, n:] = 0
        budgets[i] = p.budget_blocks[0]
    nb_seq = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64).add(cfg.block_size - 1).div(cfg.block_size, rounding_mode="floor")
    return dense_fallback(BlockPlan(order, counts, budgets, cfg.block_size, max_seqlen), k.shape[1], cfg, nb_seq)


def proxy_attention_varlen(
    q, k, v, cu_seqlens, max_seqlen: int, config: ProxyAttnConfig | None = None, *, scale: float | None = None
) -> torch.Tensor:
    """ProxyAttn causal prefill of a packed batch: out `[T, Hq, D]` in q.dtype.

    Every sequence is treated as `proxy_attention` treats it alone (dense at most `dense_below_tokens` tokens,
    else plan + block-sparse attention). On the CPU this loops over the sequences calling `proxy_attention`.
    """
    cfg = _config(config)
    _refuse_columns("proxy_attention_varlen", cfg.column_fraction)
    _check_varlen(q, k, v, cu_seqlens, max_seqlen)
    check_proxy_heads(cfg.proxy_heads, k.shape[1])
    if not q.is_cuda:
        out = torch.zeros_like(q)
        cu = cu_seqlens.tolist()
        for lo, hi in zip(cu[:-1], cu[1:]):
            if hi > lo:
                out[lo:hi] = proxy_attention(q[None, lo:hi], k[None, lo:hi], v[None, lo:hi], cfg, scale=scale)[0]
        return out
    plan = plan_blocks_varlen(q, k, cu_seqlens, max_seqlen, cfg, scale=scale)
    return block_sparse_attention_varlen(q, k, v, cu_seqlens, max_seqlen, plan, scale=scale)
