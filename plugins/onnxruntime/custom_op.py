"""ONNX Runtime custom op for `proxy::ProxyAttention` running the real ProxyAttn algorithm on the CPU.

Design: one file runs both ways.
* `make_session(path, sparse=False)`: plain ONNX Runtime; each node is inlined as the model-local function
  (dense causal attention, sliding window honoured).
* `make_session(path, sparse=True)`: onnxruntime-extensions Python ops can only live in domain `ai.onnx.contrib`,
  so the session loads a copy of the graph (made in memory and a temporary directory, the file on disk is never
  changed) in which every `proxy::ProxyAttention` node is moved to `ai.onnx.contrib::ProxyAttention` between
  Casts to float32 and back; that op runs `export.contract.reference_semantics` (ProxyAttn's fp32 reference:
  proxy scores, per-head budgets, block selection, block-sparse attention; dense below `dense_below_tokens`;
  exact sliding-window attention for `sliding_window > 0`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from export import contract
from proxyattn.config import ProxyAttnConfig

__all__ = ["CONTRIB_DOMAIN", "make_session", "to_custom_op_model", "register_op"]

CONTRIB_DOMAIN = "ai.onnx.contrib"

_registered: dict[str, object] = {}


def _attr_types() -> dict[str, int]:
    from onnxruntime_extensions import PyCustomOpDef

    types: dict[str, int] = {}
    for key, value in ProxyAttnConfig().to_attrs().items():
        types[key] = PyCustomOpDef.dt_float if isinstance(value, float) else PyCustomOpDef.dt_int64
    for key in contract.EXTRA_FLOAT_ATTRS:
        types[key] = PyCustomOpDef.dt_float
    for key in contract.EXTRA_INT_ATTRS:
        types[key] = PyCustomOpDef.dt_int64
    for key in contract.STRING_ATTRS:
        types[key] = PyCustomOpDef.dt_string
    return types


def _compute(query: np.ndarray, key: np.ndarray, value: np.ndarray, **attrs) -> np.ndarray:
    config, scale, window = contract.decode_attrs(attrs)
    out = contract.reference_semantics(
        torch.from_numpy(np.ascontiguousarray(query)),
        torch.from_numpy(np.ascontiguousarray(key)),
        torch.from_numpy(np.ascontiguousarray(value)),
        config=config,
        scale=scale,
        sliding_window=window,
    )
    return out.numpy()


def register_op() -> None:
    """Register `ai.onnx.contrib::ProxyAttention` (float32) with onnxruntime-extensions (once per process)."""
    if "op" in _registered:
        return
    try:
        from onnxruntime_extensions import PyCustomOpDef, onnx_op
    except ImportError as exc:  # pragma: no cover - the package is pinned in requirements.txt
        raise ImportError("the sparse ONNX Runtime session needs onnxruntime-extensions==0.15.2 (pip install)") from exc

    f32 = PyCustomOpDef.dt_float
    _registered["op"] = onnx_op(op_type=contract.OP_TYPE, inputs=[f32, f32, f32], outputs=[f32], attrs=_attr_types())(_compute)


def to_custom_op_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose ProxyAttention nodes run the custom op (domain `ai.onnx.contrib`, float32 I/O)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    changed = 0
    known = set(_attr_types())
    for node in out.graph.node:
        if node.op_type != contract.OP_TYPE or node.domain != contract.DOMAIN:
            nodes.append(node)
            continue
        unknown = [a.name for a in node.attribute if a.name not in known]
        if unknown:
            raise ValueError(f"node {node.name!r} carries attributes {unknown} this custom op does not know; known: {sorted(known)}")
        tag = f"{node.name or 'proxy_attention'}_{changed}"
        casts = [f"{tag}/{name}_f32" for name in contract.INPUT_NAMES]
        for src, dst in zip(node.input, casts):
            nodes.append(helper.make_node("Cast", [src], [dst], to=TensorProto.FLOAT, name=f"{dst}_cast"))
        custom_out = f"{tag}/out_f32"
        custom = helper.make_node(contract.OP_TYPE, casts, [custom_out], domain=CONTRIB_DOMAIN, name=f"{tag}/custom")
        custom.attribute.extend(node.attribute)
        nodes.append(custom)
        nodes.append(helper.make_node("CastLike", [custom_out, node.input[0]], [node.output[0]], name=f"{tag}/cast_back"))
        changed += 1
    if not changed:
        raise ValueError(f"model has no {contract.DOMAIN}::{contract.OP_TYPE} node to run with the custom op")
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if not any(o.domain == CONTRIB_DOMAIN for o in out.opset_import):
        out.opset_import.append(helper.make_opsetid(CONTRIB_DOMAIN, 1))
    return out


def _external_locations(model: onnx.ModelProto) -> set[str]:
    locs = set()
    for init in model.graph.initializer:
        if init.data_location == TensorProto.EXTERNAL:
            for entry in init.external_data:
                if entry.key == "location":
                    locs.add(entry.value)
    return locs


def make_session(model_path, *, sparse: bool = True, providers=None, session_options=None):
    """An `onnxruntime.InferenceSession` over an exported model.

    Args:
        model_path: the `.onnx` file (external data beside it is read in place).
        sparse: True runs ProxyAttention nodes with the ProxyAttn custom op; False with the local function (dense).
        providers: ONNX Runtime providers (default CPU). The custom op itself runs on the CPU.
        session_options: optional `onnxruntime.SessionOptions` (the custom-op library is added to it).
    Returns:
        `onnxruntime.InferenceSession`.
    """
    import onnxruntime as ort

    path = Path(model_path)
    if not path.is_file():
        raise ValueError(f"model_path={str(path)!r} is not a file")
    if not isinstance(sparse, bool):
        raise ValueError(f"sparse={sparse!r} must be True or False")
    providers = providers or ["CPUExecutionProvider"]
    if not sparse:
        return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    rewritten = to_custom_op_model(model)
    register_op()
    from onnxruntime_extensions import get_library_path

    so = session_options or ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    tmp = Path(tempfile.mkdtemp(prefix="proxyattn_ort_"))
    try:
        for loc in _external_locations(model):
            target = (path.parent / loc).resolve()
            link = tmp / loc
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, link)
        tmp_model = tmp / path.name
        onnx.save(rewritten, str(tmp_model))
        return ort.InferenceSession(str(tmp_model), sess_options=so, providers=providers)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
