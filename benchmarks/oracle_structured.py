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

Beside them, the plans of `plan_blocks` (fp32 reference path on the CPU) for the default and a few settings, two
of them with vertical columns (`column_fraction`: token columns beside the blocks, which no block selection is; a
plan's density counts its columns' work, `BlockPlan.column_density`). The
relative error is benchmarks/attention.py's: ||out - dense|| / ||dense|| over every head. Heavy hitters are a
fixed fraction of tokens (1%), so the fraction of 128-token blocks holding one (about 1 - exp(-1.28) = 0.72) does
not depend on the length; their number, and so the mass they draw away from the local window, does (whether 8K
answers for 128K is what the GPU mode measures).

With `--device cuda` the exact masses are computed a chunk of query blocks at a time (no S x S tensor: 128K
tokens fit), the outputs come from the block-sparse kernel on plans built from the masks (bf16 inputs, as the
attention benchmark's), and two more selections split a plan's loss between its ranking and its counts:

* `plan ranking, exact counts g`: each (head, query block) walks the plan's ranking and keeps blocks until their
  exact mass reaches g of the block's mass;
* `exact ranking, plan counts`: each (head, query block) keeps as many blocks as the plan does, the ones of
  largest exact mass.

    python3 benchmarks/oracle_structured.py --seq-len 8192 --out benchmarks/results/oracle_structured.json
    python3 benchmarks/oracle_structured.py --device cuda --seq-len 131072 --out oracle_structured_131072_h100.json
    python3 benchmarks/oracle_structured.py --mode chunked --seq-len 16384 --heads 8 --out oracle_split_16384_cpu.json

`--mode chunked` runs the GPU mode's selections on the CPU (the split rows included; the outputs through the fp32
reference of the block-sparse attention): minutes at 8K-16K with 8 heads, about an hour at 32K.
`--densities` and `--configs` take a subset of the oracle densities and of the plan settings (`CONFIGS`).
`--plot` draws output error against density (a panel per result file, e.g. one per length):

    python3 benchmarks/oracle_structured.py --plot-only a.json,b.json --plot oracle.png
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

from proxyattn import BlockPlan, ProxyAttnConfig, block_sparse_attention, plan_blocks
from proxyattn.testing import structured_qkv

from engines.artifacts import atomic_write_json

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # its sibling benchmarks/frontier.py, as when run as a script
from frontier import save_figure  # noqa: E402

BS = 128
DENSITIES = (0.2, 0.3, 0.36, 0.45, 0.5, 0.6, 0.72, 0.8)
CONFIGS = {
    "default": ProxyAttnConfig(dense_density=None),
    "gamma=0.9": ProxyAttnConfig(gamma=0.9, dense_density=None),
    "gamma=0.8": ProxyAttnConfig(gamma=0.8, dense_density=None),
    "budget_fraction=0.2": ProxyAttnConfig(budget_fraction=0.2),
    # vertical columns (2 % of the tokens) beside the default's blocks (rule 3 counts their mass as held), and beside
    # a small fixed budget
    "column_fraction=0.02": ProxyAttnConfig(column_fraction=0.02, dense_density=None),
    "column_fraction=0.01": ProxyAttnConfig(column_fraction=0.01, dense_density=None),
    "gamma=0.9 column_fraction=0.02": ProxyAttnConfig(gamma=0.9, column_fraction=0.02, dense_density=None),
    "gamma=0.7 column_fraction=0.02": ProxyAttnConfig(gamma=0.7, column_fraction=0.02, dense_density=None),
    "column_fraction=0.02 budget_fraction=0.02": ProxyAttnConfig(column_fraction=0.02, budget_fraction=0.02),
    "column_fraction=0.01 budget_fraction=0.02": ProxyAttnConfig(column_fraction=0.01, budget_fraction=0.02),
}
SPLIT_CONFIGS = ("default", "gamma=0.8")  # GPU mode: their loss split between ranking and counts


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


def block_masses_chunked(q, k, scale: float, chunk_blocks: int = 8):
    """`[Hq, Nb, Nb]` exact attention mass of every (query block, key block) of every query head, -1 above the
    diagonal: q `[S, Hq, D]`, k `[S, Hkv, D]` (any float type; fp32 arithmetic), chunk_blocks query blocks at a time
    (no S x S tensor). Equals `block_mass(head_attention(...))` per head."""
    s, hq, _ = q.shape
    g = hq // k.shape[1]
    nb = -(-s // BS)
    out = torch.full((hq, nb, nb), -1.0, device=q.device)
    for h in range(hq):
        kh = k[:, h // g].float()
        for m0 in range(0, nb, chunk_blocks):
            r0, r1 = m0 * BS, min(s, (m0 + chunk_blocks) * BS)
            nq, nk = -(-(r1 - r0) // BS), -(-r1 // BS)
            logits = (q[r0:r1, h].float() @ kh[:r1].T) * scale
            future = torch.arange(r1, device=q.device)[None, :] > torch.arange(r0, r1, device=q.device)[:, None]
            p = logits.masked_fill_(future, float("-inf")).softmax(-1)
            p = torch.nn.functional.pad(p, (0, nk * BS - r1, 0, nq * BS - (r1 - r0)))
            mass = p.reshape(nq, BS, nk, BS).sum(dim=(1, 3))
            out[h, m0 : m0 + nq, :nk] = mass.masked_fill(~torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(m0), -1.0)
    return out


def oracle_masks(masses, densities=DENSITIES) -> dict[str, torch.Tensor]:
    """The exact-mass oracles (docstring) at each density: name -> bool `[Hq, Nb, Nb]`. masses: `[Hq, Nb, Nb]`, -1
    above the diagonal."""
    hq, nb, _ = masses.shape
    n_causal = nb * (nb + 1) // 2
    keep = {}
    for f in densities:
        n = max(1, round(f * n_causal))
        per_head = torch.zeros_like(masses, dtype=torch.bool)
        per_head.view(hq, -1).scatter_(1, masses.view(hq, -1).topk(n, dim=1).indices, True)
        glob = torch.zeros_like(masses, dtype=torch.bool)
        glob.view(-1)[masses.flatten().topk(n * hq).indices] = True
        keep[f"oracle per head {f}"] = per_head
        keep[f"oracle global {f}"] = glob
    return keep


def ranking_count_masks(masses, order, counts, gammas=(0.8, 0.9, 0.95)) -> dict[str, torch.Tensor]:
    """A plan's loss split between its ranking and its counts (docstring): name -> bool `[Hq, Nb, Nb]`.

    masses `[Hq, Nb, Nb]` (-1 above the diagonal); order int `[R, Nb, Nb]` (the plan's rankings, R dividing Hq,
    causal blocks first) and counts int `[Hq, Nb]` of one sequence."""
    hq, nb, _ = masses.shape
    causal = torch.ones(nb, nb, dtype=torch.bool, device=masses.device).tril()
    n_row = causal.sum(-1)  # causal blocks of each query block
    rank = torch.arange(nb, device=masses.device)
    plan_order = order.long().repeat_interleave(hq // order.shape[0], dim=0)  # [Hq, Nb, Nb]
    ranked = masses.clamp_min(0).gather(-1, plan_order)
    cum = ranked.cumsum(-1)
    total = cum[..., -1:]
    keep = {}
    for g in gammas:
        need = ((cum < g * total).sum(-1) + 1).clamp(max=n_row)  # blocks until the mass reaches g
        mask = torch.zeros_like(masses, dtype=torch.bool)
        mask.scatter_(-1, plan_order, rank < need[..., None])
        keep[f"plan ranking, exact counts {g}"] = mask & causal
    exact_order = masses.argsort(dim=-1, descending=True)
    mask = torch.zeros_like(masses, dtype=torch.bool)
    mask.scatter_(-1, exact_order, rank < counts.long()[..., None])
    keep["exact ranking, plan counts"] = mask & causal
    return keep


def masked_output(p, v, keep_blocks):
    """Output `[S, D]` of P restricted to the kept blocks (bool `[Nb, Nb]`), renormalised per row."""
    s = p.shape[0]
    mask = keep_blocks.repeat_interleave(BS, 0).repeat_interleave(BS, 1)[:s, :s]
    pm = p * mask
    return (pm @ v) / pm.sum(-1, keepdim=True).clamp_min(1e-30)


def _fail(message: str) -> int:
    print(f"oracle_structured.py: {message}", file=sys.stderr)
    return 2


def _densities(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(","))
    except ValueError:
        vals = ()
    if not vals or not all(0.0 < f <= 1.0 for f in vals):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed comma-separated densities in (0, 1]")
    return vals


def _configs(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(","))
    bad = [n for n in names if n not in CONFIGS]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: allowed {', '.join(CONFIGS)}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--heads", type=int, default=32, help="query heads (KV heads: heads / 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--mode", choices=("whole", "chunked"), default=None, help="default: whole on the CPU, chunked on CUDA")
    ap.add_argument("--densities", type=_densities, default=DENSITIES, help="comma-separated oracle densities in (0, 1]")
    ap.add_argument("--configs", type=_configs, default=tuple(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument("--commit", default=None, help="recorded in the result (default: git rev-parse --short HEAD)")
    ap.add_argument("--out", default=None, help="result JSON (required unless --plot-only)")
    ap.add_argument("--plot", default=None, help="also write a PNG plot of the result here")
    ap.add_argument("--plot-only", default=None, metavar="JSON[,JSON...]", help="only plot existing result files to --plot")
    args = ap.parse_args()
    if args.plot_only:
        paths = args.plot_only.split(",")
        results = []
        for path in paths:
            try:
                with open(path) as f:
                    results.append(json.load(f))
            except (OSError, json.JSONDecodeError) as e:
                return _fail(f"--plot-only: {path!r} is not a readable result JSON ({type(e).__name__})")
            if "rows" not in results[-1] or "shape" not in results[-1]:
                return _fail(f"--plot-only: {path!r} has no rows/shape (allowed: files this script wrote)")
        plot(results, args.plot or os.path.splitext(paths[0])[0] + ".png")
        return 0
    if args.out is None:
        return _fail("--out: required (the result JSON), unless --plot-only")
    if args.heads % 4:
        return _fail(f"--heads={args.heads}: must be a multiple of 4 (GQA 4, as Llama-3-8B)")
    if args.mode is None:
        args.mode = "chunked" if args.device == "cuda" else "whole"
    if args.device == "cuda":
        if args.mode != "chunked":
            return _fail(f"--mode={args.mode} with --device cuda: allowed only chunked")
        if not torch.cuda.is_available():
            return _fail("--device cuda: no CUDA GPU here")
    if args.mode == "chunked":
        return run_chunked(args, args.device)
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
    keep = oracle_masks(masses_t, args.densities)
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
    for name in args.configs:
        plan = plan_blocks(q, k, CONFIGS[name], scale=scale)
        out = block_sparse_attention(q, k, v, plan, scale=scale)[0]
        rows.append(
            {
                "method": name,
                "target_density": None,
                "density": plan.work_density().mean().item(),
                "rel_err": ((out - dense_out).norm() / dense_out.norm()).item(),
            }
        )
        print(f"[oracle] {rows[-1]}", flush=True)
    write(args, rows, "CPU, float32", t0)
    return 0


def _arg(v) -> str:
    return ",".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)


def write(args, rows: list[dict], device: str, t0: float) -> None:
    res = {
        "what": "best block selection on structured_qkv inputs: exact-mass oracles against plan_blocks (see the docstring)",
        "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "command": "python3 benchmarks/oracle_structured.py "
        + " ".join(f"--{k.replace('_', '-')} {_arg(v)}" for k, v in vars(args).items() if v is not None),
        "shape": {"seq_len": args.seq_len, "q_heads": args.heads, "kv_heads": args.heads // 4, "head_dim": 128, "block_size": BS},
        "rows": rows,
        "wall_s": time.time() - t0,
    }
    atomic_write_json(args.out, res)
    if args.plot:
        plot([res], args.plot)
    for r in rows:
        print(f"{r['method']:>34} {r.get('target_density') or '':>5} density {r['density']:.3f} rel_err {r['rel_err']:.3f}")


ERROR_TARGET = 0.1  # the attention benchmark's accuracy bar (output error against dense), drawn in the plot


def plot(results: list[dict], path: str) -> None:
    """Output error against density, a panel per result: the oracles as lines, each plan setting as a point, its
    ranking/count split as small markers. Needs matplotlib (imported here only); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["method"] for res in results for r in res["rows"] if not r["method"].startswith("oracle")))
    colours = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}  # one colour a setting in every panel
    fig, axes = plt.subplots(1, len(results), figsize=(4.6 * len(results) + 2.8, 4.2), squeeze=False)
    for ax, res in zip(axes[0], results):
        rows = res["rows"]
        for kind, style in (("oracle global", "k-"), ("oracle per head", "k--")):
            pts = sorted((r["density"], r["rel_err"]) for r in rows if r["method"] == kind)
            if pts:
                ax.plot(*zip(*pts), style, marker=".", label=kind)
        for r in rows:
            if r["method"] in colours:
                split = ": " in r["method"]
                ax.plot(
                    r["density"], r["rel_err"], "x" if split else "o", ms=6 if split else 7, color=colours[r["method"]], label=r["method"]
                )
        ax.axhline(ERROR_TARGET, color="grey", lw=0.8, ls=":")
        shape = res["shape"]
        ax.set_title(f"S={shape['seq_len']}, {shape['q_heads']} q heads ({res['device'].split(',')[0]})", fontsize=9)
        ax.set_xlabel("density (kept blocks + columns' work)")
        ax.set_ylabel("output rel. error vs dense")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, max(0.3, 1.05 * max(r["rel_err"] for r in rows)))
        ax.grid(alpha=0.3)
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), fontsize=7, loc="center right")
    fig.suptitle("Best block selection (exact-mass oracles) against the planner's settings, structured inputs", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.8 / (4.6 * len(results) + 2.8), 1))
    save_figure(fig, path, dpi=110)


def run_chunked(args, device: str) -> int:
    """The oracles, the plans and the ranking/count split at `--seq-len`, masses by chunks, outputs through the
    block-sparse attention (`--device cuda`: bf16 inputs, as the attention benchmark's whole-method rows with
    `--seed` = S; on the CPU the tests run it small through the reference path)."""
    from proxyattn.kernels.attention import dense_attention

    s, hq, hkv, d = args.seq_len, args.heads, args.heads // 4, 128
    scale = d**-0.5
    t0 = time.time()
    q, k, v = structured_qkv(1, s, hq, hkv, d, dtype=torch.bfloat16, device=device, seed=args.seed)
    dense = dense_attention(q, k, v, scale).float()
    norm = dense.norm().item()
    masses = block_masses_chunked(q[0], k[0], scale)
    print(f"[oracle] exact block masses ({time.time() - t0:.0f} s)", flush=True)

    def row(method, plan, target=None):
        out = block_sparse_attention(q, k, v, plan, scale=scale).float()
        r = {
            "method": method,
            "target_density": target,
            "density": plan.work_density().mean().item(),
            "rel_err": (out - dense).norm().item() / norm,
        }
        print(f"[oracle] {r} ({time.time() - t0:.0f} s)", flush=True)
        return r

    def from_mask(mask):
        return BlockPlan.from_mask(mask[None], block_size=BS, seq_len=s)

    rows = []
    for name, m in oracle_masks(masses, args.densities).items():
        kind, f = name.rsplit(" ", 1)
        rows.append(row(kind, from_mask(m), float(f)))
    for name in args.configs:
        plan = plan_blocks(q, k, CONFIGS[name], scale=scale)
        rows.append(row(name, plan))
        if name in SPLIT_CONFIGS:
            for split, m in ranking_count_masks(masses, plan.order[0], plan.counts[0]).items():
                rows.append(row(f"{name}: {split}", from_mask(m)))
    where = (
        f"{torch.cuda.get_device_name()}, bfloat16 inputs, fp32 masses"
        if device == "cuda"
        else "CPU, bfloat16 inputs, fp32 masses and reference outputs"
    )
    write(args, rows, where, t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
