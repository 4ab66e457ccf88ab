#!/usr/bin/env python3
"""End-to-end prefill on the GPU: time to first token of a Llama-3-8B-architecture model, stock SDPA vs ProxyAttn.

The model is built from the `llama3.1-8b` entry of engines/models.py (`model_config()`: the Llama-3-8B
architecture, 32 layers, hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocab 128256, with Llama 3.1's
128K context and llama3 RoPE) on the meta device, materialised on the GPU in bf16 and filled with random weights
(no checkpoint exists here). Batch 1, random prompt tokens; one forward with `use_cache=True` and
`logits_to_keep=1` (what a server runs before the first token), timed with CUDA events, median of `--reps` runs
in interleaved rounds (every row once per round, the order rotating) after one warm-up run per (implementation,
length) (the warm-up also compiles and autotunes the kernels).

Rows, per prompt length:
* `sdpa`: transformers' stock attention (`attn_implementation="sdpa"`) with SDPA backends in the priority order
  cuDNN, FlashAttention, efficient, math. Whether cuDNN accepts the GQA call is recorded (`cudnn_gqa`); if it does
  not, a second dense row `dense_cudnn` runs `proxyattn.dense_attention` (cuDNN on expanded K/V) and the faster
  dense row is the baseline.
* `proxyattn default`, `proxyattn default, no dense fallback` and `proxyattn budget_fraction=0.1`:
  `attn_implementation="proxyattn"` (`proxyattn.hf`), i.e. the Triton estimation and block-sparse kernels. Random
  weights make attention diffuse, so the gamma rule keeps most blocks and the dense fallback should send those
  layers to the dense kernel; the fixed fraction shows the speed at a chosen density.
  The warm-up run of each sparse row records the mean plan density over layers and heads.

    python3 benchmarks/prefill.py --out DIR [--sizes 8192,16384,32768,65536,131072] [--reps 2] [--commit SHA]
        [--time-budget 330]

Writes DIR/prefill_<date>.json (atomically, after every length) and prints a table. Lengths run in ascending
order; a length is skipped (and marked so) when the time budget would be exceeded.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch


import proxyattn
import proxyattn.hf as hf
from proxyattn import ProxyAttnConfig
from proxyattn.testing import random_weights_

from engines.models import transformers_config, transformers_config_kwargs
from engines.artifacts import atomic_write_json

# The engines/models.py entry the benchmark runs: the one source of the model's configuration.
MODEL = "llama3.1-8b"


def model_kwargs() -> dict:
    """The transformers config kwargs of MODEL (recorded as the JSON's "model")."""
    return transformers_config_kwargs(MODEL)


def model_config(**override):
    """The `LlamaConfig` the benchmark builds its model from (CPU only, nothing allocated)."""
    return transformers_config(MODEL, **override)


SPARSE_ROWS = [
    ("proxyattn default", ProxyAttnConfig()),
    ("proxyattn default, no dense fallback", ProxyAttnConfig(dense_density=None)),
    ("proxyattn budget_fraction=0.1", ProxyAttnConfig(budget_fraction=0.1)),
]

# Densities the probe attention recorded during a warm-up run (device tensors; read after the run).
_densities: list[torch.Tensor] = []


def probe_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """Like "proxyattn", but keeps the plan's mean density (used for warm-up runs only)."""
    cfg = hf.active_config()
    path = hf.choose_path(module, query, key, attention_mask, cfg, dropout=dropout, sliding_window=sliding_window)
    if path != "sparse":
        return hf.proxyattn_attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    plan = proxyattn.plan_blocks(q, k, cfg, scale=scaling)
    _densities.append(plan.density().mean())
    return proxyattn.block_sparse_attention(q, k, v, plan, scale=scaling), None


def dense_cudnn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """Dense causal prefill through proxyattn.dense_attention (cuDNN, expanded K/V when cuDNN lacks GQA)."""
    assert attention_mask is None and query.shape[2] == key.shape[2], "prefill only"
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    return proxyattn.dense_attention(q, k, v, scale=scaling), None


def build_model(device="cuda", **override):
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = model_config(**override)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device=device)
    random_weights_(model, torch.Generator(device=device).manual_seed(0))
    # Non-persistent buffers (RoPE inverse frequencies) are garbage after to_empty: rebuild them on the GPU.
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return model.eval()


def ttft_ms(model, ids, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        with torch.no_grad():
            out = model(ids, use_cache=True, logits_to_keep=1)
            tok = out.logits[:, -1].argmax(-1)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        del out, tok
        torch.cuda.empty_cache()
    return times


def median(xs):
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def cudnn_takes_gqa(s: int) -> bool | None:
    can = getattr(torch.backends.cuda, "can_use_cudnn_attention", None)
    if can is None:
        return None
    cfg = model_config()
    q = torch.empty(1, cfg.num_attention_heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.empty(1, cfg.num_key_value_heads, s, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    try:
        return bool(can(torch.backends.cuda.SDPAParams(q, k, k, None, 0.0, True, True)))
    except TypeError:
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the JSON")
    ap.add_argument("--sizes", default="8192,16384,32768,65536,131072")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--time-budget", type=float, default=330.0, help="seconds; later lengths are skipped past it")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/prefill.py needs a CUDA GPU (run it on the H200 through the device tool)")
    sizes = [int(x) for x in args.sizes.split(",")]
    t0 = time.time()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import transformers
    import triton
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    hf.register()
    for name, fn in (("proxyattn_probe", probe_attention), ("dense_cudnn", dense_cudnn_attention)):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)

    model = build_model()
    print(f"[prefill] model built in {time.time() - t0:.1f} s; {torch.cuda.memory_allocated() / 2**30:.1f} GiB", flush=True)
    date = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "what": "Time to first token, Llama-3-8B architecture with random bf16 weights, batch 1, stock SDPA vs ProxyAttn",
        "gpu": torch.cuda.get_device_name(),
        "date": date.isoformat(timespec="seconds"),
        "commit": args.commit,
        "default_config": ProxyAttnConfig().to_attrs(),  # what "default" means in this file (report.method_name)
        "command": "python3 benchmarks/prefill.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "triton": triton.__version__},
        "method": f"one forward (use_cache=True, logits_to_keep=1) + argmax, CUDA events, median of {args.reps} runs "
        "in interleaved rounds (every row once per round, the order rotating) after one warm-up run per (row, length)",
        "model": model_kwargs(),
        "rows": [],
        "skipped": [],
    }
    gpu = torch.cuda.get_device_name().upper()
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else gpu.split()[-1].lower()
    out_path = os.path.join(args.out, f"prefill_{tag}.json")
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = True
    last_len_seconds = 0.0
    for s in sizes:
        elapsed = time.time() - t0
        # Doubling the length roughly doubles to quadruples a length's wall time.
        if elapsed + 3.0 * last_len_seconds > args.time_budget:
            result["skipped"].append({"seq_len": s, "reason": f"time budget {args.time_budget:.0f} s (elapsed {elapsed:.0f} s)"})
            print(f"[prefill] S={s}: skipped (time budget)", flush=True)
            continue
        t_len = time.time()
        ids = torch.randint(0, model.config.vocab_size, (1, s), device="cuda", generator=torch.Generator(device="cuda").manual_seed(s))
        row = {"seq_len": s, "cudnn_gqa": cudnn_takes_gqa(s), "ttft_ms": {}, "runs_ms": {}, "density": {}}
        with sdpa_kernel(backends, set_priority=True):
            dense_rows = [("sdpa", "sdpa")] + ([] if row["cudnn_gqa"] else [("dense_cudnn", "dense_cudnn")])
            if first:
                for _, impl in dense_rows:
                    model.set_attn_implementation(impl)
                    ttft_ms(model, ids, 1)
            first = False
            for label, cfg in SPARSE_ROWS:
                hf.register(cfg)
                model.set_attn_implementation("proxyattn_probe")
                _densities.clear()
                ttft_ms(model, ids, 1)  # warm-up: compile, autotune, densities
                row["density"][label] = float(torch.stack(_densities).mean()) if _densities else None
            # Timed runs in interleaved rounds (each round runs every row once, the order rotating), so that clock
            # and allocator drift hit every row alike.
            rows = [(label, impl, None) for label, impl in dense_rows] + [(label, "proxyattn", cfg) for label, cfg in SPARSE_ROWS]
            runs: dict[str, list[float]] = {label: [] for label, _, _ in rows}
            paths: dict[str, set[str]] = {label: set() for label, _, cfg in rows if cfg is not None}
            for rnd in range(args.reps):
                for label, impl, cfg in rows[rnd % len(rows) :] + rows[: rnd % len(rows)]:
                    if cfg is not None:
                        hf.register(cfg)
                    model.set_attn_implementation(impl)
                    with hf.record_paths() as rec:
                        runs[label] += ttft_ms(model, ids, 1)
                    if cfg is not None:
                        paths[label] |= {r.path for r in rec}
            for label, _, cfg in rows:
                row["ttft_ms"][label], row["runs_ms"][label] = median(runs[label]), runs[label]
                if cfg is None:
                    continue
                expected = ["sparse"] if s > cfg.dense_below_tokens else ["dense:short"]
                assert sorted(paths[label]) == expected, f"{label} at S={s}: paths {sorted(paths[label])}, expected {expected}"
                row.setdefault("path", {})[label] = expected[0]
        base_label = min((l for l, _ in dense_rows), key=lambda l: row["ttft_ms"][l])
        row["baseline"] = base_label
        row["speedup"] = {l: row["ttft_ms"][base_label] / row["ttft_ms"][l] for l, _ in SPARSE_ROWS}
        result["rows"].append(row)
        atomic_write_json(out_path, result)
        last_len_seconds = time.time() - t_len
        times = ", ".join(f"{k} {v:.0f} ms" for k, v in row["ttft_ms"].items())
        print(f"[prefill] S={s} done in {last_len_seconds:.1f} s: {times}", flush=True)

    print(f"\nTTFT (ms), {result['gpu']}, Llama-3-8B arch, bf16, batch 1 (speedup vs the faster dense row; density)")
    head = f"{'S':>7} {'dense':>9}" + "".join(f" {l.split(' ', 1)[1]:>26}" for l, _ in SPARSE_ROWS)
    print(head)
    for row in result["rows"]:
        base = row["ttft_ms"][row["baseline"]]
        cells = "".join(
            f" {row['ttft_ms'][l]:>9.1f} {row['speedup'][l]:>5.2f}x d={row['density'][l] or float('nan'):.2f}".rjust(27)
            for l, _ in SPARSE_ROWS
        )
        print(f"{row['seq_len']:>7} {base:>9.1f}{cells}")
    print(f"[prefill] wrote {out_path}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
