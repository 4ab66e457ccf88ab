"""Fixtures of the libproxyattn tests: the session's build (tests/conftest.py `cpp_build`: cmake + nvcc + gcc, no GPU
needed; skipped without them) and the two libraries loaded from it."""

import pytest

from tests.cpp.libproxyattn import load_host, load_lib


@pytest.fixture(scope="session")
def build(cpp_build):
    return cpp_build


@pytest.fixture(scope="session")
def lib(build):
    return load_lib(build)


@pytest.fixture(scope="session")
def host(build):
    return load_host(build)
