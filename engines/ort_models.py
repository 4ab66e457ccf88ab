"""The embedded default backend: ONNX Runtime, one optimized model per sequence-length profile.

`optimize_for_profile` writes the model ONNX Runtime itself optimized (graph optimization level EXTENDED, saved
through `SessionOptions.optimized_model_filepath`) for one profile:

* a profile whose longest sequence is at most `dense_below_tokens` only ever takes ProxyAttn's dense path, so it is
  optimized from the plain file: every `proxy::ProxyAttention` node runs its model-local function (dense causal
  attention, sliding windows honoured), which ONNX Runtime fuses like any other subgraph;
* any other profile is optimized from the custom-op form (`plugins.onnxruntime.make_session(sparse=True)`):
  the nodes run ProxyAttn's sparse algorithm (`ai.onnx.contrib::ProxyAttention`).

`load_session` opens such a file again (registering the custom-op library when the file uses it). Optimized files
are specific to the ONNX Runtime version that wrote them (recorded in the manifest).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from export.staging import move_into_place

from .models import Profile

__all__ = ["profile_is_dense", "optimize_for_profile", "load_session", "uses_custom_op"]

_CONTRIB = "ai.onnx.contrib"


def profile_is_dense(profile: Profile, dense_below_tokens: int) -> bool:
    """True when every length of the profile takes ProxyAttn's dense path (S <= dense_below_tokens)."""
    return profile.max <= dense_below_tokens


def optimize_for_profile(model_path: str | os.PathLike, out_path: str | os.PathLike, *, dense: bool) -> Path:
    """Write ONNX Runtime's optimized model for one profile to `out_path` (atomically); returns the path.

    With external data in the source, the optimized weights go to `<out name>.data` beside it.
    """
    import onnxruntime as ort
    from plugins.onnxruntime import make_session

    src, out = Path(model_path), Path(out_path)
    has_external = any(
        init.data_location == onnx.TensorProto.EXTERNAL for init in onnx.load(str(src), load_external_data=False).graph.initializer
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(tmp / out.name)
        if has_external:
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", out.name + ".data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        session = make_session(src, sparse=not dense, session_options=so)
        del session
        move_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def uses_custom_op(path: str | os.PathLike) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(n.domain == _CONTRIB for n in model.graph.node)


def load_session(path: str | os.PathLike, *, threads: int | None = None):
    """An InferenceSession over an optimized model written by `optimize_for_profile`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads is not None:
        so.intra_op_num_threads = threads
    if uses_custom_op(path):
        from onnxruntime_extensions import get_library_path
        from plugins.onnxruntime import register_op

        register_op()
        so.register_custom_ops_library(get_library_path())
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
