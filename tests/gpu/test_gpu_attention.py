"""The attention kernels on the GPU against the fp32 reference: tests/gpu/check_attention.py's checks, one test each
(the script's CLI, `python3 -m tests.gpu.check_attention`, runs the same functions)."""

import pytest

from tests.gpu import check_attention as ca

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def tuning():
    return ca.tuning_inputs()


@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
def test_every_tuning_config(tuning, tma):
    q, k, v, plan = tuning
    for cfg in ca.tuning_configs(q, tma):
        ca.check_sparse(q, k, v, plan, 0.088, use_tma=tma, config=cfg)


def test_mask_every_tile(tuning):
    q, k, v, plan = tuning
    ca.check_sparse(q, k, v, plan, 0.088, use_tma=True, config=ca.EVERY_TILE)


def _shape_id(i: int) -> str:
    b, s, hq, hkv, d, bs, dt = ca.AUTOTUNED_SHAPES[i]
    return f"B{b}-S{s}-Hq{hq}-Hkv{hkv}-D{d}-bs{bs}-{str(dt).removeprefix('torch.')}"


@pytest.mark.parametrize("i", range(len(ca.AUTOTUNED_SHAPES)), ids=_shape_id)
def test_autotuned_shapes(i):
    ca.check_autotuned(i)


@pytest.mark.parametrize("s", [16384, pytest.param(32768, marks=pytest.mark.slow)])
def test_public_block_sparse_attention_with_lse(s):
    ca.check_public(s)


def test_varlen():
    ca.check_varlen()


@pytest.mark.parametrize("s", [4096, 16384])
def test_dense_attention(s):
    assert ca.check_dense(s)


def test_proxy_attention_on_the_gpu_plan():
    assert 0.0 < ca.check_proxy() <= 1.0


@pytest.mark.parametrize("i", range(len(ca.COLUMN_SHAPES)))
def test_vertical_columns(i):
    assert ca.check_columns(i) < 1.0
