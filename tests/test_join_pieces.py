"""benchmarks/join_pieces.sh: the GGUF files joined from carried pieces (xz-compressed, plain, or one stream of both),
checked against sums.txt; a bad checksum or missing pieces leave nothing under the final name. Small random files
stand in for the weights."""

import hashlib
import lzma
import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "join_pieces.sh"
GEMMA, SMOL = "gemma-3-270m-q4_k_m.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _split(data: bytes, prefix: Path, size: int = 1000) -> None:
    for i in range(0, len(data), size):
        Path(f"{prefix}{i // size:02d}").write_bytes(data[i : i + size])


def _sums(pieces: Path, files: dict[str, bytes], extra: str = "") -> None:
    lines = [f"{hashlib.sha256(b).hexdigest()}  /{n}" for n, b in files.items()]
    (pieces / "sums.txt").write_text("\n".join(lines + ([extra] if extra else [])) + "\n")


def _run(pieces: Path, out: Path, *names: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(pieces), str(out), *names], capture_output=True, text=True)


@pytest.fixture()
def blobs():
    return {GEMMA: os.urandom(4321), SMOL: os.urandom(2345)}


@pytest.mark.parametrize("form", ["xz", "plain", "stream"])
def test_joins_every_form(tmp_path, blobs, form):
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    pieces.mkdir()
    if form == "xz":
        _split(lzma.compress(blobs[GEMMA]), pieces / "gemma.xz.part")
        _split(lzma.compress(blobs[SMOL]), pieces / "smol.xz.part")
        _sums(pieces, blobs)
    elif form == "plain":
        _split(blobs[GEMMA], pieces / "gemma.part")
        _split(blobs[SMOL], pieces / "smol.part")
        _sums(pieces, blobs)
    else:
        _split(blobs[GEMMA] + blobs[SMOL], pieces / "all.part")
        _sums(pieces, blobs, extra=f"gsize {len(blobs[GEMMA])}")
    r = _run(pieces, out, GEMMA, SMOL)
    assert r.returncode == 0, r.stderr
    assert (out / GEMMA).read_bytes() == blobs[GEMMA] and (out / SMOL).read_bytes() == blobs[SMOL]
    assert sorted(p.name for p in out.iterdir()) == sorted([GEMMA, SMOL])


def test_bad_checksum_leaves_nothing(tmp_path, blobs):
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    pieces.mkdir()
    _split(blobs[GEMMA], pieces / "gemma.part")
    _sums(pieces, {GEMMA: blobs[GEMMA][:-1]})
    r = _run(pieces, out, GEMMA)
    assert r.returncode == 1 and "checksum of gemma-3-270m-q4_k_m.gguf" in r.stderr
    assert list(out.iterdir()) == []


def test_missing_pieces_and_unknown_name(tmp_path, blobs):
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    pieces.mkdir()
    _sums(pieces, blobs)
    r = _run(pieces, out, SMOL)
    assert r.returncode == 1 and "no pieces of SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr
    r = _run(pieces, out, "llama.gguf")
    assert r.returncode == 2 and "file name llama.gguf; allowed:" in r.stderr
    assert list(out.iterdir()) == []


def test_existing_file_is_left_alone(tmp_path, blobs):
    pieces, out = tmp_path / "pieces", tmp_path / "out"
    pieces.mkdir()
    out.mkdir()
    (out / GEMMA).write_bytes(b"already here")
    _sums(pieces, blobs)
    r = _run(pieces, out, GEMMA)
    assert r.returncode == 0 and (out / GEMMA).read_bytes() == b"already here"
