"""engines/serving.py without a server: request parameters, incremental text with stop strings, sampling, the
decoding loop against a scripted engine, the byte-level tokenizer, and the transformers engine on tiny-llama
(ProxyAttn prefill sparse past dense_below_tokens, decode dense over the KV cache, greedy = the model's own
`generate`)."""

import json

import pytest
import torch

from engines import serving
from engines.models import get_model
from engines.serving import Chunk, GenerationParams, RequestError, TextStream, generate, parse_parameters

TOK = serving.byte_tokenizer(512, 1, 2)


def _ids(text):
    return TOK(text)["input_ids"][1:]  # without <s>


# ------------------------------------------------------------------------------------------------ parameters
def test_parameters_defaults_and_values():
    assert parse_parameters(None, max_tokens_limit=100) == GenerationParams(max_tokens=16)
    p = parse_parameters(
        json.dumps(
            {
                "max_tokens": 5,
                "temperature": 1,
                "top_p": 0.5,
                "seed": 3,
                "stop": "\n",
                "ignore_eos": True,
                "stream": True,
                "full_logits": True,
                "binary_data_output": True,
            }
        ),
        max_tokens_limit=100,
    )
    assert p == GenerationParams(5, 1.0, 0.5, 3, "\n", True, True, True)
    assert parse_parameters({}, max_tokens_limit=4).max_tokens == 4  # the default never exceeds the limit


@pytest.mark.parametrize(
    "params, fragment",
    [
        ({"max_tokens": "ten"}, "parameter 'max_tokens' must be an integer, got str 'ten'"),
        ({"max_tokens": 2.5}, "parameter 'max_tokens' must be an integer, got float 2.5"),
        ({"max_tokens": True}, "parameter 'max_tokens' must be an integer, got bool True"),
        ({"max_tokens": 0}, "max_tokens=0 is out of range; allowed: 1..100"),
        ({"max_tokens": 101}, "max_tokens=101 is out of range; allowed: 1..100"),
        ({"temperature": "hot"}, "parameter 'temperature' must be a number, got str 'hot'"),
        ({"temperature": -1}, "temperature=-1.0 is out of range; allowed: [0, 100]"),
        ({"temperature": float("nan")}, "temperature=nan is out of range"),
        ({"top_p": 0}, "top_p=0.0 is out of range; allowed: (0, 1]"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"stop": 5}, "parameter 'stop' must be a string (one stop sequence), got int 5"),
        ({"stop": ""}, "parameter 'stop' must not be empty"),
        ({"stream": "yes"}, "parameter 'stream' must be true or false, got str 'yes'"),
        ({"ignore_eos": 1}, "parameter 'ignore_eos' must be true or false, got int 1"),
        ({"max_token": 5}, "unknown parameter 'max_token'; allowed: max_tokens, temperature"),
    ],
)
def test_bad_parameters_are_named(params, fragment):
    with pytest.raises(RequestError) as err:
        parse_parameters(json.dumps(params) if "nan" not in fragment else params, max_tokens_limit=100)
    assert fragment in str(err.value), str(err.value)


def test_parameters_must_be_a_json_object():
    with pytest.raises(RequestError, match="must be a JSON object, got list"):
        parse_parameters("[1]", max_tokens_limit=10)
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_parameters("{", max_tokens_limit=10)


# ------------------------------------------------------------------------------------------------ text
def _stream(text, stop=None):
    ts = TextStream(TOK, stop)
    deltas = []
    for token in _ids(text):
        delta, stopped = ts.add(token)
        deltas.append(delta)
        if stopped:
            return deltas, True, ts.flush()
    return deltas, False, ts.flush()


def test_text_stream_holds_back_incomplete_utf8():
    deltas, stopped, rest = _stream("aé🙂b")
    assert not stopped and rest == ""
    assert deltas == ["a", "", "é", "", "", "", "🙂", "b"]  # é is 2 bytes, 🙂 4: nothing printed mid-character


def test_text_stream_stops_before_the_stop_string_across_tokens():
    deltas, stopped, rest = _stream("one two three", stop="two")
    assert stopped and "".join(deltas) == "one " and rest == ""


def test_text_stream_releases_a_false_start_of_the_stop_string():
    deltas, stopped, rest = _stream("tx tw end", stop="two")
    assert not stopped and "".join(deltas) + rest == "tx tw end"
    assert deltas[:5] == ["", "tx", " ", "", ""]  # 't' and "tw" are held (they could begin "two")
    assert deltas[5] == "tw "  # released once ' ' shows they do not


def test_text_stream_flush_returns_what_was_held():
    deltas, stopped, rest = _stream("abc t", stop="two")
    assert not stopped and "".join(deltas) == "abc " and rest == "t"


# ------------------------------------------------------------------------------------------------ decoding
class ScriptedEngine:
    """Logits that make the greedy choice follow `script`; records the calls."""

    def __init__(self, script, vocab=512, max_len=64):
        self.script, self.vocab_size, self.max_len, self.device = list(script), vocab, max_len, torch.device("cpu")
        self.calls = []

    def _logits(self, n):
        out = torch.zeros(self.vocab_size)
        out[self.script[min(n, len(self.script) - 1)]] = 1.0
        return out

    def start(self, ids):
        self.calls.append(("start", len(ids)))
        return self._logits(0), 0

    def step(self, n, token):
        self.calls.append(("step", token))
        return self._logits(n + 1), n + 1


def _run(engine, params, eos=(2,), cancelled=lambda: False, prompt=(1, 100)):
    return list(generate(engine, TOK, list(prompt), params, eos, cancelled))


def test_generate_greedy_follows_the_logits_and_stops_at_length():
    script = _ids("hello")
    engine = ScriptedEngine(script)
    chunks = _run(engine, GenerationParams(max_tokens=5))
    assert [c.token for c in chunks] == script and "".join(c.text for c in chunks) == "hello"
    assert [c.finish_reason for c in chunks] == [None] * 4 + ["length"]
    assert engine.calls == [("start", 2)] + [("step", t) for t in script[:4]]  # no step after the last token


def test_generate_stops_at_eos_unless_ignored():
    engine = ScriptedEngine(_ids("ab") + [2] + _ids("cd"))
    chunks = _run(engine, GenerationParams(max_tokens=10))
    assert chunks[-1] == Chunk(2, "", "stop") and "".join(c.text for c in chunks) == "ab"
    chunks = _run(ScriptedEngine(_ids("ab") + [2] + _ids("cd")), GenerationParams(max_tokens=5, ignore_eos=True))
    assert chunks[-1].finish_reason == "length" and "".join(c.text for c in chunks) == "abcd"


def test_generate_stop_string():
    chunks = _run(ScriptedEngine(_ids("x = 1;\ny")), GenerationParams(max_tokens=20, stop=";"))
    assert "".join(c.text for c in chunks) == "x = 1" and chunks[-1].finish_reason == "stop"


def test_generate_cancelled_stops_after_the_current_token():
    seen = []
    chunks = _run(ScriptedEngine(_ids("abcdef")), GenerationParams(max_tokens=6), cancelled=lambda: len(seen.append(1) or seen) >= 2)
    assert [c.finish_reason for c in chunks] == [None, "cancelled"] and len(chunks) == 2


def test_generate_refuses_what_does_not_fit():
    with pytest.raises(RequestError, match=r"prompt of 60 tokens \+ max_tokens 5 exceeds the longest sequence this model serves \(64"):
        _run(ScriptedEngine([5]), GenerationParams(max_tokens=5), prompt=[3] * 60)
    with pytest.raises(RequestError, match=r"token ids must lie in \[0, 512\), got values in \[3, 600\]"):
        _run(ScriptedEngine([5]), GenerationParams(max_tokens=2), prompt=[3, 600])


def test_sampling_is_seeded_and_top_p_narrows():
    logits = torch.randn(512, generator=torch.Generator().manual_seed(0))
    p = GenerationParams(temperature=1.0, seed=1)
    draws = [serving.sample(logits, p, torch.Generator().manual_seed(1)) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    assert serving.sample(logits, GenerationParams(temperature=1.0, top_p=1e-6), torch.Generator()) == int(logits.argmax())
    assert serving.sample(logits, GenerationParams(), None) == int(logits.argmax())


# ------------------------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer_round_trips_and_checks_its_ids():
    text = "Grüße, 世界! 🙂\n\t"
    ids = TOK(text)["input_ids"]
    assert ids[0] == 1 and all(3 <= i < 259 for i in ids[1:]) and len(ids) == 1 + len(text.encode())
    assert TOK.decode(ids, skip_special_tokens=True) == text and TOK.eos_token_id == 2
    with pytest.raises(ValueError, match="vocab_size >= 259"):
        serving.byte_tokenizer(100, 1, 2)
    with pytest.raises(ValueError, match="eos_id=5 must lie in 1..2 or 259..511"):
        serving.byte_tokenizer(512, 1, 5)
    llama = get_model("llama3.1-8b").hf_config
    big = serving.make_tokenizer("random", dict(llama))
    assert big.bos_token_id == 128000 and big.eos_token_id == 128001


# ------------------------------------------------------------------------------------------------ transformers engine
@pytest.fixture(scope="module")
def tiny_engines():
    cfg = serving.serving_config(get_model("tiny-llama").proxyattn)
    sparse = serving.TorchEngine.load("random:tiny-llama", attention="proxyattn", proxyattn_attrs=cfg.to_attrs())
    dense = serving.TorchEngine.load("random:tiny-llama", attention="dense")
    return sparse, dense, cfg


def test_torch_engine_prefills_sparse_and_decodes_dense(tiny_engines, restore_hf_config):
    import proxyattn.hf

    sparse, dense, cfg = tiny_engines
    proxyattn.hf.register(cfg)
    prompt = _ids("lorem ipsum dolor sit amet " * 8)[:200]  # past dense_below_tokens = 128
    n_layers = get_model("tiny-llama").hf_config["num_hidden_layers"]
    logits, cache = sparse.start(prompt)  # records its own paths (proxyattn.hf.record_paths does not nest)
    assert sparse.sparse_layers == n_layers
    with proxyattn.hf.record_paths() as paths:
        token = int(logits.argmax())
        for _ in range(2):
            logits, cache = sparse.step(cache, token)
            token = int(logits.argmax())
    assert [r.path for r in paths] == ["dense:decode"] * 2 * n_layers
    assert {r.kv_len for r in paths} == {len(prompt) + 1, len(prompt) + 2}  # over the KV cache
    dense.start(prompt)
    assert dense.sparse_layers == 0
    # the same weights in both engines (seeded by parameter name)
    for (n, a), (_, b) in zip(sparse.model.named_parameters(), dense.model.named_parameters()):
        assert torch.equal(a, b), n


def test_torch_engine_greedy_equals_transformers_generate(tiny_engines):
    _, dense, _ = tiny_engines
    prompt = _ids("The quick brown fox")
    ours = [c.token for c in generate(dense, TOK, prompt, GenerationParams(max_tokens=6, ignore_eos=True))]
    ref = dense.model.generate(
        torch.tensor([prompt]), max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None
    )[0, len(prompt) :].tolist()
    assert ours == ref
    last = dense.logits(torch.tensor([prompt]))[0, -1]
    assert int(last.argmax()) == ours[0]
