#!/usr/bin/env python3
"""GPU check of libproxyattn (cpp/): the C library's output against the PyTorch path, and both timed.

Run on the device machine (not in the CPU suite), from the repository root:

    python3 -m tests.gpu.check_cpp --lib DIR [--alt DIR ...] --out OUTDIR [--commit SHA]

DIR holds libproxyattn.so.0, proxyattn_example and manifest.json (a build of cpp/, made here or on the CPU machine
and carried); --build makes one with cmake first. --alt DIRs are quick builds with other attention configs, timed
against the main one. Every check draws fresh inputs and poisons outputs with NaN (an unwritten element fails).

1. Every compiled variant (bf16/fp16 x D 64/128/256 x block 64/128 x padded/varlen), small ragged shapes, sparse
   config with the default budget rule 3 and dense fallback: the library's plan (order, counts, budgets) equal to
   proxyattn.plan_blocks / plan_blocks_varlen on the GPU (the same Triton kernels: exact), its output and LSE against
   the fp32 reference attention on the library's own plan; rules 0-2 (with the fallback) on one variant per layout
   against the fp32 reference plan (up to score ties: proxyattn.testing).
2. 8K-32K, Llama-3-8B attention shapes (32 q / 8 KV heads, D 128, bf16), structured and random inputs, the default
   config (dense up to its crossover, 32K) and the default with dense_below_tokens 8192 (rule 3 and the dense
   fallback on the sparse path; random inputs send every group dense by the early decision): output against
   proxyattn.proxy_attention (the PyTorch/Triton path) within bf16 tolerance, plan agreement with plan_blocks, and the
   Python block-sparse kernel on the library's plan; rules 0-2 with the fallback at 16K; a packed varlen batch
   against proxy_attention_varlen; the dense path; CUDA-graph capture of the C call.
3. The example program (.npy in, .npy out) at 8K against the same output.
4. Timing (do_bench median, rotated inputs): libproxyattn vs proxy_attention vs dense attention at 8K/16K/32K.

Writes OUTDIR/cpp_<date>.json and prints a table; exit status 1 on any failed check. Run from the repository root;
the checks (not the timings) also run under pytest as tests/gpu/test_gpu_cpp.py (`pytest -m gpu tests/gpu`).
"""

from __future__ import annotations

import argparse
import ctypes as C
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import triton
from triton.testing import do_bench

import proxyattn
from proxyattn import ProxyAttnConfig, reference
from proxyattn.plan import BlockPlan, compact_plan, dense_fallback
from tests.cpp.libproxyattn import Config, Problem, load_lib  # the C API as the CPU tests declare it
from proxyattn.testing import budget_mismatches, plan_mismatches, row_budget_mismatches, structured_qkv
from tests.helpers import assert_close

REPO = Path(__file__).resolve().parents[2]

RESULTS: list[dict] = []
TIMINGS: list[dict] = []
DT = {torch.bfloat16: 1, torch.float16: 0}
DEV = "cuda"


def record(name: str, fn) -> None:
    t0 = time.perf_counter()
    entry = {"check": name}
    try:
        info = fn()
        if DEV == "cuda":
            torch.cuda.synchronize()  # a device fault of this check is reported here, not by the next one
        entry.update(ok=True, seconds=round(time.perf_counter() - t0, 1), info=info)
    except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the script at the end
        entry.update(ok=False, seconds=round(time.perf_counter() - t0, 1), error=f"{type(e).__name__}: {str(e)[:600]}")
    RESULTS.append(entry)
    print(("PASS " if entry["ok"] else "FAIL ") + name + " " + json.dumps(entry.get("info", entry.get("error"))), flush=True)


# ----------------------------------------------------------------------------------------------- the library
class Lib:
    def __init__(self, directory: Path):
        self.dir = directory
        self.lib = load_lib(directory, "libproxyattn.so.0")  # the installed soname
        self._ws: dict[int, torch.Tensor] = {}

    def _check(self, st: int, what: str) -> None:
        if st != 0:
            raise RuntimeError(f"{what}: {self.lib.proxyattn_status_name(st).decode()}: {self.lib.proxyattn_last_error().decode()}")

    @staticmethod
    def config(cfg: ProxyAttnConfig) -> Config:
        return Config(
            cfg.block_size,
            cfg.stride,
            cfg.proxy_heads,
            cfg.gamma,
            cfg.min_budget_tokens,
            int(cfg.keep_sink),
            int(cfg.keep_diagonal),
            cfg.dense_below_tokens,
            cfg.budget_fraction or 0.0,
            int(cfg.budget_rule),
            cfg.recall_rows,
            cfg.dense_density or 0.0,
        )

    @staticmethod
    def problem(q, k, cu=None, max_seqlen=None, scale=None, bhsd=False) -> Problem:
        if bhsd:
            b, hq, s, d = q.shape
            return Problem(DT[q.dtype], b, s, None, 0, hq, k.shape[1], d, scale or 0.0, 1)
        if cu is None:
            b, s, hq, d = q.shape
            return Problem(DT[q.dtype], b, s, None, 0, hq, k.shape[2], d, scale or 0.0)
        t, hq, d = q.shape
        return Problem(DT[q.dtype], cu.numel() - 1, max_seqlen, cu.data_ptr(), t, hq, k.shape[1], d, scale or 0.0)

    def workspace(self, prob, cfg) -> tuple[torch.Tensor, int]:
        n = C.c_size_t(0)
        self._check(self.lib.proxyattn_workspace_size(C.byref(prob), C.byref(cfg), C.byref(n)), "workspace_size")
        if n.value not in self._ws:
            self._ws[n.value] = torch.empty(max(n.value, 16), dtype=torch.uint8, device=DEV)
        return self._ws[n.value], n.value

    def prefill(self, q, k, v, cfg: ProxyAttnConfig, cu=None, max_seqlen=None, lse=False, out=None, bhsd=False):
        prob, c = self.problem(q, k, cu, max_seqlen, bhsd=bhsd), self.config(cfg)
        ws, n = self.workspace(prob, c)
        if out is None:
            out = torch.full_like(q, float("nan"))
        if lse:
            shape = (q.shape[0], q.shape[2], q.shape[1]) if cu is None else (q.shape[1], q.shape[0])
            lse_t = torch.full(shape, float("nan"), device=DEV, dtype=torch.float32)
        st = self.lib.proxyattn_prefill(
            C.byref(prob),
            C.byref(c),
            q.data_ptr(),
            k.data_ptr(),
            v.data_ptr(),
            out.data_ptr(),
            lse_t.data_ptr() if lse else None,
            ws.data_ptr(),
            n,
            torch.cuda.current_stream().cuda_stream,
        )
        self._check(st, "proxyattn_prefill")
        return (out, lse_t) if lse else out

    def plan(self, q, k, cfg: ProxyAttnConfig, cu=None, max_seqlen=None) -> BlockPlan:
        prob, c = self.problem(q, k, cu, max_seqlen), self.config(cfg)
        ws, n = self.workspace(prob, c)
        b = prob.batch
        nb = math.ceil(prob.seq_len / cfg.block_size)
        order = torch.full((b, cfg.proxy_heads, nb, nb), -1, dtype=torch.int32, device=DEV)
        counts = torch.full((b, prob.num_q_heads, nb), -1, dtype=torch.int32, device=DEV)
        budgets = torch.full((b, prob.num_q_heads), -1, dtype=torch.int32, device=DEV)
        st = self.lib.proxyattn_plan(
            C.byref(prob),
            C.byref(c),
            q.data_ptr(),
            k.data_ptr(),
            order.data_ptr(),
            counts.data_ptr(),
            budgets.data_ptr(),
            ws.data_ptr(),
            n,
            torch.cuda.current_stream().cuda_stream,
        )
        self._check(st, "proxyattn_plan")
        return BlockPlan(order, counts, budgets, cfg.block_size, prob.seq_len)


class PythonLib(Lib):
    """--dry-cpu: the same interface on the Python path (CPU reference), to test this script without a GPU."""

    def __init__(self):  # no library to load
        self.dir = Path(".")

    def prefill(self, q, k, v, cfg, cu=None, max_seqlen=None, lse=False, out=None):
        if cu is None:
            o = proxyattn.proxy_attention(q, k, v, cfg)
            l_ = proxyattn.block_sparse_attention_with_lse(q, k, v, proxyattn.plan_blocks(q, k, cfg))[1] if lse else None
        else:
            o = proxyattn.proxy_attention_varlen(q, k, v, cu, max_seqlen, cfg)
            l_ = None
            if lse:
                l_ = torch.empty(q.shape[1], q.shape[0])
                cl = cu.tolist()
                for lo, hi in zip(cl[:-1], cl[1:]):
                    xs = [x[None, lo:hi] for x in (q, k, v)]
                    l_[:, lo:hi] = proxyattn.block_sparse_attention_with_lse(*xs, self.plan(*xs[:2], cfg))[1][0]
        if out is not None:
            out.copy_(o)
            o = out
        return (o, l_) if lse else o

    def plan(self, q, k, cfg, cu=None, max_seqlen=None):
        if cu is None:
            p = proxyattn.plan_blocks(q, k, cfg)
            if q.shape[1] <= cfg.dense_below_tokens:
                nb = p.num_blocks
                order = torch.arange(nb, dtype=torch.int32).expand(q.shape[0], cfg.proxy_heads, nb, nb).contiguous()
                counts = torch.arange(1, nb + 1, dtype=torch.int32).expand(q.shape[0], q.shape[2], nb).contiguous()
                p = BlockPlan(order, counts, torch.full((q.shape[0], q.shape[2]), nb, dtype=torch.int32), cfg.block_size, q.shape[1])
            return p
        return proxyattn.plan_blocks_varlen(q, k, cu, max_seqlen, cfg)


# ----------------------------------------------------------------------------------------------- references
def ref_mass(q, k, block_size: int, scale: float) -> torch.Tensor:
    """reference.head_budgets' attention mass per key block `[B, Hq, Nb]` (fp32)."""
    b, s, hq, _ = q.shape
    nb = -(-s // block_size)
    last = min(block_size, s)
    rows = torch.arange(s - last, s, device=q.device)
    kx = k.float().repeat_interleave(hq // k.shape[2], dim=2)
    logits = torch.einsum("brhd,bkhd->bhrk", q.float()[:, rows], kx) * scale
    logits = logits.masked_fill(torch.arange(s, device=q.device)[None, :] > rows[:, None], float("-inf"))
    mass = torch.softmax(logits, dim=-1).mean(dim=2)
    return torch.nn.functional.pad(mass, (0, nb * block_size - s)).reshape(b, hq, nb, block_size).sum(-1)


def check_plan_vs_reference(plan: BlockPlan, q, k, cfg: ProxyAttnConfig, scale: float) -> dict:
    """The library's plan of one padded batch against the fp32 reference, up to ties."""
    s = q.shape[1]
    nb = plan.num_blocks
    if s <= cfg.dense_below_tokens:
        full = torch.arange(1, nb + 1, device=DEV, dtype=torch.int32).expand_as(plan.counts)
        assert torch.equal(plan.counts, full), "dense sequence without the keep-everything plan"
        return {"dense": True}
    scores = reference.proxy_scores(q, k, proxy_heads=cfg.proxy_heads, block_size=cfg.block_size, stride=cfg.stride, scale=scale)
    if cfg.budget_fraction is None and cfg.gamma < 1.0 and cfg.budget_rule == 0:
        bad_budgets = budget_mismatches(plan.budget_blocks, ref_mass(q, k, cfg.block_size, scale), cfg.gamma)
    elif cfg.budget_fraction is None and cfg.gamma < 1.0:
        # Rules 1/2 count along the last query block's ranking of the scores the library computed: the same proxy
        # scores kernel as the Python path, so its order (score ties included) is the library's.
        own = proxyattn.proxy_scores(q, k, cfg, scale=scale)
        order = reference.last_row_order(own, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal)
        order = order.repeat_interleave(q.shape[2] // cfg.proxy_heads, dim=1)
        if cfg.budget_rule == 1:
            bad_budgets = budget_mismatches(plan.budget_blocks, ref_mass(q, k, cfg.block_size, scale), cfg.gamma, order=order)
        else:
            rows = reference.last_block_row_mass(q, k, block_size=cfg.block_size, scale=scale)
            bad_budgets = row_budget_mismatches(plan.budget_blocks, rows, cfg.gamma, order)
    else:
        want = (
            reference.fraction_budgets(q.shape[0], q.shape[2], nb, cfg.budget_fraction, DEV)
            if cfg.budget_fraction
            else torch.full_like(plan.budget_blocks, nb)
        )
        bad_budgets = int((want != plan.budget_blocks).sum())
    ref_plan = compact_plan(scores, plan.budget_blocks, s, cfg)  # same budgets: isolates the selection
    if cfg.dense_density_permille:  # the dense fallback: the GPU path's early decision, the late one on the plan
        ref_plan = dense_fallback(ref_plan, k.shape[2], cfg, early=proxyattn.early_dense_groups(q, k, cfg, scale=scale))
    bad_rows = plan_mismatches(plan, ref_plan, scores, min_blocks=cfg.min_budget_blocks)
    assert bad_budgets == 0, f"{bad_budgets} budgets differ from the reference beyond ties"
    assert bad_rows == 0, f"{bad_rows} plan rows differ from the reference beyond score ties"
    rows_identical = float(((plan.to_mask() == ref_plan.to_mask()).all(-1)).float().mean())
    return {"rows_identical": round(rows_identical, 5), "density": round(float(plan.density().mean()), 4)}


def check_plan_vs_python(plan: BlockPlan, q, k, cfg: ProxyAttnConfig, cu=None, max_seqlen=None) -> dict:
    """The library's plan against the GPU path's (proxyattn.plan_blocks / plan_blocks_varlen: the same Triton kernels
    for scores, rankings and rule 3's needs, torch ops where the library has CUDA C helpers): kept blocks, counts and
    budgets equal, query blocks of each sequence (packed: its own Nb_b) only."""
    if cu is None:
        py = proxyattn.plan_blocks(q, k, cfg)
        nbs = [plan.num_blocks] * q.shape[0]
        if q.shape[1] <= cfg.dense_below_tokens:
            raise AssertionError("check_plan_vs_python needs a sparse sequence")
    else:
        py = proxyattn.plan_blocks_varlen(q, k, cu, max_seqlen, cfg)
        nbs = [-(-int(n) // cfg.block_size) for n in (cu[1:] - cu[:-1]).tolist()]
    mc, mp = plan.to_mask(), py.to_mask()
    rows = diff_rows = 0
    for i, n in enumerate(nbs):
        same = (mc[i, :, :n, :n] == mp[i, :, :n, :n]).all(-1) & (plan.counts[i, :, :n] == py.counts[i, :, :n])
        rows += same.numel()
        diff_rows += int((~same).sum())
    same_budgets = bool(torch.equal(plan.budget_blocks, py.budget_blocks))
    dense = None if py.dense_heads is None else int(py.dense_heads.sum())
    info = {
        "plan_rows": rows,
        "rows_differing_from_plan_blocks": diff_rows,
        "budgets_equal": same_budgets,
        "dense_heads_py": dense,
        "density_c": round(float(plan.density().mean()), 4),
    }
    assert diff_rows == 0 and same_budgets, f"the library's plan differs from plan_blocks: {info}"
    return info


def fresh(b, s, hq, hkv, d, dtype, kind: str, seed: int):
    if kind == "structured":
        return structured_qkv(b, s, hq, hkv, d, dtype=dtype, device=DEV, seed=seed)
    g = torch.Generator(device=DEV).manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g, device=DEV, dtype=torch.float32).to(dtype) for h in (hq, hkv, hkv))


def prec(dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp16"


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- checks
def check_variant(lib: Lib, dtype, d: int, bs: int, varlen: bool, seed: int, rule: int | None = None) -> dict:
    """Small ragged problem through every kernel of one compiled variant, against the fp32 reference (budget rule
    `rule`, default: the config's)."""
    hq, hkv = (8, 2) if d < 256 else (4, 1)
    cfg = ProxyAttnConfig(block_size=bs, gamma=0.9, min_budget_tokens=bs, dense_below_tokens=0, proxy_heads=2 if hkv == 2 else 1)
    if rule is not None:
        cfg = cfg.replace(budget_rule=rule)
    scale = 1.0 / math.sqrt(d)
    lengths = [5 * bs + 17, 9 * bs - 3] if varlen else [7 * bs + 11] * 2
    seqs = [fresh(1, n, hq, hkv, d, dtype, "structured", seed + i) for i, n in enumerate(lengths)]
    info = {}
    if varlen:
        q, k, v = (torch.cat([x[j][0] for x in seqs]).contiguous() for j in range(3))
        cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=DEV)
        out, lse = lib.prefill(q, k, v, cfg, cu=cu, max_seqlen=max(lengths), lse=True)
        plan = lib.plan(q, k, cfg, cu=cu, max_seqlen=max(lengths))
        for i, n in enumerate(lengths):
            lo = int(cu[i])
            qi, ki, vi = (x[None, lo : lo + n] for x in (q, k, v))
            nbi = -(-n // bs)
            sub = BlockPlan(
                plan.order[i : i + 1, :, :nbi, :nbi].contiguous(),
                plan.counts[i : i + 1, :, :nbi].contiguous(),
                plan.budget_blocks[i : i + 1].contiguous(),
                bs,
                n,
            )
            if cfg.budget_rule != 3:
                info[f"seq{i}"] = check_plan_vs_reference(sub, qi, ki, cfg, scale)
            ro, rl = reference.block_sparse_attention(qi, ki, vi, sub.to_mask(), block_size=bs, scale=scale)
            assert_close(out[lo : lo + n], ro[0], prec(dtype), what=f"out seq {i}")
            assert_close(lse[:, lo : lo + n], rl[0], "fp16", what=f"lse seq {i}")
        if cfg.budget_rule == 3:
            info["plan_vs_plan_blocks_varlen"] = check_plan_vs_python(plan, q, k, cfg, cu=cu, max_seqlen=max(lengths))
    else:
        q, k, v = (torch.cat([x[j] for x in seqs]).contiguous() for j in range(3))
        out, lse = lib.prefill(q, k, v, cfg, lse=True)
        plan = lib.plan(q, k, cfg)
        if cfg.budget_rule == 3:
            info["plan"] = check_plan_vs_python(plan, q, k, cfg)
        else:
            info["plan"] = check_plan_vs_reference(plan, q, k, cfg, scale)
        ro, rl = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=bs, scale=scale)
        assert_close(out, ro, prec(dtype), what="out")
        assert_close(lse, rl, "fp16", what="lse")
        info["out_rel"] = f"{rel(out, ro):.1e}"
    return info


# The default config on the sparse path at 16K-32K (its crossover is 32K): budget rule 3 and the dense fallback.
SPARSE_DEFAULT = ProxyAttnConfig(dense_below_tokens=8192)


def check_large(lib: Lib, s: int, kind: str, seed: int, cfg: ProxyAttnConfig | None = None) -> dict:
    """Llama-3-8B shapes, default config (or `cfg`): library vs proxyattn.proxy_attention; on the sparse path the
    plan equals plan_blocks'."""
    cfg = cfg or ProxyAttnConfig()
    q, k, v = fresh(1, s, 32, 8, 128, torch.bfloat16, kind, seed)
    out = lib.prefill(q, k, v, cfg)
    ref = proxyattn.proxy_attention(q, k, v, cfg)
    plan_c = lib.plan(q, k, cfg)
    plan_py = proxyattn.plan_blocks(q, k, cfg)
    mask_c, mask_py = plan_c.to_mask(), plan_py.to_mask()
    same_rows = float((mask_c == mask_py).all(-1).float().mean())
    same_budgets = float((plan_c.budget_blocks == plan_py.budget_blocks).float().mean())
    on_c_plan = proxyattn.block_sparse_attention(q, k, v, plan_c)
    info = {
        "rel_vs_proxy_attention": f"{rel(out, ref):.2e}",
        "rel_vs_python_kernel_on_c_plan": f"{rel(out, on_c_plan):.2e}",
        "plan_rows_identical": round(same_rows, 5),
        "budgets_identical": round(same_budgets, 4),
        "density_c": round(float(plan_c.density().mean()), 4),
        "density_py": round(float(plan_py.density().mean()), 4),
    }
    assert_close(out, on_c_plan, "bf16", what="library vs Python kernel on the library's plan")
    assert_close(out, ref, "bf16", what="library vs proxy_attention")
    if s > cfg.dense_below_tokens:
        info["plan_vs_plan_blocks"] = check_plan_vs_python(plan_c, q, k, cfg)
        if plan_py.dense_heads is not None:
            info["dense_heads"] = int(plan_py.dense_heads.sum())
    return info


def check_varlen_large(lib: Lib, cfg: ProxyAttnConfig | None = None) -> dict:
    cfg = cfg or ProxyAttnConfig(dense_below_tokens=4096)  # rule 3 and the fallback; 1500 <= 4096: dense
    lengths = [1500, 5000, 8269]
    parts = [fresh(1, n, 32, 8, 128, torch.bfloat16, "structured", 40 + i) for i, n in enumerate(lengths)]
    q, k, v = (torch.cat([p[j][0] for p in parts]).contiguous() for j in range(3))
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device=DEV)
    out = lib.prefill(q, k, v, cfg, cu=cu, max_seqlen=max(lengths))
    ref = proxyattn.proxy_attention_varlen(q, k, v, cu, max(lengths), cfg)
    assert_close(out, ref, "bf16", what="varlen library vs proxy_attention_varlen")
    for i, n in enumerate(lengths):
        lo = int(cu[i])
        alone = proxyattn.proxy_attention(*(x[None, lo : lo + n] for x in (q, k, v)), cfg)[0]
        assert_close(out[lo : lo + n], alone, "bf16", what=f"varlen sequence {i} vs proxy_attention alone")
    plan = lib.plan(q, k, cfg, cu=cu, max_seqlen=max(lengths))
    return {
        "rel": f"{rel(out, ref):.2e}",
        "lengths": lengths,
        "plan_vs_plan_blocks_varlen": check_plan_vs_python(plan, q, k, cfg, cu=cu, max_seqlen=max(lengths)),
    }


def check_bhsd(lib: Lib) -> dict:
    """[B, H, S, D] inputs (the ONNX node's layout) give the transposed output of the [B, S, H, D] call."""
    cfg = ProxyAttnConfig(dense_below_tokens=4096)
    q, k, v = fresh(2, 8192, 16, 4, 128, torch.bfloat16, "structured", 61)
    out = lib.prefill(q, k, v, cfg)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out_t = lib.prefill(qt, kt, vt, cfg, bhsd=True)
    assert torch.equal(out_t.transpose(1, 2), out), "BHSD call differs from the BSHD call"
    ref = proxyattn.proxy_attention(q, k, v, cfg)
    assert_close(out_t.transpose(1, 2), ref, "bf16", what="BHSD vs proxy_attention")
    return {"rel_vs_proxy_attention": f"{rel(out_t.transpose(1, 2), ref):.2e}"}


def check_dense(lib: Lib) -> dict:
    info = {}
    for s, cfg in ((2000, ProxyAttnConfig()), (6000, ProxyAttnConfig(gamma=1.0, min_budget_tokens=0, dense_below_tokens=0))):
        q, k, v = fresh(2, s, 16, 4, 128, torch.bfloat16, "random", s)
        out = lib.prefill(q, k, v, cfg)
        ref = proxyattn.dense_attention(q, k, v)
        assert_close(out, ref, "bf16", what=f"dense S={s}")
        info[f"S{s}"] = f"{rel(out, ref):.2e}"
    return info


def check_graph(lib: Lib) -> dict:
    cfg = SPARSE_DEFAULT  # rule 3, the dense fallback, the needs kernels' chunks: all captured
    q, k, v = fresh(1, 8192, 32, 8, 128, torch.bfloat16, "structured", 77)
    eager = lib.prefill(q, k, v, cfg)
    out = torch.full_like(q, float("nan"))
    lib.prefill(q, k, v, cfg, out=out)  # warm: module loads happen outside the capture
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(s):
        with torch.cuda.graph(g, stream=s):
            lib.prefill(q, k, v, cfg, out=out)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager), "graph replay differs from the eager call"
    return {"captured": True}


def check_example(lib: Lib, tmp: Path) -> dict:
    cfg = ProxyAttnConfig()
    q, k, v = fresh(1, 8192, 32, 8, 128, torch.bfloat16, "structured", 91)
    for name, t in (("q", q), ("k", k), ("v", v)):
        np.save(tmp / f"{name}.npy", t.cpu().view(torch.int16).numpy().view(np.uint16))  # bf16 bits, exact
    env = dict(os.environ, LD_LIBRARY_PATH=str(lib.dir))
    r = subprocess.run(
        [
            str(lib.dir / "proxyattn_example"),
            "--q",
            str(tmp / "q.npy"),
            "--k",
            str(tmp / "k.npy"),
            "--v",
            str(tmp / "v.npy"),
            "--out",
            str(tmp / "out.npy"),
            "--repeat",
            "5",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, f"example exited {r.returncode}: {r.stderr[-400:]}"
    out = torch.from_numpy(np.load(tmp / "out.npy")).cuda()
    lib_out = lib.prefill(q, k, v, cfg).float()
    ref = proxyattn.proxy_attention(q, k, v, cfg)
    assert torch.equal(out, lib_out), "example output differs from the library called directly"
    assert_close(out, ref, "bf16", what="example vs proxy_attention")
    return {"stdout": r.stdout.strip()[-300:], "rel_vs_proxy_attention": f"{rel(out, ref):.2e}"}


# ----------------------------------------------------------------------------------------------- timing
def time_case(lib: Lib, alts: list[Lib], s: int) -> None:
    cfg = ProxyAttnConfig()
    sets = [fresh(1, s, 32, 8, 128, torch.bfloat16, "structured", 500 + i) for i in range(2)]
    outs = [torch.empty_like(x[0]) for x in sets]
    it = {"i": 0}

    def rot():
        it["i"] ^= 1
        return it["i"]

    def c_call(L):
        def f():
            i = rot()
            L.prefill(*sets[i], cfg, out=outs[i])

        return f

    def py_call():
        i = rot()
        proxyattn.proxy_attention(*sets[i], cfg)

    def dense_call():
        i = rot()
        proxyattn.dense_attention(*sets[i])

    row = {"seq_len": s, "shape": "B1 Hq32 Hkv8 D128 bf16", "config": "default (block 128, gamma 0.95, stride 4)"}
    row["libproxyattn_ms"] = round(do_bench(c_call(lib), warmup=25, rep=200, return_mode="median"), 3)
    row["proxy_attention_ms"] = round(do_bench(py_call, warmup=25, rep=200, return_mode="median"), 3)
    row["dense_ms"] = round(do_bench(dense_call, warmup=25, rep=200, return_mode="median"), 3)
    for a in alts:
        m = json.loads((a.dir / "manifest.json").read_text())
        key = [x for x in m["kernels"] if x["key"].startswith("attn/bf16/d128/bs128/varlen0")][0]
        tag = f"libproxyattn_attn_{key['meta']['BLOCK_N']}_{key['num_warps']}_{key['num_stages']}_{key.get('maxnreg')}_ms"
        row[tag] = round(do_bench(c_call(a), warmup=25, rep=200, return_mode="median"), 3)
    row["density"] = round(float(proxyattn.plan_blocks(*sets[0][:2], cfg).density().mean()), 4)
    TIMINGS.append(row)
    print("TIME " + json.dumps(row), flush=True)


def autotune_picks() -> dict:
    from proxyattn.kernels import attention as A

    tuned = getattr(A, "_sparse_attn_fwd_tuned", None)
    picks = {}
    for key, cfg in getattr(tuned, "cache", {}).items():
        picks[str(key)] = str(cfg)
    return picks


def sources_match(lib_dir: Path) -> dict:
    """Whether the kernel sources here are the ones the library was compiled from (manifest hashes)."""
    import hashlib

    m = json.loads((lib_dir / "manifest.json").read_text())
    return {
        mod: hashlib.sha256((REPO / (mod.replace(".", "/") + ".py")).read_bytes()).hexdigest()[:16] == h for mod, h in m["sources"].items()
    }


def build(out_dir: Path) -> float:
    t0 = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run(
        ["cmake", "-S", str(REPO / "cpp"), "-B", str(out_dir), f"-DPROXYATTN_GEN_JOBS={os.cpu_count()}"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(["cmake", "--build", str(out_dir), "-j", str(os.cpu_count())], check=True, env=env, stdout=subprocess.DEVNULL)
    (out_dir / "manifest.json").write_bytes((out_dir / "generated" / "manifest.json").read_bytes())
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", type=Path, required=True)
    ap.add_argument("--alt", type=Path, action="append", default=[])
    ap.add_argument("--build", action="store_true", help="build --lib first (cmake)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--sizes", default="8192,16384,32768")
    ap.add_argument("--dry-cpu", action="store_true", help="test this script on the CPU with the Python path as 'library'")
    ap.add_argument("--stage", default="all", choices=["all", "large", "example", "timing", "misc", "variants"])
    ap.add_argument("--merge", action="store_true", help="join OUT/part_*.json into OUT/cpp_<date>.json")
    args = ap.parse_args()
    if args.merge:
        return merge(args.out)
    global DEV
    if args.dry_cpu:
        DEV = "cpu"
        return dry_run(args)
    build_s = build(args.lib) if args.build else None
    lib = Lib(args.lib)
    alts = [Lib(a) for a in args.alt]
    print("library:", lib.lib.proxyattn_version().decode(), flush=True)
    torch.manual_seed(0)
    sizes = [int(x) for x in args.sizes.split(",")]
    doc = {
        "what": "libproxyattn (C library, AOT Triton kernels + CUDA C helpers) vs the PyTorch path (proxyattn.proxy_attention)",
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "command": "python3 -m tests.gpu.check_cpp --lib cpp/build-carry/main --alt cpp/build-carry/alt-... --out $OUT "
        "--commit <sha> (builds of cpp/ made on the CPU machine and carried)",
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "library": lib.lib.proxyattn_version().decode(),
        },
        "build_seconds_on_device": build_s,
        "kernel_sources_match_build": sources_match(args.lib),
        "timing_method": "triton.testing.do_bench median (warmup 25 ms, rep 200 ms), 2 input sets rotated; "
        "libproxyattn timed through ctypes (host call overhead included)",
        "checks": RESULTS,
        "timings": TIMINGS,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / (f"cpp_{datetime.date.today().isoformat()}.json" if args.stage == "all" else f"part_{args.stage}.json")

    def dump():  # after every stage, so that a run stopped at its time limit still leaves its figures
        doc["python_autotune_picks"] = autotune_picks()
        path.write_text(json.dumps(doc, indent=1))

    # Stages (--stage): each runs in its own process in the device command, so that a device fault in one (which
    # ends the CUDA context) does not take the others' figures with it; --merge joins the parts.
    stage = args.stage
    if stage in ("all", "large"):
        for s in sizes:
            record(f"large structured S={s}", lambda: check_large(lib, s, "structured", seed=s))
        for s in sizes:
            if s > SPARSE_DEFAULT.dense_below_tokens:
                record(
                    f"large structured S={s} rule 3 + dense fallback (dense_below 8192)",
                    lambda: check_large(lib, s, "structured", seed=s + 1, cfg=SPARSE_DEFAULT),
                )
        record(
            "large random S=16384 rule 3 + dense fallback (every group dense early)",
            lambda: check_large(lib, 16384, "random", seed=4, cfg=SPARSE_DEFAULT),
        )
        for rule in (0, 1, 2):
            record(
                f"large structured S=16384 budget_rule {rule} + dense fallback",
                lambda: check_large(lib, 16384, "structured", seed=20 + rule, cfg=SPARSE_DEFAULT.replace(budget_rule=rule)),
            )
        dump()
    if stage in ("all", "example"):
        with tempfile.TemporaryDirectory() as tmp:
            record("example program 8K (.npy)", lambda: check_example(lib, Path(tmp)))
        dump()
    if stage in ("all", "timing"):
        for s in sizes:
            try:
                time_case(lib, alts, s)
            except Exception as e:  # noqa: BLE001 - a failed timing is recorded and fails the script at the end
                RESULTS.append({"check": f"timing S={s}", "ok": False, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            dump()
    if stage in ("all", "misc"):
        record("large random S=8192", lambda: check_large(lib, 8192, "random", seed=3))
        record("varlen 1500/5000/8269", lambda: check_varlen_large(lib))
        record("BHSD layout B=2 S=8192", lambda: check_bhsd(lib))
        record("dense path and gamma=1 oracle", lambda: check_dense(lib))
        record("CUDA graph capture", lambda: check_graph(lib))
        dump()
    if stage in ("all", "variants"):
        for dtype in (torch.bfloat16, torch.float16):
            for d in (64, 128, 256):
                for bs in (64, 128):
                    for varlen in (False, True):
                        record(
                            f"variant {prec(dtype)} D{d} block{bs} {'varlen' if varlen else 'padded'}",
                            lambda: check_variant(lib, dtype, d, bs, varlen, seed=d + bs + varlen),
                        )
            dump()
        for rule in (0, 1, 2):  # the default is rule 3; the other budget rules on one variant each layout
            for varlen in (False, True):
                record(
                    f"variant bf16 D128 block128 {'varlen' if varlen else 'padded'} budget_rule {rule}",
                    lambda: check_variant(lib, torch.bfloat16, 128, 128, varlen, seed=7 + rule, rule=rule),
                )
        dump()
    print(f"\n{'check':<44} ok")
    for r in RESULTS:
        print(f"{r['check']:<44} {'PASS' if r['ok'] else 'FAIL ' + r.get('error', '')[:150]}")
    for t in TIMINGS:
        print(json.dumps(t))
    return 0 if all(r["ok"] for r in RESULTS) else 1


def merge(out: Path) -> int:
    parts = sorted(out.glob("part_*.json"))
    doc = None
    for p in parts:
        part = json.loads(p.read_text())
        if doc is None:
            doc = part
        else:
            doc["checks"] += part["checks"]
            doc["timings"] += part["timings"]
            doc["python_autotune_picks"].update(part.get("python_autotune_picks", {}))
    if doc is None:
        print("no parts to merge")
        return 1
    doc["stages"] = [p.stem[len("part_") :] for p in parts]
    doc["command"] = (
        "for s in large example timing misc variants; do python3 -m tests.gpu.check_cpp --lib "
        "cpp/build-carry/main --alt ... --stage $s --out $OUT --commit <sha>; done; "
        "python3 -m tests.gpu.check_cpp --merge --out $OUT --lib x"
    )
    path = out / f"cpp_{doc['date'][:10]}.json"
    path.write_text(json.dumps(doc, indent=1))
    for c in doc["checks"]:
        print(f"{c['check']:<44} {'PASS' if c['ok'] else 'FAIL ' + c.get('error', '')[:200]}")
    for t in doc["timings"]:
        print(json.dumps(t))
    return 0 if all(c["ok"] for c in doc["checks"]) else 1


def dry_run(args) -> int:
    lib = PythonLib()
    for dtype, d, bs, varlen in ((torch.bfloat16, 64, 64, False), (torch.float16, 128, 128, True)):
        record(
            f"variant {prec(dtype)} D{d} block{bs} {'varlen' if varlen else 'padded'}",
            lambda: check_variant(lib, dtype, d, bs, varlen, seed=d + bs + varlen),
        )
    for rule in (0, 1, 2):
        record(
            f"variant bf16 D64 block64 varlen budget_rule {rule}",
            lambda: check_variant(lib, torch.bfloat16, 64, 64, True, seed=7 + rule, rule=rule),
        )
    record("large structured (dry, S=2304)", lambda: check_large(lib, 2304, "structured", seed=1))
    record(
        "large structured (dry, S=2304) rule 3 + dense fallback",
        lambda: check_large(lib, 2304, "structured", seed=1, cfg=ProxyAttnConfig(dense_below_tokens=1024)),
    )
    print(json.dumps(RESULTS, indent=1))
    return 0 if all(r["ok"] for r in RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
