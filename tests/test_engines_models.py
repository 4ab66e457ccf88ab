"""Model and profile tables (engines.models)."""

import pytest

from engines.models import MODELS, Profile, estimate_bytes, get_model, parameter_count, parse_profile, select_profiles

REQUIRED = ("llama3-8b", "llama3.1-8b", "qwen2.5-7b", "mistral-7b", "smollm2-135m", "gemma3-270m", "tiny-llama")


def test_every_required_model_is_in_the_table():
    assert set(REQUIRED) <= set(MODELS)


@pytest.mark.parametrize(
    "name, published",
    # Parameter counts published by the model authors (model cards), in billions.
    [("llama3-8b", 8.03), ("llama3.1-8b", 8.03), ("qwen2.5-7b", 7.61), ("mistral-7b", 7.25), ("smollm2-135m", 0.1345), ("gemma3-270m", 0.268)],
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


@pytest.mark.parametrize("text, match", [
    ("no-such", "has no profile 'no-such'; known"),
    ("5:3:9", "impossible"),
    ("0:1:2", "impossible"),
    ("1:2:999999", "exceeds its context of 131072"),
])
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
