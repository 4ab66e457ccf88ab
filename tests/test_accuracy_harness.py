"""benchmarks/accuracy.py's own attention: the banded path its sliding-window layers take (against the masked SDPA
transformers would run) and the method table the frontier draws from."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close

BENCH = Path(__file__).parent.parent / "benchmarks"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))  # the benchmark scripts import their siblings (as when run as scripts)
_spec = importlib.util.spec_from_file_location("accuracy_bench", BENCH / "accuracy.py")
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)
import frontier  # noqa: E402  (after the path above)


def masked_window_attention(q, k, v, window, scale):
    """fp32 reference: key j visible to query i iff i - window < j <= i; `[B, S, Hq, D]`."""
    s = q.shape[2]
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    mask = (j <= i) & (j > i - window)
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    p = ((q @ k.transpose(-1, -2)) * scale).masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ v).transpose(1, 2)


@pytest.mark.parametrize(
    "b,hq,hkv,s,d,window",
    [
        (1, 4, 1, 37, 16, 8),  # length not a multiple of the window, GQA 4
        (2, 7, 1, 64, 32, 16),  # batch 2, GQA 7, exact chunks
        (1, 2, 2, 5, 8, 16),  # shorter than one window: plain causal
        (1, 8, 1, 100, 64, 1),  # window 1: every query sees only itself
    ],
)
def test_banded_attention_equals_masked(b, hq, hkv, s, d, window):
    g = torch.Generator().manual_seed(s + window)
    q = torch.randn(b, hq, s, d, generator=g)
    k = torch.randn(b, hkv, s, d, generator=g)
    v = torch.randn(b, hkv, s, d, generator=g)
    scale = d**-0.5
    out = acc.banded_attention(q, k, v, window, scale)
    assert_close(out, masked_window_attention(q, k, v, window, scale), what=f"banded S={s} window={window}")


def test_frontier_methods_are_defined():
    missing = [m for m in acc.FRONTIER if m != "dense" and m not in acc.METHODS]
    assert not missing, f"FRONTIER names methods METHODS lacks: {missing}"
    assert frontier.family("block_recall r2 g0.9") == "block_recall r2"
    assert frontier.family("static 0.35") == "static"


@pytest.mark.parametrize(
    "args,named",
    [
        (["--methods", "dense,bogus"], "'bogus'"),
        (["--methods", "dense", "--tag", "a/b"], "'a/b'"),
    ],
)
def test_bad_cli_input_is_one_named_error(args, named, tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "accuracy.py"
    r = subprocess.run(
        [sys.executable, str(script), "--model", "smollm2", "--lengths", "1024", "--out", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and "allowed" in r.stderr, r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "configs,named", [("gamma", "'gamma'"), ("gamma=0.8,no_such_field=1", "'no_such_field' unknown; allowed"), ("gamma=1.5", "gamma=1.5")]
)
def test_plan_density_bad_config_is_one_named_error(configs, named, tmp_path):
    script = Path(__file__).parent.parent / "benchmarks" / "plan_density.py"
    r = subprocess.run(
        [sys.executable, str(script), "--model", "smollm2", "--length", "1024", "--configs", configs, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert named in r.stderr and r.stderr.startswith("plan_density.py: --configs="), r.stderr
    assert list(tmp_path.iterdir()) == []
