#!/usr/bin/env python3
"""The column kernel's launch configs against each other (vertical columns, `proxyattn.kernels.columns`).

128K tokens, Llama-3-8B attention shape (32 query / 8 KV heads, D 128, bf16), structured inputs, the plan of
ProxyAttnConfig(column_fraction=0.02, budget_fraction=0.02): the block-sparse result is computed once, then each
launch config merges the columns into a copy of it (the copy's time, measured alone, is subtracted). TFLOP/s count
every column a query block reads (masked ones included). Prints one line per config; `--out` writes JSON.

    python3 benchmarks/column_configs.py [--out column_configs_h100.json] [--commit HASH]
"""

import argparse
import dataclasses
import datetime
import subprocess
import sys

import torch

import proxyattn as pa
from proxyattn import ProxyAttnConfig
from proxyattn.kernels import attention as attn
from proxyattn.kernels import columns as C
from proxyattn.testing import structured_qkv

from engines.artifacts import atomic_write_json

CONFIGS = [(64, 8, 2), (64, 4, 2), (128, 8, 2), (128, 4, 2), (32, 4, 2), (64, 8, 3), (128, 8, 3), (32, 8, 3)]


def ms(fn, n=5):
    fn()
    torch.cuda.synchronize()
    t = []
    for _ in range(n):
        s = torch.cuda.Event(enable_timing=True)
        e = torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        t.append(s.elapsed_time(e))
    return sorted(t)[n // 2]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--commit", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("column_configs.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    s = 131072
    q, k, v = structured_qkv(1, s, 32, 8, 128, dtype=torch.bfloat16, device="cuda", seed=s)
    cfg = ProxyAttnConfig(column_fraction=0.02, budget_fraction=0.02)
    plan = pa.plan_blocks(q, k, cfg)
    sc = 128**-0.5
    out, lse = attn.block_sparse_attention_with_lse(q, k, v, dataclasses.replace(plan, columns=None), sc)
    ref_o, ref_l = out.clone(), lse.clone()
    C._launch_columns(q, k, v, ref_o, ref_l, plan, sc)
    flops = plan.column_counts().sum().item() * 32 * 128 * 128 * 4
    copy_ms = ms(lambda: (out.clone(), lse.clone()))
    rows = []
    for bc, w, st in CONFIGS:
        c = dict(BLOCK_C=bc, num_warps=w, num_stages=st)
        o, l = out.clone(), lse.clone()
        C._launch_columns(q, k, v, o, l, plan, sc, c)
        t = ms(lambda: C._launch_columns(q, k, v, out.clone(), lse.clone(), plan, sc, c)) - copy_ms
        r = {**c, "ms": t, "tflops": flops / t / 1e9, "max_abs_diff_vs_first": (o.float() - ref_o.float()).abs().max().item()}
        rows.append(r)
        print(r, flush=True)
    if args.out:
        commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        res = {
            "gpu": torch.cuda.get_device_name(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit,
            "command": "python3 " + " ".join(sys.argv),
            "columns": plan.columns.shape[-1],
            "rows": rows,
        }
        atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
