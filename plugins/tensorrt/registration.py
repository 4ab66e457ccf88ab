"""Registration of the ProxyAttn plugins with TensorRT's Python plugin API (`tensorrt.plugin`, TensorRT >= 10.16).

`register_plugins()` imports TensorRT lazily (one clear error when it is missing) and, for every plugin in
`spec.PLUGINS`, registers:

* `@trtp.register("proxy::<Name>")`: output shapes and types from `spec.output_shapes` / `spec.output_dtypes`;
* `@trtp.autotune`: the type combination of `spec.output_dtypes` and the tactics of `spec.tactics`;
* `@trtp.aot_impl`: compiles the plugin's Triton wrapper kernel for the build GPU (`aot.compile_kernel` logic,
  default target) and returns (kernel name, PTX, launch parameters from `spec.launch`, extra int32 scalars from
  `spec.extra_args`).

Everything these callbacks compute comes from the plain functions in `spec`, which the CPU tests check. The
callbacks themselves were not run in this project (no TensorRT here).
"""

from __future__ import annotations

import inspect
from typing import Any

from . import spec as S

__all__ = ["TensorRTMissing", "import_tensorrt", "register_plugins", "TRT_OPS"]

_MISSING = (
    "TensorRT is not installed (import tensorrt failed). The ProxyAttn TensorRT plugins and engines need "
    "TensorRT >= 10.16 with its Python bindings on a machine with an NVIDIA GPU; the embedded default backend "
    "(ONNX Runtime, `python build.py --backend onnxruntime`) works without it."
)


class TensorRTMissing(RuntimeError):
    pass


def import_tensorrt():
    """(tensorrt, tensorrt.plugin), or TensorRTMissing with one clear message."""
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise TensorRTMissing(_MISSING) from e
    return trt, trtp


class _TrtOps:
    """Shape arithmetic on `tensorrt.plugin` shape expressions."""

    def __init__(self, trtp) -> None:
        self.trtp = trtp

    def cdiv(self, a, b):
        if isinstance(a, int) and isinstance(b, int):
            return -(-a // b)
        return self.trtp.cdiv(a, b)

    @staticmethod
    def floordiv(a, b):
        return a // b

    @staticmethod
    def static(a):
        """A build-time dimension's value (head counts); -1 when the expression is not a constant (spec refuses it)."""
        return _static(a)


TRT_OPS = None  # set by register_plugins

_registered = False


def _np_name(trt, dtype) -> str:
    table = {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32", trt.int32: "int32"}
    if dtype not in table:
        raise ValueError(f"tensor type {dtype} is not supported by the ProxyAttn plugins")
    return table[dtype]


def _static(expr) -> int:
    """A static dim from a shape expression (-1 when it is dynamic)."""
    if isinstance(expr, int):
        return expr
    return int(expr.constant_value()) if getattr(expr, "is_constant", False) else -1


def _with_signature(fn, params: list[inspect.Parameter], ret=Any):
    fn.__signature__ = inspect.Signature(params, return_annotation=ret)
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": ret}
    return fn


def register_plugins() -> None:
    """Register every ProxyAttn plugin with TensorRT (idempotent)."""
    global _registered, TRT_OPS
    if _registered:
        return
    trt, trtp = import_tensorrt()
    from typing import List, Tuple

    ops = _TrtOps(trtp)
    TRT_OPS = ops
    trt_types = {"float16": trt.float16, "bfloat16": trt.bfloat16, "float32": trt.float32, "int32": trt.int32}
    pos = inspect.Parameter.POSITIONAL_OR_KEYWORD

    for name, pdef in S.PLUGINS.items():
        pid = f"{S.NAMESPACE}::{name}"
        attr_params = [inspect.Parameter(a, pos, annotation=float if a == "scale" else int) for a in pdef.attrs]
        in_params = [inspect.Parameter(i, pos, annotation=trtp.TensorDesc) for i in pdef.inputs]

        def desc(*args, _name=name, _pdef=pdef, **kwargs):
            tensors = list(args[: len(_pdef.inputs)]) + [kwargs.pop(i) for i in _pdef.inputs[len(args) :]]
            attrs = dict(zip(_pdef.attrs, args[len(_pdef.inputs) :])) | kwargs
            shapes = [list(t.shape_expr) for t in tensors]
            out_types = S.output_dtypes(_name, [_np_name(trt, t.dtype) for t in tensors])
            out_shapes = S.output_shapes(_name, shapes, attrs, ops)
            descs = tuple(trtp.from_shape_expr(tuple(sh), dtype=trt_types[ty]) for sh, ty in zip(out_shapes, out_types))
            return descs if len(descs) > 1 else descs[0]

        trtp.register(pid)(_with_signature(desc, in_params + attr_params))

        def autotune(*args, _name=name, _pdef=pdef, **kwargs):
            tensors = list(args[: len(_pdef.inputs)])
            in_types = [_np_name(trt, t.dtype) for t in tensors]
            out_types = S.output_dtypes(_name, in_types)
            combo = ", ".join(
                t.replace("float16", "FP16").replace("bfloat16", "BF16").replace("float32", "FP32").replace("int32", "INT32")
                for t in in_types + out_types
            )
            c = trtp.AutoTuneCombination(combo)
            c.tactics(S.tactics(_name))
            return [c]

        trtp.autotune(pid)(
            _with_signature(
                autotune, in_params + [inspect.Parameter("outputs", pos, annotation=Tuple[trtp.TensorDesc])], List[trtp.AutoTuneCombination]
            )
        )

        def aot(*args, _name=name, _pdef=pdef, **kwargs):
            import triton

            n_in = len(_pdef.inputs)
            tensors = list(args[:n_in])
            attrs = dict(zip(_pdef.attrs, args[n_in : n_in + len(_pdef.attrs)]))
            tactic = kwargs.get("tactic", args[-1] if len(args) > n_in + len(_pdef.attrs) + 1 else 1)
            shapes = [list(t.shape_expr) for t in tensors]
            static = [[_static(d) for d in sh] for sh in shapes]
            dtypes = [_np_name(trt, t.dtype) for t in tensors]
            consts, options = S.constants(_name, static, dtypes, attrs, int(tactic))
            sig = S.signature(_name, dtypes, consts)
            from .kernels import WRAPPERS
            from .aot import check_entry

            src = triton.compiler.ASTSource(fn=WRAPPERS[_pdef.kernel], signature=sig, constexprs=consts)
            compiled = triton.compile(src, options=options)
            check_entry(compiled.asm["ptx"], sig, metadata=compiled.metadata)
            lp = trtp.KernelLaunchParams()
            gx, gy, gz = S.launch(_name, shapes, attrs, consts, ops)
            lp.grid_x, lp.grid_y, lp.grid_z = gx, gy, gz
            lp.block_x = compiled.metadata.num_warps * 32
            lp.shared_mem = compiled.metadata.shared
            extra = trtp.SymIntExprs.from_tuple([trtp.SymInt32(e) for e in S.extra_args(_name, shapes, attrs)])
            return compiled.metadata.name, compiled.asm["ptx"], lp, extra

        trtp.aot_impl(pid)(
            _with_signature(
                aot,
                in_params
                + attr_params
                + [inspect.Parameter("outputs", pos, annotation=Tuple[trtp.TensorDesc]), inspect.Parameter("tactic", pos, annotation=int)],
            )
        )
    _registered = True
