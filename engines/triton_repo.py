"""The Triton Inference Server model repository.

Layout written by the pipeline's repository stage (`engines.pipeline`):

    model_repository/
      <model>_<profile>/config.pbtxt, 1/model.plan     TensorRT engine per profile (platform tensorrt_plan)
      <model>_onnxruntime/config.pbtxt, 1/model.py,     the embedded default: Python backend over ONNX Runtime
                          1/<profile>.onnx (+ data),     with the ProxyAttention custom op, one model per profile;
                          1/tokenizer/                   token ids -> last-position logits, text -> text (KIND_CPU)
      <model>_onnxruntime_stream/...                    the same, decoupled: generate_stream sends every token
      <model>_proxyattn/config.pbtxt, 1/model.py,       transformers with attn_implementation "proxyattn" (Triton
                        1/tokenizer/                     kernels for the prefill), decoupled, KIND_GPU
      <model>_dense/...                                 the same with dense attention ("sdpa"): the baseline

Every Python-backend model runs `engines/triton_python_model.py` (copied as `1/model.py`); its config parameters
pick the engine (`python_llm_config`). The text interface: `text_input` BYTES [1] in, `text_output` out (Triton's
generate / generate_stream endpoints map a JSON `text_input` onto it); token ids: `input_ids` INT64 [batch, tokens]
in, `last_logits` out (`logits` only on request).

Every `config.pbtxt` is made as a `model_config_pb2.ModelConfig` message (Triton's own schema, from
`tritonclient`), printed with protobuf's text_format, parsed back and checked by `validate_config`.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .artifacts import atomic_write_text
from .models import Profile

__all__ = [
    "TensorSpec",
    "TRITON_DTYPES",
    "tensorrt_plan_config",
    "python_ort_config",
    "python_llm_config",
    "python_torch_config",
    "config_text",
    "parse_config",
    "validate_config",
    "write_tensorrt_model",
    "write_python_model",
    "write_tokenizer",
    "write_serving_models",
    "transformers_weights",
    "LLM_INPUTS",
    "LLM_OUTPUTS",
    "PYTHON_MODEL_SOURCE",
    "SERVED_INPUT",
    "SERVED_OUTPUT",
]

# The Python-backend model's token-id interface: prompt token ids in, logits out (full logits on request only).
SERVED_INPUT = "input_ids"
SERVED_OUTPUT = "last_logits"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

# numpy / ONNX element type names -> Triton's data types.
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "bool": "TYPE_BOOL",
    "bytes": "TYPE_STRING",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
        from google.protobuf import text_format
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the Triton model repository needs tritonclient's protobuf schema: python3 -m pip install 'tritonclient[grpc,http]==2.73.0'"
        ) from e
    return model_config_pb2, text_format


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton sees it: name, element type (numpy name), dims WITHOUT the batch dim."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"tensor name {self.name!r} must match {_NAME.pattern}")
        if self.dtype not in TRITON_DTYPES:
            raise ValueError(f"tensor {self.name!r}: dtype {self.dtype!r} not supported; allowed: {sorted(TRITON_DTYPES)}")
        if not self.dims or any((not isinstance(d, int)) or d == 0 or d < -1 for d in self.dims):
            raise ValueError(f"tensor {self.name!r}: dims {self.dims!r} must be positive ints or -1 (dynamic)")


def _check_model_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise ValueError(f"model name {name!r} must match {_NAME.pattern}")


def _fill_io(msg, specs: Sequence[TensorSpec]) -> None:
    pb, _ = _pb()
    for s in specs:
        entry = msg.add()
        entry.name = s.name
        entry.data_type = pb.DataType.Value(TRITON_DTYPES[s.dtype])
        entry.dims.extend(s.dims)


def tensorrt_plan_config(
    name: str,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    max_batch_size: int,
    instances: int = 1,
    gpus: Sequence[int] = (),
):
    """ModelConfig of one TensorRT engine (one optimization profile, index 0) with a dynamic sequence axis.

    Dims exclude the batch dim (the engine's dim 0, dynamic up to max_batch_size); -1 marks the sequence axis.
    """
    pb, _ = _pb()
    _check_model_name(name)
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be an int >= 1 (the engine's batch axis is dynamic)")
    if isinstance(instances, bool) or not isinstance(instances, int) or instances < 1:
        raise ValueError(f"instances={instances!r} must be an int >= 1")
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.platform = "tensorrt_plan"
    cfg.max_batch_size = max_batch_size
    _fill_io(cfg.input, inputs)
    _fill_io(cfg.output, outputs)
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.Kind.KIND_GPU
    group.count = instances
    group.gpus.extend(gpus)
    group.profile.append("0")  # the engine's one optimization profile
    cfg.default_model_filename = "model.plan"
    return cfg


def _llm_io(vocab_size: int):
    """(inputs, outputs) of the Python-backend model: (name, dtype, dims, optional)."""
    v = int(vocab_size)
    inputs = [("text_input", "bytes", (1,), True), ("input_ids", "int64", (-1, -1), True)]
    outputs = [
        ("text_output", "bytes", (1,)),
        ("output_ids", "int64", (-1,)),
        ("finish_reason", "bytes", (1,)),
        ("prompt_tokens", "int64", (1,)),
        ("completion_tokens", "int64", (1,)),
        ("first_token_ms", "float32", (1,)),
        ("sparse_layers", "int64", (1,)),
        ("last_logits", "float32", (-1, v)),
        ("logits", "float32", (-1, -1, v)),
    ]
    return inputs, outputs


LLM_INPUTS = tuple(name for name, *_ in _llm_io(1)[0])
LLM_OUTPUTS = tuple(name for name, *_ in _llm_io(1)[1])
_KINDS = ("CPU", "GPU")


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an int >= 1")
    return value


def python_llm_config(
    name: str,
    *,
    engine: str,
    vocab_size: int,
    parameters: dict[str, str],
    kind: str = "CPU",
    decoupled: bool = False,
    instances: int = 1,
    max_batch: int = 1,
    gpus: Sequence[int] = (),
    tokenizer: bool = True,
    default_max_tokens: int = 16,
):
    """ModelConfig of a Python-backend model running `engines/triton_python_model.py`.

    Interface (max_batch_size 0: the model handles its own batch axis): optional inputs `text_input` BYTES [1] and
    `input_ids` INT64 [batch, tokens] (a request gives exactly one); outputs `text_output`, `output_ids`,
    `finish_reason`, `prompt_tokens`, `completion_tokens`, `first_token_ms`, `sparse_layers` (generation; the last
    one from the transformers engine only) and `last_logits`
    [batch, vocab], `logits` [batch, tokens, vocab] (token ids). `engine` is "onnxruntime" or "transformers";
    `parameters` are its own (see the model file); `kind` "CPU" or "GPU" (instance group); `decoupled` streams one
    response per token; `max_batch` bounds the batch of an `input_ids` request; `tokenizer` says whether
    `1/tokenizer/` holds one.
    """
    pb, _ = _pb()
    _check_model_name(name)
    from .serving import ENGINES

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}; allowed: {', '.join(ENGINES)}")
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(_KINDS)}")
    _positive("instances", instances)
    _positive("max_batch", max_batch)
    _positive("default_max_tokens", default_max_tokens)
    _positive("vocab_size", vocab_size)
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "python"
    cfg.max_batch_size = 0
    inputs, outputs = _llm_io(vocab_size)
    for tname, dtype, dims, optional in inputs:
        entry = cfg.input.add()
        entry.name, entry.data_type, entry.optional = tname, pb.DataType.Value(TRITON_DTYPES[dtype]), optional
        entry.dims.extend(dims)
    for tname, dtype, dims in outputs:
        entry = cfg.output.add()
        entry.name, entry.data_type = tname, pb.DataType.Value(TRITON_DTYPES[dtype])
        entry.dims.extend(dims)
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.Kind.Value(f"KIND_{kind}")
    group.count = instances
    group.gpus.extend(gpus)
    if decoupled:
        cfg.model_transaction_policy.decoupled = True
    values = {
        "engine": engine,
        "vocab_size": str(int(vocab_size)),
        "max_batch": str(max_batch),
        "default_max_tokens": str(default_max_tokens),
        **parameters,
    }
    if tokenizer:
        values["tokenizer"] = "tokenizer"
    for key, value in values.items():
        if not isinstance(value, str):
            raise ValueError(f"parameter {key}={value!r} must be a string")
        cfg.parameters[key].string_value = value
    return cfg


def python_ort_config(
    name: str,
    *,
    vocab_size: int,
    max_batch_size: int,
    profiles: Sequence[Profile],
    profile_files: Sequence[str],
    instances: int = 1,
    decoupled: bool = False,
    tokenizer: bool = False,
):
    """ModelConfig of the embedded default (`python_llm_config` with engine "onnxruntime", KIND_CPU).

    The profiles (with the ONNX file of each) travel as the JSON parameter `profiles`; a sequence is served by the
    first profile whose [min, max] covers its length. `max_batch_size` bounds an `input_ids` request's batch.
    """
    if len(profiles) != len(profile_files) or not profiles:
        raise ValueError(f"need one ONNX file per profile, got {len(profile_files)} files for {len(profiles)} profiles")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
    table = [dict(p.as_dict(), file=f) for p, f in zip(profiles, profile_files)]
    return python_llm_config(
        name,
        engine="onnxruntime",
        vocab_size=vocab_size,
        parameters={"profiles": json.dumps(table)},
        kind="CPU",
        decoupled=decoupled,
        instances=instances,
        max_batch=max_batch_size,
        tokenizer=tokenizer,
    )


def python_torch_config(
    name: str,
    *,
    weights: str,
    attention: str,
    vocab_size: int,
    proxyattn=None,
    kind: str = "GPU",
    decoupled: bool = True,
    dtype: str = "auto",
    instances: int = 1,
    gpus: Sequence[int] = (),
    tokenizer: bool = True,
    max_batch: int = 1,
    default_max_tokens: int = 16,
):
    """ModelConfig of a transformers model (`python_llm_config` with engine "transformers"): `weights` as
    `engines.serving.TorchEngine.load` takes them, `attention` "proxyattn" or "dense", `proxyattn` the
    ProxyAttnConfig of the sparse prefill (None: the default config)."""
    from .serving import ATTENTIONS

    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}; allowed: {', '.join(ATTENTIONS)}")
    if not isinstance(weights, str) or not weights:
        raise ValueError(f"weights={weights!r} must be package:<name>, checkpoint:<dir>, random:<model> or a directory")
    params = {"weights": weights, "attention": attention, "dtype": dtype}
    if proxyattn is not None:
        params["proxyattn"] = json.dumps(proxyattn.to_attrs())
    return python_llm_config(
        name,
        engine="transformers",
        vocab_size=vocab_size,
        parameters=params,
        kind=kind,
        decoupled=decoupled,
        instances=instances,
        max_batch=max_batch,
        gpus=gpus,
        tokenizer=tokenizer,
        default_max_tokens=default_max_tokens,
    )


def config_text(cfg) -> str:
    _, text_format = _pb()
    return text_format.MessageToString(cfg)


def parse_config(text: str):
    """Parse config.pbtxt text into a ModelConfig (protobuf raises ParseError on anything off-schema)."""
    pb, text_format = _pb()
    return text_format.Parse(text, pb.ModelConfig())


def validate_config(text: str, *, directory_name: str | None = None) -> None:
    """Schema (protobuf) plus the rules Triton applies when loading; ValueError naming the problem."""
    pb, text_format = _pb()
    try:
        cfg = parse_config(text)
    except text_format.ParseError as e:
        raise ValueError(f"config.pbtxt does not match Triton's ModelConfig schema: {e}") from e
    if directory_name is not None and cfg.name != directory_name:
        raise ValueError(f"config name {cfg.name!r} differs from its directory {directory_name!r}")
    if bool(cfg.platform) == bool(cfg.backend):
        raise ValueError(f"exactly one of platform / backend must be set (platform={cfg.platform!r}, backend={cfg.backend!r})")
    if cfg.platform and cfg.platform not in ("tensorrt_plan", "onnxruntime_onnx"):
        raise ValueError(f"platform {cfg.platform!r} is not one this project writes")
    if cfg.max_batch_size < 0:
        raise ValueError(f"max_batch_size={cfg.max_batch_size} must be >= 0")
    if not cfg.input or not cfg.output:
        raise ValueError("a model needs at least one input and one output")
    names = [t.name for t in list(cfg.input) + list(cfg.output)]
    if len(set(names)) != len(names):
        raise ValueError(f"tensor names repeat: {names}")
    for t in list(cfg.input) + list(cfg.output):
        if t.data_type == pb.DataType.TYPE_INVALID:
            raise ValueError(f"tensor {t.name!r} has no data_type")
        if not t.dims or any(d == 0 or d < -1 for d in t.dims):
            raise ValueError(f"tensor {t.name!r} dims {list(t.dims)} must be positive or -1")
    if not cfg.instance_group or any(g.count < 1 for g in cfg.instance_group):
        raise ValueError("instance_group must be present with count >= 1")
    if cfg.platform == "tensorrt_plan":
        if any(g.kind != pb.ModelInstanceGroup.Kind.KIND_GPU for g in cfg.instance_group):
            raise ValueError("TensorRT plans run on KIND_GPU instances only")
        if cfg.max_batch_size < 1:
            raise ValueError("a TensorRT plan with a dynamic batch axis needs max_batch_size >= 1")
    if cfg.backend == "python" and "profiles" in cfg.parameters:
        table = json.loads(cfg.parameters["profiles"].string_value)
        if not table or any(not {"name", "min", "opt", "max", "file"} <= set(p) for p in table):
            raise ValueError(f"parameter 'profiles' must list name/min/opt/max/file for each profile, got {table!r}")
    if cfg.backend == "python" and "engine" in cfg.parameters:
        _validate_llm(cfg)


def _validate_llm(cfg) -> None:
    from .serving import ATTENTIONS, ENGINES

    params = {k: v.string_value for k, v in cfg.parameters.items()}
    engine = params["engine"]
    if engine not in ENGINES:
        raise ValueError(f"parameter engine={engine!r}; allowed: {', '.join(ENGINES)}")
    need = {"onnxruntime": ("profiles", "vocab_size"), "transformers": ("weights", "attention")}[engine]
    missing = [k for k in need if not params.get(k)]
    if missing:
        raise ValueError(f"engine {engine!r} needs the parameters {list(need)}; missing: {missing}")
    if engine == "transformers" and params["attention"] not in ATTENTIONS:
        raise ValueError(f"parameter attention={params['attention']!r}; allowed: {', '.join(ATTENTIONS)}")
    for key in ("max_batch", "default_max_tokens", "vocab_size"):
        if key in params and not (params[key].isdigit() and int(params[key]) >= 1):
            raise ValueError(f"parameter {key}={params[key]!r} must be an int >= 1")
    if cfg.max_batch_size != 0:
        raise ValueError(f"max_batch_size={cfg.max_batch_size}: the text models take max_batch_size 0 (they handle their batch axis)")


def _write_config(model_dir: Path, cfg) -> Path:
    text = config_text(cfg)
    validate_config(text, directory_name=model_dir.name)
    return atomic_write_text(model_dir / "config.pbtxt", text)


def write_tensorrt_model(repo: Path, name: str, plan: Path | None, cfg) -> Path:
    """`<repo>/<name>/config.pbtxt` and, when an engine was built, `1/model.plan` (copied); returns the model dir."""
    model_dir = Path(repo) / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    if plan is not None:
        tmp = model_dir / "1" / ".model.plan.tmp"
        shutil.copyfile(plan, tmp)
        tmp.replace(model_dir / "1" / "model.plan")
    _write_config(model_dir, cfg)
    return model_dir


def write_tokenizer(version_dir: Path, tokenizer) -> Path:
    """`<version_dir>/tokenizer/` from `tokenizer.save_pretrained`, written into a temporary sibling and renamed."""
    dest = Path(version_dir) / "tokenizer"
    tmp = Path(version_dir) / ".tokenizer.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer.save_pretrained(tmp)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.replace(dest)
    return dest


def write_python_model(repo: Path, name: str, onnx_files: Sequence[Path], cfg, tokenizer=None) -> Path:
    """`<repo>/<name>/config.pbtxt`, `1/model.py`, the ONNX files (hard-linked when possible, else copied) and, when
    given, the tokenizer (`1/tokenizer/`). The config must name a tokenizer exactly when one is given."""
    if ("tokenizer" in cfg.parameters) != (tokenizer is not None):
        raise ValueError(
            f"model {name!r}: the config {'names' if 'tokenizer' in cfg.parameters else 'names no'} tokenizer "
            f"but {'none' if tokenizer is None else 'one'} was given"
        )
    model_dir = Path(repo) / name
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    for src in onnx_files:
        src = Path(src)
        dst = version / src.name
        tmp = version / f".{src.name}.tmp"
        tmp.unlink(missing_ok=True)
        try:
            tmp.hardlink_to(src)
        except OSError:
            shutil.copyfile(src, tmp)
        tmp.replace(dst)
    if tokenizer is not None:
        write_tokenizer(version, tokenizer)
    atomic_write_text(version / "model.py", PYTHON_MODEL_SOURCE.read_text())
    _write_config(model_dir, cfg)
    return model_dir


def transformers_weights(weights: str, model: str) -> str:
    """The `weights` parameter of a transformers model from a build's weights (`BuildPlan.weights`): "random"
    becomes "random:<model>", the others ("package:<name>", "checkpoint:<dir>") stay."""
    return f"random:{model}" if weights == "random" else weights


def write_serving_models(
    repo: Path, *, model: str, weights: str, vocab_size: int, proxyattn, tokenizer, ort: dict | None = None
) -> dict[str, str]:
    """The text models of a build into `repo`; returns {model name: description}.

    Always `<model>_proxyattn` and `<model>_dense`: transformers on KIND_GPU, decoupled, the same weights
    (`transformers_weights`), ProxyAttn config `proxyattn` / dense attention. With `ort` (keyword arguments of
    `python_ort_config` plus `files`, the ONNX files) also `<model>_onnxruntime` (the embedded CPU default) and its
    decoupled twin `<model>_onnxruntime_stream` (the same files, hard-linked). `tokenizer` (or None) goes into
    every model's `1/tokenizer/`.
    """
    has_tok = tokenizer is not None
    models = {}
    if ort is not None:
        ort = dict(ort)
        files = ort.pop("files")
        for suffix, decoupled in (("onnxruntime", False), ("onnxruntime_stream", True)):
            name = f"{model}_{suffix}"
            cfg = python_ort_config(name, vocab_size=vocab_size, decoupled=decoupled, tokenizer=has_tok, **ort)
            write_python_model(repo, name, files, cfg, tokenizer)
            models[name] = "python (ONNX Runtime, CPU" + (", decoupled: streams tokens)" if decoupled else ", embedded default)")
    for attention in ("proxyattn", "dense"):
        name = f"{model}_{attention}"
        cfg = python_torch_config(
            name,
            weights=transformers_weights(weights, model),
            attention=attention,
            vocab_size=vocab_size,
            proxyattn=proxyattn if attention == "proxyattn" else None,
            tokenizer=has_tok,
        )
        write_python_model(repo, name, [], cfg, tokenizer)
        models[name] = f"python (transformers, {'ProxyAttn' if attention == 'proxyattn' else 'dense'} prefill, GPU, decoupled)"
    return models
