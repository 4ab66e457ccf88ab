#!/usr/bin/env python3
"""Where the host time of eager planning goes (GPU): per-call CPU issue time, device synchronisations, top ops.

For each length: `dense_attention` (cuDNN), then per config `plan_blocks` and `proxy_attention`: the wall time of
back-to-back calls (what a caller sees), the CPU time to issue one call while the GPU is idle (Python + launches),
every device synchronisation the call makes (torch's sync debug mode, with the Python line that caused it), the
profiler's ten most expensive ops by CPU time and the GPU kernels of a call. `--inputs random` profiles diffuse
attention (what the dense fallback's early decision costs); `--sweep-needs` / `--sweep-scores` time one kernel's
launch configurations instead.

    python3 benchmarks/profile_plan.py [--sizes 16384,32768] [--inputs structured|random] [--out FILE.json]
        [--budget-rule NAME] [--estimator NAME]

`--budget-rule` and `--estimator` take a name (or, for compatibility, the number): the profiled configs are the
default with those choices, with and without the dense fallback.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
import traceback
import warnings

import torch

import proxyattn
from proxyattn import BudgetRule, Estimator, ProxyAttnConfig
from proxyattn.testing import structured_qkv

HQ, HKV, D = 32, 8, 128


def host_ms(fn, n: int = 20) -> tuple[float, float]:
    """(ms per call back-to-back, CPU ms to issue one call onto an idle GPU)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    loop = (time.perf_counter() - t) * 1e3 / n
    issue = []
    for _ in range(5):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        issue.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    return loop, sorted(issue)[2]


def syncs(fn) -> list[str]:
    """The synchronising calls of one fn() call, each with the innermost project line that made it."""
    found = []

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "proxyattn" in f.filename or "benchmarks" in f.filename]
        where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[-3:][::-1])
        found.append(f"{str(message)[:80]} at {where}")

    old = warnings.showwarning
    warnings.showwarning = show
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
        warnings.showwarning = old
    return found


def top_ops(fn, k: int = 10) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:k]
    return [{"op": e.key[:60], "calls_per_call": e.count / 5, "self_cpu_us_per_call": round(e.self_cpu_time_total / 5, 1)} for e in rows]


def top_kernels(fn, k: int = 12) -> list[dict]:
    """The k GPU kernels of one fn() call with the most device time (profiler, mean of 5 calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    rows = sorted(rows, key=lambda e: e.self_device_time_total, reverse=True)[:k]
    return [{"kernel": e.key[:80], "calls_per_call": e.count / 5, "gpu_us_per_call": round(e.self_device_time_total / 5, 1)} for e in rows]


# (query blocks per program, warps, stages, scratch MiB, heaviest programs first). Today's launch (`_launch_needs`'
# defaults) first: every other config's needs are compared to it.
NEEDS_CANDIDATES = [
    (8, 8, 2, 512, True),
    (8, 4, 2, 512, True),
    (8, 4, 3, 512, True),
    (8, 4, 4, 512, True),
    (8, 8, 3, 512, True),
    (4, 4, 2, 512, True),
    (4, 4, 3, 512, True),
    (4, 8, 2, 512, True),
    (16, 4, 2, 512, True),
    (16, 8, 2, 512, True),
    (16, 8, 3, 512, True),
    (8, 4, 2, 128, False),
]
# The proxy-score kernel's (query blocks per program, warps, stages); today's launch first (`_launch_scores`' qb for
# block 128 / stride 4 is 2: 64 strided rows per program; stages `rows_stages`).
SCORES_CANDIDATES = [(2, 4, 3), (2, 4, 2), (2, 8, 2), (4, 4, 2), (4, 8, 2), (4, 8, 3), (1, 4, 2), (8, 8, 2)]


def event_ms(fn, n: int = 10) -> float:
    """Median GPU time of fn() (CUDA events around each call)."""
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return round(sorted(times)[n // 2], 3)


def sweep(launches: list[dict], make_fn, compare) -> list[dict]:
    """Time make_fn(**launch) for every launch (a config that fails, e.g. on shared memory, is recorded, not fatal);
    compare(first result, this result) -> dict of differences from the first launch's result."""
    rows, ref = [], None
    for launch in launches:
        fn = make_fn(**launch)
        try:
            got = fn()
            diff = {} if ref is None else compare(ref, got)
            ref = got if ref is None else ref
            row = {**launch, "ms": event_ms(fn), **diff}
        except Exception as e:  # noqa: BLE001 -- a config that fails to compile is recorded, not fatal
            row = {**launch, "error": f"{type(e).__name__}: {str(e)[:160]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def sweep_needs(s: int, recall_rows: int) -> list[dict]:
    """GPU time of rule 3's mass and cut kernels (`estimate_needs._launch_needs`, counts included) at length s
    for every launch of NEEDS_CANDIDATES, CUDA-event timed, median of 10, with how many (head, query block) needs
    differ from the first config's."""
    from proxyattn.kernels import estimate_needs, estimate_rank
    from proxyattn.kernels.estimate_scores import proxy_scores

    cfg = ProxyAttnConfig(recall_rows=recall_rows)
    q, k, _ = structured_qkv(1, s, HQ, HKV, D, dtype=torch.bfloat16, device="cuda", seed=s)
    scale = D**-0.5
    scores = proxy_scores(q, k, cfg, scale=scale)
    order, _, sink_rank, diag_rank = estimate_rank.rank_order(scores, cfg.keep_sink, cfg.keep_diagonal)

    def make_fn(S, recall_rows, qb, num_warps, num_stages, scratch_mib, heavy_first):
        return lambda: estimate_needs._launch_needs(
            q,
            k,
            None,
            order,
            1,
            s,
            cfg,
            scale,
            last_only=False,
            ranks=(sink_rank, diag_rank),
            counts=True,
            qb=qb,
            num_warps=num_warps,
            num_stages=num_stages,
            scratch_bytes=scratch_mib * 2**20,
            heavy_first=heavy_first,
        )[0]

    keys = ("qb", "num_warps", "num_stages", "scratch_mib", "heavy_first")
    launches = [{"S": s, "recall_rows": recall_rows, **dict(zip(keys, c))} for c in NEEDS_CANDIDATES]
    return sweep(launches, make_fn, lambda ref, need: {"needs_entries_differing_from_first": int((need != ref).sum())})


def sweep_scores(s: int) -> list[dict]:
    """GPU time of the proxy scores (`estimate_scores._launch_scores`, pooling included) at length s for every launch
    of SCORES_CANDIDATES, with the largest score difference from the first launch's and how many entries of the
    rankings (`estimate_rank.rank_order`, what the plan uses) differ."""
    from proxyattn.kernels import estimate_rank
    from proxyattn.kernels.estimate_scores import _launch_scores

    cfg = ProxyAttnConfig()
    q, k, _ = structured_qkv(1, s, HQ, HKV, D, dtype=torch.bfloat16, device="cuda", seed=s)
    scale = D**-0.5

    def make_fn(S, qb, num_warps, num_stages):
        return lambda: _launch_scores(q, k, None, 1, s, cfg, scale, qb=qb, num_warps=num_warps, num_stages=num_stages)

    def compare(ref, got):
        finite = torch.isfinite(ref)
        same_inf = bool((finite == torch.isfinite(got)).all())
        diff = (got[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
        order_ref = estimate_rank.rank_order(ref, cfg.keep_sink, cfg.keep_diagonal)[0]
        order_got = estimate_rank.rank_order(got, cfg.keep_sink, cfg.keep_diagonal)[0]
        return {"max_abs_diff": diff, "same_inf": same_inf, "order_entries_differing": int((order_got != order_ref).sum())}

    launches = [{"S": s, **dict(zip(("qb", "num_warps", "num_stages"), c))} for c in SCORES_CANDIDATES]
    return sweep(launches, make_fn, compare)


def parser() -> argparse.ArgumentParser:
    default = ProxyAttnConfig()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="16384,32768")
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    ap.add_argument(
        "--budget-rule",
        type=BudgetRule.cli_type(),
        default=default.budget_rule,
        help=f"one of {BudgetRule.allowed()} (default {default.budget_rule.label})",
    )
    ap.add_argument(
        "--estimator",
        type=Estimator.cli_type(),
        default=default.estimator,
        help=f"one of {Estimator.allowed()} (default {default.estimator.label})",
    )
    ap.add_argument(
        "--inputs",
        choices=("structured", "random"),
        default="structured",
        help="structured (proxyattn.testing.structured_qkv) or random (diffuse attention: the default's dense fallback)",
    )
    ap.add_argument("--sweep-needs", default=None, metavar="SIZES", help="only time rule 3's kernels per launch config at these sizes")
    ap.add_argument("--sweep-scores", default=None, metavar="SIZES", help="only time the proxy scores per launch config at these sizes")
    return ap


def provenance(commit: str | None) -> dict:
    """GPU, date, commit (`--commit`, else the checkout's HEAD) and command of a result file."""
    if commit is None:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit or None,
        "command": "python3 " + " ".join(sys.argv),
    }


def main() -> int:
    args = parser().parse_args()
    if args.sweep_needs or args.sweep_scores:
        what = "rule 3 needs kernels" if args.sweep_needs else "proxy-score kernel"
        res = {**provenance(args.commit), "what": f"{what} per launch config", "rows": []}
        for s in [int(x) for x in (args.sweep_needs or args.sweep_scores).split(",")]:
            res["rows"] += sweep_needs(s, ProxyAttnConfig().recall_rows) if args.sweep_needs else sweep_scores(s)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)
        return 0
    base = ProxyAttnConfig(budget_rule=args.budget_rule, estimator=args.estimator)
    res = {
        **provenance(args.commit),
        "budget_rule": base.budget_rule.label,
        "estimator": base.estimator.label,
        "inputs": args.inputs,
        "rows": [],
    }
    configs = [
        ("default", base),
        ("no dense fallback", base.replace(dense_density=None)),
    ]
    for s in [int(x) for x in args.sizes.split(",")]:
        if args.inputs == "structured":
            q, k, v = structured_qkv(1, s, HQ, HKV, D, dtype=torch.bfloat16, device="cuda", seed=s)
        else:
            g = torch.Generator(device="cuda").manual_seed(s)
            q, k, v = (torch.randn(1, s, h, D, device="cuda", dtype=torch.bfloat16, generator=g) for h in (HQ, HKV, HKV))
        calls = [(None, "dense_attention", lambda: proxyattn.dense_attention(q, k, v))]
        for name, cfg in configs:
            calls += [
                (name, "plan_blocks", lambda cfg=cfg: proxyattn.plan_blocks(q, k, cfg)),
                (name, "proxy_attention", lambda cfg=cfg: proxyattn.proxy_attention(q, k, v, cfg)),
            ]
        for name, what, fn in calls:
            loop, issue = host_ms(fn)
            row = {
                "S": s,
                "config": name,
                "call": what,
                "ms_per_call_back_to_back": round(loop, 3),
                "cpu_issue_ms": round(issue, 3),
                "syncs": syncs(fn),
                "top_cpu_ops": top_ops(fn),
                "top_gpu_kernels": top_kernels(fn),
            }
            res["rows"].append(row)
            print(json.dumps(row, indent=1), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
