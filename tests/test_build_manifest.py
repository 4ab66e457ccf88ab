"""Atomic writes and the build manifest (engines.artifacts)."""

import json
import os

import pytest

from engines.artifacts import Manifest, atomic_dir, atomic_write_text, file_sha256, json_hash, tool_versions, tree_hashes


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    p = tmp_path / "a" / "x.txt"
    atomic_write_text(p, "one")
    atomic_write_text(p, "two")
    assert p.read_text() == "two"
    assert sorted(os.listdir(p.parent)) == ["x.txt"]


def test_atomic_dir_error_keeps_the_old_directory(tmp_path):
    d = tmp_path / "repo"
    with atomic_dir(d) as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(d) as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("boom")
    assert (d / "f").read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["repo"]
    with atomic_dir(d) as tmp:
        (tmp / "g").write_text("new")
    assert sorted(os.listdir(d)) == ["g"]
    assert sorted(os.listdir(tmp_path)) == ["repo"]


def test_manifest_skips_only_unchanged_intact_stages(tmp_path):
    m = Manifest(tmp_path)
    art = tmp_path / "out.bin"
    art.write_bytes(b"abc")
    inputs = {"model": "tiny", "gamma": 0.95}
    assert not m.up_to_date("export", inputs)
    m.record("export", inputs, status="built", artifacts=tree_hashes(art, tmp_path))
    m.save()
    m2 = Manifest.load(tmp_path)
    assert m2.up_to_date("export", inputs)
    assert not m2.up_to_date("export", {"model": "tiny", "gamma": 0.9})  # inputs changed
    art.write_bytes(b"abd")  # artifact changed on disk
    assert not m2.up_to_date("export", inputs)
    art.unlink()
    assert not m2.up_to_date("export", inputs)
    m2.record("engines", inputs, status="not run", info={"reason": "no TensorRT"})
    assert not m2.up_to_date("engines", inputs)  # a stage that did not run is never up to date


def test_manifest_round_trip_and_hashes(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"1")
    (tmp_path / "d" / "b").write_bytes(b"2")
    hashes = tree_hashes(tmp_path / "d", tmp_path)
    assert sorted(hashes) == ["d/a", "d/b"] and hashes["d/a"] == file_sha256(tmp_path / "d" / "a") != hashes["d/b"]
    assert json_hash({"a": 1, "b": 2}) == json_hash({"b": 2, "a": 1})
    m = Manifest(tmp_path)
    m.data["tools"] = tool_versions()
    m.save()
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["tools"]["torch"].startswith("2.13.0") and data["tools"]["python"]


def test_corrupt_manifest_is_treated_as_empty(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    assert Manifest.load(tmp_path).data["stages"] == {}
