"""The build's parity stage (engines.pipeline.stage_parity, engines.parity): ONNX Runtime (sparse custom op) vs the
PyTorch reference on the final hidden states at every position and on the logits (every position, or the last one
when all positions' logits would exceed the memory budget), tolerance PARITY_REL_TOL; a perturbed or NaN model
fails. Runs on the 2-layer tiny-llama export (about 10 s to export, a few seconds per parity run)."""

import json
import shutil
import types

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from engines import parity, pipeline
from engines.artifacts import Manifest
from engines.models import MODELS, get_model

# Between the two tiny-llama lengths (64 and 256 tokens, vocab 512): 3 x 64 x 512 x 4 fits, 3 x 256 x 512 x 4 not.
_SMALL_BUDGET = 1_000_000


@pytest.fixture(scope="module")
def tiny_export(tiny_build):
    """The plan of the session's tiny-llama build (its export is what these tests read and copy)."""
    return tiny_build[0]


def _copy_plan(plan, out, perturb=None):
    """A plan over a copy of the exported model; `perturb` = (operand, factor): the LM head's "hidden" input or
    "weight" operand multiplied by `factor` (a scalar or a [hidden] vector) inside the graph."""
    new = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", out=str(out)))
    shutil.copytree(plan.onnx_path.parent, new.onnx_path.parent)
    if perturb is not None:
        operand, factor = perturb
        proto = onnx.load(str(new.onnx_path))
        head = parity.find_lm_head(proto.graph)
        k = 0 if operand == "hidden" else 1
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(factor, np.float32), "test/factor"))
        mul = helper.make_node("Mul", [head.input[k], "test/factor"], ["test/perturbed"], name="test/perturb")
        proto.graph.node.insert(list(proto.graph.node).index(head), mul)
        head.input[k] = "test/perturbed"
        onnx.save(proto, str(new.onnx_path))
    return new


def _run(plan):
    manifest = Manifest.load(plan.out)
    try:
        pipeline.stage_parity(plan, manifest)
        error = None
    except RuntimeError as e:
        error = e
    return json.loads((plan.out / "parity.json").read_text()), Manifest.load(plan.out), error


def test_parity_compares_hidden_states_and_all_logits(tiny_export, tmp_path):
    plan = _copy_plan(tiny_export, tmp_path / "b")
    report, manifest, error = _run(plan)
    assert error is None and report["passed"] and manifest.stage("parity")["status"] == "built"
    assert [(r["tokens"], r["logits"]["positions"]) for r in report["rows"]] == [(64, "all"), (256, "all")]
    for r in report["rows"]:
        assert r["finite"] and r["hidden"]["finite"] and r["logits"]["finite"]
        assert 0 < r["hidden"]["rel_error"] <= pipeline.PARITY_REL_TOL and 0 < r["logits"]["rel_error"] <= pipeline.PARITY_REL_TOL
        assert r["rel_error"] == max(r["hidden"]["rel_error"], r["logits"]["rel_error"])
        assert 0 < r["peak_rss_gib"] <= report["peak_rss_gib"]
    assert report["rows"][1]["sparse_layers"] == 2 and report["note"] is None
    assert not [p for p in plan.onnx_path.parent.iterdir() if p.name.startswith(".")]  # temporary copy removed


def test_last_position_logits_past_the_budget(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "PARITY_LOGITS_BYTES", _SMALL_BUDGET)
    plan = _copy_plan(tiny_export, tmp_path / "b")
    report, manifest, error = _run(plan)
    assert error is None and report["passed"]
    assert [(r["tokens"], r["logits"]["positions"]) for r in report["rows"]] == [(64, "all"), (256, "last")]
    assert "at 256 tokens the logits are compared at the last position only" in report["note"]
    assert manifest.stage("parity")["inputs"]["logits_positions"] == ["all", "last"]
    assert report["rows"][1]["sparse_layers"] == 2 and 0 < report["rows"][1]["hidden"]["rel_error"] <= pipeline.PARITY_REL_TOL


def test_parity_session_outputs(tiny_export):
    """hidden_states at every position; logits_from 0 gives every position, -1 the last, equal to the full run's."""
    session = parity.parity_session(tiny_export.onnx_path)
    ids = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(3)).numpy()
    h_all, l_all = session.run([parity.HIDDEN_OUTPUT, "logits"], {"input_ids": ids, "logits_from": np.array([0], np.int64)})
    h_last, l_last = session.run([parity.HIDDEN_OUTPUT, "logits"], {"input_ids": ids, "logits_from": np.array([-1], np.int64)})
    assert h_all.shape == (2, 200, 256) and l_all.shape == (2, 200, 512) and l_last.shape == (2, 1, 512)
    np.testing.assert_array_equal(h_all, h_last)
    np.testing.assert_allclose(l_last[:, 0], l_all[:, -1], rtol=1e-6, atol=1e-6)
    model = pipeline.load_model(tiny_export, meta=False)
    ref_h, ref_l, densities = parity.reference(model, torch.from_numpy(ids), tiny_export.config, -1)
    assert densities and ref_l.shape == (2, 1, 512)
    assert parity.compare(h_last, ref_h)["rel_error"] <= pipeline.PARITY_REL_TOL
    assert parity.compare(l_last, ref_l)["rel_error"] <= pipeline.PARITY_REL_TOL


_NAN_AT_7 = np.where(np.arange(256) == 7, np.nan, 1.0)


@pytest.mark.parametrize(
    "name, perturb, failing",
    [
        # The final hidden states scaled by 1 % (so the logits too).
        ("hidden x1.01", ("hidden", 1.01), "hidden"),
        # The LM head weight scaled by 1 %: hidden states intact, the (last position's) logits off by 1e-2.
        ("head x1.01", ("weight", 1.01), "logits"),
        # One NaN feature of the final hidden states at every position.
        ("hidden NaN", ("hidden", _NAN_AT_7), "nan"),
    ],
)
def test_a_perturbed_model_fails_parity(tiny_export, tmp_path, monkeypatch, name, perturb, failing):
    monkeypatch.setattr(pipeline, "PARITY_LOGITS_BYTES", _SMALL_BUDGET)  # the sparse row compares the last position
    plan = _copy_plan(tiny_export, tmp_path / "b", perturb)
    report, manifest, error = _run(plan)
    assert error is not None and "parity check failed" in str(error), name
    assert not report["passed"] and manifest.stage("parity")["status"] == "failed"
    sparse = report["rows"][1]
    assert sparse["logits"]["positions"] == "last"
    if failing == "hidden":
        assert sparse["hidden"]["rel_error"] == pytest.approx(1e-2, rel=0.05) and sparse["finite"]
    elif failing == "logits":
        assert sparse["hidden"]["rel_error"] <= pipeline.PARITY_REL_TOL
        assert sparse["logits"]["rel_error"] == pytest.approx(1e-2, rel=0.05) and sparse["finite"]
    else:
        assert not sparse["finite"] and not sparse["hidden"]["finite"] and sparse["hidden"]["rel_error"] != sparse["hidden"]["rel_error"]


def test_compare_chunks_and_nan(monkeypatch):
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 70, generator=g)
    got = ref * (1 + 5e-4)
    whole = parity.compare(got, ref)
    assert whole["finite"] and whole["rel_error"] == pytest.approx(5e-4, rel=1e-3)  # fp32 rounding of got
    monkeypatch.setattr(parity, "_CHUNK_ELEMENTS", 100)  # one row per chunk
    assert parity.compare(got.numpy(), ref) == pytest.approx(whole)
    for bad_got, bad_ref in (
        (got, ref.clone().index_fill_(0, torch.tensor([5]), float("nan"))),
        (got.clone().index_fill_(0, torch.tensor([299]), float("nan")), ref),
        (got.clone().index_fill_(0, torch.tensor([0]), float("inf")), ref),
    ):
        r = parity.compare(bad_got, bad_ref)
        assert not r["finite"] and r["rel_error"] != r["rel_error"]
        row = {"finite": r["finite"], "hidden": r, "logits": whole}
        assert not pipeline.parity_passed([row])
    assert pipeline.parity_passed([{"finite": True, "hidden": whole, "logits": whole}])
    assert not pipeline.parity_passed([])
    with pytest.raises(ValueError, match="shape"):
        parity.compare(got[:, :3], ref)


def _graph(tail, *, head_constant=True):
    """input x [B, S, 4] -> MatMul(W1) -> h -> MatMul(Transpose(E)) -> `tail` ops -> logits [B, S, 6]."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((6, 4)).astype(np.float32), "E"),
        numpy_helper.from_array(np.array(3.0, np.float32), "cap"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="body"),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="head_w"),
        helper.make_node("MatMul", ["h", "Et" if head_constant else "h_t"], ["z0"], name="head"),
    ]
    if not head_constant:
        nodes.insert(2, helper.make_node("Transpose", ["h"], ["h_t"], perm=[0, 2, 1], name="dyn"))
    prev = "z0"
    for k, op in enumerate(tail):
        ins = [prev] if op == "Tanh" else [prev, "cap"]
        nodes.append(helper.make_node(op, ins, [f"z{k + 1}"], name=f"tail{k}"))
        prev = f"z{k + 1}"
    nodes.append(helper.make_node("Identity", [prev], ["logits"], name="out"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 6])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_lm_head_found_through_a_soft_capping_tail_and_sliced():
    import onnxruntime as ort

    model = _graph(["Div", "Tanh", "Mul"])  # Gemma-style final-logit soft-capping
    assert parity.find_lm_head(model.graph).name == "head"
    plain = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    parity.add_parity_outputs(model)
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((2, 5, 4)).astype(np.float32)
    (full,) = plain.run(["logits"], {"x": x})
    h, last = sess.run(["hidden_states", "logits"], {"x": x, "logits_from": np.array([-1], np.int64)})
    np.testing.assert_allclose(h, x @ numpy_helper.to_array(model.graph.initializer[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(last[:, 0], full[:, -1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="already has a tensor named 'hidden_states'"):
        parity.add_parity_outputs(model)


def test_no_lm_head_is_a_clear_error():
    with pytest.raises(ValueError, match="no LM head found"):
        parity.find_lm_head(_graph([], head_constant=False).graph)


@pytest.mark.parametrize("name", list(MODELS))
def test_parity_memory_is_bounded_for_every_model(name):
    """Every model gets a sparse-path parity row; the logits compared stay within the budget and the hidden states
    are bounded (gemma3-270m at 8448 tokens: last-position logits, 21.6 MB of hidden states per side; the 8B models
    at 33024 tokens, past their 32K dense crossover: 516 MiB of hidden states per side)."""
    spec = get_model(name)
    lengths, note = pipeline._parity_lengths(types.SimpleNamespace(spec=spec, config=spec.proxyattn))
    hidden = int(spec.hf_config["hidden_size"])
    sparse_len = spec.proxyattn.dense_below_tokens + 2 * spec.proxyattn.block_size
    if sparse_len <= spec.max_positions:
        assert [n for n, _ in lengths][-1] == sparse_len
    for n, positions in lengths:
        rows = n if positions == "all" else 1
        assert 3 * rows * spec.vocab_size * 4 <= pipeline.PARITY_LOGITS_BYTES
        assert 2 * n * hidden * 4 <= 1100 * 1024**2  # 8B models at 33024 tokens: 1032 MiB
    if name == "gemma3-270m":
        assert lengths == [(64, "all"), (8448, "last")] and "24.8 GiB" in note
    if name in ("tiny-llama", "smollm2-135m"):
        assert all(p == "all" for _, p in lengths) and note is None
