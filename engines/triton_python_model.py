"""Triton Python-backend model: prompt token ids in, logits out, on ONNX Runtime with the ProxyAttention op.

Copied as `1/model.py` into `<model>_onnxruntime/` by `engines.triton_repo.write_python_model`. The model
directory's `config.pbtxt` carries the parameters:

* `profiles`: JSON list of {name, min, opt, max, file}: one ONNX file per sequence-length profile; a request of
  S tokens is served by the first profile with min <= S <= max.
* `vocab_size`: token ids must lie in [0, vocab_size).

Each file is an ONNX Runtime optimized model written by `engines.ort_models.optimize_for_profile` (the ProxyAttn
custom op with its sparse semantics, or the dense local function for profiles that never leave the dense path);
`engines.ort_models.load_session` opens it.

Errors: a request this model cannot serve because of what the client sent (wrong dtype or rank, no tokens, a token
id outside the vocabulary, a length outside every profile) is answered with `TritonError.INVALID_ARG`, which the
server returns as HTTP 400 (gRPC INVALID_ARGUMENT) with the reason; any other failure (an exception in ONNX
Runtime) is answered with `TritonError.INTERNAL`, HTTP 500, with the exception's type and message. Triton's core
already refuses a wrong datatype, a wrong rank and a batch above max_batch_size with HTTP 400 before the model sees
the request; the model checks them again so that it never depends on the config it was deployed with.

The project (packages `proxyattn`, `plugins`, `export`, `engines`) must be importable by the backend's Python:
installed with pip, or named in PYTHONPATH (the backend stub's embedded interpreter ignores PYTHONPATH itself, so
this file adds its entries to sys.path).

Tensors cross the backend boundary through DLPack (torch), not numpy: the backend stub shipped in
nvidia-pytriton 0.7.0 is built against numpy 1.x and misreads numpy 2.x arrays (checked: int64 [1, 2, 3]
arrived as [1, 1, 1] and outputs came back empty).
"""

import json
import os
import sys
from collections import namedtuple

for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry and _entry not in sys.path:
        sys.path.append(_entry)

import triton_python_backend_utils as pb_utils  # noqa: E402 - provided by the Triton Python backend, after the path entries
import torch  # noqa: E402 - importable in the backend stub only once the PYTHONPATH entries above are on sys.path
from torch.utils.dlpack import from_dlpack, to_dlpack  # noqa: E402 - as torch

INPUT, OUTPUT = "input_ids", "logits"

# One sequence-length profile: served lengths [min_len, max_len], its ONNX Runtime session and input names.
ServedProfile = namedtuple("ServedProfile", "min_len max_len name session input_names")


class RequestError(ValueError):
    """The client's request is malformed; answered with INVALID_ARG (HTTP 400) and this message."""


def check_ids(ids, vocab_size, profiles):
    """The profile serving `ids` ([batch, tokens] int64 torch tensor); RequestError naming the bad value."""
    if ids.dtype != torch.int64:
        raise RequestError(f"{INPUT} must be INT64, got {ids.dtype}")
    if ids.dim() != 2:
        raise RequestError(f"{INPUT} must be [batch, tokens] (rank 2), got shape {list(ids.shape)}")
    b, s = ids.shape
    if b < 1 or s < 1:
        raise RequestError(f"{INPUT} must hold at least one sequence of at least one token, got shape {list(ids.shape)}")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise RequestError(f"token ids must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")
    for profile in profiles:
        if profile.min_len <= s <= profile.max_len:
            return profile
    ranges = ", ".join(f"{p.name}: {p.min_len}..{p.max_len}" for p in profiles)
    raise RequestError(f"sequence length {s} is outside every profile ({ranges})")


def onnx_feeds(ids, input_names):
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


def error_response(message, code):
    """An InferenceResponse carrying only an error with Triton status `code`."""
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))


class TritonPythonModel:
    def initialize(self, args):
        """Open one ONNX Runtime session per profile listed in the config's `profiles` parameter."""
        from engines.ort_models import load_session

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.vocab_size = int(params["vocab_size"])
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.profiles = []
        for p in json.loads(params["profiles"]):
            session = load_session(f"{version_dir}/{p['file']}", threads=1)
            names = [i.name for i in session.get_inputs()]
            self.profiles.append(ServedProfile(int(p["min"]), int(p["max"]), p["name"], session, names))

    def infer(self, ids):
        """Logits [batch, tokens, vocab] float32 for `ids`; RequestError for a malformed request."""
        profile = check_ids(ids, self.vocab_size, self.profiles)
        logits = profile.session.run(None, onnx_feeds(ids, profile.input_names))[0]
        return torch.from_numpy(logits).to(torch.float32).contiguous()

    def respond(self, request):
        """The response to one request: logits, or an error (INVALID_ARG for the client's fault, else INTERNAL)."""
        tensor = pb_utils.get_input_tensor_by_name(request, INPUT)
        if tensor is None:
            return error_response(f"the request has no input {INPUT!r}", pb_utils.TritonError.INVALID_ARG)
        try:
            ids = from_dlpack(tensor.to_dlpack())
            logits = self.infer(ids)
        except RequestError as e:
            return error_response(str(e), pb_utils.TritonError.INVALID_ARG)
        except Exception as e:  # noqa: BLE001 - one failing request must not take the model down: report it to the client
            return error_response(f"inference failed: {type(e).__name__}: {e}", pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack(OUTPUT, to_dlpack(logits))])

    def execute(self, requests):
        """One response per request, in order."""
        return [self.respond(request) for request in requests]
