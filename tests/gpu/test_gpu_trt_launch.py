"""The TensorRT plugins' AOT kernels launched through the CUDA driver as TensorRT's AOT launcher would, on the GPU:
tests/gpu/check_trt_launch.py's checks under pytest (the 64K rows and the JSON result stay in the script:
`python3 -m tests.gpu.check_trt_launch --out OUT`)."""

import pytest

from tests.gpu import check_trt_launch as ctl

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def drv():
    return ctl.Driver()


@pytest.mark.parametrize("s", [8192, 16384, pytest.param(32768, marks=pytest.mark.slow)])
@pytest.mark.parametrize("rule", [3, 0, 1, 2])
def test_engine_graph_on_the_gpu(drv, rule, s):
    ctl.check_graph(drv, rule, s, seed=s + rule)


def test_large_shared_memory_is_opted_in(drv):
    ctl.check_graph(drv, 3, 16384, seed=1)  # launches ProxyNeedsMass / ProxyMass (64 KiB at D 128)
    info = ctl.check_opt_in(drv)
    assert info["kernels_above_48k"], "expected kernels above 48 KiB of shared memory"


def test_topk_orders_ties_like_the_reference():
    info = ctl.check_topk_ties()
    if not info["run"]:
        pytest.skip(info["reason"])
