"""Shared helpers of the estimation kernels (`estimate_scores`, `estimate_budgets`, `estimate_select`)."""

from __future__ import annotations

import os

import torch

_LOG2E = 1.4426950408889634
# Shared memory a Triton program may plan for: Hopper allows 227 KB per block; leave room for the compiler's own buffers.
_SMEM_BUDGET = 220 * 1024


def tile_warps(rows: int, block_d: int) -> int:
    """Warps of an estimation kernel whose program holds `rows` query rows of padded head dim block_d: 8 from
    128 x 128 elements, else 4."""
    return 8 if rows * block_d >= 128 * 128 else 4


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`, the test suite)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _patch_interpreter_index() -> None:
    """Triton 3.6's interpreter holds scalars as 1-element numpy arrays and turns them into loop bounds with
    `int(array)`, which numpy >= 2.4 refuses for arrays of ndim 1 ("only 0-dimensional arrays can be converted to
    Python scalars"). Kernels with data-dependent loop bounds then fail under `TRITON_INTERPRET=1`. This makes the
    interpreter read the single element instead; it changes nothing outside the interpreter and is idempotent."""
    from triton.runtime import interpreter

    if getattr(interpreter, "_proxyattn_index_patch", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._proxyattn_index_patch = True


if interpreting():
    _patch_interpreter_index()


def qk_layout(q: torch.Tensor, k: torch.Tensor, varlen: bool):
    """(Hq, Hkv, D, q strides, k strides) of batched `[B, S, H, D]` or packed `[T, H, D]` q/k; packed tensors get a
    batch stride of 0 so that kernels take the same four strides in both layouts."""
    if varlen:
        return q.shape[1], k.shape[1], q.shape[2], (0,) + tuple(q.stride()), (0,) + tuple(k.stride())
    return q.shape[2], k.shape[2], q.shape[3], tuple(q.stride()), tuple(k.stride())


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device (a host-side property query, no synchronisation); 8 elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
