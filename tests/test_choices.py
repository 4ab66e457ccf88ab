"""Named choices (issue 18): `BudgetRule` and `Estimator` are accepted as members, names and numbers; the config
always holds the member, attributes carry the number (the stable encoding); bad values are refused with the allowed
names and numbers; every backend's dispatch table covers every member; CLI flags and config files take names."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

import proxyattn as pa
from proxyattn import api, variants
from proxyattn.config import BUDGET_RULES, CHOICE_FIELDS, ESTIMATORS, BudgetRule, Estimator, ProxyAttnConfig

ROOT = Path(__file__).resolve().parents[1]

# The encoding written down once (ONNX attributes, TensorRT plugin fields, the C API): it must never change.
ENCODING = {
    BudgetRule: {"MASS": 0, "RECALL": 1, "ROW_RECALL": 2, "BLOCK_RECALL": 3},
    Estimator: {"PROXY": 0, "HEAD_MAX": 1, "BLOCK_MEAN": 2},
}


@pytest.mark.parametrize("choice", [BudgetRule, Estimator])
def test_the_integer_encoding_is_stable_and_every_member_is_documented(choice):
    assert {m.name: int(m) for m in choice} == ENCODING[choice]
    for m in choice:
        assert m.label == m.name.lower() and isinstance(m, int)
        assert m.__doc__ and "\n" not in m.__doc__ and m.__doc__ != choice.__doc__
    assert BUDGET_RULES == {0: "mass", 1: "recall", 2: "row_recall", 3: "block_recall"}
    assert ESTIMATORS == {0: "proxy", 1: "head_max", 2: "block_mean"}


def test_the_c_header_defines_the_same_numbers():
    header = (ROOT / "cpp" / "include" / "proxyattn.h").read_text()
    defines = dict(re.findall(r"#define PROXYATTN_BUDGET_RULE_(\w+) (\d+)", header))
    assert defines, "no PROXYATTN_BUDGET_RULE_* defines found"
    assert {name: int(n) for name, n in defines.items()} == {name: int(BudgetRule[name]) for name in defines}


@pytest.mark.parametrize("field, member", [(f, m) for f, choice in CHOICE_FIELDS.items() for m in choice])
def test_member_name_and_number_give_the_same_config(field, member):
    given = [member, member.label, member.label.upper(), member.label.replace("_", "-"), int(member)]
    configs = [ProxyAttnConfig(**{field: v}) for v in given]
    for cfg in configs:
        assert cfg == configs[0] and hash(cfg) == hash(configs[0])
        assert getattr(cfg, field) is member
        assert type(cfg.to_attrs()[f"pa_{field}"]) is int and cfg.to_attrs() == configs[0].to_attrs()
        assert ProxyAttnConfig.from_attrs(cfg.to_attrs()) == cfg
        assert getattr(ProxyAttnConfig.from_attrs(cfg.to_attrs()), field) is member
    assert f"{field}={type(member).__name__}.{member.name}" in repr(configs[0])
    assert configs[0].replace(**{field: member.label}) == configs[0]


def test_defaults_and_attributes_are_unchanged():
    cfg = ProxyAttnConfig()
    assert cfg.budget_rule is BudgetRule.BLOCK_RECALL and cfg.estimator is Estimator.PROXY
    assert cfg.to_attrs()["pa_budget_rule"] == 3 and cfg.to_attrs()["pa_estimator"] == 0
    assert cfg == ProxyAttnConfig(budget_rule=3, estimator=0)
    # Hashes equal those of the plain ints the fields held before (caches keyed on configs keep working).
    assert hash(BudgetRule.ROW_RECALL) == hash(2) and BudgetRule.ROW_RECALL == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("budget_rule", "nope"),
        ("budget_rule", 4),
        ("budget_rule", -1),
        ("budget_rule", True),
        ("budget_rule", 2.0),
        ("budget_rule", "3"),
        ("budget_rule", None),
        ("budget_rule", Estimator.HEAD_MAX),
        ("budget_rule", "proxy"),
        ("estimator", "block_recall"),
        ("estimator", 3),
        ("estimator", False),
        ("estimator", BudgetRule.MASS),
        ("estimator", ""),
    ],
)
def test_bad_values_are_refused_with_the_allowed_names_and_numbers(field, value):
    choice = CHOICE_FIELDS[field]
    with pytest.raises(ValueError) as e:
        ProxyAttnConfig(**{field: value})
    msg = str(e.value)
    assert msg.startswith(f"{field}={value!r} is not supported; allowed: ")
    for m in choice:
        assert f"{m.label} ({int(m)})" in msg


def test_attributes_refuse_names():
    # Attributes carry numbers only (the stable encoding), strictly: a name there is an error, not a conversion.
    with pytest.raises(ValueError, match=r"attribute pa_budget_rule='mass' must be an int"):
        ProxyAttnConfig.from_attrs({**ProxyAttnConfig().to_attrs(), "pa_budget_rule": "mass"})
    with pytest.raises(ValueError, match=r"budget_rule=7 is not supported; allowed: mass \(0\)"):
        ProxyAttnConfig.from_attrs({**ProxyAttnConfig().to_attrs(), "pa_budget_rule": 7})


def test_a_config_file_takes_names_or_numbers():
    by_name = json.loads('{"gamma": 0.9, "budget_rule": "row_recall", "estimator": "head_max"}')
    by_number = json.loads('{"gamma": 0.9, "budget_rule": 2, "estimator": 1}')
    assert ProxyAttnConfig(**by_name) == ProxyAttnConfig(**by_number)
    # Attributes serialise as numbers (json writes IntEnum members as their value too).
    assert json.loads(json.dumps(ProxyAttnConfig(**by_name).to_attrs()))["pa_budget_rule"] == 2
    assert json.dumps({"r": BudgetRule.ROW_RECALL}) == '{"r": 2}'


def test_parse_cli_takes_digits_for_compatibility():
    assert BudgetRule.parse_cli("2") is BudgetRule.ROW_RECALL and BudgetRule.parse_cli(" block_recall ") is BudgetRule.BLOCK_RECALL
    assert Estimator.parse_cli("1") is Estimator.HEAD_MAX
    with pytest.raises(ValueError, match=r"allowed: proxy \(0\), head_max \(1\), block_mean \(2\)"):
        Estimator.parse_cli("9")


def test_every_backend_table_covers_every_member():
    assert set(api._SCORES) == set(Estimator) and set(variants._SCORES) == set(Estimator)
    assert set(api._RULES) == set(BudgetRule)
    from proxyattn.kernels.estimate_select import VARLEN_SCORES  # the Triton backend's packed-batch estimators

    assert set(VARLEN_SCORES) <= set(Estimator) and Estimator.PROXY in VARLEN_SCORES
    assert {r for r, path in api._RULES.items() if path is api._PER_QUERY_BLOCK} == {r for r in BudgetRule if r.per_query_block}


def test_the_public_api_takes_a_named_rule():
    from tests.helpers import qkv_inputs

    q, k, _ = qkv_inputs("structured", 1, 512, 4, 2, 32, seed=3)
    for rule in BudgetRule:
        by_name = pa.plan_blocks(q, k, ProxyAttnConfig(block_size=64, min_budget_tokens=64, dense_below_tokens=0, budget_rule=rule.label))
        by_number = pa.plan_blocks(q, k, ProxyAttnConfig(block_size=64, min_budget_tokens=64, dense_below_tokens=0, budget_rule=int(rule)))
        assert by_name.counts.equal(by_number.counts) and by_name.order.equal(by_number.order)


def test_the_tensorrt_graph_names_the_estimator_it_refuses():
    from onnx import helper

    from plugins.tensorrt.graph import _check_config

    node = helper.make_node("ProxyAttention", ["q", "k", "v"], ["o"], name="attn0")
    _check_config(node, ProxyAttnConfig(estimator="proxy"), 4096)
    with pytest.raises(ValueError, match=r"pa_estimator=1 \(head_max\) has no TensorRT plugin; allowed: 0 \(proxy"):
        _check_config(node, ProxyAttnConfig(estimator="head_max"), 4096)


def _profile_plan_parser():
    spec = importlib.util.spec_from_file_location("profile_plan", ROOT / "benchmarks" / "profile_plan.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.parser()


def test_cli_flags_take_names_and_numbers(capsys):
    parser = _profile_plan_parser()
    args = parser.parse_args(["--budget-rule", "row_recall", "--estimator", "head_max"])
    assert args.budget_rule is BudgetRule.ROW_RECALL and args.estimator is Estimator.HEAD_MAX
    assert parser.parse_args(["--budget-rule", "0"]).budget_rule is BudgetRule.MASS
    defaults = parser.parse_args([])
    assert (defaults.budget_rule, defaults.estimator) == (ProxyAttnConfig().budget_rule, ProxyAttnConfig().estimator)
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--budget-rule", "fastest"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --budget-rule: 'fastest' is not supported; allowed: mass (0), recall (1), row_recall (2), block_recall (3)" in err
