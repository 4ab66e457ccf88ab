"""Block-score estimators beside the paper's proxy heads (`ProxyAttnConfig.estimator`), in plain PyTorch.

* `estimator="proxy"` (0, the paper): one proxy query per group = mean of the group's query heads; token-level
  softmax on strided rows; max-pooled to blocks. `proxyattn.reference.proxy_scores` / the Triton kernel.
* `estimator="head_max"` (1, our improvement): the same strided token-level softmax, but per query head (against
  its own KV head), then max over the query heads of each proxy group and max-pooled to blocks. A block that any
  head of the group attends to strongly ranks high, so a head that retrieves what the others ignore is not starved
  by the averaged proxy query. Still one ranking per group (the compact plan and the kernels are unchanged); the
  estimation costs Hq / G times the paper's.
* `estimator="block_mean"` (2, baseline): per query head, softmax over key blocks of (mean query of block m) .
  (mean key of block n); one ranking per query head (R = Hq). Cheap, coarse: what pooled estimators do.

Budgets and selection work the same for every estimator. These functions are fp32 and run on any device: the
reference of `proxyattn.kernels.estimate_head_max` (which `proxyattn.api.proxy_scores` uses on CUDA for
head_max) and the only implementation of block_mean.
"""

from __future__ import annotations

import torch

from .config import ESTIMATORS, Estimator, ProxyAttnConfig
from .reference import _causal_rows, _expand_kv, _num_blocks
from . import reference

__all__ = ["ESTIMATORS", "proxy_scores", "head_max_scores", "block_mean_scores"]


def head_max_scores(q, k, *, proxy_heads: int, block_size: int, stride: int, scale: float) -> torch.Tensor:
    """`[B, G, Nb, Nb]` fp32: per-head strided causal softmax, max over each group's query heads, max-pooled.

    Group g holds query heads g*Hq/G .. (g+1)*Hq/G - 1 (the heads that read row g of the plan). -inf above the
    diagonal.
    """
    b, s, hq, _ = q.shape
    nb = _num_blocks(s, block_size)
    qf = q.float()
    kx = _expand_kv(k.float(), hq)
    scores = torch.full((b, proxy_heads, nb, nb), float("-inf"), device=q.device)
    for m in range(nb):
        hi = min(s, (m + 1) * block_size)
        rows = torch.arange(m * block_size, hi, stride, device=q.device)
        logits = torch.einsum("brhd,bkhd->bhrk", qf[:, rows], kx[:, :hi]) * scale
        logits = logits.masked_fill(~_causal_rows(0, hi, hi, q.device)[rows], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [B, Hq, rows, hi]
        probs = probs.reshape(b, proxy_heads, hq // proxy_heads, len(rows), hi).amax(dim=2)
        probs = torch.nn.functional.pad(probs, (0, (m + 1) * block_size - hi))
        scores[:, :, m, : m + 1] = probs.reshape(b, proxy_heads, len(rows), m + 1, block_size).amax(dim=(2, 4))
    return scores


def block_mean_scores(q, k, *, block_size: int, scale: float) -> torch.Tensor:
    """`[B, Hq, Nb, Nb]` fp32: softmax over causal key blocks of block-mean query . block-mean key, per query head."""
    b, s, hq, d = q.shape
    nb = _num_blocks(s, block_size)
    pad = nb * block_size - s
    counts = torch.full((nb,), float(block_size), device=q.device)
    counts[-1] = block_size - pad

    def pool(x):
        x = torch.nn.functional.pad(x.float(), (0, 0, 0, 0, 0, pad))
        return x.reshape(b, nb, block_size, x.shape[2], d).sum(2) / counts[None, :, None, None]

    pq, pk = pool(q), _expand_kv(pool(k), hq)  # [B, Nb, Hq, D]
    logits = torch.einsum("bmhd,bnhd->bhmn", pq, pk) * scale
    causal = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1).masked_fill(~causal, float("-inf"))


def proxy_scores(q, k, config: ProxyAttnConfig, scale: float, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Block scores of `config.estimator` (the reference of every estimator), fp32 `[B, R, Nb, Nb]` with R = G or Hq.
    exclude: bool `[B, G, S]` keys left out of the proxy estimator's max (vertical columns; config validation allows
    columns with the proxy estimator only)."""
    if exclude is not None:
        assert config.estimator is Estimator.PROXY
        return _SCORES[Estimator.PROXY](q, k, config, scale, exclude)
    return _SCORES[config.estimator](q, k, config, scale)


# Estimator -> its fp32 PyTorch scores `(q, k, config, scale)`: the reference's one dispatch on the estimator.
_SCORES = {
    Estimator.PROXY: lambda q, k, c, scale, exclude=None: reference.proxy_scores(
        q, k, proxy_heads=c.proxy_heads, block_size=c.block_size, stride=c.stride, scale=scale, exclude=exclude
    ),
    Estimator.HEAD_MAX: lambda q, k, c, scale: head_max_scores(
        q, k, proxy_heads=c.proxy_heads, block_size=c.block_size, stride=c.stride, scale=scale
    ),
    Estimator.BLOCK_MEAN: lambda q, k, c, scale: block_mean_scores(q, k, block_size=c.block_size, scale=scale),
}
