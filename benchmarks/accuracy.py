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

Methods (`--methods`, names in METHODS): dense; `proxy` (the paper: mean-pooled proxy heads, budget_rule "mass")
at gamma 0.95 / 0.9; `recall` (budget_rule "recall") also at 0.98 / 0.99; `row_recall` (gamma of every last-block
row) also at 0.8, so that the rules meet at equal density; `block_recall` (the default rule) at 0.95 / 0.9 / 0.8;
`head_max` (estimator "head_max") alone and with the recall rules (also at stride 16); `block_mean` (estimator
"block_mean", baseline) at 0.9; `static` (budget_fraction 0.25, baseline). All
sparse methods use block 128, stride 4 unless named, one proxy head, and `--min-budget` tokens (default 256: the
default 2048 would make every length here dense) with dense_below 0.

    python3 benchmarks/accuracy.py --model smollm2 --lengths 1024,2048 --trials 20 --copies 2 --out benchmarks/results

Writes `accuracy_<model>.json` (atomically, after every length) and `accuracy_<model>.png`; prints a table.
Runs on the CPU (fp32 reference) or a GPU (`--device cuda`, kernels).
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


import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig, block_sparse_attention, metrics, plan_blocks
from proxyattn.weights import load_model, load_tokenizer

from engines.artifacts import atomic_write_json
from frontier import plot_frontier, save_figure


def _cfg(min_budget: int, **kw) -> ProxyAttnConfig:
    return ProxyAttnConfig(min_budget_tokens=min_budget, dense_below_tokens=0, **kw)


METHODS = {
    "dense": None,
    "proxy g0.95": dict(gamma=0.95, budget_rule="mass"),
    "proxy g0.9": dict(gamma=0.9, budget_rule="mass"),
    "head_max g0.95": dict(gamma=0.95, estimator="head_max", budget_rule="mass"),
    "head_max g0.9": dict(gamma=0.9, estimator="head_max", budget_rule="mass"),
    "recall g0.95": dict(gamma=0.95, budget_rule="recall"),
    "recall g0.9": dict(gamma=0.9, budget_rule="recall"),
    "recall g0.98": dict(gamma=0.98, budget_rule="recall"),  # recall at the density row_recall reaches at 0.95
    "recall g0.99": dict(gamma=0.99, budget_rule="recall"),
    "head_max+recall g0.95": dict(gamma=0.95, estimator="head_max", budget_rule="recall"),
    "head_max+recall g0.9": dict(gamma=0.9, estimator="head_max", budget_rule="recall"),
    "head_max s16+recall g0.95": dict(gamma=0.95, estimator="head_max", budget_rule="recall", stride=16),
    "row_recall g0.95": dict(gamma=0.95, budget_rule="row_recall"),
    "row_recall g0.9": dict(gamma=0.9, budget_rule="row_recall"),
    "row_recall g0.8": dict(gamma=0.8, budget_rule="row_recall"),  # row_recall at the density recall reaches at 0.95
    "head_max+row_recall g0.95": dict(gamma=0.95, estimator="head_max", budget_rule="row_recall"),
    "head_max+row_recall g0.9": dict(gamma=0.9, estimator="head_max", budget_rule="row_recall"),
    "head_max s16+row_recall g0.95": dict(gamma=0.95, estimator="head_max", budget_rule="row_recall", stride=16),
    "block_recall g0.95": dict(gamma=0.95, budget_rule="block_recall"),
    "block_recall g0.9": dict(gamma=0.9, budget_rule="block_recall"),
    "block_recall g0.8": dict(gamma=0.8, budget_rule="block_recall"),
    "block_recall r8 g0.95": dict(gamma=0.95, budget_rule="block_recall", recall_rows=8),
    "block_recall r8 g0.9": dict(gamma=0.9, budget_rule="block_recall", recall_rows=8),
    "block_mean g0.9": dict(gamma=0.9, estimator="block_mean", budget_rule="mass"),
    "static 0.25": dict(budget_fraction=0.25),
    # the accuracy-against-density frontier (FRONTIER): every rule over gamma, fewer recall rows, budget_fraction
    "proxy g0.8": dict(gamma=0.8, budget_rule="mass"),
    "recall g0.8": dict(gamma=0.8, budget_rule="recall"),
    "block_recall g0.85": dict(gamma=0.85, budget_rule="block_recall"),
    "block_recall g0.7": dict(gamma=0.7, budget_rule="block_recall"),
    "block_recall g0.84": dict(gamma=0.84, budget_rule="block_recall"),
    "block_recall g0.83": dict(gamma=0.83, budget_rule="block_recall"),
    "block_recall g0.82": dict(gamma=0.82, budget_rule="block_recall"),
    "block_recall r2 g0.85": dict(gamma=0.85, budget_rule="block_recall", recall_rows=2),
    "block_recall r2 g0.95": dict(gamma=0.95, budget_rule="block_recall", recall_rows=2),
    "block_recall r2 g0.9": dict(gamma=0.9, budget_rule="block_recall", recall_rows=2),
    "block_recall r2 g0.8": dict(gamma=0.8, budget_rule="block_recall", recall_rows=2),
    "static 0.1": dict(budget_fraction=0.1),
    "static 0.2": dict(budget_fraction=0.2),
    "static 0.35": dict(budget_fraction=0.35),
    "static 0.5": dict(budget_fraction=0.5),
    # vertical columns (column_fraction) beside the default rule's blocks and beside small fixed budgets
    "block_recall g0.83 col0.02": dict(gamma=0.83, budget_rule="block_recall", column_fraction=0.02),
    "block_recall g0.7 col0.02": dict(gamma=0.7, budget_rule="block_recall", column_fraction=0.02),
    "static 0.1 col0.02": dict(budget_fraction=0.1, column_fraction=0.02),
    "static 0.05 col0.05": dict(budget_fraction=0.05, column_fraction=0.05),
}
# `--methods frontier`: the methods of the accuracy-against-density frontier (benchmarks/frontier.py draws it; the
# README's table and plot put every model's run together)
FRONTIER = [
    "dense",
    "block_recall g0.95",
    "block_recall g0.9",
    "block_recall g0.85",
    "block_recall g0.8",
    "block_recall g0.7",
    "block_recall r2 g0.95",
    "block_recall r2 g0.9",
    "block_recall r2 g0.8",
    "row_recall g0.95",
    "recall g0.8",
    "proxy g0.95",
    "static 0.2",
    "static 0.35",
    "static 0.5",
]


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
BINS = 8  # position bins of the natural-text loss
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
@torch.no_grad()
def logits_at(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@torch.no_grad()
def token_losses(model, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """[B, L-1] next-token losses from final hidden states [B, L, H] (lm_head in chunks: big vocabularies)."""
    out = []
    for lo in range(0, ids.shape[1] - 1, chunk):
        hi = min(ids.shape[1] - 1, lo + chunk)
        lg = logits_at(model, hidden[:, lo:hi])
        tgt = ids[:, lo + 1 : hi + 1]  # rows of [N, vocab]: the class-dim-1 layout of a transposed view is ~100x slower on CUDA
        out.append(torch.nn.functional.cross_entropy(lg.flatten(0, 1), tgt.flatten(), reduction="none").view_as(tgt))
    return torch.cat(out, dim=1)


def run_method(model, impl: str, batch: torch.Tensor, device, micro: int) -> tuple[torch.Tensor, float | None]:
    """Final hidden states `[N, L, H]` of `batch` in micro-batches, and the mean plan density of the sparse calls."""
    model.set_attn_implementation(impl)
    _sparse["densities"].clear()
    outs = []
    with torch.no_grad():
        for lo in range(0, batch.shape[0], micro):
            outs.append(model.model(batch[lo : lo + micro].to(device), use_cache=False).last_hidden_state)
    dens = _sparse["densities"]
    density = float(torch.cat([d.flatten() for d in dens]).mean()) if dens else None
    return torch.cat(outs), density


# ----------------------------------------------------------------------------------------------- sparse path
_sparse = {"config": None, "densities": []}


def banded_attention(query, key, value, window: int, scale: float) -> torch.Tensor:
    """Causal sliding-window attention of full, unpadded sequences (key j visible to query i iff
    i - window < j <= i, transformers' `sliding_window_overlay`), `[B, S, Hq, D]` from query `[B, Hq, S, D]` and
    key / value `[B, Hkv, S, D]`: queries in chunks of `window` against the previous and their own chunk, so
    O(S * window) work instead of the O(S^2) masked SDPA transformers runs (Gemma 3's local layers at 32K)."""
    b, hq, s, d = query.shape
    w = window
    n = -(-s // w)

    def chunks(t):  # [B, H, S, D] -> [B * n, H, w, D]
        t = torch.nn.functional.pad(t, (0, 0, 0, n * w - s))
        return t.reshape(b, t.shape[1], n, w, d).transpose(1, 2).reshape(b * n, t.shape[1], w, d)

    def with_previous(t):  # [B * n, H, w, D] -> [B * n, H, 2w, D]: the previous chunk (zeros before the first)
        t5 = t.reshape(b, n, *t.shape[1:])
        prev = torch.cat([torch.zeros_like(t5[:, :1]), t5[:, :-1]], dim=1)
        return torch.cat([prev, t5], dim=3).reshape(b * n, t.shape[1], 2 * w, d)

    qc = chunks(query)
    kc, vc = with_previous(chunks(key)), with_previous(chunks(value))
    i = torch.arange(w, device=query.device)[:, None] + w
    j = torch.arange(2 * w, device=query.device)[None, :]
    band = (j <= i) & (j > i - w)
    mask = band.expand(b, n, w, 2 * w).clone()
    mask[:, 0, :, :w] = False  # the first chunk has no previous one
    out = torch.nn.functional.scaled_dot_product_attention(
        qc, kc, vc, attn_mask=mask.reshape(b * n, 1, w, 2 * w), scale=scale, enable_gqa=hq != key.shape[1]
    )
    return out.reshape(b, n, hq, w, d).permute(0, 1, 3, 2, 4).reshape(b, n * w, hq, d)[:, :s]


def dense_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """The dense path of both harness attentions: sliding-window layers banded (`banded_attention`: the harness
    never pads nor caches, so their mask is the plain causal window), everything else transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if sliding_window is not None and dropout == 0.0 and query.shape[2] == key.shape[2]:
        return banded_attention(query, key, value, sliding_window, scaling), None
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs
    )


def recording_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """`proxyattn`'s attention with the plan's density recorded: the same `hf.choose_path` decision, and on the
    sparse path `proxy_attention`'s two stages (`plan_blocks`, then `block_sparse_attention`) called separately."""
    cfg = _sparse["config"]
    path = hf.choose_path(module, query, key, attention_mask, cfg, dropout=dropout, sliding_window=sliding_window)
    if path != "sparse":
        return dense_attention(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    plan = plan_blocks(q, k, cfg, scale=scaling)
    _sparse["densities"].append(plan.work_density())  # [B, Hq], the columns' work included
    return block_sparse_attention(q, k, v, plan, scale=scaling), None


# ----------------------------------------------------------------------------------------------- plan statistics
_captured: list = []
_capture_on = [False]  # capture only during the dense run on the natural text


def capture_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """Dense attention (`dense_attention`), keeping q, k of the calls the sparse path would take (plan statistics)."""
    path = hf.choose_path(
        module, query, key, attention_mask, ProxyAttnConfig(dense_below_tokens=0), dropout=dropout, sliding_window=sliding_window
    )
    if path == "sparse" and _capture_on[0]:
        _captured.append((module.layer_idx, query.transpose(1, 2).detach(), key.transpose(1, 2).detach(), scaling))
    return dense_attention(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs
    )


def top_overlap(q, k, scale, frac=0.05, every=16) -> tuple[float, float]:
    """Mean pairwise top-k overlap across query heads (and the chance level), rows every `every` in the second half."""
    s, hq = q.shape[1], q.shape[2]
    kx = k.float().repeat_interleave(hq // k.shape[2], dim=2)
    vals, chance = [], []
    for i in range(s // 2, s, every):
        logits = torch.einsum("hd,khd->hk", q[0, i].float(), kx[0, : i + 1]) * scale
        kk = max(1, int(frac * (i + 1)))
        top = logits.topk(kk, dim=-1).indices
        sets = torch.zeros(hq, i + 1, dtype=torch.bool, device=q.device).scatter_(1, top, True)
        inter = (sets[:, None] & sets[None]).sum(-1).float() / kk
        off = ~torch.eye(hq, dtype=torch.bool, device=q.device)
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
                "density": [round(x, 4) for x in plan.work_density()[0].tolist()],
                "budget": [round(x, 4) for x in plan.budgets[0].tolist()],
                "recall": [round(x, 4) for x in rec[0].tolist()],
            }
        out[str(layer)] = entry
    return out


# ----------------------------------------------------------------------------------------------- plots
def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    names = list(result["methods"])
    color = {m: ("k" if m == "dense" else f"C{i % 10}") for i, m in enumerate(m for m in METHODS if m != "dense")}
    color["dense"] = "k"
    fig, ax = plt.subplots(1, 5, figsize=(25, 4.6))
    for name in names:
        cs = [c for c in cells if name in c["copy_loss"]]
        if not cs:
            continue
        ls = [c["seq_len"] for c in cs]
        ax[0].plot(ls, [c["copy_loss"][name] for c in cs], "o-", label=name, color=color[name])
        pk = [c for c in cells if name in c["passkey_acc"]]
        ax[1].plot([c["seq_len"] for c in pk], [c["passkey_acc"][name] for c in pk], "o-", label=name, color=color[name])
        if name != "dense":
            pts = [
                (c.get("density_copy", c["density"]).get(name), c["copy_loss"][name] / c["copy_loss"]["dense"], c["seq_len"])
                for c in cs
                if "dense" in c["copy_loss"]
            ]
            pts = [p for p in pts if p[0] is not None]
            ax[2].plot([p[0] for p in pts], [p[1] for p in pts], "o", label=name, color=color[name])
            for x, y, n in pts:
                ax[2].annotate(f"{n // 1024}K", (x, y), fontsize=6)
    ax[2].axhline(1.03, color="k", lw=0.6, ls=":")
    ax[0].set(xscale="log", xlabel="length", ylabel="copy loss (2nd copy)", title="long-range copy")
    ax[1].set(
        xscale="log", xlabel="length", ylabel="passkey accuracy", title=f"passkey retrieval ({result['trials']} trials)", ylim=(-0.05, 1.05)
    )
    ax[2].set(yscale="log", xlabel="density on the copy task", ylabel="copy loss / dense", title="copy loss vs density (dotted: +3%)")
    last = cells[-1] if cells else None
    if last:
        for name in names:
            bins = last["natural_loss_bins"].get(name)
            if bins:
                ax[3].plot([(i + 0.5) / len(bins) for i in range(len(bins))], bins, "o-", label=name, color=color[name])
        ax[3].set(xlabel="relative position", ylabel="next-token loss", title=f"natural text by position, L={last['seq_len']}")
    if last and last.get("plan"):
        layers = sorted(last["plan"], key=int)
        for name in names:
            if name == "dense" or any(name not in last["plan"][l]["methods"] for l in layers):
                continue
            rec = [sum(last["plan"][l]["methods"][name]["recall"]) / len(last["plan"][l]["methods"][name]["recall"]) for l in layers]
            ax[4].plot(range(len(layers)), rec, "o-", label=name, color=color[name])
        ax[4].set(
            xticks=range(len(layers)),
            xticklabels=layers,
            xlabel="layer",
            ylabel="mean recall (natural text)",
            title=f"recall per layer, L={last['seq_len']}",
        )
    ax[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: ProxyAttn accuracy ({result['device']})")
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":  # redraw the PNGs beside a results JSON
        with open(sys.argv[2]) as f:
            result = json.load(f)
        plot(result, sys.argv[2][: -len(".json")] + ".png")
        if sum(m != "dense" for m in result["methods"]) >= 2:
            plot_frontier([result], sys.argv[2][: -len(".json")] + "_frontier.png")
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, choices=["smollm2", "gemma3-270m"])
    ap.add_argument("--lengths", required=True)
    ap.add_argument("--trials", type=int, default=20, help="passkey trials per cell")
    ap.add_argument("--copies", type=int, default=2, help="copy sequences per cell")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of METHODS names, or 'frontier' (FRONTIER)")
    ap.add_argument("--tag", default="", help="results go to accuracy_<model>[_<tag>].json / .png")
    ap.add_argument("--min-budget", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model weights and activations")
    ap.add_argument("--batch", type=int, default=4, help="sequences per forward")
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-plan-stats", action="store_true")
    ap.add_argument("--tasks", default="copy,passkey,natural", help="subset of copy,passkey,natural (plan statistics need natural)")
    ap.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD)")
    args = ap.parse_args()
    t0 = time.time()
    methods = FRONTIER if args.methods == "frontier" else args.methods.split(",")
    for m in methods:
        if m not in METHODS:
            allowed = f"'frontier' alone, or a comma list of {list(METHODS)}"
            print(f"accuracy.py: --methods: unknown method {m!r}; allowed: {allowed}", file=sys.stderr)
            raise SystemExit(2)
    if not all(c.isalnum() or c in "_.-" for c in args.tag):
        print(f"accuracy.py: --tag={args.tag!r}: allowed are letters, digits, '_', '.' and '-' (it names files)", file=sys.stderr)
        raise SystemExit(2)
    cfgs = {m: _cfg(args.min_budget, **METHODS[m]) for m in methods if METHODS[m] is not None}
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf.register()
    AttentionInterface.register("acc_capture", capture_attention)
    AttentionMaskInterface.register("acc_capture", sdpa_mask)
    AttentionInterface.register("acc_sparse", recording_attention)
    AttentionMaskInterface.register("acc_sparse", sdpa_mask)
    tok = load_tokenizer(args.model)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    print(f"[accuracy] {args.model} loaded in {time.time() - t0:.0f} s", flush=True)
    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"accuracy_{args.model}" + (f"_{args.tag}" if args.tag else ""))
    json_path = stem + ".json"
    result = {
        "what": "ProxyAttn accuracy on packaged real weights (see benchmarks/accuracy.py docstring)",
        "model": args.model,
        "device": (
            f"{torch.cuda.get_device_name()}, {args.dtype}, Triton kernels"
            if args.device.startswith("cuda")
            else f"CPU ({os.cpu_count()} cores), {args.dtype}, fp32 reference"
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": "python3 benchmarks/accuracy.py " + " ".join(sys.argv[1:]),
        "methods": {m: (None if METHODS[m] is None else cfgs[m].to_attrs()) for m in methods},
        "trials": args.trials,
        "copies": args.copies,
        "cells": [],
    }
    tasks = set(args.tasks.split(","))
    if not tasks or not tasks <= {"copy", "passkey", "natural"}:
        raise SystemExit(f"--tasks={args.tasks!r}: allowed a comma list of copy, passkey, natural")
    for length in [int(x) for x in args.lengths.split(",")]:
        t_len = time.time()
        copy_ids, c0 = copy_batch(tok, length, args.copies, seed=length)
        pk_ids, pk_pos, depths = passkey_batch(tok, length, args.trials, seed=length + 1)
        nat_ids = natural_batch(tok, length)
        cell = {
            "seq_len": length,
            "copy_loss": {},
            "copy_loss_per_seq": {},
            "passkey_acc": {},
            "passkey_hits": {},
            "passkey_depths": depths,
            "natural_loss_bins": {},
            "density": {},
            "density_copy": {},
            "density_passkey": {},
            "seconds": {},
        }
        for m in methods:
            tm = time.time()
            dens = {}
            if m == "dense":
                impl = "acc_capture"
            else:
                impl = "acc_sparse"
                _sparse["config"] = cfgs[m]
            if "copy" in tasks:
                hid, dens["copy"] = run_method(model, impl, copy_ids, args.device, args.batch)
                per_seq = token_losses(model, hid, copy_ids.to(hid.device))[:, c0 - 1 :].mean(dim=1)
                del hid
                cell["copy_loss"][m] = per_seq.mean().item()
                cell["copy_loss_per_seq"][m] = [round(x, 4) for x in per_seq.tolist()]
            if "passkey" in tasks:
                hid, dens["passkey"] = run_method(model, impl, pk_ids, args.device, args.batch)
                # passkey: argmax at the answer positions (predicted from the previous position)
                pos = pk_pos.to(hid.device)
                hp = hid.gather(1, (pos - 1)[..., None].expand(-1, -1, hid.shape[-1]))
                hits = (logits_at(model, hp).argmax(-1) == pk_ids.to(hid.device).gather(1, pos)).all(-1)
                del hid
                cell["passkey_acc"][m] = hits.float().mean().item()
                cell["passkey_hits"][m] = hits.int().tolist()
            if "natural" in tasks:
                _capture_on[0] = m == "dense"  # plan statistics come from the natural text only
                hid, dens["natural"] = run_method(model, impl, nat_ids, args.device, args.batch)
                _capture_on[0] = False
                nat = token_losses(model, hid, nat_ids.to(hid.device))[0]
                del hid
                cell["natural_loss_bins"][m] = [nat[i * len(nat) // BINS : (i + 1) * len(nat) // BINS].mean().item() for i in range(BINS)]
            if m != "dense":
                for task, key in (("natural", "density"), ("copy", "density_copy"), ("passkey", "density_passkey")):
                    if task in dens:
                        cell[key][m] = dens[task]
            cell["seconds"][m] = round(time.time() - tm, 1)
            parts = [
                f"copy {cell['copy_loss'][m]:.3f}" if m in cell["copy_loss"] else "",
                f"passkey {sum(cell['passkey_hits'][m])}/{args.trials}" if m in cell["passkey_hits"] else "",
                f"natural {sum(cell['natural_loss_bins'][m]) / BINS:.3f}" if m in cell["natural_loss_bins"] else "",
                "density " + "/".join(f"{t} {d:.2f}" for t, d in dens.items()) if m != "dense" else "",
            ]
            print(f"[accuracy] L={length} {m:>22}: " + "  ".join(p for p in parts if p) + f"  ({cell['seconds'][m]} s)", flush=True)
        if _captured and not args.no_plan_stats:
            cell["plan"] = plan_stats(cfgs, [(l, q[-1:], k[-1:], s) for l, q, k, s in _captured])
        _captured.clear()
        cell["total_seconds"] = round(time.time() - t_len, 1)
        result["cells"].append(cell)
        atomic_write_json(json_path, result)
        plot(result, stem + ".png")
        if sum(m != "dense" for m in methods) >= 2 and "copy" in tasks:
            plot_frontier([result], stem + "_frontier.png")
    print(f"\n{args.model}: copy loss (vs dense) / passkey hits / density copy, natural")
    for c in result["cells"]:
        for m in methods:
            cl = c["copy_loss"].get(m, float("nan"))
            rel = cl / c["copy_loss"]["dense"] if "dense" in c["copy_loss"] else float("nan")
            hits = c["passkey_hits"].get(m)
            print(
                f"  L={c['seq_len']:>6} {m:>22}: {cl:.3f} ({rel:.3f}x) / {'-' if hits is None else f'{sum(hits)}/{len(hits)}'}"
                f" / {c['density_copy'].get(m, 1.0):.2f}, {c['density'].get(m, 1.0):.2f}"
            )
    print(f"[accuracy] wrote {json_path}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
