"""The one comparison helper of the test suite, with its tolerances written down.

Tolerances are on the relative Frobenius error ||a - b|| / ||b|| plus an elementwise max check:
- "fp32": both sides computed in float32 (different summation order only): rel 1e-5, abs 1e-5.
- "tf32": a float32 product on matrix units (Triton's default dot on GPUs): rel 5e-4, abs 5e-3.
- "fp16": half-precision operands, float32 accumulation: rel 2e-3, abs 1e-2.
- "bf16": bfloat16 operands, float32 accumulation: rel 1e-2, abs 5e-2.
NaN or inf in either tensor always fails (unless both are -inf at the same places and allow_inf is set).
"""

from __future__ import annotations

import torch

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
    diff = (a - e)
    denom = e.norm().clamp_min(1e-12)
    rel = (diff.norm() / denom).item()
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    assert rel <= rel_tol, f"{what}: relative error {rel:.3e} > {rel_tol:.0e} ({precision}); max abs {max_abs:.3e}"
    assert max_abs <= abs_tol + rel_tol * e.abs().max().item(), (
        f"{what}: max abs error {max_abs:.3e} > {abs_tol:.0e} + {rel_tol:.0e}*max|expected| ({precision})"
    )
