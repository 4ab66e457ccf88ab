"""The rewrite pass on stock exports: the dynamo opset-18 MatMul/Softmax chain and the opset-23 Attention op become
ProxyAttention nodes that run like the direct export (dense through the local function, sparse through the custom op)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export import contract
from export.onnx_export import count_proxy_nodes, export_model
from export.rewrite import layer_windows_from_config, rewrite_model
from export.testing import TINY_MODELS, tiny_model
from plugins.onnxruntime import make_session
from proxyattn import ProxyAttnConfig, hf
from tests.helpers import assert_close

SPARSE = ProxyAttnConfig(block_size=64, stride=4, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.25)


class _Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def stock_export(model, path, *, opset: int, implementation: str = "sdpa"):
    """What a user without ProxyAttn gets: transformers' own attention, torch's dynamo exporter."""
    model.set_attn_implementation(implementation)
    ids = torch.randint(0, 128, (2, 16))
    batch, seq = torch.export.Dim("batch", min=1), torch.export.Dim("sequence", min=1)
    program = torch.onnx.export(
        _Logits(model).eval(),
        (ids,),
        dynamo=True,
        opset_version=opset,
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=({0: batch, 1: seq},),
    )
    program.save(str(path), external_data=False)
    return path


def _ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


def _run(path, ids, sparse):
    return torch.from_numpy(make_session(path, sparse=sparse).run(None, {"input_ids": ids.numpy()})[0])


def _torch(model, ids, implementation):
    hf.register(SPARSE)
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture(scope="module")
def rewritten(tmp_path_factory):
    d = tmp_path_factory.mktemp("rewrite")
    out = {}
    for name in TINY_MODELS:
        model = tiny_model(name)
        stock = stock_export(model, d / f"{name}_stock.onnx", opset=18)
        out[name] = (model, stock, rewrite_model(stock, d / f"{name}_proxy.onnx", config=SPARSE, hf_config=model.config))
    return out


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_opset18_chain_rewrite_matches_pytorch(rewritten, name):
    model, stock, path = rewritten[name]
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert count_proxy_nodes(proto) == model.config.num_hidden_layers
    assert not [n for n in proto.graph.node if n.op_type == "Softmax"], "a Softmax survived the rewrite"
    windows = []
    producers = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type == contract.OP_TYPE:
            cfg, scale, window = contract.decode_attrs({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            assert cfg == SPARSE
            assert scale == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-6)
            windows.append(window)
            for kv in node.input[1:]:  # K/V arrive un-expanded: not the Reshape(Expand(...)) of repeat_kv
                p = producers.get(kv)
                assert p is None or p.op_type != "Reshape" or producers[p.input[0]].op_type != "Expand", f"{kv} is expanded"
    assert windows == layer_windows_from_config(model.config)
    for i, (b, s) in enumerate([(1, 5), (2, 70), (3, 130)]):
        ids = _ids(b, s, i)
        assert_close(_run(path, ids, False), _torch(model, ids, "sdpa"), "fp32", what=f"{name} dense B={b} S={s}")
        assert_close(_run(path, ids, True), _torch(model, ids, "proxyattn"), "fp32", what=f"{name} sparse B={b} S={s}")


@pytest.mark.parametrize("name", ["gemma3"])  # sliding and full layers, GQA 2:1, head dim 64
def test_rewrite_equals_direct_export(rewritten, tmp_path, name):
    model, _, path = rewritten[name]
    direct = export_model(model, tmp_path / "direct.onnx", config=SPARSE)

    def attrs(p):
        nodes = [n for n in onnx.load(str(p)).graph.node if n.op_type == contract.OP_TYPE]
        return [contract.decode_attrs({a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}) for n in nodes]

    got, want = attrs(path), attrs(direct)
    assert [(c, w) for c, _, w in got] == [(c, w) for c, _, w in want]
    assert [s for _, s, _ in got] == pytest.approx([s for _, s, _ in want], rel=1e-6)
    for i, (b, s) in enumerate([(2, 70), (2, 130)]):
        ids = _ids(b, s, 20 + i)
        for sparse in (False, True):
            assert_close(_run(path, ids, sparse), _run(direct, ids, sparse), "fp32", what=f"{name} sparse={sparse} S={s}")


def test_opset23_attention_op_rewrite(tmp_path):
    model = tiny_model("llama")
    stock = stock_export(model, tmp_path / "stock23.onnx", opset=23)
    assert [n.op_type for n in onnx.load(str(stock)).graph.node].count("Attention") == 2
    path = rewrite_model(stock, tmp_path / "proxy23.onnx", config=SPARSE, num_layers=2)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert count_proxy_nodes(proto) == 2 and "Attention" not in [n.op_type for n in proto.graph.node]
    fn = next(f for f in proto.functions if f.name == contract.OP_TYPE)
    assert fn.opset_import[0].version == 23
    # batch 1: ONNX Runtime 1.32 fails the opset-23 RotaryEmbedding of the stock graph at batch >= 2
    for i, s in enumerate([5, 130]):
        ids = _ids(1, s, 30 + i)
        assert_close(_run(path, ids, False), _torch(model, ids, "sdpa"), "fp32", what=f"opset 23 dense S={s}")
        assert_close(_run(path, ids, True), _torch(model, ids, "proxyattn"), "fp32", what=f"opset 23 sparse S={s}")


def test_unmatched_attention_names_the_node_and_writes_nothing(rewritten, tmp_path):
    _, stock, _ = rewritten["llama"]
    proto = onnx.load(str(stock))
    softmax = next(n for n in proto.graph.node if n.op_type == "Softmax")
    softmax.name = "the_broken_softmax"
    relu_out = softmax.output[0] + "_relu"
    for n in proto.graph.node:
        for i, x in enumerate(n.input):
            if x == softmax.output[0]:
                n.input[i] = relu_out
    proto.graph.node.append(onnx.helper.make_node("Relu", [softmax.output[0]], [relu_out]))
    onnx.save(_toposorted(proto), str(tmp_path / "broken.onnx"))
    out_dir = tmp_path / "out"
    with pytest.raises(
        ValueError,
        match=r"replaced 1 attention blocks .* 2 attention layers; unmatched nodes: the_broken_softmax: "
        r"its output does not feed a single MatMul",
    ):
        rewrite_model(tmp_path / "broken.onnx", out_dir / "x.onnx", config=SPARSE, num_layers=2)
    assert not out_dir.exists() or list(out_dir.iterdir()) == []


def _toposorted(proto):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(proto)
    graph.toposort()
    return gs.export_onnx(graph)


def test_malformed_onnx_and_uncarriable_config(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf \x00\x01\x02")
    with pytest.raises(ValueError, match="is not a readable ONNX model"):
        rewrite_model(bad, tmp_path / "out.onnx", config=SPARSE, num_layers=2)
    with pytest.raises(ValueError, match="is not a readable ONNX model"):
        make_session(bad, sparse=True)
    with pytest.raises(ValueError, match="does not survive the float32"):
        rewrite_model(bad, tmp_path / "out.onnx", config=ProxyAttnConfig(gamma=0.12345678901), num_layers=2)
    with pytest.raises(ValueError, match="num_layers=None must be a positive int"):
        rewrite_model(bad, tmp_path / "out.onnx", config=SPARSE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_graph_without_proxy_nodes_refuses_the_custom_op(rewritten):
    _, stock, _ = rewritten["qwen2"]
    with pytest.raises(ValueError, match="has no proxy::ProxyAttention node"):
        make_session(stock, sparse=True)
    out = make_session(stock, sparse=False).run(None, {"input_ids": np.zeros((1, 3), dtype=np.int64)})[0]
    assert out.shape == (1, 3, 128)
