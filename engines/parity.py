"""What the build's parity stage compares, with its memory bounded for any vocabulary.

Full-vocabulary fp32 logits at a sparse-path length do not fit in memory for a large vocabulary (gemma3-270m:
8448 tokens x 262144 vocab = 8.9 GB per copy). So both sides expose the LM head's input, the final hidden states
`[batch, sequence, hidden]` (after the final norm), and run the LM head only on the positions `logits_from:`
(0: every position, -1: the last one):

* `add_parity_outputs(proto)`: the exported ONNX graph with an extra output `hidden_states` (the input of the LM
  head MatMul) and an extra input `logits_from` (int64 `[1]`) feeding a `Slice` on the sequence axis in front of
  the LM head; `parity_session(path)` runs that graph in ONNX Runtime with the ProxyAttn custom op (sparse), like
  `plugins.onnxruntime.make_session(path, sparse=True)`. The exported file is not changed.
* `reference(model, ids, config, logits_from)`: the PyTorch side (`engines.density.measure_density`, i.e. the
  `proxyattn_ref` attention) with a forward pre-hook on the LM head that records its input and slices it the same
  way.
* `compare(actual, expected)`: relative Frobenius error, max abs error and finiteness, accumulated in float64 over
  chunks of rows, so a comparison holds no more than the two tensors plus `_CHUNK_ELEMENTS` float64 temporaries.
* `PeakRSS`: the peak resident memory of this process over a stretch of code (Linux `VmHWM`, reset through
  `/proc/self/clear_refs`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

__all__ = ["HIDDEN_OUTPUT", "LOGITS_FROM_INPUT", "find_lm_head", "add_parity_outputs", "parity_session", "reference", "compare", "PeakRSS"]

HIDDEN_OUTPUT = "hidden_states"
LOGITS_FROM_INPUT = "logits_from"
_INT64_MAX = 2**63 - 1
# Ops allowed between the LM head MatMul and the `logits` output: position-wise, one input from the graph input
# (e.g. Gemma's final-logit soft-capping Div / Tanh / Mul, casts).
_TAIL_OPS = frozenset({"Cast", "CastLike", "Identity", "Div", "Mul", "Add", "Sub", "Tanh", "Neg"})
# float64 elements per comparison chunk (32 MiB per temporary).
_CHUNK_ELEMENTS = 4 * 1024**2


def _dynamic_tensors(graph: onnx.GraphProto) -> set[str]:
    """Names of the tensors that depend on a graph input (nodes are in topological order in a valid model)."""
    inits = {i.name for i in graph.initializer}
    dynamic = {i.name for i in graph.input if i.name not in inits}
    for node in graph.node:
        if any(i in dynamic for i in node.input):
            dynamic.update(o for o in node.output if o)
    return dynamic


def find_lm_head(graph: onnx.GraphProto, logits: str = "logits") -> onnx.NodeProto:
    """The MatMul whose output reaches `logits` through position-wise ops only and whose second operand is a constant
    (the LM head weight, possibly transposed); its first input is the final hidden states. ValueError otherwise."""
    producer = {o: n for n in graph.node for o in n.output}
    dynamic = _dynamic_tensors(graph)
    name, path = logits, []
    while True:
        node = producer.get(name)
        if node is None:
            raise ValueError(f"no LM head found: {name!r} is not produced by a node (walked back {path})")
        dyn = [i for i in node.input if i in dynamic]
        path.append(node.op_type)
        if node.op_type == "MatMul" and len(dyn) == 1 and node.input[0] == dyn[0]:
            return node
        if node.op_type in _TAIL_OPS and len(dyn) == 1:
            name = dyn[0]
            continue
        raise ValueError(
            f"no LM head found: walking back from {logits!r} through {path} met {node.op_type} "
            f"{node.name!r} with {len(dyn)} input(s) from the graph input"
        )


def add_parity_outputs(proto: onnx.ModelProto, logits: str = "logits") -> onnx.ModelProto:
    """In place: output `hidden_states` (the LM head's input) and input `logits_from` (the head runs on positions
    `logits_from:` of the sequence axis; the `logits` output's sequence axis becomes `logits_positions`)."""
    graph = proto.graph
    taken = {i.name for i in graph.input} | {o.name for o in graph.output} | {o for n in graph.node for o in n.output}
    for name in (HIDDEN_OUTPUT, LOGITS_FROM_INPUT):
        if name in taken:
            raise ValueError(f"the model already has a tensor named {name!r}")
    head = find_lm_head(graph, logits)
    hidden = head.input[0]
    out = next(o for o in graph.output if o.name == logits)
    elem = out.type.tensor_type.elem_type
    ends, axes, selected = "parity/ends", "parity/axes", "parity/hidden_selected"
    nodes = [
        helper.make_node(
            "Constant", [], [ends], value=helper.make_tensor(ends, TensorProto.INT64, [1], [_INT64_MAX]), name="parity/ends_const"
        ),
        helper.make_node("Constant", [], [axes], value=helper.make_tensor(axes, TensorProto.INT64, [1], [1]), name="parity/axes_const"),
        helper.make_node("Slice", [hidden, LOGITS_FROM_INPUT, ends, axes], [selected], name="parity/select_positions"),
        helper.make_node("Identity", [hidden], [HIDDEN_OUTPUT], name="parity/hidden_states"),
    ]
    index = list(graph.node).index(head)
    for k, node in enumerate(nodes):
        graph.node.insert(index + k, node)
    head.input[0] = selected
    graph.input.append(helper.make_tensor_value_info(LOGITS_FROM_INPUT, TensorProto.INT64, [1]))
    dims = out.type.tensor_type.shape.dim
    batch = dims[0].dim_param or dims[0].dim_value if len(dims) == 3 else None
    seq = dims[1].dim_param or dims[1].dim_value if len(dims) == 3 else None
    graph.output.append(helper.make_tensor_value_info(HIDDEN_OUTPUT, elem, [batch, seq, None] if len(dims) == 3 else None))
    if len(dims) == 3:
        dims[1].Clear()
        dims[1].dim_param = "logits_positions"
    return proto


def parity_session(src, *, providers=None):
    """An ONNX Runtime session over `src` with `add_parity_outputs`, the ProxyAttention nodes on the sparse custom op
    (`plugins.onnxruntime.to_custom_op_model`, as `make_session(sparse=True)` runs them).

    The copy is written beside `src` (hidden temporary names, removed once the session exists): its weights that were
    inside `src` go to one external data file and those already external are referenced where they are, so neither
    Python nor the disk holds a second copy of a weight file, and ONNX Runtime's external-data path check (data
    inside the model's directory) passes, which the symlinks of `make_session` do not."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    from plugins.onnxruntime import register_op, to_custom_op_model

    src = Path(src)
    tag = f".{src.stem}.parity.{os.getpid()}"
    model_file, data_file = src.parent / f"{tag}.onnx", src.parent / f"{tag}.onnx.data"
    try:
        proto = onnx.load(str(src), load_external_data=False)
        add_parity_outputs(proto)
        # Moves the inline weights to data_file and drops them from `proto`, so the copy below is small.
        onnx.save(
            proto, str(model_file), save_as_external_data=True, all_tensors_to_one_file=True, location=data_file.name, size_threshold=1024
        )
        onnx.save(to_custom_op_model(proto), str(model_file))
        del proto
        register_op()
        so = ort.SessionOptions()
        so.register_custom_ops_library(get_library_path())
        return ort.InferenceSession(str(model_file), sess_options=so, providers=providers or ["CPUExecutionProvider"])
    finally:
        for f in (model_file, data_file):
            f.unlink(missing_ok=True)


def reference(model, ids: torch.Tensor, config, logits_from: int):
    """(hidden `[B, S, H]`, logits `[B, S - ...]` of positions `logits_from:`, densities) of the PyTorch reference."""
    from .density import measure_density

    head = model.get_output_embeddings()
    seen: list[torch.Tensor] = []

    def pre_hook(module, args):
        (x,) = args
        seen.append(x.detach())
        return (x[:, logits_from:],)

    handle = head.register_forward_pre_hook(pre_hook)
    try:
        logits, densities = measure_density(model, ids, config)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"the LM head ran {len(seen)} times in one forward pass (expected once)")
    return seen[0].float(), logits, densities


def compare(actual, expected) -> dict:
    """{"rel_error": ||a - e|| / ||e||, "max_abs_error", "finite"} of two same-shape tensors (numpy or torch),
    in float64 over chunks of rows; non-finite values anywhere make `finite` False (and the errors NaN/inf)."""
    a = torch.as_tensor(np.asarray(actual)) if not isinstance(actual, torch.Tensor) else actual
    e = torch.as_tensor(np.asarray(expected)) if not isinstance(expected, torch.Tensor) else expected
    if tuple(a.shape) != tuple(e.shape):
        raise ValueError(f"shape {tuple(a.shape)} != reference shape {tuple(e.shape)}")
    width = a.shape[-1] if a.dim() else 1
    a, e = a.reshape(-1, width), e.reshape(-1, width)
    step = max(1, _CHUNK_ELEMENTS // max(1, width))
    num = den = 0.0
    max_abs = 0.0
    finite = True
    for i in range(0, a.shape[0], step):
        ac, ec = a[i : i + step].double(), e[i : i + step].double()
        finite = finite and bool(torch.isfinite(ac).all()) and bool(torch.isfinite(ec).all())
        d = ac - ec
        num += float((d * d).sum())
        den += float((ec * ec).sum())
        m = float(d.abs().max()) if d.numel() else 0.0
        max_abs = m if (math.isnan(m) or m > max_abs) else max_abs
    rel = math.sqrt(num) / max(math.sqrt(den), 1e-12) if not math.isnan(num + den) else float("nan")
    if not finite and not math.isnan(rel):
        rel = float("nan")
    return {"rel_error": rel, "max_abs_error": max_abs, "finite": finite}


class PeakRSS:
    """`with PeakRSS() as p: ...` then `p.bytes`: the peak resident memory of this process inside the block (Linux:
    VmHWM after resetting it; elsewhere the process's lifetime peak from getrusage, `p.scope == "process"`)."""

    def __enter__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.scope = "block"
        except OSError:
            self.scope = "process"
        self.bytes = None
        return self

    def __exit__(self, *exc):
        try:
            m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
            self.bytes = int(m.group(1)) * 1024 if m else None
        except OSError:
            self.bytes = None
        if self.bytes is None:
            import resource

            self.bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.scope = "process"
        return False
