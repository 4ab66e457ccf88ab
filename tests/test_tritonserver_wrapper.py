"""`python -m engines.tritonserver`: signals reach the server it started, nothing outlives it, errors are one line.

The signal tests start the real wrapper as a subprocess on the tiny-llama repository (built once per session, shared
with test_triton_server_integration.py), wait for its `serving ... tritonserver pid P` line, check that the server
answers, send SIGTERM or SIGINT to the WRAPPER only, and assert that the wrapper exits 0 within a bound, that the
tritonserver pid it printed is gone (reaped: os.kill raises ProcessLookupError), that no live process of the
server's process group (the Python backend stubs) remains and that the stubs' shared memory is gone from /dev/shm.
A signal during startup, a server that fails to start (exit 1) and usage errors (exit 2, no server) are covered too.
"""

import http.client
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import live_group_members

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # real tritonserver processes started and signalled
MODEL = "tiny-llama_onnxruntime"  # the Python-backend model of the tiny build
READY_BOUND_S = 180  # the server's start takes ~10 s on an idle 2-core machine
EXIT_BOUND_S = 60  # tritonserver's exit timeout (10 s) + the wrapper's grace for the stubs (5 s) + slack
SERVING = re.compile(r"^serving .*: HTTP (\S+), gRPC \S+, tritonserver pid (\d+) ", re.M)
STARTING = re.compile(r"tritonserver pid (\d+) starting", re.M)


def _wrapper(repo, *args, out_dir: Path) -> subprocess.Popen:
    """Start `python -m engines.tritonserver repo ...` with stdout/stderr going to files under out_dir."""
    with open(out_dir / "stdout", "wb") as out, open(out_dir / "stderr", "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "engines.tritonserver", str(repo), *args], cwd=ROOT, stdout=out, stderr=err)


def _read(out_dir: Path, name: str) -> str:
    return (out_dir / name).read_text(errors="replace")


def _wait_for(pattern: re.Pattern, proc: subprocess.Popen, out_dir: Path, name: str, bound_s: float) -> re.Match:
    """Poll file `name` until `pattern` matches; fails when the wrapper exits first or `bound_s` passes."""
    deadline = time.monotonic() + bound_s
    while time.monotonic() < deadline:
        match = pattern.search(_read(out_dir, name))
        if match:
            return match
        if proc.poll() is not None:
            pytest.fail(f"wrapper exited with {proc.returncode} before {pattern.pattern!r}:\n{_read(out_dir, 'stderr')}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"no {pattern.pattern!r} within {bound_s} s:\n{_read(out_dir, 'stderr')}")


def _ready(http_url: str) -> int:
    """HTTP status of GET /v2/health/ready (one connection, closed: no keep-alive delaying the shutdown)."""
    host, port = http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status
    finally:
        conn.close()


def _shm_regions(pids) -> list[Path]:
    """/dev/shm paths named in the command lines of `pids` (the Python backend stubs' shared memory)."""
    argv = [a.decode() for pid in pids for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    return [Path("/dev/shm") / a for a in argv if a.startswith("triton_python_backend_shm_region_")]


def _assert_gone(pid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped by the wrapper: not even a zombie
    assert live_group_members(pid) == [], f"processes of tritonserver's group {pid} outlived it"


def _assert_stopped(proc: subprocess.Popen, out_dir: Path, server_pid: int, signum: int) -> None:
    try:
        rc = proc.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"wrapper still runs {EXIT_BOUND_S} s after {signal.Signals(signum).name}")
    err = _read(out_dir, "stderr")
    assert rc == 0, f"exit {rc}:\n{err}"
    assert f"{signal.Signals(signum).name} received, stopping tritonserver (pid {server_pid})" in err, err
    assert "Traceback" not in err, err
    _assert_gone(server_pid)


@pytest.fixture(scope="module")
def repo(tiny_build):
    return tiny_build[1]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_the_server_and_the_wrapper(repo, tmp_path, signum):
    proc = _wrapper(repo, "--models", MODEL, out_dir=tmp_path)
    serving = _wait_for(SERVING, proc, tmp_path, "stdout", READY_BOUND_S)
    http_url, server_pid = serving.group(1), int(serving.group(2))
    assert _ready(http_url) == 200
    group = live_group_members(server_pid)
    assert server_pid in group and len(group) >= 2, f"expected tritonserver and its backend stub, got {group}"
    regions = _shm_regions(group)
    assert regions and all(r.exists() for r in regions), regions
    proc.send_signal(signum)
    _assert_stopped(proc, tmp_path, server_pid, signum)
    assert not [r for r in regions if r.exists()], "shared memory of the backend stub left in /dev/shm"


def test_signal_during_startup_stops_the_server(repo, tmp_path):
    proc = _wrapper(repo, "--models", MODEL, out_dir=tmp_path)
    server_pid = int(_wait_for(STARTING, proc, tmp_path, "stderr", READY_BOUND_S).group(1))
    proc.send_signal(signal.SIGTERM)
    _assert_stopped(proc, tmp_path, server_pid, signal.SIGTERM)
    assert "serving" not in _read(tmp_path, "stdout")


def test_server_failure_is_one_line_exit_1(tmp_path):
    bad = tmp_path / "repo" / "fails"
    (bad / "1").mkdir(parents=True)
    (bad / "config.pbtxt").write_text(
        'name: "fails"\nbackend: "python"\nmax_batch_size: 0\n'
        'input { name: "x" data_type: TYPE_INT64 dims: 1 }\n'
        'output { name: "y" data_type: TYPE_INT64 dims: 1 }\n'
    )
    (bad / "1" / "model.py").write_text(
        "class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('model cannot start')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "engines.tritonserver", str(tmp_path / "repo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=READY_BOUND_S,
    )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("engines.tritonserver: error: tritonserver (pid ") and "exited with code" in lines[-1], lines
    assert "model cannot start" in lines[-1], lines[-1]
    assert "Traceback" not in proc.stderr
    _assert_gone(int(re.search(r"\(pid (\d+)\)", lines[-1]).group(1)))


def _usage_error(*args: str) -> str:
    """Run the wrapper expecting a usage error: exit 2, one line on stderr, nothing on stdout; the line."""
    proc = subprocess.run([sys.executable, "-m", "engines.tritonserver", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("engines.tritonserver: error: "), proc.stderr
    return lines[0]


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "no model"])
def test_bad_repository_is_one_line_exit_2(tmp_path, kind):
    path = tmp_path / "repo"
    if kind == "file":
        path.write_text("not a repository")
    elif kind in ("empty", "no model"):
        path.mkdir()
        if kind == "no model":
            (path / "notes").mkdir()  # no config.pbtxt, no version directory
    line = _usage_error(str(path))
    expected = {"missing": "does not exist", "file": "is not a directory", "empty": "holds no model", "no model": "holds no model"}[kind]
    assert f"model repository '{path}' {expected}" in line, line


def test_unknown_model_is_one_line_exit_2(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    line = _usage_error(str(tmp_path), "--models", "a", "nope")
    assert f"model 'nope' is not in repository '{tmp_path}'; its models: a, b" in line, line
