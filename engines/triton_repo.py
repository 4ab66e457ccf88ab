"""The Triton Inference Server model repository.

Layout written by `write_repository`:

    model_repository/
      <model>_<profile>/config.pbtxt, 1/model.plan     TensorRT engine per profile (platform tensorrt_plan)
      <model>_onnxruntime/config.pbtxt, 1/model.py,     the embedded default: Python backend over ONNX Runtime
                          1/<profile>.onnx (+ data)      with the ProxyAttention custom op, one model per profile

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
    "config_text",
    "parse_config",
    "validate_config",
    "write_tensorrt_model",
    "write_python_model",
    "PYTHON_MODEL_SOURCE",
    "SERVED_INPUT",
    "SERVED_OUTPUT",
]

# The Python-backend model's interface: prompt token ids in, logits out.
SERVED_INPUT = "input_ids"
SERVED_OUTPUT = "logits"
PYTHON_MODEL_SOURCE = Path(__file__).with_name("triton_python_model.py")

# numpy / ONNX element type names -> Triton's data types.
TRITON_DTYPES = {
    "int64": "TYPE_INT64",
    "int32": "TYPE_INT32",
    "float32": "TYPE_FP32",
    "float16": "TYPE_FP16",
    "bfloat16": "TYPE_BF16",
    "bool": "TYPE_BOOL",
}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def _pb():
    try:
        from tritonclient.grpc import model_config_pb2
        from google.protobuf import text_format
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the Triton model repository needs tritonclient's protobuf schema: "
            "python3 -m pip install 'tritonclient[grpc,http]==2.73.0'"
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


def tensorrt_plan_config(name: str, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], max_batch_size: int, instances: int = 1,
                         gpus: Sequence[int] = ()):
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


def python_ort_config(name: str, *, vocab_size: int, max_batch_size: int, profiles: Sequence[Profile], profile_files: Sequence[str],
                      instances: int = 1):
    """ModelConfig of the Python-backend model: `input_ids` INT64 `[-1]` in, `logits` FP32 `[-1, vocab]` out.

    The profiles (with the ONNX file of each) travel as the JSON parameter `profiles`; a request is served by the
    first profile whose [min, max] covers its sequence length.
    """
    pb, _ = _pb()
    _check_model_name(name)
    if len(profiles) != len(profile_files) or not profiles:
        raise ValueError(f"need one ONNX file per profile, got {len(profile_files)} files for {len(profiles)} profiles")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise ValueError(f"max_batch_size={max_batch_size!r} must be an int >= 1")
    cfg = pb.ModelConfig()
    cfg.name = name
    cfg.backend = "python"
    cfg.max_batch_size = max_batch_size
    _fill_io(cfg.input, [TensorSpec(SERVED_INPUT, "int64", (-1,))])
    _fill_io(cfg.output, [TensorSpec(SERVED_OUTPUT, "float32", (-1, int(vocab_size)))])
    group = cfg.instance_group.add()
    group.kind = pb.ModelInstanceGroup.Kind.KIND_CPU
    group.count = instances
    table = [dict(p.as_dict(), file=f) for p, f in zip(profiles, profile_files)]
    cfg.parameters["profiles"].string_value = json.dumps(table)
    cfg.parameters["vocab_size"].string_value = str(int(vocab_size))
    return cfg


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


def write_python_model(repo: Path, name: str, onnx_files: Sequence[Path], cfg) -> Path:
    """`<repo>/<name>/config.pbtxt`, `1/model.py` and the ONNX files (hard-linked when possible, else copied)."""
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
    atomic_write_text(version / "model.py", PYTHON_MODEL_SOURCE.read_text())
    _write_config(model_dir, cfg)
    return model_dir
