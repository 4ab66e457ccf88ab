"""Measure ProxyAttn's block density while a transformers model runs (used by the build's parity stage).

`measure_density(model, ids, config)` runs the model once with the attention function `"proxyattn_measure"`:
it returns exactly what `"proxyattn_ref"` returns (the fp32 reference of ProxyAttn) and, for every call that takes
the sparse path (`proxyattn.hf.record_paths`), also records the plan's mean density (kept blocks over causal blocks,
averaged over batch and heads) from `proxyattn.plan_blocks`. Registered through transformers' AttentionInterface.
"""

from __future__ import annotations

import torch

from proxyattn import hf
from proxyattn.api import plan_blocks
from proxyattn.config import ProxyAttnConfig

__all__ = ["measure_density", "MEASURE_NAME"]

MEASURE_NAME = "proxyattn_measure"
_densities: list[list[float]] = []


def _measure_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    with hf.record_paths() as records:
        out = hf.proxyattn_ref_attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
    if records and records[-1].path == "sparse" and _densities:
        q_len = query.shape[2]
        plan = plan_blocks(query.transpose(1, 2), key[:, :, :q_len].transpose(1, 2), hf.active_config(), scale=scaling)
        _densities[-1].append(float(plan.density().mean()))
    return out


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(MEASURE_NAME, _measure_forward)
    AttentionMaskInterface.register(MEASURE_NAME, sdpa_mask)


def measure_density(model, input_ids: torch.Tensor, config: ProxyAttnConfig) -> tuple[torch.Tensor, list[float]]:
    """(logits float32 `[B, S, V]`, mean density of every sparse attention call) for one forward pass."""
    previous_config = hf.active_config()
    previous_impl = getattr(model.config, "_attn_implementation", None)
    hf.register(config)
    _register()
    _densities.append([])
    try:
        model.set_attn_implementation(MEASURE_NAME)
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False).logits.float()
        return logits, _densities[-1]
    finally:
        _densities.pop()
        hf.register(previous_config)
        if previous_impl is not None:
            model.set_attn_implementation(previous_impl)
