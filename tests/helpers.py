"""Plain helpers shared by the test modules (fixtures and marks are in tests/conftest.py).

`assert_close` is the one comparison helper of the test suite, with its tolerances written down.

Tolerances are on the relative Frobenius error ||a - b|| / ||b|| plus an elementwise max check:
- "fp32": both sides computed in float32 (different summation order only): rel 1e-5, abs 1e-5.
- "tf32": a float32 product on matrix units (Triton's default dot on GPUs): rel 5e-4, abs 5e-3.
- "fp16": half-precision operands, float32 accumulation: rel 2e-3, abs 1e-2.
- "bf16": bfloat16 operands, float32 accumulation: rel 1e-2, abs 5e-2.
NaN or inf in either tensor always fails (unless both are -inf at the same places and allow_inf is set).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from proxyattn.testing import structured_qkv

ROOT = Path(__file__).resolve().parents[1]

TOLERANCES = {
    "fp32": (1e-5, 1e-5),
    "tf32": (5e-4, 5e-3),
    "fp16": (2e-3, 1e-2),
    "bf16": (1e-2, 5e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, precision: str = "fp32", *, allow_inf: bool = False, what: str = "") -> None:
    rel_tol, abs_tol = TOLERANCES[precision]
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert not torch.isnan(a).any(), f"{what}: actual has NaN"
    assert not torch.isnan(e).any(), f"{what}: expected has NaN"
    if allow_inf:
        same_inf = torch.isinf(a) & torch.isinf(e) & (torch.sign(a) == torch.sign(e))
        assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{what}: inf positions differ"
        a = a.masked_fill(same_inf, 0.0)
        e = e.masked_fill(same_inf, 0.0)
    assert torch.isfinite(a).all(), f"{what}: actual has inf"
    assert torch.isfinite(e).all(), f"{what}: expected has inf"
    diff = a - e
    denom = e.norm().clamp_min(1e-12)
    rel = (diff.norm() / denom).item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    assert rel <= rel_tol, f"{what}: relative error {rel:.3e} > {rel_tol:.0e} ({precision}); max abs {max_abs:.3e}"
    assert max_abs <= abs_tol + rel_tol * e.abs().max().item(), (
        f"{what}: max abs error {max_abs:.3e} > {abs_tol:.0e} + {rel_tol:.0e}*max|expected| ({precision})"
    )


def qkv_inputs(kind: str, b: int, s: int, hq: int, hkv: int, d: int, seed: int, dtype: torch.dtype = torch.float32):
    """(q `[B, S, Hq, D]`, k, v `[B, S, Hkv, D]`) on the CPU in `dtype`: "random" draws standard normal q, k, v in
    that order from one generator seeded `seed` (so the first two are the same for a q, k-only caller);
    "structured" is `proxyattn.testing.structured_qkv` (local attention, sinks, heads of different spread)."""
    if kind == "structured":
        return structured_qkv(b, s, hq, hkv, d, dtype=dtype, seed=seed)
    if kind != "random":
        raise ValueError(f"kind={kind!r}; allowed: 'random', 'structured'")
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g).to(dtype) for h in (hq, hkv, hkv))


def subprocess_env() -> dict[str, str]:
    """This process's environment without TRITON_INTERPRET: a child process (build.py, cmake, the AOT compiler)
    compiles real kernels, whatever interpreter mode the test session chose."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_build(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python build.py ARGS` from the repository root (captured text output)."""
    return subprocess.run(
        [sys.executable, "build.py", *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def live_group_members(pgid: int) -> list[int]:
    """Non-zombie processes of process group `pgid` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # exited while listed
        state, _, group = text[text.rindex(")") + 2 :].split()[:3]
        if state != "Z" and int(group) == pgid:
            found.append(int(stat.parent.name))
    return found
