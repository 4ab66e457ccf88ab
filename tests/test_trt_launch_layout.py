"""The CPU-checkable parts of tests/gpu/check_trt_launch.py (the GPU launch check of the TensorRT plugin kernels):
the parameter layout TensorRT's AOT launcher passes (inputs, int32 scalars, outputs, Triton's two hidden scratch
pointers) against real PTX entries, the pointer array handed to cuLaunchKernel, the dynamic shared memory opt-in
decision, and the tie order the graph's TopK must follow (ONNX Runtime's TopK here)."""

import ctypes as C
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from plugins.tensorrt import spec as S
from tests.gpu import check_trt_launch as ctl
from tests.helpers import ROOT, subprocess_env


def test_shared_memory_opt_in_decision():
    assert not ctl.launch_config((1, 1, 1), 4, 48 * 1024).opt_in
    assert ctl.launch_config((1, 1, 1), 4, 48 * 1024 + 1).opt_in
    cfg = ctl.launch_config((10, 2, 1), 8, 65536, max_optin=232448)
    assert cfg == ctl.LaunchConfig((10, 2, 1), (256, 1, 1), 65536, True)
    with pytest.raises(ValueError, match="exceeds the device's opt-in maximum"):
        ctl.launch_config((1, 1, 1), 4, 300000, max_optin=232448)
    with pytest.raises(ValueError, match="not launchable"):
        ctl.launch_config((0, 1, 1), 4, 0)
    with pytest.raises(ValueError, match="not launchable"):
        ctl.launch_config((1, 1 << 16, 1), 4, 0)
    with pytest.raises(ValueError, match="invalid block"):
        ctl.launch_config((1, 1, 1), 33, 0)


def test_parameter_layout_and_pointer_array():
    values, types = ctl.kernel_params([0x1000, 0x2000], [7, -3], [0x3000])
    assert types == [".u64", ".u64", ".u32", ".u32", ".u64", ".u64", ".u64"]  # + global and profile scratch
    assert [v.value for v in values] == [0x1000, 0x2000, 7, -3, 0x3000, 0, 0]
    assert [C.sizeof(v) for v in values] == [8, 8, 4, 4, 8, 8, 8]
    arr = ctl.param_pointer_array(values)
    for i, v in enumerate(values):  # kernelParams[i] points at value i
        assert C.cast(arr[i], C.POINTER(type(v))).contents.value == v.value
    with pytest.raises(ValueError, match="not an int32"):
        ctl.kernel_params([], [2**31], [])
    ptx = (
        ".visible .entry k(\n .param .u64 .ptr .global .align 1 k_param_0,\n .param .u32 k_param_1,\n"
        " .param .u64 .ptr .global .align 1 k_param_2,\n .param .u64 .ptr .global .align 1 k_param_3,\n"
        " .param .u64 .ptr .global .align 1 k_param_4\n)"
    )
    ctl.check_params_against_ptx(ptx, ctl.kernel_params([1], [2], [3])[1])
    with pytest.raises(ValueError, match="differ from the launch"):
        ctl.check_params_against_ptx(ptx, ctl.kernel_params([1], [2, 3], [4])[1])


_COMPILE = r"""
import json, sys
from plugins.tensorrt import aot, spec as S
from tests.gpu import check_trt_launch as ctl
q, k = (2, 32, 1000, 128), (2, 8, 1000, 128)
out = {}
for name, shapes, dtypes, attrs in json.loads(sys.argv[1]):
    c = aot.compile_kernel(name, shapes, dtypes, {a: v for a, v in attrs.items() if a not in S.RUNTIME_ATTRS.get(name, {})}, 1, 90)
    consts, _ = S.constants(name, shapes, dtypes, attrs, 1)
    scalars = S.extra_args(name, shapes, attrs)
    n_out = len(S.output_shapes(name, shapes, attrs))
    values, types = ctl.kernel_params(list(range(1, len(shapes) + 1)), scalars, list(range(100, 100 + n_out)))
    ctl.check_params_against_ptx(c.ptx, types)  # raises on a mismatch
    cfg = ctl.launch_config(S.launch(name, shapes, attrs, consts), c.num_warps, c.shared)
    out[name] = {"shared": c.shared, "opt_in": cfg.opt_in, "grid": cfg.grid, "block": cfg.block, "params": len(values)}
print(json.dumps(out))
"""


def test_real_plugin_kernels_take_the_launch_layout():
    """The rule-3 and ranking kernels compiled for sm_90 (a subprocess: this session runs Triton's interpreter): their
    PTX entries take exactly the launch's parameters, and the 64 KiB mass kernel is opted in."""
    q, k, nb = [2, 32, 1000, 128], [2, 8, 1000, 128], 8
    cut_attrs = {
        "pa_block_size": 128,
        "pa_recall_rows": 4,
        "pa_gamma": 0.95,
        "pa_min_budget_tokens": 2048,
        "pa_keep_sink": 1,
        "pa_keep_diagonal": 1,
    }
    jobs = [
        ("ProxyRank", [[2, 1, nb, nb]], ["float32"], {"pa_block_size": 128, "pa_keep_sink": 1, "pa_keep_diagonal": 1, "max_seq_len": 1024}),
        ("ProxyNeedsMass", [q, k, [2, 8]], ["bfloat16", "bfloat16", "int32"], {"pa_block_size": 128, "pa_recall_rows": 4, "scale": 0.088}),
        (
            "ProxyNeedsCut",
            [q, [16, nb, nb, 16], [16, nb, 16], [2, 1, nb, nb], [2, 1, nb], [2, 1, nb], [2, 8]],
            ["bfloat16", "float32", "float32", "int32", "int32", "int32", "int32"],
            cut_attrs,
        ),
    ]
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE, json.dumps(jobs)], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ProxyNeedsMass"]["shared"] > 48 * 1024 and got["ProxyNeedsMass"]["opt_in"]
    assert got["ProxyNeedsMass"]["grid"] == [16, 1, 1] and got["ProxyNeedsMass"]["params"] == 3 + 1 + 2 + 2
    assert got["ProxyNeedsCut"]["params"] == 7 + 3 + 2 + 2 and got["ProxyNeedsCut"]["grid"] == [16, nb, 1]
    assert got["ProxyRank"]["grid"] == [2 * nb, 1, 1] and got["ProxyRank"]["params"] == 1 + 1 + 4 + 2
    assert S.PLUGINS["ProxyNeedsCut"].outputs == ("need", "counts")


def test_tie_order_of_the_reference_and_onnx_topk():
    """The order the graph's sorts must follow on exact ties: torch's stable descending sort (the reference) equals
    `stable_desc_order`, and ONNX Runtime's TopK (largest, sorted) gives it too (the ONNX spec's tie rule). TensorRT's
    TopK is checked by the GPU script."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = ctl.tie_inputs(32, 300)
    want = ctl.stable_desc_order(x)
    assert np.array_equal(want, torch.sort(torch.from_numpy(x), dim=-1, descending=True, stable=True).indices.numpy())
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=-1, largest=1, sorted=1)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, None), helper.make_tensor_value_info("i", TensorProto.INT64, None)],
        [helper.make_tensor("k", TensorProto.INT64, [1], [x.shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _, idx = sess.run(None, {"x": x})
    assert np.array_equal(idx, want)
