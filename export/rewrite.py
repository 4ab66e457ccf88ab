"""Rewrite stock ONNX exports of transformers models into `proxy::ProxyAttention` nodes (onnx-graphsurgeon).

    from export.rewrite import rewrite_model
    rewrite_model("stock.onnx", "proxy.onnx", config=ProxyAttnConfig(), num_layers=32)

Two passes, each returning how many attention blocks it replaced:

* `replace_attention_op`: the opset-23 `Attention` op (torch's sdpa at opset 23): inputs Q, K, V `[B, H, S, D]` and
  an optional mask, attributes `scale`, `softcap` 0, no past K/V.
* `replace_matmul_softmax`: the dynamo exporter's opset-18 chain `MatMul(Q*a, K^T*b) [*c | /c] [+ mask | Where]
  -> Softmax(-1) [-> Where(IsNaN)] -> MatMul(., V)`; the softmax scale is the product of the constant factors.

Both walk back through transformers' GQA expand (`Reshape(Expand(Unsqueeze(x, 2)))`) to read the un-expanded K/V;
where that pattern is absent the node gets the expanded K/V (Hkv = Hq), which is still the same attention.

The stock graph's mask is assumed to be the model's causal mask (decoder-only LM, unpadded prompts): the mask
subgraph is dropped with the replaced nodes. Sliding windows cannot be read from a mask reliably, so they are
given: `layer_windows[i]` (0 or None = full causal) for the i-th matched attention in graph order; `rewrite_model`
derives them from a transformers config when given one. The caller (`rewrite_model`) checks that the number of
replaced nodes equals the number of attention layers and otherwise raises, naming every Softmax / Attention node
that did not match and why. Then cleanup, toposort, the local function, the checker, and an atomic write.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from proxyattn.config import ProxyAttnConfig

from . import contract, local_function
from .staging import move_into_place

__all__ = ["replace_attention_op", "replace_matmul_softmax", "rewrite_model", "layer_windows_from_config"]


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError as exc:  # pragma: no cover - pinned in requirements.txt
        raise ImportError("export.rewrite needs onnx-graphsurgeon==0.6.1 (pip install)") from exc
    return gs


def _producer(tensor):
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def _const(tensor) -> np.ndarray | None:
    gs = _gs()
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    node = _producer(tensor)
    if node is not None and node.op == "Constant" and "value" in node.attrs:
        return np.asarray(node.attrs["value"].values)
    return None


def _scalar(tensor) -> float | None:
    value = _const(tensor)
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def _strip_scale(tensor):
    """Walk back through Mul/Div by scalar constants: (tensor before them, product of the factors)."""
    factor = 1.0
    while True:
        node = _producer(tensor)
        if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
            return tensor, factor
        a, b = node.inputs
        cb = _scalar(b)
        ca = _scalar(a) if node.op == "Mul" else None
        if cb is not None:
            factor *= cb if node.op == "Mul" else 1.0 / cb
            tensor = a
        elif ca is not None:
            factor *= ca
            tensor = b
        else:
            return tensor, factor


def _unexpand(tensor):
    """K/V before transformers' repeat_kv (`Reshape(Expand(Unsqueeze(x, axes=[2])))`), or the tensor itself."""
    reshape = _producer(tensor)
    if reshape is None or reshape.op != "Reshape":
        return tensor
    expand = _producer(reshape.inputs[0])
    if expand is None or expand.op != "Expand":
        return tensor
    unsq = _producer(expand.inputs[0])
    if unsq is None or unsq.op != "Unsqueeze":
        return tensor
    axes = _const(unsq.inputs[1]) if len(unsq.inputs) > 1 else np.asarray(unsq.attrs.get("axes", []))
    if axes is None or axes.reshape(-1).tolist() != [2]:
        return tensor
    return unsq.inputs[0]


def _key_from_transposed(tensor):
    """K `[B, H, S, D]` behind K^T: a walk back through Reshape/Transpose (at least one Transpose)."""
    seen_transpose = False
    while True:
        node = _producer(tensor)
        if node is None or node.op not in ("Reshape", "Transpose"):
            break
        if seen_transpose and _unexpand(tensor) is not tensor:
            break  # the output of repeat_kv: stop before walking into the expand itself
        seen_transpose |= node.op == "Transpose"
        tensor = node.inputs[0]
    return tensor if seen_transpose else None


def _window(layer_windows: Sequence[int | None] | None, index: int) -> int:
    if layer_windows is None:
        return 0
    if index >= len(layer_windows):
        raise ValueError(f"layer_windows has {len(layer_windows)} entries but attention #{index} was matched")
    w = layer_windows[index]
    return 0 if w is None else int(w)


def _replace_with_proxy(gs, graph, old, q, k, v, *, config, scale, layer_windows, index):
    """Append ProxyAttention #index over q and K/V before repeat_kv; it takes over `old`'s first output, which `old`
    (the matched Attention node or the chain's last MatMul) gives up, so that cleanup() drops what only fed it."""
    out = old.outputs[0]
    old.outputs = []
    k, v = _unexpand(k), _unexpand(v)
    attrs = contract.encode_attrs(config, scale=float(np.float32(scale)), sliding_window=_window(layer_windows, index))
    node = gs.Node(
        op=contract.OP_TYPE, name=f"proxy_attention_{index}", attrs=attrs, inputs=[q, k, v], outputs=[out], domain=contract.DOMAIN
    )
    graph.nodes.append(node)
    return node


def replace_attention_op(graph, *, config: ProxyAttnConfig, layer_windows=None, unmatched: list | None = None, start_index: int = 0) -> int:
    """Replace opset-23 `Attention` nodes; returns how many. Non-matching ones go to `unmatched` as (name, reason)."""
    gs = _gs()
    count = 0
    for node in [n for n in graph.nodes if n.op == "Attention"]:
        reason = None
        q, k, v = (node.inputs + [None, None, None])[:3]
        if q is None or k is None or v is None:
            reason = "needs Q, K and V inputs"
        elif len(node.inputs) > 4 and any(t.name for t in node.inputs[4:]):
            reason = "has past K/V inputs (a decode graph, not a prefill)"
        elif len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:]):
            reason = "its present K/V or QK outputs are used"
        elif float(node.attrs.get("softcap", 0.0)) != 0.0:
            reason = f"softcap={node.attrs['softcap']} is not part of the contract"
        elif q.shape is not None and len(q.shape) != 4:
            reason = f"Q has rank {len(q.shape)}; only 4-D [B, H, S, D] is supported"
        scale = node.attrs.get("scale")
        if reason is None and scale is None:
            d = q.shape[-1] if q.shape is not None else None
            if not isinstance(d, (int, np.integer)):
                reason = "no scale attribute and a dynamic head dim"
            else:
                scale = 1.0 / math.sqrt(int(d))
        if reason is not None:
            if unmatched is not None:
                unmatched.append((node.name or "<unnamed Attention>", reason))
            continue
        _replace_with_proxy(gs, graph, node, q, k, v, config=config, scale=scale, layer_windows=layer_windows, index=start_index + count)
        count += 1
    return count


def replace_matmul_softmax(
    graph, *, config: ProxyAttnConfig, layer_windows=None, unmatched: list | None = None, start_index: int = 0
) -> int:
    """Replace the MatMul -> scale -> mask -> Softmax -> MatMul chain; returns how many."""
    gs = _gs()
    count = 0
    softmaxes = [n for n in graph.nodes if n.op == "Softmax"]
    for sm in softmaxes:
        name = sm.name or "<unnamed Softmax>"

        def miss(reason: str) -> None:
            if unmatched is not None:
                unmatched.append((name, reason))

        if int(sm.attrs.get("axis", -1)) not in (-1, 3):
            miss(f"axis={sm.attrs.get('axis')} (attention softmax runs over the last axis)")
            continue
        # forward: the probabilities, maybe through Where(IsNaN(p), 0, p), into MatMul(p, V)
        p = sm.outputs[0]
        pv = None
        for _ in range(2):
            consumers = list(p.outputs)
            mm = [c for c in consumers if c.op == "MatMul" and c.inputs[0] is p]
            if len(mm) == 1 and len(consumers) == 1:
                pv = mm[0]
                break
            where = [c for c in consumers if c.op == "Where" and len(c.inputs) == 3 and c.inputs[2] is p]
            isnan = [c for c in consumers if c.op == "IsNaN"]
            if len(where) == 1 and len(isnan) == 1 and len(consumers) == 2:
                p = where[0].outputs[0]
                continue
            break
        if pv is None:
            miss("its output does not feed a single MatMul(P, V)")
            continue
        # backward: mask, post-scale, then the scores MatMul
        x = sm.inputs[0]
        node = _producer(x)
        if node is not None and node.op == "Add":
            a, b = node.inputs
            pa = _producer(a)
            x = a if pa is not None and pa.op in ("MatMul", "Mul", "Div") else b
        elif node is not None and node.op == "Where":
            x = node.inputs[1]
        x, post = _strip_scale(x)
        qk = _producer(x)
        if qk is None or qk.op != "MatMul":
            miss("its input is not MatMul(Q, K^T) behind an optional scale and mask")
            continue
        q, sq = _strip_scale(qk.inputs[0])
        kt, sk = _strip_scale(qk.inputs[1])
        k = _key_from_transposed(kt)
        if k is None:
            miss("the MatMul's second input is not K transposed (Reshape/Transpose chain)")
            continue
        scale = post * sq * sk
        if not (math.isfinite(scale) and scale > 0):
            miss(f"softmax scale {scale} is not a positive constant")
            continue
        v = pv.inputs[1]
        _replace_with_proxy(gs, graph, pv, q, k, v, config=config, scale=scale, layer_windows=layer_windows, index=start_index + count)
        count += 1
    return count


def layer_windows_from_config(hf_config) -> list[int]:
    """Per-layer sliding windows (0 = full) of a transformers config (Gemma 3 `layer_types`, Mistral, Qwen2)."""
    cfg = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    n = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None) or 0
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return [int(window) if t == "sliding_attention" else 0 for t in types]
    if getattr(cfg, "use_sliding_window", True) is False:
        return [0] * n
    return [int(window)] * n


def rewrite_model(in_path, out_path, *, config: ProxyAttnConfig, num_layers: int | None = None, layer_windows=None, hf_config=None) -> Path:
    """Rewrite a stock export's attention into ProxyAttention nodes and write the result atomically.

    Args:
        in_path: the stock `.onnx` (read fully, external data included).
        out_path: where to write (weights stay embedded below 2 GB, external data `<name>.data` above).
        config: the ProxyAttnConfig the nodes carry.
        num_layers: attention layers expected (default: from `hf_config`); a different count raises.
        layer_windows: sliding window per matched attention (0 = full); default from `hf_config`, else all full.
        hf_config: optional transformers config giving num_layers and layer_windows.
    """
    gs = _gs()
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig, got {type(config).__name__}")
    contract.encode_attrs(config, scale=1.0)
    if hf_config is not None:
        if num_layers is None:
            num_layers = (hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config).num_hidden_layers
        if layer_windows is None:
            layer_windows = layer_windows_from_config(hf_config)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r} must be a positive int (or give hf_config)")
    in_path, out_path = Path(in_path), Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"out_path={str(out_path)!r} must end in .onnx")
    try:
        model = onnx.load(str(in_path))
    except Exception as exc:
        raise ValueError(f"{in_path} is not a readable ONNX model: {exc}") from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ValueError(f"{in_path} is not a valid ONNX model: {exc}") from exc
    graph = gs.import_onnx(model)
    unmatched: list[tuple[str, str]] = []
    n_attn = replace_attention_op(graph, config=config, layer_windows=layer_windows, unmatched=unmatched)
    n_chain = replace_matmul_softmax(graph, config=config, layer_windows=layer_windows, unmatched=unmatched, start_index=n_attn)
    total = n_attn + n_chain
    if total != num_layers:
        detail = "; ".join(f"{n}: {r}" for n, r in unmatched) or "no Softmax or Attention node left unmatched"
        raise ValueError(
            f"rewrite replaced {total} attention blocks ({n_attn} Attention ops, {n_chain} MatMul/Softmax chains) "
            f"but the model has {num_layers} attention layers; unmatched nodes: {detail}"
        )
    graph.cleanup().toposort()
    result = gs.export_onnx(graph)
    result.ir_version = model.ir_version
    del result.opset_import[:]
    result.opset_import.extend(model.opset_import)
    result.functions.extend(model.functions)
    local_function.attach(result)
    onnx.checker.check_model(result)
    big = result.ByteSize() >= 2 * 1024**3 - 1024**2
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        tmp_file = tmp_dir / out_path.name
        onnx.save(result, str(tmp_file), save_as_external_data=big, location=out_path.name + ".data")
        move_into_place(tmp_dir, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_path
