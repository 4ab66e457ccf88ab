"""ProxyAttn as a transformers attention implementation (transformers 5.x, through `AttentionInterface`).

    import proxyattn.hf
    proxyattn.hf.register(ProxyAttnConfig(gamma=0.95))
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="proxyattn")
    # or, on a loaded model: model.set_attn_implementation("proxyattn")

Two names are registered, each with transformers' SDPA mask function (`sdpa_mask`) as its mask function:

* `"proxyattn"`: the sparse path runs `proxyattn.proxy_attention` (Triton kernels for CUDA tensors, the fp32
  reference on the CPU);
* `"proxyattn_ref"`: the sparse path always runs the fp32 reference (`proxyattn.reference`), on any device.

Which path a call takes (`choose_path`): only a causal prefill of a full-attention layer over a long prompt is sparse.
The mask function returns no mask exactly when the pattern is plain causal over the whole prompt (no padding, no
sliding window reaching back past its window, no cache prefix), so

* decode steps and chunked prefill (query length != key length, or one query), padded batches (a real padding
  mask), packed sequences, sliding-window layers (Gemma 3 local layers, Mistral with a window, Qwen2 sliding
  layers: any call with `sliding_window` set), non-causal modules, attention dropout, logit soft-capping,
  position biases, prompts with S <= `dense_below_tokens`, and layers kept dense by `dense_first_layers` /
  `dense_layer_mask` run transformers' stock SDPA attention with the mask transformers built (bit for bit what
  `attn_implementation="sdpa"` computes);
* everything else (causal, no mask, S == key length > `dense_below_tokens`, layer selected) is sparse.

`generate()` therefore prefills sparsely and decodes densely over the same, intact KV cache.

While exporting (`torch.compiler.is_exporting()`), every call returns
`emit(query, key, value, config=..., scale=..., sliding_window=..., layer_idx=...)` ([B, H, S, D] in, [B, Hq, S, D]
out) of the function installed with `set_export_attention(emit)`, so that the exported graph holds one custom node
per layer. This package does not know the exporter: `export.onnx_export.export_model` installs the ONNX contract's
`export.contract.emit_proxy_attention` for the duration of an export; exporting with no function installed is an
error naming the fix.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import reference
from .api import proxy_attention, reference_plan
from .config import ProxyAttnConfig
from .tp import shard_config

__all__ = [
    "NAMES",
    "register",
    "active_config",
    "set_export_attention",
    "choose_path",
    "PathRecord",
    "record_paths",
    "proxyattn_attention_forward",
    "proxyattn_ref_attention_forward",
    "reference_proxy_attention",
]

NAMES = ("proxyattn", "proxyattn_ref")

# The configuration the registered functions use; `register` replaces it.
# `export_attention`: what every call returns while exporting (`set_export_attention`).
_state: dict = {"config": ProxyAttnConfig(), "export_attention": None}
# Active `record_paths` lists (innermost last).
_recorders: list[list] = []


@dataclass(frozen=True)
class PathRecord:
    """One attention call: which layer, which path (`"sparse"` or `"dense:<reason>"`) and the shapes."""

    layer_idx: int | None
    path: str
    q_len: int
    kv_len: int
    implementation: str


def register(config: ProxyAttnConfig | None = None) -> ProxyAttnConfig:
    """Register `"proxyattn"` and `"proxyattn_ref"` with transformers' attention and mask interfaces.

    Args:
        config: the `ProxyAttnConfig` every later call uses (default `ProxyAttnConfig()`); calling `register`
            again replaces it (models already loaded pick it up on their next forward).
    Returns:
        The active config.
    """
    if config is None:
        config = ProxyAttnConfig()
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig or None, got {type(config).__name__}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    _state["config"] = config
    AttentionInterface.register("proxyattn", proxyattn_attention_forward)
    AttentionInterface.register("proxyattn_ref", proxyattn_ref_attention_forward)
    for name in NAMES:
        AttentionMaskInterface.register(name, sdpa_mask)
    return config


def active_config() -> ProxyAttnConfig:
    """The config the registered attention functions use now."""
    return _state["config"]


def set_export_attention(emit: Callable[..., torch.Tensor] | None) -> Callable[..., torch.Tensor] | None:
    """Install the function every attention call returns while exporting (`torch.compiler.is_exporting()`).

    Args:
        emit: `emit(query, key, value, *, config, scale, sliding_window, layer_idx)` with query `[B, Hq, S, D]`,
            key / value `[B, Hkv, S, D]`, returning `[B, Hq, S, D]` (the exporter's custom node), or None to remove it.
    Returns:
        The function installed before (so that a caller can put it back).
    """
    if emit is not None and not callable(emit):
        raise ValueError(f"emit must be callable or None, got {type(emit).__name__}")
    previous = _state["export_attention"]
    _state["export_attention"] = emit
    return previous


@contextlib.contextmanager
def record_paths() -> Iterator[list[PathRecord]]:
    """Collect a `PathRecord` for every attention call made inside the `with` block (for tests and debugging)."""
    records: list[PathRecord] = []
    _recorders.append(records)
    try:
        yield records
    finally:
        # By identity: nested recorders may hold equal lists (list.remove compares by equality).
        del _recorders[next(i for i, r in enumerate(_recorders) if r is records)]


def choose_path(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    config: ProxyAttnConfig,
    *,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    is_causal: bool | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
) -> str:
    """`"sparse"` or `"dense:<reason>"` for one attention call (query `[B, Hq, Sq, D]`, key `[B, Hkv, Skv, D]`)."""
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if not causal:
        return "dense:not_causal"
    if q_len == 1:
        return "dense:decode"
    if attention_mask is not None:
        # sdpa_mask builds a mask only for padding, packing, windows reaching back, or a cache prefix
        return "dense:cached" if kv_len != q_len else "dense:mask"
    # No mask and q_len > 1: the keys start at position 0 (transformers skips the mask only then).
    if window is not None:
        return "dense:sliding_window"
    if dropout and dropout > 0.0:
        return "dense:dropout"
    if softcap is not None or position_bias is not None:
        return "dense:bias"
    if q_len <= config.dense_below_tokens:
        return "dense:short"
    layer_idx = getattr(module, "layer_idx", None)
    if layer_idx is None:
        if config.dense_first_layers or config.dense_layer_mask:
            raise ValueError(
                f"{type(module).__name__} has no layer_idx, so dense_first_layers={config.dense_first_layers} / "
                f"dense_layer_mask={config.dense_layer_mask} cannot be applied"
            )
    elif not config.layer_is_sparse(int(layer_idx)):
        return "dense:layer"
    return "sparse"


def reference_proxy_attention(q, k, v, config: ProxyAttnConfig, *, scale: float) -> torch.Tensor:
    """The whole ProxyAttn prefill with the fp32 reference on q's device: `[B, S, Hq, D]` in q.dtype (the plan of
    `api.reference_plan`, dense fallback included; dense groups keep every causal block, which is dense attention)."""
    if q.shape[1] <= config.dense_below_tokens:
        return reference.dense_attention(q, k, v, scale).to(q.dtype)
    plan = reference_plan(q, k, config, scale=scale)
    out, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=config.block_size, scale=scale)
    return out.to(q.dtype)


def _forward(implementation: str, module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    config = _state["config"]
    layer_idx = getattr(module, "layer_idx", None)
    if torch.compiler.is_exporting():
        emit = _state["export_attention"]
        if emit is None:
            raise RuntimeError(
                "exporting a model whose attention is 'proxyattn' needs the exporter's node: use "
                "export.onnx_export.export_model, or install one with proxyattn.hf.set_export_attention"
            )
        out = emit(query, key, value, config=config, scale=scaling, sliding_window=sliding_window, layer_idx=layer_idx)
        return out.transpose(1, 2), None
    # Under transformers' tensor parallelism this call holds one shard's heads: its groups (proxyattn.tp).
    config = shard_config(config, module, query.shape[1], key.shape[1])
    path = choose_path(
        module,
        query,
        key,
        attention_mask,
        config,
        dropout=dropout,
        sliding_window=sliding_window,
        is_causal=kwargs.get("is_causal"),
        softcap=kwargs.get("softcap"),
        position_bias=kwargs.get("position_bias"),
    )
    for records in _recorders:
        records.append(PathRecord(layer_idx, path, query.shape[2], key.shape[2], implementation))
    if path != "sparse":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs
        )
    q_len = query.shape[2]
    # An empty static cache can hand over keys longer than the prompt; causal attention never reads past q_len.
    q = query.transpose(1, 2)
    k = key[:, :, :q_len].transpose(1, 2)
    v = value[:, :, :q_len].transpose(1, 2)
    if implementation == "proxyattn":
        out = proxy_attention(q, k, v, config, scale=scaling)
    else:
        from ._checks import check_proxy_heads, check_qk, resolve_scale

        check_qk(q, k, v)
        check_proxy_heads(config.proxy_heads, k.shape[2])
        out = reference_proxy_attention(q, k, v, config, scale=resolve_scale(scaling, q.shape[-1]))
    return out, None


def proxyattn_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """transformers attention function `"proxyattn"`: query `[B, Hq, Sq, D]`, key/value `[B, Hkv, Skv, D]` ->
    (`[B, Sq, Hq, D]`, None). Sparse path: `proxyattn.proxy_attention` (kernels on CUDA, reference on the CPU)."""
    return _forward("proxyattn", module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)


def proxyattn_ref_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """transformers attention function `"proxyattn_ref"`: like `"proxyattn"`, sparse path always the fp32 reference."""
    return _forward("proxyattn_ref", module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
