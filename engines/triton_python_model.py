"""Triton Python-backend model: prompt token ids in, logits out, on ONNX Runtime with the ProxyAttention op.

Copied as `1/model.py` into `<model>_onnxruntime/` by `engines.triton_repo.write_python_model`. The model
directory's `config.pbtxt` carries the parameters:

* `profiles`: JSON list of {name, min, opt, max, file}: one ONNX file per sequence-length profile; a request of
  S tokens is served by the first profile with min <= S <= max.
* `vocab_size`: token ids must lie in [0, vocab_size).

Each file is an ONNX Runtime optimized model written by `engines.ort_models.optimize_for_profile` (the ProxyAttn
custom op with its sparse semantics, or the dense local function for profiles that never leave the dense path);
`engines.ort_models.load_session` opens it.

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

for _entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    if _entry and _entry not in sys.path:
        sys.path.append(_entry)

import triton_python_backend_utils as pb_utils  # provided by the Triton Python backend
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack


class TritonPythonModel:
    def initialize(self, args):
        from engines.ort_models import load_session

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.vocab_size = int(params["vocab_size"])
        self.max_batch = int(config.get("max_batch_size", 0))
        version_dir = f"{args['model_repository']}/{args['model_version']}"
        self.profiles = []
        for p in json.loads(params["profiles"]):
            session = load_session(f"{version_dir}/{p['file']}", threads=1)
            names = [i.name for i in session.get_inputs()]
            self.profiles.append((int(p["min"]), int(p["max"]), p["name"], session, names))
        self.ranges = ", ".join(f"{p[2]}: {p[0]}..{p[1]}" for p in self.profiles)

    def _error(self, message):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))

    def _run(self, ids):
        if ids.dim() != 2:
            return None, f"input_ids must be [batch, tokens], got shape {list(ids.shape)}"
        b, s = ids.shape
        if b < 1 or s < 1:
            return None, f"input_ids must hold at least one token per sequence, got shape {list(ids.shape)}"
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            return None, f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]"
        for pmin, pmax, _, session, names in self.profiles:
            if pmin <= s <= pmax:
                break
        else:
            return None, f"sequence length {s} is outside every profile ({self.ranges})"
        feeds = {}
        ids_np = ids.contiguous().numpy()
        for name in names:
            if name == "input_ids":
                feeds[name] = ids_np
            elif name == "attention_mask":
                feeds[name] = torch.ones(b, s, dtype=torch.int64).numpy()
            elif name == "position_ids":
                feeds[name] = torch.arange(s, dtype=torch.int64).expand(b, s).contiguous().numpy()
            else:
                return None, f"the ONNX model asks for an input {name!r} this server does not know how to fill"
        logits = session.run(None, feeds)[0]
        return torch.from_numpy(logits).to(torch.float32).contiguous(), None

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = from_dlpack(pb_utils.get_input_tensor_by_name(request, "input_ids").to_dlpack())
                logits, problem = self._run(ids.to(torch.int64))
            except Exception as e:  # one bad request must not take the model down: report it to the client
                logits, problem = None, f"inference failed: {type(e).__name__}: {e}"
            if problem is not None:
                responses.append(self._error(problem))
            else:
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor.from_dlpack("logits", to_dlpack(logits))]))
        return responses
