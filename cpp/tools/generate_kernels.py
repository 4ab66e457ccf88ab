#!/usr/bin/env python3
"""Regenerates libproxyattn's kernel sources: the one script behind every generated file of cpp/.

It ahead-of-time compiles the Triton kernels of `proxyattn.kernels` for sm_90 (``triton.compile`` on an
``ASTSource`` with ``GPUTarget("cuda", 90, 32)``: no GPU needed) for every variant the library dispatches to,
compiles the CUDA C helpers (`cpp/src/helpers.cu`) with nvcc to an sm_90 cubin, and writes into OUT:

* ``<key>.cubin`` for each kernel image;
* ``kernel_table.cpp``: every cubin embedded with the assembler's ``.incbin``, and a table of `KernelImage`s
  (entry name, dynamic shared memory, warps, parameter count) that `cpp/src/proxyattn.cpp` looks up by key;
* ``manifest.json``: Triton version, source hashes, each variant's constexprs, options and resources.

Calling convention (Triton 3.6): constexpr parameters are dropped from the entry; every other parameter stays in
order; two hidden pointer parameters (global scratch, profile scratch) follow; the launcher in
`cpp/src/driver.cpp` passes null for both, and this script refuses kernels that need either scratch buffer.
Pointers and the strides listed as 16-divisible get Triton's divisibility hint (the library checks 16-byte
alignment at run time; D in 64/128/256 makes every head/token stride a multiple of 16 elements).

Kernel parameters that the Python path marks constexpr but that vary with the model (query heads per KV head,
heads per proxy group: GROUP, RGROUP, HPG) are compiled as runtime i32 values here, so one binary serves every
GQA ratio; Triton accepts this because those names are only used in integer arithmetic and loop bounds. Budget
rule 3's kernels take KEEP_SINK / KEEP_DIAG at run time too (the ranking kernel as i1, a one-byte parameter, since
it combines them with `and`; the cut kernel as i32), so one binary serves every sink/diagonal setting.
The kernels' parameter lists are checked against the lists below: a changed kernel fails here, loudly.

Usage: python3 cpp/tools/generate_kernels.py --out DIR [--nvcc PATH] [--jobs N] [--quick] [--attn-config B,W,S[,R]]
(--quick: one dtype/head dim/block variant of each kernel, for fast local builds; the library reports
PROXYATTN_ERROR_NOT_COMPILED for the rest.)
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import inspect
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPP = REPO / "cpp"

DTYPES = {"fp16": "fp16", "bf16": "bf16"}
HEAD_DIMS = (64, 128, 256)
BLOCK_SIZES = (64, 128)
STRIDES = (4,)  # config.stride values compiled for the scores kernels (default 4); others: NOT_COMPILED
# Budget rule 3 ("block_recall"): config.recall_rows values compiled for the needs kernels (default 4), and the
# largest query heads per KV head (GQA group) they serve: RB = next_pow2(group * rows) rows per query block. Others:
# NOT_COMPILED.
ROWS = (4,)
MAX_NEEDS_GROUP = 8
NEEDS_QB = 8  # query blocks per program of the needs mass kernel (estimate_needs._launch_needs' qb for Nb >= 8)
RANK_BLOCKS = tuple(1 << i for i in range(4, 13))  # the ranking kernel's BLOCK: 16 .. 4096 (MAX_SORT_BLOCKS)


def attention_config(d: int, bs: int) -> dict:
    """(BLOCK_N, num_warps, num_stages[, maxnreg]) of the sparse attention kernel per head dim and plan block.

    Chosen among the Python path's autotuning candidates (proxyattn/kernels/attention.py::_configs) so that the
    pipelined tiles fit in shared memory; fixed here because the library does no autotuning at run time. The library
    loads through pointers (USE_TMA False). Head dim 128 with block 128 takes the register-capped config
    (`attention.REGISTER_CAPPED`, the Python path's fixed config of that shape before its TMA loads moved to
    `attention.FOUR_WARPS`, not measured with pointer loads), which the library also ran faster than its earlier
    one (docs/cpp.md: 0.85 / 3.18 / 13.64 ms against 0.96 / 3.43 / 14.43 ms at 8K / 16K / 32K on the H200).
    """
    if (d, bs) == (128, 128):
        from proxyattn.kernels.attention import REGISTER_CAPPED

        block_n, warps, stages, maxnreg = REGISTER_CAPPED
        return {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages, "maxnreg": maxnreg}
    if bs == 128:
        return {"BLOCK_N": 64, "num_warps": 8, "num_stages": 2 if d == 256 else 3}
    return {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2 if d == 256 else 3}


@dataclass
class Variant:
    key: str  # lookup key used by cpp/src/proxyattn.cpp
    module: str  # python module holding the kernel
    fn: str  # kernel name in the module
    types: dict  # parameter name -> Triton type ("*bf16", "i32", "fp32", "constexpr")
    constexprs: dict  # constexpr name -> value
    div16: tuple  # parameter names with the divisibility-16 hint
    num_warps: int
    num_stages: int
    expected_args: tuple  # the kernel's parameter list, as this script knows it
    meta: dict = field(default_factory=dict)
    maxnreg: int | None = None


ATTN_ARGS = (
    "q_ptr",
    "k_ptr",
    "v_ptr",
    "o_ptr",
    "lse_ptr",
    "q_desc",
    "k_desc",
    "v_desc",
    "order_ptr",
    "counts_ptr",
    "cu_ptr",
    "stride_qb",
    "stride_qs",
    "stride_qh",
    "stride_kb",
    "stride_ks",
    "stride_kh",
    "stride_vb",
    "stride_vs",
    "stride_vh",
    "stride_ob",
    "stride_os",
    "stride_oh",
    "stride_lb",
    "stride_lh",
    "stride_rb",
    "stride_rr",
    "stride_rm",
    "stride_cb",
    "stride_ch",
    "seq_len",
    "num_blocks",
    "num_q_heads",
    "qk_scale",
    "len_bucket",
    "GROUP",
    "RGROUP",
    "PLAN_BS",
    "BLOCK_N",
    "HEAD_DIM",
    "USE_TMA",
    "VARLEN",
    "WRITE_LSE",
)

POOL_ARGS = (
    "x_ptr",
    "out_ptr",
    "cu_ptr",
    "seq_len",
    "stride_xb",
    "stride_xt",
    "stride_xh",
    "stride_xd",
    "stride_og",
    "stride_or",
    "HPG",
    "STEP",
    "HEAD_DIM",
    "BLOCK_D",
    "BLOCK_T",
    "VARLEN",
)


def _next_pow2(x: int) -> int:
    return 1 << (x - 1).bit_length()


def attention_variants(dtypes, dims, blocks, override=None):
    out = []
    for dt, d, bs, varlen in itertools.product(dtypes, dims, blocks, (0, 1)):
        cfg = dict(override) if override else attention_config(d, bs)
        p = f"*{dt}"
        types = {n: "i32" for n in ATTN_ARGS}
        types.update(
            q_ptr=p, k_ptr=p, v_ptr=p, o_ptr=p, lse_ptr="*fp32", order_ptr="*i32", counts_ptr="*i32", cu_ptr="*i32", qk_scale="fp32"
        )
        consts = dict(
            q_desc=None,
            k_desc=None,
            v_desc=None,
            PLAN_BS=bs,
            BLOCK_N=cfg["BLOCK_N"],
            HEAD_DIM=d,
            USE_TMA=False,
            VARLEN=bool(varlen),
            WRITE_LSE=True,
        )
        for c in consts:
            types[c] = "constexpr"
        div16 = (
            "q_ptr",
            "k_ptr",
            "v_ptr",
            "o_ptr",
            "lse_ptr",
            "order_ptr",
            "counts_ptr",
            "cu_ptr",
            "stride_qb",
            "stride_qs",
            "stride_qh",
            "stride_kb",
            "stride_ks",
            "stride_kh",
            "stride_vb",
            "stride_vs",
            "stride_vh",
            "stride_ob",
            "stride_os",
            "stride_oh",
        )
        out.append(
            Variant(
                f"attn/{dt}/d{d}/bs{bs}/varlen{varlen}",
                "proxyattn.kernels.attention",
                "_sparse_attn_fwd_kernel",
                types,
                consts,
                div16,
                cfg["num_warps"],
                cfg["num_stages"],
                ATTN_ARGS,
                {"BLOCK_N": cfg["BLOCK_N"]},
                cfg.get("maxnreg"),
            )
        )
    return out


def pool_variants(dtypes, dims, strides):
    out = []
    for dt, d, step, varlen in itertools.product(dtypes, dims, sorted(set((1,) + tuple(strides))), (0, 1)):
        block_d = _next_pow2(d)
        block_t = max(1, min(64, 8192 // block_d))
        types = {n: "i32" for n in POOL_ARGS}
        types.update(x_ptr=f"*{dt}", out_ptr="*fp16", cu_ptr="*i32")
        consts = dict(stride_xd=1, STEP=step, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_T=block_t, VARLEN=bool(varlen))
        for c in consts:
            types[c] = "constexpr"
        div16 = ("x_ptr", "out_ptr", "cu_ptr", "stride_xb", "stride_xt", "stride_xh", "stride_og", "stride_or")
        out.append(
            Variant(
                f"pool/{dt}/d{d}/step{step}/varlen{varlen}",
                "proxyattn.kernels.estimate_scores",
                "_pool_heads_kernel",
                types,
                consts,
                div16,
                4,
                3,
                POOL_ARGS,
                {"BLOCK_T": block_t},
            )
        )
    return out


ROWS_ARGS = (
    "pq_ptr",
    "pk_ptr",
    "cu_ptr",
    "rmax_ptr",
    "lse_ptr",
    "seq_len",
    "nb_max",
    "num_groups",
    "qk_scale",
    "stride_pqg",
    "stride_pqr",
    "stride_pkg",
    "stride_pkr",
    "tile_lo",
    "chunk_rows",
    "STRIDE",
    "BS",
    "RPB",
    "QB",
    "HEAD_DIM",
    "BLOCK_D",
    "VARLEN",
)
SCORES_FINISH_ARGS = (
    "rmax_ptr",
    "lse_ptr",
    "cu_ptr",
    "out_ptr",
    "seq_len",
    "nb_max",
    "num_groups",
    "stride_ob",
    "stride_og",
    "stride_om",
    "m_lo",
    "chunk_rows",
    "STRIDE",
    "BS",
    "RPB",
    "BLOCK_C",
    "VARLEN",
)


def scores_variants(dims, blocks, strides):
    """The one-sweep proxy scores (`estimate_scores._launch_scores`): _proxy_rows_kernel per {head dim, block, stride,
    padded/varlen} and _scores_from_rows_kernel per {block, stride, padded/varlen}."""
    from proxyattn.kernels.estimate_common import tile_warps
    from proxyattn.kernels.estimate_scores import _ROWS_BLOCK_C, rows_stages

    out = []
    for d, bs, st, varlen in itertools.product(dims, blocks, strides, (0, 1)):
        rpb = bs // st
        qb = max(1, 64 // rpb)
        block_d = _next_pow2(d)
        num_warps = tile_warps(qb * rpb, block_d)
        types = {n: "i32" for n in ROWS_ARGS}
        types.update(pq_ptr="*fp16", pk_ptr="*fp16", cu_ptr="*i32", rmax_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
        consts = dict(STRIDE=st, BS=bs, RPB=rpb, QB=qb, HEAD_DIM=d, BLOCK_D=block_d, VARLEN=bool(varlen))
        for c in consts:
            types[c] = "constexpr"
        div16 = ("pq_ptr", "pk_ptr", "cu_ptr", "rmax_ptr", "lse_ptr", "stride_pqg", "stride_pqr", "stride_pkg", "stride_pkr")
        out.append(
            Variant(
                f"scores_rows/d{d}/bs{bs}/stride{st}/varlen{varlen}",
                "proxyattn.kernels.estimate_scores",
                "_proxy_rows_kernel",
                types,
                consts,
                div16,
                num_warps,
                rows_stages(qb * rpb, block_d, bs),
                ROWS_ARGS,
                {"QB": qb},
            )
        )
    for bs, st, varlen in itertools.product(blocks, strides, (0, 1)):
        types = {n: "i32" for n in SCORES_FINISH_ARGS}
        types.update(rmax_ptr="*fp32", lse_ptr="*fp32", cu_ptr="*i32", out_ptr="*fp32")
        consts = dict(STRIDE=st, BS=bs, RPB=bs // st, BLOCK_C=_ROWS_BLOCK_C, VARLEN=bool(varlen))
        for c in consts:
            types[c] = "constexpr"
        out.append(
            Variant(
                f"scores_finish/bs{bs}/stride{st}/varlen{varlen}",
                "proxyattn.kernels.estimate_scores",
                "_scores_from_rows_kernel",
                types,
                consts,
                ("rmax_ptr", "lse_ptr", "cu_ptr", "out_ptr"),
                4,
                1,
                SCORES_FINISH_ARGS,
            )
        )
    return out


BUDGET_ARGS = (
    "q_ptr",
    "k_ptr",
    "cu_ptr",
    "mstat_ptr",
    "lstat_ptr",
    "lse_ptr",
    "mass_ptr",
    "seq_len",
    "nb_max",
    "num_q_heads",
    "qk_scale",
    "stride_qb",
    "stride_qt",
    "stride_qh",
    "stride_qd",
    "stride_kb",
    "stride_kt",
    "stride_kh",
    "stride_kd",
    "GROUP",
    "NCHUNK",
    "CB",
    "BS",
    "HEAD_DIM",
    "BLOCK_D",
    "VARLEN",
    "PASS",
    "DOT_PREC",
    "UPCAST",
    "ROWS",
    "LOG_MASS",
)


def budget_variants(dtypes, dims, blocks):
    out = []
    # pass 0 with LOG_MASS: row statistics and every row's log2 block masses (the one sweep over the keys; the
    # masses come from `_finish_mass_kernel`, `finish_variants`)
    pas, rows = 0, False
    for dt, d, bs, varlen in itertools.product(dtypes, dims, blocks, (0, 1)):
        block_d = _next_pow2(d)
        types = {n: "i32" for n in BUDGET_ARGS}
        types.update(
            q_ptr=f"*{dt}",
            k_ptr=f"*{dt}",
            cu_ptr="*i32",
            mstat_ptr="*fp32",
            lstat_ptr="*fp32",
            lse_ptr="*fp32",
            mass_ptr="*fp32",
            qk_scale="fp32",
        )
        consts = dict(
            stride_qd=1,
            stride_kd=1,
            BS=bs,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            VARLEN=bool(varlen),
            PASS=pas,
            DOT_PREC="tf32",
            UPCAST=False,
            ROWS=rows,
            LOG_MASS=True,
        )
        for c in consts:
            types[c] = "constexpr"
        div16 = (
            "q_ptr",
            "k_ptr",
            "cu_ptr",
            "mstat_ptr",
            "lstat_ptr",
            "lse_ptr",
            "mass_ptr",
            "stride_qb",
            "stride_qt",
            "stride_qh",
            "stride_kb",
            "stride_kt",
            "stride_kh",
        )
        out.append(
            Variant(
                f"budget/{dt}/d{d}/bs{bs}/varlen{varlen}/pass{pas}",
                "proxyattn.kernels.estimate_budgets",
                "_budget_kernel",
                types,
                consts,
                div16,
                8 if block_d >= 128 else 4,
                2,
                BUDGET_ARGS,
            )
        )
    return out


FINISH_ARGS = ("lm_ptr", "lse_ptr", "mass_ptr", "cu_ptr", "seq_len", "nb_max", "num_q_heads", "BS", "BLOCK_N", "ROWS", "VARLEN")


def finish_variants(blocks):
    """estimate_budgets._finish_mass_kernel per {block, padded/varlen} x {mean mass (rules 0/1, the early decision),
    per-row mass (rule 2)}; BLOCK_N = estimate_budgets._FINISH_BLOCKS key blocks per program."""
    from proxyattn.kernels.estimate_budgets import _FINISH_BLOCKS

    out = []
    for bs, varlen, rows in itertools.product(blocks, (0, 1), (0, 1)):
        types = {n: "i32" for n in FINISH_ARGS}
        types.update(lm_ptr="*fp32", lse_ptr="*fp32", mass_ptr="*fp32", cu_ptr="*i32")
        consts = dict(BS=bs, BLOCK_N=_FINISH_BLOCKS, ROWS=bool(rows), VARLEN=bool(varlen))
        for c in consts:
            types[c] = "constexpr"
        div16 = ("lm_ptr", "lse_ptr", "mass_ptr", "cu_ptr")
        out.append(
            Variant(
                f"finish/bs{bs}/varlen{varlen}/rows{rows}",
                "proxyattn.kernels.estimate_budgets",
                "_finish_mass_kernel",
                types,
                consts,
                div16,
                4,
                1,
                FINISH_ARGS,
            )
        )
    return out


RANK_ARGS = ("scores_ptr", "order_ptr", "rank_ptr", "sink_ptr", "diag_ptr", "nb", "KEEP_SINK", "KEEP_DIAG", "BLOCK")


def rank_variants():
    """estimate_rank._rank_kernel per BLOCK (16 .. 4096); KEEP_SINK / KEEP_DIAG are runtime i1 (bool) values."""
    out = []
    for block in RANK_BLOCKS:
        types = {
            "scores_ptr": "*fp32",
            "order_ptr": "*i32",
            "rank_ptr": "*i32",
            "sink_ptr": "*i32",
            "diag_ptr": "*i32",
            "nb": "i32",
            "KEEP_SINK": "i1",
            "KEEP_DIAG": "i1",
            "BLOCK": "constexpr",
        }
        div16 = ("scores_ptr", "order_ptr", "rank_ptr", "sink_ptr", "diag_ptr")
        out.append(
            Variant(
                f"rank/block{block}",
                "proxyattn.kernels.estimate_rank",
                "_rank_kernel",
                types,
                {"BLOCK": block},
                div16,
                4 if block <= 1024 else 8,
                3,
                RANK_ARGS,
            )
        )
    return out


NEEDS_MASS_ARGS = (
    "q_ptr",
    "k_ptr",
    "cu_ptr",
    "skip_ptr",
    "mass_ptr",
    "lse_ptr",
    "seq_len",
    "nb_max",
    "num_kv_heads",
    "m_lo",
    "n_slots",
    "qk_scale",
    "stride_qb",
    "stride_qt",
    "stride_qh",
    "stride_qd",
    "stride_kb",
    "stride_kt",
    "stride_kh",
    "stride_kd",
    "GROUP",
    "ROWS",
    "RB",
    "QB",
    "BS",
    "HEAD_DIM",
    "BLOCK_D",
    "VARLEN",
    "LAST_ONLY",
    "SKIP",
    "DOT_PREC",
    "UPCAST",
    "HEAVY_FIRST",
)
NEEDS_CUT_ARGS = (
    "mass_ptr",
    "lse_ptr",
    "order_ptr",
    "sink_ptr",
    "diag_ptr",
    "cu_ptr",
    "skip_ptr",
    "need_ptr",
    "counts_ptr",
    "seq_len",
    "nb_max",
    "num_kv_heads",
    "kv_per_rank",
    "m_lo",
    "n_slots",
    "gamma",
    "min_blocks",
    "dense_below",
    "GROUP",
    "ROWS",
    "RB",
    "BS",
    "CH",
    "VARLEN",
    "LAST_ONLY",
    "SKIP",
    "COUNTS",
    "KEEP_SINK",
    "KEEP_DIAG",
)
CUT_CHUNK = 128  # estimate_needs._CUT_CHUNK


def needs_rbs() -> list:
    """(rows, RB) pairs compiled: RB = next_pow2(group * rows) for every group up to MAX_NEEDS_GROUP."""
    return sorted({(rows, _next_pow2(g * rows)) for rows in ROWS for g in range(1, MAX_NEEDS_GROUP + 1)})


def needs_variants(dtypes, dims, blocks):
    """estimate_needs._mass_kernel and _cut_kernel as `_launch_needs` runs them for a plan: every query block
    (LAST_ONLY off), skip flags on (SKIP: the library passes zeros when there is no early decision), counts on;
    GROUP runtime; the cut kernel's KEEP_SINK / KEEP_DIAG runtime i32; the mass kernel's stages
    and warps (`estimate_needs.mass_stages`, `mass_warps`)."""
    from proxyattn.kernels.estimate_needs import mass_stages, mass_warps

    out = []
    for dt, d, bs, varlen, (rows, rb) in itertools.product(dtypes, dims, blocks, (0, 1), needs_rbs()):
        block_d = _next_pow2(d)
        qb = max(NEEDS_QB, -(-16 // rb))
        types = {n: "i32" for n in NEEDS_MASS_ARGS}
        types.update(q_ptr=f"*{dt}", k_ptr=f"*{dt}", cu_ptr="*i32", skip_ptr="*i32", mass_ptr="*fp32", lse_ptr="*fp32", qk_scale="fp32")
        consts = dict(
            stride_qd=1,
            stride_kd=1,
            ROWS=rows,
            RB=rb,
            QB=qb,
            BS=bs,
            HEAD_DIM=d,
            BLOCK_D=block_d,
            VARLEN=bool(varlen),
            LAST_ONLY=False,
            SKIP=True,
            DOT_PREC="tf32",
            UPCAST=False,
            HEAVY_FIRST=True,
        )
        for c in consts:
            types[c] = "constexpr"
        div16 = (
            "q_ptr",
            "k_ptr",
            "cu_ptr",
            "skip_ptr",
            "mass_ptr",
            "lse_ptr",
            "stride_qb",
            "stride_qt",
            "stride_qh",
            "stride_kb",
            "stride_kt",
            "stride_kh",
        )
        out.append(
            Variant(
                f"needs_mass/{dt}/d{d}/bs{bs}/rows{rows}/rb{rb}/varlen{varlen}",
                "proxyattn.kernels.estimate_needs",
                "_mass_kernel",
                types,
                consts,
                div16,
                mass_warps(qb, rb, block_d),
                mass_stages(qb, rb, block_d, bs),
                NEEDS_MASS_ARGS,
                {"QB": qb},
            )
        )
    for bs, varlen, (rows, rb) in itertools.product(blocks, (0, 1), needs_rbs()):
        types = {n: "i32" for n in NEEDS_CUT_ARGS}
        types.update(
            mass_ptr="*fp32",
            lse_ptr="*fp32",
            order_ptr="*i32",
            sink_ptr="*i32",
            diag_ptr="*i32",
            cu_ptr="*i32",
            skip_ptr="*i32",
            need_ptr="*i32",
            counts_ptr="*i32",
            gamma="fp32",
        )
        consts = dict(ROWS=rows, RB=rb, BS=bs, CH=CUT_CHUNK, VARLEN=bool(varlen), LAST_ONLY=False, SKIP=True, COUNTS=True)
        for c in consts:
            types[c] = "constexpr"
        div16 = ("mass_ptr", "lse_ptr", "order_ptr", "sink_ptr", "diag_ptr", "cu_ptr", "skip_ptr", "need_ptr", "counts_ptr")
        out.append(
            Variant(
                f"needs_cut/bs{bs}/rows{rows}/rb{rb}/varlen{varlen}",
                "proxyattn.kernels.estimate_needs",
                "_cut_kernel",
                types,
                consts,
                div16,
                4,
                3,
                NEEDS_CUT_ARGS,
            )
        )
    return out


# Parameters the Python path specialises as constexpr but the library passes at run time (they vary with the
# model's head counts or the sequence length and are only used in integer arithmetic and loop bounds).
RUNTIME_INTS = ("GROUP", "RGROUP", "HPG", "NCHUNK", "CB")


def compile_variant(v: Variant, out_dir: str) -> dict:
    """Compile one variant (runs in a worker process; proxyattn comes from the installed project or PYTHONPATH,
    which cmake sets to the repository); returns its manifest entry."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    mod = importlib.import_module(v.module)
    fn = getattr(mod, v.fn)
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotuner/heuristics
        fn = fn.fn
    names = tuple(fn.arg_names)
    types = dict(v.types)
    consts = dict(v.constexprs)
    # New trailing constexpr parameters with a default are accepted at their default; anything else is a change
    # of the calling convention that the launchers in cpp/src/proxyattn.cpp must follow first.
    extra = names[len(v.expected_args) :]
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not inspect.Parameter.empty}
    if names[: len(v.expected_args)] != v.expected_args or any(n not in defaults for n in extra):
        raise SystemExit(
            f"{v.module}.{v.fn} has parameters {names}, but cpp/tools/generate_kernels.py and cpp/src/proxyattn.cpp "
            f"expect {v.expected_args}: update both launchers to the kernel's new signature"
        )
    for n in extra:
        types[n] = "constexpr"
        consts[n] = defaults[n]
    idx = {n: i for i, n in enumerate(names)}
    for n in RUNTIME_INTS:
        if n in types and n not in v.constexprs:
            types[n] = "i32"
    attrs = {(idx[n],): [["tt.divisibility", 16]] for n in v.div16}
    src = ASTSource(fn=fn, signature={n: types[n] for n in names}, constexprs=consts, attrs=attrs)
    options = {"num_warps": v.num_warps, "num_stages": v.num_stages}
    if v.maxnreg:
        options["maxnreg"] = v.maxnreg
    cc = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    md = cc.metadata
    if md.global_scratch_size or md.profile_scratch_size:
        raise SystemExit(
            f"{v.key}: needs global/profile scratch ({md.global_scratch_size}/{md.profile_scratch_size} bytes), "
            "which the library's launcher does not provide"
        )
    if getattr(md, "num_ctas", 1) != 1 or getattr(md, "launch_cooperative_grid", False) or getattr(md, "launch_pdl", False):
        raise SystemExit(f"{v.key}: cluster/cooperative/PDL launches are not supported by the library's launcher")
    ptx = cc.asm["ptx"]
    entry = md.name
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    num_params = len(re.findall(r"\.param\s", m.group(1))) if m else -1
    visible = [n for n in names if types[n] != "constexpr"]
    if num_params != len(visible) + 2:
        raise SystemExit(f"{v.key}: the entry has {num_params} parameters, expected {len(visible)} visible + 2 scratch")
    fname = v.key.replace("/", "_") + ".cubin"
    Path(out_dir, fname).write_bytes(cc.asm["cubin"])
    return {
        "key": v.key,
        "entry": entry,
        "file": fname,
        "cubin_bytes": len(cc.asm["cubin"]),
        "shared": md.shared,
        "num_warps": v.num_warps,
        "num_stages": v.num_stages,
        "maxnreg": v.maxnreg,
        "num_params": num_params,
        "triton": 1,
        "params": visible,
        "param_types": [types[n] for n in visible],
        "constexprs": consts,
        "meta": v.meta,
    }


def compile_helpers(nvcc: str, out_dir: Path) -> dict:
    cubin = out_dir / "helpers.cubin"
    cmd = [nvcc, "-cubin", "-arch=sm_90", "-O3", "-std=c++17", "-I", str(CPP / "src"), str(CPP / "src" / "helpers.cu"), "-o", str(cubin)]
    subprocess.run(cmd, check=True)
    return {"file": "helpers.cubin", "cubin_bytes": cubin.stat().st_size, "command": " ".join(cmd)}


HELPERS = [  # (key, entry, threads are chosen by the launcher; maximum dynamic shared memory, params)
    ("helper/budgets", "pa_budgets", (2 * 8192 + 128) * 4, 15),  # budgets_scratch_words(kMaxBlocks, 128) words
    ("helper/select", "pa_select", 64 * 1024, 13),
    ("helper/combine_lse", "pa_combine_lse", 0, 6),
    ("helper/early_dense", "pa_early_dense", 0, 9),
    ("helper/needs_budgets", "pa_needs_budgets", 0, 11),
    ("helper/dense_fallback", "pa_dense_fallback", 0, 8),  # static shared memory only
]


def write_table(out_dir: Path, entries: list, helpers: dict) -> None:
    lines = [
        "// GENERATED by cpp/tools/generate_kernels.py: do not edit. Embeds the kernel cubins (.incbin).",
        '#include "driver.hpp"',
        "",
        "#include <cstring>",
        "",
    ]
    blobs = [(e["key"], e["file"]) for e in entries] + [("helpers", helpers["file"])]
    for i, (_, f) in enumerate(blobs):
        path = str((out_dir / f).resolve()).replace("\\", "/")
        lines.append(
            f'__asm__(".section .rodata\\n.balign 16\\n.type pa_blob_{i}, @object\\npa_blob_{i}:\\n.incbin \\"{path}\\"\\n.previous\\n");'
        )
        lines.append(f'extern "C" const unsigned char pa_blob_{i}[];')
    lines += ["", "namespace proxyattn {", "", "extern const KernelImage kKernelImages[] = {"]
    for i, e in enumerate(entries):
        lines.append(
            f'    {{"{e["key"]}", "{e["entry"]}", pa_blob_{i}, {e["cubin_bytes"]}u, {e["shared"]}u, '
            f"{e['num_warps']}u, {e['num_params']}u, 1}},"
        )
    hb = len(entries)
    for key, entry, shared, nparams in HELPERS:
        lines.append(f'    {{"{key}", "{entry}", pa_blob_{hb}, {helpers["cubin_bytes"]}u, {shared}u, 0u, {nparams}u, 0}},')
    lines += [
        "};",
        f"extern const int kNumKernelImages = {len(entries) + len(HELPERS)};",
        "",
        "const KernelImage *find_kernel(const char *key) {",
        "  for (int i = 0; i < kNumKernelImages; ++i)",
        "    if (std::strcmp(kKernelImages[i].key, key) == 0) return &kKernelImages[i];",
        "  return nullptr;",
        "}",
        "",
        "}  // namespace proxyattn",
        "",
    ]
    text = "\n".join(lines)
    target = out_dir / "kernel_table.cpp"
    if not target.exists() or target.read_text() != text:
        tmp = target.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--nvcc", default=shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc")
    ap.add_argument("--jobs", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--quick", action="store_true", help="one variant per kernel (bf16, D=128, block 128)")
    ap.add_argument(
        "--attn-config", default=None, help="BLOCK_N,num_warps,num_stages[,maxnreg] for every attention variant (default: attention_config)"
    )
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    dtypes = ("bf16",) if args.quick else tuple(DTYPES)
    dims = (128,) if args.quick else HEAD_DIMS
    blocks = (128,) if args.quick else BLOCK_SIZES
    override = None
    if args.attn_config:
        f = [int(x) for x in args.attn_config.split(",")]
        override = {"BLOCK_N": f[0], "num_warps": f[1], "num_stages": f[2], "maxnreg": f[3] if len(f) > 3 else None}
    variants = attention_variants(dtypes, dims, blocks, override) + pool_variants(dtypes, dims, STRIDES)
    variants += scores_variants(dims, blocks, STRIDES)
    variants += budget_variants(dtypes, dims, blocks) + finish_variants(blocks)
    variants += rank_variants() + needs_variants(dtypes, dims, blocks)
    print(f"[generate_kernels] {len(variants)} Triton variants + CUDA C helpers -> {out}", flush=True)
    with tempfile.TemporaryDirectory(dir=out) as stage:
        helpers = compile_helpers(args.nvcc, Path(stage))
        entries = []
        with cf.ProcessPoolExecutor(max_workers=args.jobs) as ex:
            futs = [ex.submit(compile_variant, v, stage) for v in variants]
            for i, f in enumerate(futs):
                entries.append(f.result())
                if (i + 1) % 8 == 0 or i + 1 == len(futs):
                    print(f"[generate_kernels] compiled {i + 1}/{len(futs)}", flush=True)
        for f in Path(stage).iterdir():
            f.replace(out / f.name)
    import triton

    srcs = sorted({v.module for v in variants})
    manifest = {
        "triton": triton.__version__,
        "target": "cuda:90 (sm_90a cubin)",
        "sources": {m: hashlib.sha256((REPO / (m.replace(".", "/") + ".py")).read_bytes()).hexdigest()[:16] for m in srcs},
        "helpers": helpers,
        "kernels": entries,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / "manifest.json")
    write_table(out, entries, helpers)
    print(f"[generate_kernels] wrote {out / 'kernel_table.cpp'}", flush=True)


if __name__ == "__main__":
    main()
