"""`--weights DIR`: checkpoint checks, and the streamed export (meta-device model, weights read lazily from the
checkpoint's safetensors into the external data file) against the same checkpoint run in PyTorch."""

import dataclasses
import json

import pytest
import torch

from engines import pipeline
from engines.artifacts import Manifest
from engines.density import measure_density
from engines.models import get_model
from tests.helpers import assert_close


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    import transformers

    d = tmp_path_factory.mktemp("ckpt")
    cfg = transformers.AutoConfig.for_model(**dict(get_model("tiny-llama").hf_config))
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(d, safe_serialization=True)
    return d


def test_checkpoint_of_another_architecture_is_refused(tiny_checkpoint, tmp_path, capsys):
    import build

    out = tmp_path / "o"
    assert build.main(["--model", "llama3-8b", "--weights", str(tiny_checkpoint), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "the checkpoint's hidden_size=256 differs from llama3-8b's hidden_size=4096" in err and not out.exists()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert build.main(["--model", "llama3-8b", "--weights", str(bad), "--out", str(out)]) == 2
    assert "no *.safetensors weight files" in capsys.readouterr().err and not out.exists()


def test_streamed_checkpoint_export_matches_pytorch(tiny_checkpoint, tmp_path):
    import transformers
    from plugins.onnxruntime import make_session

    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", out=str(tmp_path / "b")))
    # Take the meta-device path an 8B checkpoint takes, on a tiny checkpoint.
    plan = dataclasses.replace(plan, weights=f"checkpoint:{tiny_checkpoint}", ort_fits=False)
    path = pipeline.stage_export(plan, Manifest.load(plan.out))
    assert (path.parent / (path.name + ".data")).is_file()  # weights streamed to external data
    # One file with the streamed weights inlined (make_session's symlinked external data is refused by ONNX Runtime
    # 1.32's path validation; that is plugins.onnxruntime's business, not the export's).
    import onnx

    single = tmp_path / "single.onnx"
    onnx.save(onnx.load(str(path)), str(single))
    ids = torch.randint(0, 512, (2, 150), generator=torch.Generator().manual_seed(1))
    got = torch.from_numpy(make_session(single, sparse=True).run(None, {"input_ids": ids.numpy()})[0])
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()
    expected, densities = measure_density(model, ids, plan.config)
    assert densities  # 150 tokens > dense_below_tokens: the sparse path ran
    assert_close(got, expected, "fp32", what="streamed checkpoint export")
