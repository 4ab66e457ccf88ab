"""Export a transformers causal LM to ONNX with one `proxy::ProxyAttention` node per attention layer.

    from export.onnx_export import export_model
    path = export_model(model, "out/model.onnx", config=ProxyAttnConfig())

The model runs through the `"proxyattn"` attention implementation (`proxyattn.hf`), which calls
`export.contract.emit_proxy_attention` while exporting (installed here with `hf.set_export_attention` for the duration
of the export: the algorithm package does not import the exporter), so the dynamo exporter writes the custom node directly
(no mask subgraph, K/V not expanded). The file carries a model-local function `proxy::ProxyAttention` (dense
causal attention, window honoured) so any ONNX runtime or parser runs it unchanged. Graph: input `input_ids`
int64 `[batch, sequence]` (unpadded prompts: the node is causal over the whole row), output `logits`
`[batch, sequence, vocab]` float32, fp16 or bf16 like the weights.

Memory: a materialised model is exported in place (weights referenced, not copied); `export_model` refuses early
when the weights and the exporter's working memory do not fit the available memory. A model whose parameters are on
the `meta` device (built under `accelerate.init_empty_weights()`) is exported as a graph only and its weights are
streamed from `weights` (a mapping name -> tensor, e.g. a lazy safetensors reader, or a callable) into the external
data file one tensor at a time, so an 8B model never sits in memory twice.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Mapping

import onnx
import torch

from proxyattn.config import ProxyAttnConfig

from . import contract, local_function
from .staging import move_into_place

__all__ = ["export_model", "random_weights", "count_proxy_nodes", "num_attention_layers", "estimate_export_memory", "available_memory"]

ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Protobuf's hard limit: a model file without external data must stay below 2 GB.
PROTOBUF_LIMIT = 2 * 1024**3
# Working memory of the exporter beyond the weights (graph, tracing), measured loosely; bytes.
EXPORT_OVERHEAD = 2 * 1024**3


def num_attention_layers(model) -> int:
    """Attention layers of a transformers model (its text config's `num_hidden_layers`)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"cannot tell the number of attention layers of {type(model).__name__} (num_hidden_layers={n!r})")
    return n


def count_proxy_nodes(model: onnx.ModelProto) -> int:
    """`proxy::ProxyAttention` nodes in the main graph."""
    return sum(1 for n in model.graph.node if n.op_type == contract.OP_TYPE and n.domain == contract.DOMAIN)


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; cgroup limit if lower)."""
    avail = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    if avail is None:
        raise RuntimeError("/proc/meminfo has no MemAvailable line")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            used_path = "/sys/fs/cgroup/memory.current" if path.endswith("memory.max") else "/sys/fs/cgroup/memory/memory.usage_in_bytes"
            try:
                used = int(Path(used_path).read_text().strip())
            except (OSError, ValueError):
                used = 0
            avail = min(avail, max(int(text) - used, 0))
    return avail


def estimate_export_memory(model, dtype: torch.dtype) -> int:
    """Bytes the export needs: the weights in `dtype` (for a materialised model) plus the exporter's overhead."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    on_meta = _is_meta(model)
    if on_meta:
        largest = max((p.numel() for p in model.parameters()), default=0)
        return 2 * largest * itemsize + EXPORT_OVERHEAD
    n = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return n * itemsize + EXPORT_OVERHEAD


def _is_meta(model) -> bool:
    return any(p.device.type == "meta" for p in model.parameters())


class _LogitsOnly(torch.nn.Module):
    """input_ids -> logits, no cache (the exported graph is a prefill)."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids):
        return self.m(input_ids=input_ids, use_cache=False).logits


def _check_args(model, config, opset, dtype, example_batch, example_seq, external_data) -> None:
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    if not isinstance(config, ProxyAttnConfig):
        raise ValueError(f"config must be a ProxyAttnConfig, got {type(config).__name__}")
    contract.encode_attrs(config, scale=1.0)  # refuses a config the node cannot carry, before any work
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        raise ValueError(f"opset={opset!r} is not supported; allowed: 18..23 (default 18)")
    if dtype not in ALLOWED_DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; allowed: {ALLOWED_DTYPES}")
    if isinstance(example_batch, bool) or not isinstance(example_batch, int) or example_batch < 2:
        raise ValueError(f"example_batch={example_batch!r} must be an int >= 2 (a batch of 1 specialises the batch axis)")
    if isinstance(example_seq, bool) or not isinstance(example_seq, int) or example_seq < 2:
        raise ValueError(f"example_seq={example_seq!r} must be an int >= 2 (1 specialises the sequence axis)")
    if external_data not in (None, True, False):
        raise ValueError(f"external_data={external_data!r} must be None (automatic), True or False")


def export_model(
    model,
    out_path,
    *,
    config: ProxyAttnConfig,
    opset: int = 18,
    dtype: torch.dtype = torch.float32,
    example_batch: int = 2,
    example_seq: int = 16,
    external_data: bool | None = None,
    weights: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor] | None = None,
    optimize: bool = True,
    verbose: bool = False,
) -> Path:
    """Export `model` (a transformers causal LM) to `out_path` with one ProxyAttention node per layer.

    Args:
        model: transformers `PreTrainedModel` with a causal LM head; materialised, or with parameters on `meta`.
        out_path: the `.onnx` file to write (atomically: a temporary directory beside it, then rename). With external
            data the weights go to `<out_path name>.data` beside it.
        config: the `ProxyAttnConfig` every node carries.
        opset: default-domain ONNX opset, 18 (default) to 23.
        dtype: weights and activations: float32, float16 or bfloat16 (the model is converted in place).
        example_batch, example_seq: shape traced (batch >= 2 keeps the batch axis dynamic); both axes are dynamic.
        external_data: None writes external data when the weights exceed 2 GB; True/False force it.
        weights: only for a meta model: where each parameter's values come from (name as in `model.state_dict()`).
        optimize: run the exporter's ONNX optimizer (constant folding, fusions); about half the export time of a
            30-layer model on 2 cores. Always off for a meta model (folding would read meta tensors).
        verbose: show the exporter's progress.
    Returns:
        The written path.
    Raises:
        ValueError: bad arguments, a config the contract cannot carry, a model whose attention does not go through
            the attention interface (the node count differs from the layers), or too little memory (names the need).
    """
    _check_args(model, config, opset, dtype, example_batch, example_seq, external_data)
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ValueError(f"out_path={str(out_path)!r} must end in .onnx")
    meta = _is_meta(model)
    if meta and weights is None:
        raise ValueError("model has parameters on the meta device: pass weights= (a mapping or callable name -> tensor)")
    if not meta and weights is not None:
        raise ValueError("weights= is only for a model on the meta device; this model is materialised")
    if meta and any(b.device.type == "meta" for b in model.buffers()):
        names = [n for n, b in model.named_buffers() if b.device.type == "meta"][:5]
        raise ValueError(f"buffers {names} are on the meta device; build the model with init_empty_weights(include_buffers=False)")
    # A meta model is traced entirely on meta (one device); its buffers (small: rotary tables) keep their values here
    # and go back into the model afterwards and into the external data file.
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()} if meta else {}
    need = estimate_export_memory(model, dtype)
    have = available_memory()
    if need > have:
        raise ValueError(
            f"exporting {type(model).__name__} in {dtype} needs about {need / 1024**3:.1f} GiB of memory but "
            f"{have / 1024**3:.1f} GiB is available; build the model on the meta device "
            f"(accelerate.init_empty_weights(include_buffers=False)) and pass weights= to stream them"
        )
    n_layers = num_attention_layers(model)
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()
    use_external = bool(meta or (weight_bytes >= PROTOBUF_LIMIT if external_data is None else external_data))
    if meta and external_data is False:
        raise ValueError("a meta model's weights are streamed to external data; external_data=False is impossible")

    from proxyattn import hf

    previous_config = hf.active_config()
    previous_impl = getattr(model.config, "_attn_implementation", None)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    previous_emit = hf.set_export_attention(contract.emit_proxy_attention)
    try:
        hf.register(config)
        model.set_attn_implementation("proxyattn")
        model.eval()
        model.to(dtype)  # in place; on meta tensors it changes only the recorded dtype
        if meta:
            _set_buffers(model, {n: b.to("meta") for n, b in buffers.items()})
        vocab = model.config.get_text_config().vocab_size
        example = torch.randint(0, vocab, (example_batch, example_seq), dtype=torch.long, device="meta" if meta else "cpu")
        batch = torch.export.Dim("batch", min=1)
        seq = torch.export.Dim("sequence", min=1)
        with torch.no_grad():
            program = torch.onnx.export(
                _LogitsOnly(model).eval(),
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes=({0: batch, 1: seq},),
                verbose=verbose,
                optimize=optimize and not meta,  # constant folding would read meta tensors
            )
        tmp_file = tmp_dir / out_path.name
        if meta:
            _save_streaming(program, tmp_file, _with_buffers(weights, buffers))
        else:
            program.save(tmp_file, external_data=use_external)
        proto = onnx.load(str(tmp_file), load_external_data=False)
        found = count_proxy_nodes(proto)
        if found != n_layers:
            raise ValueError(
                f"the export has {found} {contract.DOMAIN}::{contract.OP_TYPE} nodes but the model has {n_layers} "
                f"attention layers: {type(model).__name__}'s attention does not go through transformers' attention "
                f"interface for every layer (use export.rewrite on a stock export instead)"
            )
        _name_nodes(proto)
        local_function.attach(proto)
        onnx.save(proto, str(tmp_file))
        onnx.checker.check_model(str(tmp_file))  # by path: external data resolved beside the file
        move_into_place(tmp_dir, out_path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        hf.register(previous_config)
        hf.set_export_attention(previous_emit)
        if meta:
            _set_buffers(model, buffers)
        if previous_impl is not None:
            model.set_attn_implementation(previous_impl)
    return out_path


def random_weights(model, *, seed: int = 0, std: float = 0.02) -> Callable[[str], torch.Tensor]:
    """A `weights=` source for a structural build of a meta model: each parameter drawn on demand (normal with `std`,
    norm weights 1), reproducible per name, one tensor in memory at a time; `std=0` gives zeros (fastest)."""
    import zlib

    shapes = {name: (tuple(p.shape), p.dtype) for name, p in model.named_parameters()}

    def source(name: str) -> torch.Tensor:
        if name not in shapes:
            raise ValueError(f"weights has no tensor {name!r} (not a parameter of {type(model).__name__})")
        shape, dtype = shapes[name]
        if len(shape) == 1 and "norm" in name:
            return torch.ones(shape, dtype=dtype)
        if std == 0:
            return torch.zeros(shape, dtype=dtype)
        g = torch.Generator().manual_seed(seed * 1000003 + zlib.crc32(name.encode()))
        return (torch.randn(shape, generator=g) * std).to(dtype)

    return source


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Name each ProxyAttention node after its layer (`layers.<i>.proxy_attention`) and keep only that metadata."""
    for node in proto.graph.node:
        if node.op_type != contract.OP_TYPE or node.domain != contract.DOMAIN:
            continue
        idx = next((p.value for p in node.metadata_props if p.key == contract.LAYER_IDX_KEY), None)
        if idx is not None:
            node.name = f"layers.{idx}.proxy_attention"


def _initializer_source(name: str, weights) -> torch.Tensor:
    key = name[2:] if name.startswith("m.") else name
    if callable(weights) and not isinstance(weights, Mapping):
        value = weights(key)
    else:
        if key not in weights:
            raise ValueError(f"weights has no tensor {key!r} (the graph needs it)")
        value = weights[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"weights[{key!r}] is a {type(value).__name__}, not a tensor")
    return value


def _set_buffers(model, values: dict) -> None:
    for name, value in values.items():
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._buffers[leaf] = value


def _with_buffers(weights, buffers: dict):
    """Look up buffers first (their real values), then the caller's weights."""

    def source(name: str) -> torch.Tensor:
        if name in buffers:
            return buffers[name]
        if callable(weights) and not isinstance(weights, Mapping):
            return weights(name)
        if name not in weights:
            raise ValueError(f"weights has no tensor {name!r} (the graph needs it)")
        return weights[name]

    return source


def _save_streaming(program, path: Path, weights) -> None:
    """Write the graph with every meta initializer's values streamed from `weights` into `<name>.data`."""
    import onnx_ir as ir

    model = program.model
    data_name = path.name + ".data"
    data_path = path.parent / data_name
    offset = 0
    with open(data_path, "wb") as f:
        for name, value in list(model.graph.initializers.items()):
            const = value.const_value
            if const is None:
                continue
            source_is_meta = isinstance(getattr(const, "raw", None), torch.Tensor) and const.raw.device.type == "meta"
            if source_is_meta:
                t = _initializer_source(name, weights)
                expected = tuple(const.raw.shape)
                if tuple(t.shape) != expected:
                    raise ValueError(f"weights[{name!r}] has shape {tuple(t.shape)}, the graph needs {expected}")
                t = t.detach().to(device="cpu", dtype=const.raw.dtype).contiguous()
                payload = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
                ir_dtype = const.dtype
                shape = const.shape
            else:
                payload = const.tobytes()
                ir_dtype = const.dtype
                shape = const.shape
            pad = (-offset) % 4096
            f.write(b"\0" * pad)
            offset += pad
            f.write(payload)
            value.const_value = ir.ExternalTensor(data_name, offset, len(payload), ir_dtype, shape=shape, name=name, base_dir=path.parent)
            offset += len(payload)
            del payload
    proto = ir.serde.serialize_model(model)
    onnx.save(proto, str(path))
