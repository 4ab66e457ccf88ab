"""The real `tritonserver` (from the nvidia-pytriton wheel) serving the generated repository on 127.0.0.1, CPU.

Builds tiny-llama through the pipeline's stage functions (export, ONNX Runtime model per profile, repository),
starts ONE server for the whole module with only the Python-backend model loaded (the tensorrt_plan models need
TensorRT's backend) plus a deliberately broken copy of it, and checks: served logits against PyTorch on both
profiles; concurrent requests of batch 1 and 2 on both sides of the profile boundary (128 tokens); that every
malformed request is answered with HTTP 400 and a message naming the bad value, whether Triton's core refuses it
(datatype, rank, batch size) or the model does (token ids, lengths, empty input); that a failure inside ONNX
Runtime is answered with HTTP 500 and the reason; and that the server keeps serving. Every request is bounded by
a client timeout; the server and its whole process group are gone at the end.

The model's error mapping is also checked without a server, against a stand-in for `triton_python_backend_utils`,
for the paths Triton's core never lets through (a non-INT64 tensor, a missing input).
"""

import http.client
import importlib.util
import json
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.density import measure_density
from engines.triton_repo import PYTHON_MODEL_SOURCE, config_text, parse_config
from engines.tritonserver import local_server
from tests.helpers import assert_close, live_group_members

httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama_onnxruntime"
BROKEN = "tiny-llama_broken"  # declares vocab 1024 over the real 512: ids 512..1023 fail inside ONNX Runtime
VOCAB, PROFILE_EDGE = 512, 128  # tiny-llama's profiles: up-to-128 (1..128), 128-1k (129..1024)


def _served_repository(repo: Path, dest: Path) -> Path:
    """A repository with the built Python-backend model (hard links) and BROKEN, the same model declaring vocab 1024."""
    shutil.copytree(repo / MODEL, dest / MODEL, copy_function=os.link)
    shutil.copytree(repo / MODEL, dest / BROKEN, copy_function=os.link, ignore=shutil.ignore_patterns("config.pbtxt"))
    cfg = parse_config((repo / MODEL / "config.pbtxt").read_text())
    cfg.name = BROKEN
    cfg.parameters["vocab_size"].string_value = str(2 * VOCAB)
    (dest / BROKEN / "config.pbtxt").write_text(config_text(cfg))
    return dest


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    _, repo, _ = tiny_build
    served = _served_repository(repo, tmp_path_factory.mktemp("served"))
    with local_server(served, models=[MODEL, BROKEN], pythonpath=ROOT) as handle:
        yield handle
    assert handle.process.poll() is not None, "tritonserver still runs after local_server"
    assert live_group_members(handle.pid) == [], "processes of tritonserver's group outlived it"


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http_url, connection_timeout=10.0, network_timeout=120.0, concurrency=4)
    yield c
    c.close()


def _request(ids, dtype="INT64"):
    inp = httpclient.InferInput("input_ids", list(ids.shape), dtype)
    inp.set_data_from_numpy(ids)
    return [inp], [httpclient.InferRequestedOutput("logits", binary_data=True)]


def _infer(client, ids, dtype="INT64", model=MODEL):
    inputs, outputs = _request(ids, dtype)
    return torch.from_numpy(client.infer(model, inputs, outputs=outputs).as_numpy("logits").copy())


def _post_json(server, model, shape, datatype, data):
    """POST a JSON inference request; (HTTP status, error message or '')."""
    host, port = server.http_url.rsplit(":", 1)
    body = json.dumps({"inputs": [{"name": "input_ids", "shape": shape, "datatype": datatype, "data": data}]})
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        payload = json.loads(response.read() or b"{}")
    finally:
        conn.close()
    return response.status, payload.get("error", "")


def test_repository_holds_the_engines_and_the_python_model(tiny_build):
    _, repo, _ = tiny_build
    assert sorted(p.name for p in repo.iterdir()) == ["tiny-llama_128-1k", "tiny-llama_onnxruntime", "tiny-llama_up-to-128"]


def test_server_serves_logits_like_pytorch(tiny_build, client):
    plan, _, model = tiny_build
    g = torch.Generator().manual_seed(7)
    short = torch.randint(0, VOCAB, (2, 50), generator=g)  # dense profile, batch 2
    long = torch.randint(0, VOCAB, (1, 300), generator=g)  # sparse profile (dense_below_tokens = 128)
    for ids in (short, long):
        served = _infer(client, ids.numpy())
        expected, densities = measure_density(model, ids, plan.config)
        assert_close(served, expected, "fp32", what=f"served logits S={ids.shape[1]}")
    assert densities, "the 300-token prompt must take the sparse path"


def test_concurrent_requests_on_both_sides_of_the_profile_boundary(tiny_build, client):
    plan, _, model = tiny_build
    g = torch.Generator().manual_seed(11)
    shapes = [(1, 127), (2, 128), (2, 64), (1, 129), (2, 130), (1, 300)]  # batch 1 and 2 in each profile
    assert {(b, s <= PROFILE_EDGE) for b, s in shapes} == {(1, True), (2, True), (1, False), (2, False)}
    prompts = [torch.randint(0, VOCAB, shape, generator=g) for shape in shapes]
    requests = [_request(p.numpy()) for p in prompts]
    pending = [client.async_infer(MODEL, inputs, outputs=outputs) for inputs, outputs in requests]  # all in flight
    results = [torch.from_numpy(r.get_result(timeout=120).as_numpy("logits").copy()) for r in pending]
    for p, r in zip(prompts, results):
        expected, _ = measure_density(model, p, plan.config)
        assert_close(r, expected, "fp32", what=f"concurrent B={p.shape[0]} S={p.shape[1]}")


# (shape, datatype, data, fragments the error must contain); who refuses it is noted per case.
MALFORMED = {
    "token id above the vocabulary": ([1, 3], "INT64", [1, 2, 999], ["999", "[0, 512)"]),  # model
    "negative token id": ([1, 3], "INT64", [1, -2, 3], ["-2", "[0, 512)"]),  # model
    "longer than every profile": ([1, 1100], "INT64", [0] * 1100, ["sequence length 1100", "128-1k: 129..1024"]),  # model
    "zero tokens": ([1, 0], "INT64", [], ["[1, 0]"]),  # model
    "zero batch": ([0, 3], "INT64", [], ["input_ids", "byte size"]),  # core: "Expected 24, got 0"
    "FP32 instead of INT64": ([1, 3], "FP32", [1.0, 2.0, 3.0], ["'FP32'", "'INT64'"]),  # core
    "INT32 instead of INT64": ([1, 3], "INT32", [1, 2, 3], ["'INT32'", "'INT64'"]),  # core
    "batch above max_batch_size": ([5, 2], "INT64", [0] * 10, ["batch-size must be <= 4"]),  # core
    "rank 1": ([3], "INT64", [1, 2, 3], ["got [3]"]),  # core
    "rank 3": ([1, 1, 3], "INT64", [1, 2, 3], ["got [1,1,3]"]),  # core
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_answered_400_naming_the_bad_value(server, case):
    shape, datatype, data, fragments = MALFORMED[case]
    status, message = _post_json(server, MODEL, shape, datatype, data)
    assert status == 400, f"{case}: HTTP {status}: {message}"
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in {message!r}"


def test_client_sees_status_400_for_a_model_refusal(client):
    with pytest.raises(InferenceServerException, match=r"token ids must lie in \[0, 512\), got values in \[1, 999\]") as err:
        _infer(client, np.array([[1, 2, 999]], dtype=np.int64))
    assert err.value.status() == "400"


def test_onnx_runtime_failure_is_answered_500_with_the_reason(server):
    status, message = _post_json(server, BROKEN, [1, 3], "INT64", [1, 2, 600])
    assert status == 500, f"HTTP {status}: {message}"
    assert message.startswith("inference failed: InvalidArgument: [ONNXRuntimeError]"), message
    assert "idx=600" in message


def test_server_keeps_serving_after_errors(tiny_build, server, client):
    plan, _, model = tiny_build
    assert _post_json(server, MODEL, [1, 3], "INT64", [1, 2, 999])[0] == 400
    assert _post_json(server, BROKEN, [1, 3], "INT64", [1, 2, 600])[0] == 500
    assert client.is_model_ready(MODEL) and client.is_model_ready(BROKEN)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    expected, _ = measure_density(model, ids, plan.config)
    assert_close(_infer(client, ids.numpy()), expected, "fp32", what="after errors")


# -- the model's error mapping without a server -------------------------------------------------------------------


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code):
        self.message, self.code = message, code


class _FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.output_tensors, self.error = output_tensors, error


class _FakeTensor:
    def __init__(self, value):
        self.value = value

    def to_dlpack(self):
        return torch.utils.dlpack.to_dlpack(self.value)

    @staticmethod
    def from_dlpack(name, capsule):
        return (name, torch.utils.dlpack.from_dlpack(capsule))


class _FakeSession:
    def __init__(self, fail):
        self.fail = fail

    def run(self, outputs, feeds):
        if self.fail:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom")
        b, s = feeds["input_ids"].shape
        return [np.zeros((b, s, VOCAB), dtype=np.float32)]


@pytest.fixture
def model_module(monkeypatch):
    """engines/triton_python_model.py loaded against a stand-in for the Python backend's utilities."""
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TritonError, fake.InferenceResponse, fake.Tensor = _FakeError, _FakeResponse, _FakeTensor
    fake.get_input_tensor_by_name = lambda request, name: request.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("proxyattn_served_model_under_test", PYTHON_MODEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_model(module, fail=False):
    model = module.TritonPythonModel()
    model.vocab_size = VOCAB
    model.profiles = [module.ServedProfile(1, PROFILE_EDGE, "up-to-128", _FakeSession(fail), ["input_ids", "position_ids"])]
    return model


@pytest.mark.parametrize("request_, code, fragment", [
    ({"input_ids": _FakeTensor(torch.ones(1, 3, dtype=torch.int32))}, "INVALID_ARG", "must be INT64, got torch.int32"),
    ({}, "INVALID_ARG", "no input 'input_ids'"),
    ({"input_ids": _FakeTensor(torch.ones(3, dtype=torch.int64))}, "INVALID_ARG", "got shape [3]"),
    ({"input_ids": _FakeTensor(torch.ones(0, 3, dtype=torch.int64))}, "INVALID_ARG", "got shape [0, 3]"),
    ({"input_ids": _FakeTensor(torch.ones(1, 200, dtype=torch.int64))}, "INVALID_ARG", "sequence length 200"),
], ids=["int32", "missing", "rank 1", "zero batch", "no profile"])
def test_model_answers_client_errors_with_invalid_arg(model_module, request_, code, fragment):
    (response,) = _fake_model(model_module).execute([request_])
    assert response.error.code == code and fragment in response.error.message, response.error.message


def test_model_answers_runtime_failures_with_internal(model_module):
    ok = {"input_ids": _FakeTensor(torch.ones(2, 5, dtype=torch.int64))}
    (response,) = _fake_model(model_module, fail=True).execute([ok])
    assert response.error.code == "INTERNAL"
    assert response.error.message == "inference failed: RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom"
    (response,) = _fake_model(model_module).execute([ok])
    assert response.error is None and response.output_tensors[0][0] == "logits"
    assert tuple(response.output_tensors[0][1].shape) == (2, 5, VOCAB)
