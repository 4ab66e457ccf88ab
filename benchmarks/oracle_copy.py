#!/usr/bin/env python3
"""Where the copy loss of a sparse plan comes from: oracle block selections on Gemma-3-270M's long-range copy.

The copy task of `benchmarks/accuracy.py` (`[bos] R R`, loss on the second copy), fp32 on the CPU. The model's
full-attention layers run `reference.block_sparse_attention` with a block mask from one of:

* `plan <name>`: `plan_blocks` with an accuracy.py method (estimated ranking, estimated budgets);
* `oracle mean g`: per (head, query block) the fewest key blocks holding gamma of the block's exact attention
  mass (mean over its rows), best blocks first -- what any estimator of the mean-mass rule could at best do;
* `oracle rows g`: per (head, query block) the shortest prefix of the exact mean-mass ranking that holds gamma
  of the mass of every row of the block; `group-mean|group-max rank`: the same with one ranking per KV group
  (the group's heads' mean or max of that mass), as a shared-ranking plan has;
* `oracle rank + plan counts <name>`: the plan's per-row block counts, filled in the exact mean-mass order;
* `plan rank + oracle-rows counts <name>`: the plan's ranking, cut at the counts of `oracle rows 0.95`;
* `group-mean rank + plan counts <name>`: the plan's counts filled in the exact order of the KV group's mean mass
  (a shared ranking without estimation error); `plan rank + oracle group counts <name>`: the plan's ranking cut
  at the counts of `oracle rows 0.95 group-mean rank`;
* `plan <name> + previous block`: the plan plus key block m-1 in every query block m (a two-block local window);
* `plan rank + exact row counts of every block <name>` / `... sampled at P blocks`: the plan's own ranking (proxy
  scores), each (head, query block) keeping the shortest prefix of it that holds gamma of every row's exact mass
  -- measured at every query block, or at P evenly spaced ones (block m then uses the need fraction of the next
  sampled block); the budget rules measure only the last block and scale it by (m+1) / Nb;
* `plan rank + counts from R strided rows of every block <name>`: the plan's ranking, each (head, query block)
  cut at the shortest prefix holding gamma of each of R rows of the block (its last row and every 128 / R-th row
  before it) -- what budget_rule "block_recall" computes; `plan <name> + counts from R strided rows ...`: the
  same but never below the rule's own scaled counts;
* `plan <name> proxy-shaped counts g`: the rule's budget n_h scaled per query block by how many blocks the proxy
  row needs to reach g of its (normalised) scores, relative to the last block, instead of by (m+1) / Nb.

Sink and diagonal blocks are always kept. Block 128. Density = kept / causal blocks, mean over layers and heads.

    python3 benchmarks/oracle_copy.py --length 4096 --copies 2 --out benchmarks/results

Writes `oracle_copy_gemma3-270m_<L>.json` (atomically, after every experiment).
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


import accuracy as acc
import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig, head_budgets, plan_blocks, proxy_scores, reference
from proxyattn.plan import BlockPlan, compact_plan_top_k
from proxyattn.weights import load_model, load_tokenizer

BS = 128
_state = {"mask_fn": None, "densities": []}


def row_block_mass(q, k, scale, m):
    """Exact attention mass of query block m's rows per key block: `[B, Hq, rows, m+1]` fp32."""
    b, s, hq, _ = q.shape
    lo, hi = m * BS, min(s, (m + 1) * BS)
    kx = reference._expand_kv(k.float(), hq)
    logits = torch.einsum("bqhd,bkhd->bhqk", q[:, lo:hi].float(), kx[:, :hi]) * scale
    logits = logits.masked_fill(~reference._causal_rows(lo, hi, hi, q.device), float("-inf"))
    p = torch.nn.functional.pad(torch.softmax(logits, dim=-1), (0, (m + 1) * BS - hi))
    return p.reshape(b, hq, hi - lo, m + 1, BS).sum(-1)


def oracle(q, k, scale, gamma: float, per_row: bool, shared: str | None = None):
    """Bool block mask `[B, Hq, Nb, Nb]` of the oracle rules (see the module docstring). `shared`: rank the key
    blocks once per KV group instead of per head, by the group's heads' mean ("mean") or max ("max") mass."""
    b, s, hq, _ = q.shape
    nb = -(-s // BS)
    keep = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    grp = hq // k.shape[2]
    for m in range(nb):
        rows = row_block_mass(q, k, scale, m)
        key = rows.mean(2)  # [B, Hq, m+1]
        if shared is not None:
            g = key.reshape(b, hq // grp, grp, m + 1)
            g = g.mean(2) if shared == "mean" else g.amax(2)
            key = g.repeat_interleave(grp, dim=1)
        order = key.argsort(dim=-1, descending=True)
        cum = rows.gather(-1, order[:, :, None].expand_as(rows)).cumsum(-1)  # [B, Hq, rows, m+1]
        if per_row:
            need = ((cum < gamma).sum(-1) + 1).amax(-1)
        else:
            need = (cum.mean(2) < gamma).sum(-1) + 1
        sel = torch.arange(m + 1)[None, None] < need.clamp(max=m + 1)[..., None]
        keep[:, :, m, : m + 1] = torch.zeros_like(sel).scatter(-1, order, sel)
    keep[..., 0] = True
    keep |= torch.eye(nb, dtype=torch.bool)
    return keep & torch.ones(nb, nb, dtype=torch.bool).tril()


def exact_order_mask(q, k, scale, counts, shared: bool = False):
    """Keep counts[b, h, m] blocks per row in exact mean-mass order (sink and diagonal first); `shared`: one order
    per KV group (its heads' mean mass)."""
    b, s, hq, _ = q.shape
    nb = -(-s // BS)
    keep = torch.zeros(b, hq, nb, nb, dtype=torch.bool)
    grp = hq // k.shape[2]
    for m in range(nb):
        key = row_block_mass(q, k, scale, m).mean(2)
        if shared:
            key = key.reshape(b, hq // grp, grp, m + 1).mean(2).repeat_interleave(grp, dim=1)
        key[..., 0] += 2.0
        key[..., m] += 3.0
        order = key.argsort(dim=-1, descending=True)
        sel = torch.arange(m + 1)[None, None] < counts[:, :, m, None]
        keep[:, :, m, : m + 1] = torch.zeros_like(sel).scatter(-1, order, sel)
    return keep


def sampled_row_counts(q, k, scale, scores, cfg: ProxyAttnConfig, samples: int):
    """Per (head, query block) counts from exact row-recall needs measured at `samples` query blocks along the
    plan's own ranking of each (forced blocks first, then score): block m uses the need fraction (need / (j+1))
    of the first sampled block j >= m, times m+1; `samples` = Nb measures every block (no estimation of counts)."""
    b, s, hq, _ = q.shape
    nb = scores.shape[-1]
    rep = hq // scores.shape[1]
    blocks = sorted({nb - 1 - round(i * nb / samples) for i in range(samples)} - {-1})
    frac = []
    for m in blocks:
        rows = row_block_mass(q, k, scale, m)
        order = reference.last_row_order(
            scores[:, :, : m + 1, : m + 1], keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal
        ).repeat_interleave(rep, dim=1)
        cum = rows.gather(-1, order[:, :, None, :].expand_as(rows)).cumsum(-1)
        need = torch.where(cum[..., -1] > 0, (cum < cfg.gamma).sum(-1) + 1, 0).amax(-1)
        frac.append(need.double() / (m + 1))
    frac = torch.stack(frac, -1)  # [B, Hq, samples]
    at = torch.tensor(blocks)
    seg = torch.searchsorted(at, torch.arange(nb))  # first sampled block >= m
    m1 = torch.arange(1, nb + 1, dtype=torch.float64)
    k_ = torch.ceil(frac[..., seg] * m1 - 1e-9).clamp(min=cfg.min_budget_blocks)
    return torch.minimum(k_, m1).to(torch.int32)


def strided_row_counts(q, k, scale, scores, cfg: ProxyAttnConfig, rows: int, budgets=None):
    """Per (head, query block) counts from `rows` evenly strided rows of every query block (its last row
    included): the shortest prefix of the plan's ranking of that block holding gamma of each sampled row's exact
    mass; with `budgets`, never below the rule's scaled counts `block_counts(budgets)`."""
    nb = scores.shape[-1]
    out = reference.block_needs(
        q, k, scores, block_size=BS, gamma=cfg.gamma, scale=scale, rows=rows, keep_sink=cfg.keep_sink, keep_diagonal=cfg.keep_diagonal
    )  # budget rule 3's needs
    m1 = torch.arange(1, nb + 1)
    out = torch.minimum(out.clamp(min=cfg.min_budget_blocks), m1)
    if budgets is not None:
        out = torch.maximum(out, reference.block_counts(budgets, nb, cfg.min_budget_blocks))
    return out


def proxy_shaped_counts(scores, budgets, cfg: ProxyAttnConfig, gamma_proxy: float):
    """Counts that follow the proxy's own spread: k[h, m] = ceil(n_h * need(m) / need(Nb-1)), need(m) the fewest
    key blocks of proxy score row m (normalised to sum 1) reaching gamma_proxy."""
    nb = scores.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=scores.device).tril()
    sc = scores.float().masked_fill(~causal, 0.0).clamp_min(0)
    p = sc / sc.sum(-1, keepdim=True).clamp_min(1e-30)
    need = ((p.sort(-1, descending=True).values.cumsum(-1) < gamma_proxy).sum(-1) + 1).double()
    need = need.repeat_interleave(budgets.shape[1] // scores.shape[1], dim=1)  # [B, Hq, Nb]
    m1 = torch.arange(1, nb + 1, dtype=torch.float64)
    k_ = torch.ceil(budgets.double()[..., None] * need / need[..., -1:] - 1e-9).clamp(min=cfg.min_budget_blocks)
    return torch.minimum(k_, m1).to(torch.int32)


def experiments(min_budget: int) -> dict:
    def cfg(name):
        return ProxyAttnConfig(min_budget_tokens=min_budget, dense_below_tokens=0, block_size=BS, **acc.METHODS[name])

    def plan_mask(name):
        return lambda q, k, s: plan_blocks(q, k, cfg(name), scale=s).to_mask()

    def oracle_rank_plan_counts(name, shared=False):
        return lambda q, k, s: exact_order_mask(q, k, s, plan_blocks(q, k, cfg(name), scale=s).counts, shared)

    def plan_rank_oracle_group_counts(name):
        def f(q, k, s):
            plan = plan_blocks(q, k, cfg(name), scale=s)
            counts = oracle(q, k, s, 0.95, per_row=True, shared="mean").sum(-1).to(torch.int32)
            return BlockPlan(plan.order, counts, plan.budget_blocks, plan.block_size, plan.seq_len).to_mask()

        return f

    def plan_rank_oracle_counts(name):
        def f(q, k, s):
            plan = plan_blocks(q, k, cfg(name), scale=s)
            counts = oracle(q, k, s, 0.95, per_row=True).sum(-1).to(torch.int32)
            return BlockPlan(plan.order, counts, plan.budget_blocks, plan.block_size, plan.seq_len).to_mask()

        return f

    def with_previous(name):
        def f(q, k, s):
            mask = plan_blocks(q, k, cfg(name), scale=s).to_mask()
            nb = mask.shape[-1]
            return mask | torch.eye(nb, dtype=torch.bool, device=mask.device).roll(-1, dims=1).tril(-1)

        return f

    def ones(q):  # budgets stored in a plan whose counts are given
        return torch.ones(q.shape[0], q.shape[2], dtype=torch.int32)

    def sampled(name, samples):
        def f(q, k, s):
            c = cfg(name)
            scores = proxy_scores(q, k, c, scale=s)
            n = samples or scores.shape[-1]
            return compact_plan_top_k(scores, sampled_row_counts(q, k, s, scores, c, n), ones(q), q.shape[1], c).to_mask()

        return f

    def shaped(name, gamma_proxy):
        def f(q, k, s):
            c = cfg(name)
            scores = proxy_scores(q, k, c, scale=s)
            budgets = head_budgets(q, k, c, scale=s, scores=scores)
            top_k = proxy_shaped_counts(scores, budgets, c, gamma_proxy)
            return compact_plan_top_k(scores, top_k, budgets, q.shape[1], c).to_mask()

        return f

    def strided(name, rows, with_budget):
        def f(q, k, s):
            c = cfg(name)
            scores = proxy_scores(q, k, c, scale=s)
            budgets = head_budgets(q, k, c, scale=s, scores=scores) if with_budget else None
            top_k = strided_row_counts(q, k, s, scores, c, rows, budgets)
            return compact_plan_top_k(scores, top_k, ones(q) if budgets is None else budgets, q.shape[1], c).to_mask()

        return f

    out = {
        "dense": None,
        "plan rank + exact row counts of every block row_recall g0.95": sampled("row_recall g0.95", 0),
        "plan rank + row counts sampled at 8 blocks row_recall g0.95": sampled("row_recall g0.95", 8),
        "plan rank + row counts sampled at 4 blocks row_recall g0.95": sampled("row_recall g0.95", 4),
        "plan row_recall g0.95 proxy-shaped counts 0.9": shaped("row_recall g0.95", 0.9),
        "plan head_max+recall g0.95": plan_mask("head_max+recall g0.95"),
        "plan head_max+row_recall g0.95": plan_mask("head_max+row_recall g0.95"),
        "oracle mean 0.95": lambda q, k, s: oracle(q, k, s, 0.95, per_row=False),
        "oracle mean 0.98": lambda q, k, s: oracle(q, k, s, 0.98, per_row=False),
        "oracle rows 0.95": lambda q, k, s: oracle(q, k, s, 0.95, per_row=True),
        "oracle rows 0.95 group-mean rank": lambda q, k, s: oracle(q, k, s, 0.95, per_row=True, shared="mean"),
        "oracle rows 0.95 group-max rank": lambda q, k, s: oracle(q, k, s, 0.95, per_row=True, shared="max"),
        "oracle rank + plan counts head_max+recall g0.95": oracle_rank_plan_counts("head_max+recall g0.95"),
        "plan rank + oracle-rows counts head_max+recall g0.95": plan_rank_oracle_counts("head_max+recall g0.95"),
        "group-mean rank + plan counts row_recall g0.95": oracle_rank_plan_counts("row_recall g0.95", shared=True),
        "plan rank + oracle group counts row_recall g0.95": plan_rank_oracle_group_counts("row_recall g0.95"),
        "plan recall g0.95": plan_mask("recall g0.95"),
        "plan row_recall g0.95": plan_mask("row_recall g0.95"),
        "plan recall g0.95 + previous block": with_previous("recall g0.95"),
        "plan row_recall g0.95 + previous block": with_previous("row_recall g0.95"),
    }
    for g in ("0.95", "0.9"):
        for r in (4, 8, 16, 32):
            out[f"plan rank + counts from {r} strided rows of every block row_recall g{g}"] = strided(f"row_recall g{g}", r, False)
            out[f"plan row_recall g{g} + counts from {r} strided rows of every block"] = strided(f"row_recall g{g}", r, True)
    return out


def masked_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    path = hf.choose_path(
        module, query, key, attention_mask, ProxyAttnConfig(dense_below_tokens=0), dropout=dropout, sliding_window=sliding_window
    )
    if path != "sparse" or _state["mask_fn"] is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, sliding_window=sliding_window, **kwargs
        )
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    mask = _state["mask_fn"](q, k, scaling)
    nb = mask.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool, device=mask.device).tril()
    _state["densities"].append(float(((mask & causal).sum((-1, -2)).float() / causal.sum()).mean()))
    out, _ = reference.block_sparse_attention(q, k, v, mask, block_size=BS, scale=scaling)
    return out.to(query.dtype), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--copies", type=int, default=2)
    ap.add_argument("--min-budget", type=int, default=256)
    ap.add_argument("--only", default=None, help="comma list of experiment names (default: all)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", default="", help="suffix of the output file name (runs of a subset)")
    args = ap.parse_args()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("oracle_copy", masked_attention)
    AttentionMaskInterface.register("oracle_copy", sdpa_mask)
    tok = load_tokenizer("gemma3-270m")
    model = load_model("gemma3-270m", device="cpu", dtype=torch.float32)
    model.set_attn_implementation("oracle_copy")
    ids, c0 = acc.copy_batch(tok, args.length, args.copies, seed=args.length)
    exps = experiments(args.min_budget)
    names = list(exps) if args.only is None else ["dense"] + [n for n in args.only.split(",") if n != "dense"]
    for n in names:
        if n not in exps:
            raise SystemExit(f"unknown experiment {n!r}; known: {list(exps)}")
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    result = {
        "what": "oracle block selections on the copy task (benchmarks/oracle_copy.py docstring)",
        "model": "gemma3-270m",
        "device": f"CPU ({os.cpu_count()} cores), float32, fp32 reference",
        "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python3 benchmarks/oracle_copy.py " + " ".join(sys.argv[1:]),
        "seq_len": args.length,
        "copies": args.copies,
        "rows": [],
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"oracle_copy_gemma3-270m_{args.length}{'_' + args.tag if args.tag else ''}.json")
    dense = None
    for n in names:
        t = time.time()
        _state["mask_fn"], _state["densities"] = exps[n], []
        losses = []
        with torch.no_grad():
            for i in range(args.copies):
                hid = model.model(ids[i : i + 1], use_cache=False).last_hidden_state
                losses.append(acc.token_losses(model, hid, ids[i : i + 1])[:, c0 - 1 :].mean().item())
        loss = sum(losses) / len(losses)
        dense = loss if n == "dense" else dense
        dens = sum(_state["densities"]) / len(_state["densities"]) if _state["densities"] else 1.0
        result["rows"].append(
            {
                "name": n,
                "copy_loss": loss,
                "x_dense": loss / dense,
                "density": dens,
                "per_seq": [round(x, 4) for x in losses],
                "seconds": round(time.time() - t, 1),
            }
        )
        print(f"[oracle] {n:55s} copy {loss:.4f} ({loss / dense:.3f}x dense) density {dens:.3f} ({time.time() - t:.0f} s)", flush=True)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, path)


if __name__ == "__main__":
    main()
