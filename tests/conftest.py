"""Fixtures and marks shared by the test modules (plain helper functions are in tests/helpers.py).

Marks (registered in pyproject.toml):
* `interpret`: runs Triton kernels on CPU tensors in Triton's interpreter. Without CUDA this file sets
  TRITON_INTERPRET=1 before any test module is imported (the interpreter must be chosen before a kernel is defined);
  with CUDA the compiled kernels stay, and these tests are skipped unless TRITON_INTERPRET=1 is given.
* `gpu`: needs CUDA (tests/gpu, run on the device with `pytest -m gpu tests/gpu`); skipped without it.
* `slow`: long-running CPU tests (still part of CI).

Fixtures: `tiny_build` (tiny-llama exported, ONNX Runtime models and the Triton repository, once per session),
`cpp_build` (libproxyattn built with cmake, once per session), `restore_hf_config` (puts back the transformers
integration's config after a test).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import ROOT, subprocess_env

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

TINY_MAX_BATCH = 4  # the largest batch tiny-llama's serving build (`tiny_build`) takes


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is not None and not CUDA:
        pytest.skip("needs CUDA (GPU checks run on the device: pytest -m gpu tests/gpu)")
    if item.get_closest_marker("interpret") is not None and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernel tests need TRITON_INTERPRET=1 on the CPU")


@pytest.fixture(scope="session")
def tiny_build(tmp_path_factory):
    """(plan, repository, PyTorch model) of tiny-llama through the pipeline's stage functions (export, ONNX Runtime
    model per profile, repository), max batch TINY_MAX_BATCH; built once per session."""
    from engines import pipeline
    from engines.artifacts import Manifest

    out = tmp_path_factory.mktemp("tiny")
    plan = pipeline.resolve(pipeline.BuildRequest(model="tiny-llama", out=str(out), max_batch=TINY_MAX_BATCH))
    assert plan.backend == "onnxruntime" and plan.precision == "fp32"
    manifest = Manifest.load(plan.out)
    pipeline.stage_export(plan, manifest)
    pipeline.stage_ort_models(plan, manifest)
    repo = pipeline.stage_repository(plan, manifest)
    return plan, repo, pipeline.load_model(plan, meta=False)


def have_cpp_toolchain() -> bool:
    return shutil.which("cmake") is not None and bool(shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists())


def cpp_build_dir(tmp_path_factory) -> Path:
    """Where the session's libproxyattn build lives: PROXYATTN_CPP_BUILD if set (local iteration, or ctest's
    pytest_host test pointing at its own build directory), else one directory under the session's temporary root."""
    if os.environ.get("PROXYATTN_CPP_BUILD"):
        return Path(os.environ["PROXYATTN_CPP_BUILD"])
    return tmp_path_factory.getbasetemp() / "cpp_build"


@pytest.fixture(scope="session")
def cpp_build(tmp_path_factory) -> Path:
    """libproxyattn configured and built (every kernel variant unless the directory was configured with
    PROXYATTN_QUICK, as CI does it) into `cpp_build_dir`, once per session; incremental, so a directory built before
    costs a configure and a no-op build. Skips without cmake and nvcc."""
    if not have_cpp_toolchain():
        pytest.skip("cmake and nvcc are needed to build libproxyattn")
    out = cpp_build_dir(tmp_path_factory)
    env = subprocess_env()
    subprocess.run(
        ["cmake", "-S", str(ROOT / "cpp"), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release"], check=True, env=env, stdout=subprocess.DEVNULL
    )
    subprocess.run(["cmake", "--build", str(out), "-j", "2"], check=True, env=env, stdout=subprocess.DEVNULL)
    return out


@pytest.fixture
def restore_hf_config():
    """The transformers integration's active config is put back after the test."""
    import proxyattn.hf as hf

    before = hf.active_config()
    yield
    hf.register(before)
