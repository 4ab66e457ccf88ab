#!/usr/bin/env python3
"""GPU check of the attention kernels (run on the H200 through the device tool, not in the CPU suite).

Every kernel against the fp32 reference (computed on the GPU, chunked) at 4K-32K with fresh random inputs: the
block-sparse kernel (every tuning config, TMA and pointer loads, both masking variants, LSE), the autotuned
public path, varlen batches, the dense path, proxy_attention (attention given the GPU plan) and vertical columns. Outputs are
poisoned with NaN before each run (preallocated buffers; for the public functions the caching allocator's free
memory is poisoned) and any NaN, i.e. an unwritten element, fails. Exit status 1 on any failure.

    python3 -m tests.gpu.check_attention [--quick]      (from the repository root)

The same checks run under pytest as tests/gpu/test_gpu_attention.py (`pytest -m gpu tests/gpu`).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


import proxyattn
from proxyattn import ProxyAttnConfig, reference
from proxyattn.api import _varlen_reference
from proxyattn.kernels import attention as attn
from proxyattn.plan import BlockPlan, compact_plan
from tests.helpers import assert_close

PREC = {torch.float16: "fp16", torch.bfloat16: "bf16"}
RESULTS: list[tuple[str, bool, str]] = []


def record(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
        RESULTS.append((name, True, f"{time.perf_counter() - t0:.1f}s"))
    except Exception as e:  # noqa: BLE001 - every failure is recorded and makes the script fail at the end
        RESULTS.append((name, False, f"{type(e).__name__}: {str(e)[:300]}"))
    torch.cuda.synchronize()
    print(("PASS " if RESULTS[-1][1] else "FAIL ") + name + "  " + RESULTS[-1][2], flush=True)


def poison_allocator(nbytes: int) -> None:
    """Fill free caching-allocator memory with NaN so that a fresh torch.empty likely returns NaN bytes."""
    buf = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").fill_(float("nan"))
    del buf


def qkv(b, s, hq, hkv, d, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g, device="cuda", dtype=torch.float32).to(dtype) for h in (hq, hkv, hkv))


def random_plan(b, hq, s, bs, density, seed, proxy_like=True):
    """proxy_like: one shared ranking row (R=1), random scores, fixed fraction; else a random mask per head."""
    nb = -(-s // bs)
    g = torch.Generator(device="cuda").manual_seed(seed)
    if proxy_like:
        cfg = ProxyAttnConfig(block_size=bs, min_budget_tokens=0, budget_fraction=density)
        scores = torch.rand(b, 1, nb, nb, generator=g, device="cuda")
        budgets = reference.fraction_budgets(b, hq, nb, density, "cuda")
        return compact_plan(scores, budgets, s, cfg)
    mask = torch.rand(b, hq, nb, nb, generator=g, device="cuda") < density
    return BlockPlan.from_mask(mask, block_size=bs, seq_len=s)


def check_sparse(q, k, v, plan, scale, **kw):
    b, s, hq, _ = q.shape
    out = torch.full_like(q, float("nan"))
    lse = torch.full((b, hq, s), float("nan"), device="cuda")
    attn._launch_sparse(q, k, v, plan.order, plan.counts, None, s, plan.block_size, scale, with_lse=True, out=out, lse=lse, **kw)
    ro, rl = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=plan.block_size, scale=scale)
    assert_close(out, ro, PREC[q.dtype], what="out")
    assert_close(lse, rl, "fp16", allow_inf=True, what="lse")


def tuning_inputs():
    """4K ragged main shape (B 1, Hq 32, Hkv 8, D 128, bf16) and a random per-head plan at 30 % density."""
    q, k, v = qkv(1, 4096 - 37, 32, 8, 128, torch.bfloat16, 1)
    return q, k, v, random_plan(1, 32, q.shape[1], 128, 0.3, 2, proxy_like=False)


def tuning_configs(q, tma: bool) -> list[dict]:
    """Every config the autotuner may pick for the main shape with TMA loads (`tma`) or pointer loads."""
    return [attn.config_dict(c) for c in attn.candidate_configs(q, 128, tma)]


EVERY_TILE = dict(BLOCK_N=64, num_warps=8, num_stages=3, DIAG_BRANCH=False)  # the variant that masks every tile

# Autotuned path over shapes: GQA 1/4/7/8, D 64/128/256, block 64/128, fp16/bf16, B > 1, ragged S.
# (B, S, Hq, Hkv, D, block, dtype)
AUTOTUNED_SHAPES = [
    (2, 4096 - 37, 32, 8, 128, 128, torch.bfloat16),
    (1, 4096 + 64, 8, 8, 64, 64, torch.float16),
    (1, 4000, 16, 2, 256, 128, torch.bfloat16),
    (1, 4096, 28, 4, 128, 64, torch.float16),
    (1, 4096 + 5, 16, 2, 256, 64, torch.float16),
]
VARLEN_LENGTHS = [4096 + 13, 1000, 9000, 0, 2048]


def check_autotuned(i: int) -> None:
    """The autotuned kernel on AUTOTUNED_SHAPES[i], a proxy-like plan and a random per-head one."""
    b, s, hq, hkv, d, bs, dt = AUTOTUNED_SHAPES[i]
    q, k, v = qkv(b, s, hq, hkv, d, dt, 10 + i)
    for proxy_like in (True, False):
        plan = random_plan(b, hq, s, bs, 0.2, 20 + i, proxy_like)
        check_sparse(q, k, v, plan, d**-0.5)


def check_public(s: int) -> None:
    """Public block_sparse_attention_with_lse (allocates its outputs: the allocator is poisoned first), main shape."""
    q, k, v = qkv(1, s, 32, 8, 128, torch.bfloat16, s)
    plan = random_plan(1, 32, s, 128, 0.1, s + 1)
    poison_allocator(4 * q.numel() * 2)
    out, lse = proxyattn.block_sparse_attention_with_lse(q, k, v, plan)
    ro, rl = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=128, scale=128**-0.5)
    assert_close(out, ro, "bf16", what="out")
    assert_close(lse, rl, "fp16", allow_inf=True, what="lse")


def check_varlen() -> None:
    """Varlen: ragged lengths (VARLEN_LENGTHS: an empty sequence too), GQA 4, the launcher and the public function."""
    lens = VARLEN_LENGTHS
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    t, mx = sum(lens), max(lens)
    q, k, v = (x[0] for x in qkv(1, t, 32, 8, 128, torch.bfloat16, 77))
    plan = random_plan(len(lens), 32, mx, 128, 0.3, 78, proxy_like=False)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((32, t), float("nan"), device="cuda")
    attn._launch_sparse(q, k, v, plan.order, plan.counts, cu, mx, 128, 0.088, with_lse=True, out=out, lse=lse)
    ro, rl = _varlen_reference(q, k, v, cu, plan, 0.088)
    assert_close(out, ro, "bf16", what="varlen out")
    assert_close(lse, rl, "fp16", allow_inf=True, what="varlen lse")
    poison_allocator(4 * q.numel() * 2)
    out2 = proxyattn.block_sparse_attention_varlen(q, k, v, cu, mx, plan, scale=0.088)
    assert_close(out2, ro, "bf16", what="public varlen out")


def check_dense(s: int) -> str:
    """The dense path (cuDNN through SDPA) against the reference; returns the dense mode taken."""
    q, k, v = qkv(1, s, 32, 8, 128, torch.bfloat16, 5 + s)
    poison_allocator(4 * q.numel() * 2)
    out = proxyattn.dense_attention(q, k, v)
    assert_close(out, reference.dense_attention(q, k, v, 128**-0.5), "bf16", what="dense")
    return attn._dense_mode(q, k, v)


PROXY_S = 8192 + 100


def check_proxy() -> float:
    """proxy_attention at S=8292, gamma 0.9, against reference attention on the GPU plan; returns the mean density."""
    q, k, v = qkv(1, PROXY_S, 32, 8, 128, torch.bfloat16, 99)
    cfg = ProxyAttnConfig(gamma=0.9)
    poison_allocator(4 * q.numel() * 2)
    out = proxyattn.proxy_attention(q, k, v, cfg)
    plan = proxyattn.plan_blocks(q, k, cfg)
    ro, _ = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=128, scale=128**-0.5)
    assert_close(out, ro, "bf16", what="proxy_attention")
    return plan.density().mean().item()


COLUMN_SHAPES = [  # (B, S, Hq, Hkv, D, block, proxy_heads): ragged S, GQA 4/7/1, D 128/64/256, B 2
    (1, 8192 + 100, 32, 8, 128, 128, 1),
    (2, 5000, 7, 1, 64, 64, 1),
    (1, 4096, 4, 4, 256, 128, 2),
]


def check_columns(i: int) -> float:
    """proxy_attention with vertical columns (plan on the GPU, then the block-sparse and the column kernel) against
    the reference attention on the same plan (blocks and columns), on structured inputs; the output is poisoned
    first. Returns the output's relative error against dense attention."""
    from proxyattn.testing import structured_qkv

    b, s, hq, hkv, d, bs, g = COLUMN_SHAPES[i]
    q, k, v = structured_qkv(b, s, hq, hkv, d, dtype=torch.bfloat16, device="cuda", seed=s + i)
    cfg = ProxyAttnConfig(
        block_size=bs, proxy_heads=g, column_fraction=0.03, budget_fraction=0.05, min_budget_tokens=2 * bs, dense_below_tokens=0
    )
    plan = proxyattn.plan_blocks(q, k, cfg)
    assert plan.columns is not None and plan.columns.shape == (b, g, cfg.num_columns(s))
    poison_allocator(4 * q.numel() * 2)
    out, lse = proxyattn.block_sparse_attention_with_lse(q, k, v, plan)
    ro, rl = reference.block_sparse_attention(q, k, v, plan.to_mask(), block_size=bs, scale=d**-0.5, columns=plan.columns)
    assert_close(out, ro, "bf16", what="blocks + columns")
    assert_close(lse, rl, "fp16", allow_inf=True, what="blocks + columns lse")
    assert_close(proxyattn.proxy_attention(q, k, v, cfg), ro, "bf16", what="proxy_attention with columns")
    dense = reference.dense_attention(q, k, v, d**-0.5)
    return ((ro - dense).norm() / dense.norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="4K-16K only")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"GPU {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)

    # Every config the autotuner may pick, TMA and pointer loads, both masking variants: 4K, main shape, ragged.
    q, k, v, plan = tuning_inputs()
    for tma in (True, False):
        for cfg in tuning_configs(q, tma):
            record(f"config {cfg} tma={tma}", lambda cfg=cfg, tma=tma: check_sparse(q, k, v, plan, 0.088, use_tma=tma, config=cfg))
    record("mask every tile (DIAG_BRANCH=False)", lambda: check_sparse(q, k, v, plan, 0.088, use_tma=True, config=EVERY_TILE))

    for i, (b, s, hq, hkv, d, bs, dt) in enumerate(AUTOTUNED_SHAPES):
        record(f"autotuned B={b} S={s} Hq={hq} Hkv={hkv} D={d} block={bs} {dt}", lambda i=i: check_autotuned(i))

    # Public API (allocates its outputs: poison the allocator first), 16K and 32K, main shape.
    for s in [16384] if args.quick else [16384, 32768]:
        record(f"public block_sparse_attention_with_lse S={s}", lambda s=s: check_public(s))
    record(f"varlen lengths {VARLEN_LENGTHS}", check_varlen)

    # Dense path (cuDNN through SDPA) and whole proxy_attention (attention given the GPU plan).
    for s in (4096, 16384):

        def run_dense(s=s):
            print(f"   dense mode: {check_dense(s)}")

        record(f"dense_attention S={s}", run_dense)

    def run_proxy():
        print(f"   density {check_proxy():.3f}")

    record(f"proxy_attention S={PROXY_S} gamma=0.9 (vs reference attention on the GPU plan)", run_proxy)
    for i, shape in enumerate(COLUMN_SHAPES):

        def run_columns(i=i):
            print(f"   error vs dense {check_columns(i):.3f}")

        record(f"vertical columns (B, S, Hq, Hkv, D, block, proxy_heads)={shape}", run_columns)

    failed = [r for r in RESULTS if not r[1]]
    print(f"\n{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed")
    for name, _, msg in failed:
        print(f"FAILED {name}: {msg}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
