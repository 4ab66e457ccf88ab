"""Launch parameters: the C launcher against the Python launchers. libproxyattn runs on a recording stand-in for
libcuda.so.1 (cpp/tests/fake_cuda.cpp), the Python GPU path's launch code runs on CPU tensors with its Triton kernels
replaced by recorders; every grid, block size and scalar parameter must agree, and pointers must follow the same
data flow (padded, BHSD and packed batches; the dense, static-budget, recall and row-recall paths; budget rule 3 and
the dense fallback, with the needs kernels' chunks of query blocks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from proxyattn import ProxyAttnConfig
from proxyattn.kernels import estimate_needs as EN
from tests.helpers import ROOT

Q, K, V, O, WS, CU = 0x10000000, 0x20000000, 0x30000000, 0x40000000, 0x50000000, 0x60000000
HELPER_SIZES = {
    "pa_budgets": [8, 8, 8, 4, 4, 4, 4, 4, 8, 4, 8, 4, 4, 4, 4],
    "pa_select": [8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
    "pa_combine_lse": [8, 8, 8, 4, 4, 4],
    "pa_early_dense": [8, 8, 8, 4, 4, 4, 4, 4, 4],
    "pa_needs_budgets": [8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
    "pa_dense_fallback": [8, 8, 8, 4, 4, 4, 4, 4],
}

_C_SIDE = r"""
import ctypes as C, json
from pathlib import Path
from tests.cpp.libproxyattn import Config, load_lib, problem
build, case = Path({build!r}), json.loads({case!r})
HELPER_SIZES = json.loads({helper_sizes!r})
fake = C.CDLL(str(build / "libproxyattn_fakecuda.so"))
manifest = json.loads((build / "generated" / "manifest.json").read_text())
for k in manifest["kernels"]:
    sizes = [8 if t.startswith("*") else 1 if t == "i1" else 4 for t in k["param_types"]] + [8, 8]
    fake.fake_set_param_sizes(k["entry"].encode(), (C.c_int * len(sizes))(*sizes), len(sizes))
for name, sizes in HELPER_SIZES.items():
    fake.fake_set_param_sizes(name.encode(), (C.c_int * len(sizes))(*sizes), len(sizes))
lib = load_lib(build)
cfg = Config()
lib.proxyattn_config_default(C.byref(cfg))
for key, value in case.get("config", {{}}).items():
    setattr(cfg, key, value)
prob = problem(**case["problem"])
n = C.c_size_t(0)
assert lib.proxyattn_workspace_size(C.byref(prob), C.byref(cfg), C.byref(n)) == 0
st = lib.proxyattn_prefill(C.byref(prob), C.byref(cfg), {Q}, {K}, {V}, {O}, None, {WS}, n.value, None)
assert st == 0, lib.proxyattn_last_error()
out = []
fake.fake_launch_info.restype = C.c_int
for i in range(fake.fake_launch_count()):
    name = C.create_string_buffer(128)
    grid, block, shared = (C.c_uint * 3)(), C.c_uint(), C.c_uint()
    params = (C.c_uint64 * 64)()
    np_ = fake.fake_launch_info(i, name, 128, grid, C.byref(block), C.byref(shared), params, 64)
    out.append(dict(entry=name.value.decode(), grid=list(grid), block=block.value, shared=shared.value,
                    params=list(params[:np_])))
print(json.dumps(dict(ws=n.value, launches=out)))
"""


def _c_run(build, case) -> dict:
    """libproxyattn's prefill of `case` on the recording libcuda stand-in, in a subprocess (the stand-in is loaded
    in place of libcuda.so.1): {"ws": workspace bytes, "launches": [{entry, grid, block, shared, params}, ...]}."""
    code = _C_SIDE.format(build=str(build), case=json.dumps(case), helper_sizes=json.dumps(HELPER_SIZES), Q=Q, K=K, V=V, O=O, WS=WS)
    env = dict(os.environ, PROXYATTN_LIBCUDA=str(build / "libproxyattn_fakecuda.so"))
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


class _Recorder:
    def __init__(self, kernel, calls, tag):
        import inspect

        self.names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        self.calls, self.tag = calls, tag

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named = dict(zip(self.names, args))
            named.update(kwargs)
            self.calls.append((self.tag, tuple(grid) + (1,) * (3 - len(grid)), named))

        return launch


def _python_launches(case, monkeypatch):
    """The Python GPU path's launches for `case`, recorded on CPU tensors (nothing runs)."""
    from proxyattn.kernels import attention as A
    from proxyattn.kernels import estimate_budgets as EB
    from proxyattn.kernels import estimate_scores as ES

    calls = []
    monkeypatch.setattr(ES, "_pool_heads_kernel", _Recorder(ES._pool_heads_kernel, calls, "_pool_heads_kernel"))
    for name in ("_proxy_rows_kernel", "_scores_from_rows_kernel"):
        monkeypatch.setattr(ES, name, _Recorder(getattr(ES, name), calls, name))
    monkeypatch.setattr(EB, "_budget_kernel", _Recorder(EB._budget_kernel, calls, "_budget_kernel"))
    monkeypatch.setattr(EB, "_finish_mass_kernel", _Recorder(EB._finish_mass_kernel, calls, "_finish_mass_kernel"))
    # The log-sum-exp combine between the mass kernels: the library's CUDA C helper pa_combine_lse (checked below).
    monkeypatch.setattr(EB, "_combine_lse_kernel", _Recorder(EB._combine_lse_kernel, calls, "_combine_lse_kernel"))
    monkeypatch.setattr(A, "_sparse_attn_fwd_kernel", _Recorder(A._sparse_attn_fwd_kernel, calls, "_sparse_attn_fwd_kernel"))
    monkeypatch.setattr(A, "_env_interpret", lambda: True)  # fixed config: no autotuner
    p = case["problem"]
    cfg = RULE2
    d, hq, hkv, b, s = p["d"], p["hq"], p["hkv"], p["b"], p["s"]
    scale = 1.0 / math.sqrt(d)
    nb = math.ceil(s / cfg.block_size)
    tensors = {}
    if "lengths" in case:
        t = sum(case["lengths"])
        q, k, v = torch.empty(t, hq, d, dtype=torch.bfloat16), torch.empty(t, hkv, d, dtype=torch.bfloat16), None
        v = torch.empty_like(k)
        cu = torch.tensor([0] + list(np.cumsum(case["lengths"])), dtype=torch.int32)
        tensors[id(cu)] = CU
    elif p.get("layout") == 1:
        q = torch.empty(b, hq, s, d, dtype=torch.bfloat16).transpose(1, 2)
        k, v = (torch.empty(b, hkv, s, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        cu = None
    else:
        q, k, v = torch.empty(b, s, hq, d, dtype=torch.bfloat16), *(torch.empty(b, s, hkv, d, dtype=torch.bfloat16) for _ in range(2))
        cu = None
    tensors.update({id(q): Q, id(k): K, id(v): V})
    # The library measures the mass first (the dense fallback's early decision needs it before the scores).
    EB._launch_mass(q, k, cu, b, s, cfg.block_size, scale, rows=cfg.budget_rule == 2)
    if cu is None:
        ES.proxy_scores(q, k, cfg, scale)
    else:
        ES.proxy_scores_varlen(q, k, cu, s, cfg, scale)
    order = torch.zeros(b, cfg.proxy_heads, nb, nb, dtype=torch.int32)
    counts = torch.zeros(b, hq, nb, dtype=torch.int32)
    out, _ = A._launch_sparse(
        q,
        k,
        v,
        order,
        counts,
        cu,
        s,
        cfg.block_size,
        scale,
        with_lse=True,
        use_tma=False,
        config={"BLOCK_N": 64, "num_warps": 8, "num_stages": 3},
    )
    tensors[id(out)] = O
    return [c for c in calls if c[0] != "_combine_lse_kernel"], tensors


# 9000-token sequences run the estimation with dense_below_tokens 8192 (the default crossover is 32768).
SPARSE_BELOW = 8192
# The rules 0-2 cases run budget rule 2 without the dense fallback (rule 3 and the fallback: further below).
RULE2 = ProxyAttnConfig(budget_rule=2, dense_density=None, dense_below_tokens=SPARSE_BELOW)
_RULE2_C = {"dense_below_tokens": SPARSE_BELOW, "budget_rule": 2, "dense_density": 0.0}
LAUNCH_CASES = {
    "padded": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128), "config": _RULE2_C},
    "bhsd": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128, layout=1), "config": _RULE2_C},
    "varlen": {"problem": dict(b=3, s=9000, hq=8, hkv=2, d=128, cu=CU, total=10300), "lengths": [1000, 9000, 300], "config": _RULE2_C},
}


@pytest.mark.parametrize("name", list(LAUNCH_CASES))
def test_launch_parameters_equal_the_python_launchers(build, monkeypatch, name):
    case = LAUNCH_CASES[name]
    got = _c_run(build, case)
    ws_lo, ws_hi = WS, WS + got["ws"]
    c_launches = got["launches"]
    manifest = {k["entry"]: k for k in json.loads((build / "generated" / "manifest.json").read_text())["kernels"]}
    py_calls, tensors = _python_launches(case, monkeypatch)
    c_triton = [l for l in c_launches if not l["entry"].startswith("pa_")]
    assert [l["entry"] for l in c_triton] == [c[0] for c in py_calls]
    ptr_of: dict[int, int] = dict(tensors)  # python tensor id -> C pointer, consistent across launches
    varlen = "lengths" in case
    for c, (entry, grid, named) in zip(c_triton, py_calls):
        m = manifest[entry]
        assert tuple(c["grid"]) == grid, (entry, c["grid"], grid)
        assert c["block"] == named["num_warps"] * 32, entry
        for pname, ptype, value in zip(m["params"], m["param_types"], c["params"]):
            want = named[pname]
            if ptype.startswith("*"):
                if pname == "cu_ptr" and not varlen:
                    continue  # read only by VARLEN kernels
                if entry == "_budget_kernel" and named["PASS"] == 0 and pname == "lse_ptr":
                    continue  # unused by pass 0
                key = id(want)
                if key in ptr_of:
                    assert value == ptr_of[key], (entry, pname)
                else:
                    assert ws_lo <= value < ws_hi and value % 16 == 0, (entry, pname, hex(value))
                    assert value not in ptr_of.values(), (entry, pname, "workspace buffer reused for another tensor")
                    ptr_of[key] = value
            elif ptype == "fp32":
                assert np.uint32(value).view(np.float32) == np.float32(want), (entry, pname, want)
            elif name == "bhsd" and entry == "_sparse_attn_fwd_kernel" and pname in ("stride_ob", "stride_os", "stride_oh"):
                # The library writes out in q's layout ([B, H, S, D]); the Python path allocates [B, S, H, D].
                p_ = case["problem"]
                want_o = {"stride_ob": p_["hq"] * p_["s"] * p_["d"], "stride_os": p_["d"], "stride_oh": p_["s"] * p_["d"]}
                assert value == want_o[pname], (pname, value)
            else:
                assert np.uint32(value).view(np.int32) == int(want), (entry, pname, value, want)
        assert c["params"][-2:] == [0, 0]  # Triton 3.6's global and profile scratch pointers
    # The CUDA C helpers: the torch ops of the Python path between the kernels, with the same buffers.
    p = case["problem"]
    nb = math.ceil(p["s"] / 128)
    by_entry = {l["entry"]: l for l in c_launches}
    (pass0,) = [c for c in c_triton if c["entry"] == "_budget_kernel"]
    (fin,) = [c for c in c_triton if c["entry"] == "_finish_mass_kernel"]
    scores = [c for c in c_triton if c["entry"] == "_scores_from_rows_kernel"][0]
    attn = c_triton[-1]
    comb, bud, sel = by_entry["pa_combine_lse"], by_entry["pa_budgets"], by_entry["pa_select"]
    cu_expect = CU if varlen else 0
    assert comb["params"][:3] == [pass0["params"][3], pass0["params"][4], fin["params"][1]]
    assert comb["params"][3:] == [p["b"] * p["hq"], pass0["params"][-4], 128]
    assert fin["params"][0] == pass0["params"][6]  # pass 0's log2 block masses
    assert bud["grid"] == [p["hq"], p["b"], 1] and bud["params"][0] == fin["params"][2]
    assert bud["params"][2] == cu_expect and bud["params"][3:8] == [p["s"], 128, nb, 1, np.float32(ProxyAttnConfig().gamma).view(np.uint32)]
    dense_below = SPARSE_BELOW
    assert bud["params"][8:10] == [0, dense_below]
    # Scores (read by budget_rules 1 and 2), rankings G, budget_rule 2, keep_sink, keep_diagonal.
    assert bud["params"][10:] == [scores["params"][3], 1, 2, 1, 1]
    assert sel["grid"] == [nb, 1, p["b"]] and sel["params"][0] == scores["params"][3]
    assert sel["params"][1] == bud["params"][1] and sel["params"][2:4] == attn["params"][5:7]
    assert sel["params"][4:] == [cu_expect, p["s"], 128, nb, p["hq"], 16, 1, 1, dense_below]


def _c_launches(build, case):
    return _c_run(build, case)["launches"]


def test_launches_of_the_dense_and_static_budget_paths(build):
    # Padded batch at or below dense_below_tokens: no estimation, the keep-everything plan, the sparse kernel.
    dense = _c_launches(build, {"problem": dict(b=2, s=2000, hq=8, hkv=2, d=128)})
    assert [l["entry"] for l in dense] == ["pa_budgets", "pa_select", "_sparse_attn_fwd_kernel"]
    assert dense[1]["params"][-1] == ProxyAttnConfig().dense_below_tokens and dense[1]["grid"] == [16, 1, 2]
    assert dense[2]["grid"] == [2 * 8 * 16, 1, 1]
    # budget_fraction: scores but no attention-mass kernels; the fraction reaches the budgets kernel as a double.
    # The dense fallback (default 0.8) has no early decision with a fixed fraction (api.early_dense_groups gives
    # None), only the late one on the plan: pa_dense_fallback with no early flags (NULL) and the default permille.
    frac = _c_launches(
        build, {"problem": dict(b=1, s=9000, hq=8, hkv=2, d=128), "config": {"budget_fraction": 0.25, "dense_below_tokens": SPARSE_BELOW}}
    )
    assert [l["entry"] for l in frac] == [
        "_pool_heads_kernel",
        "_pool_heads_kernel",
        "_proxy_rows_kernel",
        "_scores_from_rows_kernel",
        "pa_budgets",
        "pa_select",
        "pa_dense_fallback",
        "_sparse_attn_fwd_kernel",
    ]
    assert np.uint64(frac[4]["params"][8]).view(np.float64) == 0.25
    fb = frac[6]
    assert fb["grid"] == [2, 1, 1] and fb["params"][0] == frac[5]["params"][3] == frac[7]["params"][6]  # counts
    assert fb["params"][1:] == [0, 0, 9000, 128, math.ceil(9000 / 128), 8, ProxyAttnConfig().dense_density_permille]
    off = _c_launches(
        build,
        {
            "problem": dict(b=1, s=9000, hq=8, hkv=2, d=128),
            "config": {"budget_fraction": 0.25, "dense_below_tokens": SPARSE_BELOW, "dense_density": 0.0},
        },
    )
    assert "pa_dense_fallback" not in [l["entry"] for l in off]


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128), dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_recall_budget_rule(build, problem):
    # budget_rule 1: the same kernels and buffers as rule 0; pa_budgets reads the proxy scores the scores kernel
    # wrote, with G rankings.
    cfg = {"budget_rule": 1, "proxy_heads": 2, "keep_sink": 0, "dense_density": 0.0}
    got = _c_launches(build, {"problem": problem, "config": {**cfg, "dense_below_tokens": SPARSE_BELOW}})
    base = _c_launches(
        build,
        {
            "problem": problem,
            "config": {"proxy_heads": 2, "keep_sink": 0, "budget_rule": 0, "dense_below_tokens": SPARSE_BELOW, "dense_density": 0.0},
        },
    )
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    scores = [l for l in got if l["entry"] == "_scores_from_rows_kernel"][0]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    bud0 = [l for l in base if l["entry"] == "pa_budgets"][0]
    assert bud["params"][10:] == [scores["params"][3], 2, 1, 0, 1]
    assert bud["params"][:10] == bud0["params"][:10] and bud["shared"] == bud0["shared"] == (2 * math.ceil(9000 / 128) + 128) * 4
    # The dense path has no scores: NULL (never read, every sequence keeps all blocks).
    dense = _c_launches(build, {"problem": dict(b=1, s=2000, hq=8, hkv=4, d=128), "config": cfg})
    assert dense[0]["entry"] == "pa_budgets" and dense[0]["params"][10:] == [0, 2, 1, 0, 1]


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128), dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_row_recall_budget_rule(build, problem):
    # budget_rule 2: the same kernels (the finish kernel compiled with ROWS), a per-row mass buffer block_size times larger,
    # pa_budgets with room for the rows' needs in shared memory and the scores of G rankings.
    code = {}
    for rule in (1, 2):
        cfg = {"budget_rule": rule, "proxy_heads": 2, "dense_below_tokens": SPARSE_BELOW, "dense_density": 0.0}
        code[rule] = _c_run(build, {"problem": problem, "config": cfg})
    got, base = code[2]["launches"], code[1]["launches"]
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    nb, bh = math.ceil(9000 / 128), problem["b"] * problem["hq"]
    assert code[2]["ws"] - code[1]["ws"] >= bh * 127 * nb * 4 - 256  # the mass of every row
    scores = [l for l in got if l["entry"] == "_scores_from_rows_kernel"][0]
    fin = [l for l in got if l["entry"] == "_finish_mass_kernel"][0]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    assert bud["params"][0] == fin["params"][2]  # the finish kernel's mass buffer
    assert bud["params"][10:] == [scores["params"][3], 2, 2, 1, 1]
    assert bud["shared"] == (2 * nb + 128) * 4
    lo, hi = fin["params"][2], fin["params"][2] + bh * 128 * nb * 4
    assert hi <= WS + code[2]["ws"]
    others = {v for l in got for v in l["params"] if WS <= v < WS + code[2]["ws"] and v != lo}
    assert others and not any(lo < v < hi for v in others)  # no other workspace buffer inside the row masses


@pytest.mark.parametrize("min_budget_tokens", [0, 2048, 10000])
def test_unset_dense_below_tokens_resolves_as_in_python(build, min_budget_tokens):
    want = ProxyAttnConfig(min_budget_tokens=min_budget_tokens).dense_below_tokens
    s = want + 1  # just above the crossover: the sparse path
    got = _c_launches(
        build, {"problem": dict(b=1, s=s, hq=8, hkv=2, d=128), "config": {"min_budget_tokens": min_budget_tokens, "dense_below_tokens": -1}}
    )
    nbud = [l for l in got if l["entry"] == "pa_needs_budgets"][0]  # the default budget rule 3
    assert nbud["params"][9] == want
    assert "_pool_heads_kernel" in [l["entry"] for l in got]  # not the dense path


# ----------------------------------------------------------------------------------- budget rule 3, dense fallback
RULE3_CASES = {
    "padded": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128)},
    "bhsd": {"problem": dict(b=2, s=9000, hq=8, hkv=4, d=128, layout=1), "config": {"proxy_heads": 2, "keep_sink": 0}},
    "varlen": {"problem": dict(b=3, s=9000, hq=8, hkv=2, d=128, cu=CU, total=10300), "lengths": [1000, 9000, 300]},
    # 64 query / 8 KV heads (RB 32), 516 blocks: the needs scratch (B * Hkv * Nb * RB * 4 bytes per query block)
    # holds 504 query blocks under 512 MiB, so the needs kernels run in two chunks (504 + 12 query blocks). The
    # tensors are allocated, never touched: launches are recorded, not run.
    "chunked": {"problem": dict(b=2, s=66048, hq=64, hkv=8, d=128)},
}
_PY_RULE3_KERNELS = (
    "_pool_heads_kernel",
    "_proxy_rows_kernel",
    "_scores_from_rows_kernel",
    "_budget_kernel",
    "_combine_lse_kernel",
    "_finish_mass_kernel",
    "_early_dense_kernel",
    "_rank_kernel",
    "_mass_kernel",
    "_cut_kernel",
    "_sparse_attn_fwd_kernel",
)


def _rule3_config(case) -> ProxyAttnConfig:
    c = case.get("config", {})
    return ProxyAttnConfig(dense_below_tokens=SPARSE_BELOW, **{k: bool(v) if k == "keep_sink" else v for k, v in c.items()})


def _python_rule3_launches(case, monkeypatch):
    """The Python GPU path of plan_blocks + block_sparse_attention with the default config (budget rule 3 and the dense
    fallback), recorded on CPU tensors: api.early_dense_groups, proxy_scores, estimate_needs.needs_plan, the sparse
    kernel. Returns [(kernel, grid, named args)] and {id(tensor): C pointer} for q, k, v (and cu_seqlens)."""
    from proxyattn.kernels import attention as A
    from proxyattn.kernels import estimate_budgets as EB
    from proxyattn.kernels import estimate_rank as ER
    from proxyattn.kernels import estimate_scores as ES

    mods = {
        "_pool_heads_kernel": ES,
        "_proxy_rows_kernel": ES,
        "_scores_from_rows_kernel": ES,
        "_budget_kernel": EB,
        "_combine_lse_kernel": EB,
        "_finish_mass_kernel": EB,
        "_early_dense_kernel": EB,
        "_rank_kernel": ER,
        "_mass_kernel": EN,
        "_cut_kernel": EN,
        "_sparse_attn_fwd_kernel": A,
    }
    calls = []
    for name in _PY_RULE3_KERNELS:
        monkeypatch.setattr(mods[name], name, _Recorder(getattr(mods[name], name), calls, name))
    monkeypatch.setattr(A, "_env_interpret", lambda: True)  # fixed config: no autotuner
    cfg = _rule3_config(case)
    p = case["problem"]
    d, hq, hkv, b, s = p["d"], p["hq"], p["hkv"], p["b"], p["s"]
    scale = 1.0 / math.sqrt(d)
    tensors = {}
    if "lengths" in case:
        t = sum(case["lengths"])
        q, k, v = torch.empty(t, hq, d, dtype=torch.bfloat16), torch.empty(t, hkv, d, dtype=torch.bfloat16), None
        v = torch.empty_like(k)
        cu = torch.tensor([0] + list(np.cumsum(case["lengths"])), dtype=torch.int32)
        tensors[id(cu)] = CU
        early = EB.early_dense_groups_varlen(q, k, cu, s, cfg, scale)
        scores = ES.proxy_scores_varlen(q, k, cu, s, cfg, scale)
        plan = EN.needs_plan_varlen(q, k, cu, s, scores, cfg, scale, early=early)
    else:
        if p.get("layout") == 1:
            q = torch.empty(b, hq, s, d, dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.empty(b, hkv, s, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
        else:
            q, k, v = torch.empty(b, s, hq, d, dtype=torch.bfloat16), *(torch.empty(b, s, hkv, d, dtype=torch.bfloat16) for _ in range(2))
        cu = None
        early = EB.early_dense_groups(q, k, cfg, scale)
        scores = ES.proxy_scores(q, k, cfg, scale)
        plan = EN.needs_plan(q, k, scores, cfg, scale, early=early)
    tensors.update({id(q): Q, id(k): K, id(v): V})
    out, _ = A._launch_sparse(
        q,
        k,
        v,
        plan.order,
        plan.counts,
        cu,
        s,
        cfg.block_size,
        scale,
        with_lse=True,
        use_tma=False,
        config={"BLOCK_N": 64, "num_warps": 8 if cfg.block_size == 128 else 4, "num_stages": 2 if d == 256 else 3},
    )
    tensors[id(out)] = O
    return calls, tensors


@pytest.mark.parametrize("name", list(RULE3_CASES))
def test_block_recall_and_dense_fallback_launches_equal_the_python_launchers(build, monkeypatch, name):
    """Budget rule 3 with the dense fallback (the default config): the C launch sequence equals the Python GPU path's
    (api.early_dense_groups, proxy_scores, estimate_needs.needs_plan, the sparse kernel): the same Triton kernels in
    the same order, chunks of query blocks included, with equal grids, block sizes and scalars, and pointers that
    follow the same data flow (equal up to renaming); the CUDA C helpers take the place of the Triton early-decision
    kernel and of the torch ops, on the right buffers."""
    case = RULE3_CASES[name]
    cfg = _rule3_config(case)
    got = _c_run(build, {**case, "config": {"dense_below_tokens": SPARSE_BELOW, **case.get("config", {})}})
    ws_lo, ws_hi = WS, WS + got["ws"]
    c_all = got["launches"]
    manifest = {k["entry"]: k for k in json.loads((build / "generated" / "manifest.json").read_text())["kernels"]}
    py_calls, tensors = _python_rule3_launches(case, monkeypatch)
    py = [c for c in py_calls if c[0] not in ("_combine_lse_kernel", "_early_dense_kernel")]
    c_triton = [l for l in c_all if not l["entry"].startswith(("pa_", "cuMemset"))]
    assert [l["entry"] for l in c_triton] == [c[0] for c in py]
    p = case["problem"]
    b, s, hq, hkv = p["b"], p["s"], p["hq"], p["hkv"]
    nb = math.ceil(s / 128)
    n_chunks = sum(1 for c in py if c[0] == "_mass_kernel")
    assert n_chunks == (2 if name == "chunked" else 1)
    varlen = "lengths" in case
    # Pointers: equal up to a renaming (first appearance), q/k/v/out/cu_seqlens fixed; every other C pointer inside
    # the workspace. Skipped: cu_seqlens of padded batches (read only by VARLEN kernels), pass 0's unused lse, and
    # the sparse kernel's counts (the Python path's dense fallback makes a new tensor, the library rewrites the
    # plan's counts in place: checked below).
    py_label: dict[int, int] = {}
    c_label: dict[int, int] = {}
    fixed = {tensors[i]: f"fixed{tensors[i]}" for i in tensors}
    for c, (entry, grid, named) in zip(c_triton, py):
        m = manifest[entry]
        assert tuple(c["grid"]) == grid, (entry, c["grid"], grid)
        assert c["block"] == named["num_warps"] * 32, entry
        for pname, ptype, value in zip(m["params"], m["param_types"], c["params"]):
            want = named[pname]
            if ptype.startswith("*"):
                if (pname == "cu_ptr" and not varlen) or (entry == "_budget_kernel" and named["PASS"] == 0 and pname == "lse_ptr"):
                    continue
                if entry == "_sparse_attn_fwd_kernel" and pname == "counts_ptr":
                    continue
                lp = tensors.get(id(want)) and fixed[tensors[id(want)]] or py_label.setdefault(id(want), len(py_label))
                lc = fixed.get(value) or c_label.setdefault(value, len(c_label))
                assert lp == lc, (entry, pname, hex(value))
                if value not in fixed:
                    assert ws_lo <= value < ws_hi and value % 16 == 0, (entry, pname, hex(value))
            elif ptype == "fp32":
                assert np.uint32(value).view(np.float32) == np.float32(want), (entry, pname, want)
            elif name == "bhsd" and entry == "_sparse_attn_fwd_kernel" and pname in ("stride_ob", "stride_os", "stride_oh"):
                want_o = {"stride_ob": hq * s * p["d"], "stride_os": p["d"], "stride_oh": s * p["d"]}
                assert value == want_o[pname], (pname, value)
            else:
                assert np.uint32(value).view(np.int32) == int(want), (entry, pname, value, want)
        assert c["params"][-2:] == [0, 0]  # Triton 3.6's global and profile scratch pointers
    # Chunks: m_lo 0, slots, 2 * slots, ...; n_slots per cut grid; the same scratch for every chunk.
    mass = [c for c in c_triton if c["entry"] == "_mass_kernel"]
    cut = [c for c in c_triton if c["entry"] == "_cut_kernel"]
    slots = mass[0]["params"][10]
    assert [c["params"][9] for c in mass] == list(range(0, nb, slots))
    assert [c["grid"][1] for c in cut] == [min(slots, nb - lo) for lo in range(0, nb, slots)]
    assert len({c["params"][4] for c in mass}) == 1 and all(c["params"][0] == mass[0]["params"][4] for c in cut)
    # The needs scratch [B*Hkv, slots, Nb, RB] float32 lies inside the workspace, disjoint from every other buffer.
    rb = 1 << (hq // hkv * cfg.recall_rows - 1).bit_length()  # next power of two of group x rows
    lo, hi = mass[0]["params"][4], mass[0]["params"][4] + b * hkv * slots * nb * rb * 4
    assert hi <= ws_hi and b * hkv * slots * nb * rb * 4 <= EN._SCRATCH_BYTES  # the Python path's bound (512 MiB)
    others = {v for l in c_all for v in l["params"] if ws_lo <= v < ws_hi and v != lo}
    assert not any(lo < v < hi for v in others)
    # The CUDA C helpers, in order, on the right buffers.
    helpers = [l for l in c_all if l["entry"].startswith(("pa_", "cuMemset"))]
    assert [l["entry"] for l in helpers] == ["pa_combine_lse", "pa_budgets", "pa_early_dense", "pa_needs_budgets", "pa_dense_fallback"]
    comb, bud0, early, nbud, fb = helpers
    (pass0,) = [c for c in c_triton if c["entry"] == "_budget_kernel"]
    (fin,) = [c for c in c_triton if c["entry"] == "_finish_mass_kernel"]
    rank = [c for c in c_triton if c["entry"] == "_rank_kernel"][0]
    attn = c_triton[-1]
    cu_h = CU if varlen else 0
    g = cfg.proxy_heads
    assert comb["params"][:3] == [pass0["params"][3], pass0["params"][4], fin["params"][1]]
    assert fin["params"][0] == pass0["params"][6]  # pass 0's log2 block masses
    # The early decision: the paper's budgets (rule 0, no dense sequences: -1) from the mean mass, no scores.
    assert bud0["grid"] == [hq, b, 1] and bud0["params"][0] == fin["params"][2]
    assert bud0["params"][2:8] == [cu_h, s, 128, nb, 1, np.float32(ProxyAttnConfig().gamma).view(np.uint32)]
    assert bud0["params"][8] == 0 and np.uint32(bud0["params"][9]).view(np.int32) == -1
    assert bud0["params"][10:] == [0, g, 0, int(cfg.keep_sink), 1]
    assert early["params"] == [bud0["params"][1], mass[0]["params"][3], cu_h, s, 128, hq, hkv, b, cfg.dense_density_permille]
    assert early["grid"] == [math.ceil(b * hkv / 256), 1, 1]
    flags = early["params"][1]
    assert all(c["params"][3] == flags for c in mass) and all(c["params"][6] == flags for c in cut)  # skip flags
    # Rule 3's budgets from the needs; the late decision on the cut kernel's counts, in place, read by the sparse kernel.
    need, counts = cut[0]["params"][7], cut[0]["params"][8]
    assert nbud["params"] == [need, nbud["params"][1], cu_h, s, 128, nb, hq, b, 16, SPARSE_BELOW, 0]
    assert fb["grid"] == [hkv, b, 1] and fb["params"] == [counts, flags, cu_h, s, 128, nb, hq, cfg.dense_density_permille]
    assert attn["params"][5:7] == [rank["params"][1], counts]  # order, counts
    assert rank["params"][0] == [c for c in c_triton if c["entry"] == "_scores_from_rows_kernel"][0]["params"][3]


def test_block_recall_without_the_fallback_and_with_gamma_one(build):
    # dense_density 0: no mass passes and no early decision; the skip flags are zeroed (the compiled kernels keep
    # SKIP on), no pa_dense_fallback.
    prob = dict(b=2, s=9000, hq=8, hkv=2, d=128)
    off = _c_launches(build, {"problem": prob, "config": {"dense_below_tokens": SPARSE_BELOW, "dense_density": 0.0}})
    assert [l["entry"] for l in off] == [
        "cuMemsetD32Async",
        "_pool_heads_kernel",
        "_pool_heads_kernel",
        "_proxy_rows_kernel",
        "_scores_from_rows_kernel",
        "_rank_kernel",
        "_mass_kernel",
        "_cut_kernel",
        "pa_needs_budgets",
        "_sparse_attn_fwd_kernel",
    ]
    assert off[0]["params"][1:] == [0, 2 * 2] and off[0]["params"][0] == off[6]["params"][3] == off[7]["params"][6]
    # gamma 1: every block, as the Python path's full needs: no needs kernels, the flags set to 1 make every group
    # keep every causal block (pa_dense_fallback), the reported budgets are Nb_b (full=1).
    one = _c_launches(build, {"problem": prob, "config": {"dense_below_tokens": SPARSE_BELOW, "gamma": 1.0}})
    assert [l["entry"] for l in one] == [
        "cuMemsetD32Async",
        "_pool_heads_kernel",
        "_pool_heads_kernel",
        "_proxy_rows_kernel",
        "_scores_from_rows_kernel",
        "_rank_kernel",
        "pa_needs_budgets",
        "pa_dense_fallback",
        "_sparse_attn_fwd_kernel",
    ]
    assert one[0]["params"][1:] == [1, 4] and one[7]["params"][1] == one[0]["params"][0]
    assert one[6]["params"][-1] == 1
    # KEEP_SINK / KEEP_DIAG reach the ranking kernel as one-byte values, and the cut kernel as int32.
    nosink = _c_launches(build, {"problem": prob, "config": {"dense_below_tokens": SPARSE_BELOW, "keep_sink": 0}})
    rank = [l for l in nosink if l["entry"] == "_rank_kernel"][0]
    cut = [l for l in nosink if l["entry"] == "_cut_kernel"][0]
    assert rank["params"][6:8] == [0, 1] and cut["params"][19:21] == [0, 1]


@pytest.mark.parametrize("rule", [0, 1, 2])
def test_dense_fallback_launches_with_rules_0_to_2(build, rule):
    # One mass computation serves the early decision (rule 0 budgets, no dense sequences) and the rule's budgets
    # (rule 2 adds the finish kernel with ROWS); the late decision runs on pa_select's counts with the early flags.
    prob = dict(b=3, s=9000, hq=8, hkv=2, d=128, cu=CU, total=10300)
    got = _c_launches(build, {"problem": prob, "config": {"dense_below_tokens": SPARSE_BELOW, "budget_rule": rule}})
    entries = [l["entry"] for l in got]
    passes = ["_budget_kernel", "pa_combine_lse", "_finish_mass_kernel"] + (["_finish_mass_kernel"] if rule == 2 else [])
    assert entries == passes + [
        "pa_budgets",
        "pa_early_dense",
        "_pool_heads_kernel",
        "_pool_heads_kernel",
        "_proxy_rows_kernel",
        "_scores_from_rows_kernel",
        "pa_budgets",
        "pa_select",
        "pa_dense_fallback",
        "_sparse_attn_fwd_kernel",
    ]
    kern = [l for l in got if l["entry"] == "_finish_mass_kernel"]
    bud0, bud = [l for l in got if l["entry"] == "pa_budgets"]
    early = [l for l in got if l["entry"] == "pa_early_dense"][0]
    sel, fb = [l for l in got if l["entry"] == "pa_select"][0], [l for l in got if l["entry"] == "pa_dense_fallback"][0]
    assert bud0["params"][0] == kern[0]["params"][2] and bud0["params"][12] == 0  # mean mass, rule 0
    assert bud["params"][0] == kern[-1]["params"][2] and bud["params"][12] == rule  # rule 2: the row masses
    assert [k["params"][0] for k in kern] == [[l for l in got if l["entry"] == "_budget_kernel"][0]["params"][6]] * len(kern)
    assert bud["params"][9] == SPARSE_BELOW and np.uint32(bud0["params"][9]).view(np.int32) == -1
    assert early["params"][0] == bud0["params"][1] and early["params"][-1] == ProxyAttnConfig().dense_density_permille
    assert fb["params"][:2] == [sel["params"][3], early["params"][1]] and fb["params"][2] == CU
