"""Triton Inference Server on the GPU with the text models (tests/gpu/check_serving.py's functional checks and a
short workload, one test): tiny-llama random weights on KIND_GPU, ProxyAttn against dense. The measured run with
the packaged and the 8B-shaped models is `python3 -m tests.gpu.check_serving --out DIR` (docs/serving.md)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.gpu


def test_serving_on_the_gpu(tmp_path):
    import os

    cmd = [
        sys.executable,
        "-m",
        "tests.gpu.check_serving",
        "--device",
        "cuda",
        "--models",
        "tiny-llama",
        "--lengths",
        "tiny-llama=100,1000",
        "--max-tokens",
        "8",
        "--concurrency",
        "2",
        "--out",
        str(tmp_path),
    ]
    if os.environ.get("PROXYATTN_NUMPY_WHEEL"):
        cmd += ["--numpy-wheel", os.environ["PROXYATTN_NUMPY_WHEEL"]]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = tmp_path.glob("serving_*.json")
    report = json.loads(path.read_text())
    assert all(c["passed"] for c in report["checks"]), report["checks"]
    rows = {(r["attention"], r["length"]): r for r in report["summary"]}
    assert rows[("proxyattn", 1000)]["sparse_layers"] == [2]
