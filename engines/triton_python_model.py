"""Triton Python-backend model: text in, text out (and token ids in, logits out), on ONNX Runtime or transformers.

Copied as `1/model.py` into every Python-backend model of the repository by `engines.triton_repo`; the engine and
everything else come from the model's `config.pbtxt` parameters (`engines.triton_repo.python_llm_config`):

* `engine`: `onnxruntime` (the embedded CPU default: `profiles`, a JSON list of {name, min, opt, max, file}, one ONNX
  Runtime optimized model per sequence-length profile, and `vocab_size`) or `transformers` (`weights`, `attention`
  = `proxyattn` or `dense`, `proxyattn` = the JSON of `ProxyAttnConfig.to_attrs()`, `dtype`); a KIND_GPU instance
  runs on its GPU, a KIND_CPU one on the CPU. The work itself is `engines.serving`.
* `tokenizer`: a directory (relative to the version directory) saved with `save_pretrained`; without it only
  `input_ids` requests are served.
* `max_batch`: the largest batch of an `input_ids` request; `default_max_tokens`.

A request carries exactly one of
* `text_input` (BYTES [1]): generate a continuation. Options come as request parameters (the `parameters` object
  of a generate request, whose other top-level keys Triton also passes as parameters): max_tokens, temperature
  (0 = greedy), top_p, seed, stop, ignore_eos, stream. Outputs: `text_output` (the completion, prompt excluded),
  `output_ids`, `finish_reason` ("length", "stop", "cancelled"), `prompt_tokens`, `completion_tokens`,
  `first_token_ms` (server-side time from the start of the request's handling to its first token) and, from the
  transformers engine, `sparse_layers` (attention calls of the prefill that took the sparse path).
  With `model_transaction_policy { decoupled: true }` and the parameter stream true every token is its own
  response (text delta and its id), the last one flagged final with the counts; stream false (the default, as in
  Triton's vLLM backend; what /generate needs) sends one response.
* `input_ids` (INT64 [batch, tokens]): `last_logits` FP32 [batch, vocab], the logits of each sequence's last
  position; the full `logits` [batch, tokens, vocab] only with the request parameter `full_logits: true`.

Errors: what the client got wrong (a missing or doubled input, an empty text, a bad parameter key, type or value,
token ids outside the vocabulary, a prompt longer than every profile or than the context with max_tokens, a batch
above max_batch) is answered with `TritonError.INVALID_ARG`, which the server returns as HTTP 400 (gRPC
INVALID_ARGUMENT) with the reason; any other failure with `TritonError.INTERNAL` (HTTP 500) and the exception's
type and message. A decoupled stream whose client went away (`is_cancelled()`) stops after the current token, so
the instance is free for the next request.

Tensors: numeric ones cross the backend boundary through DLPack (torch); BYTES tensors only through numpy, and the
backend stub shipped in nvidia-pytriton 0.7.0 is built against numpy 1.x: with numpy 2.x it misreads every numpy
array (int64 [1, 2, 3] arrived as [1, 1, 1]; a BYTES input crashes the stub). The model therefore refuses to load
under numpy >= 2; `engines.tritonserver` runs the backend in an environment with numpy 1.26.4 (`backend_env`).

The project (packages `proxyattn`, `plugins`, `export`, `engines`) must be importable by the backend's Python:
installed with pip, or named in PYTHONPATH (the stub's embedded interpreter runs isolated and ignores PYTHONPATH,
so this file adds its entries to sys.path).
"""

import json
import os
import sys

for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry and _entry not in sys.path:
        sys.path.append(_entry)

import numpy as np  # noqa: E402 - after the path entries
import triton_python_backend_utils as pb_utils  # noqa: E402 - provided by the Triton Python backend
import torch  # noqa: E402 - importable in the backend stub only once the PYTHONPATH entries above are on sys.path
from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: E402 - as torch

from engines import serving  # noqa: E402 - as torch
from engines.serving import RequestError  # noqa: E402 - as torch

TEXT, IDS = "text_input", "input_ids"


def error_response(message, code):
    """An InferenceResponse carrying only an error with Triton status `code`."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


def _tensor(name, value):
    """An output tensor: a str -> BYTES [1] (numpy), anything else -> a torch tensor through DLPack."""
    if isinstance(value, str):
        return pb_utils.Tensor(name, np.array([value.encode("utf-8")], dtype=np.object_))
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value.contiguous()))


def _response(**outputs):
    return pb_utils.InferenceResponse(output_tensors=[_tensor(k, v) for k, v in outputs.items()])


def _scalar(value, dtype=torch.int64):
    return torch.tensor([value], dtype=dtype)


class TritonPythonModel:
    def initialize(self, args):
        """Build the engine and tokenizer named by the config's parameters."""
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        self.name = config["name"]
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        engine = params.get("engine", "onnxruntime")
        if engine == "onnxruntime":
            self.engine = serving.OrtEngine.load(version_dir, params["profiles"], int(params["vocab_size"]))
        elif engine == "transformers":
            device = f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
            attrs = json.loads(params["proxyattn"]) if params.get("proxyattn") else None
            self.engine = serving.TorchEngine.load(
                params["weights"],
                attention=params.get("attention", "proxyattn"),
                device=device,
                dtype=params.get("dtype", "auto"),
                proxyattn_attrs=attrs,
                base_dir=version_dir,
            )
        else:
            raise ValueError(f"{self.name}: parameter engine={engine!r}; allowed: {', '.join(serving.ENGINES)}")
        self.tokenizer = None
        if params.get("tokenizer"):
            self.tokenizer = serving.load_tokenizer(os.path.join(version_dir, params["tokenizer"]))
        has_text = any(i["name"] == TEXT for i in config.get("input", []))
        if has_text and int(np.__version__.split(".")[0]) >= 2:
            raise RuntimeError(
                f"{self.name} has a text interface (BYTES tensors), which the Python backend stub of nvidia-pytriton 0.7.0 "
                f"misreads under numpy {np.__version__} (it is built against numpy 1.x); start tritonserver through "
                f"`python -m engines.tritonserver`, which runs the backend with numpy 1.26.4 (see docs/serving.md)"
            )
        model_config = getattr(getattr(self.engine, "model", None), "config", None)
        self.eos_ids = serving.eos_token_ids(self.tokenizer, model_config)
        self.max_batch = int(params.get("max_batch", "1"))
        self.default_max_tokens = int(params.get("default_max_tokens", "16"))
        self.all_outputs = {o["name"] for o in config.get("output", [])}

    # ------------------------------------------------------------------------------------------ requests
    def _parse(self, request):
        """(kind, payload, params) of a request: ("ids", tensor, params) or ("text", prompt token ids, params)."""
        text = pb_utils.get_input_tensor_by_name(request, TEXT)
        ids = pb_utils.get_input_tensor_by_name(request, IDS)
        if (text is None) == (ids is None):
            raise RequestError(
                f"give exactly one of {TEXT!r} (a text to continue) or {IDS!r} (token ids to score), got "
                f"{'both' if text is not None else 'neither'}"
            )
        params = serving.parse_parameters(
            request.parameters(), max_tokens_limit=self.engine.max_len, default_max_tokens=self.default_max_tokens
        )
        if ids is not None:
            return "ids", from_dlpack(ids.to_dlpack()), params
        values = text.as_numpy().reshape(-1)
        if values.size != 1:
            raise RequestError(f"{TEXT} must hold one text, got {values.size}")
        raw = values[0]
        try:
            prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as e:
            raise RequestError(f"{TEXT} is not valid UTF-8: {e}") from e
        if not prompt:
            raise RequestError(f"{TEXT} is empty; give a non-empty text")
        if self.tokenizer is None:
            raise RequestError(f"model {self.name!r} has no tokenizer: send token ids as {IDS!r}")
        tokens = self.tokenizer(prompt)["input_ids"]
        if not tokens:
            raise RequestError(f"{TEXT} {prompt[:40]!r} gives no tokens")
        return "text", tokens, params

    def _logits(self, request, ids, params):
        """last_logits (and logits when asked) of token ids [batch, tokens]."""
        requested = set(request.requested_output_names())
        if "logits" in requested and requested != self.all_outputs and not params.full_logits:
            raise RequestError(
                "output 'logits' (the full [batch, tokens, vocab] logits) is returned only with the request "
                "parameter full_logits: true; 'last_logits' holds the last position's"
            )
        if ids.dim() == 2 and ids.shape[0] > self.max_batch:
            raise RequestError(f"batch of {ids.shape[0]} sequences exceeds this model's max_batch {self.max_batch}")
        logits = self.engine.logits(ids)
        out = {"last_logits": logits[:, -1]}
        if params.full_logits:
            out["logits"] = logits
        return _response(**out)

    def _chunks(self, tokens, params, cancelled):
        """The chunks of a generation after prompt `tokens` (`engines.serving.generate`)."""
        return serving.generate(self.engine, self.tokenizer, tokens, params, self.eos_ids, cancelled)

    def _stats(self, prompt_tokens, completion_tokens, first_ms):
        out = {
            "prompt_tokens": _scalar(prompt_tokens),
            "completion_tokens": _scalar(completion_tokens),
            "first_token_ms": _scalar(first_ms, torch.float32),
        }
        if getattr(self.engine, "sparse_layers", None) is not None:
            out["sparse_layers"] = _scalar(self.engine.sparse_layers)
        return out

    def respond(self, request):
        """One response (non-decoupled): logits, the whole generation, or an error."""
        try:
            kind, payload, params = self._parse(request)
            if kind == "ids":
                return self._logits(request, payload, params)
            start = serving.now_ms()
            first, ids, text, reason = None, [], [], None
            cancelled = getattr(request, "is_cancelled", lambda: False)
            for chunk in self._chunks(payload, params, cancelled):
                first = first if first is not None else serving.now_ms() - start
                ids += [] if chunk.token is None else [chunk.token]
                text.append(chunk.text)
                reason = chunk.finish_reason
            return _response(
                text_output="".join(text),
                output_ids=torch.tensor(ids, dtype=torch.int64),
                finish_reason=reason,
                **self._stats(len(payload), len(ids), first),
            )
        except RequestError as e:
            return error_response(str(e), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the model down: report it to the client
            return error_response(f"inference failed: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)

    def stream(self, request):
        """Decoupled: one response per token (parameter stream true) or one in all, the last flagged final."""
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            kind, payload, params = self._parse(request)
            if kind == "ids":
                sender.send(self._logits(request, payload, params), flags=final)
                return
            if not params.stream:
                sender.send(self.respond(request), flags=final)
                return
            start, first, n = serving.now_ms(), None, 0
            for chunk in self._chunks(payload, params, sender.is_cancelled):
                first = first if first is not None else serving.now_ms() - start
                n += chunk.token is not None
                token_ids = [] if chunk.token is None else [chunk.token]
                out = {"text_output": chunk.text, "output_ids": torch.tensor(token_ids, dtype=torch.int64)}
                if chunk.finish_reason is None:
                    sender.send(_response(**out))
                    continue
                if chunk.finish_reason == "cancelled":
                    pb_utils.Logger.log_info(f"{self.name}: request cancelled by the client after {n} tokens; generation stopped")
                    sender.send(flags=final)
                    return
                out.update(finish_reason=chunk.finish_reason, **self._stats(len(payload), n, first))
                sender.send(_response(**out), flags=final)
        except RequestError as e:
            sender.send(error_response(str(e), pb_utils.TritonError.INVALID_ARG), flags=final)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the model down: report it to the client
            sender.send(error_response(f"inference failed: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL), flags=final)

    def execute(self, requests):
        """Non-decoupled: one response per request, in order. Decoupled: responses go through each request's sender."""
        try:
            if not self.decoupled:
                return [self.respond(request) for request in requests]
            for request in requests:
                self.stream(request)
            return None
        finally:
            self.engine.release()
