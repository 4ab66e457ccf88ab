"""Launch parameters: the C launcher against the Python launchers. libproxyattn runs on a recording stand-in for
libcuda.so.1 (cpp/tests/fake_cuda.cpp), the Python GPU path's launch code runs on CPU tensors with its Triton kernels
replaced by recorders; every grid, block size and scalar parameter must agree, and pointers must follow the same
data flow (padded, BHSD and packed batches; the dense, static-budget, recall and row-recall paths)."""

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
from tests.cpp.libproxyattn import LIB_DEFAULT
from tests.helpers import ROOT

Q, K, V, O, WS, CU = 0x10000000, 0x20000000, 0x30000000, 0x40000000, 0x50000000, 0x60000000
HELPER_SIZES = {"pa_budgets": [8, 8, 8, 4, 4, 4, 4, 4, 8, 4, 8, 4, 4, 4, 4], "pa_select": [8, 8, 8, 8, 8, 4, 4, 4, 4, 4, 4, 4, 4],
                "pa_combine_lse": [8, 8, 8, 4, 4, 4]}

_C_SIDE = r"""
import ctypes as C, json
from pathlib import Path
from tests.cpp.libproxyattn import Config, load_lib, problem
build, case = Path({build!r}), json.loads({case!r})
HELPER_SIZES = json.loads({helper_sizes!r})
fake = C.CDLL(str(build / "libproxyattn_fakecuda.so"))
manifest = json.loads((build / "generated" / "manifest.json").read_text())
for k in manifest["kernels"]:
    sizes = [8 if t.startswith("*") else 4 for t in k["param_types"]] + [8, 8]
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
    code = _C_SIDE.format(build=str(build), case=json.dumps(case), helper_sizes=json.dumps(HELPER_SIZES), Q=Q, K=K, V=V,
                          O=O, WS=WS)
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
    monkeypatch.setattr(ES, "_proxy_scores_kernel", _Recorder(ES._proxy_scores_kernel, calls, "_proxy_scores_kernel"))
    monkeypatch.setattr(EB, "_budget_kernel", _Recorder(EB._budget_kernel, calls, "_budget_kernel"))
    # The log-sum-exp combine between the mass passes: the library's CUDA C helper pa_combine_lse (checked below).
    monkeypatch.setattr(EB, "_combine_lse_kernel", _Recorder(EB._combine_lse_kernel, calls, "_combine_lse_kernel"))
    monkeypatch.setattr(A, "_sparse_attn_fwd_kernel", _Recorder(A._sparse_attn_fwd_kernel, calls, "_sparse_attn_fwd_kernel"))
    monkeypatch.setattr(A, "_env_interpret", lambda: True)  # fixed config: no autotuner
    p = case["problem"]
    cfg = LIB_DEFAULT
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
    if cu is None:
        ES.proxy_scores(q, k, cfg, scale)
    else:
        ES.proxy_scores_varlen(q, k, cu, s, cfg, scale)
    EB._launch_mass(q, k, cu, b, s, cfg.block_size, scale, rows=cfg.budget_rule == 2)
    order = torch.zeros(b, cfg.proxy_heads, nb, nb, dtype=torch.int32)
    counts = torch.zeros(b, hq, nb, dtype=torch.int32)
    out, _ = A._launch_sparse(q, k, v, order, counts, cu, s, cfg.block_size, scale, with_lse=True, use_tma=False,
                              config={"BLOCK_N": 64, "num_warps": 8, "num_stages": 3})
    tensors[id(out)] = O
    return [c for c in calls if c[0] != "_combine_lse_kernel"], tensors


# 9000-token sequences run the estimation with dense_below_tokens 8192 (the default crossover is 32768).
SPARSE_BELOW = 8192
LAUNCH_CASES = {
    "padded": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128), "config": {"dense_below_tokens": SPARSE_BELOW}},
    "bhsd": {"problem": dict(b=2, s=9000, hq=8, hkv=2, d=128, layout=1), "config": {"dense_below_tokens": SPARSE_BELOW}},
    "varlen": {"problem": dict(b=3, s=9000, hq=8, hkv=2, d=128, cu=CU, total=10300), "lengths": [1000, 9000, 300],
               "config": {"dense_below_tokens": SPARSE_BELOW}},
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
    pass0, pass1 = [c for c in c_triton if c["entry"] == "_budget_kernel"]
    scores = [c for c in c_triton if c["entry"] == "_proxy_scores_kernel"][0]
    attn = c_triton[-1]
    comb, bud, sel = by_entry["pa_combine_lse"], by_entry["pa_budgets"], by_entry["pa_select"]
    cu_expect = CU if varlen else 0
    assert comb["params"][:3] == [pass0["params"][3], pass0["params"][4], pass1["params"][5]]
    assert comb["params"][3:] == [p["b"] * p["hq"], pass0["params"][-4], 128]
    assert bud["grid"] == [p["hq"], p["b"], 1] and bud["params"][0] == pass1["params"][6]
    assert bud["params"][2] == cu_expect and bud["params"][3:8] == [p["s"], 128, nb, 1, np.float32(0.95).view(np.uint32)]
    dense_below = SPARSE_BELOW
    assert bud["params"][8:10] == [0, dense_below]
    # Scores (read by budget_rules 1 and 2), rankings G, budget_rule 2 (the library's default), keep_sink, keep_diagonal.
    assert bud["params"][10:] == [scores["params"][3], 1, LIB_DEFAULT.budget_rule, 1, 1]
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
    frac = _c_launches(build, {"problem": dict(b=1, s=9000, hq=8, hkv=2, d=128),
                               "config": {"budget_fraction": 0.25, "dense_below_tokens": SPARSE_BELOW}})
    assert [l["entry"] for l in frac] == ["_pool_heads_kernel", "_pool_heads_kernel", "_proxy_scores_kernel",
                                          "pa_budgets", "pa_select", "_sparse_attn_fwd_kernel"]
    assert np.uint64(frac[3]["params"][8]).view(np.float64) == 0.25


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128),
                                     dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_recall_budget_rule(build, problem):
    # budget_rule 1: the same kernels and buffers as rule 0; pa_budgets reads the proxy scores the scores kernel
    # wrote, with G rankings.
    cfg = {"budget_rule": 1, "proxy_heads": 2, "keep_sink": 0}
    got = _c_launches(build, {"problem": problem, "config": {**cfg, "dense_below_tokens": SPARSE_BELOW}})
    base = _c_launches(build, {"problem": problem, "config": {"proxy_heads": 2, "keep_sink": 0, "budget_rule": 0,
                                                                 "dense_below_tokens": SPARSE_BELOW}})
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    scores = [l for l in got if l["entry"] == "_proxy_scores_kernel"][0]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    bud0 = [l for l in base if l["entry"] == "pa_budgets"][0]
    assert bud["params"][10:] == [scores["params"][3], 2, 1, 0, 1]
    assert bud["params"][:10] == bud0["params"][:10] and bud["shared"] == bud0["shared"] == (2 * math.ceil(9000 / 128) + 128) * 4
    # The dense path has no scores: NULL (never read, every sequence keeps all blocks).
    dense = _c_launches(build, {"problem": dict(b=1, s=2000, hq=8, hkv=4, d=128), "config": cfg})
    assert dense[0]["entry"] == "pa_budgets" and dense[0]["params"][10:] == [0, 2, 1, 0, 1]


@pytest.mark.parametrize("problem", [dict(b=2, s=9000, hq=8, hkv=4, d=128),
                                     dict(b=3, s=9000, hq=8, hkv=4, d=128, cu=CU, total=10300)])
def test_launches_of_the_row_recall_budget_rule(build, problem):
    # budget_rule 2: the same kernels (pass 1 compiled with ROWS), a per-row mass buffer block_size times larger,
    # pa_budgets with room for the rows' needs in shared memory and the scores of G rankings.
    code = {}
    for rule in (1, 2):
        cfg = {"budget_rule": rule, "proxy_heads": 2, "dense_below_tokens": SPARSE_BELOW}
        code[rule] = _c_run(build, {"problem": problem, "config": cfg})
    got, base = code[2]["launches"], code[1]["launches"]
    assert [l["entry"] for l in got] == [l["entry"] for l in base]
    nb, bh = math.ceil(9000 / 128), problem["b"] * problem["hq"]
    assert code[2]["ws"] - code[1]["ws"] >= bh * 127 * nb * 4 - 256  # the mass of every row
    scores = [l for l in got if l["entry"] == "_proxy_scores_kernel"][0]
    pass1 = [l for l in got if l["entry"] == "_budget_kernel"][1]
    bud = [l for l in got if l["entry"] == "pa_budgets"][0]
    assert bud["params"][0] == pass1["params"][6]  # pass 1's mass buffer
    assert bud["params"][10:] == [scores["params"][3], 2, 2, 1, 1]
    assert bud["shared"] == (2 * nb + 128) * 4
    lo, hi = pass1["params"][6], pass1["params"][6] + bh * 128 * nb * 4
    assert hi <= WS + code[2]["ws"]
    others = {v for l in got for v in l["params"] if WS <= v < WS + code[2]["ws"] and v != lo}
    assert others and not any(lo < v < hi for v in others)  # no other workspace buffer inside the row masses


@pytest.mark.parametrize("min_budget_tokens", [0, 2048, 10000])
def test_unset_dense_below_tokens_resolves_as_in_python(build, min_budget_tokens):
    want = ProxyAttnConfig(min_budget_tokens=min_budget_tokens).dense_below_tokens
    s = want + 1  # just above the crossover: the sparse path
    got = _c_launches(build, {"problem": dict(b=1, s=s, hq=8, hkv=2, d=128),
                              "config": {"min_budget_tokens": min_budget_tokens, "dense_below_tokens": -1}})
    sel = [l for l in got if l["entry"] == "pa_select"][0]
    assert sel["params"][-1] == want
    assert got[0]["entry"] == "_pool_heads_kernel"  # not the dense path
