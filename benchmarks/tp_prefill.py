#!/usr/bin/env python3
"""Tensor-parallel prefill on GPUs: time to first token and peak memory per GPU, TP=2 against TP=1, ProxyAttn
against dense, Llama-3-8B architecture with random bf16 weights (the `llama3.1-8b` entry of engines/models.py).

    python3 benchmarks/tp_prefill.py --out benchmarks/results [--sizes 32K,64K,128K] [--tp 1,2] [--reps 2]
        [--checkpoint /tmp/tp_prefill_llama3.1-8b] [--commit SHA]

The driver (above) writes the random checkpoint once (safetensors, 16 GB; transformers' tensor parallelism loads
through `from_pretrained`), then for each degree N of --tp launches

    python3 -m torch.distributed.run --standalone --nproc_per_node N benchmarks/tp_prefill.py --worker --tp N ...

(the worker can be launched so by hand too), each writing `tp_prefill_tp<N>.json` in --out, and merges every
partial found there into `tp_prefill_<gpu>.json`. A worker loads the model with `proxyattn.tp.from_pretrained`
(transformers' `DistributedConfig(tp_plan="auto")`, NCCL), and per prompt length times, for each row,

* `sdpa`: transformers' stock attention (SDPA, cuDNN first), the dense baseline on the same shards;
* `proxyattn default` and `proxyattn budget_fraction=0.1`: `attn_implementation="proxyattn"` with proxy_heads=2
  (a multiple of every degree run, so TP=1 and TP=2 run the same plan per head). Random weights attend diffusely,
  so the default's dense fallback keeps most groups dense; the fixed fraction shows the speed at a chosen density.

Time to first token: one forward (`use_cache=True`, `logits_to_keep=1`) plus the argmax, wall clock from a barrier
to a device synchronisation, the slowest rank's time (max over ranks), median of --reps runs after one warm-up run
per (row, length). Peak memory: each rank's `torch.cuda.max_memory_allocated` over the timed runs of a row. The
warm-up run of a sparse row records the mean plan density over layers and heads (with each shard's config,
`proxyattn.tp.shard_config`). Without CUDA the worker runs on the CPU with gloo: a smoke run of the code path only
(`--model tiny-llama --sizes 9K`), whose times mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from proxyattn.testing import random_weights_

from engines.artifacts import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]

MODEL = "llama3.1-8b"  # engines/models.py: 32 layers, hidden 4096, 32 query / 8 KV heads, head dim 128, 128K context
MODEL_CHOICES = (MODEL, "tiny-llama")  # tiny-llama (4 / 2 heads): only a CPU smoke run of the code path
PROXY_HEADS = 2
ROWS = (("proxyattn default", {}), ("proxyattn budget_fraction=0.1", {"budget_fraction": 0.1}))
ALLOWED_TP = (1, 2)  # proxy_heads=2 must be a multiple of the degree (proxyattn.tp.check_tp)


# --------------------------------------------------------------------------------------------- pure helpers
def parse_sizes(text: str) -> list[int]:
    """ "32K,64K,128K" or "32768,65536" -> token counts (K = 1024), ascending, each a positive multiple of 128."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        mult = 1024 if item[-1:] in ("K", "k") else 1
        digits = item[:-1] if mult == 1024 else item
        if not digits.isdigit() or int(digits) * mult < 128 or int(digits) * mult % 128:
            raise ValueError(f"--sizes item {item!r} must be a positive multiple of 128 tokens, e.g. 32768 or 32K")
        sizes.append(int(digits) * mult)
    return sorted(set(sizes))


def parse_tp(text: str) -> list[int]:
    """ "1,2" -> [1, 2]; each degree in ALLOWED_TP."""
    out = []
    for item in text.split(","):
        if not item.strip().isdigit() or int(item) not in ALLOWED_TP:
            raise ValueError(f"--tp item {item!r} is not allowed; allowed: {ALLOWED_TP}")
        out.append(int(item))
    return sorted(set(out))


def sparse_configs() -> list[tuple[str, object]]:
    """(label, ProxyAttnConfig) of the sparse rows, the same at every degree."""
    from proxyattn import ProxyAttnConfig

    return [(label, ProxyAttnConfig(proxy_heads=PROXY_HEADS, **over)) for label, over in ROWS]


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def merge(partials: list[dict]) -> dict:
    """One result from the per-degree partials: their rows, plus per length the TP speedup of every row over TP=1
    (`tp_speedup[label]["tp<N>"]` = TTFT at TP=1 / TTFT at TP=N) and every sparse row's speedup over dense at each
    degree (`method_speedup[label]["tp<N>"]`), so that "unchanged by sharding" can be read off one line."""
    if not partials:
        raise ValueError("no partial results (tp_prefill_tp<N>.json) to merge")
    by_tp = {p["tp_size"]: p for p in sorted(partials, key=lambda p: p["tp_size"])}
    if len(by_tp) != len(partials):
        raise ValueError(f"two partial results of one degree: tp_size {sorted(p['tp_size'] for p in partials)}")
    gpus, models = {p["gpu"] for p in partials}, {json.dumps(p["model"], sort_keys=True) for p in partials}
    if len(gpus) != 1 or len(models) != 1:
        raise ValueError(f"partial results of different GPUs {sorted(gpus)} or models {sorted(models)} cannot be merged")
    first = by_tp[min(by_tp)]
    merged = {k: first[k] for k in ("what", "gpu", "model", "method", "versions")}
    commits = sorted({p["commit"] for p in partials})
    merged["commit"] = commits[0] if len(commits) == 1 else commits
    merged["date"] = max(p["date"] for p in partials)
    merged["runs"] = {f"tp{n}": {k: p[k] for k in ("date", "commit", "command", "gpus", "weights_gib_per_gpu")} for n, p in by_tp.items()}
    merged["rows"] = [dict(r, tp_size=n) for n, p in by_tp.items() for r in p["rows"]]
    table = {}
    for r in merged["rows"]:
        table[(r["seq_len"], r["tp_size"])] = r
    summary = []
    for s in sorted({r["seq_len"] for r in merged["rows"]}):
        line = {"seq_len": s, "tp_speedup": {}, "method_speedup": {}}
        base = table.get((s, 1))
        for n in sorted(by_tp):
            row = table.get((s, n))
            if row is None:
                continue
            for label, ms in row["ttft_ms"].items():
                if base is not None and label in base["ttft_ms"] and n != 1:
                    line["tp_speedup"].setdefault(label, {})[f"tp{n}"] = base["ttft_ms"][label] / ms
                if label != "sdpa" and "sdpa" in row["ttft_ms"]:
                    line["method_speedup"].setdefault(label, {})[f"tp{n}"] = row["ttft_ms"]["sdpa"] / ms
        summary.append(line)
    merged["summary"] = summary
    return merged


def gpu_tag(name: str) -> str:
    """The file-name tag of a device name: h200, h100, cpu, else its last word."""
    up = name.upper()
    if up.startswith("CPU"):
        return "cpu"
    return "h200" if "H200" in up else "h100" if "H100" in up else "".join(c for c in up.split()[-1].lower() if c.isalnum()) or "gpu"


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ------------------------------------------------------------------------------------------- checkpoint
def ensure_checkpoint(path: Path, model_name: str) -> None:
    """A random bf16 checkpoint of engines/models.py's `model_name` at `path` (written once, on the CPU; kept when
    its config.json exists)."""
    if (path / "config.json").exists():
        return
    if path.exists() and any(path.iterdir()):
        raise ValueError(f"--checkpoint {path} exists without config.json; give an empty or new directory")
    from transformers import LlamaForCausalLM

    from engines.models import transformers_config

    t0 = time.time()
    cfg = transformers_config(model_name)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    random_weights_(model, torch.Generator().manual_seed(0))
    tmp = path.with_name(path.name + ".tmp")
    model.save_pretrained(tmp)
    if path.exists():
        path.rmdir()
    os.replace(tmp, path)
    print(f"[tp_prefill] random checkpoint written to {path} in {time.time() - t0:.0f} s", flush=True)


# ------------------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    """One rank. CUDA GPUs with NCCL (the benchmark); without CUDA, the CPU with gloo (a smoke run of the code path
    only, e.g. --model tiny-llama: times and memory mean nothing there)."""
    import torch.distributed as dist
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import proxyattn
    import proxyattn.hf as hf
    import proxyattn.tp as tp

    n = int(os.environ.get("WORLD_SIZE", "1"))
    if len(args.tp) != 1 or n != args.tp[0]:
        raise SystemExit(f"--worker runs one degree: --tp {args.tp} but WORLD_SIZE={n} (launch with torchrun --nproc_per_node N)")
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    t0 = time.time()
    sparse = sparse_configs()
    placement = {"device_map": f"cuda:{local_rank}"} if cuda and n == 1 else {}
    model = tp.from_pretrained(args.checkpoint, sparse[0][1], implementation="sdpa", tp_size=n, dtype=torch.bfloat16, **placement)
    if not dist.is_initialized():  # TP=1: transformers started no process group; one is needed for the barriers
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device("cuda", local_rank) if cuda else None)
    rank = dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    densities: list[torch.Tensor] = []

    def probe(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
        cfg = tp.shard_config(hf.active_config(), module, query.shape[1], key.shape[1])
        if hf.choose_path(module, query, key, attention_mask, cfg, dropout=dropout, sliding_window=sliding_window) == "sparse":
            q, k = query.transpose(1, 2), key.transpose(1, 2)
            densities.append(proxyattn.plan_blocks(q, k, cfg, scale=scaling).density().mean())
        return hf.proxyattn_attention_forward(module, query, key, value, attention_mask, dropout, scaling, sliding_window, **kwargs)

    AttentionInterface.register("tp_density_probe", probe)
    AttentionMaskInterface.register("tp_density_probe", sdpa_mask)

    def gather(value) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def ttft(ids, reps: int) -> list[float]:
        """Wall milliseconds of prefill + first token, the slowest rank's, per run (all ranks start together)."""
        times = []
        for _ in range(reps):
            sync()
            dist.barrier()
            start = time.perf_counter()
            with torch.no_grad():
                out = model(ids, use_cache=True, logits_to_keep=1)
                tok = out.logits[:, -1].argmax(-1)
            sync()
            times.append(max(gather(1e3 * (time.perf_counter() - start))))
            del out, tok
            if cuda:
                torch.cuda.empty_cache()
        return times

    def gib(value: int) -> float | None:
        return value / 2**30 if cuda else None

    weights = gather(gib(torch.cuda.memory_allocated() if cuda else 0))
    gpu_name = torch.cuda.get_device_name() if cuda else "cpu (smoke run, gloo)"
    date = datetime.datetime.now(datetime.timezone.utc)
    result = {
        "what": f"Time to first token and peak memory per GPU, {args.model} architecture with random bf16 weights, batch 1, "
        "transformers tensor parallelism (tp_plan auto), stock SDPA vs ProxyAttn",
        "gpu": gpu_name,
        "gpus": gather(gpu_name),
        "tp_size": n,
        "date": date.isoformat(timespec="seconds"),
        "commit": args.commit or git_commit(),
        "command": f"python3 -m torch.distributed.run --standalone --nproc_per_node {n} benchmarks/tp_prefill.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "method": f"one forward (use_cache=True, logits_to_keep=1) + argmax, wall clock between a barrier and a device "
        f"synchronisation, max over ranks, median of {args.reps} runs after one warm-up per (row, length); "
        "peak = torch.cuda.max_memory_allocated per rank over the timed runs",
        "model": {"name": args.model, "proxy_heads": PROXY_HEADS},
        "weights_gib_per_gpu": weights,
        "rows": [],
    }
    if rank == 0:
        print(f"[tp_prefill] TP={n}: model loaded in {time.time() - t0:.0f} s, weights per GPU {weights} GiB", flush=True)
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    for s in args.sizes:
        ids = torch.randint(0, model.config.vocab_size, (1, s), generator=torch.Generator().manual_seed(s)).to(device)
        row = {"seq_len": s, "ttft_ms": {}, "runs_ms": {}, "peak_gib_per_gpu": {}, "density": {}, "path": {}}
        with sdpa_kernel(backends, set_priority=True):
            for label, cfg in [("sdpa", None), *sparse]:
                if cfg is None:
                    model.set_attn_implementation("sdpa")
                    ttft(ids, 1)
                else:
                    hf.register(cfg)
                    model.set_attn_implementation("tp_density_probe")
                    densities.clear()
                    ttft(ids, 1)  # warm-up: compile, autotune, densities
                    row["density"][label] = gather(float(torch.stack(densities).mean()) if densities else None)
                    model.set_attn_implementation("proxyattn")
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                with hf.record_paths() as rec:
                    times = ttft(ids, args.reps)
                row["peak_gib_per_gpu"][label] = gather(gib(torch.cuda.max_memory_allocated() if cuda else 0))
                if cfg is not None:
                    # Below the config's crossover every layer runs dense by design (hf.choose_path "dense:short").
                    paths, expected = sorted({r.path for r in rec}), ["sparse" if s >= cfg.dense_below_tokens else "dense:short"]
                    if paths != expected:
                        raise RuntimeError(f"{label} at S={s}, TP={n}: attention paths {paths}, expected {expected}")
                    row["path"][label] = paths[0]
                row["ttft_ms"][label], row["runs_ms"][label] = median(times), times
        result["rows"].append(row)
        if rank == 0:
            atomic_write_json(Path(args.out) / f"tp_prefill_tp{n}.json", result)
            cells = ", ".join(f"{k} {v:.0f} ms (peak {row['peak_gib_per_gpu'][k]} GiB)" for k, v in row["ttft_ms"].items())
            print(f"[tp_prefill] TP={n} S={s}: {cells}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def driver(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_checkpoint(Path(args.checkpoint), args.model)
    sizes = ",".join(str(s) for s in args.sizes)
    for n in args.tp:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(n),
            str(Path(__file__).resolve()),
            "--worker",
            "--tp",
            str(n),
            "--sizes",
            sizes,
            "--reps",
            str(args.reps),
            "--out",
            str(out),
            "--checkpoint",
            str(args.checkpoint),
            "--model",
            args.model,
            "--commit",
            args.commit or git_commit(),
        ]
        print("[tp_prefill] " + " ".join(cmd), flush=True)
        # The workers import the project as this driver did: from the checkout when it is not pip-installed.
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": path})
    partials = [json.loads(p.read_text()) for p in sorted(out.glob("tp_prefill_tp*.json"))]
    merged = merge(partials)
    merged["command"] = "python3 benchmarks/tp_prefill.py " + " ".join(sys.argv[1:])
    path = out / f"tp_prefill_{gpu_tag(merged['gpu'])}.json"
    atomic_write_json(path, merged)
    for line in merged["summary"]:
        print(f"[tp_prefill] S={line['seq_len']}: TP speedup {line['tp_speedup']}; method speedup over dense {line['method_speedup']}")
    print(f"[tp_prefill] wrote {path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for the JSON files")
    ap.add_argument("--sizes", default="32K,64K,128K", help="prompt lengths, e.g. 32K,64K,128K (K = 1024)")
    ap.add_argument("--tp", default="1,2", help=f"tensor-parallel degrees, of {ALLOWED_TP}")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--model", default=MODEL, choices=MODEL_CHOICES, help="engines/models.py entry (tiny-llama: a CPU smoke run)")
    ap.add_argument("--checkpoint", default=None, help="random checkpoint directory, written once (default /tmp/tp_prefill_<model>)")
    ap.add_argument("--commit", default=None, help="recorded commit (default: git rev-parse HEAD, else 'unknown')")
    ap.add_argument("--worker", action="store_true", help="one torchrun rank (set by the driver)")
    args = ap.parse_args(argv)
    try:
        args.sizes, args.tp = parse_sizes(args.sizes), parse_tp(args.tp)
    except ValueError as e:
        ap.error(str(e))
    if args.reps < 1:
        ap.error(f"--reps={args.reps} must be >= 1")
    if args.checkpoint is None:
        args.checkpoint = f"/tmp/tp_prefill_{args.model}"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    (worker if args.worker else driver)(args)


if __name__ == "__main__":
    main()
