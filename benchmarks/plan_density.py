"""Kept-block density of `plan_blocks` for several configs on a packaged model's own attention inputs, without the
sparse forward: the model runs dense once per prompt (benchmarks/accuracy.py's harness, copy prompts), q and k of
every layer the sparse path would take are kept, and each config plans them (the same plan the GPU kernels make:
tests/gpu/check_estimation.py). Answers "what density does this setting reach on this model, and how many KV groups
does the dense fallback send to the dense kernel" on the CPU, where a sparse forward at 16K-32K is too slow.

    python3 benchmarks/plan_density.py --model gemma3-270m --length 16384 --copies 2 \
        --configs "gamma=0.83;gamma=0.83,dense_density=0.8" --out DIR

Each config is `key=value,...` over ProxyAttnConfig fields (dense_below_tokens is 0 and min_budget_tokens 256, as
in accuracy.py). Writes DIR/plan_density_<model>_<length>.json (per config: mean density, the share of KV groups
that ran dense, per layer) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import time

import torch

import accuracy as acc
import proxyattn
import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig
from proxyattn.weights import load_model, load_tokenizer

from engines.artifacts import atomic_write_json


def parse_config(text: str) -> ProxyAttnConfig:
    """`gamma=0.83,dense_density=0.8` -> the harness's config with those fields (values: float, int or a name)."""
    kw = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if not value:
            raise ValueError(f"config item {item!r}: expected key=value")
        allowed = [f.name for f in dataclasses.fields(ProxyAttnConfig)]
        if key.strip() not in allowed:
            raise ValueError(f"config field {key.strip()!r} unknown; allowed: {allowed}")
        for cast in (int, float):
            try:
                kw[key.strip()] = cast(value)
                break
            except ValueError:
                continue
        else:
            kw[key.strip()] = None if value == "None" else value
    return acc._cfg(256, **kw)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2", "gemma3-270m"])
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--configs", required=True, help="';'-separated configs, each key=value,... over ProxyAttnConfig")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        cfgs = {c: parse_config(c) for c in args.configs.split(";")}
    except (TypeError, ValueError) as e:
        print(f"plan_density.py: --configs={args.configs!r}: {e}", file=sys.stderr)
        return 2
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf.register()
    AttentionInterface.register("acc_capture", acc.capture_attention)
    AttentionMaskInterface.register("acc_capture", sdpa_mask)
    t0 = time.time()
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device="cpu", dtype=torch.float32)
    model.set_attn_implementation("acc_capture")
    print(f"[plan_density] {args.model} loaded in {time.time() - t0:.0f} s", flush=True)
    ids, _ = acc.copy_batch(tok, args.length, args.copies, seed=args.length)
    per = {c: {"density": [], "dense_groups": [], "layers": {}} for c in cfgs}
    for i in range(ids.shape[0]):
        acc._captured.clear()
        acc._capture_on[0] = True
        with torch.no_grad():
            model.model(ids[i : i + 1], use_cache=False)
        acc._capture_on[0] = False
        for layer, q, k, scale in acc._captured:
            for c, cfg in cfgs.items():
                plan = proxyattn.plan_blocks(q, k, cfg, scale=scale)
                d = float(plan.density().mean())
                per[c]["density"].append(d)
                per[c]["dense_groups"].append(float(plan.dense_heads.float().mean()))
                per[c]["layers"].setdefault(str(layer), []).append(round(d, 4))
        print(f"[plan_density] prompt {i + 1}/{ids.shape[0]} planned ({time.time() - t0:.0f} s)", flush=True)
    acc._captured.clear()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    result = {
        "what": "plan_blocks density on the model's own q/k (copy prompts), CPU fp32 reference planning",
        "model": args.model,
        "seq_len": args.length,
        "copies": args.copies,
        "device": f"CPU ({os.cpu_count()} cores), float32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": "python3 benchmarks/plan_density.py " + " ".join(sys.argv[1:]),
        "configs": {
            c: {
                "attrs": cfgs[c].to_attrs(),
                "mean_density": sum(v["density"]) / len(v["density"]),
                "dense_group_share": sum(v["dense_groups"]) / len(v["dense_groups"]),
                "per_layer": v["layers"],
            }
            for c, v in per.items()
        },
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"plan_density_{args.model}_{args.length}.json")
    atomic_write_json(path, result)
    for c, v in result["configs"].items():
        print(f"  {c:>40}: density {v['mean_density']:.3f}, dense groups {v['dense_group_share']:.2f}")
    print(f"[plan_density] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
