"""The .npy codec of the example program (read what numpy writes, write what numpy and torch read, fp16 / bf16
rounding and subnormals) and the example program's error reporting."""

from __future__ import annotations

import ctypes as C
import subprocess

import numpy as np
import pytest
import torch

from tests.cpp.libproxyattn import ptr


def test_npy_reads_numpy_files(host, tmp_path):
    gen = np.random.default_rng(0)
    for dt in (np.float32, np.float16, np.int32):
        a = (gen.standard_normal((3, 5, 2)) * 100).astype(dt)
        p = tmp_path / f"a_{np.dtype(dt).name}.npy"
        np.save(p, a)
        buf = np.zeros(a.size, np.float32)
        shape = (C.c_longlong * 8)()
        ndim = C.c_int(0)
        err = C.create_string_buffer(256)
        n = host.pa_host_npy_load_f32(str(p).encode(), C.c_void_p(ptr(buf)), a.size, shape, C.byref(ndim), err, 256)
        assert n == a.size, err.value
        assert tuple(shape[: ndim.value]) == a.shape
        np.testing.assert_array_equal(buf, a.astype(np.float32).ravel())
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((3, 4), np.float32)))
    err = C.create_string_buffer(256)
    n = host.pa_host_npy_load_f32(
        str(tmp_path / "f.npy").encode(), C.c_void_p(ptr(np.zeros(12, np.float32))), 12, (C.c_longlong * 8)(), C.byref(C.c_int()), err, 256
    )
    assert n == -1 and b"fortran_order" in err.value


@pytest.mark.parametrize("descr", ["<f4", "<f2", "<u2"])
def test_npy_writes_what_numpy_and_torch_read(host, tmp_path, descr):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 5, generator=gen) * torch.logspace(-7, 5, 5)  # fp16 subnormals (1e-7, 1e-4) to inf (1e5)
    p = tmp_path / "x.npy"
    err = C.create_string_buffer(256)
    shape = (C.c_longlong * 3)(*x.shape)
    assert host.pa_host_npy_save(str(p).encode(), C.c_void_p(ptr(x.numpy())), shape, 3, descr.encode(), err, 256) == 0
    got = np.load(p)
    assert got.shape == tuple(x.shape) and got.dtype.str == descr
    if descr == "<f4":
        np.testing.assert_array_equal(got, x.numpy())
    elif descr == "<f2":
        np.testing.assert_array_equal(got, x.to(torch.float16).numpy())  # round to nearest even, subnormals too
    else:
        want = x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got, want)


def test_example_program_reports_errors(build, tmp_path):
    exe = build / "proxyattn_example"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "usage" in r.stdout
    r = subprocess.run(
        [str(exe), "--q", str(tmp_path / "missing.npy"), "--k", "a", "--v", "b", "--out", "o"], capture_output=True, text=True
    )
    assert r.returncode == 1 and "missing.npy" in r.stderr
    np.save(tmp_path / "q.npy", np.ones((1, 8, 2, 64), np.float32))
    np.save(tmp_path / "k.npy", np.ones((1, 9, 1, 64), np.float32))
    r = subprocess.run(
        [
            str(exe),
            "--q",
            str(tmp_path / "q.npy"),
            "--k",
            str(tmp_path / "k.npy"),
            "--v",
            str(tmp_path / "k.npy"),
            "--out",
            str(tmp_path / "o.npy"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "disagree" in r.stderr
    assert not (tmp_path / "o.npy").exists()
