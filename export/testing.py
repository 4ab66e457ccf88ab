"""Tiny random transformers models for export tests and quick structural builds (seconds on a CPU).

Weights use `initializer_range=0.2` so that attention visibly changes the logits (the default 0.02 leaves the
residual stream dominant and would let a wrong attention pass a logits comparison).
"""

from __future__ import annotations

import torch

__all__ = ["TINY_MODELS", "tiny_model"]

_COMMON = dict(vocab_size=128, max_position_embeddings=1024, initializer_range=0.2, tie_word_embeddings=False)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **_COMMON
    )
    return LlamaForCausalLM(cfg)


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=48,
        **_COMMON,
    )
    return MistralForCausalLM(cfg)


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=112,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=7,
        num_key_value_heads=1,
        use_sliding_window=False,
        **_COMMON,
    )
    return Qwen2ForCausalLM(cfg)


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=16,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        query_pre_attn_scalar=64,
        **_COMMON,
    )
    return Gemma3ForCausalLM(cfg)


# name -> (factory, what it covers)
TINY_MODELS = {
    "llama": (_llama, "GQA 4:1, head dim 16"),
    "mistral": (_mistral, "GQA 8:1, every layer a 48-token sliding window"),
    "qwen2": (_qwen2, "GQA 7:1, q/k/v biases"),
    "gemma3": (_gemma3, "GQA 2:1, head dim 64, two 16-token sliding layers and one full layer, q/k norms"),
}


def tiny_model(name: str, seed: int = 0):
    """A tiny random model of architecture `name` (see TINY_MODELS), in eval mode, float32."""
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; known: {sorted(TINY_MODELS)}")
    torch.manual_seed(seed)
    return TINY_MODELS[name][0]().eval()
