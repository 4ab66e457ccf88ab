"""TensorRT plugins for ProxyAttn: AOT Triton kernels (PTX) behind `tensorrt.plugin` definitions.

* `spec`: every piece of plugin logic as plain functions (attributes, shapes, types, grids, tactics, constants).
* `kernels`: the Triton entry kernels in TensorRT's AOT calling convention (wrappers of `proxyattn.kernels`).
* `aot`: compiling them to PTX for sm_80 / sm_89 / sm_90 on any machine, and the PTX calling-convention check.
* `registration`: `register_plugins()` with `tensorrt.plugin` (TensorRT imported lazily).
* `engine`: one engine per sequence-length profile (TensorRT imported lazily).

Importing this package needs neither TensorRT nor a GPU.
"""

from .registration import TensorRTMissing, import_tensorrt, register_plugins

__all__ = ["TensorRTMissing", "import_tensorrt", "register_plugins"]
