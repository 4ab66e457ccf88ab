"""ONNX export: one proxy::ProxyAttention node per layer, parity in ONNX Runtime (local function and custom op),
tool checks (onnx.checker, Polygraphy, TensorRT-RTX's parser), the meta-device path, and bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from export import contract
from export.onnx_export import count_proxy_nodes, estimate_export_memory, export_model
from export.rewrite import layer_windows_from_config
from export.testing import TINY_MODELS, tiny_model
from plugins.onnxruntime import make_session
from proxyattn import ProxyAttnConfig, hf
from tests.helpers import assert_close

# Sparse at every length (dense_below_tokens=0), a fixed quarter of the blocks (block 64).
# With 5+ blocks (S=300) the last query block keeps its 2-block budget plus sink and diagonal: at most 4 of 5 blocks.
SPARSE = ProxyAttnConfig(block_size=64, stride=4, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.25, dense_density=None)
POLYGRAPHY = shutil.which("polygraphy") or str(Path(sys.executable).parent / "polygraphy")
SHAPES = [(1, 5), (2, 70), (3, 300)]  # (batch, length): 5, 70 and 300 are not multiples of the block


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> (model, path), exported once per module."""
    out = {}
    d = tmp_path_factory.mktemp("export")
    for name in TINY_MODELS:
        model = tiny_model(name)
        out[name] = (model, export_model(model, d / f"{name}.onnx", config=SPARSE))
    return out


def _torch_logits(model, ids, implementation, config=None):
    if config is not None:
        hf.register(config)
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ids(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (batch, length), generator=g)


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_one_node_per_layer_with_contract_attributes(exported, name):
    model, path = exported[name]
    proto = onnx.load(str(path))
    nodes = [n for n in proto.graph.node if n.op_type == contract.OP_TYPE and n.domain == contract.DOMAIN]
    assert count_proxy_nodes(proto) == model.config.num_hidden_layers == len(nodes)
    assert [i.name for i in proto.graph.input] == ["input_ids"] and [o.name for o in proto.graph.output] == ["logits"]
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & {"Softmax", "CumSum", "LessOrEqual", "Expand"}, f"attention, mask or GQA-expand nodes left: {ops}"
    dims = [d.dim_param for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert all(dims), f"input axes must be dynamic, got {dims}"
    windows = []
    for node in nodes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        config, scale, window = contract.decode_attrs(attrs)
        assert config == SPARSE
        assert attrs["plugin_namespace"] == b"proxy" and attrs["plugin_version"] == b"1"
        assert attrs["is_causal"] == 1
        layer = next(int(p.value) for p in node.metadata_props if p.key == contract.LAYER_IDX_KEY)
        assert node.name == f"layers.{layer}.proxy_attention"
        attn = model.model.layers[layer].self_attn
        assert scale == pytest.approx(attn.scaling, rel=1e-7)
        windows.append(window)
    assert windows == layer_windows_from_config(model.config)
    if name == "gemma3":
        assert windows == [16, 16, 0]
    if name == "mistral":
        assert windows == [48, 48]
    fn = [f for f in proto.functions if f.domain == contract.DOMAIN and f.name == contract.OP_TYPE]
    assert len(fn) == 1 and set(fn[0].attribute) == set(contract.attribute_names(SPARSE))


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_ort_local_function_equals_stock_attention(exported, name):
    model, path = exported[name]
    sess = make_session(path, sparse=False)
    for i, (b, s) in enumerate(SHAPES):
        ids = _ids(b, s, i)
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        assert_close(got, _torch_logits(model, ids, "sdpa"), "fp32", what=f"{name} B={b} S={s} local function vs sdpa")


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_ort_custom_op_equals_pytorch_proxyattn(exported, name):
    model, path = exported[name]
    sess = make_session(path, sparse=True)
    dense = make_session(path, sparse=False)
    for i, (b, s) in enumerate(SHAPES):
        ids = _ids(b, s, 10 + i)
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        assert_close(got, _torch_logits(model, ids, "proxyattn", SPARSE), "fp32", what=f"{name} B={b} S={s} custom op vs proxyattn")
        if s == 300 and name != "mistral":  # mistral: every layer is windowed, so dense by contract
            ref = torch.from_numpy(dense.run(None, {"input_ids": ids.numpy()})[0])
            rel = ((got - ref).norm() / ref.norm()).item()
            assert rel > 1e-3, f"{name}: the sparse session equals the dense one (rel {rel:.1e}): the custom op did not run"


def test_gamma_rule_and_config_dense_layers(tmp_path):
    """A float config value (gamma 0.9 -> float32 attribute) decodes exactly and the budgets agree with PyTorch; a layer
    the config keeps dense (dense_first_layers=1) becomes a node that says so (dense_below_tokens = 2**31 - 1)."""
    cfg = ProxyAttnConfig(block_size=64, gamma=0.9, min_budget_tokens=0, dense_below_tokens=64, dense_first_layers=1)
    model = tiny_model("llama", seed=3)
    path = export_model(model, tmp_path / "gamma.onnx", config=cfg, example_batch=3, example_seq=33)
    per_layer = {}
    for node in onnx.load(str(path)).graph.node:
        if node.op_type == contract.OP_TYPE:
            config, _, _ = contract.decode_attrs({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            assert config.gamma == 0.9
            per_layer[node.name] = config.dense_below_tokens
    assert per_layer == {"layers.0.proxy_attention": 2**31 - 1, "layers.1.proxy_attention": 64}
    sess = make_session(path, sparse=True)
    for b, s in [(2, 64), (1, 300)]:
        ids = _ids(b, s, 7)
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        assert_close(got, _torch_logits(model, ids, "proxyattn", cfg), "fp32", what=f"gamma B={b} S={s}")


def test_onnx_checker_full_and_polygraphy(exported):
    for _, path in exported.values():
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    _, path = exported["gemma3"]
    res = subprocess.run(
        [POLYGRAPHY, "inspect", "model", str(path), "--show", "layers"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("[Op: ProxyAttention]") == 3, res.stdout[-2000:]
    assert "'proxy': 1" in res.stdout


def test_polygraphy_runs_the_file_in_onnxruntime(exported):
    _, path = exported["qwen2"]
    res = subprocess.run(
        [POLYGRAPHY, "run", str(path), "--onnxrt", "--input-shapes", "input_ids:[2,70]", "--val-range", "input_ids:[0,127]"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "PASSED" in res.stdout + res.stderr


def test_tensorrt_rtx_parses_through_the_local_function(exported):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx-cu13 is pinned in requirements.txt")
    for name, (_, path) in exported.items():
        logger = trt.Logger(trt.Logger.ERROR)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        ok = parser.parse_from_file(str(path))
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        assert ok and not errors, f"{name}: {errors}"
        assert network.num_inputs == 1 and tuple(network.get_input(0).shape) == (-1, -1)
        assert network.num_outputs == 1
        if name == "gemma3":  # sliding and full layers: TensorRT-RTX also builds an engine from it (no GPU needed)
            config = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            profile.set_shape("input_ids", (1, 1), (2, 64), (4, 256))
            config.add_optimization_profile(profile)
            engine = builder.build_serialized_network(network, config)
            assert engine is not None and engine.nbytes > 0


@pytest.mark.parametrize("dtype,np_dtype", [(torch.float16, np.float16), (torch.bfloat16, None)])
def test_half_precision_exports(tmp_path, dtype, np_dtype):
    model = tiny_model("llama")
    path = export_model(model, tmp_path / "half.onnx", config=SPARSE, dtype=dtype)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert count_proxy_nodes(proto) == 2
    want = {torch.float16: onnx.TensorProto.FLOAT16, torch.bfloat16: onnx.TensorProto.BFLOAT16}[dtype]
    assert proto.graph.output[0].type.tensor_type.elem_type == want
    if np_dtype is not None:  # ONNX Runtime's CPU provider has no bf16 kernels; fp16 runs
        ids = _ids(2, 70, 1)
        for sparse, impl in ((False, "sdpa"), (True, "proxyattn")):
            got = torch.from_numpy(make_session(path, sparse=sparse).run(None, {"input_ids": ids.numpy()})[0].astype(np.float32))
            ref = _torch_logits(model, ids, impl, SPARSE).float()
            assert_close(got, ref, "bf16", what=f"fp16 sparse={sparse}")  # fp16 activations through 2 layers


def test_meta_model_streams_weights_to_external_data(tmp_path):
    from accelerate import init_empty_weights

    real = tiny_model("qwen2")
    with init_empty_weights(include_buffers=False):
        meta = type(real)(real.config)
    assert next(meta.parameters()).device.type == "meta"
    state = real.state_dict()
    path = export_model(meta, tmp_path / "meta.onnx", config=SPARSE, weights=state)
    assert (tmp_path / "meta.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.onnx", "meta.onnx.data"]
    onnx.checker.check_model(str(path), full_check=True)
    ids = _ids(2, 70, 2)
    got = torch.from_numpy(make_session(path, sparse=False).run(None, {"input_ids": ids.numpy()})[0])
    assert_close(got, _torch_logits(real, ids, "sdpa"), "fp32", what="meta export")
    missing = dict(state)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
        export_model(meta, tmp_path / "bad" / "meta.onnx", config=SPARSE, weights=missing)
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_llama3_8b_architecture_memory_plan():
    """8B in bf16 (~16 GB of weights) cannot be exported materialised next to other work on a 24 GB machine
    without the check; on the meta device only the largest tensor is held at a time."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 8.0e9 < n_params < 8.1e9
    materialised = n_params * 2 + 2 * 1024**3
    streamed = estimate_export_memory(model, torch.bfloat16)
    assert streamed == 2 * 128256 * 4096 * 2 + 2 * 1024**3
    assert streamed < 5 * 1024**3 < 16 * 1024**3 < materialised


def test_refuses_early_when_memory_is_short(tmp_path, monkeypatch):
    import export.onnx_export as ox

    monkeypatch.setattr(ox, "available_memory", lambda: 1024**3)
    with pytest.raises(ValueError, match=r"needs about 2\.0 GiB of memory but 1\.0 GiB is available"):
        export_model(tiny_model("llama"), tmp_path / "x.onnx", config=SPARSE)
    assert list(tmp_path.iterdir()) == []


class _HandRolledAttention(torch.nn.Module):
    """An attention module that computes attention itself (not through transformers' attention interface)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        a = self.inner
        b, s, _ = hidden_states.shape
        q = a.q_proj(hidden_states).view(b, s, -1, a.head_dim).transpose(1, 2)
        k = a.k_proj(hidden_states).view(b, s, -1, a.head_dim).transpose(1, 2)
        v = a.v_proj(hidden_states).view(b, s, -1, a.head_dim).transpose(1, 2)
        rep = q.shape[1] // k.shape[1]
        out = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), is_causal=True)
        return a.o_proj(out.transpose(1, 2).reshape(b, s, -1)), None


def test_unrecognised_attention_fails_and_leaves_files_alone(tmp_path):
    target = tmp_path / "x.onnx"
    target.write_bytes(b"previous")
    model = tiny_model("llama")
    model.model.layers[1].self_attn = _HandRolledAttention(model.model.layers[1].self_attn)
    with pytest.raises(ValueError, match=r"1 proxy::ProxyAttention nodes but the model has 2 attention layers"):
        export_model(model, target, config=SPARSE)
    assert target.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["x.onnx"]


@pytest.mark.parametrize(
    "config,match",
    [
        (ProxyAttnConfig(gamma=0.9123456789), "does not survive the float32"),
        (ProxyAttnConfig(dense_layer_mask=2**40), "does not fit int32"),
    ],
)
def test_config_the_contract_cannot_carry(tmp_path, config, match):
    with pytest.raises(ValueError, match=match):
        export_model(tiny_model("llama"), tmp_path / "x.onnx", config=config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(example_batch=1), "example_batch=1 must be an int >= 2"),
        (dict(opset=17), "opset=17 is not supported"),
        (dict(dtype=torch.float64), "dtype=torch.float64 is not supported"),
        (dict(config=None), "config must be a ProxyAttnConfig"),
        (dict(weights={}), "weights= is only for a model on the meta device"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(config=SPARSE) | kwargs
    with pytest.raises(ValueError, match=match):
        export_model(tiny_model("llama"), tmp_path / "x.onnx", **args)
    assert list(tmp_path.iterdir()) == []
