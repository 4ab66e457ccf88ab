"""TensorRT engines, one per sequence-length profile (needs TensorRT; imported lazily).

`build_engines(onnx_path, out_dir, profiles, ...)` rewrites the exported graph for the plugins
(`graph.to_tensorrt_graph`, sized for the profile's longest sequence; written beside the export so its external data
resolves), parses it with TensorRT's ONNX parser (strongly typed network: the file's types decide the precision;
the plugin nodes carry `aot=1`, so the AOT kernels are embedded in the engine), adds one optimization profile for
`input_ids` `[batch, sequence]` (batch 1..max_batch, sequence min/opt/max of the profile), uses a timing cache
shared by the profiles, and writes `<out>/<profile>/model.plan` atomically.

Not run in this project: TensorRT is not installable on its machines (see docs/deploy.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, Sequence

from ..atomic import atomic_write_bytes
from .registration import import_tensorrt, register_plugins

__all__ = ["ShapeProfile", "profile_shapes", "build_engines", "TIMING_CACHE"]

TIMING_CACHE = "timing.cache"  # in the engines directory, shared by the profiles and seeding the next build


class ShapeProfile(Protocol):
    """What an engine reads of a sequence-length profile (`engines.models.Profile` is one): its name (the engine's
    directory) and min <= opt <= max tokens."""

    name: str
    min: int
    opt: int
    max: int


def profile_shapes(profile: ShapeProfile, max_batch: int) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """(min, opt, max) shapes of `input_ids` for one engine: batch 1 / max(1, max_batch // 2) / max_batch."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    return (1, profile.min), (max(1, max_batch // 2), profile.opt), (max_batch, profile.max)


def build_engines(
    onnx_path: Path,
    out_dir: Path,
    profiles: Sequence[ShapeProfile],
    *,
    precision: str,
    max_batch: int,
    kernels_dir: Path | None = None,
    progress: Callable | None = None,
    timing_cache: Path | None = None,
) -> list[Path]:
    """`<out_dir>/<profile>/model.plan` per profile and `<out_dir>/timing.cache`; `timing_cache` (default the one in
    out_dir) seeds TensorRT's timing cache, e.g. the previous build's."""
    trt, _ = import_tensorrt()
    register_plugins()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_config = builder.create_builder_config()
    cache_path = Path(out_dir) / TIMING_CACHE
    seed = Path(timing_cache) if timing_cache is not None else cache_path
    cache = cache_config.create_timing_cache(seed.read_bytes() if seed.is_file() else b"")
    built = []
    bar = progress(len(profiles), "engines") if progress else None
    import onnx

    from .graph import to_tensorrt_graph

    source = onnx.load(str(onnx_path), load_external_data=False)
    for p in profiles:
        rewritten = Path(onnx_path).with_name(f".{Path(onnx_path).stem}.trt-{p.name}.tmp.onnx")  # beside its external data
        onnx.save(to_tensorrt_graph(source, max_seq_len=p.max), str(rewritten))
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        try:
            if not parser.parse_from_file(str(rewritten)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"TensorRT could not parse {rewritten}: {errors}")
        finally:
            rewritten.unlink(missing_ok=True)
        config = builder.create_builder_config()
        config.set_timing_cache(cache, ignore_mismatch=False)
        prof = builder.create_optimization_profile()
        lo, opt, hi = profile_shapes(p, max_batch)
        prof.set_shape("input_ids", lo, opt, hi)
        config.add_optimization_profile(prof)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build the engine of profile {p.name}")
        built.append(atomic_write_bytes(Path(out_dir) / p.name / "model.plan", bytes(plan)))
        if bar:
            bar.update(1)
    atomic_write_bytes(cache_path, bytes(cache.serialize()))
    if bar:
        bar.close()
    return built
