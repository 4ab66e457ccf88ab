"""The real SmolLM2-135M (packaged GGUF, 9 query / 3 KV heads, head dim 64) through export and ONNX Runtime.

CI budget: the model keeps its real weights but only its first LAYERS of 30 decoder layers (a 30-layer export and
the ONNX Runtime runs take ~4 minutes on 2 busy cores; that full-depth run passed during development, see
docs/export.md)."""

from __future__ import annotations

import pytest
import torch

from export.onnx_export import count_proxy_nodes, export_model
from plugins.onnxruntime import make_session
from proxyattn import ProxyAttnConfig, hf, weights
from tests.helpers import assert_close

pytestmark = pytest.mark.slow  # the real SmolLM2 exported and run in ONNX Runtime

LAYERS = 6
SPARSE = ProxyAttnConfig(block_size=64, stride=4, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.25)
TEXT = (
    "ProxyAttn makes long-context prefill fast: one pooled proxy head ranks the key blocks, every head gets its own "
    "budget from its last query block, and block-sparse attention runs on the kept blocks. The ONNX export carries "
    "one ProxyAttention node per layer, and a local function keeps the file runnable anywhere. "
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    try:
        weights.locate("smollm2")
    except ValueError as exc:
        pytest.skip(f"SmolLM2 weights are not installed: {exc}")
    model = weights.load_model("smollm2")
    assert model.config.num_hidden_layers == 30
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = model.config.layer_types[:LAYERS]
    tok = weights.load_tokenizer("smollm2")
    path = export_model(model, tmp_path_factory.mktemp("smollm2") / "smollm2.onnx", config=SPARSE, optimize=False)
    return model, tok, path


def test_smollm2_export_and_onnxruntime_parity(smollm2):
    import onnx

    model, tok, path = smollm2
    proto = onnx.load(str(path), load_external_data=False)
    assert count_proxy_nodes(proto) == model.config.num_hidden_layers == LAYERS
    ids = torch.tensor(tok(TEXT * 8)["input_ids"])
    assert ids.numel() >= 300
    dense = make_session(path, sparse=False)
    sparse = make_session(path, sparse=True)
    for b, s in [(2, 70), (1, 300)]:
        batch = torch.stack([ids[i : i + s] for i in range(b)])
        model.set_attn_implementation("sdpa")
        with torch.no_grad():
            want_dense = model(input_ids=batch, use_cache=False).logits
        hf.register(SPARSE)
        model.set_attn_implementation("proxyattn")
        with torch.no_grad():
            want_sparse = model(input_ids=batch, use_cache=False).logits
        got_dense = torch.from_numpy(dense.run(None, {"input_ids": batch.numpy()})[0])
        got_sparse = torch.from_numpy(sparse.run(None, {"input_ids": batch.numpy()})[0])
        assert_close(got_dense, want_dense, "fp32", what=f"SmolLM2 dense B={b} S={s}")
        assert_close(got_sparse, want_sparse, "fp32", what=f"SmolLM2 sparse B={b} S={s}")
        if s == 300:
            rel = ((got_sparse - got_dense).norm() / got_dense.norm()).item()
            assert rel > 1e-3, f"sparse equals dense at S=300 (rel {rel:.1e})"
