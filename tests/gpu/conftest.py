"""The GPU checks under pytest (`pytest -m gpu tests/gpu` on the device; every module here is marked `gpu`, which
tests/conftest.py skips without CUDA): TF32 off like the scripts, and a synchronisation after each test so that a
device fault is reported by the test that caused it."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _cuda_checked():
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.cuda.synchronize()
