"""benchmarks/oracle_structured.py's selections on small shapes (CPU): the chunked exact block masses against the
whole-matrix ones, the oracles' densities, and the ranking/count split."""

import importlib.util
import json
import sys

import pytest
import torch

from proxyattn.testing import structured_qkv
from tests.helpers import ROOT, assert_close


@pytest.fixture(scope="module")
def oracle():
    spec = importlib.util.spec_from_file_location("oracle_structured", ROOT / "benchmarks" / "oracle_structured.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("s,hq,hkv,chunk", [(300, 4, 1, 1), (512, 8, 2, 3), (129, 7, 7, 8)])
def test_chunked_masses_equal_whole_matrix(oracle, s, hq, hkv, chunk):
    q, k, _ = structured_qkv(1, s, hq, hkv, 64, dtype=torch.float32, seed=s)
    scale = 64**-0.5
    got = oracle.block_masses_chunked(q[0], k[0], scale, chunk_blocks=chunk)
    nb = -(-s // oracle.BS)
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    want = torch.stack(
        [
            oracle.block_mass(oracle.head_attention(q[0, :, h], k[0, :, h // (hq // hkv)], scale), nb).masked_fill(~causal, -1.0)
            for h in range(hq)
        ]
    )
    assert_close(got, want, "fp32", what="chunked block masses")
    rows = torch.full((nb,), float(oracle.BS))
    rows[-1] = s - (nb - 1) * oracle.BS
    assert_close(got.clamp_min(0).sum(-1), rows.expand(hq, nb), "fp32", what="mass of each query block = its rows")


def test_oracle_densities(oracle):
    torch.manual_seed(0)
    nb, hq = 6, 3
    masses = torch.rand(hq, nb, nb).masked_fill(~torch.ones(nb, nb, dtype=torch.bool).tril(), -1.0)
    n_causal = nb * (nb + 1) // 2
    for name, keep in oracle.oracle_masks(masses, densities=(0.2, 0.5)).items():
        f = float(name.rsplit(" ", 1)[1])
        assert not (keep & ~torch.ones(nb, nb, dtype=torch.bool).tril()).any(), name
        assert keep.sum().item() == hq * round(f * n_causal), name
        if "per head" in name:  # every head its own share, its heaviest blocks
            assert (keep.flatten(1).sum(1) == round(f * n_causal)).all()
            for h in range(hq):
                assert (masses[h][~keep[h]] <= masses[h][keep[h]].min()).all()
        else:  # one threshold over all heads
            assert (masses[~keep] <= masses[keep].min()).all()


def test_ranking_count_split(oracle):
    """Exact counts on a ranking keep the shortest prefix reaching gamma of each row's mass; the exact ranking with
    given counts keeps the heaviest blocks of each row."""
    torch.manual_seed(1)
    nb, hq, r = 7, 4, 2
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    masses = torch.rand(hq, nb, nb).masked_fill(~causal, -1.0)
    # rankings: causal blocks of each row in a random order first, then the others
    key = torch.rand(r, nb, nb) + (~causal).float() * 2
    order = key.argsort(-1).to(torch.int32)
    counts = torch.randint(1, nb + 1, (hq, nb)).clamp(max=causal.sum(-1)).to(torch.int32)
    split = oracle.ranking_count_masks(masses, order, counts, gammas=(0.5, 0.9))
    for g in (0.5, 0.9):
        mask = split[f"plan ranking, exact counts {g}"]
        for h in range(hq):
            for m in range(nb):
                ranked = order[h // (hq // r), m, : m + 1].long()
                total = masses[h, m, : m + 1].sum()
                n = int(mask[h, m].sum())
                assert mask[h, m, ranked[:n]].all()
                assert masses[h, m, ranked[:n]].sum() >= g * total - 1e-6
                assert n == 1 or masses[h, m, ranked[: n - 1]].sum() < g * total
    mask = split["exact ranking, plan counts"]
    assert torch.equal(mask.sum(-1), counts.long())
    for h in range(hq):
        for m in range(nb):
            kept = masses[h, m][mask[h, m]]
            dropped = masses[h, m, : m + 1][~mask[h, m, : m + 1]]
            assert dropped.numel() == 0 or kept.min() >= dropped.max()


def test_chunked_run_writes_every_row(oracle, tmp_path, monkeypatch):
    """The GPU mode's pipeline end to end on the CPU (`--mode chunked`, reference path): every oracle, plan and split
    row, the oracles' error falling with density (no NaN), and an oracle at density 1 keeping every causal block."""
    out = tmp_path / "o.json"
    argv = ["oracle_structured.py", "--mode", "chunked", "--seq-len", "640", "--heads", "4", "--seed", "3", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert oracle.main() == 0
    res = json.loads(out.read_text())
    assert "--mode chunked" in res["command"] and "--densities 0.2,0.3," in res["command"] and "None" not in res["command"]
    assert res["device"].startswith("CPU")
    rows = res["rows"]
    names = [r["method"] for r in rows]
    assert names.count("oracle global") == names.count("oracle per head") == len(oracle.DENSITIES)
    for cfg in oracle.CONFIGS:
        assert cfg in names
    for cfg in oracle.SPLIT_CONFIGS:
        assert f"{cfg}: exact ranking, plan counts" in names and f"{cfg}: plan ranking, exact counts 0.9" in names
    errs = [r["rel_err"] for r in rows if r["method"] == "oracle global"]
    assert all(e == e for e in errs) and errs[0] >= errs[-1]
    full = oracle.oracle_masks(torch.zeros(2, 3, 3).masked_fill(~torch.ones(3, 3, dtype=torch.bool).tril(), -1.0), densities=(1.0,))
    assert all(m.sum() == 2 * 6 for m in full.values())


def test_subset_plot_and_bad_arguments(oracle, tmp_path, monkeypatch, capsys):
    """`--densities` / `--configs` select rows and `--plot` draws them (also from files, `--plot-only`); a bad value
    exits 2 naming it and the allowed ones."""
    out, png, png2 = tmp_path / "o.json", tmp_path / "o.png", tmp_path / "two.png"
    base = ["oracle_structured.py", "--mode", "chunked", "--seq-len", "384", "--heads", "4", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", base + ["--densities", "0.5", "--configs", "gamma=0.8", "--plot", str(png)])
    assert oracle.main() == 0
    names = [r["method"] for r in json.loads(out.read_text())["rows"]]
    assert names[:2] == ["oracle per head", "oracle global"] and "gamma=0.8" in names and "default" not in names
    monkeypatch.setattr(sys, "argv", ["oracle_structured.py", "--plot-only", f"{out},{out}", "--plot", str(png2)])
    assert oracle.main() == 0
    for p in (png, png2):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png2.stat().st_size > png.stat().st_size  # two panels
    for bad, words in ((["--densities", "0,0.5"], ["'0,0.5'", "(0, 1]"]), (["--configs", "gamma=0.7"], ["'gamma=0.7'", "default"])):
        monkeypatch.setattr(sys, "argv", base + bad)
        with pytest.raises(SystemExit) as e:
            oracle.main()
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err
    monkeypatch.setattr(sys, "argv", base + ["--mode", "whole", "--device", "cuda"])
    assert oracle.main() == 2
    assert "--mode=whole" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["oracle_structured.py", "--plot-only", str(tmp_path / "missing.json")])
    assert oracle.main() == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("{}")
    monkeypatch.setattr(sys, "argv", ["oracle_structured.py", "--plot-only", str(tmp_path / "other.json")])
    assert oracle.main() == 2
    assert "other.json" in capsys.readouterr().err
    monkeypatch.setattr(sys, "argv", ["oracle_structured.py", "--seq-len", "384"])
    assert oracle.main() == 2
    assert "--out: required" in capsys.readouterr().err
