"""The real `tritonserver` (from the nvidia-pytriton wheel) serving the generated repository on 127.0.0.1, CPU.

Builds tiny-llama through the pipeline's stage functions (export, ONNX Runtime model per profile, repository),
starts ONE server for the whole module (backend environment with numpy 1.26.4: `engines.tritonserver.backend_env`)
with the Python-backend models loaded (the tensorrt_plan models need TensorRT's backend): the ONNX Runtime model,
its decoupled twin, the transformers models (ProxyAttn and dense prefill) switched to KIND_CPU, and a deliberately
broken copy of the ONNX Runtime model. It checks the token-id interface: last-position logits (and the full
logits on request) against PyTorch on both profiles; concurrent requests of batch 1 and 2 on both sides of the
profile boundary (128 tokens); that every malformed request is answered with HTTP 400 and a message naming the bad
value, whether Triton's core refuses it (datatype, rank) or the model does (token ids, lengths, empty input, batch);
that a failure inside ONNX Runtime is answered with HTTP 500 and the reason. And the text interface through
Triton's generate endpoints: greedy text equal on every model and to PyTorch's greedy decoding, a prompt past
the sparse threshold served by the ProxyAttn model as in-process, streaming (one event per token), stop strings,
HTTP 400 for bad generate requests (empty text, too long, wrong parameter types), and a client that disconnects
mid-stream: its generation stops and the server answers the next request. Every request is bounded by a client
timeout; the server and its whole process group are gone at the end.

The model's error mapping is also checked without a server, against a stand-in for `triton_python_backend_utils`,
for the paths Triton's core never lets through (a non-INT64 tensor, a missing input).
"""

import http.client
import importlib.util
import json
import os
import re
import shutil
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from engines import serving
from engines.density import measure_density
from engines.models import get_model
from engines.serving import GenerationParams
from engines.triton_repo import PYTHON_MODEL_SOURCE, config_text, parse_config
from engines.tritonserver import backend_env, local_server
from tests.helpers import assert_close, live_group_members

httpclient = pytest.importorskip("tritonclient.http")
InferenceServerException = pytest.importorskip("tritonclient.utils").InferenceServerException

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-llama_onnxruntime"
STREAM = "tiny-llama_onnxruntime_stream"  # decoupled
SPARSE, DENSE = "tiny-llama_proxyattn", "tiny-llama_dense"  # transformers, decoupled; KIND_GPU in the build, CPU here
BROKEN = "tiny-llama_broken"  # declares vocab 1024 over the real 512: ids 512..1023 fail inside ONNX Runtime
VOCAB, PROFILE_EDGE = 512, 128  # tiny-llama's profiles: up-to-128 (1..128), 128-1k (129..1024)
TEXT_MODELS = (MODEL, STREAM, SPARSE, DENSE)


def _copy(repo: Path, dest: Path, name: str, new_name: str | None = None, **changes) -> None:
    """Model `name` of `repo` into `dest` (files hard-linked, config rewritten with `changes`)."""
    new_name = new_name or name
    shutil.copytree(repo / name, dest / new_name, copy_function=os.link, ignore=shutil.ignore_patterns("config.pbtxt"))
    cfg = parse_config((repo / name / "config.pbtxt").read_text())
    cfg.name = new_name
    if changes.get("cpu"):
        cfg.instance_group[0].kind = cfg.instance_group[0].KIND_CPU
    for key, value in changes.get("parameters", {}).items():
        cfg.parameters[key].string_value = value
    (dest / new_name / "config.pbtxt").write_text(config_text(cfg))


def _served_repository(repo: Path, dest: Path) -> Path:
    """The build's Python-backend models (transformers ones on KIND_CPU) and BROKEN, the ONNX Runtime model
    declaring vocab 1024."""
    for name in (MODEL, STREAM):
        _copy(repo, dest, name)
    for name in (SPARSE, DENSE):
        _copy(repo, dest, name, cpu=True)
    _copy(repo, dest, MODEL, BROKEN, parameters={"vocab_size": str(2 * VOCAB)})
    return dest


@pytest.fixture(scope="module")
def server(tiny_build, tmp_path_factory):
    _, repo, _ = tiny_build
    served = _served_repository(repo, tmp_path_factory.mktemp("served"))
    with local_server(served, models=[*TEXT_MODELS, BROKEN], pythonpath=ROOT, env_dir=backend_env()) as handle:
        yield handle
    assert handle.process.poll() is not None, "tritonserver still runs after local_server"
    assert live_group_members(handle.pid) == [], "processes of tritonserver's group outlived it"


@pytest.fixture(scope="module")
def client(server):
    c = httpclient.InferenceServerClient(server.http_url, connection_timeout=10.0, network_timeout=120.0, concurrency=4)
    yield c
    c.close()


def _request(ids, dtype="INT64", output="last_logits"):
    inp = httpclient.InferInput("input_ids", list(ids.shape), dtype)
    inp.set_data_from_numpy(ids)
    return [inp], [httpclient.InferRequestedOutput(output, binary_data=True)]


def _infer(client, ids, dtype="INT64", model=MODEL, full=False):
    """last_logits [B, vocab] of `ids`, or with `full` the logits [B, S, vocab] (parameter full_logits)."""
    output = "logits" if full else "last_logits"
    inputs, outputs = _request(ids, dtype, output)
    result = client.infer(model, inputs, outputs=outputs, parameters={"full_logits": True} if full else None)
    return torch.from_numpy(result.as_numpy(output).copy())


def _post(server, path, body, timeout=120):
    """POST JSON `body` to `path`; (HTTP status, parsed body; for SSE answers the list of events)."""
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read().decode()
    finally:
        conn.close()
    if path.endswith("generate_stream") and raw.startswith("data: "):
        return response.status, [json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")]
    if path.endswith("generate_stream"):  # refused by Triton's HTTP front end before any event: a plain JSON body
        return response.status, [json.loads(raw or "{}")]
    return response.status, json.loads(raw or "{}")


def _post_json(server, model, shape, datatype, data, parameters=None):
    """POST a JSON inference request with `input_ids`; (HTTP status, error message or '')."""
    body = {"inputs": [{"name": "input_ids", "shape": shape, "datatype": datatype, "data": data}]}
    if parameters:
        body["parameters"] = parameters
    status, payload = _post(server, f"/v2/models/{model}/infer", body)
    return status, payload.get("error", "")


def _generate(server, model, text, **params):
    """POST /generate: (HTTP status, response object)."""
    return _post(server, f"/v2/models/{model}/generate", {"text_input": text, "parameters": params})


def test_repository_holds_the_engines_and_the_python_models(tiny_build):
    _, repo, _ = tiny_build
    assert sorted(p.name for p in repo.iterdir()) == ["tiny-llama_128-1k", DENSE, MODEL, STREAM, SPARSE, "tiny-llama_up-to-128"]
    for name in TEXT_MODELS:
        assert (repo / name / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert "KIND_GPU" in (repo / SPARSE / "config.pbtxt").read_text()


def test_server_serves_logits_like_pytorch(tiny_build, client):
    plan, _, model = tiny_build
    g = torch.Generator().manual_seed(7)
    short = torch.randint(0, VOCAB, (2, 50), generator=g)  # dense profile, batch 2
    long = torch.randint(0, VOCAB, (1, 300), generator=g)  # sparse profile (dense_below_tokens = 128)
    for ids in (short, long):
        expected, densities = measure_density(model, ids, plan.config)
        assert_close(_infer(client, ids.numpy()), expected[:, -1], "fp32", what=f"served last logits S={ids.shape[1]}")
        assert_close(_infer(client, ids.numpy(), full=True), expected, "fp32", what=f"served full logits S={ids.shape[1]}")
    assert densities, "the 300-token prompt must take the sparse path"


def test_full_logits_only_when_asked(server, client):
    ids = np.zeros((1, 5), dtype=np.int64)
    result = client.infer(MODEL, _request(ids)[0])  # no outputs named: every output Triton knows of is "requested"
    names = {o["name"] for o in result.get_response()["outputs"]}
    assert names == {"last_logits"}, names
    with pytest.raises(InferenceServerException, match="only with the request parameter full_logits: true") as err:
        inputs, outputs = _request(ids, output="logits")
        client.infer(MODEL, inputs, outputs=outputs)
    assert err.value.status() == "400"


def test_concurrent_requests_on_both_sides_of_the_profile_boundary(tiny_build, client):
    plan, _, model = tiny_build
    g = torch.Generator().manual_seed(11)
    shapes = [(1, 127), (2, 128), (2, 64), (1, 129), (2, 130), (1, 300)]  # batch 1 and 2 in each profile
    assert {(b, s <= PROFILE_EDGE) for b, s in shapes} == {(1, True), (2, True), (1, False), (2, False)}
    prompts = [torch.randint(0, VOCAB, shape, generator=g) for shape in shapes]
    requests = [_request(p.numpy()) for p in prompts]
    pending = [client.async_infer(MODEL, inputs, outputs=outputs) for inputs, outputs in requests]  # all in flight
    results = [torch.from_numpy(r.get_result(timeout=120).as_numpy("last_logits").copy()) for r in pending]
    for p, r in zip(prompts, results):
        expected, _ = measure_density(model, p, plan.config)
        assert_close(r, expected[:, -1], "fp32", what=f"concurrent B={p.shape[0]} S={p.shape[1]}")


# (shape, datatype, data, fragments the error must contain); who refuses it is noted per case.
MALFORMED = {
    "token id above the vocabulary": ([1, 3], "INT64", [1, 2, 999], ["999", "[0, 512)"]),  # model
    "negative token id": ([1, 3], "INT64", [1, -2, 3], ["-2", "[0, 512)"]),  # model
    "longer than every profile": ([1, 1100], "INT64", [0] * 1100, ["sequence length 1100", "128-1k: 129..1024"]),  # model
    "zero tokens": ([1, 0], "INT64", [], ["[1, 0]"]),  # model
    "zero batch": ([0, 3], "INT64", [], ["[0, 3]"]),  # model
    "FP32 instead of INT64": ([1, 3], "FP32", [1.0, 2.0, 3.0], ["'FP32'", "'INT64'"]),  # core
    "INT32 instead of INT64": ([1, 3], "INT32", [1, 2, 3], ["'INT32'", "'INT64'"]),  # core
    "batch above max_batch": ([5, 2], "INT64", [0] * 10, ["batch of 5 sequences exceeds this model's max_batch 4"]),  # model
    "rank 1": ([3], "INT64", [1, 2, 3], ["got [3]"]),  # core
    "rank 3": ([1, 1, 3], "INT64", [1, 2, 3], ["got [1,1,3]"]),  # core
    "full_logits not a bool": ([1, 3], "INT64", [1, 2, 3], ["parameter 'full_logits' must be true or false, got int 1"]),  # model
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_request_is_answered_400_naming_the_bad_value(server, case):
    shape, datatype, data, fragments = MALFORMED[case]
    params = {"full_logits": 1} if case == "full_logits not a bool" else None
    status, message = _post_json(server, MODEL, shape, datatype, data, params)
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
    assert_close(_infer(client, ids.numpy()), expected[:, -1], "fp32", what="after errors")
    assert _generate(server, STREAM, "")[0] == 400
    status, out = _generate(server, STREAM, "abc", max_tokens=2)
    assert status == 200 and out["completion_tokens"] == 2, out


# -- text in, text out ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_build):
    return serving.load_tokenizer(tiny_build[1] / MODEL / "1" / "tokenizer")


def _greedy(model, prompt, n):
    """PyTorch's greedy continuation (n tokens) of `prompt` with the tiny build's model (dense, no cache)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_generate_text_on_every_model_equals_pytorch_greedy(server, tiny_build, tokenizer):
    prompt = "The quick brown fox"
    expected = _greedy(tiny_build[2], tokenizer(prompt)["input_ids"], 8)
    for model in TEXT_MODELS:
        status, out = _generate(server, model, prompt, max_tokens=8, ignore_eos=True, stream=False)
        assert status == 200, (model, out)
        assert out["output_ids"] == expected, (model, out)
        assert out["text_output"] == tokenizer.decode(expected, skip_special_tokens=True)
        assert (out["finish_reason"], out["prompt_tokens"], out["completion_tokens"]) == ("length", 20, 8)
        assert out["first_token_ms"] > 0


def test_long_prompt_is_prefilled_sparse_as_in_process(server, tokenizer):
    prompt = "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 6  # 337 tokens: past dense_below_tokens (128)
    ids = tokenizer(prompt)["input_ids"]
    assert len(ids) > 300
    cfg = serving.serving_config(get_model("tiny-llama").proxyattn)
    params = GenerationParams(max_tokens=4, ignore_eos=True)
    for model, attention in ((SPARSE, "proxyattn"), (DENSE, "dense")):
        engine = serving.TorchEngine.load("random:tiny-llama", attention=attention, proxyattn_attrs=cfg.to_attrs())
        expected = [c.token for c in serving.generate(engine, tokenizer, ids, params)]
        status, out = _generate(server, model, prompt, max_tokens=4, ignore_eos=True)
        assert status == 200 and out["output_ids"] == expected, (model, out, expected)
        assert out["sparse_layers"] == (2 if model == SPARSE else 0), out  # tiny-llama has 2 layers


@pytest.mark.parametrize("model", [STREAM, SPARSE])
def test_generate_stream_sends_every_token(server, model):
    status, whole = _generate(server, MODEL, "abc", max_tokens=12, ignore_eos=True)
    assert status == 200
    status, events = _post(
        server,
        f"/v2/models/{model}/generate_stream",
        {"text_input": "abc", "parameters": {"max_tokens": 12, "ignore_eos": True, "stream": True}},
    )
    assert status == 200 and len(events) == 12, events
    assert [e["output_ids"] for e in events] == whole["output_ids"]
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert all("finish_reason" not in e for e in events[:-1])
    assert (events[-1]["finish_reason"], events[-1]["completion_tokens"]) == ("length", 12)


def test_stop_string_ends_the_text_before_it(server):
    status, free = _generate(server, MODEL, "abc", max_tokens=40, ignore_eos=True)
    text = free["text_output"]
    assert status == 200 and len(text) >= 2, f"the greedy text must hold two characters for this test: {text!r}"
    stop = text[1]
    status, out = _generate(server, MODEL, "abc", max_tokens=40, ignore_eos=True, stop=stop)
    assert status == 200 and out["finish_reason"] == "stop" and out["text_output"] == text[: text.index(stop)], out
    status, events = _post(
        server,
        f"/v2/models/{STREAM}/generate_stream",
        {"text_input": "abc", "parameters": {"max_tokens": 40, "ignore_eos": True, "stop": stop, "stream": True}},
    )
    assert "".join(e["text_output"] for e in events) == out["text_output"] and events[-1]["finish_reason"] == "stop"


# (body, fragments the error must contain); every case on /generate of the ONNX Runtime model and on
# /generate_stream of the decoupled models.
BAD_GENERATE = {
    "empty text": ({"text_input": ""}, ["text_input is empty"]),
    "too long for every profile": ({"text_input": "a" * 2100}, ["prompt of 2101 tokens + max_tokens 16 exceeds", "(1024 tokens)"]),
    "max_tokens a string": ({"text_input": "hi", "parameters": {"max_tokens": "ten"}}, ["'max_tokens' must be an integer, got str 'ten'"]),
    "max_tokens a float": ({"text_input": "hi", "max_tokens": 2.5}, ["'max_tokens' must be an integer, got float 2.5"]),
    "temperature a string": ({"text_input": "hi", "parameters": {"temperature": "hot"}}, ["'temperature' must be a number"]),
    "stream not a bool": ({"text_input": "hi", "parameters": {"stream": 1}}, ["'stream' must be true or false, got int 1"]),
    "negative temperature": ({"text_input": "hi", "parameters": {"temperature": -0.5}}, ["temperature=-0.5 is out of range"]),
    "unknown parameter": ({"text_input": "hi", "parameters": {"max_new_tokens": 3}}, ["unknown parameter 'max_new_tokens'"]),
    "stop a list": ({"text_input": "hi", "parameters": {"stop": ["a", "b"]}}, ["parameter 'stop' has invalid type"]),  # Triton
}


@pytest.mark.parametrize("case", list(BAD_GENERATE))
def test_bad_generate_request_is_answered_400_with_the_reason(server, case):
    body, fragments = BAD_GENERATE[case]
    for model, path in ((MODEL, "generate"), (STREAM, "generate_stream"), (SPARSE, "generate_stream")):
        status, out = _post(server, f"/v2/models/{model}/{path}", body)
        message = out["error"] if isinstance(out, dict) else (out[0].get("error", "") if out else "")
        assert status == 400, f"{case} on {model}/{path}: HTTP {status}: {out}"
        if case == "too long for every profile" and model == SPARSE:
            fragments = ["prompt of 2101 tokens + max_tokens 16 exceeds", "(2048 tokens)"]  # the model's context
        for fragment in fragments:
            assert fragment in message, f"{case} on {model}: {fragment!r} not in {message!r}"


@pytest.mark.parametrize(
    "inputs, fragment",
    [
        ([], "got neither"),
        (
            [
                {"name": "text_input", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                {"name": "input_ids", "shape": [1, 1], "datatype": "INT64", "data": [1]},
            ],
            "got both",
        ),
    ],
    ids=["no input", "both inputs"],
)
def test_request_needs_exactly_one_input(server, inputs, fragment):
    status, out = _post(server, f"/v2/models/{MODEL}/infer", {"inputs": inputs})
    assert status == 400 and "give exactly one of 'text_input'" in out["error"] and fragment in out["error"], out


def test_client_leaving_mid_stream_frees_the_slot(server):
    host, port = server.http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"text_input": "abc", "parameters": {"max_tokens": 1000, "ignore_eos": True, "stream": True}})
    try:
        conn.request("POST", f"/v2/models/{STREAM}/generate_stream", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data: "), first
    finally:
        conn.sock.shutdown(2)  # the client goes away after the first token
        conn.close()
    deadline = time.monotonic() + 60
    pattern = re.compile(rf"{STREAM}: request cancelled by the client after (\d+) tokens")
    while not pattern.search(server.log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    match = pattern.search(server.log())
    assert match, "the model did not stop the abandoned generation"
    assert int(match.group(1)) < 1000
    status, out = _generate(server, STREAM, "abc", max_tokens=3)  # the one instance serves again
    assert status == 200 and out["completion_tokens"] == 3, out


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


class _FakeRequest:
    def __init__(self, inputs, parameters="{}", outputs=("last_logits", "logits")):
        self.inputs, self._parameters, self._outputs = inputs, parameters, outputs

    def parameters(self):
        return self._parameters

    def requested_output_names(self):
        return list(self._outputs)


class _FakeText:
    def __init__(self, text):
        self.text = text

    def as_numpy(self):
        return np.array([self.text.encode()], dtype=np.object_)


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
    fake.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    spec = importlib.util.spec_from_file_location("proxyattn_served_model_under_test", PYTHON_MODEL_SOURCE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_model(module, fail=False):
    model = module.TritonPythonModel()
    profile = serving.ServedProfile(1, PROFILE_EDGE, "up-to-128", _FakeSession(fail), ["input_ids", "position_ids"])
    model.engine, model.name, model.tokenizer, model.max_batch = serving.OrtEngine([profile], VOCAB), "fake", None, 2
    model.default_max_tokens, model.all_outputs, model.eos_ids, model.decoupled = 16, {"last_logits", "logits"}, [], False
    return model


@pytest.mark.parametrize(
    "request_, code, fragment",
    [
        ({"input_ids": _FakeTensor(torch.ones(1, 3, dtype=torch.int32))}, "INVALID_ARG", "must be INT64, got torch.int32"),
        ({}, "INVALID_ARG", "give exactly one of 'text_input'"),
        ({"input_ids": _FakeTensor(torch.ones(3, dtype=torch.int64))}, "INVALID_ARG", "got shape [3]"),
        ({"input_ids": _FakeTensor(torch.ones(0, 3, dtype=torch.int64))}, "INVALID_ARG", "got shape [0, 3]"),
        ({"input_ids": _FakeTensor(torch.ones(1, 200, dtype=torch.int64))}, "INVALID_ARG", "sequence length 200"),
        ({"input_ids": _FakeTensor(torch.ones(3, 2, dtype=torch.int64))}, "INVALID_ARG", "batch of 3 sequences exceeds"),
        ({"text_input": _FakeText("hello")}, "INVALID_ARG", "model 'fake' has no tokenizer: send token ids as 'input_ids'"),
    ],
    ids=["int32", "missing", "rank 1", "zero batch", "no profile", "batch", "no tokenizer"],
)
def test_model_answers_client_errors_with_invalid_arg(model_module, request_, code, fragment):
    (response,) = _fake_model(model_module).execute([_FakeRequest(request_)])
    assert response.error.code == code and fragment in response.error.message, response.error.message


def test_model_answers_runtime_failures_with_internal(model_module):
    ok = {"input_ids": _FakeTensor(torch.ones(2, 5, dtype=torch.int64))}
    (response,) = _fake_model(model_module, fail=True).execute([_FakeRequest(ok)])
    assert response.error.code == "INTERNAL"
    assert response.error.message == "inference failed: RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom"
    (response,) = _fake_model(model_module).execute([_FakeRequest(ok)])
    assert response.error is None and [t[0] for t in response.output_tensors] == ["last_logits"]
    assert tuple(response.output_tensors[0][1].shape) == (2, VOCAB)
    (response,) = _fake_model(model_module).execute([_FakeRequest(ok, '{"full_logits": true}')])
    assert [t[0] for t in response.output_tensors] == ["last_logits", "logits"]
    assert tuple(response.output_tensors[1][1].shape) == (2, 5, VOCAB)
