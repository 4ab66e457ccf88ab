"""The TensorRT plugin's logic (cpp/trt/plugin_logic.h) on the CPU through libproxyattn_host: the fields TensorRT
passes for a node export/contract.py writes are parsed strictly (every field required, types checked, unsupported
values refused by name; the default config's budget rule 3 and dense fallback read into the config), and BHSD dims map
to a problem."""

from __future__ import annotations

import ctypes as C
import dataclasses

import pytest

from proxyattn import ProxyAttnConfig
from tests.cpp.libproxyattn import BF16, LIB_DEFAULT, Config, Problem


# The plugin's FLOAT32 fields (cpp/trt/plugin_logic.h is_float_field); every other field is INT32.
PLUGIN_FLOAT_FIELDS = {"pa_gamma", "pa_budget_fraction", "pa_dense_density", "pa_column_fraction", "scale"}
# The plugin's declared fields: 16 pa_* (ProxyAttnConfig.to_attrs) + scale, is_causal, sliding_window.
PLUGIN_FIELD_COUNT = 19


def _parse_fields(host, fields: dict, *, as_float=(), as_int=()):
    """The plugin's parse_fields over `fields` (name -> value), each passed as TensorRT would: FLOAT32 for the float
    fields, INT32 otherwise; `as_float` / `as_int` name fields to pass with the other type (a mistyped attribute)."""
    names = [k for k in fields]
    floats = (PLUGIN_FLOAT_FIELDS | set(as_float)) - set(as_int)
    arr_n = (C.c_char_p * len(names))(*[n.encode() for n in names])
    arr_t = (C.c_int * len(names))(*[1 if n in floats else 0 for n in names])
    arr_v = (C.c_double * len(names))(*[float(fields[n]) for n in names])
    cfg, scale, err = Config(), C.c_float(), C.create_string_buffer(512)
    st = host.pa_host_parse_fields(arr_n, arr_t, arr_v, len(names), C.byref(cfg), C.byref(scale), err, 512)
    return st, cfg, scale.value, err.value.decode()


def test_trt_plugin_reads_the_onnx_node_attributes(host):
    from export.contract import STRING_ATTRS, encode_attrs

    pc = ProxyAttnConfig(
        dense_density=None,
        block_size=64,
        stride=8,
        gamma=0.9,
        min_budget_tokens=1024,
        proxy_heads=2,
        keep_sink=False,
        budget_fraction=0.25,
        budget_rule=1,
    )
    attrs = {k: v for k, v in encode_attrs(pc, scale=0.0625).items() if k not in STRING_ATTRS}
    assert len(attrs) == PLUGIN_FIELD_COUNT and attrs["pa_dense_density"] == 0.0  # dense_density None travels as 0.0
    st, cfg, scale, err = _parse_fields(host, attrs)
    assert st == 0, err
    assert (cfg.block_size, cfg.stride, cfg.proxy_heads, cfg.min_budget_tokens) == (64, 8, 2, 1024)
    assert (cfg.keep_sink, cfg.keep_diagonal, cfg.dense_below_tokens) == (0, 1, pc.dense_below_tokens)
    assert cfg.gamma == pytest.approx(0.9) and cfg.budget_fraction == pytest.approx(0.25) and scale == 0.0625
    assert cfg.budget_rule == 1
    for rule in (0, 2, 3):
        st, cfg, _, err = _parse_fields(host, {**attrs, "pa_budget_rule": rule})
        assert st == 0 and cfg.budget_rule == rule, err
    st, cfg, _, err = _parse_fields(host, {k: v for k, v in attrs.items() if k != "pa_budget_rule"})
    assert st == -1 and "missing field(s) pa_budget_rule" in err  # strict: no default for a field the node lacks


def _node_fields(config=LIB_DEFAULT, scale=0.125) -> dict:
    """The fields TensorRT passes the plugin for a node export/contract.py writes (its strings are not fields)."""
    from export.contract import STRING_ATTRS, encode_attrs

    return {k: v for k, v in encode_attrs(config, scale=scale).items() if k not in STRING_ATTRS}


def test_trt_plugin_requires_every_field(host):
    """Each field the exporter writes is required: without it the plugin refuses the node and names the field and
    the whole declared set (before this change a missing field silently took ProxyAttnConfig's default)."""
    attrs = _node_fields()
    assert len(attrs) == PLUGIN_FIELD_COUNT and sum(k.startswith("pa_") for k in attrs) == 16
    assert "pa_dense_density" in attrs
    assert _parse_fields(host, attrs)[0] == 0
    for name in attrs:
        st, _, _, err = _parse_fields(host, {k: v for k, v in attrs.items() if k != name})
        assert st == -1 and f"missing field(s) {name};" in err, (name, err)
        assert "every declared field is required: pa_block_size, pa_stride" in err
    st, _, _, err = _parse_fields(host, {})
    assert st == -1 and err.startswith("missing field(s) pa_block_size, pa_stride, pa_proxy_heads")


@pytest.mark.parametrize(
    "change,retyped,needle",
    [
        ({"pa_keep_sink": 0.5}, ("pa_keep_sink",), "field pa_keep_sink must be INT32, not FLOAT32"),
        ({"pa_keep_sink": 1.0}, ("pa_keep_sink",), "field pa_keep_sink must be INT32, not FLOAT32"),
        ({"pa_keep_sink": 2}, (), "pa_keep_sink=2 must be 0 or 1"),
        ({"pa_keep_diagonal": -1}, (), "pa_keep_diagonal=-1 must be 0 or 1"),
        ({"pa_block_size": 128.0}, ("pa_block_size",), "field pa_block_size must be INT32, not FLOAT32"),
        ({"pa_bogus": 1}, (), "unknown field pa_bogus; declared: pa_block_size, pa_stride"),
        ({"pa_dense_first_layers": -1}, (), "pa_dense_first_layers=-1 must be >= 0"),
        ({"pa_dense_density": 0}, ("pa_dense_density",), "field pa_dense_density must be FLOAT32, not INT32"),
        ({"pa_gamma": 1}, ("pa_gamma",), "field pa_gamma must be FLOAT32, not INT32"),
    ],
)
def test_trt_plugin_refuses_mistyped_fields(host, change, retyped, needle):
    """Booleans are INT32 0/1 only; an attribute of the wrong type is an error, never converted (0.5 is not
    truncated to 0, an INT 0 is not a FLOAT 0.0); an unknown pa_ field is an error naming the declared ones.
    `retyped` names the fields passed with the other type (an INT32 field as FLOAT32 and the reverse)."""
    as_float = tuple(n for n in retyped if n not in PLUGIN_FLOAT_FIELDS)
    as_int = tuple(n for n in retyped if n in PLUGIN_FLOAT_FIELDS)
    st, _, _, err = _parse_fields(host, {**_node_fields(), **change}, as_float=as_float, as_int=as_int)
    assert st == -1 and needle in err, err


def test_trt_plugin_reads_the_default_config_node(host):
    """The exporter's node for ProxyAttnConfig() (budget rule 3, recall_rows 4, the dense fallback at 0.8: what every
    engine is built with) parses into the library's default config; pa_dense_density 0.0 (None) turns the fallback
    off, any value in (0, 1] is carried."""
    attrs = _node_fields(ProxyAttnConfig())
    assert attrs["pa_dense_density"] == pytest.approx(0.8) and attrs["pa_budget_rule"] == 3
    st, cfg, _, err = _parse_fields(host, attrs)
    assert st == 0, err
    assert (cfg.budget_rule, cfg.recall_rows) == (3, 4) and cfg.dense_density == pytest.approx(0.8)
    for value in (0.0, 0.001, 0.7, 1.0):
        st, cfg, _, err = _parse_fields(host, {**attrs, "pa_dense_density": value, "pa_recall_rows": 8})
        assert st == 0 and cfg.dense_density == pytest.approx(value) and cfg.recall_rows == 8, err
    off = _node_fields(dataclasses.replace(ProxyAttnConfig(), dense_density=None))
    assert off["pa_dense_density"] == 0.0 and _parse_fields(host, off)[1].dense_density == 0.0


def test_trt_plugin_test_bridge_never_truncates(host):
    """The ctypes bridge refuses a non-integral value for an INT32 field instead of truncating it (so the tests
    above cannot pass a 0.5 that silently becomes 0)."""
    st, _, _, err = _parse_fields(host, {**_node_fields(), "pa_keep_sink": 0.5})
    assert st == -1 and "test bridge: INT32 field pa_keep_sink given the non-int32 value 0.5" in err


def test_trt_plugin_declares_every_node_attribute(host):
    from export.contract import STRING_ATTRS, encode_attrs

    host.pa_host_field_names.restype = C.c_int
    names = (C.c_char_p * 64)()
    n = host.pa_host_field_names(names, 64)
    declared = [names[i].decode() for i in range(n)]
    attrs = [k for k in encode_attrs(ProxyAttnConfig(), scale=0.125) if k not in STRING_ATTRS]
    assert sorted(declared) == sorted(attrs) and len(set(declared)) == n == PLUGIN_FIELD_COUNT


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"sliding_window": 512}, "sliding_window=512"),
        ({"is_causal": 0}, "is_causal=0"),
        ({"pa_estimator": 1}, "pa_estimator=1"),
        ({"pa_gamma": 1.5}, "gamma=1.5"),
        ({"bogus": 1}, "unknown field bogus"),
        ({"pa_budget_rule": 4}, "pa_budget_rule=4 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), 3 (block_recall)"),
        ({"pa_budget_rule": -1}, "pa_budget_rule=-1"),
        ({"pa_recall_rows": 3}, "pa_recall_rows=3 must be a power of two"),
        ({"pa_recall_rows": 128, "pa_block_size": 64}, "pa_recall_rows=128 must divide pa_block_size=64"),
        ({"pa_dense_density": 1.5}, "pa_dense_density=1.500000 must be 0 (no dense fallback) or lie in (0, 1]"),
        ({"pa_dense_density": -0.5}, "pa_dense_density=-0.5"),
        (
            {"pa_column_fraction": 0.02},
            "pa_column_fraction=0.020000 is not supported: libproxyattn implements block selection only; allowed: 0",
        ),
    ],
)
def test_trt_plugin_refuses_what_it_cannot_run(host, change, needle):
    from export.contract import STRING_ATTRS, encode_attrs

    attrs = {k: v for k, v in encode_attrs(LIB_DEFAULT, scale=0.125).items() if k not in STRING_ATTRS}
    attrs.update(change)
    st, _, _, err = _parse_fields(host, attrs)
    assert st == -1 and needle in err


def test_trt_plugin_maps_bhsd_dims_to_a_problem(host):
    prob, err = Problem(), C.create_string_buffer(256)
    q, k = (C.c_longlong * 4)(2, 32, 5000, 128), (C.c_longlong * 4)(2, 8, 5000, 128)
    assert host.pa_host_make_problem(q, k, BF16, C.byref(prob), err, 256) == 0
    assert (prob.batch, prob.num_q_heads, prob.seq_len, prob.head_dim, prob.num_kv_heads) == (2, 32, 5000, 128, 8)
    assert prob.layout == 1 and prob.cu_seqlens is None
    bad = (C.c_longlong * 4)(2, 8, 4999, 128)
    assert host.pa_host_make_problem(q, bad, BF16, C.byref(prob), err, 256) == -1 and b"disagree" in err.value
