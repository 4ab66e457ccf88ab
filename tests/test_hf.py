"""The transformers drop-in (`proxyattn.hf`) on tiny random models of every supported architecture.

Oracles: the stock `sdpa` attention of transformers (full budget must equal it; every dense path must equal it
bit for bit up to fp32 rounding) and `proxyattn.proxy_attention` called directly on the same q, k, v.
"""

from __future__ import annotations

import pytest
import torch

import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig, proxy_attention
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("restore_hf_config")

FULL = ProxyAttnConfig(block_size=64, gamma=1.0, min_budget_tokens=0, dense_below_tokens=0)
# Sparse enough that the output differs from dense at a few hundred tokens.
SPARSE = ProxyAttnConfig(block_size=64, min_budget_tokens=0, dense_below_tokens=0, budget_fraction=0.25, dense_density=None)

VOCAB = 96


def _tiny(arch: str, **over):
    """A tiny random causal LM of the given architecture (fp32, eval mode, sdpa attention)."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=2048)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, num_attention_heads=4, num_key_value_heads=1)
        cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
        cls = transformers.MistralForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, num_attention_heads=8, num_key_value_heads=8)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, num_attention_heads=7, num_key_value_heads=1, head_dim=16)
        cls = transformers.Qwen3ForCausalLM
    elif arch == "gemma3":
        common["num_hidden_layers"] = 4
        cfg = transformers.Gemma3TextConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=48,
            layer_types=["sliding_attention", "full_attention"] * 2,
            query_pre_attn_scalar=16,
        )
        cls = transformers.Gemma3ForCausalLM
    else:
        raise AssertionError(arch)
    for key, value in over.items():
        setattr(cfg, key, value)
    torch.manual_seed(0)
    return cls(cfg).eval()


def _logits(model, ids, impl, attention_mask=None):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=attention_mask).logits


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["proxyattn", "proxyattn_ref"])
def test_full_budget_equals_stock_sdpa(arch, impl):
    hf.register(FULL)
    model = _tiny(arch)
    ids = torch.randint(0, VOCAB, (2, 203), generator=torch.Generator().manual_seed(1))
    expected = _logits(model, ids, "sdpa")
    with hf.record_paths() as rec:
        got = _logits(model, ids, impl)
    paths = [r.path for r in rec]
    if arch == "gemma3":  # sliding layers 0 and 2 stay dense, full layers 1 and 3 are sparse
        assert paths == ["dense:mask", "sparse", "dense:mask", "sparse"], paths
    else:
        assert paths == ["sparse"] * model.config.num_hidden_layers, paths
    assert all(r.implementation == impl for r in rec)
    assert_close(got, expected, "fp32", what=f"{arch} {impl} logits")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma3"])
def test_sparse_layer_equals_proxy_attention_on_same_inputs(arch):
    """Layout, GQA and scale handling: the registered function equals proxy_attention called directly."""
    hf.register(SPARSE)
    model = _tiny(arch)
    layer = next(l for l in model.model.layers if getattr(l.self_attn, "sliding_window", None) is None)
    attn = layer.self_attn
    b, s, d = 2, 200, attn.head_dim
    hq, hkv = model.config.num_attention_heads, model.config.num_key_value_heads
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv))
    out, weights = hf.proxyattn_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    assert weights is None and out.shape == (b, s, hq, d)
    expected = proxy_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), SPARSE, scale=attn.scaling)
    assert_close(out, expected, "fp32", what="hf sparse vs proxy_attention")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=True)
    rel = ((out - dense.transpose(1, 2)).norm() / dense.norm()).item()
    assert rel > 1e-3, f"budget_fraction 0.25 should change the output (rel diff {rel:.2e})"


def test_partial_budget_changes_logits_and_ref_matches():
    hf.register(SPARSE)
    model = _tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 320), generator=torch.Generator().manual_seed(3))
    stock = _logits(model, ids, "sdpa")
    got = _logits(model, ids, "proxyattn")
    ref = _logits(model, ids, "proxyattn_ref")
    assert_close(got, ref, "fp32", what="proxyattn vs proxyattn_ref on the CPU")
    # The first block (64 tokens) attends within its kept blocks = everything: identical to stock.
    assert_close(got[:, :64], stock[:, :64], "fp32", what="first block")
    rel = ((got - stock).norm() / stock.norm()).item()
    assert rel > 1e-4, f"sparse logits equal dense (rel {rel:.2e}): the sparse path did not run"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_generate_prefill_sparse_decode_dense(arch):
    """Full budget: generate() equals stock token for token and score for score; the cache carries on."""
    hf.register(FULL)
    model = _tiny(arch)
    ids = torch.randint(1, VOCAB, (1, 150), generator=torch.Generator().manual_seed(4))  # no pad token (0)
    kw = dict(max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        stock = model.generate(ids, **kw)
    model.set_attn_implementation("proxyattn")
    with torch.no_grad(), hf.record_paths() as rec:
        got = model.generate(ids, **kw)
    assert torch.equal(got.sequences, stock.sequences)
    for a, e in zip(got.scores, stock.scores):
        assert_close(a, e, "fp32", what="generation scores")
    n_layers = model.config.num_hidden_layers
    prefill, decode = rec[:n_layers], rec[n_layers:]
    assert any(r.path == "sparse" for r in prefill) and all(r.q_len == 150 for r in prefill)
    assert len(decode) == 4 * n_layers
    # Decode steps see the whole cache (prompt + generated so far), or the window on sliding layers.
    for step in range(4):
        for layer, r in zip(model.model.layers, decode[step * n_layers : (step + 1) * n_layers]):
            assert r.q_len == 1 and r.path == "dense:decode", r
            window = getattr(layer.self_attn, "sliding_window", None)
            assert r.kv_len == 151 + step if window is None else r.kv_len <= window, r


def test_generate_sparse_prefill_then_dense_decode_reuses_cache():
    """Partial budget: decoding after a sparse prefill equals a stock decode step over the same cache."""
    hf.register(SPARSE)
    model = _tiny("llama")
    ids = torch.randint(0, VOCAB, (1, 260), generator=torch.Generator().manual_seed(5))
    model.set_attn_implementation("proxyattn")
    with torch.no_grad():
        pre = model(ids, use_cache=True)
        nxt = pre.logits[:, -1:].argmax(-1)
        cache_len = pre.past_key_values.get_seq_length()
        with hf.record_paths() as rec:
            step = model(nxt, past_key_values=pre.past_key_values, use_cache=True).logits
        # The cache now holds prompt + 1 token; recompute the same step with stock attention on a copy of the
        # sparse-prefill cache: keys and values must be those the sparse prefill wrote.
        pre2 = model(ids, use_cache=True)
        model.set_attn_implementation("sdpa")
        stock_step = model(nxt, past_key_values=pre2.past_key_values, use_cache=True).logits
    assert cache_len == 260
    assert [r.path for r in rec] == ["dense:decode"] * 2
    assert_close(step, stock_step, "fp32", what="decode step after sparse prefill")


@pytest.mark.parametrize("impl", ["proxyattn", "proxyattn_ref"])
def test_padded_batch_takes_dense_path(impl):
    hf.register(SPARSE)
    model = _tiny("qwen2")
    ids = torch.randint(1, VOCAB, (2, 180), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[1, :37] = 0  # left padding on the second sequence
    expected = _logits(model, ids, "sdpa", attention_mask=mask)
    with hf.record_paths() as rec:
        got = _logits(model, ids, impl, attention_mask=mask)
    assert [r.path for r in rec] == ["dense:mask"] * 2
    assert_close(got, expected, "fp32", what="padded batch")
    # Without padding the same batch is sparse (the mask of ones is dropped by transformers).
    with hf.record_paths() as rec:
        _logits(model, ids, impl, attention_mask=torch.ones_like(ids))
    assert [r.path for r in rec] == ["sparse"] * 2


def test_sliding_window_layers_stay_dense():
    hf.register(SPARSE)
    # Mistral with a window: every layer is a sliding layer, whether the prompt is shorter than the window or not.
    model = _tiny("mistral", sliding_window=64)
    for s, path in ((50, "dense:sliding_window"), (200, "dense:mask")):
        ids = torch.randint(0, VOCAB, (1, s), generator=torch.Generator().manual_seed(s))
        expected = _logits(model, ids, "sdpa")
        with hf.record_paths() as rec:
            got = _logits(model, ids, "proxyattn")
        assert [r.path for r in rec] == [path] * 2
        assert_close(got, expected, "fp32", what=f"mistral window S={s}")
    # Gemma 3: sliding layers dense, full layers sparse (partial budget: the logits differ from stock).
    model = _tiny("gemma3")
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(7))
    with hf.record_paths() as rec:
        _logits(model, ids, "proxyattn")
    assert [r.path for r in rec] == ["dense:sliding_window", "sparse"] * 2


def test_short_prompts_dense():
    hf.register(SPARSE.replace(dense_below_tokens=256))
    model = _tiny("llama")
    for s, path in ((256, "dense:short"), (257, "sparse")):
        ids = torch.randint(0, VOCAB, (1, s), generator=torch.Generator().manual_seed(s))
        expected = _logits(model, ids, "sdpa")
        with hf.record_paths() as rec:
            got = _logits(model, ids, "proxyattn")
        assert [r.path for r in rec] == [path] * 2
        if path != "sparse":
            assert_close(got, expected, "fp32", what="short prompt")


def test_per_layer_dense_choice():
    model = _tiny("llama", num_hidden_layers=4)
    ids = torch.randint(0, VOCAB, (1, 130), generator=torch.Generator().manual_seed(8))
    cases = [
        (SPARSE.replace(dense_first_layers=1), ["dense:layer", "sparse", "sparse", "sparse"]),
        (SPARSE.replace(dense_layer_mask=ProxyAttnConfig.layer_mask([0, 2])), ["dense:layer", "sparse", "dense:layer", "sparse"]),
        (SPARSE.replace(dense_first_layers=4), ["dense:layer"] * 4),
    ]
    for cfg, want in cases:
        hf.register(cfg)
        with hf.record_paths() as rec:
            got = _logits(model, ids, "proxyattn")
        assert [r.path for r in rec] == want
    # All layers dense: equal to stock.
    assert_close(got, _logits(model, ids, "sdpa"), "fp32", what="all layers dense")


def test_layer_choice_without_layer_idx_is_an_error():
    hf.register(SPARSE.replace(dense_first_layers=1))

    class NoIdx(torch.nn.Module):
        is_causal = True

    q = torch.randn(1, 2, 130, 16)
    with pytest.raises(ValueError, match="no layer_idx"):
        hf.proxyattn_attention_forward(NoIdx(), q, q, q, None)


def test_non_causal_and_dropout_dense():
    hf.register(SPARSE)

    class Mod(torch.nn.Module):
        is_causal = False
        layer_idx = 0

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 130, 16, generator=g) for _ in range(3))
    with hf.record_paths() as rec:
        out, _ = hf.proxyattn_attention_forward(Mod(), q, k, v, None)
    assert rec[0].path == "dense:not_causal"
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2), "fp32", what="non-causal")
    Mod.is_causal = True
    with hf.record_paths() as rec:
        hf.proxyattn_attention_forward(Mod(), q, k, v, None, dropout=0.1)
    assert rec[0].path == "dense:dropout"


def test_register_validates_and_config_fields_round_trip():
    with pytest.raises(ValueError, match="ProxyAttnConfig"):
        hf.register({"gamma": 0.9})
    cfg = ProxyAttnConfig(dense_first_layers=3, dense_layer_mask=ProxyAttnConfig.layer_mask([0, 7, 52]))
    assert ProxyAttnConfig.from_attrs(cfg.to_attrs()) == cfg
    assert [i for i in range(9) if not cfg.layer_is_sparse(i)] == [0, 1, 2, 7]
    with pytest.raises(ValueError, match="dense_first_layers=-1"):
        ProxyAttnConfig(dense_first_layers=-1)
    with pytest.raises(ValueError, match="dense_layer_mask"):
        ProxyAttnConfig(dense_layer_mask=2**53)
    with pytest.raises(ValueError, match="layer index 53"):
        ProxyAttnConfig.layer_mask([53])
    with pytest.raises(ValueError, match="layer_idx=-1"):
        cfg.layer_is_sparse(-1)
    assert hf.register(cfg) is cfg and hf.active_config() is cfg


def test_export_goes_through_the_installed_function_only(monkeypatch):
    """While exporting, a call returns the function installed with `set_export_attention` (the exporter's node);
    with none installed it is an error naming the fix (the algorithm package never imports the exporter)."""

    class Mod(torch.nn.Module):
        is_causal = True
        layer_idx = 3

    q, k, v = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8), torch.randn(1, 2, 16, 8)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    previous = hf.set_export_attention(None)
    try:
        with pytest.raises(RuntimeError, match="export.onnx_export.export_model"):
            hf.proxyattn_attention_forward(Mod(), q, k, v, None, scaling=0.5)
        calls = []

        def emit(query, key, value, **kwargs):
            calls.append(kwargs)
            return torch.zeros_like(query)

        assert hf.set_export_attention(emit) is None
        out, weights = hf.proxyattn_attention_forward(Mod(), q, k, v, None, scaling=0.5, sliding_window=None)
        assert out.shape == (1, 16, 4, 8) and weights is None
        assert calls == [{"config": hf.active_config(), "scale": 0.5, "sliding_window": None, "layer_idx": 3}]
        with pytest.raises(ValueError, match="callable"):
            hf.set_export_attention("emit")
    finally:
        hf.set_export_attention(previous)


def test_nested_path_recorders_with_equal_records_leave_in_order():
    from proxyattn import hf

    with hf.record_paths() as outer:
        with hf.record_paths() as inner:
            assert inner == outer == []  # equal lists: the inner one must be the one removed
        assert hf._recorders and hf._recorders[-1] is outer
    assert all(r is not outer and r is not inner for r in hf._recorders)
