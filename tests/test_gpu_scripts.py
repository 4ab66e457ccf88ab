"""tests/gpu/run_all.sh: each part runs its own commands (stand-in nvidia-smi and python3 on PATH record them), an
unknown part is refused with the allowed ones, and every script a part names exists."""

import os
import re
import stat
import subprocess

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "tests" / "gpu" / "run_all.sh"


def _stub(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _run(tmp_path, *args):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls.log"
    _stub(bin_dir / "nvidia-smi", 'echo "NVIDIA H100 80GB HBM3"\n')
    _stub(bin_dir / "python3", f'echo "$*" >> {log}\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path / "out")}
    r = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    return r, (log.read_text().splitlines() if log.exists() else [])


@pytest.mark.parametrize(
    "part, expected",
    [
        ("tests", ["-m pytest -m gpu tests/gpu --ignore=tests/gpu/test_gpu_serving.py"]),
        ("checks", ["-m tests.gpu.check_estimation --out", "-m tests.gpu.check_estimation --recall", "-m tests.gpu.check_trt_launch"]),
        ("bench", ["benchmarks/kernel_configs.py --out", "benchmarks/attention.py --out"]),
        ("oracle", ["benchmarks/oracle_structured.py --device cuda --seq-len 131072"]),
        (
            "columns",
            [
                "-m pytest -m gpu tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_estimation.py -k vertical_columns",
                "benchmarks/attention.py --section proxy",
                "benchmarks/column_configs.py --commit",
            ],
        ),
    ],
)
def test_each_part_runs_its_commands(tmp_path, part, expected):
    r, calls = _run(tmp_path, "abc1234", part)
    assert r.returncode == 0, r.stderr
    assert len(calls) == len(expected)
    for call, start in zip(calls, expected):
        assert call.startswith(start), (call, start)
        assert "--commit abc1234" in call or "-m pytest" in call
    assert part not in ("bench", "oracle") or all("_h100." in c for c in calls)
    assert part != "columns" or "attention_columns_h100.json" in calls[1]  # result files are named by the card
    assert part != "columns" or "column_configs_h100.json" in calls[2]


def test_all_runs_every_part_in_order(tmp_path):
    r, calls = _run(tmp_path, "abc1234")
    assert r.returncode == 0, r.stderr
    firsts = [c.split(" --")[0] for c in calls]
    assert firsts == [
        "-m pytest -m gpu tests/gpu",
        "-m tests.gpu.check_estimation",
        "-m tests.gpu.check_estimation",
        "-m tests.gpu.check_trt_launch",
        "benchmarks/kernel_configs.py",
        "benchmarks/attention.py",
    ]


def test_unknown_part_is_refused(tmp_path):
    r, calls = _run(tmp_path, "abc1234", "benchmarks")
    assert r.returncode == 2 and calls == []
    assert "part 'benchmarks': allowed tests, checks, bench, oracle, columns or all" in r.stderr


def test_named_scripts_exist():
    text = SCRIPT.read_text()
    for path in re.findall(r"(?:benchmarks|tests/gpu)/[\w/]+\.py", text):
        assert (ROOT / path).is_file(), path
    for module in re.findall(r"-m (tests\.gpu\.\w+)", text):
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


def test_attention_benchmark_refuses_an_unknown_row_by_name():
    """benchmarks/attention.py --config: an unknown whole-method row exits 2 naming it and the allowed rows, before
    any GPU work (so on the CPU too)."""
    import sys

    r = subprocess.run(
        [sys.executable, "benchmarks/attention.py", "--out", "unused.json", "--section", "proxy", "--config", "bogus"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "--config 'bogus': allowed 'default'" in r.stderr and "'column_fraction=0.02, budget_fraction=0.02'" in r.stderr
