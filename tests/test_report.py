"""benchmarks/report.py: what "default" names in a results row, and which file a row comes from when several
measured it (hand-made results dicts; the committed result files are only read by the smoke test at the end)."""

import importlib.util
from pathlib import Path

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
