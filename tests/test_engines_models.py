"""Model and profile tables (engines.models)."""

import importlib.util
import json
from pathlib import Path

import pytest

from engines.models import (
    MODELS,
    Profile,
    estimate_bytes,
    get_model,
    parameter_count,
    parse_profile,
    select_profiles,
    transformers_config,
    transformers_config_kwargs,
)

ROOT = Path(__file__).resolve().parents[1]

REQUIRED = ("llama3-8b", "llama3.1-8b", "qwen2.5-7b", "mistral-7b", "smollm2-135m", "gemma3-270m", "tiny-llama")


def test_every_required_model_is_in_the_table():
    assert set(REQUIRED) <= set(MODELS)


@pytest.mark.parametrize(
    "name, published",
    # Parameter counts published by the model authors (model cards), in billions.
    [
        ("llama3-8b", 8.03),
        ("llama3.1-8b", 8.03),
        ("qwen2.5-7b", 7.61),
        ("mistral-7b", 7.25),
        ("smollm2-135m", 0.1345),
        ("gemma3-270m", 0.268),
    ],
)
def test_configs_reproduce_published_parameter_counts(name, published):
    count = parameter_count(get_model(name)) / 1e9
    assert abs(count - published) / published < 0.01, (name, count)


def test_configs_build_with_transformers():
    transformers = pytest.importorskip("transformers")
    for name in REQUIRED:
        spec = get_model(name)
        cfg = transformers.AutoConfig.for_model(**dict(spec.hf_config))
        assert cfg.num_attention_heads == spec.num_heads
        assert getattr(cfg, "num_key_value_heads", spec.num_heads) == spec.num_kv_heads
        assert spec.proxyattn.proxy_heads <= spec.num_kv_heads and spec.num_kv_heads % spec.proxyattn.proxy_heads == 0


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'llama-9000'.*llama3-8b.*tiny-llama"):
        get_model("llama-9000")


def test_profiles_are_ordered_disjoint_and_inside_the_context():
    for spec in MODELS.values():
        prev = 0
        for p in spec.profiles:
            assert p.min == prev + 1, (spec.name, p)
            assert p.max <= spec.max_positions
            prev = p.max


def test_select_profiles_by_name_and_custom():
    spec = get_model("llama3.1-8b")
    assert select_profiles(spec, None) == spec.profiles
    assert [p.name for p in select_profiles(spec, ["32k-128k", "up-to-8k"])] == ["32k-128k", "up-to-8k"]
    custom = parse_profile(spec, "100:200:300")
    assert (custom.name, custom.min, custom.opt, custom.max) == ("100-300", 100, 200, 300)


@pytest.mark.parametrize(
    "text, match",
    [
        ("no-such", "has no profile 'no-such'; give one of"),
        ("5:3:9", "impossible"),
        ("0:1:2", "impossible"),
        ("1:2:999999", "exceeds its context of 131072"),
    ],
)
def test_bad_profiles(text, match):
    with pytest.raises(ValueError, match=match):
        select_profiles(get_model("llama3.1-8b"), [text])


def test_profile_twice_is_refused():
    with pytest.raises(ValueError, match="given twice"):
        select_profiles(get_model("tiny-llama"), ["up-to-128", "1:64:128"] * 1 + ["up-to-128"])


def test_profile_validation():
    with pytest.raises(ValueError, match="min <= opt <= max"):
        Profile("x", 10, 5, 20)
    with pytest.raises(ValueError, match="positive int"):
        Profile("x", 0, 5, 20)
    with pytest.raises(ValueError, match="letters"):
        Profile("a b", 1, 2, 3)


def test_estimate_bytes():
    spec = get_model("tiny-llama")
    assert estimate_bytes(spec, "fp32") == 2 * estimate_bytes(spec, "bf16") == 4 * parameter_count(spec)
    with pytest.raises(ValueError, match="precision='int3'"):
        estimate_bytes(spec, "int3")


def test_transformers_config_is_the_table_entry():
    transformers = pytest.importorskip("transformers")
    for name in REQUIRED:
        spec = get_model(name)
        kwargs = transformers_config_kwargs(name)
        assert "model_type" not in kwargs and kwargs == {k: v for k, v in spec.hf_config.items() if k != "model_type"}
        kwargs["vocab_size"] = 7  # a copy: the table is not changed
        assert spec.hf_config["vocab_size"] != 7
        assert transformers_config(name).to_dict() == transformers.AutoConfig.for_model(**dict(spec.hf_config)).to_dict()
    assert transformers_config("tiny-llama", num_hidden_layers=1).num_hidden_layers == 1
    with pytest.raises(ValueError, match="unknown model"):
        transformers_config_kwargs("llama-9000")


def _load_prefill():
    """benchmarks/prefill.py as a module (it only needs a GPU in main())."""
    spec = importlib.util.spec_from_file_location("prefill_benchmark", ROOT / "benchmarks" / "prefill.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prefill_benchmark_config_comes_from_the_table():
    transformers = pytest.importorskip("transformers")
    prefill = _load_prefill()
    assert prefill.MODEL == "llama3.1-8b"
    assert prefill.model_kwargs() == transformers_config_kwargs("llama3.1-8b")
    json.dumps(prefill.model_kwargs())  # recorded as the result JSON's "model"
    cfg = prefill.model_config()
    assert type(cfg) is transformers.LlamaConfig
    assert cfg.to_dict() == transformers.AutoConfig.for_model(**dict(get_model("llama3.1-8b").hf_config)).to_dict()
    # The architecture the benchmark has always run (its former hand-written dict): Llama-3-8B with 128K llama3 RoPE.
    assert (
        cfg.vocab_size,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_hidden_layers,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.max_position_embeddings,
        cfg.rms_norm_eps,
        cfg.bos_token_id,
        cfg.tie_word_embeddings,
    ) == (128256, 4096, 14336, 32, 32, 8, 128, 131072, 1e-5, 128000, False)
    assert cfg.rope_parameters == {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
