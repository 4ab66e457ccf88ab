"""libproxyattn on the GPU against the PyTorch path: tests/gpu/check_cpp.py's checks, one test each (its timings stay
in the script: `python3 -m tests.gpu.check_cpp --lib DIR --out OUT`). The library: the build directory
PROXYATTN_CPP_LIB names, used as it is (e.g. a build of cpp/ made on the CPU machine and carried to the GPU one), else
the session's `cpp_build` (tests/conftest.py: cmake + nvcc here; skipped without them)."""

import os
from pathlib import Path

import pytest
import torch

from tests.gpu import check_cpp as cc

pytestmark = pytest.mark.gpu

VARIANTS = [
    (dtype, d, bs, varlen)
    for dtype in (torch.bfloat16, torch.float16)
    for d in (64, 128, 256)
    for bs in (64, 128)
    for varlen in (False, True)
]


@pytest.fixture(scope="module")
def lib(request):
    prebuilt = os.environ.get("PROXYATTN_CPP_LIB")
    return cc.Lib(Path(prebuilt) if prebuilt else request.getfixturevalue("cpp_build"))


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{cc.prec(v[0])}-D{v[1]}-block{v[2]}-{'varlen' if v[3] else 'padded'}")
def test_compiled_variant(lib, variant):
    dtype, d, bs, varlen = variant
    cc.check_variant(lib, dtype, d, bs, varlen, seed=d + bs + varlen)


@pytest.mark.parametrize("rule", [0, 1, 2])
@pytest.mark.parametrize("varlen", [False, True], ids=["padded", "varlen"])
def test_other_budget_rules(lib, rule, varlen):
    cc.check_variant(lib, torch.bfloat16, 128, 128, varlen, seed=7 + rule, rule=rule)


@pytest.mark.parametrize("s", [8192, 16384, pytest.param(32768, marks=pytest.mark.slow)])
def test_large_structured(lib, s):
    cc.check_large(lib, s, "structured", seed=s)


@pytest.mark.parametrize("s", [16384, pytest.param(32768, marks=pytest.mark.slow)])
def test_large_structured_rule3_and_dense_fallback(lib, s):
    cc.check_large(lib, s, "structured", seed=s + 1, cfg=cc.SPARSE_DEFAULT)


def test_large_random_every_group_dense_early(lib):
    cc.check_large(lib, 16384, "random", seed=4, cfg=cc.SPARSE_DEFAULT)


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_large_rules_0_to_2_with_dense_fallback(lib, rule):
    cc.check_large(lib, 16384, "structured", seed=20 + rule, cfg=cc.SPARSE_DEFAULT.replace(budget_rule=rule))


def test_large_random(lib):
    cc.check_large(lib, 8192, "random", seed=3)


def test_varlen_large(lib):
    cc.check_varlen_large(lib)


def test_bhsd_layout(lib):
    cc.check_bhsd(lib)


def test_dense_path_and_full_gamma_oracle(lib):
    cc.check_dense(lib)


def test_cuda_graph_capture(lib):
    cc.check_graph(lib)


def test_example_program(lib, tmp_path):
    cc.check_example(lib, tmp_path)
