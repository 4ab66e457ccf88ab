"""Run the real `tritonserver` shipped in the PyPI wheel `nvidia-pytriton` (CPU, Python backend) on 127.0.0.1.

nvidia-pytriton 0.7.0 requires numpy < 2, which this project does not use: install it with
`python3 -m pip install --no-deps nvidia-pytriton==0.7.0`; only its bundled server binary, Python backend and
backend stubs are used (the `pytriton` Python package itself is never imported).

`local_server(repo)` is a context manager that prepares a backend directory (the Python backend plus the stub for
this Python version), starts the server on free loopback ports, waits (bounded) until every model is ready and
stops the server on exit. The stub links `libpython3.X.so.1.0`; the library directory of the running interpreter is
put first on LD_LIBRARY_PATH so the backend's Python is this one, with this environment's packages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["ServerHandle", "find_distribution", "local_server"]

_INSTALL_HINT = "python3 -m pip install --no-deps nvidia-pytriton==0.7.0"


def find_distribution() -> Path:
    """The `tritonserver` directory inside the installed nvidia-pytriton wheel; ValueError when absent."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"tritonserver is not installed (it ships in nvidia-pytriton): {_INSTALL_HINT}")
    dist = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (dist / "bin" / "tritonserver").is_file():
        raise ValueError(f"{dist}/bin/tritonserver is missing: reinstall with {_INSTALL_HINT}")
    return dist


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend_dir(dist: Path, work: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ValueError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    py = work / "backends" / "python"
    py.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        (py / name).symlink_to(dist / "backends" / "python" / name)
    (py / "triton_python_backend_stub").symlink_to(stub)
    return work / "backends"


@dataclass
class ServerHandle:
    http_url: str
    grpc_url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def local_server(repo: str | os.PathLike, *, models: list[str] | None = None, pythonpath: str | os.PathLike | None = None, ready_timeout_s: float = 180.0) -> Iterator[ServerHandle]:
    """Serve model repository `repo` on 127.0.0.1 until the block ends.

    Args:
        repo: the model repository.
        models: load only these models (explicit model control), e.g. the Python-backend model on a machine without
            TensorRT, where the repository's tensorrt_plan models cannot load; None loads every model.
        pythonpath: prepended to PYTHONPATH for the backend's Python (the project root, for `plugins.onnxruntime`).
        ready_timeout_s: give up (and raise RuntimeError with the server log) after this long.
    """
    dist = find_distribution()
    with tempfile.TemporaryDirectory(prefix="proxyattn-tritonserver-") as tmp:
        work = Path(tmp)
        backends = _backend_dir(dist, work)
        http_port, grpc_port = _free_port(), _free_port()
        env = dict(os.environ)
        libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
        if pythonpath is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # The backend's Python must not be steered into threads fighting over the two cores.
        env.setdefault("OMP_NUM_THREADS", "1")
        cmd = [
            str(dist / "bin" / "tritonserver"),
            f"--model-repository={Path(repo).resolve()}",
            f"--backend-directory={backends}",
            "--http-address=127.0.0.1",
            "--grpc-address=127.0.0.1",
            f"--http-port={http_port}",
            f"--grpc-port={grpc_port}",
            "--allow-metrics=false",
            "--strict-readiness=true",
            "--exit-timeout-secs=10",
        ]
        if models is not None:
            cmd.append("--model-control-mode=explicit")
            cmd += [f"--load-model={m}" for m in models]
        log_path = work / "server.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
        handle = ServerHandle(f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}", proc, log_path)
        try:
            _wait_ready(handle, ready_timeout_s)
            yield handle
        finally:
            _stop(proc)


def _wait_ready(handle: ServerHandle, timeout_s: float) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(handle.http_url, connection_timeout=2.0, network_timeout=5.0)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if handle.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {handle.process.returncode}:\n{handle.log()[-6000:]}")
            try:
                if client.is_server_ready():
                    return
            except Exception:  # connection refused while the server starts: poll again
                pass
            time.sleep(0.5)
        raise RuntimeError(f"tritonserver not ready after {timeout_s:.0f} s:\n{handle.log()[-6000:]}")
    finally:
        client.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    """`python -m engines.tritonserver REPO [--models M ...]`: serve a generated repository on 127.0.0.1 until Ctrl-C."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("repo")
    p.add_argument("--models", nargs="+", default=None, help="load only these models (e.g. the *_onnxruntime one on a CPU machine)")
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parents[1]
    try:
        with local_server(args.repo, models=args.models, pythonpath=root) as server:
            print(f"serving {args.repo}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)", flush=True)
            server.process.wait()
    except KeyboardInterrupt:
        pass
    except (ValueError, RuntimeError) as e:
        print(f"tritonserver: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
