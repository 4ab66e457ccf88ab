"""libproxyattn (cpp/): configure and build with cmake + nvcc + gcc on this machine (no GPU), then the host-side
checks: the C API's validation and error reporting, the CUDA C helper kernels' bodies run on the CPU against the
PyTorch code they replace on the GPU path, the .npy codec of the example program, and what the library links.

The GPU comparison with the PyTorch path is tests/gpu/check_cpp.py (run on the H200 through the device tool).
"""

from __future__ import annotations

import ctypes as C
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.models import engine_config
from proxyattn import ProxyAttnConfig
from proxyattn.plan import compact_plan

# The config libproxyattn and its TensorRT plugin are built and used with (engines.models.engine_config): Python's
# defaults except the budget rule (the library implements rules 0-2; Python's default, rule 3, runs in the Python /
# Triton path only) and the dense fallback, off (dense_density=None: the library implements none).
LIB_DEFAULT = engine_config()

REPO = Path(__file__).resolve().parents[1]
CPP = REPO / "cpp"

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or not (shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists()),
    reason="cmake and nvcc are needed to build libproxyattn",
)

# Status codes of cpp/include/proxyattn.h.
SUCCESS, INVALID, NOT_COMPILED, WS_SMALL, MISALIGNED, NO_DRIVER = 0, 1, 2, 3, 4, 5
BF16, FP16 = 1, 0


class Config(C.Structure):
    _fields_ = [("block_size", C.c_int32), ("stride", C.c_int32), ("proxy_heads", C.c_int32), ("gamma", C.c_float),
                ("min_budget_tokens", C.c_int32), ("keep_sink", C.c_int32), ("keep_diagonal", C.c_int32),
                ("dense_below_tokens", C.c_int32), ("budget_fraction", C.c_float), ("budget_rule", C.c_int32)]


class Problem(C.Structure):
    _fields_ = [("dtype", C.c_int), ("batch", C.c_int32), ("seq_len", C.c_int32), ("cu_seqlens", C.c_void_p),
                ("total_tokens", C.c_int32), ("num_q_heads", C.c_int32), ("num_kv_heads", C.c_int32),
                ("head_dim", C.c_int32), ("scale", C.c_float), ("layout", C.c_int)]


def cpp_build_dir(tmp_path_factory) -> Path:
    """Where the session's libproxyattn build lives: PROXYATTN_CPP_BUILD if set (local iteration, or ctest's
    pytest_host test pointing at its own build directory), else one fixed directory under the session's temporary
    root, so that every test module of a session (this one, tests/test_ctest.py) shares one build."""
    if os.environ.get("PROXYATTN_CPP_BUILD"):
        return Path(os.environ["PROXYATTN_CPP_BUILD"])
    return tmp_path_factory.getbasetemp() / "cpp_build"


def build_cpp(out: Path) -> Path:
    """Configure and build cpp/ into `out` (every kernel variant unless the directory was configured with
    PROXYATTN_QUICK); incremental, so a second call in the same session costs a configure and a no-op build."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO)
    subprocess.run(["cmake", "-S", str(CPP), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(out), "-j", "2"], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


def is_quick_build(build: Path) -> bool:
    """Whether `build` was configured with -DPROXYATTN_QUICK=ON (one kernel variant: bf16, D=128, block 128)."""
    cache = build / "CMakeCache.txt"
    return cache.exists() and any(line.split("=", 1)[-1].strip().upper() in ("ON", "1", "TRUE", "YES")
                                  for line in cache.read_text().splitlines() if line.startswith("PROXYATTN_QUICK:"))


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """Full build (every kernel variant), as CI does it, shared by the session (`cpp_build_dir`)."""
    return build_cpp(cpp_build_dir(tmp_path_factory))


def _lib(build: Path):
    lib = C.CDLL(str(build / "libproxyattn.so"))
    lib.proxyattn_last_error.restype = C.c_char_p
    lib.proxyattn_status_name.restype = C.c_char_p
    lib.proxyattn_version.restype = C.c_char_p
    lib.proxyattn_workspace_size.argtypes = [C.POINTER(Problem), C.POINTER(Config), C.POINTER(C.c_size_t)]
    lib.proxyattn_prefill.argtypes = [C.POINTER(Problem), C.POINTER(Config)] + [C.c_void_p] * 6 + [C.c_size_t, C.c_void_p]
    lib.proxyattn_plan.argtypes = [C.POINTER(Problem), C.POINTER(Config)] + [C.c_void_p] * 6 + [C.c_size_t, C.c_void_p]
    return lib


@pytest.fixture(scope="module")
def lib(build):
    return _lib(build)


@pytest.fixture(scope="module")
def host(build):
    h = C.CDLL(str(build / "libproxyattn_host.so"))
    h.pa_host_npy_load_f32.restype = C.c_longlong
    h.pa_host_budgets.argtypes = [C.c_void_p] * 3 + [C.c_int] * 6 + [C.c_float, C.c_double, C.c_int, C.c_void_p] + [C.c_int] * 4
    h.pa_host_select.argtypes = [C.c_void_p] * 5 + [C.c_int] * 10
    h.pa_host_combine_lse.argtypes = [C.c_void_p] * 3 + [C.c_int] * 3
    return h


def _default_config(lib) -> Config:
    c = Config()
    lib.proxyattn_config_default(C.byref(c))
    return c


def _problem(b=1, s=4096, hq=8, hkv=2, d=128, dtype=BF16, cu=None, total=0, layout=0) -> Problem:
    return Problem(dtype, b, s, cu, total, hq, hkv, d, 0.0, layout)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


# ----------------------------------------------------------------------------------------------- build
def test_build_compiles_every_variant(build, lib):
    manifest = json.loads((build / "generated" / "manifest.json").read_text())
    keys = {k["key"] for k in manifest["kernels"]}
    by_key = {k["key"]: k for k in manifest["kernels"]}
    quick = is_quick_build(build)  # ctest's pytest_host on a PROXYATTN_QUICK build: its one variant, and only it
    if quick:
        assert lib.proxyattn_is_compiled(FP16, 128, 128) == 0 and lib.proxyattn_is_compiled(BF16, 64, 128) == 0
    for dt in ("bf16",) if quick else ("bf16", "fp16"):
        for d in (128,) if quick else (64, 128, 256):
            for bs in (128,) if quick else (64, 128):
                for varlen in (0, 1):
                    assert f"attn/{dt}/d{d}/bs{bs}/varlen{varlen}" in keys
                    for p in ("0", "1", "1rows"):  # pass 1 with ROWS: budget_rule 2
                        assert f"budget/{dt}/d{d}/bs{bs}/varlen{varlen}/pass{p}" in keys
                        rows = by_key[f"budget/{dt}/d{d}/bs{bs}/varlen{varlen}/pass{p}"]["constexprs"]["ROWS"]
                        assert rows == (p == "1rows")
                assert lib.proxyattn_is_compiled(BF16 if dt == "bf16" else FP16, d, bs) == 1
    assert lib.proxyattn_is_compiled(BF16, 96, 128) == 0
    for k in manifest["kernels"]:
        assert k["shared"] <= 227 * 1024, k["key"]  # fits an sm_90 block
        assert k["num_params"] == len(k["params"]) + 2  # Triton 3.6: two hidden scratch pointers
    assert manifest["triton"] == "3.6.0"
    assert b"triton 3.6.0" in lib.proxyattn_version()


def test_library_links_no_cuda_and_exports_only_the_api(build):
    so = build / "libproxyattn.so"
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "libcuda" not in needed and "libcudart" not in needed
    syms = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    exported = sorted(line.split()[-1] for line in syms.splitlines() if " T " in line)
    assert exported == sorted([
        "proxyattn_config_default", "proxyattn_config_validate", "proxyattn_workspace_size", "proxyattn_prefill",
        "proxyattn_plan", "proxyattn_is_compiled", "proxyattn_status_name", "proxyattn_last_error", "proxyattn_version",
    ])


# ----------------------------------------------------------------------------------------------- config
def test_config_defaults_match_python(lib):
    c = _default_config(lib)
    attrs = LIB_DEFAULT.to_attrs()
    assert c.block_size == attrs["pa_block_size"] and c.stride == attrs["pa_stride"]
    assert c.proxy_heads == attrs["pa_proxy_heads"] and c.min_budget_tokens == attrs["pa_min_budget_tokens"]
    assert c.gamma == pytest.approx(attrs["pa_gamma"]) and c.budget_fraction == attrs["pa_budget_fraction"] == 0.0
    assert c.keep_sink == attrs["pa_keep_sink"] and c.keep_diagonal == attrs["pa_keep_diagonal"]
    assert c.dense_below_tokens == -1  # None: resolved by the library as ProxyAttnConfig resolves it (test below)
    assert c.budget_rule == attrs["pa_budget_rule"] == 2  # "row_recall"
    assert attrs["pa_dense_density"] == 0.0  # no dense fallback (None travels as 0.0): the library implements none
    engine_only = ("pa_budget_rule", "pa_recall_rows", "pa_dense_density")
    assert {k: v for k, v in ProxyAttnConfig().to_attrs().items() if k not in engine_only} == \
        {k: v for k, v in attrs.items() if k not in engine_only}
    assert lib.proxyattn_config_validate(C.byref(c)) == SUCCESS
    assert lib.proxyattn_last_error() == b""


@pytest.mark.parametrize("field,value,needle", [
    ("block_size", 96, b"block_size=96"), ("stride", 3, b"stride=3"), ("stride", 0, b"stride=0"),
    ("proxy_heads", 0, b"proxy_heads=0"), ("gamma", 0.0, b"gamma=0"), ("gamma", 1.5, b"gamma=1.5"),
    ("min_budget_tokens", -1, b"min_budget_tokens=-1"), ("keep_sink", 2, b"keep_sink=2"),
    ("keep_diagonal", -1, b"keep_diagonal=-1"), ("dense_below_tokens", -2, b"dense_below_tokens=-2"),
    ("budget_fraction", 1.5, b"budget_fraction=1.5"), ("budget_fraction", -0.5, b"budget_fraction=-0.5"),
    ("budget_rule", 3, b"budget_rule=3 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall)"),
    ("budget_rule", -1, b"budget_rule=-1"),
])
def test_config_errors_name_the_value(lib, field, value, needle):
    c = _default_config(lib)
    setattr(c, field, value)
    assert lib.proxyattn_config_validate(C.byref(c)) == INVALID
    assert needle in lib.proxyattn_last_error()
    assert lib.proxyattn_status_name(INVALID) == b"PROXYATTN_ERROR_INVALID_VALUE"


def test_config_accepts_every_python_budget_rule_but_block_recall(lib):
    from proxyattn.config import BUDGET_RULES

    for rule in BUDGET_RULES:
        c = _default_config(lib)
        c.budget_rule = rule
        if BUDGET_RULES[rule] == "block_recall":  # Python / Triton only: refused by name
            assert lib.proxyattn_config_validate(C.byref(c)) == INVALID
            assert b"(3, block_recall, runs in the Python / Triton path only)" in lib.proxyattn_last_error()
        else:
            assert lib.proxyattn_config_validate(C.byref(c)) == SUCCESS, lib.proxyattn_last_error()


# ----------------------------------------------------------------------------------------------- workspace
@pytest.mark.parametrize("changes,needle", [
    (dict(d=96), b"head_dim=96"), (dict(hq=6, hkv=4), b"Hq=6"), (dict(s=0), b"seq_len=0"),
    (dict(b=0), b"batch=0"), (dict(dtype=7), b"dtype=7"), (dict(s=8192 * 128 + 1), b"blocks"),
    (dict(cu=16, total=-1), b"total_tokens=-1"), (dict(cu=16, b=2, s=100, total=201), b"total_tokens=201"),
    (dict(layout=2), b"layout=2"), (dict(layout=1, cu=16, total=10), b"BHSD needs the padded batch"),
])
def test_workspace_size_rejects_bad_problems(lib, changes, needle):
    n = C.c_size_t(0)
    cfg = _default_config(lib)
    assert lib.proxyattn_workspace_size(C.byref(_problem(**changes)), C.byref(cfg), C.byref(n)) == INVALID
    assert needle in lib.proxyattn_last_error()


def test_workspace_size_rejects_proxy_heads_not_dividing_hkv(lib):
    cfg = _default_config(lib)
    cfg.proxy_heads = 3
    n = C.c_size_t(0)
    assert lib.proxyattn_workspace_size(C.byref(_problem(hq=8, hkv=4)), C.byref(cfg), C.byref(n)) == INVALID
    assert b"proxy_heads=3" in lib.proxyattn_last_error() and b"Hkv=4" in lib.proxyattn_last_error()


def _ws(lib, prob, cfg) -> int:
    n = C.c_size_t(0)
    assert lib.proxyattn_workspace_size(C.byref(prob), C.byref(cfg), C.byref(n)) == SUCCESS, lib.proxyattn_last_error()
    return n.value


def test_workspace_size_covers_the_plan_and_scales(lib):
    cfg = _default_config(lib)
    b, s, hq, hkv = 2, 10_000, 8, 2
    nb = math.ceil(s / cfg.block_size)
    ws = _ws(lib, _problem(b=b, s=s, hq=hq, hkv=hkv), cfg)
    plan_bytes = b * nb * nb * 4 + b * hq * nb * 4  # order + counts
    assert ws >= plan_bytes + 2 * b * nb * nb * 4 // 2  # plus the scores map
    assert _ws(lib, _problem(b=b, s=2 * s, hq=hq, hkv=hkv), cfg) > ws
    frac = _default_config(lib)
    frac.budget_fraction = 0.25  # no attention-mass scratch
    assert _ws(lib, _problem(b=b, s=s, hq=hq, hkv=hkv), frac) < ws
    # A padded batch at or below dense_below_tokens needs no estimation scratch.
    crossover = ProxyAttnConfig().dense_below_tokens
    dense, sparse = (_ws(lib, _problem(b=b, s=n, hq=hq, hkv=hkv), cfg) for n in (crossover, crossover + 1))
    assert dense < sparse / 2
    assert _ws(lib, _problem(b=b, s=s, hq=hq, hkv=hkv, layout=1), cfg) == ws  # the layout changes strides only


# ----------------------------------------------------------------------------------------------- prefill errors
def _prefill(lib, prob, cfg, q=256, k=256, v=256, out=256, ws=256, ws_bytes=1 << 40):
    return lib.proxyattn_prefill(C.byref(prob), C.byref(cfg), q, k, v, out, None, ws, ws_bytes, None)


def test_prefill_checks_arguments_before_touching_the_gpu(lib):
    cfg = _default_config(lib)
    prob = _problem()
    assert _prefill(lib, prob, cfg, q=None) == INVALID and b"q is NULL" in lib.proxyattn_last_error()
    assert _prefill(lib, prob, cfg, v=264) == MISALIGNED and b"v is not 16-byte aligned" in lib.proxyattn_last_error()
    assert _prefill(lib, prob, cfg, ws_bytes=10) == WS_SMALL and b"workspace_bytes=10" in lib.proxyattn_last_error()
    cfg.stride = 8  # valid, but only stride 4 is compiled
    prob = _problem(s=9000)  # above the dense crossover: the estimation kernels are needed
    assert _prefill(lib, prob, cfg) == NOT_COMPILED and b"stride=8" in lib.proxyattn_last_error()


def test_prefill_without_a_driver_reports_it(build):
    code = f"""
import ctypes as C, sys
sys.path.insert(0, {str(REPO)!r})
from tests.test_cpp import _lib, _problem, _default_config, _prefill
lib = _lib(__import__('pathlib').Path({str(build)!r}))
st = _prefill(lib, _problem(), _default_config(lib))
print(st, lib.proxyattn_last_error().decode())
"""
    env = dict(os.environ, PROXYATTN_LIBCUDA="/nonexistent/libcuda.so.1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    status, msg = r.stdout.strip().split(" ", 1)
    assert int(status) == NO_DRIVER and "/nonexistent/libcuda.so.1" in msg


# ----------------------------------------------------------------------------------------------- helpers on the CPU
def _host_select(host, scores, budgets, cfg: ProxyAttnConfig, seq_len, cu=None, dense_below=-1):
    b, r, nb, _ = scores.shape
    hq = budgets.shape[1]
    order = np.full((b, r, nb, nb), -7, dtype=np.int32)
    counts = np.full((b, hq, nb), -7, dtype=np.int32)
    sc = np.ascontiguousarray(scores, dtype=np.float32)
    bu = np.ascontiguousarray(budgets, dtype=np.int32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    host.pa_host_select(C.c_void_p(_ptr(sc)), C.c_void_p(_ptr(bu)), C.c_void_p(_ptr(order)), C.c_void_p(_ptr(counts)),
                        None if cu_arr is None else C.c_void_p(_ptr(cu_arr)), b, r, seq_len, cfg.block_size, nb, hq,
                        cfg.min_budget_blocks, int(cfg.keep_sink), int(cfg.keep_diagonal), dense_below)
    return order, counts


def _random_scores(b, r, nb, gen, ties: bool):
    s = torch.rand(b, r, nb, nb, generator=gen)
    if ties:
        s = (s * 4).floor() / 4  # only 4 distinct values: many ties, broken by the lower index
    return s.masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), float("-inf"))


@pytest.mark.parametrize("nb,r,hq,sink,diag,min_tokens,ties", [
    (1, 1, 4, True, True, 0, False), (7, 1, 4, True, True, 128, True), (13, 2, 8, True, False, 0, True),
    (13, 2, 8, False, True, 256, False), (9, 4, 4, False, False, 0, True), (33, 1, 7, True, True, 512, True),
])
def test_select_equals_compact_plan(host, nb, r, hq, sink, diag, min_tokens, ties):
    gen = torch.Generator().manual_seed(nb * 31 + r)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=min_tokens, keep_sink=sink, keep_diagonal=diag,
                          dense_below_tokens=0)
    seq_len = nb * 64 - 5  # last block partial
    b = 2
    scores = _random_scores(b, r, nb, gen, ties)
    budgets = torch.randint(1, nb + 1, (b, hq), generator=gen, dtype=torch.int32)
    want = compact_plan(scores, budgets, seq_len, cfg)
    order, counts = _host_select(host, scores.numpy(), budgets.numpy(), cfg, seq_len)
    np.testing.assert_array_equal(counts, want.counts.numpy())
    np.testing.assert_array_equal(order, want.order.numpy())


def test_select_varlen_plans_each_sequence_alone(host):
    gen = torch.Generator().manual_seed(5)
    cfg = ProxyAttnConfig(block_size=64, min_budget_tokens=128, dense_below_tokens=300)
    lengths = [700, 64, 290, 1000]  # 290 <= dense_below: keep-everything plan
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / 64)
    b, r, hq = len(lengths), 2, 4
    scores = _random_scores(b, r, nb_max, gen, ties=True)
    budgets = torch.randint(1, nb_max + 1, (b, hq), generator=gen, dtype=torch.int32)
    order, counts = _host_select(host, scores.numpy(), budgets.numpy(), cfg, max_len, cu=cu, dense_below=300)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 64)
        if n <= 300:
            np.testing.assert_array_equal(counts[i, :, :nb], np.broadcast_to(np.arange(1, nb + 1), (hq, nb)))
            np.testing.assert_array_equal(order[i, :, :nb], np.broadcast_to(np.arange(nb_max), (r, nb, nb_max)))
        else:
            bud = budgets[i : i + 1].clamp(max=nb)
            want = compact_plan(scores[i : i + 1, :, :nb, :nb].contiguous(), bud, n, cfg)
            np.testing.assert_array_equal(counts[i, :, :nb], want.counts[0].numpy())
            np.testing.assert_array_equal(order[i, :, :nb, :nb], want.order[0].numpy())
        assert (counts[i, :, nb:] == -7).all() and (order[i, :, nb:] == -7).all()  # rows past the end untouched


def _host_budgets(host, mass, seq_len, block_size, gamma, fraction=0.0, cu=None, dense_below=-1, scores=None, rule=0,
                  sink=True, diag=True):
    """pa_budgets on the CPU; rules 1 ("recall") and 2 ("row_recall") read `scores` [B, R, Nb, Nb]; rule 2 reads
    the mass of every row, `[B, Hq, block_size, Nb]`."""
    if rule == 2:
        b, hq, rows, nb = mass.shape
        assert rows == block_size
    else:
        b, hq, nb = mass.shape
    out = np.full((b, hq), -7, dtype=np.int32)
    m = np.ascontiguousarray(mass, dtype=np.float32)
    cu_arr = None if cu is None else np.ascontiguousarray(cu, dtype=np.int32)
    sc = None if scores is None else np.ascontiguousarray(scores, dtype=np.float32)
    assert sc is None or sc.shape[0] == b and sc.shape[2:] == (nb, nb) and hq % sc.shape[1] == 0
    host.pa_host_budgets(_ptr(m), _ptr(out), None if cu_arr is None else _ptr(cu_arr), b, hq, seq_len, block_size, nb,
                         1, gamma, fraction, dense_below, None if sc is None else _ptr(sc),
                         1 if sc is None else sc.shape[1], rule, int(sink), int(diag))
    return out


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.95, 0.999, 1.0])
def test_budgets_equal_the_torch_ops_of_the_gpu_path(host, gamma):
    from proxyattn.kernels.estimate_budgets import _budgets_from_mass

    gen = torch.Generator().manual_seed(int(gamma * 1000))
    b, hq, nb = 3, 5, 40
    logits = torch.randn(b, hq, nb, generator=gen) * 3
    mass = torch.softmax(logits, dim=-1)
    mass[0, 0] = 1.0 / nb  # all equal: ties
    got = _host_budgets(host, mass.numpy(), nb * 128, 128, gamma)
    if gamma >= 1.0:
        want = torch.full((b, hq), nb, dtype=torch.int32)
    else:
        want = _budgets_from_mass(mass, gamma, torch.full((1, 1), nb, dtype=torch.int64))
    np.testing.assert_array_equal(got, want.numpy())


def test_budgets_fraction_and_dense_and_varlen(host):
    from proxyattn import reference

    lengths = [130, 1000, 5000]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    nb_max = math.ceil(5000 / 128)
    mass = np.zeros((3, 2, nb_max), np.float32)
    for frac in (0.01, 0.3, 0.77, 1.0):
        got = _host_budgets(host, mass, 5000, 128, 0.9, fraction=frac, cu=cu, dense_below=0)
        for i, n in enumerate(lengths):
            nb = math.ceil(n / 128)
            want = reference.fraction_budgets(1, 2, nb, frac, "cpu")
            np.testing.assert_array_equal(got[i], want[0].numpy())
    got = _host_budgets(host, mass, 5000, 128, 0.9, cu=cu, dense_below=1000)
    assert got[0].tolist() == [2, 2] and got[1].tolist() == [8, 8]  # dense sequences keep every block
    gen = torch.Generator().manual_seed(0)
    mass = torch.zeros(3, 2, nb_max)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 128)
        mass[i, :, :nb] = torch.softmax(torch.randn(2, nb, generator=gen) * 2, dim=-1)
    got = _host_budgets(host, mass.numpy(), 5000, 128, 0.9, cu=cu, dense_below=0)
    for i, n in enumerate(lengths):
        nb = math.ceil(n / 128)
        cum = mass[i, :, :nb].sort(dim=-1, descending=True).values.cumsum(-1)
        np.testing.assert_array_equal(got[i], ((cum < 0.9).sum(-1) + 1).clamp(max=nb).numpy())


def _recall_inputs(b, s, hq, hkv, r, block_size, gen, d=16):
    """Structured q, k `[B, S, H, D]`, their proxy scores `[B, R, Nb, Nb]` and last-block mass `[B, Hq, Nb]` from the
    fp32 reference, and the scale. Every query head attends mostly to 3 "hot" keys of its own (a direction u_h in q and
    in those keys), so budgets lie well below Nb and the heads of one ranking look at different blocks: the shared
    ranking of the last query block then misses some of a head's mass (rule 1 > rule 0)."""
    from proxyattn import reference

    q = torch.randn(b, s, hq, d, generator=gen) * 0.5
    k = torch.randn(b, s, hkv, d, generator=gen) * 0.5
    u = torch.nn.functional.normalize(torch.randn(b, hq, d, generator=gen), dim=-1) * 6
    for bi in range(b):
        for h in range(hq):
            q[bi, :, h] += u[bi, h]
            hot = torch.randint(0, s, (3,), generator=gen)
            k[bi, hot, h // (hq // hkv)] += u[bi, h]
    scale = 1.0 / math.sqrt(d)
    scores = reference.proxy_scores(q, k, proxy_heads=r, block_size=block_size, stride=4, scale=scale)
    mass = reference.last_block_mass(q, k, block_size=block_size, scale=scale)
    return q, k, scale, scores, mass


def _reference_recall(q, k, scores, cfg: ProxyAttnConfig, scale):
    from proxyattn import reference

    order = reference.last_row_order(scores, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal)
    return reference.head_budgets(q, k, block_size=cfg.block_size, gamma=cfg.gamma, scale=scale, last_order=order)


@pytest.mark.parametrize("nb,r,hq,hkv,sink,diag,ties,gamma", [
    (1, 1, 4, 2, True, True, False, 0.9), (2, 1, 4, 2, True, True, True, 0.5), (9, 1, 4, 2, True, True, False, 0.95),
    (13, 2, 8, 2, True, False, True, 0.9), (13, 2, 8, 4, False, True, False, 0.8), (11, 4, 4, 4, False, False, True, 0.7),
    (24, 1, 7, 7, True, True, True, 0.999), (17, 2, 6, 2, True, True, False, 0.3),
])
def test_recall_budgets_equal_the_reference(host, nb, r, hq, hkv, sink, diag, ties, gamma):
    """budget_rule 1 of pa_budgets == reference.head_budgets(last_order=last_row_order(scores)) and the GPU path's
    torch ops (estimate_budgets._recall_budgets), on the reference's scores and on tie-heavy random scores."""
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(nb * 131 + r * 7 + hq)
    bs, b = 64, 2
    s = nb * bs - 5 if nb > 1 else 40  # last block partial
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, keep_sink=sink, keep_diagonal=diag, proxy_heads=r,
                          budget_rule=1, dense_below_tokens=0)
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    score_sets = [scores]
    if ties:
        score_sets.append(_random_scores(b, r, nb, gen, ties=True))  # forced and free blocks tied with others
    for sc in score_sets:
        want = _reference_recall(q, k, sc, cfg, scale)
        got = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=sc.numpy(), rule=1, sink=sink, diag=diag,
                            dense_below=0)
        np.testing.assert_array_equal(got, want.numpy())
        torch_ops = _recall_budgets(mass, sc, cfg, torch.full((b,), nb, dtype=torch.int64))
        np.testing.assert_array_equal(got, torch_ops.numpy())
    # Rule 0 on the same mass is still the sorted-mass rule (scores unread: NULL).
    rule0 = _host_budgets(host, mass.numpy(), s, bs, gamma, dense_below=0)
    from proxyattn import reference

    want0 = reference.head_budgets(q, k, block_size=bs, gamma=gamma, scale=scale)
    np.testing.assert_array_equal(rule0, want0.numpy())


def test_recall_budgets_differ_from_the_mass_rule(host):
    """A head whose mass sits where the shared ranking does not look: rule 1 needs more blocks than rule 0."""
    nb, hq = 8, 2
    scores = torch.full((1, 1, nb, nb), float("-inf"))
    scores[0, 0] = torch.tril(torch.ones(nb, nb)) * 0.01
    scores[0, 0, nb - 1, :nb] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    mass = torch.zeros(1, hq, nb)
    mass[0, 0] = torch.tensor([0.04, 0.86, 0.05, 0.0, 0.0, 0.0, 0.0, 0.05])  # follows the ranking
    mass[0, 1] = torch.tensor([0.05, 0.0, 0.0, 0.0, 0.0, 0.0, 0.85, 0.1])  # attends where the ranking looks last
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    # ranking: 7 (diagonal, 0.3) and 0 (sink, 0.1) first, then 1, 2, 3, 4, 5, 6
    assert got.tolist() == [[3, 8]]
    assert _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, dense_below=0).tolist() == [[2, 2]]
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, sink=False, diag=False,
                        dense_below=0)
    assert got.tolist() == [[2, 7]]  # ranking 1, 2, 3, 4, 5, 6, 7, 0
    # Sink and diagonal tied: the lower index (the sink) ranks first, so the diagonal's mass counts second.
    scores[0, 0, nb - 1, nb - 1] = scores[0, 0, nb - 1, 0]
    mass[0, 1] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.05, 0.95])
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got.tolist() == [[3, 2]]
    scores[0, 0, nb - 1, nb - 1] = float(np.nextafter(np.float32(0.1), np.float32(1)))  # now above the sink: first
    got = _host_budgets(host, mass.numpy(), nb * 64, 64, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got.tolist() == [[3, 1]]


def _reference_row_recall(q, k, scores, cfg: ProxyAttnConfig, scale):
    from proxyattn import reference

    order = reference.last_row_order(scores, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal)
    return reference.head_budgets(q, k, block_size=cfg.block_size, gamma=cfg.gamma, scale=scale, last_order=order,
                                  per_row=True)


@pytest.mark.parametrize("nb,r,hq,hkv,sink,diag,ties,gamma", [
    (1, 1, 4, 2, True, True, False, 0.9), (2, 1, 4, 2, True, True, True, 0.5), (9, 1, 4, 2, True, True, False, 0.95),
    (13, 2, 8, 2, True, False, True, 0.9), (11, 4, 4, 4, False, False, True, 0.7), (24, 1, 7, 7, True, True, True, 0.999),
])
def test_row_recall_budgets_equal_the_reference(host, nb, r, hq, hkv, sink, diag, ties, gamma):
    """budget_rule 2 of pa_budgets (mass of every row of the last query block) == reference.head_budgets(per_row=True)
    and the GPU path's torch ops (estimate_budgets._recall_budgets on [B, Hq, rows, Nb]); never below rule 1."""
    from proxyattn import reference
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(nb * 17 + r * 3 + hq)
    bs, b = 64, 2
    s = nb * bs - 5 if nb > 1 else 40  # last block partial; nb = 1: fewer rows than the block, the rest hold no mass
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, keep_sink=sink, keep_diagonal=diag, proxy_heads=r,
                          budget_rule=2, dense_below_tokens=0)
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    rows = torch.zeros(b, hq, bs, nb)
    ref_rows = reference.last_block_row_mass(q, k, block_size=bs, scale=scale)  # [B, Hq, min(S, bs), Nb]
    rows[:, :, : ref_rows.shape[2]] = ref_rows
    score_sets = [scores] + ([_random_scores(b, r, nb, gen, ties=True)] if ties else [])
    for sc in score_sets:
        want = _reference_row_recall(q, k, sc, cfg, scale)
        got = _host_budgets(host, rows.numpy(), s, bs, gamma, scores=sc.numpy(), rule=2, sink=sink, diag=diag,
                            dense_below=0)
        np.testing.assert_array_equal(got, want.numpy())
        np.testing.assert_array_equal(got, _recall_budgets(rows, sc, cfg, torch.full((b,), nb, dtype=torch.int64)).numpy())
        rule1 = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=sc.numpy(), rule=1, sink=sink, diag=diag,
                              dense_below=0)
        assert (got >= rule1).all()


def test_row_recall_keeps_a_row_the_mean_hides(host):
    """One row of the last block attends where the ranking looks last: its mass is diluted in the mean (rule 1
    stops early), rule 2 extends the prefix to that row's block."""
    nb, bs = 8, 64
    scores = torch.full((1, 1, nb, nb), float("-inf"))
    scores[0, 0] = torch.tril(torch.ones(nb, nb)) * 0.01
    scores[0, 0, nb - 1, :nb] = torch.tensor([0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])  # ranking 7, 0, 1, 2, ..., 6
    rows = torch.zeros(1, 1, bs, nb)
    rows[0, 0, :, 1] = 1.0  # every row on block 1 ...
    rows[0, 0, 5] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # ... but row 5 on block 6 (last ranked)
    got = _host_budgets(host, rows.numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=2, dense_below=0)
    assert got.tolist() == [[8]]
    got1 = _host_budgets(host, rows.mean(dim=2).numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=1, dense_below=0)
    assert got1.tolist() == [[3]]
    rows[0, 0, 5] = 0.0  # a row without mass (past a sequence's end) needs nothing
    got = _host_budgets(host, rows.numpy(), nb * bs, bs, 0.9, scores=scores.numpy(), rule=2, dense_below=0)
    assert got.tolist() == [[3]]


def test_row_recall_budgets_of_packed_sequences(host):
    """Packed batch, rule 2: each sequence reads its own rows and blocks; garbage past each end is never read;
    a sequence shorter than one block has rows without mass; dense sequences keep every block."""
    from proxyattn import reference

    gen = torch.Generator().manual_seed(5)
    bs, r, hq, hkv, gamma, dense_below = 64, 2, 4, 2, 0.85, 30
    lengths = [700, 40, 290, 90, 1]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / bs)
    b = len(lengths)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, proxy_heads=r, budget_rule=2, dense_below_tokens=dense_below)
    scores = torch.rand(b, r, nb_max, nb_max, generator=gen) + 5.0  # garbage beyond each sequence: never read
    rows = torch.full((b, hq, bs, nb_max), 0.75)
    want = []
    for i, n in enumerate(lengths):
        nb = math.ceil(n / bs)
        q, k, scale, sc, _ = _recall_inputs(1, n, hq, hkv, r, bs, gen)
        scores[i, :, :nb, :nb] = sc[0]
        rm = reference.last_block_row_mass(q, k, block_size=bs, scale=scale)
        rows[i, :, :, :nb] = 0.0
        rows[i, :, : rm.shape[2], :nb] = rm[0]
        want.append([nb] * hq if n <= dense_below else _reference_row_recall(q, k, sc, cfg, scale)[0].tolist())
    got = _host_budgets(host, rows.numpy(), max_len, bs, gamma, cu=cu, dense_below=dense_below, scores=scores.numpy(),
                        rule=2)
    assert got.tolist() == want
    assert want[2] != [math.ceil(290 / bs)] * hq  # the sparse short sequence drops blocks


@pytest.mark.parametrize("r,hq,hkv,sink,diag,gamma,min_tokens", [
    (1, 4, 2, True, True, 0.9, 128), (2, 8, 4, True, False, 0.95, 0), (2, 4, 2, False, True, 0.6, 256),
    (1, 4, 4, False, False, 0.8, 0),
])
def test_recall_plan_equals_plan_blocks(host, r, hq, hkv, sink, diag, gamma, min_tokens):
    """The C helpers' plan with budget_rule 1 (pa_budgets then pa_select) == api.plan_blocks on the CPU."""
    from proxyattn import api

    gen = torch.Generator().manual_seed(hq * 10 + r)
    bs, b, nb = 64, 2, 15
    s = nb * bs - 17
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, keep_sink=sink, keep_diagonal=diag, proxy_heads=r,
                          min_budget_tokens=min_tokens, budget_rule=1, dense_below_tokens=0,
                          dense_density=None)  # the C library implements no dense fallback
    q, k, scale, scores, mass = _recall_inputs(b, s, hq, hkv, r, bs, gen)
    want = api.plan_blocks(q, k, cfg, scale=scale)
    assert want.dense_heads is None or not want.dense_heads.any()
    budgets = _host_budgets(host, mass.numpy(), s, bs, gamma, scores=scores.numpy(), rule=1, sink=sink, diag=diag,
                            dense_below=0)
    np.testing.assert_array_equal(budgets, api.head_budgets(q, k, cfg, scale=scale, scores=scores).numpy())
    order, counts = _host_select(host, scores.numpy(), budgets, cfg, s, dense_below=0)
    np.testing.assert_array_equal(counts, want.counts.numpy())
    np.testing.assert_array_equal(order, want.order.numpy())
    # The rule matters here: the mass rule gives other budgets for some head.
    mass_rule = api.head_budgets(q, k, dataclasses.replace(cfg, budget_rule=0), scale=scale)
    assert (torch.from_numpy(budgets) >= mass_rule).all() and (torch.from_numpy(budgets) != mass_rule).any()


@pytest.mark.parametrize("dense_below", [0, 300])
def test_recall_budgets_and_plans_of_packed_sequences(host, dense_below):
    """Packed varlen batch: each sequence's budgets read its own last query block (row Nb_b - 1 of its scores) and
    its own blocks only; garbage past each sequence's end (scores and mass) is never read. Sparse sequences equal
    the reference / plan_blocks on the sequence alone, dense ones (length <= dense_below) keep every block."""
    from proxyattn import api
    from proxyattn.kernels.estimate_budgets import _recall_budgets

    gen = torch.Generator().manual_seed(11 + dense_below)
    bs, r, hq, hkv, gamma = 64, 2, 4, 2, 0.85
    lengths = [700, 64, 290, 1000, 130, 1]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    max_len = max(lengths)
    nb_max = math.ceil(max_len / bs)
    b = len(lengths)
    cfg = ProxyAttnConfig(block_size=bs, gamma=gamma, proxy_heads=r, min_budget_tokens=128, budget_rule=1,
                          dense_below_tokens=dense_below, dense_density=None)  # the C library: no dense fallback
    scores = torch.rand(b, r, nb_max, nb_max, generator=gen) + 5.0  # garbage beyond each sequence: never read
    mass = torch.full((b, hq, nb_max), 0.75)
    per_seq = []
    for i, n in enumerate(lengths):
        nb = math.ceil(n / bs)
        q, k, scale, sc, m = _recall_inputs(1, n, hq, hkv, r, bs, gen)
        scores[i, :, :nb, :nb] = sc[0]
        mass[i, :, :nb] = m[0]
        per_seq.append((q, k, scale, sc, nb))
    got = _host_budgets(host, mass.numpy(), max_len, bs, gamma, cu=cu, dense_below=dense_below,
                        scores=scores.numpy(), rule=1)
    budgets_packed = np.full((b, hq), -7, dtype=np.int32)
    for i, (q, k, scale, sc, nb) in enumerate(per_seq):
        if lengths[i] <= dense_below:
            assert got[i].tolist() == [nb] * hq
        else:
            np.testing.assert_array_equal(got[i], _reference_recall(q, k, sc, cfg, scale)[0].numpy())
        budgets_packed[i] = got[i]
    # The GPU path's torch ops on the packed batch (zero mass past each end) agree on every sparse sequence.
    nb_seq = torch.tensor([math.ceil(n / bs) for n in lengths], dtype=torch.int64)
    packed_mass = torch.where(torch.arange(nb_max) < nb_seq[:, None, None], mass, 0.0)
    torch_ops = _recall_budgets(packed_mass, scores, cfg, nb_seq).numpy()
    sparse = [i for i, n in enumerate(lengths) if n > dense_below]
    np.testing.assert_array_equal(got[sparse], torch_ops[sparse])
    # Plans: the packed selection == plan_blocks of each sparse sequence alone.
    order, counts = _host_select(host, scores.numpy(), budgets_packed, cfg, max_len, cu=cu, dense_below=dense_below)
    for i, (q, k, scale, sc, nb) in enumerate(per_seq):
        if lengths[i] <= dense_below:
            np.testing.assert_array_equal(counts[i, :, :nb], np.broadcast_to(np.arange(1, nb + 1), (hq, nb)))
            continue
        want = api.plan_blocks(q, k, cfg, scale=scale)
        assert want.dense_heads is None or not want.dense_heads.any()
        np.testing.assert_array_equal(counts[i, :, :nb], want.counts[0].numpy())
        np.testing.assert_array_equal(order[i, :, :nb, :nb], want.order[0].numpy())


def test_combine_lse_equals_the_torch_ops_of_the_gpu_path(host):
    gen = torch.Generator().manual_seed(3)
    rows, nchunk, bs = 6, 5, 64
    mstat = torch.randn(rows, nchunk, bs, generator=gen) * 4
    lstat = torch.rand(rows, nchunk, bs, generator=gen) * 10 + 0.5
    mstat[0, :, :3] = -1.0e30  # rows with no visible key in any chunk: l = 0
    lstat[0, :, :3] = 0.0
    lse = np.zeros((rows, bs), np.float32)
    host.pa_host_combine_lse(_ptr(mstat.numpy()), _ptr(lstat.numpy()), _ptr(lse), rows, nchunk, bs)
    # proxyattn/kernels/estimate_budgets.py::_launch_mass, between PASS 0 and PASS 1:
    top = mstat.amax(dim=1, keepdim=True)
    total = (lstat * torch.exp2(mstat - top)).sum(dim=1)
    want = torch.where(total > 0, top.squeeze(1) + torch.log2(total.clamp_min(1e-30)), float("-inf"))
    assert np.isneginf(lse[0, :3]).all()
    np.testing.assert_allclose(lse, want.numpy(), rtol=2e-6, atol=1e-5)


# ----------------------------------------------------------------------------------------------- .npy codec
def test_npy_reads_numpy_files(host, tmp_path):
    gen = np.random.default_rng(0)
    for dt in (np.float32, np.float16, np.int32):
        a = (gen.standard_normal((3, 5, 2)) * 100).astype(dt)
        p = tmp_path / f"a_{np.dtype(dt).name}.npy"
        np.save(p, a)
        buf = np.zeros(a.size, np.float32)
        shape = (C.c_longlong * 8)()
        ndim = C.c_int(0)
        err = C.create_string_buffer(256)
        n = host.pa_host_npy_load_f32(str(p).encode(), C.c_void_p(_ptr(buf)), a.size, shape, C.byref(ndim), err, 256)
        assert n == a.size, err.value
        assert tuple(shape[: ndim.value]) == a.shape
        np.testing.assert_array_equal(buf, a.astype(np.float32).ravel())
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((3, 4), np.float32)))
    err = C.create_string_buffer(256)
    n = host.pa_host_npy_load_f32(str(tmp_path / "f.npy").encode(), C.c_void_p(_ptr(np.zeros(12, np.float32))), 12,
                                  (C.c_longlong * 8)(), C.byref(C.c_int()), err, 256)
    assert n == -1 and b"fortran_order" in err.value


@pytest.mark.parametrize("descr", ["<f4", "<f2", "<u2"])
def test_npy_writes_what_numpy_and_torch_read(host, tmp_path, descr):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 5, generator=gen) * torch.logspace(-7, 5, 5)  # fp16 subnormals (1e-7, 1e-4) to inf (1e5)
    p = tmp_path / "x.npy"
    err = C.create_string_buffer(256)
    shape = (C.c_longlong * 3)(*x.shape)
    assert host.pa_host_npy_save(str(p).encode(), C.c_void_p(_ptr(x.numpy())), shape, 3, descr.encode(), err, 256) == 0
    got = np.load(p)
    assert got.shape == tuple(x.shape) and got.dtype.str == descr
    if descr == "<f4":
        np.testing.assert_array_equal(got, x.numpy())
    elif descr == "<f2":
        np.testing.assert_array_equal(got, x.to(torch.float16).numpy())  # round to nearest even, subnormals too
    else:
        want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got, want)


def test_example_program_reports_errors(build, tmp_path):
    exe = build / "proxyattn_example"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run([str(exe), "--q", str(tmp_path / "missing.npy"), "--k", "a", "--v", "b", "--out", "o"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "missing.npy" in r.stderr
    np.save(tmp_path / "q.npy", np.ones((1, 8, 2, 64), np.float32))
    np.save(tmp_path / "k.npy", np.ones((1, 9, 1, 64), np.float32))
    r = subprocess.run([str(exe), "--q", str(tmp_path / "q.npy"), "--k", str(tmp_path / "k.npy"), "--v",
                        str(tmp_path / "k.npy"), "--out", str(tmp_path / "o.npy")], capture_output=True, text=True)
    assert r.returncode == 1 and "disagree" in r.stderr
    assert not (tmp_path / "o.npy").exists()


# ----------------------------------------------------------------------------------------------- launch parameters
# The C launcher against the Python launchers: libproxyattn runs on a recording stand-in for libcuda.so.1
# (cpp/tests/fake_cuda.cpp), the Python GPU path's launch code runs on CPU tensors with its Triton kernels replaced
# by recorders; every grid, block size and scalar parameter must agree, and pointers must follow the same data flow.
Q, K, V, O, WS, CU = 0x10000000, 0x20000000, 0x30000000, 0x40000000, 0x50000000, 0x60000000
HELPER_SIZES = {"pa_budgets": [8, 8, 8, 4, 4, 4, 4, 4, 8, 4, 8, 4, 4, 4, 4], "pa_select": [8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
                "pa_combine_lse": [8, 8, 8, 4, 4, 4]}

_C_SIDE = r"""
import ctypes as C, json, sys
sys.path.insert(0, {repo!r})
from pathlib import Path
from tests.test_cpp import _lib, _problem, Config, HELPER_SIZES
build, case = Path({build!r}), json.loads({case!r})
fake = C.CDLL(str(build / "libproxyattn_fakecuda.so"))
manifest = json.loads((build / "generated" / "manifest.json").read_text())
for k in manifest["kernels"]:
    sizes = [8 if t.startswith("*") else 4 for t in k["param_types"]] + [8, 8]
    fake.fake_set_param_sizes(k["entry"].encode(), (C.c_int * len(sizes))(*sizes), len(sizes))
for name, sizes in HELPER_SIZES.items():
    fake.fake_set_param_sizes(name.encode(), (C.c_int * len(sizes))(*sizes), len(sizes))
lib = _lib(build)
cfg = Config()
lib.proxyattn_config_default(C.byref(cfg))
for key, value in case.get("config", {{}}).items():
    setattr(cfg, key, value)
prob = _problem(**case["problem"])
n = C.c_size_t(0)
assert lib.proxyattn_workspace_size(C.byref(prob), C.byref(cfg), C.byref(n)) == 0
st = lib.proxyattn_prefill(C.byref(prob), C.byref(cfg), {Q}, {K}, {V}, {O}, None, {WS}, n.value, None)
assert st == 0, lib.proxyattn_last_error()
out = []
fake.fake_launch_info.restype = C.c_int
for i in range(fake.fake_launch_count()):
    name = C.create_string_buffer(128)
    grid, block, shared = (C.c_uint * 3)(), C.c_uint(), C.c_uint()
    params = (C.c_uint64 * 64)()
    np_ = fake.fake_launch_info(i, name, 128, grid, C.byref(block), C.byref(shared), params, 64)
    out.append(dict(entry=name.value.decode(), grid=list(grid), block=block.value, shared=shared.value,
                    params=list(params[:np_])))
print(json.dumps(dict(ws=n.value, launches=out)))
"""


class _Recorder:
    def __init__(self, kernel, calls, tag):
        import inspect

        self.names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        self.calls, self.tag = calls, tag

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.names, args))
            named.update(kwargs)
            self.calls.append((self.tag, tuple(grid) + (1,) * (3 - len(grid)), named))

        return launch


def _python_launches(case, monkeypatch):
    """The Python GPU path's launches for `case`, recorded on CPU tensors (nothing runs)."""
    from proxyattn.kernels import attention as A
    from proxyattn.kernels import estimate_budgets as EB
    from proxyattn.kernels import estimate_scores as ES

    calls = []
    monkeypatch.setattr(ES, "_pool_heads_kernel", _Recorder(ES._pool_heads_kernel, calls, "_pool_heads_kernel"))
    monkeypatch.setattr(ES, "_proxy_scores_kernel", _Recorder(ES._proxy_scores_kernel, calls, "_proxy_scores_kernel"))
    monkeypatch.setattr(EB, "_budget_kernel", _Recorder(EB._budget_kernel, calls, "_budget_kernel"))
    monkeypatch.setattr(A, "_sparse_attn_fwd_kernel", _Recorder(A._sparse_attn_fwd_kernel, calls, "_sparse_attn_fwd_kernel"))
    monkeypatch.setattr(A, "_env_interpret", lambda: True)  # fixed config: no autotuner
    p = case["problem"]
    cfg = LIB_DEFAULT
    d, hq, hkv, b, s = p["d"], p["hq"], p["hkv"], p["b"], p["s"]
    scale = 1.0 / math.sqrt(d)
    nb = math.ceil(s / cfg.block_size)
    tensors = {}
    if "lengths" in case:
        t = sum(case["lengths"])
        q, k, v = torch.empty(t, hq, d, dtype=torch.bfloat16), torch.empty(t, hkv, d, dtype=torch.bfloat16), None
        v = torch.empty_like(k)
        cu = torch.tensor([0] + list(np.cumsum(case["lengths"])), dtype=torch.int32)
        tensors[id(cu)] = CU
    elif p.get("layout") == 1:
        q = torch.empty(b, hq, s, d, dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.empty(b, hkv, s, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        cu = None
    else:
        q, k, v = torch.empty(b, s, hq, d, dtype=torch.bfloat16), *(torch.empty(b, s, hkv, d, dtype=torch.bfloat16) for _ in range(2))
        cu = None
    tensors.update({id(q): Q, id(k): K, id(v): V})
    if cu is None:
        ES.proxy_scores(q, k, cfg, scale)
    else:
        ES.proxy_scores_varlen(q, k, cu, s, cfg, scale)
    EB._launch_mass(q, k, cu, b, s, cfg.block_size, scale, rows=cfg.budget_rule == 2)
    order = torch.zeros(b, cfg.proxy_heads, nb, nb, dtype=torch.int32)
    counts = torch.zeros(b, hq, nb, dtype=torch.int32)
    out, _ = A._launch_sparse(q, k, v, order, counts, cu, s, cfg.block_size, scale, with_lse=True, use_tma=False,
                              config={"BLOCK_N": 64, "num_warps": 8, "num_stages": 3})
    tensors[id(out)] = O
    return calls, tensors


LAUNCH_CASES = {
    "padded": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128)},
    "bhsd": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128, layout=1)},
    "varlen": {"problem": dict(b=3, s=9000, hq=8, hkv=2, d=128, cu=CU, total=10300), "lengths": [1000, 9000, 300]},
}


@pytest.mark.parametrize("name", list(LAUNCH_CASES))
def test_launch_parameters_equal_the_python_launchers(build, monkeypatch, name):
    case = LAUNCH_CASES[name]
    code = _C_SIDE.format(repo=str(REPO), build=str(build), case=json.dumps(case), Q=Q, K=K, V=V, O=O, WS=WS)
    env = dict(os.environ, PROXYATTN_LIBCUDA=str(build / "libproxyattn_fakecuda.so"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)
    ws_lo, ws_hi = WS, WS + got["ws"]
    c_launches = got["launches"]
    manifest = {k["entry"]: k for k in json.loads((build / "generated" / "manifest.json").read_text())["kernels"]}
    py_calls, tensors = _python_launches(case, monkeypatch)
    c_triton = [l for l in c_launches if not l["entry"].startswith("pa_")]
    assert [l["entry"] for l in c_triton] == [c[0] for c in py_calls]
    ptr_of: dict[int, int] = dict(tensors)  # python tensor id -> C pointer, consistent across launches
    varlen = "lengths" in case
    for c, (entry, grid, named) in zip(c_triton, py_calls):
        m = manifest[entry]
        assert tuple(c["grid"]) == grid, (entry, c["grid"], grid)
        assert c["block"] == named["num_warps"] * 32, entry
        for pname, ptype, value in zip(m["params"], m["param_types"], c["params"]):
            want = named[pname]
            if ptype.startswith("*"):
                if pname == "cu_ptr" and not varlen:
                    continue  # read only by VARLEN kernels
                if entry == "_budget_kernel" and named["PASS"] == 0 and pname == "lse_ptr":
                    continue  # unused by pass 0
                key = id(want)
                if key in ptr_of:
                    assert value == ptr_of[key], (entry, pname)
                else:
                    assert ws_lo <= value < ws_hi and value % 16 == 0, (entry, pname, hex(value))
                    assert value not in ptr_of.values(), (entry, pname, "workspace buffer reused for another tensor")
                    ptr_of[key] = value
            elif ptype == "fp32":
                assert np.uint32(value).view(np.float32) == np.float32(want), (entry, pname, want)
            elif name == "bhsd" and entry == "_sparse_attn_fwd_kernel" and pname in ("stride_ob", "stride_os", "stride_oh"):
                # The library writes out in q's layout ([B, H, S, D]); the Python path allocates [B, S, H, D].
                p_ = case["problem"]
                want_o = {"stride_ob": p_["hq"] * p_["s"] * p_["d"], "stride_os": p_["d"], "stride_oh": p_["s"] * p_["d"]}
                assert value == want_o[pname], (pname, value)
            else:
                assert np.uint32(value).view(np.int32) == int(want), (entry, pname, value, want)
        assert c["params"][-2:] == [0, 0]  # Triton 3.6's global and profile scratch pointers
    # The CUDA C helpers: the torch ops of the Python path between the kernels, with the same buffers.
    p = case["problem"]
    nb = math.ceil(p["s"] / 128)
    by_entry = {l["entry"]: l for l in c_launches}
    pass0, pass1 = [c for c in c_triton if c["entry"] == "_budget_kernel"]
    scores = [c for c in c_triton if c["entry"] == "_proxy_scores_kernel"][0]
    attn = c_triton[-1]
    comb, bud, sel = by_entry["pa_combine_lse"], by_entry["pa_budgets"], by_entry["pa_select"]
    cu_expect = CU if varlen else 0
    assert comb["params"][:3] == [pass0["params"][3], pass0["params"][4], pass1["params"][5]]
    assert comb["params"][3:] == [p["b"] * p["hq"], pass0["params"][-4], 128]
    assert bud["grid"] == [p["hq"], p["b"], 1] and bud["params"][0] == pass1["params"][6]
    assert bud["params"][2] == cu_expect and bud["params"][3:8] == [p["s"], 128, nb, 1, np.float32(0.95).view(np.uint32)]
    dense_below = ProxyAttnConfig().dense_below_tokens
    assert bud["params"][8:10] == [0, dense_below]
    # Scores (read by budget_rules 1 and 2), rankings G, budget_rule 2 (the library's default), keep_sink, keep_diagonal.
    assert bud["params"][10:] == [scores["params"][3], 1, LIB_DEFAULT.budget_rule, 1, 1]
    assert sel["grid"] == [nb, 1, p["b"]] and sel["params"][0] == scores["params"][3]
    assert sel["params"][1] == bud["params"][1] and sel["params"][2:4] == attn["params"][5:7]
    assert sel["params"][4:] == [cu_expect, p["s"], 128, nb, p["hq"], 16, 1, 1, dense_below]


def _c_launches(build, case):
    code = _C_SIDE.format(repo=str(REPO), build=str(build), case=json.dumps(case), Q=Q, K=K, V=V, O=O, WS=WS)
    env = dict(os.environ, PROXYATTN_LIBCUDA=str(build / "libproxyattn_fakecuda.so"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)["launches"]


def test_launches_of_the_dense_and_static_budget_paths(build):
    # Padded batch at or below dense_below_tokens: no estimation, the keep-everything plan, the sparse kernel.
    dense = _c_launches(build, {"problem": dict(b=2, s=2000, hq=8, hkv=2, d=128)})
    assert [l["entry"] for l in dense] == ["pa_budgets", "pa_select", "_sparse_attn_fwd_kernel"]
    assert dense[1]["params"][-1] == ProxyAttnConfig().dense_below_tokens and dense[1]["grid"] == [16, 1, 2]
    assert dense[2]["grid"] == [2 * 8 * 16, 1, 1]
    # budget_fraction: scores but no attention-mass kernels; the fraction reaches the budgets kernel as a double.
    frac = _c_launches(build, {"problem": dict(b=1, s=9000, hq=8, hkv=2, d=128), "config": {"budget_fraction": 0.25}})
    assert [l["entry"] for l in frac] == ["_pool_heads_kernel", "_pool_heads_kernel", "_proxy_scores_kernel",
                                          "pa_budgets", "pa_select", "_sparse_attn_fwd_kernel"]
    assert np.uint64(frac[3]["params"][8]).view(np.float64) == 0.25


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128),
                                     dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_recall_budget_rule(build, problem):
    # budget_rule 1: the same kernels and buffers as rule 0; pa_budgets reads the proxy scores the scores kernel
    # wrote, with G rankings.
    cfg = {"budget_rule": 1, "proxy_heads": 2, "keep_sink": 0}
    got = _c_launches(build, {"problem": problem, "config": cfg})
    base = _c_launches(build, {"problem": problem, "config": {"proxy_heads": 2, "keep_sink": 0, "budget_rule": 0}})
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    scores = [l for l in got if l["entry"] == "_proxy_scores_kernel"][0]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    bud0 = [l for l in base if l["entry"] == "pa_budgets"][0]
    assert bud["params"][10:] == [scores["params"][3], 2, 1, 0, 1]
    assert bud["params"][:10] == bud0["params"][:10] and bud["shared"] == bud0["shared"] == (2 * math.ceil(9000 / 128) + 128) * 4
    # The dense path has no scores: NULL (never read, every sequence keeps all blocks).
    dense = _c_launches(build, {"problem": dict(b=1, s=2000, hq=8, hkv=4, d=128), "config": cfg})
    assert dense[0]["entry"] == "pa_budgets" and dense[0]["params"][10:] == [0, 2, 1, 0, 1]


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128),
                                     dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_row_recall_budget_rule(build, problem):
    # budget_rule 2: the same kernels (pass 1 compiled with ROWS), a per-row mass buffer block_size times larger,
    # pa_budgets with room for the rows' needs in shared memory and the scores of G rankings.
    code = {}
    for rule in (1, 2):
        case = {"problem": problem, "config": {"budget_rule": rule, "proxy_heads": 2}}
        c = _C_SIDE.format(repo=str(REPO), build=str(build), case=json.dumps(case), Q=Q, K=K, V=V, O=O, WS=WS)
        env = dict(os.environ, PROXYATTN_LIBCUDA=str(build / "libproxyattn_fakecuda.so"))
        r = subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        code[rule] = json.loads(r.stdout)
    got, base = code[2]["launches"], code[1]["launches"]
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    nb, bh = math.ceil(9000 / 128), problem["b"] * problem["hq"]
    assert code[2]["ws"] - code[1]["ws"] >= bh * 127 * nb * 4 - 256  # the mass of every row
    scores = [l for l in got if l["entry"] == "_proxy_scores_kernel"][0]
    pass1 = [l for l in got if l["entry"] == "_budget_kernel"][1]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    assert bud["params"][0] == pass1["params"][6]  # pass 1's mass buffer
    assert bud["params"][10:] == [scores["params"][3], 2, 2, 1, 1]
    assert bud["shared"] == (2 * nb + 128) * 4
    lo, hi = pass1["params"][6], pass1["params"][6] + bh * 128 * nb * 4
    assert hi <= WS + code[2]["ws"]
    others = {v for l in got for v in l["params"] if WS <= v < WS + code[2]["ws"] and v != lo}
    assert others and not any(lo < v < hi for v in others)  # no other workspace buffer inside the row masses


@pytest.mark.parametrize("min_budget_tokens", [0, 2048, 10000])
def test_unset_dense_below_tokens_resolves_as_in_python(build, min_budget_tokens):
    want = ProxyAttnConfig(min_budget_tokens=min_budget_tokens).dense_below_tokens
    s = want + 1  # just above the crossover: the sparse path
    got = _c_launches(build, {"problem": dict(b=1, s=s, hq=8, hkv=2, d=128),
                              "config": {"min_budget_tokens": min_budget_tokens, "dense_below_tokens": -1}})
    sel = [l for l in got if l["entry"] == "pa_select"][0]
    assert sel["params"][-1] == want
    assert got[0]["entry"] == "_pool_heads_kernel"  # not the dense path


# ----------------------------------------------------------------------------------------------- TensorRT plugin logic
# The plugin's FLOAT32 fields (cpp/trt/plugin_logic.h is_float_field); every other field is INT32.
PLUGIN_FLOAT_FIELDS = {"pa_gamma", "pa_budget_fraction", "pa_dense_density", "scale"}
# The plugin's declared fields: 15 pa_* (ProxyAttnConfig.to_attrs) + scale, is_causal, sliding_window.
PLUGIN_FIELD_COUNT = 18


def _parse_fields(host, fields: dict, *, as_float=(), as_int=()):
    """The plugin's parse_fields over `fields` (name -> value), each passed as TensorRT would: FLOAT32 for the float
    fields, INT32 otherwise; `as_float` / `as_int` name fields to pass with the other type (a mistyped attribute)."""
    names = [k for k in fields]
    floats = (PLUGIN_FLOAT_FIELDS | set(as_float)) - set(as_int)
    arr_n = (C.c_char_p * len(names))(*[n.encode() for n in names])
    arr_t = (C.c_int * len(names))(*[1 if n in floats else 0 for n in names])
    arr_v = (C.c_double * len(names))(*[float(fields[n]) for n in names])
    cfg, scale, err = Config(), C.c_float(), C.create_string_buffer(512)
    st = host.pa_host_parse_fields(arr_n, arr_t, arr_v, len(names), C.byref(cfg), C.byref(scale), err, 512)
    return st, cfg, scale.value, err.value.decode()


def test_trt_plugin_reads_the_onnx_node_attributes(host):
    from export.contract import STRING_ATTRS, encode_attrs

    pc = engine_config(block_size=64, stride=8, gamma=0.9, min_budget_tokens=1024, proxy_heads=2, keep_sink=False,
                       budget_fraction=0.25, budget_rule=1)
    attrs = {k: v for k, v in encode_attrs(pc, scale=0.0625).items() if k not in STRING_ATTRS}
    assert len(attrs) == PLUGIN_FIELD_COUNT and attrs["pa_dense_density"] == 0.0  # dense_density None travels as 0.0
    st, cfg, scale, err = _parse_fields(host, attrs)
    assert st == 0, err
    assert (cfg.block_size, cfg.stride, cfg.proxy_heads, cfg.min_budget_tokens) == (64, 8, 2, 1024)
    assert (cfg.keep_sink, cfg.keep_diagonal, cfg.dense_below_tokens) == (0, 1, pc.dense_below_tokens)
    assert cfg.gamma == pytest.approx(0.9) and cfg.budget_fraction == pytest.approx(0.25) and scale == 0.0625
    assert cfg.budget_rule == 1
    for rule in (0, 2):
        st, cfg, _, err = _parse_fields(host, {**attrs, "pa_budget_rule": rule})
        assert st == 0 and cfg.budget_rule == rule, err
    st, cfg, _, err = _parse_fields(host, {k: v for k, v in attrs.items() if k != "pa_budget_rule"})
    assert st == -1 and "missing field(s) pa_budget_rule" in err  # strict: no default for a field the node lacks


def _node_fields(config=LIB_DEFAULT, scale=0.125) -> dict:
    """The fields TensorRT passes the plugin for a node export/contract.py writes (its strings are not fields)."""
    from export.contract import STRING_ATTRS, encode_attrs

    return {k: v for k, v in encode_attrs(config, scale=scale).items() if k not in STRING_ATTRS}


def test_trt_plugin_requires_every_field(host):
    """Each field the exporter writes is required: without it the plugin refuses the node and names the field and
    the whole declared set (before this change a missing field silently took ProxyAttnConfig's default)."""
    attrs = _node_fields()
    assert len(attrs) == PLUGIN_FIELD_COUNT and sum(k.startswith("pa_") for k in attrs) == 15
    assert "pa_dense_density" in attrs
    assert _parse_fields(host, attrs)[0] == 0
    for name in attrs:
        st, _, _, err = _parse_fields(host, {k: v for k, v in attrs.items() if k != name})
        assert st == -1 and f"missing field(s) {name};" in err, (name, err)
        assert "every declared field is required: pa_block_size, pa_stride" in err
    st, _, _, err = _parse_fields(host, {})
    assert st == -1 and err.startswith("missing field(s) pa_block_size, pa_stride, pa_proxy_heads")


@pytest.mark.parametrize("change,retyped,needle", [
    ({"pa_keep_sink": 0.5}, ("pa_keep_sink",), "field pa_keep_sink must be INT32, not FLOAT32"),
    ({"pa_keep_sink": 1.0}, ("pa_keep_sink",), "field pa_keep_sink must be INT32, not FLOAT32"),
    ({"pa_keep_sink": 2}, (), "pa_keep_sink=2 must be 0 or 1"),
    ({"pa_keep_diagonal": -1}, (), "pa_keep_diagonal=-1 must be 0 or 1"),
    ({"pa_block_size": 128.0}, ("pa_block_size",), "field pa_block_size must be INT32, not FLOAT32"),
    ({"pa_bogus": 1}, (), "unknown field pa_bogus; declared: pa_block_size, pa_stride"),
    ({"pa_dense_first_layers": -1}, (), "pa_dense_first_layers=-1 must be >= 0"),
    ({"pa_dense_density": 0}, ("pa_dense_density",), "field pa_dense_density must be FLOAT32, not INT32"),
    ({"pa_gamma": 1}, ("pa_gamma",), "field pa_gamma must be FLOAT32, not INT32"),
])
def test_trt_plugin_refuses_mistyped_fields(host, change, retyped, needle):
    """Booleans are INT32 0/1 only; an attribute of the wrong type is an error, never converted (0.5 is not
    truncated to 0, an INT 0 is not a FLOAT 0.0); an unknown pa_ field is an error naming the declared ones.
    `retyped` names the fields passed with the other type (an INT32 field as FLOAT32 and the reverse)."""
    as_float = tuple(n for n in retyped if n not in PLUGIN_FLOAT_FIELDS)
    as_int = tuple(n for n in retyped if n in PLUGIN_FLOAT_FIELDS)
    st, _, _, err = _parse_fields(host, {**_node_fields(), **change}, as_float=as_float, as_int=as_int)
    assert st == -1 and needle in err, err


@pytest.mark.parametrize("value", [0.7, 1.0, 0.001])
def test_trt_plugin_refuses_the_dense_fallback(host, value):
    """pa_dense_density (ProxyAttnConfig.dense_density; None travels as 0.0) is declared and required, but only 0.0
    (no dense fallback) is accepted: the fallback runs in the Python / Triton path only, so a node asking for it is
    refused by name rather than run without it."""
    attrs = _node_fields()
    assert attrs["pa_dense_density"] == 0.0
    st, _, _, err = _parse_fields(host, attrs)
    assert st == 0, err
    st, _, _, err = _parse_fields(host, {**attrs, "pa_dense_density": value})
    assert st == -1 and err.startswith("pa_dense_density=") and "is not supported" in err, err
    assert "the dense fallback runs in the Python / Triton path only; allowed: 0 (off)" in err, err
    # The exporter's node for Python's default config (dense_density 0.7) is refused alike.
    if value == 0.7:
        default = _node_fields(dataclasses.replace(LIB_DEFAULT, dense_density=0.7))
        assert default["pa_dense_density"] == pytest.approx(0.7)
        st, _, _, err = _parse_fields(host, default)
        assert st == -1 and "pa_dense_density=0.7" in err and "allowed: 0 (off)" in err, err


def test_trt_plugin_test_bridge_never_truncates(host):
    """The ctypes bridge refuses a non-integral value for an INT32 field instead of truncating it (so the tests
    above cannot pass a 0.5 that silently becomes 0)."""
    st, _, _, err = _parse_fields(host, {**_node_fields(), "pa_keep_sink": 0.5})
    assert st == -1 and "test bridge: INT32 field pa_keep_sink given the non-int32 value 0.5" in err


def test_trt_plugin_declares_every_node_attribute(host):
    from export.contract import STRING_ATTRS, encode_attrs

    host.pa_host_field_names.restype = C.c_int
    names = (C.c_char_p * 64)()
    n = host.pa_host_field_names(names, 64)
    declared = [names[i].decode() for i in range(n)]
    attrs = [k for k in encode_attrs(ProxyAttnConfig(), scale=0.125) if k not in STRING_ATTRS]
    assert sorted(declared) == sorted(attrs) and len(set(declared)) == n == PLUGIN_FIELD_COUNT


@pytest.mark.parametrize("change,needle", [
    ({"sliding_window": 512}, "sliding_window=512"), ({"is_causal": 0}, "is_causal=0"),
    ({"pa_estimator": 1}, "pa_estimator=1"), ({"pa_gamma": 1.5}, "gamma=1.5"), ({"bogus": 1}, "unknown field bogus"),
    ({"pa_budget_rule": 3}, "pa_budget_rule=3 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall)"),
    ({"pa_budget_rule": -1}, "pa_budget_rule=-1"),
    ({"pa_budget_rule": 3}, "(3, block_recall, runs in the Python / Triton path only)"),
    ({"pa_recall_rows": 3}, "pa_recall_rows=3 must be a power of two"),
    ({"pa_recall_rows": 128, "pa_block_size": 64}, "pa_recall_rows=128 must divide pa_block_size=64"),
    ({"pa_dense_density": 0.7}, "pa_dense_density=0.7"),
])
def test_trt_plugin_refuses_what_it_cannot_run(host, change, needle):
    from export.contract import STRING_ATTRS, encode_attrs

    attrs = {k: v for k, v in encode_attrs(LIB_DEFAULT, scale=0.125).items() if k not in STRING_ATTRS}
    attrs.update(change)
    st, _, _, err = _parse_fields(host, attrs)
    assert st == -1 and needle in err


def test_trt_plugin_maps_bhsd_dims_to_a_problem(host):
    prob, err = Problem(), C.create_string_buffer(256)
    q, k = (C.c_longlong * 4)(2, 32, 5000, 128), (C.c_longlong * 4)(2, 8, 5000, 128)
    assert host.pa_host_make_problem(q, k, BF16, C.byref(prob), err, 256) == 0
    assert (prob.batch, prob.num_q_heads, prob.seq_len, prob.head_dim, prob.num_kv_heads) == (2, 32, 5000, 128, 8)
    assert prob.layout == 1 and prob.cu_seqlens is None
    bad = (C.c_longlong * 4)(2, 8, 4999, 128)
    assert host.pa_host_make_problem(q, bad, BF16, C.byref(prob), err, 256) == -1 and b"disagree" in err.value
