"""`python build.py`: bad input gives one clear message, a non-zero exit and no output; a tiny-llama build writes
the ONNX model, parity report, plugin PTX, ONNX Runtime models, model repository and manifest; unchanged stages are
skipped, changed inputs rebuild. Runs build.py in subprocesses (as a user does, and outside Triton's interpreter)."""

import json

import pytest

from engines.artifacts import file_sha256
from tests.helpers import run_build


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "gpt-17"],
            "unknown model 'gpt-17'; known models: llama3-8b, llama3.1-8b, qwen2.5-7b, mistral-7b, smollm2-135m, gemma3-270m, tiny-llama",
        ),
        (["--model", "llama3-8b"], "llama3-8b needs weights: --weights DIR"),
        (["--model", "mistral-7b", "--weights", "/nonexistent/ckpt"], "no transformers checkpoint there (config.json missing)"),
        (["--model", "tiny-llama", "--profiles", "1:64:4096"], "MAX=4096 exceeds its context of 2048 tokens"),
        (["--model", "tiny-llama", "--profiles", "9:3:20"], "impossible"),
        (["--model", "tiny-llama", "--profiles", "huge"], "has no profile 'huge'"),
        (["--model", "tiny-llama", "--backend", "tensorrt"], "TensorRT is not installed here"),
        (["--model", "tiny-llama", "--gamma", "0"], "gamma=0.0 must lie in (0, 1]"),
        (["--model", "tiny-llama", "--gamma", "0.123456789"], "does not survive the float32 attribute round trip"),
        (["--model", "tiny-llama", "--precision", "bf16", "--backend", "onnxruntime"], "CPU kernels need fp32"),
    ],
)
def test_bad_input_is_one_clear_message_and_writes_nothing(tmp_path, capsys, args, message):
    import build

    out = tmp_path / "out"
    code = build.main([*args, "--out", str(out)])
    captured = capsys.readouterr()
    assert code != 0
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("build.py: error: ") and message in err[0], captured.err
    assert not out.exists() and captured.out == ""


def test_bad_input_exit_code_from_the_command_line(tmp_path):
    res = run_build("--model", "gpt-17", "--out", str(tmp_path / "o"), timeout=120)
    assert res.returncode == 2 and "unknown model 'gpt-17'" in res.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_tiny_build_end_to_end_and_skips(tmp_path):
    out = tmp_path / "tiny"
    res = run_build("--model", "tiny-llama", "--profiles", "up-to-128", "128-1k", "--out", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["name"] == "tiny-llama" and m["backend"] == "onnxruntime" and m["precision"] == "fp32"
    assert m["tools"]["torch"].startswith("2.13.0") and m["tools"]["tensorrt"] is None
    assert [p["name"] for p in m["profiles"]] == ["up-to-128", "128-1k"]
    status = {k: v["status"] for k, v in m["stages"].items()}
    assert status == {
        "export": "built",
        "parity": "built",
        "plugin_kernels": "built",
        "engines": "not run",
        "ort_models": "built",
        "repository": "built",
    }
    assert "TensorRT is not installed" in m["stages"]["engines"]["info"]["reason"]
    for stage in m["stages"].values():  # every recorded artifact is on disk with its hash
        for rel, digest in stage["artifacts"].items():
            assert file_sha256(out / rel) == digest, rel
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and [r["tokens"] for r in parity["rows"]] == [64, 256]
    assert parity["rows"][1]["sparse_layers"] == 2 and 0 < parity["rows"][1]["density_mean"] <= 1
    repo = out / "model_repository"
    assert sorted(p.name for p in repo.iterdir()) == [
        "tiny-llama_128-1k",
        "tiny-llama_dense",
        "tiny-llama_onnxruntime",
        "tiny-llama_onnxruntime_stream",
        "tiny-llama_proxyattn",
        "tiny-llama_up-to-128",
    ]
    assert (repo / "tiny-llama_onnxruntime" / "1" / "model.py").is_file()
    assert not (repo / "tiny-llama_up-to-128" / "1" / "model.plan").exists()  # no TensorRT: config only
    kernels = json.loads((out / "plugins" / "kernels.json").read_text())
    assert {r["arch"] for r in kernels} == {80, 89, 90}
    for word in ("export", "parity", "density", "not run", "manifest"):
        assert word in res.stdout

    again = run_build("--model", "tiny-llama", "--profiles", "up-to-128", "128-1k", "--out", str(out))
    assert again.returncode == 0, again.stderr[-3000:]
    m2 = json.loads((out / "manifest.json").read_text())
    # Skipping is keyed on the inputs, which include a hash of the project's code: in a checkout where someone edits
    # proxyattn/ between the two runs the stages correctly rebuild; with the code unchanged (CI) they must skip.
    if m2["stages"]["export"]["inputs"]["code"] == m["stages"]["export"]["inputs"]["code"]:
        assert "skipped (unchanged)" in again.stdout
        for stage in ("export", "parity", "ort_models", "repository"):
            assert m2["stages"][stage] == m["stages"][stage], stage
    assert (
        m2["stages"]["plugin_kernels"]["inputs_hash"] == m["stages"]["plugin_kernels"]["inputs_hash"]
        or m2["stages"]["plugin_kernels"]["inputs"]["source"] != m["stages"]["plugin_kernels"]["inputs"]["source"]
    )

    # A new gamma changes the exported node attributes: export, parity, ORT models and repository rebuild; the
    # plugin kernels do not depend on gamma and stay.
    changed = run_build("--model", "tiny-llama", "--profiles", "up-to-128", "128-1k", "--out", str(out), "--gamma", "0.9")
    assert changed.returncode == 0, changed.stderr[-3000:]
    m3 = json.loads((out / "manifest.json").read_text())
    assert m3["stages"]["export"]["inputs_hash"] != m["stages"]["export"]["inputs_hash"]
    assert m3["config"]["pa_gamma"] == pytest.approx(0.9)
    assert (
        m3["stages"]["plugin_kernels"] == m2["stages"]["plugin_kernels"]
        or m3["stages"]["plugin_kernels"]["inputs"]["source"] != m2["stages"]["plugin_kernels"]["inputs"]["source"]
    )
    assert m3["stages"]["ort_models"]["artifacts"] != m["stages"]["ort_models"]["artifacts"]


def test_backend_resolution_with_and_without_tensorrt(monkeypatch):
    from engines import pipeline

    monkeypatch.setattr(pipeline, "tensorrt_available", lambda: False)
    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama"))
    assert (plan.backend, plan.precision, plan.ort_fits) == ("onnxruntime", "fp32", True)
    big = pipeline.resolve(pipeline.BuildRequest(model="llama3.1-8b", random_weights=True))
    assert (big.backend, big.precision, big.ort_fits) == ("onnxruntime", "bf16", False) and "does not fit" in big.ort_reason
    monkeypatch.setattr(pipeline, "tensorrt_available", lambda: True)
    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama"))
    assert (plan.backend, plan.precision) == ("tensorrt", "bf16")
    with pytest.raises(ValueError, match="plugin kernels take fp16 or bf16"):
        pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", precision="fp32"))
    with pytest.raises(ValueError, match="--estimator head_max with TensorRT: the plugin graph implements proxy only"):
        pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", estimator="head_max"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget-rule", "fastest"], "'fastest' is not supported; allowed: mass (0), recall (1), row_recall (2), block_recall (3)"),
        (["--estimator", "7"], "'7' is not supported; allowed: proxy (0), head_max (1), block_mean (2)"),
    ],
)
def test_bad_budget_rule_or_estimator_flag_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    import build

    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        build.main(["--model", "tiny-llama", *args, "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0] and not out.exists()


def test_budget_rule_and_estimator_flags_take_names_and_numbers():
    import build
    from engines import pipeline
    from proxyattn.config import BudgetRule, Estimator

    args = build._parser().parse_args(["--model", "tiny-llama", "--budget-rule", "row_recall", "--estimator", "1"])
    assert (args.budget_rule, args.estimator) == (BudgetRule.ROW_RECALL, Estimator.HEAD_MAX)
    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", budget_rule=args.budget_rule, backend="onnxruntime"))
    assert plan.config.budget_rule is BudgetRule.ROW_RECALL and plan.config.estimator is Estimator.PROXY
    assert pipeline.resolve(pipeline.BuildRequest(model="tiny-llama")).config.budget_rule is BudgetRule.BLOCK_RECALL
