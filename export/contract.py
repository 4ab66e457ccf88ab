"""The ONNX node contract of ProxyAttn: the one place that defines `proxy::ProxyAttention`.

Node
    op type `ProxyAttention`, domain `proxy`, one node per attention layer.

Inputs and output (transformers layout, GQA not expanded)
    0 `query` `[B, Hq, S, D]`
    1 `key`   `[B, Hkv, S, D]`   (Hq a multiple of Hkv; query head h reads KV head h // (Hq / Hkv))
    2 `value` `[B, Hkv, S, D]`
    out       `[B, Hq, S, D]`, the dtype of `query` (float32, float16 or bfloat16).

Attributes (only INT and FLOAT reach a TensorRT plugin, so every numeric value is one of those)
    `pa_*`            the `ProxyAttnConfig.to_attrs()` fields (INT / FLOAT).
    `scale`           FLOAT, the softmax scale (never implicit: transformers passes it, Gemma 3 uses 1/16 for D=256).
    `is_causal`       INT, always 1 (causal prefill is the only mode).
    `sliding_window`  INT, 0 for full causal attention; W > 0 means query i sees keys j with i - W < j <= i
                      (transformers' convention). Always present, so a runtime that ignores it cannot be silently
                      right by accident: a runtime that cannot honour W > 0 must refuse the node.
    `plugin_namespace` STRING "proxy" and `plugin_version` STRING "1": how TensorRT's ONNX parser finds the plugin.

Semantics (`reference_semantics` below is the executable definition)
    `sliding_window == 0`: `proxyattn.proxy_attention(q, k, v, config, scale=scale)` on the transposed tensors,
    i.e. the ProxyAttn algorithm, dense below `config.dense_below_tokens`.
    The model-level fields `pa_dense_first_layers` / `pa_dense_layer_mask` are carried but do not act on a node:
    `emit_proxy_attention` gives a layer the config keeps dense `pa_dense_below_tokens = 2**31 - 1` instead.
    `sliding_window > 0`: exact causal sliding-window attention (the window is already local; ProxyAttn's selection
    applies only to full-attention layers, as in the transformers integration).
    The model-local ONNX function of the same name (see `export.onnx_export`) runs dense attention with the window,
    so that a runtime without the plugin runs the file unchanged.

Float attributes travel as float32. Decoding rounds `pa_*` floats to 7 significant digits, so a config value given
with at most 7 significant digits (0.95, 0.9, 0.125, ...) comes back exactly; `encode_attrs` refuses any other
(`gamma=0.9123456789` would silently become 0.9123457).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from proxyattn.api import proxy_attention
from proxyattn.config import ATTR_PREFIX, ProxyAttnConfig

OP_TYPE = "ProxyAttention"
DOMAIN = "proxy"
DOMAIN_VERSION = 1
PLUGIN_NAMESPACE = "proxy"
PLUGIN_VERSION = "1"
INPUT_NAMES = ("query", "key", "value")
OUTPUT_NAMES = ("output",)
# Attribute names beside the config's `pa_*` ones, in the order nodes carry them.
EXTRA_INT_ATTRS = ("is_causal", "sliding_window")
EXTRA_FLOAT_ATTRS = ("scale",)
STRING_ATTRS = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
# Metadata key on each node (not an attribute: it never reaches a plugin) naming the transformers layer.
LAYER_IDX_KEY = "proxyattn.layer_idx"

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def attribute_names(config: ProxyAttnConfig | None = None) -> list[str]:
    """Every attribute a `ProxyAttention` node carries (the local function declares exactly these)."""
    cfg = ProxyAttnConfig() if config is None else config
    return list(cfg.to_attrs()) + list(EXTRA_FLOAT_ATTRS) + list(EXTRA_INT_ATTRS) + list(STRING_ATTRS)


def _float32_roundtrip(value: float) -> float:
    """The value a FLOAT attribute decodes to: float32, then 7 significant digits."""
    f32 = float(torch.tensor(value, dtype=torch.float32).item())
    return float(f"{f32:.7g}")


def encode_attrs(config: ProxyAttnConfig, *, scale: float, sliding_window: int | None = None) -> dict[str, int | float | str]:
    """The attributes of one node; raises ValueError for anything the contract cannot carry."""
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig, got {type(config).__name__}")
    attrs: dict[str, int | float | str] = {}
    for key, value in config.to_attrs().items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config attribute {key}={value!r} is not an int or float; the ONNX/TensorRT contract carries only those")
        if isinstance(value, int):
            if not _INT32_MIN <= value <= _INT32_MAX:
                raise ValueError(f"config attribute {key}={value} does not fit int32 (TensorRT plugin fields are int32)")
        else:
            if not math.isfinite(value) or _float32_roundtrip(value) != value:
                raise ValueError(
                    f"config attribute {key}={value!r} does not survive the float32 attribute round trip "
                    f"(would become {_float32_roundtrip(value)!r}); give it with at most 7 significant digits"
                )
        attrs[key] = value
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite number")
    attrs["scale"] = float(scale)
    attrs["is_causal"] = 1
    window = 0 if sliding_window is None else sliding_window
    if isinstance(window, bool) or not isinstance(window, int) or not 0 <= window <= _INT32_MAX:
        raise ValueError(f"sliding_window={sliding_window!r} must be None or a positive int32 (0 means full attention)")
    attrs["sliding_window"] = int(window)
    attrs.update(STRING_ATTRS)
    return attrs


def decode_attrs(attrs: Mapping[str, Any]) -> tuple[ProxyAttnConfig, float, int]:
    """(config, scale, sliding_window) from a node's attributes (as read from ONNX: floats are float32)."""
    missing = [n for n in ("scale", "is_causal", "sliding_window") if n not in attrs]
    if missing:
        raise ValueError(f"ProxyAttention node lacks attributes {missing}; it carries {sorted(attrs)}")
    if int(attrs["is_causal"]) != 1:
        raise ValueError(f"is_causal={attrs['is_causal']!r}: only causal attention (1) is supported")
    for key, expected in STRING_ATTRS.items():
        got = attrs.get(key, expected)
        got = got.decode() if isinstance(got, bytes) else got
        if got != expected:
            raise ValueError(f"{key}={got!r}; this contract is {key}={expected!r}")
    pa = {}
    for key, value in attrs.items():
        if key.startswith(ATTR_PREFIX):
            pa[key] = float(f"{float(value):.7g}") if isinstance(value, float) else value
    config = ProxyAttnConfig.from_attrs(pa)
    scale = float(attrs["scale"])
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale={scale!r} must be a positive finite number")
    window = int(attrs["sliding_window"])
    if window < 0:
        raise ValueError(f"sliding_window={window} must be >= 0")
    return config, scale, window


def _check_layout(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-d tensor [B, H, S, D], got {getattr(t, 'shape', type(t).__name__)}")
    b, hq, s, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[2] != s or key.shape[3] != d:
        raise ValueError(f"key {tuple(key.shape)} / value {tuple(value.shape)} do not match query {tuple(query.shape)} as [B, Hkv, S, D]")
    if key.shape[1] == 0 or hq % key.shape[1]:
        raise ValueError(f"query heads Hq={hq} must be a multiple of KV heads Hkv={key.shape[1]}")


def sliding_window_attention(query, key, value, *, scale: float, window: int) -> torch.Tensor:
    """Exact causal sliding-window attention in float32, `[B, H, S, D]` layout; returns float32."""
    b, hq, s, d = query.shape
    rep = hq // key.shape[1]
    q = query.float()
    k = key.float().repeat_interleave(rep, dim=1)
    v = value.float().repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    allowed = (j <= i) & (j > i - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def reference_semantics(query, key, value, *, config: ProxyAttnConfig, scale: float, sliding_window: int = 0) -> torch.Tensor:
    """What a `ProxyAttention` node computes, `[B, Hq, S, D]` in query.dtype (fp32 reference on the CPU)."""
    _check_layout(query, key, value)
    if sliding_window:
        out = sliding_window_attention(query, key, value, scale=scale, window=sliding_window)
        return out.to(query.dtype)
    out = proxy_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), config, scale=scale)
    return out.transpose(1, 2).to(query.dtype)


def emit_proxy_attention(
    query, key, value, *, config: ProxyAttnConfig, scale: float | None, sliding_window: int | None = None, layer_idx: int | None = None
) -> torch.Tensor:
    """One `proxy::ProxyAttention` node while `torch.onnx.export` runs; the reference semantics otherwise.

    Args:
        query: `[B, Hq, S, D]`; key, value: `[B, Hkv, S, D]` (GQA not expanded).
        config: the ProxyAttn config the node carries.
        scale: softmax scale; None means 1/sqrt(D) (transformers' default).
        sliding_window: None or 0 for full attention, W > 0 for a sliding window of W tokens.
        layer_idx: recorded in the node's metadata (`proxyattn.layer_idx`), not as an attribute.
    Returns:
        `[B, Hq, S, D]` in query.dtype.
    """
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig, got {type(config).__name__}")
    if layer_idx is not None and not config.layer_is_sparse(int(layer_idx)):
        # A layer the config keeps dense (dense_first_layers / dense_layer_mask): the node says so itself.
        config = config.replace(dense_below_tokens=_INT32_MAX)
    if scale is None:  # transformers' convention when a module passes no scaling
        scale = 1.0 / math.sqrt(query.shape[-1])
    attrs = encode_attrs(config, scale=scale, sliding_window=sliding_window)
    if not torch.onnx.is_in_onnx_export():
        return reference_semantics(query, key, value, config=config, scale=float(scale), sliding_window=int(attrs["sliding_window"]))
    _check_layout(query, key, value)
    metadata = {LAYER_IDX_KEY: str(int(layer_idx))} if layer_idx is not None else None
    out = torch.onnx.ops.symbolic(
        f"{DOMAIN}::{OP_TYPE}",
        (query, key, value),
        attrs,
        dtype=query.dtype,
        shape=query.shape,
        version=DOMAIN_VERSION,
        metadata_props=metadata,
    )
    if out.device != query.device:
        # The symbolic op's placeholder lives on the CPU; a model traced on `meta` (large-model export) needs it
        # on the model's device. Exports as a no-op.
        out = out.to(query.device)
    return out


__all__ = [
    "OP_TYPE",
    "DOMAIN",
    "DOMAIN_VERSION",
    "PLUGIN_NAMESPACE",
    "PLUGIN_VERSION",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "LAYER_IDX_KEY",
    "attribute_names",
    "encode_attrs",
    "decode_attrs",
    "reference_semantics",
    "sliding_window_attention",
    "emit_proxy_attention",
]
