#!/usr/bin/env python3
"""Text generation through Triton Inference Server on the GPU: ProxyAttn prefill against dense, in one server run.

Writes a model repository with two transformers models per served model (`<model>_proxyattn`, `<model>_dense`:
`engines.triton_repo.python_torch_config`, KIND_GPU, decoupled, the same weights), starts the real tritonserver of
the nvidia-pytriton wheel (`engines.tritonserver.local_server`: backend stub, LD_LIBRARY_PATH and the numpy-1.x
backend environment are taken care of), checks it (text in / text out on both models, a bad request answered 400,
a client leaving mid-stream does not block the next request), then for each model and each attention sends
`--concurrency` concurrent prompts of mixed lengths through HTTP `generate_stream` (stream true, greedy,
ignore_eos, `--max-tokens` tokens) and measures per request the client's time to first token (queueing included),
the server's `first_token_ms` (prefill + first sampling), `sparse_layers`, the total latency and the generated ids;
per (model, attention) the wall time and tokens/s. The two attentions of a model run one after the other, dense
first, in rounds (`--rounds`, the order alternating), never at the same time, after one untimed warm-up request per
length (Triton kernel compilation and autotuning).

Prompts: a passkey ("The pass key is NNNNN.") in filler text of varied sentences, then a question; cut to the
length in tokens with the model's tokenizer (the server's count is recorded). Whether the passkey shows up in the
answer and whether ProxyAttn's ids equal dense's are recorded (a sanity check, not an accuracy benchmark).

Models (`--models`): `smollm2` (8K context) and `gemma3-270m` (32K) with real weights, `--weights NAME=SOURCE`
where SOURCE is a transformers directory (`export-weights` below writes one), or `package:NAME` (the GGUF through
$PROXYATTN_GGUF_DIR; needs the `gguf` package); `llama3.1-8b` (or any `build.py --model` name) with random
weights drawn on the GPU and the byte-level tokenizer; `tiny-llama` for the CPU mode.

    python3 -m tests.gpu.check_serving --out DIR --commit SHA [--models smollm2,gemma3-270m,llama3.1-8b]
        [--weights smollm2=/tmp/w/smollm2,gemma3-270m=/tmp/w/gemma3-270m] [--lengths smollm2=1024,4096,8000 ...]
        [--numpy-wheel WHL] [--device cuda|cpu]
    python3 -m tests.gpu.check_serving export-weights --model smollm2 --out DIR [--dtype bfloat16]

Writes DIR/serving_<gpu>_<date>.json (GPU name, date, commit, command, versions, every request and the summary) and
prints a table; exit status 1 when a check failed. `--device cpu` runs the same on the CPU (KIND_CPU, fp32, the
ProxyAttn reference): with `--models tiny-llama` it is the CPU test of this script (tests/test_check_serving.py).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import http.client
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Per model: default prompt lengths (tokens) and where the weights come from by default.
DEFAULT_LENGTHS = {
    "smollm2": [1024, 2048, 4096, 8000],
    "gemma3-270m": [1024, 4096, 16384, 32000],
    "llama3.1-8b": [16384, 32768, 49152, 65536],  # the default config is dense up to 32768 tokens
    "tiny-llama": [100, 300],
}
PACKAGED = {"smollm2": "smollm2-135m", "gemma3-270m": "gemma3-270m"}  # package name -> build.py model (config, spec)
WORDS = (
    "river",
    "stone",
    "market",
    "winter",
    "lantern",
    "garden",
    "signal",
    "copper",
    "harbor",
    "meadow",
    "engine",
    "paper",
    "orbit",
    "violet",
    "canyon",
    "thread",
    "mirror",
    "falcon",
    "silver",
    "window",
    "desert",
    "anchor",
    "forest",
    "piano",
)


def _log(msg: str) -> None:
    print(f"[check_serving] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ weights
def export_weights(model: str, out: Path, dtype: str) -> Path:
    """A transformers directory (config.json, model.safetensors, tokenizer files) of packaged model `model`
    (smollm2, gemma3-270m) from its GGUF, for a machine without `gguf`; written into a temporary sibling and renamed."""
    import torch

    from proxyattn import weights as packaged

    if model not in packaged.MODELS:
        raise SystemExit(f"export-weights: model {model!r}; allowed: {', '.join(packaged.MODELS)}")
    out = Path(out)
    if out.exists():
        raise SystemExit(f"export-weights: {out} exists; give a new directory")
    tmp = out.with_name(f".{out.name}.tmp")
    m = packaged.load_model(model, dtype=getattr(torch, dtype))
    # Dequantised already: drop the GGUF quantizer, which save_pretrained refuses to serialise (checked: SmolLM2
    # reloaded from the directory gives logits equal to the GGUF-loaded model's).
    m.hf_quantizer = None
    if hasattr(m.config, "quantization_config"):
        del m.config.quantization_config
    m.save_pretrained(tmp, safe_serialization=True)
    packaged.load_tokenizer(model).save_pretrained(tmp)
    tmp.rename(out)
    size = sum(f.stat().st_size for f in out.iterdir())
    _log(f"wrote {out} ({size / 2**20:.0f} MiB)")
    return out


# ------------------------------------------------------------------------------------------------ repository
def write_repository(repo: Path, models: list[str], weights: dict[str, str], device: str) -> dict[str, dict]:
    """Two entries per model into `repo`; returns per model {"tokenizer": dir, "entries": {attention: name}, ...}."""
    from engines import serving
    from engines.models import get_model
    from engines.triton_repo import python_torch_config, write_python_model

    info = {}
    for model in models:
        spec_name = PACKAGED.get(model, model)
        spec = get_model(spec_name)
        source = weights.get(model) or (f"package:{model}" if model in PACKAGED else f"random:{spec_name}")
        if source.startswith("random:"):
            tokenizer = serving.make_tokenizer("random", dict(spec.hf_config))
        elif source.startswith("package:"):
            tokenizer = serving.make_tokenizer(source, dict(spec.hf_config))
        else:
            source = str(Path(source).resolve())
            tokenizer = serving.load_tokenizer(source)
        entries = {}
        for attention in ("dense", "proxyattn"):
            name = f"{model}_{attention}"
            cfg = python_torch_config(
                name,
                weights=source,
                attention=attention,
                vocab_size=spec.vocab_size,
                proxyattn=serving.serving_config(spec.proxyattn) if attention == "proxyattn" else None,
                kind="GPU" if device == "cuda" else "CPU",
                tokenizer=True,
                default_max_tokens=16,
            )
            write_python_model(repo, name, [], cfg, tokenizer)
            entries[attention] = name
        info[model] = {
            "weights": source,
            "entries": entries,
            "tokenizer": str(repo / entries["dense"] / "1" / "tokenizer"),
            "layers": int(spec.hf_config["num_hidden_layers"]),
            "proxyattn": serving.serving_config(spec.proxyattn).to_attrs(),
        }
    return info


# ------------------------------------------------------------------------------------------------ prompts
def make_prompt(tokenizer, n_tokens: int, seed: int) -> tuple[str, str]:
    """(prompt text of about n_tokens tokens, its passkey): filler sentences, the passkey at a random depth, a question."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    question = "\nWhat is the pass key? The pass key is"
    needle = f" The pass key is {key}. Remember it."
    budget = max(1, n_tokens - len(tokenizer(needle + question, add_special_tokens=False)["input_ids"]) - 2)
    sentences, ids_len = [], 0
    while ids_len < budget:
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        sentence = " " + " ".join(words).capitalize() + f" at {rng.randint(1, 999)}."
        sentences.append(sentence)
        ids_len += len(tokenizer(sentence, add_special_tokens=False)["input_ids"])
    filler_ids = tokenizer("".join(sentences), add_special_tokens=False)["input_ids"][:budget]
    filler = tokenizer.decode(filler_ids)
    depth = rng.randint(0, len(filler))
    cut = filler.rfind(".", 0, depth) + 1
    return filler[:cut] + needle + filler[cut:] + question, key


# ------------------------------------------------------------------------------------------------ client
def _connect(http_url: str, timeout: float) -> http.client.HTTPConnection:
    host, port = http_url.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def stream_request(http_url: str, model: str, text: str, max_tokens: int, timeout: float = 600) -> dict:
    """One generate_stream request (greedy, ignore_eos): client timings and the final response's fields."""
    body = json.dumps({"text_input": text, "parameters": {"max_tokens": max_tokens, "ignore_eos": True, "stream": True, "temperature": 0}})
    conn = _connect(http_url, timeout)
    t0 = time.perf_counter()
    ttft, events = None, []
    try:
        conn.request("POST", f"/v2/models/{model}/generate_stream", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: "):
                continue
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1e3
            events.append(json.loads(line[len(b"data: ") :]))
    finally:
        conn.close()
    total = (time.perf_counter() - t0) * 1e3
    if response.status != 200 or not events or "error" in events[-1]:
        raise RuntimeError(f"{model}: HTTP {response.status}: {events[-1] if events else response.read()[:300]!r}")
    last = events[-1]
    return {
        "ttft_ms": ttft,
        "total_ms": total,
        "events": len(events),
        "text": "".join(e.get("text_output", "") for e in events),
        "output_ids": [e["output_ids"] for e in events if e.get("output_ids") is not None],
        "prompt_tokens": last["prompt_tokens"],
        "completion_tokens": last["completion_tokens"],
        "server_first_token_ms": last["first_token_ms"],
        "sparse_layers": last.get("sparse_layers"),
        "finish_reason": last["finish_reason"],
    }


def post_json(http_url: str, path: str, body: dict, timeout: float = 600) -> tuple[int, dict]:
    conn = _connect(http_url, timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ checks
CHECKS: list[dict] = []


def check(name: str, ok: bool, detail) -> bool:
    CHECKS.append({"check": name, "passed": bool(ok), "detail": detail})
    _log(f"{'PASS' if ok else 'FAIL'} {name}: {detail}")
    return ok


def functional_checks(http_url: str, server_log, entries: dict[str, str]) -> None:
    """Text in / text out on both entries, a 400, and a client leaving mid-stream."""
    outs = {}
    for attention, name in entries.items():
        status, out = post_json(http_url, f"/v2/models/{name}/generate", {"text_input": "Hello, my name is", "max_tokens": 8})
        outs[attention] = out
        check(
            f"{name}: generate answers text",
            status == 200 and out.get("completion_tokens", 0) >= 1 and "text_output" in out,
            {"status": status, "text": out.get("text_output"), "finish_reason": out.get("finish_reason")},
        )
    same = outs["dense"].get("output_ids") == outs["proxyattn"].get("output_ids")
    check("short prompt: ProxyAttn (dense below the threshold) = dense", same, {a: o.get("output_ids") for a, o in outs.items()})
    name = entries["proxyattn"]
    status, out = post_json(http_url, f"/v2/models/{name}/generate", {"text_input": "hi", "parameters": {"temperature": "hot"}})
    check(f"{name}: wrong parameter type answered 400", status == 400 and "temperature" in out.get("error", ""), {"status": status, **out})
    conn = _connect(http_url, 120)
    try:
        conn.request(
            "POST",
            f"/v2/models/{name}/generate_stream",
            body=json.dumps({"text_input": "Once upon a time", "parameters": {"max_tokens": 2000, "ignore_eos": True, "stream": True}}),
            headers={"Content-Type": "application/json"},
        )
        first = conn.getresponse().readline()
    finally:
        conn.sock.shutdown(2)
        conn.close()
    t0 = time.perf_counter()
    status, out = post_json(http_url, f"/v2/models/{name}/generate", {"text_input": "The sky is", "max_tokens": 2}, timeout=120)
    check(
        f"{name}: next request answered after a client left mid-stream",
        first.startswith(b"data: ") and status == 200,
        {"seconds": round(time.perf_counter() - t0, 2), "cancel_logged": "request cancelled by the client" in server_log()},
    )


# ------------------------------------------------------------------------------------------------ benchmark
def run_workload(http_url: str, model: str, name: str, prompts: list[dict], max_tokens: int, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(stream_request, http_url, name, p["text"], max_tokens) for p in prompts]
        results = [f.result() for f in futures]
    wall = time.perf_counter() - t0
    for p, r in zip(prompts, results):
        r.update(length=p["length"], passkey_found=p["key"] in r["text"], prompt_index=p["index"])
    completion = sum(r["completion_tokens"] for r in results)
    prompt_tokens = sum(r["prompt_tokens"] for r in results)
    return {
        "wall_s": wall,
        "completion_tokens": completion,
        "prompt_tokens": prompt_tokens,
        "output_tokens_per_s": completion / wall,
        "prompt_tokens_per_s": prompt_tokens / wall,
        "requests": results,
    }


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["model"], r["attention"], q["length"]) for r in runs for q in r["requests"]})
    for model, attention, length in keys:
        reqs = [q for r in runs if (r["model"], r["attention"]) == (model, attention) for q in r["requests"] if q["length"] == length]
        rows.append(
            {
                "model": model,
                "attention": attention,
                "length": length,
                "n": len(reqs),
                "prompt_tokens": statistics.median(q["prompt_tokens"] for q in reqs),
                "ttft_ms_median": statistics.median(q["ttft_ms"] for q in reqs),
                "server_first_token_ms_median": statistics.median(q["server_first_token_ms"] for q in reqs),
                "total_ms_median": statistics.median(q["total_ms"] for q in reqs),
                "sparse_layers": sorted({q["sparse_layers"] for q in reqs}),
                "passkey_found": sum(q["passkey_found"] for q in reqs),
            }
        )
    for row in rows:
        if row["attention"] != "proxyattn":
            continue
        dense = next((d for d in rows if (d["model"], d["attention"], d["length"]) == (row["model"], "dense", row["length"])), None)
        if dense:
            row["server_first_token_x_dense"] = dense["server_first_token_ms_median"] / row["server_first_token_ms_median"]
            row["ttft_x_dense"] = dense["ttft_ms_median"] / row["ttft_ms_median"]
    return rows


def agreement(runs: list[dict]) -> list[dict]:
    """Per model and length: share of prompts whose ProxyAttn ids equal dense's (first round of each)."""
    out = []
    for model in sorted({r["model"] for r in runs}):
        first = {a: next(r for r in runs if (r["model"], r["attention"]) == (model, a)) for a in ("dense", "proxyattn")}
        by_index = {a: {q["prompt_index"]: q for q in first[a]["requests"]} for a in first}
        for length in sorted({q["length"] for q in first["dense"]["requests"]}):
            idx = [i for i, q in by_index["dense"].items() if q["length"] == length]
            same = sum(by_index["dense"][i]["output_ids"] == by_index["proxyattn"][i]["output_ids"] for i in idx)
            first_tok = sum(by_index["dense"][i]["output_ids"][:1] == by_index["proxyattn"][i]["output_ids"][:1] for i in idx)
            out.append({"model": model, "length": length, "n": len(idx), "ids_equal": same, "first_token_equal": first_tok})
    return out


def _parse_map(text: str | None, what: str) -> dict[str, str]:
    out = {}
    for item in filter(None, (text or "").split(";" if ";" in (text or "") else " ")):
        if "=" not in item:
            raise SystemExit(f"--{what}: {item!r} is not NAME=VALUE")
        key, value = item.split("=", 1)
        out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["export-weights"]:
        ap = argparse.ArgumentParser(prog="check_serving export-weights")
        ap.add_argument("--model", required=True)
        ap.add_argument("--out", required=True)
        ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
        a = ap.parse_args(argv[1:])
        export_weights(a.model, Path(a.out), a.dtype)
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default="unknown")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--models", default="smollm2,gemma3-270m,llama3.1-8b")
    ap.add_argument("--weights", default=None, help="NAME=SOURCE[;NAME=SOURCE]: a transformers directory or package:NAME")
    ap.add_argument("--lengths", default=None, help="NAME=L1,L2,...[;NAME=...]: prompt lengths in tokens (defaults per model)")
    ap.add_argument("--prompts-per-length", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (dense, proxyattn), the order alternating")
    ap.add_argument("--numpy-wheel", default=None, help="numpy 1.26.4's wheel for the backend environment (no package index)")
    ap.add_argument("--backend-env", default=None)
    ap.add_argument("--ready-timeout", type=float, default=900)
    args = ap.parse_args(argv)

    import torch

    from engines import serving
    from engines.tritonserver import backend_env, local_server

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here (use --device cpu)")
    models = [m for m in args.models.split(",") if m]
    weights = _parse_map(args.weights, "weights")
    lengths = {m: DEFAULT_LENGTHS.get(m, [1024, 4096]) for m in models}
    lengths.update({k: [int(x) for x in v.split(",")] for k, v in _parse_map(args.lengths, "lengths").items()})
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    env_dir = backend_env(args.backend_env, numpy_wheel=args.numpy_wheel, log=_log)
    runs, failed = [], False
    with tempfile.TemporaryDirectory(prefix="check-serving-") as tmp:
        repo = Path(tmp) / "repo"
        repo.mkdir()
        info = write_repository(repo, models, weights, args.device)
        names = [n for m in info.values() for n in m["entries"].values()]
        _log(f"starting tritonserver with {', '.join(names)}")
        t0 = time.perf_counter()
        with local_server(repo, models=names, pythonpath=ROOT, env_dir=env_dir, ready_timeout_s=args.ready_timeout) as server:
            startup_s = time.perf_counter() - t0
            _log(f"ready in {startup_s:.0f} s: HTTP {server.http_url}")
            for model in models:
                entries = info[model]["entries"]
                functional_checks(server.http_url, server.log, entries)
                tokenizer = serving.load_tokenizer(info[model]["tokenizer"])
                prompts = []
                for length in lengths[model]:
                    for k in range(args.prompts_per_length):
                        text, key = make_prompt(tokenizer, length, seed=1000 * length + k)
                        prompts.append({"index": len(prompts), "length": length, "text": text, "key": key})
                random.Random(0).shuffle(prompts)  # mixed lengths arrive interleaved
                for attention in ("dense", "proxyattn"):  # warm-up: kernels compile and autotune per shape
                    for length in lengths[model]:
                        p = next(q for q in prompts if q["length"] == length)
                        stream_request(server.http_url, entries[attention], p["text"], 2)
                for rnd in range(args.rounds):
                    order = ("dense", "proxyattn") if rnd % 2 == 0 else ("proxyattn", "dense")
                    for attention in order:
                        _log(f"{model} {attention} round {rnd}: {len(prompts)} prompts, concurrency {args.concurrency}")
                        run = run_workload(server.http_url, model, entries[attention], prompts, args.max_tokens, args.concurrency)
                        run.update(model=model, attention=attention, round=rnd)
                        runs.append(run)
                sparse_runs = [q for r in runs if (r["model"], r["attention"]) == (model, "proxyattn") for q in r["requests"]]
                threshold = info[model]["proxyattn"]["pa_dense_below_tokens"]
                long_reqs = [q for q in sparse_runs if q["prompt_tokens"] > threshold]
                check(
                    f"{model}: ProxyAttn prefill ran sparse past {threshold} tokens",
                    all((q["sparse_layers"] or 0) > 0 for q in long_reqs) and bool(long_reqs),
                    {"long_requests": len(long_reqs), "sparse_layers": sorted({q["sparse_layers"] for q in long_reqs})},
                )
                dense_runs = [q for r in runs if (r["model"], r["attention"]) == (model, "dense") for q in r["requests"]]
                check(
                    f"{model}: dense model never ran sparse",
                    all(q["sparse_layers"] == 0 for q in dense_runs),
                    sorted({q["sparse_layers"] for q in dense_runs}),
                )
                check(
                    f"{model}: every request generated max_tokens",
                    all(q["completion_tokens"] == args.max_tokens for r in runs for q in r["requests"] if r["model"] == model),
                    "",
                )
            server_log_tail = server.log()[-4000:]
    failed = not all(c["passed"] for c in CHECKS)
    summary = summarise(runs)
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    import transformers
    import triton

    report = {
        "gpu": gpu,
        "device": args.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": args.commit,
        "command": "python3 -m tests.gpu.check_serving " + " ".join(argv),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "tritonserver": "2.51.0 (nvidia-pytriton 0.7.0)",
        },
        "settings": {
            "max_tokens": args.max_tokens,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "prompts_per_length": args.prompts_per_length,
            "lengths": lengths,
            "instances_per_model": 1,
            "note": "one instance per model: concurrent requests queue; ttft_ms includes the queueing, "
            "server_first_token_ms is the prefill and first sampling alone",
        },
        "startup_s": startup_s,
        "models": info,
        "checks": CHECKS,
        "summary": summary,
        "agreement": agreement(runs) if runs else [],
        "runs": [{k: v for k, v in r.items()} for r in runs],
        "server_log_tail": server_log_tail,
    }
    tag = "".join(ch for ch in gpu.lower().replace("nvidia", "").split("(")[0] if ch.isalnum()) or "device"
    path = out_dir / f"serving_{tag}_{datetime.date.today().isoformat()}.json"
    tmp_path = path.with_name(f".{path.name}.tmp")
    tmp_path.write_text(json.dumps(report, indent=1))
    os.replace(tmp_path, path)
    print(
        f"{'model':<14} {'attention':<10} {'length':>7} {'n':>3} {'TTFT ms':>9} {'server ms':>9} {'x dense':>8} {'sparse':>7} "
        f"{'passkey':>7}"
    )
    for r in summary:
        x = r.get("server_first_token_x_dense")
        print(
            f"{r['model']:<14} {r['attention']:<10} {r['length']:>7} {r['n']:>3} {r['ttft_ms_median']:>9.1f} "
            f"{r['server_first_token_ms_median']:>9.1f} {'' if x is None else f'{x:.2f}':>8} {str(r['sparse_layers']):>7} "
            f"{r['passkey_found']:>4}/{r['n']}"
        )
    for r in runs:
        print(
            f"{r['model']} {r['attention']} round {r['round']}: {r['wall_s']:.1f} s, {r['output_tokens_per_s']:.1f} output tok/s, "
            f"{r['prompt_tokens_per_s']:.0f} prompt tok/s"
        )
    print(f"wrote {path}; checks {sum(c['passed'] for c in CHECKS)}/{len(CHECKS)} passed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
