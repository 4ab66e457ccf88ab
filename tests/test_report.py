"""benchmarks/report.py: what "default" names in a results row, and which file a row comes from when several
measured it (hand-made results dicts; the committed result files are only read by the smoke test at the end)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxyattn import ProxyAttnConfig

_spec = importlib.util.spec_from_file_location("report_bench", Path(__file__).parent.parent / "benchmarks" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)

TODAY = ProxyAttnConfig().to_attrs()


def test_current_default_is_the_packages_default():
    assert report.current_default() == TODAY


def test_default_keeps_its_name_only_when_the_file_ran_todays_default():
    same = {"commit": "abcdef123", "default_config": dict(TODAY)}
    older = {"commit": "abcdef123", "default_config": {**TODAY, "pa_gamma": 0.9}}
    unrecorded = {"commit": "abcdef123"}
    assert report.method_name(same, "default") == "default"
    assert report.method_name(same, "default, no dense fallback") == "default, no dense fallback"
    assert report.method_name(older, "default") == "default@abcdef1"
    assert report.method_name(older, "default, no dense fallback") == "default@abcdef1, no dense fallback"
    assert report.method_name(unrecorded, "default") == "default@abcdef1"
    assert report.method_name(older, "budget_fraction=0.1") == "budget_fraction=0.1"


def test_a_file_written_before_a_field_was_added_ran_that_fields_earlier_value():
    """column_fraction came later: a file whose default lacks it ran without columns, which is today's default; a
    column row keeps its label (its override is not the default)."""
    before = {k: v for k, v in TODAY.items() if k != "pa_column_fraction"}
    d = {"commit": "abcdef123", "default_config": before}
    assert report.method_name(d, "default") == "default"
    assert report.label_config(d, "column_fraction=0.02, budget_fraction=0.02")["pa_column_fraction"] == 0.02
    assert report.method_name(d, "column_fraction=0.02, budget_fraction=0.02") == "column_fraction=0.02, budget_fraction=0.02"
    older = {"commit": "abcdef123", "default_config": {**before, "pa_gamma": 0.9}}
    assert report.method_name(older, "default") == "default@abcdef1"


def test_a_label_of_overrides_that_amount_to_todays_default_is_called_default():
    """A file made before a default switch: its `default` is the old default, and the row measured as the overrides
    that are today's default is reported as "default"."""
    old_default = {**TODAY, "pa_gamma": 0.5, "pa_dense_density": 0.7}
    d = {"commit": "abcdef123", "default_config": old_default}
    today = f"gamma={TODAY['pa_gamma']}, dense_density={TODAY['pa_dense_density']}"
    assert report.label_config(d, today) == TODAY
    assert report.method_name(d, today) == "default"
    assert report.method_name(d, "default") == "default@abcdef1"
    assert report.method_name(d, f"gamma={TODAY['pa_gamma']}") == f"gamma={TODAY['pa_gamma']}"  # threshold differs
    assert report.label_config(d, "budget_rule=row_recall") is None  # not numeric: left as the label
    assert report.label_config(d, "no_such_field=1") is None
    assert report.label_config({"commit": "abcdef123"}, today) is None  # no recorded default
    assert report.method_name({"commit": "abcdef123"}, today) == today


def test_newest_file_wins_per_key_and_other_rows_stay():
    old = [{"k": 1, "v": "old"}, {"k": 2, "v": "old"}]
    new = [{"k": 2, "v": "new"}]
    rows = report._newest_rows(old + new, key=lambda r: r["k"])
    assert sorted((r["k"], r["v"]) for r in rows) == [(1, "old"), (2, "new")]


def test_summary_rows_of_the_committed_results():
    files = sorted(p.name for p in Path(report.RESULTS).iterdir())
    rows = report.summary_rows(files)
    assert rows, "no rows from benchmarks/results"
    keys = {"gpu", "commit", "date", "benchmark", "method", "config", "inputs", "seq_len", "density", "rel_err", "speedup_vs_dense"}
    for r in rows:
        assert keys <= set(r), r
        assert r["benchmark"] in ("attention", "prefill", "kernel")
    # one row per (GPU, benchmark, config, inputs, length) among attention and kernel rows
    seen = [(report._gpu_tag(r), r["benchmark"], r["config"], r["inputs"], r["seq_len"]) for r in rows if r["benchmark"] != "prefill"]
    assert len(seen) == len(set(seen))


def _frontier_result(model, loss, hits):
    """A hand-made `accuracy.py --methods frontier` result of one length: copy losses and passkey hits per method."""
    return {
        "model": model,
        "device": "test GPU",
        "date": "2026-12-07T00:00:00",
        "commit": "abcdef123",
        "command": "python3 benchmarks/accuracy.py --methods frontier",
        "copies": 2,
        "trials": 4,
        "methods": list(loss),
        "cells": [
            {
                "seq_len": 4096,
                "copy_loss": loss,
                "passkey_hits": hits,
                "density_copy": {m: 0.1 * (i + 1) for i, m in enumerate(loss) if m != "dense"},
            }
        ],
    }


def test_frontier_is_one_table_and_one_plot_of_every_model(tmp_path, monkeypatch):
    """Every model's frontier file goes into one table (a model column, each source named above it) and one figure;
    "ok" only within 3 % of dense's copy loss with passkey hits at least dense's."""
    pytest.importorskip("matplotlib")
    a = _frontier_result(
        "model-a",
        {"dense": 1.0, "block_recall g0.8": 1.02, "static 0.2": 1.5, "block_recall g0.95": 1.01},
        {"dense": [1, 1, 1, 0], "block_recall g0.8": [1, 1, 1, 0], "static 0.2": [1, 1, 1, 1], "block_recall g0.95": [1, 1, 0, 0]},
    )
    b = _frontier_result("model-b", {"dense": 2.0, "recall g0.8": 2.1}, {"dense": [1, 1], "recall g0.8": [1, 1]})
    for name, d in (("accuracy_model-a_frontier.json", a), ("accuracy_model-b_frontier.json", b)):
        (tmp_path / name).write_text(json.dumps(d))
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    files = sorted(p.name for p in tmp_path.iterdir()) + ["accuracy_model-a.json"]  # not a frontier file
    lines = report.frontier_table(files)
    assert sum(line.startswith("- **model-") for line in lines) == 2
    assert sum(f"benchmarks/results/{report.FRONTIER_PLOT}" in line for line in lines) == 1
    rows = [line for line in lines if line.startswith("| model-")]
    assert rows == [
        "| model-a | 4K | block_recall g0.8 | 0.20 | 1.020 | 3/4 (3/4) | ok |",
        "| model-a | 4K | static 0.2 | 0.30 | 1.500 | 4/4 (3/4) | no |",
        "| model-a | 4K | block_recall g0.95 | 0.40 | 1.010 | 2/4 (3/4) | no |",
        "| model-b | 4K | recall g0.8 | 0.20 | 1.050 | 2/2 (2/2) | no |",
    ]
    path = report.write_frontier_plot(files)
    assert path == str(tmp_path / report.FRONTIER_PLOT)
    assert (tmp_path / report.FRONTIER_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.frontier_table(["attention_h100.json"]) == [] and report.write_frontier_plot([]) is None


def test_frontier_script_usage_is_one_named_error(tmp_path):
    script = Path(report.__file__).parent / "frontier.py"
    for args in ([], ["out.json", "a.json"], [str(tmp_path / "out.png"), "a.txt"]):
        r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "usage: frontier.py OUT.png RESULT.json" in r.stderr, (args, r.stderr)
    assert list(tmp_path.iterdir()) == []


def test_performance_plot_and_its_readme_line(tmp_path, monkeypatch):
    """The performance figure is drawn from the summary rows of the attention files (the README section shows it
    above its tables); no attention or kernel row, no figure and no image line."""
    pytest.importorskip("matplotlib")
    att = {
        "gpu": "NVIDIA H100 80GB HBM3",
        "date": "2026-12-07T00:00:00",
        "commit": "abcdef123",
        "command": "python3 benchmarks/attention.py",
        "default_config": dict(TODAY),
        "sparse": [
            {"S": 32768, "target_density": d, "density": d + 0.01, "ms": 1.0, "eff_tflops": 400 + 100 * d, "speedup_vs_cudnn": 1 / d}
            for d in (0.05, 0.1)
        ],
        "proxy": [
            {
                "S": 32768,
                "inputs": "structured_qkv",
                "config": "default",
                "ms": 10.0,
                "speedup_vs_cudnn": 1.4,
                "density": 0.5,
                "rel_err": 0.1,
            },
            {"S": 32768, "inputs": "random", "config": "default", "ms": 10.0, "speedup_vs_cudnn": 1.0, "density": 1.0, "rel_err": 0.0},
        ],
    }
    (tmp_path / "attention_h100.json").write_text(json.dumps(att))
    monkeypatch.setattr(report, "RESULTS", str(tmp_path))
    files = ["attention_h100.json"]
    assert report.write_performance_plot(files) == str(tmp_path / report.PERFORMANCE_PLOT)
    assert (tmp_path / report.PERFORMANCE_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    section = report.performance_section(files)
    assert section[0] == f"![speed against accuracy, every GPU](benchmarks/results/{report.PERFORMANCE_PLOT})"
    assert "| attention | 32K | default | structured | 0.50 | 0.100 | 1.40 | — |" in section
    assert report.write_performance_plot([]) is None and report.performance_section([]) == []
