"""Tensor-parallel prefill: transformers' tensor-parallel plan shards the heads, ProxyAttn runs per shard unchanged.

    torchrun --nproc_per_node 2 my_script.py      # in my_script.py:
    import proxyattn.tp
    model = proxyattn.tp.from_pretrained(path, ProxyAttnConfig(proxy_heads=2), dtype=torch.bfloat16)

The engine is transformers' own tensor parallelism (`DistributedConfig(tp_plan="auto")`, the model's
`base_model_tp_plan`: q/k/v projections column-wise, o_proj row-wise, one all-reduce per attention and MLP block,
over torch.distributed: NCCL on GPUs, gloo on the CPU). Each rank's attention function sees its local heads only:
query `[B, Hq / N, S, D]`, key and value `[B, Hkv / N, S, D]` for TP degree N (rank r holds query heads
r*Hq/N .. (r+1)*Hq/N - 1 and the KV heads they read).

Proxy groups are aligned with shards. `proxy_heads` = G splits the Hkv KV heads into G consecutive groups; with G
a multiple of N, rank r holds exactly the global groups r*G/N .. (r+1)*G/N - 1, whole, so running the method on the
local heads with `proxy_heads = G / N` pools the same heads into the same proxies as TP=1 does: every head gets the
same ranking, budget, dense-fallback decision (per KV group) and kept blocks as under TP=1 with the same config. Every
other stage of the method is per head, per group or per KV head, so nothing else crosses a shard.

Allowed: N divides Hkv (transformers cannot split a head) and G is a multiple of N (G also divides Hkv, as without
TP). The issue's alternative, "each shard builds its own groups", is this same rule: G_local groups per shard are
the global config `proxy_heads = N * G_local` (for example proxy_heads=1 under TP=2 is refused; proxy_heads=2 is
one group per shard). Anything else raises ValueError naming the values and the allowed ones: `from_pretrained`
checks before loading anything, and `proxyattn.hf`'s attention functions check on every call (`shard_config`), so
a model sharded by transformers directly with `attn_implementation="proxyattn"` is refused at its first attention
call, never run with groups that straddle shards.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from ._checks import check_proxy_heads
from .config import ProxyAttnConfig

__all__ = ["allowed_proxy_heads", "allowed_tp_sizes", "check_tp", "shard_config", "from_pretrained"]


def allowed_proxy_heads(tp_size: int, num_key_value_heads: int) -> list[int]:
    """The proxy_heads values allowed under TP degree `tp_size`: multiples of tp_size dividing Hkv."""
    return [g for g in range(1, num_key_value_heads + 1) if num_key_value_heads % g == 0 and g % tp_size == 0]


def allowed_tp_sizes(proxy_heads: int, num_key_value_heads: int) -> list[int]:
    """The TP degrees allowed with this proxy_heads and Hkv: divisors of proxy_heads (which divides Hkv)."""
    return [n for n in range(1, proxy_heads + 1) if proxy_heads % n == 0 and num_key_value_heads % n == 0]


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")


def check_tp(config: ProxyAttnConfig, tp_size: int, num_attention_heads: int, num_key_value_heads: int) -> ProxyAttnConfig:
    """Validate a TP launch; return the config every shard runs (`proxy_heads` / tp_size, all else unchanged).

    Args:
        config: the global config (as for TP=1).
        tp_size: the TP degree N (1: no tensor parallelism; the config is returned unchanged).
        num_attention_heads, num_key_value_heads: the model's Hq and Hkv (its whole config, not one shard's).
    Raises:
        ValueError naming the values and the allowed ones when N does not divide Hkv, when proxy_heads does not
        divide Hkv, or when proxy_heads is not a multiple of N (a group would straddle shards).
    """
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig, got {type(config).__name__}")
    _check_count("tp_size", tp_size)
    _check_count("num_attention_heads", num_attention_heads)
    _check_count("num_key_value_heads", num_key_value_heads)
    hq, hkv, g, n = num_attention_heads, num_key_value_heads, config.proxy_heads, tp_size
    if hq % hkv:
        raise ValueError(f"num_attention_heads={hq} must be a multiple of num_key_value_heads={hkv}")
    check_proxy_heads(g, hkv)
    if hkv % n:
        divisors = [d for d in range(1, hkv + 1) if hkv % d == 0]
        raise ValueError(
            f"tensor-parallel degree tp_size={n} must divide the model's num_key_value_heads={hkv} (transformers shards "
            f"whole heads); allowed tp_size: {divisors}"
        )
    if g % n:
        raise ValueError(
            f"ProxyAttnConfig.proxy_heads={g} is not a multiple of the tensor-parallel degree tp_size={n}: a proxy group "
            f"would straddle shards (num_key_value_heads={hkv}). Allowed: proxy_heads in {allowed_proxy_heads(n, hkv)} "
            f"with tp_size={n} (proxy_heads = tp_size x groups per shard), or tp_size in {allowed_tp_sizes(g, hkv)} "
            f"with proxy_heads={g}"
        )
    return _shard(config, n)


@functools.lru_cache(maxsize=64)
def _shard(config: ProxyAttnConfig, tp_size: int) -> ProxyAttnConfig:
    """The shard's config (cached: `shard_config` runs on every attention call)."""
    return config if tp_size == 1 else config.replace(proxy_heads=config.proxy_heads // tp_size)


def shard_config(config: ProxyAttnConfig, module, num_q_heads: int, num_kv_heads: int) -> ProxyAttnConfig:
    """The config one attention call runs with: `config` itself unless transformers sharded the module's heads.

    A model loaded with a `DistributedConfig` of tp_size > 1 carries it as `config.distributed_config`; the call
    then sees `num_q_heads` of the model's `num_attention_heads` (and `num_kv_heads` of its `num_key_value_heads`).
    The ratio is the heads' sharding degree N (1 when a custom tp_plan leaves attention replicated), and the result
    is `check_tp(config, N, Hq, Hkv)`. Raises ValueError on a misaligned config or on local head counts that are not
    one N-th of the model's.
    """
    model_config = getattr(module, "config", None)
    distributed = getattr(model_config, "distributed_config", None)
    if distributed is None or (getattr(distributed, "tp_size", None) or 1) <= 1:
        return config
    hq = getattr(model_config, "num_attention_heads", None)
    hkv = getattr(model_config, "num_key_value_heads", None) or hq
    if not isinstance(hq, int) or not isinstance(hkv, int):
        raise ValueError(
            f"{type(module).__name__} runs under tensor parallelism (tp_size={distributed.tp_size}) but its config has no "
            f"integer num_attention_heads / num_key_value_heads ({hq!r} / {hkv!r}) to align proxy groups with shards"
        )
    if hq % num_q_heads or hkv % num_kv_heads or hq // num_q_heads != hkv // num_kv_heads:
        raise ValueError(
            f"{type(module).__name__} sees {num_q_heads} query / {num_kv_heads} KV heads of the model's {hq} / {hkv} under "
            f"tp_size={distributed.tp_size}: not one shard of both, so proxy groups cannot be aligned with shards"
        )
    return check_tp(config, hq // num_q_heads, hq, hkv)


def from_pretrained(
    path,
    config: ProxyAttnConfig | None = None,
    *,
    implementation: str = "proxyattn",
    tp_size: int | None = None,
    model_class=None,
    **kwargs,
):
    """Load a causal LM sharded by transformers' tensor-parallel plan, with ProxyAttn attention on every shard.

    Call it on every rank of a `torchrun --nproc_per_node N` launch. Before loading anything it reads the model's
    config, checks `check_tp(config, N, Hq, Hkv)` (ValueError naming the values) and registers `config` with
    `proxyattn.hf.register` (the global config: each attention call derives its shard's config itself).

    Args:
        path: a checkpoint directory or hub name (anything `from_pretrained` takes).
        config: the ProxyAttn config (default `ProxyAttnConfig()`).
        implementation: `"proxyattn"` (kernels on CUDA, reference on the CPU), `"proxyattn_ref"`, or `"sdpa"` (the
            dense baseline, same sharding).
        tp_size: the TP degree; default the launch's WORLD_SIZE (1 without torchrun: no sharding).
        model_class: default `transformers.AutoModelForCausalLM`.
        kwargs: passed to `from_pretrained` (dtype, device_map for tp_size 1, ...); `distributed_config`, `tp_plan`,
            `tp_size` and `attn_implementation` are set here and refused in kwargs.
    Returns:
        The model in eval mode (on rank r's GPU under NCCL, on the CPU under gloo).
    """
    from . import hf

    allowed_impl = (*hf.NAMES, "sdpa")
    if implementation not in allowed_impl:
        raise ValueError(f"implementation={implementation!r} is not supported; allowed: {allowed_impl}")
    clash = sorted({"distributed_config", "tp_plan", "tp_size", "attn_implementation"} & set(kwargs))
    if clash:
        raise ValueError(f"from_pretrained sets {clash} itself; remove them from the keyword arguments")
    if config is None:
        config = ProxyAttnConfig()
    world = os.environ.get("WORLD_SIZE", "1")
    if tp_size is None:
        if not world.isdigit() or int(world) < 1:
            raise ValueError(f"WORLD_SIZE={world!r} must be a positive int (set by torchrun)")
        tp_size = int(world)
    _check_count("tp_size", tp_size)
    import transformers
    from transformers.distributed import DistributedConfig

    model_config = transformers.AutoConfig.from_pretrained(path)
    text = model_config.get_text_config()
    hq = text.num_attention_heads
    hkv = getattr(text, "num_key_value_heads", None) or hq
    check_tp(config, tp_size, hq, hkv)
    hf.register(config)
    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    dist = DistributedConfig(tp_plan="auto", tp_size=tp_size) if tp_size > 1 else None
    model = model_class.from_pretrained(path, distributed_config=dist, attn_implementation=implementation, **kwargs)
    return model.eval()
