"""ctypes view of libproxyattn (cpp/include/proxyattn.h) and its host-test library, shared by the tests/cpp modules
and by the subprocesses some of them start (`python -c`, run from the repository root)."""

from __future__ import annotations

import ctypes as C
from pathlib import Path

import numpy as np

from proxyattn.config import ProxyAttnConfig

# What proxyattn_config_default() fills in: Python's defaults (budget rule 3 "block_recall", recall_rows 4, the dense
# fallback at dense_density 0.8, gamma 0.83), the config engines are built with (engines.models).
LIB_DEFAULT = ProxyAttnConfig()

# Status codes of cpp/include/proxyattn.h.
SUCCESS, INVALID, NOT_COMPILED, WS_SMALL, MISALIGNED, NO_DRIVER = 0, 1, 2, 3, 4, 5
BF16, FP16 = 1, 0


class Config(C.Structure):
    _fields_ = [
        ("block_size", C.c_int32),
        ("stride", C.c_int32),
        ("proxy_heads", C.c_int32),
        ("gamma", C.c_float),
        ("min_budget_tokens", C.c_int32),
        ("keep_sink", C.c_int32),
        ("keep_diagonal", C.c_int32),
        ("dense_below_tokens", C.c_int32),
        ("budget_fraction", C.c_float),
        ("budget_rule", C.c_int32),
        ("recall_rows", C.c_int32),
        ("dense_density", C.c_float),
    ]


class Problem(C.Structure):
    _fields_ = [
        ("dtype", C.c_int),
        ("batch", C.c_int32),
        ("seq_len", C.c_int32),
        ("cu_seqlens", C.c_void_p),
        ("total_tokens", C.c_int32),
        ("num_q_heads", C.c_int32),
        ("num_kv_heads", C.c_int32),
        ("head_dim", C.c_int32),
        ("scale", C.c_float),
        ("layout", C.c_int),
    ]


def load_lib(build: Path, name: str = "libproxyattn.so"):
    """libproxyattn (file `name`) of a build directory, with the argument and result types of its API."""
    lib = C.CDLL(str(build / name))
    lib.proxyattn_last_error.restype = C.c_char_p
    lib.proxyattn_status_name.restype = C.c_char_p
    lib.proxyattn_version.restype = C.c_char_p
    lib.proxyattn_workspace_size.argtypes = [C.POINTER(Problem), C.POINTER(Config), C.POINTER(C.c_size_t)]
    lib.proxyattn_prefill.argtypes = [C.POINTER(Problem), C.POINTER(Config)] + [C.c_void_p] * 6 + [C.c_size_t, C.c_void_p]
    lib.proxyattn_plan.argtypes = [C.POINTER(Problem), C.POINTER(Config)] + [C.c_void_p] * 6 + [C.c_size_t, C.c_void_p]
    return lib


def load_host(build: Path):
    """libproxyattn_host.so (cpp/tests/host_api.cpp): the CUDA C helpers' bodies and the plugin logic on the CPU."""
    h = C.CDLL(str(build / "libproxyattn_host.so"))
    h.pa_host_npy_load_f32.restype = C.c_longlong
    h.pa_host_budgets.argtypes = [C.c_void_p] * 3 + [C.c_int] * 6 + [C.c_float, C.c_double, C.c_int, C.c_void_p] + [C.c_int] * 4
    h.pa_host_select.argtypes = [C.c_void_p] * 5 + [C.c_int] * 10
    h.pa_host_combine_lse.argtypes = [C.c_void_p] * 3 + [C.c_int] * 3
    h.pa_host_early_dense.argtypes = [C.c_void_p] * 3 + [C.c_int] * 6
    h.pa_host_needs_budgets.argtypes = [C.c_void_p] * 3 + [C.c_int] * 8
    h.pa_host_dense_fallback.argtypes = [C.c_void_p] * 3 + [C.c_int] * 7
    return h


def is_quick_build(build: Path) -> bool:
    """Whether `build` was configured with -DPROXYATTN_QUICK=ON (one kernel variant: bf16, D=128, block 128)."""
    cache = build / "CMakeCache.txt"
    return cache.exists() and any(
        line.split("=", 1)[-1].strip().upper() in ("ON", "1", "TRUE", "YES")
        for line in cache.read_text().splitlines()
        if line.startswith("PROXYATTN_QUICK:")
    )


def default_config(lib) -> Config:
    c = Config()
    lib.proxyattn_config_default(C.byref(c))
    return c


def problem(b=1, s=4096, hq=8, hkv=2, d=128, dtype=BF16, cu=None, total=0, layout=0) -> Problem:
    return Problem(dtype, b, s, cu, total, hq, hkv, d, 0.0, layout)


def ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def prefill(lib, prob, cfg, q=256, k=256, v=256, out=256, ws=256, ws_bytes=1 << 40):
    """proxyattn_prefill with fake (aligned, never dereferenced) pointers: for argument checks only."""
    return lib.proxyattn_prefill(C.byref(prob), C.byref(cfg), q, k, v, out, None, ws, ws_bytes, None)
