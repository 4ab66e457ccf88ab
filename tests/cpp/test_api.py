"""libproxyattn's build and C API on this machine (no GPU): every kernel variant compiled, what the library links
and exports, the config defaults against Python's and their validation, workspace sizes, and the argument checks
of proxyattn_prefill before any GPU work (no driver: a named error)."""

from __future__ import annotations

import ctypes as C
import json
import math
import os
import subprocess
import sys

import pytest

from proxyattn import ProxyAttnConfig
from tests.cpp.libproxyattn import (
    BF16,
    FP16,
    INVALID,
    LIB_DEFAULT,
    MISALIGNED,
    NO_DRIVER,
    NOT_COMPILED,
    SUCCESS,
    WS_SMALL,
    default_config,
    is_quick_build,
    prefill,
    problem,
)
from tests.helpers import ROOT


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
                    c = by_key[f"budget/{dt}/d{d}/bs{bs}/varlen{varlen}/pass0"]["constexprs"]
                    assert (c["PASS"], c["LOG_MASS"], c["ROWS"]) == (0, True, False)  # the one sweep over the keys
                    for rows in (0, 1):  # the masses; ROWS: budget_rule 2
                        assert by_key[f"finish/bs{bs}/varlen{varlen}/rows{rows}"]["constexprs"]["ROWS"] == bool(rows)
                    for rb in (4, 8, 16, 32):  # budget rule 3, recall_rows 4, groups 1..8
                        assert f"needs_mass/{dt}/d{d}/bs{bs}/rows4/rb{rb}/varlen{varlen}" in keys
                        assert f"needs_cut/bs{bs}/rows4/rb{rb}/varlen{varlen}" in keys
                        c = by_key[f"needs_mass/{dt}/d{d}/bs{bs}/rows4/rb{rb}/varlen{varlen}"]["constexprs"]
                        assert (c["SKIP"], c["LAST_ONLY"], c["QB"], c["RB"]) == (True, False, 8, rb)
                assert lib.proxyattn_is_compiled(BF16 if dt == "bf16" else FP16, d, bs) == 1
    for block in (16, 32, 64, 128, 256, 512, 1024, 2048, 4096):  # the ranking kernel up to MAX_SORT_BLOCKS
        assert by_key[f"rank/block{block}"]["param_types"][-2:] == ["i1", "i1"]  # KEEP_SINK, KEEP_DIAG at run time
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
    assert exported == sorted(
        [
            "proxyattn_config_default",
            "proxyattn_config_validate",
            "proxyattn_workspace_size",
            "proxyattn_prefill",
            "proxyattn_plan",
            "proxyattn_is_compiled",
            "proxyattn_status_name",
            "proxyattn_last_error",
            "proxyattn_version",
        ]
    )


# ----------------------------------------------------------------------------------------------- config
def test_config_defaults_match_python(lib):
    c = default_config(lib)
    attrs = LIB_DEFAULT.to_attrs()
    assert c.block_size == attrs["pa_block_size"] and c.stride == attrs["pa_stride"]
    assert c.proxy_heads == attrs["pa_proxy_heads"] and c.min_budget_tokens == attrs["pa_min_budget_tokens"]
    assert c.gamma == pytest.approx(attrs["pa_gamma"]) and c.budget_fraction == attrs["pa_budget_fraction"] == 0.0
    assert c.keep_sink == attrs["pa_keep_sink"] and c.keep_diagonal == attrs["pa_keep_diagonal"]
    assert c.dense_below_tokens == -1  # None: resolved by the library as ProxyAttnConfig resolves it (test below)
    assert c.budget_rule == attrs["pa_budget_rule"] == 3  # "block_recall"
    assert c.recall_rows == attrs["pa_recall_rows"] == 4
    assert c.dense_density == pytest.approx(attrs["pa_dense_density"]) and attrs["pa_dense_density"] == 0.8
    assert LIB_DEFAULT == ProxyAttnConfig()  # the library's default is Python's default config
    assert lib.proxyattn_config_validate(C.byref(c)) == SUCCESS
    assert lib.proxyattn_last_error() == b""


@pytest.mark.parametrize(
    "field,value,needle",
    [
        ("block_size", 96, b"block_size=96"),
        ("stride", 3, b"stride=3"),
        ("stride", 0, b"stride=0"),
        ("proxy_heads", 0, b"proxy_heads=0"),
        ("gamma", 0.0, b"gamma=0"),
        ("gamma", 1.5, b"gamma=1.5"),
        ("min_budget_tokens", -1, b"min_budget_tokens=-1"),
        ("keep_sink", 2, b"keep_sink=2"),
        ("keep_diagonal", -1, b"keep_diagonal=-1"),
        ("dense_below_tokens", -2, b"dense_below_tokens=-2"),
        ("budget_fraction", 1.5, b"budget_fraction=1.5"),
        ("budget_fraction", -0.5, b"budget_fraction=-0.5"),
        ("budget_rule", 4, b"budget_rule=4 is not supported; allowed: 0 (mass), 1 (recall), 2 (row_recall), 3 (block_recall)"),
        ("budget_rule", -1, b"budget_rule=-1"),
        ("recall_rows", 3, b"recall_rows=3 must be a power of two dividing block_size=128"),
        ("recall_rows", 0, b"recall_rows=0"),
        ("recall_rows", 256, b"recall_rows=256"),
        ("dense_density", 1.5, b"dense_density=1.5 must be 0 (no dense fallback) or lie in (0, 1]"),
        ("dense_density", -0.25, b"dense_density=-0.25"),
        ("dense_density", float("nan"), b"dense_density=nan"),
    ],
)
def test_config_errors_name_the_value(lib, field, value, needle):
    c = default_config(lib)
    setattr(c, field, value)
    assert lib.proxyattn_config_validate(C.byref(c)) == INVALID
    assert needle in lib.proxyattn_last_error()
    assert lib.proxyattn_status_name(INVALID) == b"PROXYATTN_ERROR_INVALID_VALUE"


def test_config_accepts_every_python_budget_rule_and_dense_density(lib):
    from proxyattn.config import BUDGET_RULES

    for rule in BUDGET_RULES:
        for density in (0.0, 0.5, 1.0):  # 0: no dense fallback (Python's None)
            c = default_config(lib)
            c.budget_rule, c.dense_density = rule, density
            assert lib.proxyattn_config_validate(C.byref(c)) == SUCCESS, lib.proxyattn_last_error()


def test_block_recall_refuses_more_blocks_than_the_ranking_kernel_sorts(lib):
    cfg = default_config(lib)
    n = C.c_size_t(0)
    ok = problem(s=4096 * 128, hq=1, hkv=1, d=64)  # 4096 blocks: the limit
    assert lib.proxyattn_workspace_size(C.byref(ok), C.byref(cfg), C.byref(n)) == SUCCESS, lib.proxyattn_last_error()
    long = problem(s=4096 * 128 + 1, hq=1, hkv=1, d=64)
    assert lib.proxyattn_workspace_size(C.byref(long), C.byref(cfg), C.byref(n)) == INVALID
    msg = lib.proxyattn_last_error()
    assert b"seq_len=524289 gives 4097 blocks" in msg and b"budget_rule=3 (block_recall) ranks at most 4096" in msg
    assert b"allowed: seq_len <= 524288" in msg
    cfg.budget_rule = 2  # the other rules go up to 8192 blocks
    assert lib.proxyattn_workspace_size(C.byref(long), C.byref(cfg), C.byref(n)) == SUCCESS
    cfg.budget_rule, cfg.budget_fraction = 3, 0.1  # a static budget ranks nothing with the rank kernel
    assert lib.proxyattn_workspace_size(C.byref(long), C.byref(cfg), C.byref(n)) == SUCCESS


# ----------------------------------------------------------------------------------------------- workspace
@pytest.mark.parametrize(
    "changes,needle",
    [
        (dict(d=96), b"head_dim=96"),
        (dict(hq=6, hkv=4), b"Hq=6"),
        (dict(s=0), b"seq_len=0"),
        (dict(b=0), b"batch=0"),
        (dict(dtype=7), b"dtype=7"),
        (dict(s=8192 * 128 + 1), b"blocks"),
        (dict(cu=16, total=-1), b"total_tokens=-1"),
        (dict(cu=16, b=2, s=100, total=201), b"total_tokens=201"),
        (dict(layout=2), b"layout=2"),
        (dict(layout=1, cu=16, total=10), b"BHSD needs the padded batch"),
    ],
)
def test_workspace_size_rejects_bad_problems(lib, changes, needle):
    n = C.c_size_t(0)
    cfg = default_config(lib)
    assert lib.proxyattn_workspace_size(C.byref(problem(**changes)), C.byref(cfg), C.byref(n)) == INVALID
    assert needle in lib.proxyattn_last_error()


def test_workspace_size_rejects_proxy_heads_not_dividing_hkv(lib):
    cfg = default_config(lib)
    cfg.proxy_heads = 3
    n = C.c_size_t(0)
    assert lib.proxyattn_workspace_size(C.byref(problem(hq=8, hkv=4)), C.byref(cfg), C.byref(n)) == INVALID
    assert b"proxy_heads=3" in lib.proxyattn_last_error() and b"Hkv=4" in lib.proxyattn_last_error()


def _ws(lib, prob, cfg) -> int:
    n = C.c_size_t(0)
    assert lib.proxyattn_workspace_size(C.byref(prob), C.byref(cfg), C.byref(n)) == SUCCESS, lib.proxyattn_last_error()
    return n.value


def test_workspace_size_covers_the_plan_and_scales(lib):
    cfg = default_config(lib)
    b, s, hq, hkv = 2, 40_000, 8, 2  # above the dense crossover (32768)
    nb = math.ceil(s / cfg.block_size)
    ws = _ws(lib, problem(b=b, s=s, hq=hq, hkv=hkv), cfg)
    plan_bytes = b * nb * nb * 4 + b * hq * nb * 4  # order + counts
    assert ws >= plan_bytes + 2 * b * nb * nb * 4 // 2  # plus the scores map
    assert _ws(lib, problem(b=b, s=2 * s, hq=hq, hkv=hkv), cfg) > ws
    frac = default_config(lib)
    frac.budget_fraction = 0.25  # no attention-mass scratch
    assert _ws(lib, problem(b=b, s=s, hq=hq, hkv=hkv), frac) < ws
    # A padded batch at or below dense_below_tokens needs no estimation scratch.
    crossover = ProxyAttnConfig().dense_below_tokens
    dense, sparse = (_ws(lib, problem(b=b, s=n, hq=hq, hkv=hkv), cfg) for n in (crossover, crossover + 1))
    assert dense < sparse / 2
    assert _ws(lib, problem(b=b, s=s, hq=hq, hkv=hkv, layout=1), cfg) == ws  # the layout changes strides only


# ----------------------------------------------------------------------------------------------- prefill errors
def test_prefill_checks_arguments_before_touching_the_gpu(lib):
    cfg = default_config(lib)
    prob = problem()
    assert prefill(lib, prob, cfg, q=None) == INVALID and b"q is NULL" in lib.proxyattn_last_error()
    assert prefill(lib, prob, cfg, v=264) == MISALIGNED and b"v is not 16-byte aligned" in lib.proxyattn_last_error()
    assert prefill(lib, prob, cfg, ws_bytes=10) == WS_SMALL and b"workspace_bytes=10" in lib.proxyattn_last_error()
    cfg.stride = 8  # valid, but only stride 4 is compiled
    prob = problem(s=ProxyAttnConfig().dense_below_tokens + 1)  # above the dense crossover: the estimation kernels run
    assert prefill(lib, prob, cfg) == NOT_COMPILED and b"stride=8" in lib.proxyattn_last_error()


def test_block_recall_refuses_uncompiled_rows_and_groups_by_name(lib):
    # Budget rule 3's needs kernels are compiled for recall_rows 4 and up to 8 query heads per KV head.
    s = ProxyAttnConfig().dense_below_tokens + 1
    cfg = default_config(lib)
    assert prefill(lib, problem(s=s, hq=16, hkv=1), cfg) == NOT_COMPILED
    msg = lib.proxyattn_last_error()
    assert b"budget_rule=3 with recall_rows=4 and 16 query heads per KV head" in msg and b"MAX_NEEDS_GROUP" in msg
    cfg.recall_rows = 8
    assert prefill(lib, problem(s=s, hq=8, hkv=2), cfg) == NOT_COMPILED
    assert b"recall_rows=8" in lib.proxyattn_last_error()
    cfg.budget_rule = 2  # recall_rows is read by rule 3 only; rule 2 never needs these kernels
    n = C.c_size_t(0)
    assert lib.proxyattn_workspace_size(C.byref(problem(s=s, hq=16, hkv=1)), C.byref(cfg), C.byref(n)) == SUCCESS


def test_prefill_without_a_driver_reports_it(build):
    code = f"""
from pathlib import Path
from tests.cpp.libproxyattn import default_config, load_lib, prefill, problem
lib = load_lib(Path({str(build)!r}))
st = prefill(lib, problem(), default_config(lib))
print(st, lib.proxyattn_last_error().decode())
"""
    env = dict(os.environ, PROXYATTN_LIBCUDA="/nonexistent/libcuda.so.1")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, check=True)
    status, msg = r.stdout.strip().split(" ", 1)
    assert int(status) == NO_DRIVER and "/nonexistent/libcuda.so.1" in msg
