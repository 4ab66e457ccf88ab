#!/usr/bin/env python3
"""How sparse can any block selection be on the attention benchmark's structured inputs at a given output error?

`proxyattn.testing.structured_qkv` (what benchmarks/attention.py's whole-method rows run: sinks, a local window,
heavy-hitter keys spread over the sequence with a per-head pull, Llama-3-8B shape), fp32 on the CPU. For every
query head the exact causal attention P is computed, and the block mask that loses the least attention mass at a
given density is applied (P restricted to the kept blocks, renormalised, times V):

* `oracle per head`: every head keeps the same fraction of its causal blocks, the blocks of largest exact mass
  (summed over the query block's rows) over the whole head;
* `oracle global`: one mass threshold over all heads (heads that need more blocks get them), the best any
  per-block selection can do for the mean density.

Beside them, the plans of `plan_blocks` (fp32 reference path on the CPU) for the default and a few settings. The
relative error is benchmarks/attention.py's: ||out - dense|| / ||dense|| over every head. Heavy hitters are a
fixed fraction of tokens (1%), so the fraction of 128-token blocks holding one (about 1 - exp(-1.28) = 0.72) does
not depend on the length: a short length answers for 128K.

    python3 benchmarks/oracle_structured.py --seq-len 8192 --out benchmarks/results/oracle_structured.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time

import torch

from proxyattn import ProxyAttnConfig, block_sparse_attention, plan_blocks
from proxyattn.testing import structured_qkv

BS = 128
DENSITIES = (0.2, 0.3, 0.36, 0.45, 0.5, 0.6, 0.72, 0.8)
CONFIGS = {
    "default": ProxyAttnConfig(dense_density=None),
    "gamma=0.9": ProxyAttnConfig(gamma=0.9, dense_density=None),
    "gamma=0.8": ProxyAttnConfig(gamma=0.8, dense_density=None),
    "budget_fraction=0.2": ProxyAttnConfig(budget_fraction=0.2),
}


def head_attention(q, k, scale):
    """Exact causal softmax `[S, S]` of one head (q, k `[S, D]`, fp32)."""
    s = q.shape[0]
    logits = (q @ k.T) * scale
    logits.masked_fill_(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1)


def block_mass(p, nb):
    """`[Nb, Nb]` attention mass of each (query block, key block), padded to whole blocks."""
    s = p.shape[0]
    pad = nb * BS - s
    p = torch.nn.functional.pad(p, (0, pad, 0, pad))
    return p.reshape(nb, BS, nb, BS).sum(dim=(1, 3))


def masked_output(p, v, keep_blocks):
    """Output `[S, D]` of P restricted to the kept blocks (bool `[Nb, Nb]`), renormalised per row."""
    s = p.shape[0]
    mask = keep_blocks.repeat_interleave(BS, 0).repeat_interleave(BS, 1)[:s, :s]
    pm = p * mask
    return (pm @ v) / pm.sum(-1, keepdim=True).clamp_min(1e-30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32, help="query heads (KV heads: heads / 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    if args.heads % 4:
        raise SystemExit(f"--heads={args.heads}: must be a multiple of 4 (GQA 4, as Llama-3-8B)")
    torch.manual_seed(args.seed)
    s, hq, hkv, d = args.seq_len, args.heads, args.heads // 4, 128
    scale = d**-0.5
    nb = -(-s // BS)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    t0 = time.time()
    q, k, v = structured_qkv(1, s, hq, hkv, d, dtype=torch.float32, seed=args.seed)  # [1, S, H, D]
    masses = []
    dense = []
    for h in range(hq):
        p = head_attention(q[0, :, h], k[0, :, h // 4], scale)
        masses.append(block_mass(p, nb).masked_fill(~causal, -1.0))
        dense.append(p @ v[0, :, h // 4])
        print(f"[oracle] head {h + 1}/{hq} mass ({time.time() - t0:.0f} s)", flush=True)
    masses_t = torch.stack(masses)  # [H, Nb, Nb]
    dense_t = torch.stack(dense)  # [H, S, D]
    n_causal = int(causal.sum())
    keep = {}
    for f in DENSITIES:
        n = max(1, round(f * n_causal))
        per_head = torch.zeros_like(masses_t, dtype=torch.bool)
        for h in range(hq):
            idx = masses_t[h].flatten().topk(n).indices
            per_head[h].view(-1)[idx] = True
        glob = torch.zeros_like(masses_t, dtype=torch.bool)
        glob.view(-1)[masses_t.flatten().topk(n * hq).indices] = True
        keep[f"oracle per head {f}"] = per_head
        keep[f"oracle global {f}"] = glob
    err2 = {name: 0.0 for name in keep}
    for h in range(hq):
        p = head_attention(q[0, :, h], k[0, :, h // 4], scale)
        for name, kb in keep.items():
            err2[name] += (masked_output(p, v[0, :, h // 4], kb[h] & causal) - dense_t[h]).pow(2).sum().item()
        print(f"[oracle] head {h + 1}/{hq} masks ({time.time() - t0:.0f} s)", flush=True)
    norm = dense_t.norm().item()
    rows = []
    for name, kb in keep.items():
        kind, f = name.rsplit(" ", 1)
        rows.append(
            {
                "method": kind,
                "target_density": float(f),
                "density": (kb & causal).sum().item() / (hq * n_causal),
                "rel_err": err2[name] ** 0.5 / norm,
            }
        )
    dense_out = dense_t.permute(1, 0, 2)  # [S, H, D]
    for name, cfg in CONFIGS.items():
        plan = plan_blocks(q, k, cfg, scale=scale)
        out = block_sparse_attention(q, k, v, plan, scale=scale)[0]
        rows.append(
            {
                "method": name,
                "target_density": None,
                "density": plan.density().mean().item(),
                "rel_err": ((out - dense_out).norm() / dense_out.norm()).item(),
            }
        )
        print(f"[oracle] {rows[-1]}", flush=True)
    res = {
        "what": "best block selection on structured_qkv inputs: exact-mass oracles against plan_blocks (see the docstring)",
        "device": "CPU, float32",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": "python3 benchmarks/oracle_structured.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "shape": {"seq_len": s, "q_heads": hq, "kv_heads": hkv, "head_dim": d, "block_size": BS},
        "rows": rows,
        "wall_s": time.time() - t0,
    }
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, args.out)
    for r in rows:
        print(f"{r['method']:>22} density {r['density']:.3f} rel_err {r['rel_err']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
