"""Strict parsing of ProxyAttn attributes (`ProxyAttnConfig.from_attrs`, `export.contract.decode_attrs`) and the
public API's refusal of zero-size dimensions (head dim D = 0, no query heads, no rankings) with a ValueError.

Before: a missing `pa_` key took its default, `pa_keep_sink=0.5` became False (int(0.5) == 0), `"1"` or `None`
were coerced or crashed with TypeError; q/k/v with D = 0 raised ZeroDivisionError (scale 1/sqrt(D)) and Hq = 0
silently returned an empty tensor.
"""

from __future__ import annotations

import math

import pytest
import torch

import proxyattn as pa
from proxyattn.config import ATTR_PREFIX, ProxyAttnConfig, attr_kinds
from tests.helpers import qkv_inputs

FULL = ProxyAttnConfig().to_attrs()


def _with(**changes) -> dict:
    """The default config's attributes with some `pa_` values replaced (keys given without the prefix)."""
    return {**FULL, **{ATTR_PREFIX + k: v for k, v in changes.items()}}


# ---------------------------------------------------------------------------------------------- from_attrs
def test_attr_kinds_cover_every_field_with_its_kind():
    kinds = attr_kinds()
    assert list(kinds) == list(FULL)
    assert kinds["pa_keep_sink"] == kinds["pa_keep_diagonal"] == "bool"
    assert kinds["pa_gamma"] == kinds["pa_budget_fraction"] == kinds["pa_dense_density"] == kinds["pa_column_fraction"] == "float"
    assert {k for k, v in kinds.items() if v == "int"} == set(FULL) - {
        "pa_keep_sink",
        "pa_keep_diagonal",
        "pa_gamma",
        "pa_budget_fraction",
        "pa_dense_density",
        "pa_column_fraction",
    }


@pytest.mark.parametrize(
    "config",
    [
        ProxyAttnConfig(),
        ProxyAttnConfig(
            block_size=64,
            stride=2,
            gamma=0.9,
            budget_fraction=0.1,
            keep_sink=False,
            dense_below_tokens=0,
            dense_first_layers=2,
            dense_layer_mask=ProxyAttnConfig.layer_mask([0, 52]),
            budget_rule=1,
            recall_rows=8,
            estimator=2,
            proxy_heads=4,
            min_budget_tokens=0,
        ),
    ],
)
def test_round_trip_of_every_field(config):
    assert ProxyAttnConfig.from_attrs(config.to_attrs()) == config
    assert ProxyAttnConfig.from_attrs({**config.to_attrs(), "scale": 0.125, "is_causal": 1, "other": "x"}) == config


@pytest.mark.parametrize("missing", list(FULL))
def test_every_field_is_required(missing):
    attrs = {k: v for k, v in FULL.items() if k != missing}
    with pytest.raises(ValueError) as e:
        ProxyAttnConfig.from_attrs(attrs)
    msg = str(e.value)
    assert f"[{missing!r}] missing" in msg
    assert f"every one of {list(FULL)} is required" in msg


def test_missing_keys_are_listed_together():
    with pytest.raises(ValueError, match=r"\['pa_keep_sink', 'pa_budget_rule'\] missing"):
        ProxyAttnConfig.from_attrs({k: v for k, v in FULL.items() if k not in ("pa_keep_sink", "pa_budget_rule")})
    with pytest.raises(ValueError, match="missing; every one of"):
        ProxyAttnConfig.from_attrs({"scale": 0.125})  # no pa_ key at all


def test_unknown_pa_keys_stay_an_error_and_other_keys_are_ignored():
    with pytest.raises(ValueError, match=r"unknown ProxyAttn attribute\(s\) \['pa_keep_snk'\]; known: .*'pa_keep_sink'"):
        ProxyAttnConfig.from_attrs({**FULL, "pa_keep_snk": 1})
    assert ProxyAttnConfig.from_attrs({**FULL, "keep_sink": "anything", "sliding_window": 0}) == ProxyAttnConfig()


@pytest.mark.parametrize("value", [0.5, 2, -1, "1", "True", b"1", None, float("nan"), 1.0000001, [1]])
def test_bool_fields_take_only_0_or_1(value):
    for key in ("keep_sink", "keep_diagonal"):
        with pytest.raises(ValueError) as e:
            ProxyAttnConfig.from_attrs(_with(**{key: value}))
        assert f"attribute pa_{key}={value!r} must be 0 or 1" in str(e.value)


@pytest.mark.parametrize("value,want", [(0, False), (1, True), (False, False), (True, True), (0.0, False), (1.0, True)])
def test_bool_fields_accept_0_and_1_as_int_bool_or_float(value, want):
    assert ProxyAttnConfig.from_attrs(_with(keep_sink=value)).keep_sink is want


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("block_size", 64.5, "must be an integer"),
        ("block_size", "64", "must be an int or an exactly integral finite float, not str"),
        ("block_size", None, "not NoneType"),
        ("block_size", True, "not bool"),
        ("stride", float("inf"), "must be an int or an exactly integral finite float"),
        ("dense_below_tokens", 8192.25, "must be an integer"),
        ("recall_rows", b"4", "not bytes"),
    ],
)
def test_int_fields_refuse_non_integers(key, value, needle):
    with pytest.raises(ValueError) as e:
        ProxyAttnConfig.from_attrs(_with(**{key: value}))
    assert f"attribute pa_{key}={value!r}" in str(e.value) and needle in str(e.value)


def test_int_fields_accept_exactly_integral_floats():
    cfg = ProxyAttnConfig.from_attrs(_with(block_size=64.0, stride=8.0, min_budget_tokens=1024.0))
    assert (cfg.block_size, cfg.stride, cfg.min_budget_tokens) == (64, 8, 1024)
    assert all(type(v) is int for v in (cfg.block_size, cfg.stride, cfg.min_budget_tokens))


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("gamma", "0.9", "must be a finite int or float, not str"),
        ("gamma", None, "not NoneType"),
        ("gamma", True, "not bool"),
        ("gamma", float("nan"), "must be a finite int or float"),
        ("budget_fraction", float("inf"), "must be a finite int or float"),
    ],
)
def test_float_fields_refuse_non_numbers(key, value, needle):
    with pytest.raises(ValueError) as e:
        ProxyAttnConfig.from_attrs(_with(**{key: value}))
    assert f"attribute pa_{key}={value!r}" in str(e.value) and needle in str(e.value)


def test_float_fields_accept_ints_and_zero_budget_fraction_means_unset():
    cfg = ProxyAttnConfig.from_attrs(_with(gamma=1, budget_fraction=0))
    assert cfg.gamma == 1.0 and cfg.budget_fraction is None
    assert ProxyAttnConfig.from_attrs(_with(budget_fraction=0.25)).budget_fraction == 0.25


def test_values_are_still_validated_by_the_config():
    with pytest.raises(ValueError, match="block_size=96 is not supported"):
        ProxyAttnConfig.from_attrs(_with(block_size=96))
    with pytest.raises(ValueError, match="gamma=1.5 must lie in"):
        ProxyAttnConfig.from_attrs(_with(gamma=1.5))


def test_from_attrs_refuses_a_non_mapping():
    with pytest.raises(ValueError, match="attrs must be a mapping"):
        ProxyAttnConfig.from_attrs([("pa_block_size", 128)])


def test_decode_attrs_is_strict_too():
    """The ONNX node decoder (ONNX Runtime custom op, TensorRT graph rewrite) goes through from_attrs."""
    from export import contract

    node = contract.encode_attrs(ProxyAttnConfig(), scale=0.125)
    assert contract.decode_attrs(node)[0] == ProxyAttnConfig()
    with pytest.raises(ValueError, match=r"\['pa_recall_rows'\] missing"):
        contract.decode_attrs({k: v for k, v in node.items() if k != "pa_recall_rows"})
    with pytest.raises(ValueError, match="attribute pa_keep_sink=0.5 must be 0 or 1"):
        contract.decode_attrs({**node, "pa_keep_sink": 0.5})


# ---------------------------------------------------------------------------------------------- zero-size inputs
def _qkv(b=1, s=64, hq=2, hkv=1, d=8):
    return qkv_inputs("random", b, s, hq, hkv, d, seed=0)


CFG = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0)


def _entries(q, k, v):
    """Every public entry point that takes q/k(/v), called on these tensors."""
    plan = pa.BlockPlan(
        torch.zeros(1, 1, 1, 1, dtype=torch.int32), torch.ones(1, 2, 1, dtype=torch.int32), torch.ones(1, 2, dtype=torch.int32), 64, 64
    )
    cu = torch.tensor([0, q.shape[0] * q.shape[1]], dtype=torch.int32)
    t = tuple(x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]) for x in (q, k, v))  # packed [T, H, D] of the batch
    return {
        "proxy_attention": lambda: pa.proxy_attention(q, k, v, CFG),
        "plan_blocks": lambda: pa.plan_blocks(q, k, CFG),
        "proxy_scores": lambda: pa.proxy_scores(q, k, CFG),
        "head_budgets": lambda: pa.head_budgets(q, k, CFG),
        "block_needs": lambda: pa.block_needs(q, k, CFG),
        "dense_attention": lambda: pa.dense_attention(q, k, v),
        "block_sparse_attention": lambda: pa.block_sparse_attention(q, k, v, plan),
        "block_sparse_attention_with_lse": lambda: pa.block_sparse_attention_with_lse(q, k, v, plan),
        "proxy_attention_varlen": lambda: pa.proxy_attention_varlen(*t, cu, q.shape[1], CFG),
        "plan_blocks_varlen": lambda: pa.plan_blocks_varlen(t[0], t[1], cu, q.shape[1], CFG),
        "block_sparse_attention_varlen": lambda: pa.block_sparse_attention_varlen(*t, cu, q.shape[1], plan),
        "block_sparse_attention_varlen_with_lse": lambda: pa.block_sparse_attention_varlen_with_lse(*t, cu, q.shape[1], plan),
    }


ENTRIES = list(_entries(*_qkv()))


@pytest.mark.parametrize("entry", ENTRIES)
def test_head_dim_zero_is_a_value_error_naming_it(entry):
    """D = 0 used to raise ZeroDivisionError (the default scale 1/sqrt(D)); with an explicit scale too."""
    q, k, v = _qkv(d=0)
    with pytest.raises(ValueError, match=r"head dim D=0 is not supported: q, k and v need D >= 1.*\(64, 128, 256\)"):
        _entries(q, k, v)[entry]()


@pytest.mark.parametrize("entry", ["proxy_attention", "dense_attention", "plan_blocks"])
def test_head_dim_zero_with_an_explicit_scale(entry):
    q, k, v = _qkv(d=0)
    call = {
        "proxy_attention": lambda: pa.proxy_attention(q, k, v, CFG, scale=0.5),
        "dense_attention": lambda: pa.dense_attention(q, k, v, scale=0.5),
        "plan_blocks": lambda: pa.plan_blocks(q, k, CFG, scale=0.5),
    }[entry]
    with pytest.raises(ValueError, match="head dim D=0"):
        call()


@pytest.mark.parametrize("entry", ENTRIES)
def test_no_query_heads_is_a_value_error(entry):
    """Hq = 0 (with Hkv = 1) used to return an empty tensor without complaint."""
    q, k, v = _qkv(hq=0, hkv=1)
    with pytest.raises(ValueError, match=r"query heads Hq=0 and KV heads Hkv=1 must both be >= 1"):
        _entries(q, k, v)[entry]()


@pytest.mark.parametrize(
    "shape,needle",
    [
        (dict(b=0), "batch size B=0"),
        (dict(s=0), "sequence length S=0"),
        (dict(hq=2, hkv=0), "Hkv=0"),
        (dict(hq=0, hkv=0), "Hkv=0"),
    ],
)
def test_other_zero_sizes_stay_value_errors(shape, needle):
    q, k, v = _qkv(**shape)
    for name in ("proxy_attention", "plan_blocks", "dense_attention", "proxy_scores", "head_budgets", "block_needs"):
        with pytest.raises(ValueError, match=needle):
            _entries(q, k, v)[name]()


def test_scores_without_rankings_are_a_value_error():
    """R = 0 rankings used to divide by zero (Hq % R) in select_blocks and head_budgets."""
    q, k, _ = _qkv(hq=2, hkv=1)
    empty = torch.zeros(1, 0, 1, 1)
    with pytest.raises(ValueError, match=r"scores shape \(1, 0, 1, 1\) must have B >= 1 and R >= 1"):
        pa.select_blocks(empty, torch.ones(1, 2, dtype=torch.int32), 64, CFG)
    with pytest.raises(ValueError, match=r"must have B >= 1 and R >= 1"):
        pa.head_budgets(q, k, CFG.replace(budget_rule=1), scores=empty)
    with pytest.raises(ValueError, match="scores must be a torch.Tensor"):
        pa.select_blocks([[0.0]], torch.ones(1, 2, dtype=torch.int32), 64, CFG)


def test_valid_small_inputs_still_run():
    q, k, v = _qkv(d=8)
    out = pa.proxy_attention(q, k, v, CFG)
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    assert math.isclose(float((pa.dense_attention(q, k, v) - out).abs().max()), 0.0, abs_tol=1e-5)
