"""Triton model configs: generated as Triton's own ModelConfig protobuf, printed, parsed back and validated."""

import json

import pytest

pytest.importorskip("tritonclient.grpc.model_config_pb2")

from engines.models import Profile
from engines.triton_repo import (
    TensorSpec,
    config_text,
    parse_config,
    python_ort_config,
    python_torch_config,
    tensorrt_plan_config,
    validate_config,
    write_tensorrt_model,
)

IDS = TensorSpec("input_ids", "int64", (-1,))
LOGITS = TensorSpec("logits", "bfloat16", (-1, 128256))


def test_tensorrt_plan_config_round_trips():
    cfg = tensorrt_plan_config("llama3-8b_8k-32k", inputs=[IDS], outputs=[LOGITS], max_batch_size=4, instances=2, gpus=[0])
    text = config_text(cfg)
    validate_config(text, directory_name="llama3-8b_8k-32k")
    back = parse_config(text)
    assert back.platform == "tensorrt_plan" and back.max_batch_size == 4
    assert list(back.input[0].dims) == [-1] and list(back.output[0].dims) == [-1, 128256]
    data_types = back.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    assert back.output[0].data_type == data_types.values_by_name["TYPE_BF16"].number
    g = back.instance_group[0]
    assert g.count == 2 and list(g.gpus) == [0] and list(g.profile) == ["0"]
    assert 'platform: "tensorrt_plan"' in text and "KIND_GPU" in text


def test_python_config_carries_profiles():
    profiles = [Profile("short", 1, 64, 128), Profile("long", 129, 512, 1024)]
    cfg = python_ort_config(
        "tiny_onnxruntime", vocab_size=512, max_batch_size=8, profiles=profiles, profile_files=["short.onnx", "long.onnx"]
    )
    text = config_text(cfg)
    validate_config(text, directory_name="tiny_onnxruntime")
    back = parse_config(text)
    table = json.loads(back.parameters["profiles"].string_value)
    assert [(p["name"], p["min"], p["max"], p["file"]) for p in table] == [
        ("short", 1, 128, "short.onnx"),
        ("long", 129, 1024, "long.onnx"),
    ]
    assert back.backend == "python" and "KIND_CPU" in text and back.max_batch_size == 0
    assert back.parameters["max_batch"].string_value == "8" and back.parameters["engine"].string_value == "onnxruntime"
    assert "tokenizer" not in back.parameters and not back.model_transaction_policy.decoupled


def test_text_model_config_has_the_generate_interface():
    from proxyattn.config import ProxyAttnConfig

    cfg = python_torch_config(
        "m_proxyattn", weights="random:tiny-llama", attention="proxyattn", vocab_size=512, proxyattn=ProxyAttnConfig(gamma=0.9)
    )
    text = config_text(cfg)
    validate_config(text, directory_name="m_proxyattn")
    back = parse_config(text)
    inputs = {t.name: (t.optional, list(t.dims)) for t in back.input}
    assert inputs == {"text_input": (True, [1]), "input_ids": (True, [-1, -1])}
    assert [t.name for t in back.output][:3] == ["text_output", "output_ids", "finish_reason"]
    assert back.model_transaction_policy.decoupled and "KIND_GPU" in text
    assert json.loads(back.parameters["proxyattn"].string_value)["pa_gamma"] == 0.9
    assert (back.parameters["weights"].string_value, back.parameters["tokenizer"].string_value) == ("random:tiny-llama", "tokenizer")
    with pytest.raises(ValueError, match="attention='flash'; allowed: proxyattn, dense"):
        python_torch_config("m", weights="random:tiny-llama", attention="flash", vocab_size=512)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"engine": "vllm"}, "parameter engine='vllm'; allowed: onnxruntime, transformers"),
        ({"attention": "flash"}, "parameter attention='flash'; allowed: proxyattn, dense"),
        ({"weights": ""}, "missing: \\['weights'\\]"),
        ({"max_batch": "0"}, "parameter max_batch='0' must be an int >= 1"),
        ({"max_batch_size": 4}, "max_batch_size=4: the text models take max_batch_size 0"),
    ],
)
def test_invalid_text_model_configs_are_refused(change, match):
    cfg = python_torch_config("m", weights="random:tiny-llama", attention="dense", vocab_size=512)
    for key, value in change.items():
        if key == "max_batch_size":
            cfg.max_batch_size = value
        else:
            cfg.parameters[key].string_value = value
    with pytest.raises(ValueError, match=match):
        validate_config(config_text(cfg))


@pytest.mark.parametrize(
    "text, match",
    [
        (
            'name: "m" platform: "tensorrt_plan" max_batch_size: 1 input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
            'output [{name: "b" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_GPU count: 1}] nonsense: 1',
            "schema",
        ),
        (
            'name: "m" max_batch_size: 1 input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
            'output [{name: "b" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_GPU count: 1}]',
            "exactly one of platform / backend",
        ),
        (
            'name: "m" platform: "tensorrt_plan" max_batch_size: 1 input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
            'output [{name: "a" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_GPU count: 1}]',
            "repeat",
        ),
        (
            'name: "m" platform: "tensorrt_plan" max_batch_size: 1 input [{name: "a" data_type: TYPE_INT64 dims: [0]}] '
            'output [{name: "b" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_GPU count: 1}]',
            "dims",
        ),
        (
            'name: "m" platform: "tensorrt_plan" max_batch_size: 1 input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
            'output [{name: "b" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_CPU count: 1}]',
            "KIND_GPU",
        ),
        (
            'name: "m" platform: "tensorrt_plan" max_batch_size: 0 input [{name: "a" data_type: TYPE_INT64 dims: [-1]}] '
            'output [{name: "b" data_type: TYPE_FP32 dims: [-1]}] instance_group [{kind: KIND_GPU count: 1}]',
            "max_batch_size >= 1",
        ),
    ],
)
def test_invalid_configs_are_refused(text, match):
    with pytest.raises(ValueError, match=match):
        validate_config(text)


def test_name_must_match_directory():
    cfg = tensorrt_plan_config("a", inputs=[IDS], outputs=[LOGITS], max_batch_size=1)
    with pytest.raises(ValueError, match="differs from its directory"):
        validate_config(config_text(cfg), directory_name="b")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_batch_size": 0}, "max_batch_size=0"),
        ({"max_batch_size": 2, "instances": 0}, "instances=0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tensorrt_plan_config("m", inputs=[IDS], outputs=[LOGITS], **kwargs)
    with pytest.raises(ValueError, match="dtype"):
        TensorSpec("x", "int8", (-1,))


def test_write_tensorrt_model_copies_the_plan(tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"\x00plan")
    cfg = tensorrt_plan_config("m_p", inputs=[IDS], outputs=[LOGITS], max_batch_size=2)
    d = write_tensorrt_model(tmp_path / "repo", "m_p", plan, cfg)
    assert (d / "1" / "model.plan").read_bytes() == b"\x00plan"
    validate_config((d / "config.pbtxt").read_text(), directory_name="m_p")
