"""The ProxyAttention node alone in ONNX Runtime: the custom op against ProxyAttn's reference, the local function
against exact (windowed) causal attention, over GQA ratios 1/4/7/8, head dims 64/128/256, ragged lengths, B > 1."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export import contract, local_function
from plugins.onnxruntime import make_session
from proxyattn import ProxyAttnConfig, proxy_attention
from tests.helpers import assert_close

# A fixed quarter of the blocks, so that the selection drops blocks on random inputs; GAMMA runs the budget rule.
CFG = ProxyAttnConfig(block_size=64, stride=4, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.25, dense_density=None)
GAMMA = ProxyAttnConfig(block_size=64, stride=4, min_budget_tokens=0, dense_below_tokens=0, gamma=0.8, proxy_heads=2, dense_density=None)


def single_node_model(path, *, hq, hkv, d, config, scale, window=0, elem=TensorProto.FLOAT):
    q = helper.make_tensor_value_info("q", elem, ["B", hq, "S", d])
    k = helper.make_tensor_value_info("k", elem, ["B", hkv, "S", d])
    v = helper.make_tensor_value_info("v", elem, ["B", hkv, "S", d])
    o = helper.make_tensor_value_info("o", elem, ["B", hq, "S", d])
    node = helper.make_node(
        contract.OP_TYPE,
        ["q", "k", "v"],
        ["o"],
        domain=contract.DOMAIN,
        name="attn",
        **contract.encode_attrs(config, scale=scale, sliding_window=window),
    )
    graph = helper.make_graph([node], "one_node", [q, k, v], [o])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    local_function.attach(model)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def _qkv(b, hq, hkv, s, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    # a few strong keys so the budgets differ per head and the selection matters
    k[:, :, ::37] *= 3.0
    return q, k, v


def _run(sess, q, k, v):
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    return torch.from_numpy(sess.run(None, feed)[0].astype(np.float32))


@pytest.mark.parametrize(
    "b,hq,hkv,s,d",
    [(2, 4, 4, 300, 64), (1, 8, 2, 200, 128), (2, 7, 1, 97, 64), (1, 8, 1, 260, 256), (3, 4, 1, 64, 64)],
)
def test_custom_op_equals_proxy_attention(tmp_path, b, hq, hkv, s, d):
    scale = 1.0 / math.sqrt(d)
    path = single_node_model(tmp_path / "m.onnx", hq=hq, hkv=hkv, d=d, config=CFG, scale=scale)
    q, k, v = _qkv(b, hq, hkv, s, d, seed=s + d)
    got = _run(make_session(path, sparse=True), q, k, v)
    want = proxy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), CFG, scale=scale).transpose(1, 2)
    assert_close(got, want, "fp32", what=f"custom op B={b} Hq={hq} Hkv={hkv} S={s} D={d}")
    dense = _run(make_session(path, sparse=False), q, k, v)
    rep = hq // hkv
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True, scale=scale
    )
    assert_close(dense, sdpa, "fp32", what="local function vs sdpa")
    if s > 4 * CFG.block_size:  # 5+ blocks: 2-block budget + sink + diagonal cannot cover the last query block
        rel = ((got - dense).norm() / dense.norm()).item()
        assert rel > 1e-3, f"sparse equals dense (rel {rel:.1e}) at S={s}: nothing was dropped"


def test_custom_op_gamma_rule(tmp_path):
    path = single_node_model(tmp_path / "g.onnx", hq=8, hkv=2, d=64, config=GAMMA, scale=0.125)
    q, k, v = _qkv(2, 8, 2, 300, 64, seed=1)
    got = _run(make_session(path, sparse=True), q, k, v)
    want = proxy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), GAMMA, scale=0.125).transpose(1, 2)
    assert_close(got, want, "fp32", what="gamma rule")


def test_custom_op_runs_vertical_columns(tmp_path):
    """A node with pa_column_fraction: the custom op attends the columns (rule 3 holding their mass) as the API does,
    and differs from the same node without columns."""
    cols = GAMMA.replace(budget_rule="block_recall", column_fraction=0.1)
    path = single_node_model(tmp_path / "c.onnx", hq=8, hkv=2, d=64, config=cols, scale=0.125)
    q, k, v = _qkv(2, 8, 2, 300, 64, seed=2)
    got = _run(make_session(path, sparse=True), q, k, v)
    want = proxy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), cols, scale=0.125).transpose(1, 2)
    assert_close(got, want, "fp32", what="columns")
    plain = single_node_model(tmp_path / "p.onnx", hq=8, hkv=2, d=64, config=cols.replace(column_fraction=0.0), scale=0.125)
    assert not torch.allclose(_run(make_session(plain, sparse=True), q, k, v), got, atol=1e-4)


@pytest.mark.parametrize("window,s", [(16, 70), (64, 130), (500, 130)])
def test_sliding_window_both_ways(tmp_path, window, s):
    hq, hkv, d = 4, 2, 64
    path = single_node_model(tmp_path / "w.onnx", hq=hq, hkv=hkv, d=d, config=CFG, scale=0.0625, window=window)
    q, k, v = _qkv(2, hq, hkv, s, d, seed=window)
    i = torch.arange(s).view(-1, 1)
    j = torch.arange(s).view(1, -1)
    allowed = (j <= i) & (j > i - window)
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed, scale=0.0625
    )
    for sparse in (False, True):
        assert_close(_run(make_session(path, sparse=sparse), q, k, v), want, "fp32", what=f"window={window} sparse={sparse}")


def test_half_precision_node(tmp_path):
    path = single_node_model(tmp_path / "h.onnx", hq=4, hkv=1, d=64, config=CFG, scale=0.125, elem=TensorProto.FLOAT16)
    q, k, v = (t.half() for t in _qkv(2, 4, 1, 150, 64, seed=5))
    feed = {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}
    out = make_session(path, sparse=True).run(None, feed)[0]
    assert out.dtype == np.float16
    want = proxy_attention(q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2), CFG, scale=0.125).transpose(
        1, 2
    )
    assert_close(torch.from_numpy(out.astype(np.float32)), want, "fp16", what="fp16 node")


def test_attribute_round_trip_and_refusals():
    cfg = ProxyAttnConfig(gamma=0.95, budget_fraction=0.3, proxy_heads=2)
    attrs = contract.encode_attrs(cfg, scale=0.088388, sliding_window=None)
    as_onnx = {}
    node = helper.make_node(contract.OP_TYPE, ["q", "k", "v"], ["o"], domain=contract.DOMAIN, **attrs)
    for a in node.attribute:  # through the protobuf: floats become float32
        as_onnx[a.name] = helper.get_attribute_value(a)
    assert as_onnx["pa_gamma"] != 0.95  # float32
    back, scale, window = contract.decode_attrs(as_onnx)
    assert back == cfg and window == 0 and scale == pytest.approx(0.088388, rel=1e-7)
    assert all(isinstance(v, (int, float)) for k, v in attrs.items() if k not in contract.STRING_ATTRS)
    with pytest.raises(ValueError, match="is_causal=0"):
        contract.decode_attrs(as_onnx | {"is_causal": 0})
    with pytest.raises(ValueError, match="plugin_version='2'"):
        contract.decode_attrs(as_onnx | {"plugin_version": b"2"})
    with pytest.raises(ValueError, match="lacks attributes \\['scale'\\]"):
        contract.decode_attrs({k: v for k, v in as_onnx.items() if k != "scale"})
    with pytest.raises(ValueError, match="sliding_window=-3"):
        contract.encode_attrs(cfg, scale=0.1, sliding_window=-3)
    with pytest.raises(ValueError, match="scale=0"):
        contract.encode_attrs(cfg, scale=0)


def test_emit_outside_export_is_the_reference():
    q, k, v = _qkv(2, 8, 2, 150, 64, seed=9)
    got = contract.emit_proxy_attention(q, k, v, config=CFG, scale=None, layer_idx=0)
    want = proxy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), CFG, scale=0.125).transpose(1, 2)
    assert_close(got, want, "fp32", what="eager emit")
    dense_cfg = CFG.replace(dense_first_layers=1)  # layer 0 kept dense by the config
    got = contract.emit_proxy_attention(q, k, v, config=dense_cfg, scale=None, layer_idx=0)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(4, 1), v.repeat_interleave(4, 1), is_causal=True)
    assert_close(got, sdpa, "fp32", what="dense layer")
    with pytest.raises(ValueError, match="multiple of KV heads"):
        contract.emit_proxy_attention(q[:, :7], k[:, :2], v[:, :2], config=CFG, scale=0.1)
