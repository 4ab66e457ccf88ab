"""Render the README's performance tables from the JSON results in benchmarks/results/.

    python3 benchmarks/report.py            # prints every table as Markdown
    python3 benchmarks/report.py --readme   # rewrites the README's performance tables (between its markers)

Every figure printed here is read from a results file (GPU, date, commit and command are printed with it). It also
writes `benchmarks/results/summary.json`: one row per measured figure, attention and kernel rows from the newest
attention file that measured them (per GPU, method, inputs and length), prefill rows from the newest prefill file,
with the keys gpu, commit, date, benchmark ("attention", "prefill" or "kernel"), method (the config's name,
"default" for today's default, "default@<commit>" for the default of an older commit: `method_name`), config (the
name the benchmark gave it), inputs, seq_len, density, rel_err (output against dense; null for prefill),
speedup_vs_dense (dense time / this time, same run) and, for kernel rows, tflops_eff.
"""

from __future__ import annotations

import functools
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # its sibling benchmarks/frontier.py, as when run as a script
from frontier import TOLERANCE as FRONTIER_TOLERANCE, plot_frontier, save_figure  # noqa: E402  (copy loss within 3 % of dense)

RESULTS = os.path.join(HERE, "results")


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def k(s: int) -> str:
    return f"{s // 1024}K"


def source(d: dict, name: str) -> str:
    return f"`{name}`: {d['gpu']}, {d['date'][:10]}, commit {d['commit'][:7]}, `{d['command']}`"


def attention_tables(d: dict, name: str) -> list[str]:
    out = [f"Source: {source(d, name)}", ""]
    out += ["| S | cuDNN dense (ms) | FA2 dense (ms) | `proxy_attention` dense path (ms) |", "|---|---|---|---|"]
    for r in d["dense"]:
        out.append(f"| {k(r['S'])} | {r['cudnn_best_ms']:.2f} | {r['flash2_gqa_ms']:.2f} | {r['ours_dense_ms']:.2f} |")
    out += ["", "Block-sparse kernel alone (random inputs; TFLOP/s counted on kept blocks, diagonal blocks at half):", ""]
    out += ["| S | budget | density | ms | effective TFLOP/s | x cuDNN |", "|---|---|---|---|---|---|"]
    for r in d["sparse"]:
        out.append(
            f"| {k(r['S'])} | {r['target_density']:.0%} | {r['density']:.3f} | {r['ms']:.3f} | {r['eff_tflops']:.0f} "
            f"| {r['speedup_vs_cudnn']:.2f} |"
        )
    out += ["", "Planning alone (`plan_blocks`: proxy scores, budgets or needs, selection, dense fallback), eager:", ""]
    out += ["| S | inputs | config | ms | % of cuDNN dense |", "|---|---|---|---|---|"]
    for r in d["estimation"]:
        if "ms" in r:
            out.append(f"| {k(r['S'])} | {r.get('inputs', 'random')} | {r['config']} | {r['ms']:.2f} | {r['pct_of_cudnn_dense']:.1f}% |")
    out += [
        "",
        "Whole `proxy_attention` (structured inputs: `proxyattn.testing.structured_qkv`; random: diffuse attention). "
        "Density counts groups that ran dense as 1; rel. error = ||out - cuDNN|| / ||cuDNN||; recall measured up to 32K:",
        "",
    ]
    out += [
        "| S | inputs | config | path | ms | x cuDNN | density | dense groups | rel. error | mean recall |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in d["proxy"]:
        if "ms" not in r:
            continue
        recall = f"{r['recall']:.3f}" if "recall" in r else "—"
        path = "sparse" if r["sparse_path"] else "dense"
        inputs = "structured" if r.get("inputs", "structured_qkv") == "structured_qkv" else "random"
        err = f"{r['rel_err']:.4f}" if r.get("rel_err") is not None else "—"
        out.append(
            f"| {k(r['S'])} | {inputs} | {r['config']} | {path} | {r['ms']:.2f} | {r['speedup_vs_cudnn']:.2f} | "
            f"{r['density']:.3f} | {r.get('dense_groups', '—')} | {err} | {recall} |"
        )
    out += ["", "Short sequences, default config against cuDNN (interleaved medians):", ""]
    out += ["| S | cuDNN (ms) | `proxy_attention` default (ms) | slowdown |", "|---|---|---|---|"]
    for r in d["short"]:
        out.append(f"| {k(r['S'])} | {r['cudnn_gqa_ms']:.3f} | {r['proxy_attention_default_ms']:.3f} | {r['default_slowdown_pct']:+.1f}% |")
    mem, graph = d["checks"]["memory"], d["checks"]["cuda_graph"]
    replay_ok = graph.get("captured") and (graph.get("replay_equals_eager") or graph.get("replay_close_to_eager"))
    what = (
        (
            "captured, replay equals eager"
            if graph.get("replay_equals_eager")
            else f"captured, replay within {graph.get('replay_rel_err_vs_eager', 0):.1e} of eager (dense groups: cuDNN eager, "
            "block-sparse kernel in the graph)"
        )
        if replay_ok
        else "FAILED"
    )

    def mib(m: dict) -> str:
        return f"{m['extra_bytes_beyond_output'] / 2**20:.1f} MiB = {m['ratio']:.2%} of q, k, v"

    memory = f"Extra memory at {k(mem['S'])} (plan + scratch): {mib(mem)}"
    mem_default = d["checks"].get("memory_default")
    if mem_default:
        memory += (
            f" with budget_fraction 0.1, {mib(mem_default)} with the default (structured inputs; rule 3's needs scratch is"
            " freed before the output is allocated)"
        )
    out += ["", f"{memory}. CUDA graph capture of `proxy_attention` at {k(graph['S'])}: {what}."]
    return out


def prefill_table(d: dict, name: str) -> list[str]:
    out = [f"Source: {source(d, name)}", ""]
    rows = d["rows"]
    for r in rows:
        r.setdefault("path", {})
    cols = [c for c in rows[0]["ttft_ms"] if c != "sdpa"]
    out.append("| S | stock SDPA (ms) | " + " | ".join(f"{c} (ms, speedup, density)" for c in cols) + " |")
    out.append("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [
            f"{r['ttft_ms'][c]:.0f}, {r['speedup'][c]:.2f}x, "
            + (f"{r['density'][c]:.2f}" if r["path"].get(c, "sparse") == "sparse" else "dense path")
            for c in cols
        ]
        out.append(f"| {k(r['seq_len'])} | {r['ttft_ms']['sdpa']:.0f} | " + " | ".join(cells) + " |")
    return out


def accuracy_table(d: dict, name: str) -> list[str]:
    runs = d.get("runs") or [{"command": d["command"]}]
    out = [
        f"Source: `{name}`: {d['device']}, {d['date'][:10]}, commit {d['commit'][:7]}; " + "; ".join(f"`{r['command']}`" for r in runs),
        "",
    ]
    out += [
        "Copy loss on the second copy (x dense), passkey hits, natural-text loss (mean of the position bins), "
        "plan density on the copy task / natural text.",
        "",
    ]
    out += ["| L | method | copy loss | x dense | passkey | natural loss | density copy / natural |", "|---|---|---|---|---|---|---|"]
    for c in d["cells"]:
        dense = c["copy_loss"].get("dense")
        for m, loss in c["copy_loss"].items():
            hits = c["passkey_hits"].get(m)
            bins = c["natural_loss_bins"].get(m)
            dens = (
                "1 (dense)"
                if m == "dense"
                else f"{c.get('density_copy', {}).get(m, float('nan')):.2f} / {c.get('density', {}).get(m, float('nan')):.2f}"
            )
            rel = f"{loss / dense:.2f}" if dense else "—"
            out.append(
                f"| {k(c['seq_len'])} | {m} | {loss:.3f} | {rel} | {'—' if hits is None else f'{sum(hits)}/{len(hits)}'} | "
                f"{'—' if not bins else f'{sum(bins) / len(bins):.3f}'} | {dens} |"
            )
    for r in d.get("cells_from_log", []):
        out.append(
            f"| {k(r['seq_len'])} | {r['method']} | {r['copy_loss']:.3f} | 1.00 | {r['passkey_hits']} | "
            f"{r['natural_loss_mean']:.3f} | 1 (dense; from the run's log) |"
        )
    return out


def budget_rule_table(model: str, files: list[str]) -> list[str]:
    """Budget rules recall, row_recall and block_recall (proxy estimator) at several gammas on the same copy
    sequences: every GPU accuracy file of `model` whose dense per-sequence losses agree on the first sequences they
    share; copy loss x dense over those sequences, with the plan density of the whole cell."""
    runs = []
    for name in files:
        d = load(name)
        if not d["device"].startswith("NVIDIA") or not name.startswith(f"accuracy_{model}"):
            continue
        for c in d["cells"]:
            per = c.get("copy_loss_per_seq", {})
            if "dense" in per:
                runs.append((name, c, per))
    if not runs:
        return []
    n = min(len(per["dense"]) for _, _, per in runs)
    rows, used = {}, set()
    for name, c, per in runs:
        ref = next(p["dense"][:n] for _, c2, p in runs if c2["seq_len"] == c["seq_len"])
        if any(abs(a - b) > 0.01 * abs(b) for a, b in zip(per["dense"][:n], ref)):
            continue  # other sequences
        dense = sum(per["dense"][:n]) / n
        for m, losses in per.items():
            rule = next((r for r in ("row_recall", "recall", "block_recall") if m.startswith(r + " g")), None)
            if rule is None:
                continue
            rows[(c["seq_len"], rule, m)] = (sum(losses[:n]) / n / dense, c.get("density_copy", {}).get(m, float("nan")))
            used.add(name)
    out = [
        f"Same {n} copy sequences per length (the first {n} of each run), proxy estimator; from "
        + ", ".join(f"`{u}`" for u in sorted(used))
        + ". Density: the cell's copy-task plan density.",
        "",
    ]
    out += [
        "| L | rule 1 (recall): gamma, density, copy x dense | rule 2 (row_recall): gamma, density, copy x dense "
        "| rule 3 (block_recall): gamma, density, copy x dense |",
        "|---|---|---|---|",
    ]
    for s in sorted({key[0] for key in rows}):
        cells = []
        for rule in ("recall", "row_recall", "block_recall"):
            pts = sorted(((d, r, m.split(" g")[-1]) for (s2, ru, m), (r, d) in rows.items() if s2 == s and ru == rule))
            cells.append("; ".join(f"{g}: {d:.2f}, {r:.3f}" for d, r, g in pts) or "—")
        out.append(f"| {k(s)} | " + " | ".join(cells) + " |")
    return out


FRONTIER_PLOT = "accuracy_frontier.png"  # every model's frontier in one figure (`write_frontier_plot`)


def frontier_files(files: list[str]) -> list[str]:
    """The frontier results (`accuracy_<model>_frontier.json`, benchmarks/accuracy.py `--methods frontier`)."""
    return sorted(f for f in files if f.startswith("accuracy_") and f.endswith("_frontier.json"))


def frontier_table(files: list[str]) -> list[str]:
    """The accuracy-against-density frontier of every model as one table (and `FRONTIER_PLOT`): per model and
    length, every method's copy-task density, copy loss x dense and passkey hits against dense's, sorted by density;
    "ok" marks copy within 3 % of dense with passkey hits at least dense's. Each model's source is named above it."""
    names = frontier_files(files)
    if not names:
        return []
    out = []
    for name in names:
        d = load(name)
        out.append(
            f"- **{d['model']}**: `{name}` ({d['device']}, {d['date'][:10]}, commit {d['commit'][:7]}, {d['copies']} copy "
            f"sequences and {d['trials']} passkey trials per length; `{d['command']}`)"
        )
    out += [
        "",
        f"![copy loss against density, every model](benchmarks/results/{FRONTIER_PLOT})",
        "",
        "| model | L | method | density (copy) | copy loss x dense | passkey (dense) | within 3 % and passkey = dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        d = load(name)
        for c in d["cells"]:
            dense = c["copy_loss"].get("dense")
            hits_dense = c["passkey_hits"].get("dense")
            rows = []
            for m, loss in c["copy_loss"].items():
                if m == "dense" or not dense:
                    continue
                hits = c["passkey_hits"].get(m)
                rel = loss / dense
                same = hits is not None and hits_dense is not None and sum(hits) >= sum(hits_dense)
                ok = rel <= 1 + FRONTIER_TOLERANCE and same
                dens = c.get("density_copy", {}).get(m)
                passkey = (
                    "—"
                    if hits is None
                    else f"{sum(hits)}/{len(hits)} ({sum(hits_dense)}/{len(hits_dense)})"
                    if hits_dense
                    else f"{sum(hits)}/{len(hits)}"
                )
                rows.append((dens if dens is not None else 2.0, m, rel, passkey, ok))
            for dens, m, rel, passkey, ok in sorted(rows):
                verdict = "ok" if ok else "no"
                out.append(
                    f"| {d['model']} | {k(c['seq_len'])} | {m} | {_fmt(dens if dens <= 1 else None, '.2f')} | {rel:.3f} | "
                    f"{passkey} | {verdict} |"
                )
    out.append("")
    return out


def write_frontier_plot(files: list[str]) -> str | None:
    """Draw `FRONTIER_PLOT` from every frontier file (benchmarks/frontier.py); its path, or None when there is no
    frontier file. Needs matplotlib."""
    names = frontier_files(files)
    if not names:
        return None
    path = os.path.join(RESULTS, FRONTIER_PLOT)
    return path if plot_frontier([load(n) for n in names], path) else None


@functools.cache
def current_default() -> dict:
    """Today's default config as ONNX attributes (`ProxyAttnConfig().to_attrs()`), read from proxyattn/config.py
    alone so that this script stays free of torch."""
    import importlib.util

    path = os.path.join(os.path.dirname(RESULTS), os.pardir, "proxyattn", "config.py")
    spec = importlib.util.spec_from_file_location("_proxyattn_config", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is made
    spec.loader.exec_module(mod)
    return mod.ProxyAttnConfig().to_attrs()


# Config fields added after result files were written, with the value every earlier run had (the feature off): a file
# whose recorded default lacks one ran with that value.
ADDED_FIELDS = {"pa_column_fraction": 0.0}


def recorded_default(d: dict) -> dict | None:
    """The file's default config (`default_config`) with the fields added since filled in at their earlier value."""
    base = d.get("default_config")
    return None if base is None else {**base, **{k: v for k, v in ADDED_FIELDS.items() if k not in base}}


def label_config(d: dict, label: str) -> dict | None:
    """The config (ONNX attributes) a row's label names: the file's default (`default_config`) with the label's
    numeric `field=value` overrides ("gamma=0.83, dense_density=0.8"); None when the file records no default or the
    label is not of that form."""
    base = recorded_default(d)
    if base is None:
        return None
    attrs = dict(base)
    for part in label.split(", "):
        key, sep, value = part.partition("=")
        if not sep or "pa_" + key not in attrs:
            return None
        try:
            attrs["pa_" + key] = type(attrs["pa_" + key])(float(value))
        except ValueError:
            return None
    return attrs


def method_name(d: dict, label: str) -> str:
    """A results row's method: its config label, where "default" means today's default only when the file records
    the default it ran (`default_config`) and that equals today's; otherwise "default@<commit>", the default of the
    commit that made the file. A label of overrides that amount to today's default ("gamma=0.83, dense_density=0.8"
    measured before it became the default) is called "default"."""
    if not label.startswith("default"):
        return "default" if label_config(d, label) == current_default() else label
    if recorded_default(d) == current_default():
        return label
    return f"default@{d['commit'][:7]}" + label[len("default") :]


def _gpu_tag(d: dict) -> str:
    name = d["gpu"].upper()
    return "h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower()


def prefill_files(files: list[str]) -> list[str]:
    """The prefill files the summary reads: the newest (by its recorded date) of each GPU."""
    newest: dict[str, tuple[str, str]] = {}
    for name in files:
        if not (name.startswith("prefill_") and name.endswith(".json")):
            continue
        d = load(name)
        if "gpu" not in d or "date" not in d:
            continue
        tag = _gpu_tag(d)
        if tag not in newest or d["date"] > newest[tag][0]:
            newest[tag] = (d["date"], name)
    return sorted(name for _, name in newest.values())


def attention_files(files: list[str]) -> list[str]:
    """Every attention results file (`attention_*.json` with a GPU and a date), oldest first by recorded date."""
    named = [(load(n), n) for n in files if n.startswith("attention_") and n.endswith(".json")]
    return [n for d, n in sorted(((d, n) for d, n in named if "gpu" in d and "date" in d), key=lambda x: x[0]["date"])]


def _newest_rows(rows: list[dict], key) -> list[dict]:
    """Per key, the row of the newest file: rows come oldest file first, so a later one replaces an earlier one. A
    partial rerun (one length, say) thus updates its own rows and leaves the others to the older, complete run;
    every row keeps its source, and its ratios are measured within that source's run."""
    out: dict = {}
    for r in rows:
        out[key(r)] = r
    return list(out.values())


def summary_rows(files: list[str]) -> list[dict]:
    """The rows of summary.json (see the module docstring): attention and kernel rows per (GPU, benchmark, method,
    inputs, length) from the newest attention file that measured them, prefill rows from the newest prefill file."""
    rows = []
    for name in attention_files(files):
        d = load(name)
        base = {"gpu": d["gpu"], "commit": d["commit"][:7], "date": d["date"], "source": name}
        for r in d.get("sparse", []):
            rows.append(
                {
                    **base,
                    "benchmark": "kernel",
                    "method": f"block-sparse kernel, {r['target_density']:.0%} budget",
                    "config": f"block-sparse kernel, {r['target_density']:.0%} budget",
                    "inputs": "random, per-head plans",
                    "seq_len": r["S"],
                    "density": r["density"],
                    "rel_err": None,
                    "speedup_vs_dense": r["speedup_vs_cudnn"],
                    "tflops_eff": r["eff_tflops"],
                }
            )
        for r in d.get("proxy", []):
            if "ms" not in r:
                continue
            inputs = r.get("inputs", d.get("proxy_inputs"))
            rows.append(
                {
                    **base,
                    "benchmark": "attention",
                    "method": method_name(d, r["config"]),
                    "config": r["config"],
                    "inputs": "structured" if inputs in ("structured_qkv", ["structured_qkv"]) else "random",
                    "seq_len": r["S"],
                    "density": r.get("density"),
                    "rel_err": r.get("rel_err"),
                    "speedup_vs_dense": r["speedup_vs_cudnn"],
                }
            )
    rows = _newest_rows(rows, lambda r: (_gpu_tag(r), r["benchmark"], r["config"], r["inputs"], r["seq_len"]))
    for name in prefill_files(files):
        d = load(name)
        base = {"gpu": d["gpu"], "commit": d["commit"][:7], "date": d["date"], "source": name}
        for r in d["rows"]:
            for method in r["ttft_ms"]:
                if method == "sdpa":
                    continue
                label = method.removeprefix("proxyattn ").strip()
                rows.append(
                    {
                        **base,
                        "benchmark": "prefill",
                        "method": method_name(d, "default" if label in ("default", "") else label),
                        "config": "default" if label in ("default", "") else label,
                        "inputs": "random-weight Llama-3-8B",
                        "seq_len": r["seq_len"],
                        "density": r.get("density", {}).get(method),
                        "rel_err": None,
                        "speedup_vs_dense": r["speedup"][method],
                    }
                )
    return rows


def write_summary(files: list[str]) -> str:
    path = os.path.join(RESULTS, "summary.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(summary_rows(files), f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    return path


README = os.path.join(os.path.dirname(RESULTS), "..", "README.md")
BEGIN, END = "<!-- report.py performance: begin -->", "<!-- report.py performance: end -->"
FRONTIER_BEGIN, FRONTIER_END = "<!-- report.py frontier: begin -->", "<!-- report.py frontier: end -->"
_KEY_LENGTHS = (16384, 32768, 40960, 65536, 131072)
_KEY_METHODS = (
    "default",
    "default, no dense fallback",
    "gamma=0.83, dense_density=0.8",
    "budget_rule=2",
    "budget_fraction=0.1",
    "gamma=0.8",
    # vertical columns: beside the default's blocks, beside a lower gamma, beside fixed budgets
    "column_fraction=0.02",
    "gamma=0.8, column_fraction=0.02",
    "gamma=0.75, column_fraction=0.02",
    "gamma=0.7, column_fraction=0.02",
    "gamma=0.6, column_fraction=0.02",
    "budget_fraction=0.35, column_fraction=0.02",
    "budget_fraction=0.2, column_fraction=0.02",
    "column_fraction=0.02, budget_fraction=0.02",
)


def _fmt(x, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def performance_section(files: list[str]) -> list[str]:
    """The README's performance tables: per GPU, the newest attention and prefill files' key rows (summary.json)."""
    rows = summary_rows(files)
    out = []
    if any(r["benchmark"] != "prefill" for r in rows):
        out += [f"![speed against accuracy, every GPU](benchmarks/results/{PERFORMANCE_PLOT})", ""]
    for gpu in sorted({r["gpu"] for r in rows}):
        mine = [r for r in rows if r["gpu"] == gpu]
        sources = sorted({(r["source"], r["commit"], r["date"][:10]) for r in mine})
        out += [f"**{gpu}** (" + "; ".join(f"`{n}`: commit {c}, {d}" for n, c, d in sources) + ")", ""]
        for name in sorted({src for src, _, _ in sources}):
            note = load(name).get("note")
            if note:
                out += [f"Note on `{name}`: {note}", ""]
        out += [
            "| benchmark | S | method | inputs | density | rel. error vs dense | x dense (same run) | TFLOP/s on kept blocks |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(
            mine, key=lambda r: ({"attention": 0, "prefill": 1, "kernel": 2}[r["benchmark"]], r["seq_len"], r["method"], r["inputs"])
        ):
            if r["benchmark"] == "kernel" and r["seq_len"] not in (32768, 131072):
                continue
            if r["benchmark"] != "kernel" and (r["config"] not in _KEY_METHODS or r["seq_len"] not in (8192,) + _KEY_LENGTHS):
                continue
            out.append(
                f"| {r['benchmark']} | {k(r['seq_len'])} | {r['method']} | {r['inputs']} | {_fmt(r['density'], '.2f')} | "
                f"{_fmt(r['rel_err'], '.3f')} | {r['speedup_vs_dense']:.2f} | {_fmt(r.get('tflops_eff'), '.0f')} |"
            )
        est = []
        for name in attention_files(files):
            d = load(name)
            if d["gpu"] == gpu:
                est += [{**e, "source": name, "method": method_name(d, e["config"])} for e in d.get("estimation", []) if "ms" in e]
        plans = [
            f"{k(e['S'])} {e['method']}: {e['ms']:.2f} ms ({e['pct_of_cudnn_dense']:.1f}% of dense; `{e['source']}`)"
            for e in sorted(_newest_rows(est, lambda e: (e["S"], e["config"], e.get("inputs", "random"))), key=lambda e: e["S"])
            if e["S"] in _KEY_LENGTHS and e.get("inputs", "random") == "structured"
        ]
        if plans:
            out += ["", "Planning (`plan_blocks`, eager, structured inputs): " + "; ".join(plans) + "."]
        out.append("")
    return out


PERFORMANCE_PLOT = "performance.png"  # the README's performance figure (`write_performance_plot`)


def write_performance_plot(files: list[str]) -> str | None:
    """Draw `PERFORMANCE_PLOT` from the summary rows: per GPU, the whole method's speed against dense (same run)
    over its output error against dense (attention rows of the README table's methods: a point per method, inputs
    and length), and the block-sparse kernel's TFLOP/s on kept blocks over density (kernel rows from 16K). Its path,
    or None without rows. Needs matplotlib; written atomically."""
    rows = [r for r in summary_rows(files) if r["benchmark"] in ("attention", "kernel")]
    if not rows:
        return None
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = sorted({r["gpu"] for r in rows})
    fig, axes = plt.subplots(len(gpus), 2, figsize=(13, 4.8 * len(gpus)), squeeze=False)
    for gpu, (ax_m, ax_k) in zip(gpus, axes):
        mine = [r for r in rows if r["gpu"] == gpu]
        att = [r for r in mine if r["benchmark"] == "attention" and r["rel_err"] is not None and r["config"] in _KEY_METHODS]
        methods = sorted({r["method"] for r in att})
        lengths = sorted({r["seq_len"] for r in att})
        markers = "os^Dv<>p"
        for r in att:
            col = f"C{methods.index(r['method']) % 10}"
            filled = r["inputs"] == "structured"
            ax_m.plot(
                [r["rel_err"]], [r["speedup_vs_dense"]], markers[lengths.index(r["seq_len"]) % len(markers)],
                color=col, mfc=col if filled else "white",
            )  # fmt: skip
        for i, m in enumerate(methods):
            ax_m.plot([], [], "s", color=f"C{i % 10}", label=m)
        for j, s in enumerate(lengths):
            ax_m.plot([], [], markers[j % len(markers)], color="grey", label=k(s))
        ax_m.axhline(1.0, color="k", lw=0.6)
        ax_m.axvline(0.1, color="grey", lw=0.6, ls="--")
        ax_m.set(
            xlabel="output rel. error vs dense (dashed: 0.1)",
            ylabel="x dense, same run (log)",
            yscale="log",
            title=f"{gpu}: whole method, planning included (filled: structured inputs, open: random)",
        )
        ax_m.set_xlim(left=0)
        ticks = [0.5, 0.75, 1, 1.5, 2, 3, 5, 8, 12, 20]
        ax_m.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax_m.yaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([f"{t:g}x" for t in ticks]))
        ax_m.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_m.title.set_fontsize(9)
        ax_m.legend(fontsize=6, ncol=2, loc="upper right", framealpha=0.6)
        ker = [r for r in mine if r["benchmark"] == "kernel" and r["seq_len"] >= 16384]
        ker.sort(key=lambda r: (r["seq_len"], r["density"]))
        for j, s in enumerate(sorted({r["seq_len"] for r in ker})):
            pts = [r for r in ker if r["seq_len"] == s]
            ax_k.plot([r["density"] for r in pts], [r["tflops_eff"] for r in pts], "o-", label=k(s), color=f"C{j % 10}")
        ax_k.set(xlabel="kept-block density", ylabel="TFLOP/s on kept blocks", title=f"{gpu}: block-sparse kernel alone")
        ax_k.title.set_fontsize(9)
        if ker:
            ax_k.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(RESULTS, PERFORMANCE_PLOT)
    save_figure(fig, path, dpi=80)
    return path


def _replace_between(text: str, begin: str, end: str, lines: list[str]) -> str:
    if begin not in text or end not in text:
        raise SystemExit(f"README.md lacks the markers {begin!r} ... {end!r}")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return head + begin + "\n" + "\n".join(lines) + "\n" + end + tail


def update_readme(files: list[str]) -> None:
    """Replace the README's text between the performance markers with `performance_section` and between the
    frontier markers with `frontier_table` (atomically), and draw the plots they show."""
    with open(README) as f:
        text = f.read()
    new = _replace_between(text, BEGIN, END, performance_section(files))
    new = _replace_between(new, FRONTIER_BEGIN, FRONTIER_END, frontier_table(files))
    write_frontier_plot(files)
    write_performance_plot(files)
    tmp = README + ".tmp"
    with open(tmp, "w") as f:
        f.write(new)
    os.replace(tmp, README)


def main() -> int:
    files = sorted(os.listdir(RESULTS))
    write_summary(files)
    if "--readme" in sys.argv[1:]:
        update_readme(files)
        return 0
    lines: list[str] = []
    if "attention_h200.json" in files:
        lines += ["### Attention (Llama-3-8B shapes: 32 query / 8 KV heads, D 128, bf16, batch 1)", ""]
        lines += attention_tables(load("attention_h200.json"), "attention_h200.json") + [""]
    prefill = [f for f in files if f.startswith("prefill_") and f.endswith(".json")]
    if prefill:
        lines += ["### End-to-end prefill (Llama-3-8B architecture, random bf16 weights, batch 1)", ""]
    for name in prefill:
        lines += prefill_table(load(name), name) + [""]
    for name in (f for f in files if f.startswith("accuracy_") and f.endswith(".json")):
        title = name[len("accuracy_") : -len(".json")]
        lines += [f"### Accuracy: {title}", ""] + accuracy_table(load(name), name) + [""]
    acc = [f for f in files if f.startswith("accuracy_") and f.endswith(".json")]
    lines += ["### Accuracy against density", ""] + frontier_table(files)
    for model in ("gemma3-270m", "smollm2"):
        table = budget_rule_table(model, acc)
        if table:
            lines += [f"### Budget rules at equal density: {model}", ""] + table + [""]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
