"""ctest on the libproxyattn build: `ctest --test-dir <build>` must find and pass the native host tests
(cpp/tests/host_tests.cpp: config, plugin fields, .npy codec, hand-computed plans; no Python involved).

Reuses the session's build of the tests/cpp modules (the `cpp_build` fixture of tests/conftest.py: one directory per
session), so CI pays for one full kernel build, not two. ctest's `pytest_host` test (tests/cpp against that build
directory) is not run from here: this suite already runs tests/cpp itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.skipif(shutil.which("ctest") is None, reason="ctest (CMake) is needed")

NATIVE_GROUPS = ("config", "fields", "npy", "plan")


@pytest.fixture(scope="module")
def build(cpp_build):
    return cpp_build


def _ctest(build, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure", *args], capture_output=True, text=True, timeout=600)


def test_ctest_registers_the_host_tests(build):
    r = _ctest(build, "-N")
    assert r.returncode == 0, r.stdout + r.stderr
    total = re.search(r"Total Tests:\s*(\d+)", r.stdout)
    assert total and int(total.group(1)) > 0, r.stdout
    registered = set(re.findall(r"Test\s+#\d+:\s+(\S+)", r.stdout))
    assert {f"host_{g}" for g in NATIVE_GROUPS} <= registered, r.stdout
    native = _ctest(build, "-N", "-L", "native")
    assert re.search(r"Total Tests:\s*4\b", native.stdout), native.stdout


def test_ctest_native_host_tests_pass(build):
    r = _ctest(build, "-L", "native")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "100% tests passed" in r.stdout and "out of 4" in r.stdout, r.stdout


def test_native_host_tests_report_their_checks(build):
    """The executable itself: every group runs checks and reports them; an unknown group is a usage error."""
    exe = build / "proxyattn_host_tests"
    for group in NATIVE_GROUPS:
        r = subprocess.run([str(exe), group], capture_output=True, text=True, timeout=60)
        m = re.search(r"(\d+) checks, (\d+) failed", r.stdout)
        assert r.returncode == 0 and m and int(m.group(1)) >= 5 and m.group(2) == "0", (group, r.stdout, r.stderr)
    r = subprocess.run([str(exe), "bogus"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown test group 'bogus'; allowed: config, fields, npy, plan" in r.stderr
