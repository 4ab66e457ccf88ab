"""tests/gpu/check_serving.py in its CPU mode (`--device cpu --models tiny-llama`): the GPU script's repository,
server start, functional checks, workload, report and exit status, on the CPU with the real tritonserver, so that
the device run starts from a script known to work end to end."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, subprocess_env

pytestmark = pytest.mark.slow  # a real tritonserver with two transformers models (~15 s)


def test_check_serving_cpu_mode(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.gpu.check_serving",
            "--device",
            "cpu",
            "--models",
            "tiny-llama",
            "--lengths",
            "tiny-llama=100,300",
            "--max-tokens",
            "4",
            "--concurrency",
            "2",
            "--out",
            str(tmp_path),
            "--commit",
            "test",
        ],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("serving_*.json")
    report = json.loads(path.read_text())
    assert report["commit"] == "test" and report["device"] == "cpu" and report["command"].startswith("python3 -m tests.gpu.check_serving")
    assert report["checks"] and all(c["passed"] for c in report["checks"]), report["checks"]
    rows = {(r["attention"], r["length"]): r for r in report["summary"]}
    assert set(rows) == {("dense", 100), ("dense", 300), ("proxyattn", 100), ("proxyattn", 300)}
    assert rows[("proxyattn", 300)]["sparse_layers"] == [2] and rows[("proxyattn", 100)]["sparse_layers"] == [0]
    assert rows[("dense", 300)]["sparse_layers"] == [0] and rows[("proxyattn", 300)]["prompt_tokens"] >= 290
    assert "server_first_token_x_dense" in rows[("proxyattn", 300)]
    for run in report["runs"]:
        assert run["completion_tokens"] == 4 * len(run["requests"]) and run["output_tokens_per_s"] > 0
    assert {a["length"] for a in report["agreement"]} == {100, 300}
