#!/usr/bin/env python3
"""Launch configs of the block-sparse kernel against each other on the GPU: same process, same plans, interleaved rounds.

Llama-3-8B attention shapes and the plans of benchmarks/attention.py's kernel rows (random inputs, one shared random
ranking, sink and diagonal kept, fixed densities), TMA loads. For every length and density: each config's median time
over `--rounds` interleaved rounds, effective TFLOP/s on kept blocks (diagonal blocks at half), and whether every
config's output is bitwise equal to the first config's. Configs are named by `attention._CONFIG_KEYS`:
`--configs tuned,register-capped` (default) compares the fixed config of this shape (`attention._TUNED`:
`attention.FOUR_WARPS`) with the register-capped one that libproxyattn compiles (`attention.REGISTER_CAPPED`);
`--configs all` runs every candidate the autotuner keeps for this shape.

    python3 benchmarks/kernel_configs.py --out kernel_configs.json [--sizes 32768,131072] [--densities 0.05,0.1,0.2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

import torch
import triton

from attention import BS, D, fixed_density_plan, interleaved_ms, plan_flops, qkv
from engines.artifacts import atomic_write_json
from proxyattn.kernels import attention as attn


def named_configs(which: str, q) -> dict[str, dict]:
    if which == "tuned,register-capped":
        chosen = [attn._TUNED[(D, BS, True)], attn.REGISTER_CAPPED]
    elif which == "all":
        chosen = attn.candidate_configs(q, BS, use_tma=True)
    else:
        raise ValueError(f"--configs {which!r}: allowed 'tuned,register-capped' or 'all'")
    return {str(c): attn.config_dict(c) for c in chosen}


def measure_length(s: int, densities: list[float], which: str, rounds: int):
    """Yield one row per density at length s (inputs and plans as benchmarks/attention.py's kernel rows)."""
    q, k, v = qkv(s, s)
    cfgs = named_configs(which, q)
    for dens in densities:
        plan = fixed_density_plan(s, dens, s + int(dens * 100))
        fl = plan_flops(plan)

        def run(c, plan=plan):
            o, _ = attn._launch_sparse(q, k, v, plan.order, plan.counts, None, s, BS, D**-0.5, with_lse=False, use_tma=True, config=c)
            return o

        fns = {n: (lambda c=c: run(c)) for n, c in cfgs.items()}
        outs = [f() for f in fns.values()]
        equal = all(torch.equal(outs[0], o) for o in outs[1:])
        del outs
        ms = interleaved_ms(fns, rounds=rounds, budget_ms=300)
        yield {
            "S": s,
            "target_density": dens,
            "density": round(plan.density().mean().item(), 4),
            "outputs_bitwise_equal": equal,
            "ms": {n: round(t, 3) for n, t in ms.items()},
            "tflops_eff": {n: round(fl / t * 1e-9, 1) for n, t in ms.items()},
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--sizes", default="32768,131072")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--configs", default="tuned,register-capped", choices=("tuned,register-capped", "all"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("kernel_configs.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    res = {
        "benchmark": "kernel configs",
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "command": "python3 benchmarks/kernel_configs.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rounds": args.rounds,
        "rows": [],
    }
    for s in (int(x) for x in args.sizes.split(",")):
        for row in measure_length(s, [float(x) for x in args.densities.split(",")], args.configs, args.rounds):
            print(json.dumps(row), flush=True)
            res["rows"].append(row)
            atomic_write_json(args.out, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
