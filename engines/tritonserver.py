"""Run the real `tritonserver` shipped in the PyPI wheel `nvidia-pytriton` (CPU, Python backend) on 127.0.0.1.

nvidia-pytriton 0.7.0 requires numpy < 2, which this project does not use: install it with
`python3 -m pip install --no-deps nvidia-pytriton==0.7.0`; only its bundled server binary, Python backend and
backend stubs are used (the `pytriton` Python package itself is never imported).

`local_server(repo)` is a context manager that checks the repository, prepares a backend directory (the Python
backend plus the stub for this Python version), starts the server on free loopback ports, waits (bounded) until
every model is ready and stops the server on exit. The stub links `libpython3.X.so.1.0`; the library directory of
the running interpreter is put first on LD_LIBRARY_PATH so the backend's Python is this one, with this
environment's packages.

The server runs in a session of its own (`start_new_session=True`: a Ctrl-C in a terminal reaches this process, not
the server), so stopping it is this module's job: `stop_server` sends it one signal, waits (bounded) for it to
exit, SIGKILLs its whole process group after the timeout, and then waits for the rest of the group (the Python
backend stubs, which notice the server's exit and leave on their own within seconds) before SIGKILLing any
straggler; the shared-memory regions of those stubs (named in their command lines) are removed from /dev/shm when
a server stopped uncleanly left them behind. The server is reaped only after that, so its pid, which is also its
process-group id, cannot be reused while the group is being signalled. tritonserver itself waits up to 10 s
(`--exit-timeout-secs`) for in-flight requests and open client connections, then exits with code 1 ("Exit timeout
expired"); a signal that reaches it before it has installed its own handlers (while it still loads models) ends it
at once. Nothing can forward a SIGKILL sent to this process: the server then keeps running.

The backend's Python needs numpy 1.x: the Python backend stub of nvidia-pytriton 0.7.0 is built against numpy 1.x
and misreads numpy 2.x arrays (a BYTES tensor, the text interface, crashes the stub). `backend_env(path)` makes (once)
a virtual environment of this interpreter holding numpy 1.26.4 in front of a view of this interpreter's own
site-packages that leaves out the packages needing numpy 2 (`numpy2_only`);
the server is started with that environment's `bin` first on PATH, which is where the stub's embedded interpreter
(isolated: it ignores PYTHONPATH and PYTHONHOME) finds its prefix. numpy comes from the package index, or from a
wheel file (`numpy_wheel`, for machines without one).

Command line: `python -m engines.tritonserver REPO [--models M ...]` serves REPO until SIGTERM or SIGINT (Ctrl-C).
It prints `tritonserver pid P starting ...` on stderr once the server process exists and
`serving REPO ...: HTTP host:port, gRPC host:port, tritonserver pid P ...` on stdout once every model is ready.
SIGTERM and SIGINT, also during startup, are forwarded to the server (the same signal), which is stopped as above;
further signals while it stops are ignored (the stop is bounded by `--stop-timeout`). Exit status:

* 0: stopped on SIGTERM or SIGINT, the server gone within the stop timeout (a non-zero exit code of tritonserver
  itself, e.g. 1 after its own exit timeout, is reported on stderr; it is not a failure of the shutdown).
  The 128+signum convention is not used: a requested, completed shutdown is a success.
* 1: a server failure: tritonserver could not be started, exited by itself, was not ready within
  `--ready-timeout`, or did not exit within `--stop-timeout` of the signal and was killed.
* 2: a usage error, found before anything is started: bad arguments, REPO not a directory or holding no model,
  a name in `--models` that is not a model of REPO.

Every error is one line on stderr, `engines.tritonserver: error: ...`, without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import http.client
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = [
    "EXIT_OK",
    "EXIT_SERVER_FAILURE",
    "EXIT_USAGE",
    "STOP_SIGNALS",
    "ServerError",
    "ServerHandle",
    "Stopped",
    "BACKEND_NUMPY",
    "backend_env",
    "check_models",
    "default_backend_env",
    "find_distribution",
    "local_server",
    "main",
    "repository_models",
    "start_server",
    "stop_server",
    "wait_ready",
]

PROG = "engines.tritonserver"
EXIT_OK, EXIT_SERVER_FAILURE, EXIT_USAGE = 0, 1, 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0  # tritonserver's own --exit-timeout-secs is 10 s, model unloading comes on top
GROUP_GRACE_S = 5.0  # the backend stubs leave within ~2 s of the server's exit (measured)
_POLL_S = 0.2
_INSTALL_HINT = "python3 -m pip install --no-deps nvidia-pytriton==0.7.0"
_VERSION_DIR = re.compile(r"^[0-9]+$")
_GLOG_ERROR = re.compile(r"^E\d{4} [^\]]*\] ?(.*)$")
_BENIGN_ERRORS = ("CudaDriverHelper has not been initialized",)  # logged at every start on a machine without CUDA
BACKEND_NUMPY = "1.26.4"  # the last numpy 1.x; wheels for Python 3.9-3.12
_ENV_MARKER = ".proxyattn-backend-env"
_SHM_REGION = re.compile(r"^triton_python_backend_shm_region_[0-9A-Za-z-]+$")  # a stub's argv[2]


class ServerError(RuntimeError):
    """tritonserver failed: `reason` says how (one line); the exception's text adds the end of the server log."""

    def __init__(self, reason: str, log: str = "") -> None:
        super().__init__(reason + (f"\n--- end of the tritonserver log ---\n{log[-6000:]}" if log else ""))
        self.reason = reason
        self.last_error = _last_error_line(log)


def _describe_exit(code: int) -> str:
    """'exited with code N', or 'was ended by SIGNAME' for a negative (Popen-style) code."""
    if code >= 0:
        return f"exited with code {code}"
    try:
        return f"was ended by {signal.Signals(-code).name}"
    except ValueError:  # a signal without a name in this Python (a real-time one)
        return f"was ended by signal {-code}"


def _last_error_line(log: str) -> str:
    """The message of the last error line (glog `E....`) of a tritonserver log, or ''."""
    errors = [m.group(1).strip() for m in map(_GLOG_ERROR.match, log.splitlines()) if m]
    errors = [e for e in errors if not any(b in e for b in _BENIGN_ERRORS)]
    return errors[-1] if errors else ""


# ---------------------------------------------------------------------------------------------------------------
# The model repository


def repository_models(repo: str | os.PathLike) -> list[str]:
    """The models of repository `repo`, sorted: its subdirectories holding a config.pbtxt or a version directory.

    ValueError naming `repo` when it is not a directory or holds no model.
    """
    path = Path(repo)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a directory"
        raise ValueError(
            f"model repository {str(repo)!r} {what}; pass a Triton model repository directory (a build's <out>/model_repository)"
        )
    try:
        models = sorted(d.name for d in path.iterdir() if d.is_dir() and not d.name.startswith(".") and _is_model_dir(d))
    except OSError as e:
        raise ValueError(f"model repository {str(repo)!r} cannot be read: {e}") from e
    if not models:
        raise ValueError(
            f"model repository {str(repo)!r} holds no model; a model is a subdirectory with a config.pbtxt or a numbered version directory"
        )
    return models


def _is_model_dir(d: Path) -> bool:
    return (d / "config.pbtxt").is_file() or any(v.is_dir() and _VERSION_DIR.match(v.name) for v in d.iterdir())


def check_models(repo: str | os.PathLike, models: Sequence[str] | None) -> list[str] | None:
    """`models` without repeats when every name is a model of `repo`; None (load them all) when `models` is None.

    ValueError naming the bad repository (see `repository_models`) or the first unknown name and the allowed ones.
    """
    available = repository_models(repo)
    if models is None:
        return None
    if isinstance(models, str) or not models:
        raise ValueError(f"models={models!r} must be a non-empty list of model names; allowed: {available}")
    for name in models:
        if name not in available:
            raise ValueError(f"model {name!r} is not in repository {str(repo)!r}; its models: {', '.join(available)}")
    return list(dict.fromkeys(models))


# ---------------------------------------------------------------------------------------------------------------
# The backend's Python environment (numpy 1.x)


def default_backend_env() -> Path:
    """$PROXYATTN_TRITON_ENV, else ~/.cache/proxyattn/tritonserver-backend-py3.X."""
    if os.environ.get("PROXYATTN_TRITON_ENV"):
        return Path(os.environ["PROXYATTN_TRITON_ENV"])
    return Path.home() / ".cache" / "proxyattn" / f"tritonserver-backend-py{sys.version_info[0]}.{sys.version_info[1]}"


def _host_site_dirs() -> list[str]:
    return [p for p in sys.path if p.endswith(("site-packages", "dist-packages")) and Path(p).is_dir()]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# What the backend imports (the project, the ONNX Runtime and transformers models, GGUF weights): these and
# everything they require stay visible in the backend environment whatever numpy they declare.
BACKEND_ROOTS = ("proxyattn", "torch", "transformers", "tokenizers", "safetensors", "onnxruntime", "onnx", "gguf")


def numpy2_only(site_dir: str | os.PathLike) -> dict[str, str]:
    """The distributions installed in `site_dir` to hide from the backend (numpy BACKEND_NUMPY), with the reason:
    those whose numpy requirement excludes BACKEND_NUMPY (scipy >= 1.16 requires numpy >= 2, and its import fails
    under numpy 1.x, while transformers imports scipy whenever it is installed), then, repeatedly, those that
    require a hidden one (scikit-learn requires scipy); never BACKEND_ROOTS nor anything they require. Markers are
    evaluated for this interpreter with no extras. {canonical name: reason}."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import InvalidRequirement, Requirement

    env = {**default_environment(), "extra": ""}
    needs: dict[str, list[Requirement]] = {}
    for dist in metadata.distributions(path=[str(site_dir)]):
        name = dist.metadata["Name"]
        if not name:
            continue
        reqs = []
        for line in dist.requires or []:
            try:
                req = Requirement(line)
            except InvalidRequirement:
                continue
            if req.marker is None or req.marker.evaluate(env):
                reqs.append(req)
        needs[_canonical(name)] = reqs
    kept, todo = set(), [_canonical(r) for r in BACKEND_ROOTS]
    while todo:  # BACKEND_ROOTS and what they require, transitively
        name = todo.pop()
        if name in needs and name not in kept:
            kept.add(name)
            todo += [_canonical(r.name) for r in needs[name]]
    hidden = {
        name: f"requires {req}"
        for name, reqs in needs.items()
        for req in reqs
        if name not in kept and _canonical(req.name) == "numpy" and not req.specifier.contains(BACKEND_NUMPY, prereleases=True)
    }
    grew = True
    while grew:
        grew = False
        for name, reqs in needs.items():
            dep = next((r for r in reqs if _canonical(r.name) in hidden), None)
            if name not in hidden and name not in kept and dep is not None:
                hidden[name] = f"requires {_canonical(dep.name)}"
                grew = True
    return hidden


def _site_view_entries(site_dir: str) -> tuple[list[str], dict[str, str]]:
    """The entries of `site_dir` the backend environment shows (every one but those of numpy itself, shadowed by
    the environment's own, and of `numpy2_only`'s distributions), and the hidden distributions with reasons."""
    from importlib import metadata

    hidden = numpy2_only(site_dir)
    hide_dists = set(hidden) | {"numpy"}
    owned: set[str] = set()
    for dist in metadata.distributions(path=[site_dir]):
        if _canonical(dist.metadata["Name"] or "") in hide_dists:
            owned.add(Path(dist._path).name)  # the .dist-info directory
            for f in dist.files or []:
                top = f.parts[0] if f.parts else ""
                if top and top != ".." and not Path(top).is_absolute():
                    owned.add(top)
    shown = sorted(e for e in os.listdir(site_dir) if e not in owned and not e.startswith("__pycache__"))
    return shown, hidden


def _env_signature(views: dict[str, tuple[list[str], dict[str, str]]]) -> str:
    site = {d: shown for d, (shown, _) in views.items()}
    return json.dumps(
        {"numpy": BACKEND_NUMPY, "python": sys.executable, "version": list(sys.version_info[:3]), "site": site}, sort_keys=True
    )


def backend_env(
    path: str | os.PathLike | None = None, *, numpy_wheel: str | os.PathLike | None = None, log: Callable[[str], None] | None = None
) -> Path:
    """The backend's Python environment at `path` (default `default_backend_env()`), made when missing or stale.

    A venv of this interpreter (no pip) whose site-packages holds numpy BACKEND_NUMPY and a `.pth` that adds, after
    it, a view of each of this interpreter's site-packages (`host/<i>`: symlinks to its entries; torch,
    transformers, onnxruntime and the project come from there). The view leaves out numpy itself and the
    distributions that need numpy 2 (`numpy2_only`: scipy's builds for numpy 2 fail to import under numpy 1.x, and
    transformers imports scipy whenever it is installed), so that those look not installed to the backend. numpy
    is installed with this interpreter's pip from `numpy_wheel` (no index) or from the package index. Built in a
    temporary sibling, checked (`import numpy, torch` and `transformers.modeling_utils` when transformers is
    installed) and renamed into place; remade when the Python, numpy or the entries of the views would change. A
    directory at `path` that is not such an environment (no marker file) is refused, never removed. ValueError
    naming the problem.
    """
    path = Path(path) if path is not None else default_backend_env()
    marker = path / _ENV_MARKER
    views = {d: _site_view_entries(d) for d in _host_site_dirs()}  # {site dir: (entries shown, hidden dists)}
    signature = _env_signature(views)
    if marker.is_file() and marker.read_text() == signature:
        return path
    if path.exists() and not marker.is_file():
        raise ValueError(
            f"backend environment {str(path)!r} exists but was not made by engines.tritonserver "
            f"(no {_ENV_MARKER}); remove it or name another path"
        )
    if numpy_wheel is not None and not Path(numpy_wheel).is_file():
        raise ValueError(
            f"numpy_wheel {str(numpy_wheel)!r} is not a file; give numpy {BACKEND_NUMPY}'s wheel for Python "
            f"{sys.version_info[0]}.{sys.version_info[1]}"
        )
    if log is not None:
        log(f"making the backend environment {path} (numpy {BACKEND_NUMPY})")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", "--clear", str(tmp)], check=True, capture_output=True, text=True)
        site = tmp / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
        source = [str(numpy_wheel), "--no-index"] if numpy_wheel is not None else [f"numpy=={BACKEND_NUMPY}"]
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "--no-compile",
                "--target",
                str(site),
                *source,
            ],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            raise ValueError(f"installing numpy {BACKEND_NUMPY} into the backend environment failed: {pip.stderr.strip()[-800:]}")
        lines = []
        for i, (d, (shown, hidden)) in enumerate(views.items()):  # a view of each: symlinks to what the backend sees
            view = tmp / "host" / str(i)
            view.mkdir(parents=True)
            for entry in shown:
                (view / entry).symlink_to(Path(d) / entry)
            if hidden and log is not None:
                log(f"backend environment: hiding {', '.join(f'{n} ({why})' for n, why in sorted(hidden.items()))} of {d}")
            lines.append(f"import os, site, sys; site.addsitedir(os.path.join(sys.prefix, 'host', {str(i)!r}))")
        (site / "zz_proxyattn_host.pth").write_text("\n".join(lines) + "\n")
        probe = (
            "import numpy, torch, importlib.util as u\n"
            "if u.find_spec('transformers'): import transformers.modeling_utils\n"
            "print(numpy.__version__)"
        )
        check = subprocess.run([str(tmp / "bin" / "python3"), "-c", probe], capture_output=True, text=True)
        if check.returncode != 0 or check.stdout.strip() != BACKEND_NUMPY:
            raise ValueError(f"the backend environment does not work: numpy {check.stdout.strip()!r}, {check.stderr.strip()[-800:]}")
        (tmp / _ENV_MARKER).write_text(signature)
        if path.exists():  # a stale environment of ours (marker checked above)
            shutil.rmtree(path)
        tmp.rename(path)
    except (subprocess.CalledProcessError, OSError) as e:
        raise ValueError(f"could not make the backend environment {str(path)!r}: {e}") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Starting and stopping the server


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


def _server_env(dist: Path, pythonpath: str | os.PathLike | None, env_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if env_dir is not None:  # the stub's interpreter takes its prefix from the first python3 on PATH
        env["PATH"] = os.pathsep.join([str(env_dir / "bin")] + ([env["PATH"]] if env.get("PATH") else []))
    libdirs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.parent.parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = ":".join([d for d in libdirs if d] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else []))
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    # The backend's Python must not be steered into threads fighting over the two cores.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@dataclass
class ServerHandle:
    """A started tritonserver: its endpoints, process (leader of its own session and process group) and log."""

    http_url: str
    grpc_url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass(frozen=True)
class Stopped:
    """How a server stopped: its exit code (negative: killed by that signal) and whether it had to be killed."""

    returncode: int
    killed: bool


def start_server(
    repo: str | os.PathLike,
    work: Path,
    *,
    models: Sequence[str] | None = None,
    pythonpath: str | os.PathLike | None = None,
    env_dir: str | os.PathLike | None = None,
    address: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
) -> ServerHandle:
    """Start tritonserver on free loopback ports, serving `repo` (only `models` when given); returns at once.

    `work` (an existing, empty directory) receives the backend directory and the server log; it must outlive the
    server. `env_dir`: the backend's Python environment (`backend_env`), needed by models with text tensors.
    `address` / ports: where to listen (default: loopback, free ports). The caller stops the server with `stop_server`.
    """
    dist = find_distribution()
    backends = _backend_dir(dist, work)
    http_port = http_port or _free_port()
    grpc_port = grpc_port or _free_port()
    while grpc_port == http_port:
        grpc_port = _free_port()
    cmd = [
        str(dist / "bin" / "tritonserver"),
        f"--model-repository={Path(repo).resolve()}",
        f"--backend-directory={backends}",
        f"--http-address={address}",
        f"--grpc-address={address}",
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
        env = _server_env(dist, pythonpath, Path(env_dir) if env_dir is not None else None)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)
    host = "127.0.0.1" if address in ("0.0.0.0", "127.0.0.1") else address
    return ServerHandle(f"{host}:{http_port}", f"{host}:{grpc_port}", proc, log_path)


def _peek_exit(proc: subprocess.Popen) -> int | None:
    """`proc`'s exit code once it has exited (negative: the signal that killed it), else None.

    The child is not reaped (WNOWAIT): its pid, which is also its process-group id, stays reserved until
    `stop_server` reaps it.
    """
    if proc.returncode is not None:
        return proc.returncode
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def _is_ready(http_url: str) -> bool:
    """Whether the server at `http_url` answers GET /v2/health/ready with 200 (a refused connection: not yet)."""
    host, port = http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5.0)
    try:
        conn.request("GET", "/v2/health/ready")
        return conn.getresponse().status == 200
    except (OSError, http.client.HTTPException):
        return False  # not listening yet, or closed the connection while starting
    finally:
        conn.close()


def wait_ready(handle: ServerHandle, timeout_s: float = READY_TIMEOUT_S, *, stop_requested: Callable[[], bool] | None = None) -> bool:
    """Poll until the server is ready (True) or `stop_requested()` turns true (False).

    ServerError (with the server log) when the server exits first or is not ready within `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if stop_requested is not None and stop_requested():
            return False
        code = _peek_exit(handle.process)
        if code is not None:
            raise ServerError(f"tritonserver (pid {handle.pid}) {_describe_exit(code)} during startup", handle.log())
        if _is_ready(handle.http_url):
            return True
        time.sleep(0.5)
    raise ServerError(f"tritonserver (pid {handle.pid}) not ready after {timeout_s:.0f} s", handle.log())


def _await_exit(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """Poll (without reaping) until `proc` exits; its exit code, or None after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        code = _peek_exit(proc)
        if code is not None or time.monotonic() >= deadline:
            return code
        time.sleep(0.1)


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # the process exited while we looked
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _shm_regions(pids: Sequence[int]) -> list[str]:
    """Names of the Python backend's shared-memory regions (in /dev/shm) that the stubs among `pids` use."""
    names = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # the process exited while we looked
        names += [a.decode() for a in argv if _SHM_REGION.match(a.decode(errors="replace"))]
    return names


def _unlink_shm(names: Sequence[str]) -> None:
    """Remove these regions from /dev/shm where they are left over (a server that did not stop cleanly)."""
    for name in names:
        try:
            (Path("/dev/shm") / name).unlink()
        except FileNotFoundError:
            continue  # the server or its stub removed it: the usual case


def _killpg(pgid: int) -> None:
    """SIGKILL process group `pgid`; an empty group is left alone."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        return  # every member already exited: nothing to kill


def _clear_group(pgid: int, grace_s: float) -> None:
    """Wait up to `grace_s` for the processes of group `pgid` to exit, then SIGKILL what is left."""
    deadline = time.monotonic() + grace_s
    while _group_members(pgid):
        if time.monotonic() >= deadline:
            _killpg(pgid)
            return
        time.sleep(0.1)


def stop_server(
    proc: subprocess.Popen, signum: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S, grace_s: float = GROUP_GRACE_S
) -> Stopped:
    """Stop a server started by `start_server` and everything of its process group, bounded in time.

    Sends `signum` (unless it has exited already), waits up to `timeout_s`, then SIGKILLs the group; the other
    members of the group get `grace_s` more to leave before they are SIGKILLed. Then removes the shared-memory
    regions of the group's backend stubs that a server stopped uncleanly leaves in /dev/shm, and reaps the server.
    """
    regions = _shm_regions(_group_members(proc.pid))
    code = _peek_exit(proc)
    killed = False
    if code is None:
        proc.send_signal(signum)
        code = _await_exit(proc, timeout_s)
        if code is None:
            _killpg(proc.pid)
            killed = True
    regions += _shm_regions(_group_members(proc.pid))  # stubs started while it stopped, if any
    _clear_group(proc.pid, grace_s)
    _unlink_shm(regions)
    return Stopped(proc.wait(timeout=timeout_s), killed)


@contextlib.contextmanager
def local_server(
    repo: str | os.PathLike,
    *,
    models: list[str] | None = None,
    pythonpath: str | os.PathLike | None = None,
    env_dir: str | os.PathLike | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    stop_timeout_s: float = STOP_TIMEOUT_S,
) -> Iterator[ServerHandle]:
    """Serve model repository `repo` on 127.0.0.1 until the block ends.

    Args:
        repo: the model repository (ValueError when it is not a directory or holds no model).
        models: load only these models (explicit model control), e.g. the Python-backend model on a machine without
            TensorRT, where the repository's tensorrt_plan models cannot load; None loads every model. ValueError
            for a name that is not a model of `repo`.
        pythonpath: prepended to PYTHONPATH for the backend's Python (the project root, for `plugins.onnxruntime`).
        env_dir: the backend's Python environment (`backend_env()`); needed by models with text tensors.
        ready_timeout_s: give up (and raise ServerError, a RuntimeError, with the server log) after this long.
        stop_timeout_s: at the end, SIGTERM the server and SIGKILL its process group after this long.
    """
    checked = check_models(repo, models)
    with tempfile.TemporaryDirectory(prefix="proxyattn-tritonserver-") as tmp:
        handle = start_server(repo, Path(tmp), models=checked, pythonpath=pythonpath, env_dir=env_dir)
        try:
            wait_ready(handle, ready_timeout_s)
            yield handle
        finally:
            stop_server(handle.process, signal.SIGTERM, stop_timeout_s)


# ---------------------------------------------------------------------------------------------------------------
# Command line


class _SignalLatch:
    """While entered, records the first of `signals` received; the handlers only record, the main loop acts."""

    def __init__(self, signals: Sequence[int]) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_SignalLatch":
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _record(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def fired(self) -> bool:
        return self.signum is not None


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _serve_until_signal(handle: ServerHandle, latch: _SignalLatch, label: str, ready_timeout_s: float) -> None:
    """Wait for readiness, announce it, then wait for a signal; ServerError when the server fails first."""
    if not wait_ready(handle, ready_timeout_s, stop_requested=latch.fired):
        return
    print(
        f"serving {label}: HTTP {handle.http_url}, gRPC {handle.grpc_url}, tritonserver pid {handle.pid} (SIGTERM or Ctrl-C stops it)",
        flush=True,
    )
    while not latch.fired():
        code = _peek_exit(handle.process)
        if code is not None:
            raise ServerError(f"tritonserver (pid {handle.pid}) {_describe_exit(code)} while serving", handle.log())
        time.sleep(_POLL_S)


def serve(
    repo: str,
    models: list[str] | None,
    *,
    pythonpath: str | os.PathLike | None,
    ready_timeout_s: float,
    stop_timeout_s: float,
    env_dir: Path | None = None,
    address: str = "127.0.0.1",
    http_port: int | None = None,
    grpc_port: int | None = None,
) -> int:
    """Serve `repo` until SIGTERM/SIGINT; the exit status of the module docstring. Raises ServerError on failure."""
    with _SignalLatch(STOP_SIGNALS) as latch, tempfile.TemporaryDirectory(prefix="proxyattn-tritonserver-") as tmp:
        if latch.fired():
            return EXIT_OK
        handle = start_server(
            repo,
            Path(tmp),
            models=models,
            pythonpath=pythonpath,
            env_dir=env_dir,
            address=address,
            http_port=http_port,
            grpc_port=grpc_port,
        )
        _say(f"tritonserver pid {handle.pid} starting (HTTP {handle.http_url}, gRPC {handle.grpc_url})")
        label = f"{repo} ({', '.join(models)})" if models else repo
        try:
            _serve_until_signal(handle, latch, label, ready_timeout_s)
        finally:
            signum = latch.signum or signal.SIGTERM
            if latch.fired():
                _say(f"{signal.Signals(signum).name} received, stopping tritonserver (pid {handle.pid})")
            stopped = stop_server(handle.process, signum, stop_timeout_s)
        if stopped.killed:
            raise ServerError(
                f"tritonserver (pid {handle.pid}) did not exit within {stop_timeout_s:g} s of "
                f"{signal.Signals(signum).name}; killed its process group"
            )
        if stopped.returncode > 0:  # e.g. 1: its exit timeout expired with client connections still open
            _say(f"tritonserver exited with code {stopped.returncode}: {_last_error_line(handle.log()) or 'no error logged'}")
        elif stopped.returncode < 0:  # the signal came before tritonserver had installed its own handler
            _say(f"tritonserver {_describe_exit(stopped.returncode)} before it could handle it (still starting)")
        _say("stopped")
        return EXIT_OK


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0 seconds")
    return value


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Serve a generated Triton model repository on 127.0.0.1 "
        "until SIGTERM or SIGINT (Ctrl-C). Exit status: 0 stopped on a signal, 1 server failure, 2 usage error.",
    )
    p.add_argument("repo", help="the model repository (a build's <out>/model_repository)")
    p.add_argument("--models", nargs="+", default=None, help="load only these models (e.g. the *_onnxruntime one on a CPU machine)")
    p.add_argument(
        "--ready-timeout", type=_positive_seconds, default=READY_TIMEOUT_S, help="seconds to wait for readiness (default %(default)g)"
    )
    p.add_argument(
        "--stop-timeout",
        type=_positive_seconds,
        default=STOP_TIMEOUT_S,
        help="seconds to wait for the server to exit after the signal before killing it (default %(default)g)",
    )
    p.add_argument(
        "--backend-env",
        default=None,
        metavar="DIR",
        help="the backend's Python environment with numpy 1.x, made there when missing (default: "
        "$PROXYATTN_TRITON_ENV or ~/.cache/proxyattn/tritonserver-backend-py3.X)",
    )
    p.add_argument(
        "--numpy-wheel",
        default=None,
        metavar="WHL",
        help=f"numpy {BACKEND_NUMPY}'s wheel for this Python, to make the backend environment without a package index",
    )
    p.add_argument(
        "--no-backend-env",
        action="store_true",
        help="run the backend with this interpreter's numpy (models with text tensors then refuse to load)",
    )
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--http-port", type=_port, default=None, help="HTTP port (default: a free one)")
    p.add_argument("--grpc-port", type=_port, default=None, help="gRPC port (default: a free one)")
    args = p.parse_args(argv)
    if args.no_backend_env and (args.backend_env or args.numpy_wheel):
        p.error("--no-backend-env excludes --backend-env and --numpy-wheel")
    if args.http_port is not None and args.http_port == args.grpc_port:
        p.error(f"--http-port and --grpc-port are both {args.http_port}")
    return args


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """`python -m engines.tritonserver REPO [--models M ...]`: serve REPO until SIGTERM or SIGINT."""
    args = _parse_args(argv)
    try:
        models = check_models(args.repo, args.models)
    except ValueError as e:
        _say(f"error: {e}")
        return EXIT_USAGE
    root = Path(__file__).resolve().parents[1]
    env_dir = None
    if not args.no_backend_env:
        try:
            env_dir = backend_env(args.backend_env, numpy_wheel=args.numpy_wheel, log=_say)
        except ValueError as e:
            _say(f"error: {e}")
            return EXIT_SERVER_FAILURE
    try:
        return serve(
            args.repo,
            models,
            pythonpath=root,
            ready_timeout_s=args.ready_timeout,
            stop_timeout_s=args.stop_timeout,
            env_dir=env_dir,
            address=args.address,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
        )
    except ServerError as e:
        _say(f"error: {e.reason}" + (f"; last server error: {e.last_error}" if e.last_error else ""))
    except (ValueError, OSError, subprocess.SubprocessError) as e:  # could not start (wheel, stub, ports) or reap it
        _say(f"error: tritonserver failed: {type(e).__name__}: {e}")
    return EXIT_SERVER_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
