"""build.py never loses a user's files, keeps its manifest true, and fails with named errors.

The fault-injection test runs real builds of tiny-llama in subprocesses and kills them (SIGKILL) at every stage
boundary and inside the stages that write a directory, then checks `build.py --check` and the next build. The other
tests: a foreign directory (and the project root) is refused with every byte intact, a file a user put inside a
build's output is refused, stale records (--no-parity, fewer profiles), Ctrl-C / SIGTERM, and one-line errors for
bad input.
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engines.artifacts import Manifest, file_sha256
from engines.build_dir import OUTPUTS, foreign_files, temporaries
from tests.helpers import run_build, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-llama", "--profiles", "up-to-128", "128-1k"]


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default disposition. A shell without job control starts background jobs
    with SIGINT ignored and children inherit that (Python then installs no KeyboardInterrupt handler); a build run
    from a terminal gets the default, which is what these tests exercise."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-u", "build.py", *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _wait_for_line(proc, line: str, timeout=300.0) -> None:
    deadline = time.monotonic() + timeout
    for got in proc.stdout:
        if got.rstrip("\n") == line:
            return
        assert time.monotonic() < deadline, f"no {line!r} within {timeout} s"
    raise AssertionError(f"the build ended before {line!r}: {proc.wait()} {proc.stderr.read()[-2000:]}")


def _wait_for_temporary(out: Path, name: str, timeout=300.0) -> Path:
    """A temporary of output `name` holding at least one file (the stage is writing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in out.glob(f".{name}.*.tmp"):
            if any(f.is_file() for f in p.rglob("*")):
                return p
        time.sleep(0.02)
    raise AssertionError(f"no temporary of {name} within {timeout} s")


def _tree_bytes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def _check(out: Path):
    return run_build("--check", str(out), timeout=120)


def _assert_true_manifest(out: Path) -> dict:
    """Every listed file exists with its hash; nothing unlisted or temporary under the build's outputs."""
    m = json.loads((out / "manifest.json").read_text())
    listed = {}
    for stage in OUTPUTS:
        listed.update(m["stages"][stage]["artifacts"])
    for rel, digest in listed.items():
        assert file_sha256(out / rel) == digest, rel
    assert foreign_files(out, set(listed)) == [] and temporaries(out) == []
    assert m["build"]["state"] == "complete" and m["pending"] == []
    return m


@pytest.fixture(scope="module")
def killed_builds(tmp_path_factory):
    """One build directory through a build killed at every stage boundary and inside export / plugin_kernels, then
    completed. Returns (out, [(where, --check result, temporaries seen)])."""
    out = tmp_path_factory.mktemp("killed") / "build"
    record = []
    for stage in OUTPUTS:
        proc = _start(*TINY, "--out", str(out))
        _wait_for_line(proc, f"[build] {stage} ...")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        # The kill lands after the stage's first line: on a slow machine the stage may have made its temporary.
        record.append((f"before {stage}", _check(out), temporaries(out)))
        if stage in ("export", "plugin_kernels"):
            proc = _start(*TINY, "--out", str(out))
            _wait_for_line(proc, f"[build] {stage} ...")
            _wait_for_temporary(out, OUTPUTS[stage])
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
            record.append((f"inside {stage}", _check(out), temporaries(out)))
    final = run_build(*TINY, "--out", str(out))
    assert final.returncode == 0, final.stderr[-3000:]
    record.append(("complete", _check(out), []))
    return out, record, final


@pytest.mark.slow
def test_builds_killed_at_every_stage_boundary_resume(killed_builds):
    out, record, final = killed_builds
    assert [r[0] for r in record] == [
        "before export",
        "inside export",
        "before parity",
        "before plugin_kernels",
        "inside plugin_kernels",
        "before engines",
        "before ort_models",
        "before repository",
        "complete",
    ]
    for where, check, temps in record[:-1]:
        assert check.returncode == 1, (where, check.stdout, check.stderr)
        assert "the last build did not finish" in check.stdout, where
        if where.startswith("inside"):  # the killed stage left its temporary; --check names it
            assert temps and all(t.name.endswith(".tmp") for t in temps), where
            assert "temporary left by an interrupted build" in check.stdout, where
    assert record[-1][1].returncode == 0 and "intact" in record[-1][1].stdout, record[-1][1].stdout
    # Temporaries of every earlier kill were removed by the build after it; the last build removes only those of the
    # last kill (none unless that kill landed after the repository stage had started writing).
    last_kill = record[-2][2]
    if last_kill:
        assert f"removed {len(last_kill)} temporaries" in final.stdout, final.stdout
    else:
        assert "removed" not in final.stdout, final.stdout
    m = _assert_true_manifest(out)
    status = {k: v["status"] for k, v in m["stages"].items()}
    assert status == {
        "export": "built",
        "parity": "built",
        "plugin_kernels": "built",
        "engines": "not run",
        "ort_models": "built",
        "repository": "built",
    }
    assert json.loads((out / "parity.json").read_text())["passed"]


@pytest.mark.slow
def test_check_finds_every_kind_of_difference(killed_builds, tmp_path):
    out, _, _ = killed_builds
    ort = out / "ort" / "up-to-128.onnx"
    original = ort.read_bytes()
    stray = out / "ort" / "extra.onnx"
    try:
        ort.write_bytes(original + b"x")
        stray.write_bytes(b"x")
        res = _check(out)
        assert res.returncode == 1
        assert "ort/up-to-128.onnx: sha256 differs from the manifest" in res.stdout
        assert "ort/extra.onnx: not listed in the manifest" in res.stdout
    finally:
        ort.write_bytes(original)
        stray.unlink()
    assert _check(out).returncode == 0
    res = _check(tmp_path)  # not a build
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "not a ProxyAttn build" in res.stderr


@pytest.mark.slow
def test_a_file_the_user_put_in_a_build_is_refused_and_kept(killed_builds):
    out, _, _ = killed_builds
    mine = out / "model_repository" / "my_model" / "config.pbtxt"
    mine.parent.mkdir()
    mine.write_text("name: 'my_model'\n")
    before = _tree_bytes(out)
    try:
        res = run_build(*TINY, "--out", str(out), "--force")
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "model_repository/my_model/config.pbtxt is not a file of this build" in res.stderr
        assert _tree_bytes(out) == before
    finally:
        mine.unlink()
        mine.parent.rmdir()


@pytest.mark.slow
def test_stale_records_never_survive(killed_builds):
    out, _, _ = killed_builds
    # --no-parity: parity recorded as not run, the earlier parity.json gone.
    res = run_build(*TINY, "--out", str(out), "--no-parity")
    assert res.returncode == 0, res.stderr[-2000:]
    m = _assert_true_manifest(out)
    assert m["stages"]["parity"]["status"] == "not run" and m["stages"]["parity"]["info"]["reason"] == "--no-parity"
    assert not (out / "parity.json").exists()
    # Fewer profiles: only the current profile's ONNX Runtime model is on disk and listed.
    res = run_build("--model", "tiny-llama", "--profiles", "up-to-128", "--out", str(out), "--no-parity")
    assert res.returncode == 0, res.stderr[-2000:]
    m = _assert_true_manifest(out)
    assert sorted(os.listdir(out / "ort")) == ["up-to-128.onnx"]
    assert sorted(m["stages"]["ort_models"]["artifacts"]) == ["ort/up-to-128.onnx"]
    assert sorted(p.name for p in (out / "model_repository").iterdir()) == [
        "tiny-llama_dense",
        "tiny-llama_onnxruntime",
        "tiny-llama_onnxruntime_stream",
        "tiny-llama_proxyattn",
        "tiny-llama_up-to-128",
    ]
    assert _check(out).returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_ctrl_c_and_sigterm_exit_with_what_was_kept(tmp_path, sig, code, word):
    out = tmp_path / "b"
    proc = _start(*TINY, "--out", str(out), "--no-parity")
    _wait_for_line(proc, "[build] plugin_kernels ...")
    _wait_for_temporary(out, "plugins")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]  # (the exporter's own warnings come before it)
    assert last.startswith(f"build.py: {word} during stage plugin_kernels; kept in "), err
    assert "export (built)" in last and "Traceback" not in err
    assert temporaries(out) == []  # nothing half-written
    m = Manifest.read(out)
    assert m.data["build"]["state"] == "interrupted" and m.data["build"]["stage"] == "plugin_kernels"
    assert not (out / "plugins").exists()


def _foreign_tree(root: Path) -> dict[str, str]:
    (root / "plugins").mkdir(parents=True)
    (root / "plugins" / "mine.py").write_text("print('mine')\n")
    (root / "model_repository" / "m" / "1").mkdir(parents=True)
    (root / "model_repository" / "m" / "config.pbtxt").write_text("name: 'm'\n")
    (root / "manifest.json").write_text(json.dumps({"format": 1, "mine": True}))  # not a build manifest
    (root / "notes.txt").write_text("keep me\n")
    return _tree_bytes(root)


def test_foreign_directory_is_refused_with_every_byte_intact(tmp_path, capsys):
    import build

    root = tmp_path / "data"
    before = _foreign_tree(root)
    code = build.main([*TINY, "--out", str(root)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "non-empty directory that build.py did not create" in err[0], err
    assert "manifest.json is not a ProxyAttn build manifest" in err[0]
    assert _tree_bytes(root) == before


def test_out_in_the_project_root_is_refused(capsys):
    import build

    before = _tree_bytes(ROOT / "plugins")
    code = build.main([*TINY, "--out", str(ROOT)])
    err = capsys.readouterr().err
    assert code == 2 and "did not create (no manifest.json)" in err
    assert _tree_bytes(ROOT / "plugins") == before


def _checkpoint(tmp_path, config_text: str, weights: bytes | None = None) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(config_text)
    (d / "model.safetensors").write_bytes(weights if weights is not None else b"")
    return d


@pytest.mark.parametrize(
    "config_text, weights, needle",
    [
        ("[]", None, "config.json must hold a JSON object (a transformers config), it holds list []"),
        ("null", None, "config.json must hold a JSON object (a transformers config), it holds NoneType null"),
        ("{not json", None, "config.json is not valid JSON"),
        (None, b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}", "model.safetensors is not a readable safetensors file"),
        (None, b"", "model.safetensors is not a readable safetensors file"),
    ],
)
def test_bad_checkpoints_are_named(tmp_path, capsys, config_text, weights, needle):
    import build
    from engines.models import get_model

    if config_text is None:
        config_text = json.dumps(dict(get_model("llama3-8b").hf_config))
    ckpt = _checkpoint(tmp_path, config_text, weights)
    out = tmp_path / "out"
    code = build.main(["--model", "llama3-8b", "--weights", str(ckpt), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--out", ""], "--out '' is empty"),
        (["--max-batch", "x"], "argument --max-batch: invalid int value: 'x'"),
        (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--profiles", "1:2"], "or MIN:OPT:MAX token counts"),
        (["--gamma", "nan"], "gamma=nan must be a finite number"),
        (["--check", "/etc/hostname"], "--check /etc/hostname: not a directory"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(capsys, args, needle):
    import build

    try:
        code = build.main(["--model", "tiny-llama", *args])
    except SystemExit as e:  # argparse's errors
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err


def test_unwritable_out_is_named(capsys):
    """/sys refuses new entries even to root: a real unwritable location on this machine (Linux)."""
    import build

    code = build.main([*TINY, "--out", "/sys/proxyattn-build-test"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "/sys/proxyattn-build-test" in err[0] and "Traceback" not in err[0], err
