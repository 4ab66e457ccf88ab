#!/usr/bin/env python3
"""Accuracy of ProxyAttn on real packaged models (SmolLM2-135M, Gemma-3-270M): dense vs the paper's rule vs
variants and baselines, on long-range copy, passkey retrieval and natural text, plus per-layer/head plan statistics.

Per (model, length L) one batched forward per method over the same L-token sequences:
* copy: `[bos] R R`, R random tokens (ids drawn from a fixed id range); mean loss on the second copy;
* passkey: a 5-digit key hidden at evenly spread depths of filler text, then "What is the pass key? The pass key
  is <key>."; a trial counts as retrieved when every answer token is the argmax (teacher forcing);
* natural text: Python's documentation (`pydoc_data.topics`, offline), next-token loss in 4 position bins.
Every sequence in the batch has exactly L tokens and no padding, so the attention path is the sparse one.

Plan statistics (from the q, k of the sparse-eligible layers, captured in the dense run on the natural text):
per layer and head density, budget fraction and attention recall for every method; and the paper's observation,
the overlap of the top-k attended tokens across the heads of a layer (k = 5% of the visible keys, mean over query
rows sampled every 16 tokens in the second half; pairwise |A & B| / k, against the k / visible chance level).

Methods (`--methods`, names in METHODS): dense; `proxy` (the paper: mean-pooled proxy heads) at gamma 0.95 / 0.9;
`head_max` (config estimator=1, our variant) at 0.95 / 0.9; `block_mean` (estimator=2, baseline) at 0.9; `static`
(budget_fraction 0.25, baseline). All sparse methods use block 128, stride 4, one proxy head, and
`--min-budget` tokens (default 256: the default 2048 would make every length here dense) with dense_below 0.

    python3 benchmarks/accuracy.py --model smollm2 --lengths 1024,2048 --trials 20 --copies 2 --out benchmarks/results

Writes `accuracy_<model>.json` (atomically, after every length) and `accuracy_<model>.png`; prints a table.
Runs on the CPU (fp32 reference) or a GPU (`--device cuda`, kernels).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import proxyattn.hf as hf  # noqa: E402
from proxyattn import ProxyAttnConfig, metrics, plan_blocks  # noqa: E402
from proxyattn.weights import load_model, load_tokenizer  # noqa: E402


def _cfg(min_budget: int, **kw) -> ProxyAttnConfig:
    return ProxyAttnConfig(min_budget_tokens=min_budget, dense_below_tokens=0, **kw)


METHODS = {
    "dense": None,
    "proxy g0.95": dict(gamma=0.95),
    "proxy g0.9": dict(gamma=0.9),
    "head_max g0.95": dict(gamma=0.95, estimator=1),
    "head_max g0.9": dict(gamma=0.9, estimator=1),
    "block_mean g0.9": dict(gamma=0.9, estimator=2),
    "static 0.25": dict(budget_fraction=0.25),
}

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
COPY_IDS = (1000, 20000)  # random-token id range (inside both vocabularies)


# ----------------------------------------------------------------------------------------------- data
def bos_ids(tok) -> list[int]:
    return [tok.bos_token_id] if tok.bos_token_id is not None else []


def enc(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def copy_batch(tok, length: int, n: int, seed: int) -> tuple[torch.Tensor, int]:
    """[n, L] `[bos] R R (+1 filler token if L is even)`; returns (ids, start of the second copy)."""
    g = torch.Generator().manual_seed(seed)
    head = bos_ids(tok)
    r = (length - len(head)) // 2
    rows = []
    for _ in range(n):
        rnd = torch.randint(*COPY_IDS, (r,), generator=g).tolist()
        row = head + rnd + rnd
        row += rnd[: length - len(row)]
        rows.append(row)
    return torch.tensor(rows), len(head) + r


def passkey_batch(tok, length: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """[n, L] passkey prompts ending in the answer; returns (ids, answer positions [n, A] as targets, depths)."""
    g = torch.Generator().manual_seed(seed)
    intro = bos_ids(tok) + enc(tok, "There is an important pass key hidden inside a lot of irrelevant text. Find it and memorize it. ")
    filler = enc(tok, FILLER * 8)
    rows, ans_pos, depths = [], [], []
    for t in range(n):
        key = int(torch.randint(10000, 100000, (1,), generator=g))
        needle = enc(tok, f"The pass key is {key}. Remember it. {key} is the pass key. ")
        question = enc(tok, "What is the pass key? The pass key is")
        answer = enc(tok, f" {key}.")
        n_fill = length - len(intro) - len(needle) - len(question) - len(answer)
        assert n_fill > 0, f"L={length} too short for a passkey prompt"
        fill = (filler * (n_fill // len(filler) + 1))[:n_fill]
        depth = (t + 0.5) / n
        cut = int(n_fill * depth)
        row = intro + fill[:cut] + needle + fill[cut:] + question + answer
        assert len(row) == length
        rows.append(row)
        ans_pos.append(list(range(length - len(answer), length)))
        depths.append(depth)
    # answers have the same token count for every 5-digit key in both tokenizers? pad positions to the max length
    width = max(len(p) for p in ans_pos)
    pos = torch.tensor([[p[0]] * (width - len(p)) + p for p in ans_pos])
    return torch.tensor(rows), pos, depths


def natural_batch(tok, length: int) -> torch.Tensor:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    ids = bos_ids(tok) + enc(tok, text[: length * 8])
    assert len(ids) >= length, "not enough natural text"
    return torch.tensor([ids[:length]])


# ----------------------------------------------------------------------------------------------- model runs
def logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def token_losses(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[B, L-1] next-token losses from final hidden states [B, L, H] (lm_head in chunks: big vocabularies)."""
    out = []
    for lo in range(0, ids.shape[1] - 1, chunk):
        hi = min(ids.shape[1] - 1, lo + chunk)
        lg = logits_at(model, hidden[:, lo:hi])
        out.append(torch.nn.functional.cross_entropy(lg.transpose(1, 2), ids[:, lo + 1 : hi + 1], reduction="none"))
    return torch.cat(out, dim=1)


def run_method(model, impl: str, batch: torch.Tensor, device) -> torch.Tensor:
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.model(batch.to(device), use_cache=False).last_hidden_state


# ----------------------------------------------------------------------------------------------- plan statistics
_captured: list = []


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """Stock SDPA, keeping q, k of the calls the sparse path would take (for plan statistics)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    path = hf.choose_path(module, query, key, attention_mask, ProxyAttnConfig(dense_below_tokens=0), dropout=dropout, sliding_window=sliding_window)
    if path == "sparse":
        _captured.append((module.layer_idx, query.transpose(1, 2).detach(), key.transpose(1, 2).detach(), scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs)


def top_overlap(q, k, scale, frac=0.05, every=16) -> tuple[float, float]:
    """Mean pairwise top-k overlap across query heads (and the chance level), rows every `every` in the second half."""
    s, hq = q.shape[1], q.shape[2]
    kx = k.float().repeat_interleave(hq // k.shape[2], dim=2)
    vals, chance = [], []
    for i in range(s // 2, s, every):
        logits = torch.einsum("hd,khd->hk", q[0, i].float(), kx[0, : i + 1]) * scale
        kk = max(1, int(frac * (i + 1)))
        top = logits.topk(kk, dim=-1).indices
        sets = torch.zeros(hq, i + 1, dtype=torch.bool).scatter_(1, top, True)
        inter = (sets[:, None] & sets[None]).sum(-1).float() / kk
        off = ~torch.eye(hq, dtype=torch.bool)
        vals.append(inter[off].mean().item())
        chance.append(kk / (i + 1))
    return sum(vals) / len(vals), sum(chance) / len(chance)


def plan_stats(cfgs: dict, captured) -> dict:
    out = {}
    for layer, q, k, scale in captured:
        ov, ch = top_overlap(q, k, scale)
        entry = {"top5pct_head_overlap": ov, "chance": ch, "methods": {}}
        for name, cfg in cfgs.items():
            plan = plan_blocks(q, k, cfg, scale=scale)
            rec = metrics.attention_recall(q, k, plan, scale=scale)
            entry["methods"][name] = {
                "density": [round(x, 4) for x in plan.density()[0].tolist()],
                "budget": [round(x, 4) for x in plan.budgets[0].tolist()],
                "recall": [round(x, 4) for x in rec[0].tolist()],
            }
        out[str(layer)] = entry
    return out


# ----------------------------------------------------------------------------------------------- main
def write_json(path: str, data: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    names = [m for m in result["methods"]]
    color = {m: f"C{i}" for i, m in enumerate(METHODS)}
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for name in names:
        ls = [c["seq_len"] for c in cells if name in c["copy_loss"]]
        if not ls:
            continue
        ax[0].plot(ls, [c["copy_loss"][name] for c in cells if name in c["copy_loss"]], "o-", label=name, color=color[name])
        ax[1].plot(ls, [c["passkey_acc"][name] for c in cells if name in c["passkey_acc"]], "o-", label=name, color=color[name])
        if name != "dense":
            pts = [(c["density"][name], c["copy_loss"][name]) for c in cells if name in c["density"]]
            ax[2].scatter([p[0] for p in pts], [p[1] for p in pts], label=name, color=color[name])
    for c in cells:
        if "dense" in c["copy_loss"]:
            ax[2].axhline(c["copy_loss"]["dense"], color="k", lw=0.5, ls=":")
    ax[0].set(xscale="log", xlabel="length", ylabel="copy loss (2nd copy)", title="long-range copy")
    ax[1].set(xscale="log", xlabel="length", ylabel="passkey accuracy", title="passkey retrieval", ylim=(-0.05, 1.05))
    ax[2].set(xlabel="mean density (natural text)", ylabel="copy loss", title="copy loss vs density (dotted: dense)")
    last = cells[-1] if cells else None
    if last and last.get("plan"):
        layers = sorted(last["plan"], key=int)
        for name in names:
            if name == "dense":
                continue
            rec = [sum(last["plan"][l]["methods"][name]["recall"]) / len(last["plan"][l]["methods"][name]["recall"]) for l in layers]
            ax[3].plot(range(len(layers)), rec, "o-", label=name, color=color[name])
        ax[3].set(xticks=range(len(layers)), xticklabels=layers, xlabel="layer", ylabel="mean recall", title=f"recall per layer, L={last['seq_len']}")
    ax[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: ProxyAttn accuracy ({result['device']})")
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    os.replace(tmp, path)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":  # redraw the PNG beside a results JSON
        with open(sys.argv[2]) as f:
            plot(json.load(f), sys.argv[2][: -len(".json")] + ".png")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2", "gemma3-270m"])
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--trials", type=int, default=20, help="passkey trials per cell")
    ap.add_argument("--copies", type=int, default=2, help="copy sequences per cell")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--min-budget", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-plan-stats", action="store_true")
    args = ap.parse_args()
    t0 = time.time()
    methods = args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            raise SystemExit(f"unknown method {m!r}; known: {list(METHODS)}")
    cfgs = {m: _cfg(args.min_budget, **METHODS[m]) for m in methods if METHODS[m] is not None}
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf.register()
    AttentionInterface.register("acc_capture", capture_attention)
    AttentionMaskInterface.register("acc_capture", sdpa_mask)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device)
    print(f"[accuracy] {args.model} loaded in {time.time() - t0:.0f} s", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, f"accuracy_{args.model}.json")
    result = {
        "what": "ProxyAttn accuracy on packaged real weights (see benchmarks/accuracy.py docstring)",
        "model": args.model,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores), fp32 reference",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": "python3 benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "methods": {m: (None if METHODS[m] is None else cfgs[m].to_attrs()) for m in methods},
        "trials": args.trials,
        "copies": args.copies,
        "cells": [],
    }
    for length in [int(x) for x in args.lengths.split(",")]:
        t_len = time.time()
        copy_ids, c0 = copy_batch(tok, length, args.copies, seed=length)
        pk_ids, pk_pos, depths = passkey_batch(tok, length, args.trials, seed=length + 1)
        nat_ids = natural_batch(tok, length)
        batch = torch.cat([copy_ids, pk_ids, nat_ids])
        nc, npk = copy_ids.shape[0], pk_ids.shape[0]
        cell = {"seq_len": length, "copy_loss": {}, "passkey_acc": {}, "passkey_hits": {}, "natural_loss_bins": {}, "density": {}, "seconds": {}}
        for m in methods:
            tm = time.time()
            if m == "dense":
                _captured.clear()
                hidden = run_method(model, "acc_capture", batch, args.device)
            else:
                hf.register(cfgs[m])
                hidden = run_method(model, "proxyattn", batch, args.device)
            ids = batch.to(hidden.device)
            copy_l = token_losses(model, hidden[:nc], ids[:nc])[:, c0 - 1 :].mean().item()
            # passkey: argmax at the answer positions (predicted from the previous position)
            pos = pk_pos.to(hidden.device)
            hp = hidden[nc : nc + npk].gather(1, (pos - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
            pred = logits_at(model, hp).argmax(-1)
            hits = (pred == ids[nc : nc + npk].gather(1, pos)).all(-1)
            nat = token_losses(model, hidden[-1:], ids[-1:])[0]
            bins = [nat[i * len(nat) // 4 : (i + 1) * len(nat) // 4].mean().item() for i in range(4)]
            cell["copy_loss"][m] = copy_l
            cell["passkey_acc"][m] = hits.float().mean().item()
            cell["passkey_hits"][m] = hits.int().tolist()
            cell["natural_loss_bins"][m] = bins
            cell["seconds"][m] = round(time.time() - tm, 1)
            print(f"[accuracy] L={length} {m:>16}: copy {copy_l:.3f}  passkey {cell['passkey_acc'][m]:.2f}  natural {sum(bins) / 4:.3f}  ({cell['seconds'][m]} s)", flush=True)
            del hidden
        if _captured and not args.no_plan_stats:
            # density of each method on the natural text's sparse layers (mean over layers and heads), plus stats
            cell["plan"] = plan_stats(cfgs, [(l, q[-1:], k[-1:], s) for l, q, k, s in _captured])
            for m in cfgs:
                ds = [x for e in cell["plan"].values() for x in e["methods"][m]["density"]]
                cell["density"][m] = sum(ds) / len(ds)
        _captured.clear()
        cell["total_seconds"] = round(time.time() - t_len, 1)
        result["cells"].append(cell)
        write_json(json_path, result)
        plot(result, os.path.join(args.out, f"accuracy_{args.model}.png"))
    print(f"\n{args.model}: copy loss / passkey accuracy ({args.trials} trials) / mean density (natural text)")
    for c in result["cells"]:
        for m in methods:
            print(f"  L={c['seq_len']:>6} {m:>16}: {c['copy_loss'][m]:.3f} / {c['passkey_acc'][m]:.2f} / {c['density'].get(m, float('nan')):.2f}")
    print(f"[accuracy] wrote {json_path}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
