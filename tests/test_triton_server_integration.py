"""The real `tritonserver` (from the nvidia-pytriton wheel) serving the generated repository on 127.0.0.1, CPU.

Builds tiny-llama through the pipeline's stage functions (export, ONNX Runtime model per profile, repository),
starts the server with only the Python-backend model loaded (the tensorrt_plan models need TensorRT's backend),
and checks served logits against PyTorch, concurrent requests, and malformed requests (a clear error each, and the
server keeps serving). Every request is bounded by a client timeout; the server is stopped at the end.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import assert_close

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from engines import pipeline  # noqa: E402
from engines.artifacts import Manifest  # noqa: E402
from engines.density import measure_density  # noqa: E402
from engines.tritonserver import local_server  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", out=str(out), max_batch=4))
    assert plan.backend == "onnxruntime" and plan.precision == "fp32"
    manifest = Manifest.load(plan.out)
    pipeline.stage_export(plan, manifest)
    pipeline.stage_ort_models(plan, manifest)
    repo = pipeline.stage_repository(plan, manifest)
    model = pipeline.load_model(plan, meta=False)
    return plan, repo, model


def _request(ids, dtype="INT64"):
    inp = httpclient.InferInput("input_ids", list(ids.shape), dtype)
    inp.set_data_from_numpy(ids)
    return [inp], [httpclient.InferRequestedOutput("logits", binary_data=True)]


def _infer(client, ids, dtype="INT64", model="tiny-llama_onnxruntime"):
    inputs, outputs = _request(ids, dtype)
    return torch.from_numpy(client.infer(model, inputs, outputs=outputs).as_numpy("logits").copy())


def test_server_serves_logits_like_pytorch(built):
    plan, repo, model = built
    assert sorted(p.name for p in repo.iterdir()) == ["tiny-llama_128-1k", "tiny-llama_onnxruntime", "tiny-llama_up-to-128"]
    g = torch.Generator().manual_seed(7)
    short = torch.randint(0, 512, (2, 50), generator=g)  # dense profile, batch 2
    long = torch.randint(0, 512, (1, 300), generator=g)  # sparse profile (dense_below_tokens = 128)
    with local_server(repo, models=["tiny-llama_onnxruntime"], pythonpath=ROOT) as server:
        client = httpclient.InferenceServerClient(server.http_url, connection_timeout=10.0, network_timeout=120.0, concurrency=4)
        try:
            for ids in (short, long):
                served = _infer(client, ids.numpy())
                expected, densities = measure_density(model, ids, plan.config)
                assert_close(served, expected, "fp32", what=f"served logits S={ids.shape[1]}")
            assert densities, "the 300-token prompt must take the sparse path"

            # Concurrent requests of different lengths and batches (in flight together), each checked.
            prompts = [torch.randint(0, 512, (1 + i % 2, 20 + 37 * i), generator=g) for i in range(6)]
            requests = [_request(p.numpy()) for p in prompts]
            pending = [client.async_infer("tiny-llama_onnxruntime", inputs, outputs=outputs) for inputs, outputs in requests]
            results = [torch.from_numpy(r.get_result(timeout=120).as_numpy("logits").copy()) for r in pending]
            for p, r in zip(prompts, results):
                expected, _ = measure_density(model, p, plan.config)
                assert_close(r, expected, "fp32", what=f"concurrent S={p.shape[1]}")

            # Malformed requests: one clear error each.
            with pytest.raises(InferenceServerException, match=r"token ids must lie in \[0, 512\)"):
                _infer(client, np.array([[1, 2, 999]], dtype=np.int64))
            with pytest.raises(InferenceServerException, match="sequence length 1100 is outside every profile"):
                _infer(client, np.zeros((1, 1100), dtype=np.int64))
            with pytest.raises(InferenceServerException, match="(?i)data-type|datatype|INT64"):
                _infer(client, np.zeros((1, 5), dtype=np.float32), dtype="FP32")
            with pytest.raises(InferenceServerException, match="(?i)batch"):
                _infer(client, np.zeros((5, 5), dtype=np.int64))  # max_batch_size is 4

            # ... and the server keeps serving.
            assert client.is_model_ready("tiny-llama_onnxruntime")
            again = _infer(client, short.numpy())
            expected, _ = measure_density(model, short, plan.config)
            assert_close(again, expected, "fp32", what="after errors")
        finally:
            client.close()
    assert server.process.poll() is not None  # stopped
