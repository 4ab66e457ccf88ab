#!/usr/bin/env python3
"""The TensorRT plugins' AOT kernels launched exactly as TensorRT's AOT launcher would, through the CUDA driver
(ctypes on libcuda), on the GPU; the engine graph's native ops in ONNX's reference evaluator on the host.

What "as TensorRT would" means here (the public contract of `tensorrt.plugin.aot_impl`, docs/deploy.md):

* the PTX `aot.compile_kernel` gives for the device's arch (what `registration.py` returns to TensorRT), loaded
  with cuModuleLoadDataEx (the driver JIT-compiles it, as TensorRT does with PTX);
* grid from `spec.launch`, block = num_warps * 32, dynamic shared memory = the kernel's `metadata.shared`; above
  48 KiB the function is opted in first with cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)
  (the check also records whether the launch fails without it: if it does, TensorRT's launcher must do the same);
* parameters: the input pointers, the extra int32 scalars of `spec.extra_args`, the output pointers, then Triton
  3.6's two hidden scratch pointers (global, profile), passed as NULL (the kernels need no scratch: checked at
  compile time); the PTX entry's parameter list is checked against this layout before every launch.

Checks (each recorded in the JSON result):
1. `graph_rule{0,1,2,3}_{S}`: for S in 8K, 16K, 32K (and 64K unless --quick), Llama-3-8B attention shapes (32 q /
   8 KV heads, D 128, fp16, B 1, structured inputs), `ProxyAttnConfig(budget_rule=rule, dense_below_tokens=4096)` (rule 3 = the default,
   dense fallback on): the whole engine graph of one layer (`plugins.tensorrt.graph`) with every plugin node
   launched through the driver; its plan equals the GPU path's plan on the graph's own scores (rules 0-2:
   `plan_mismatches` within score ties; rule 3: `needs_plan` exactly) and its output equals
   `proxyattn.proxy_attention` within the fp16 tolerance.
2. `opt_in`: every launched kernel above 48 KiB: launched with the attribute; launched once without it (a fresh
   module) and the driver's answer recorded.
3. `topk_ties`: TensorRT's TopK on inputs with exact ties against torch's stable descending sort (what the
   reference orders by); run where `import tensorrt` works, else recorded as not run. The engine graph uses TopK
   only to sort mass values (no index output), so its plan does not depend on the tie order; this records it.

    python3 -m tests.gpu.check_trt_launch --out DIR [--commit SHA] [--quick]

Writes DIR/trt_launch_<date>.json (GPU name, date, commit, command, versions, every check) and exits 1 on any
failed check. The layout and shared-memory decisions (`kernel_params`, `launch_config`) are plain functions tested
on the CPU (tests/test_trt_launch_layout.py); `tests/gpu/test_gpu_trt_launch.py` runs the checks under pytest.
"""

from __future__ import annotations

import argparse
import ctypes as C
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from plugins.tensorrt import aot
from plugins.tensorrt import spec as S

REPO = Path(__file__).resolve().parents[2]
SMEM_DEFAULT_LIMIT = 48 * 1024  # bytes of dynamic shared memory a launch gets without the opt-in attribute
CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES = 1
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
RESULTS: list[dict] = []
LAUNCHES: list[dict] = []

_NP_TO_TORCH = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "int32": "int32"}


# ------------------------------------------------------------------------------------- plain functions (CPU-tested)
@dataclass(frozen=True)
class LaunchConfig:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared: int
    opt_in: bool  # cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES, shared) before the launch


def launch_config(grid, num_warps: int, shared: int, max_optin: int | None = None) -> LaunchConfig:
    """The launch TensorRT's AOT launcher makes for a kernel: grid (3 ints >= 1), block num_warps * 32, the kernel's
    dynamic shared memory, opted in above 48 KiB. ValueError when the kernel cannot launch on the device (shared
    above the device's opt-in maximum, a grid dimension out of range)."""
    grid = tuple(int(x) for x in grid)
    if len(grid) != 3 or any(x < 1 for x in grid) or grid[0] >= 2**31 or grid[1] >= 2**16 or grid[2] >= 2**16:
        raise ValueError(f"grid={grid} is not launchable: need 1 <= x < 2^31, 1 <= y, z < 2^16")
    if num_warps < 1 or num_warps * 32 > 1024:
        raise ValueError(f"num_warps={num_warps} gives an invalid block; allowed: 1..32 warps")
    if shared < 0:
        raise ValueError(f"shared={shared} must be >= 0")
    if max_optin is not None and shared > max_optin:
        raise ValueError(f"shared={shared} bytes exceeds the device's opt-in maximum of {max_optin} bytes per block")
    return LaunchConfig(grid, (num_warps * 32, 1, 1), shared, shared > SMEM_DEFAULT_LIMIT)


def kernel_params(inputs: list[int], scalars: list[int], outputs: list[int], hidden: int = aot.HIDDEN_PARAMS):
    """The parameter values in TensorRT's AOT order: input pointers (u64), extra scalars (int32), output pointers
    (u64), then `hidden` NULL u64 pointers (Triton's global and profile scratch). Returns (ctypes values, PTX types)."""
    for s in scalars:
        if isinstance(s, bool) or not isinstance(s, int) or not -(2**31) <= s < 2**31:
            raise ValueError(f"extra scalar {s!r} is not an int32")
    values = [C.c_uint64(p) for p in inputs] + [C.c_int32(s) for s in scalars] + [C.c_uint64(p) for p in outputs]
    values += [C.c_uint64(0) for _ in range(hidden)]
    types = [".u64"] * len(inputs) + [".u32"] * len(scalars) + [".u64"] * (len(outputs) + hidden)
    return values, types


def check_params_against_ptx(ptx: str, types: list[str]) -> None:
    """ValueError unless the PTX entry takes exactly these parameter types (b32 / s32 / u32 count as int32)."""
    _, entry = aot.entry_params(ptx)
    norm = [".u32" if t in (".b32", ".s32", ".u32") else (".u64" if t in (".b64", ".u64", ".s64") else t) for t in entry]
    if norm != types:
        raise ValueError(f"PTX entry parameters {entry} differ from the launch's {types}")


def param_pointer_array(values):
    """`void **kernelParams` for cuLaunchKernel: one pointer per value, in order (keep `values` alive)."""
    arr = (C.c_void_p * len(values))()
    for i, v in enumerate(values):
        arr[i] = C.cast(C.pointer(v), C.c_void_p)
    return arr


def stable_desc_order(x: np.ndarray) -> np.ndarray:
    """Indices of a descending sort along the last axis, ties to the lower index (torch.sort(stable=True) of the
    reference; ONNX TopK's documented order)."""
    return np.argsort(-x, axis=-1, kind="stable")


def tie_inputs(rows: int, n: int, seed: int = 0) -> np.ndarray:
    """float32 `[rows, n]` with many exact ties (values from a set of 4) and a few distinct ones."""
    rng = np.random.default_rng(seed)
    x = rng.choice(np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32), size=(rows, n))
    x[:, ::7] = rng.random((rows, len(range(0, n, 7)))).astype(np.float32)
    return x


# ------------------------------------------------------------------------------------------------- the driver
class Driver:
    """libcuda through ctypes: modules from PTX, function attributes, launches on the current stream of torch."""

    def __init__(self):
        import torch

        torch.cuda.init()
        torch.empty(1, device="cuda")  # the primary context, current on this thread
        self.cu = C.CDLL("libcuda.so.1")
        self._check(self.cu.cuInit(0), "cuInit")
        dev = C.c_int()
        self._check(self.cu.cuCtxGetDevice(C.byref(dev)), "cuCtxGetDevice")
        val = C.c_int()
        self._check(
            self.cu.cuDeviceGetAttribute(C.byref(val), CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, dev), "cuDeviceGetAttribute"
        )
        self.max_optin = val.value
        self.modules = []

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = C.c_char_p()
            self.cu.cuGetErrorName(rc, C.byref(name))
            raise RuntimeError(f"{what} failed: CUDA error {rc} ({(name.value or b'?').decode()})")

    def load(self, ptx: str, name: str):
        mod = C.c_void_p()
        self._check(
            self.cu.cuModuleLoadDataEx(C.byref(mod), C.c_char_p(ptx.encode() + b"\0"), 0, None, None), f"cuModuleLoadDataEx({name})"
        )
        self.modules.append(mod)
        fn = C.c_void_p()
        self._check(self.cu.cuModuleGetFunction(C.byref(fn), mod, name.encode()), f"cuModuleGetFunction({name})")
        return fn

    def launch(self, fn, cfg: LaunchConfig, values, *, opt_in: bool | None = None) -> int:
        """cuLaunchKernel on torch's current stream; returns the driver's status (0 = launched)."""
        import torch

        if cfg.opt_in if opt_in is None else opt_in:
            self._check(
                self.cu.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, C.c_int(cfg.shared)),
                "cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES)",
            )
        params = param_pointer_array(values)
        stream = C.c_void_p(torch.cuda.current_stream().cuda_stream)
        return self.cu.cuLaunchKernel(
            fn, *[C.c_uint(x) for x in cfg.grid], *[C.c_uint(x) for x in cfg.block], C.c_uint(cfg.shared), stream, params, None
        )


# ------------------------------------------------------------------------------------------ plugin launches
_COMPILED: dict = {}
_BIG: dict = {}  # kernel name -> (compiled, launch config, parameter values, the tensors they point to)


def _arch() -> int:
    import torch

    major, minor = torch.cuda.get_device_capability()
    arch = major * 10 + minor
    return arch if arch in aot.ARCHS else 90


def run_plugin(drv: Driver, name: str, inputs, attrs: dict, tactic: int = 1):
    """Allocate the outputs, compile (once per static signature) and launch one plugin kernel as TensorRT would."""
    import torch

    shapes = [list(t.shape) for t in inputs]
    dtypes = [str(t.dtype).replace("torch.", "") for t in inputs]
    consts, _ = S.constants(name, shapes, dtypes, attrs, tactic)
    key = (name, json.dumps(consts, sort_keys=True, default=str), json.dumps(dtypes), tactic)
    if key not in _COMPILED:
        compile_attrs = {a: v for a, v in attrs.items() if a not in S.RUNTIME_ATTRS.get(name, {})}
        k = aot.compile_kernel(name, shapes, dtypes, compile_attrs, tactic, _arch())
        _COMPILED[key] = (k, drv.load(k.ptx, k.name))
    k, fn = _COMPILED[key]
    outs = [
        torch.empty(sh, dtype=getattr(torch, _NP_TO_TORCH[dt]), device="cuda")
        for sh, dt in zip(S.output_shapes(name, shapes, attrs), S.output_dtypes(name, dtypes))
    ]
    for o in outs:
        (o.fill_(float("nan")) if o.is_floating_point() else o.fill_(-7))  # unwritten elements show
    ins = [t.contiguous() for t in inputs]
    values, types = kernel_params([t.data_ptr() for t in ins], S.extra_args(name, shapes, attrs), [o.data_ptr() for o in outs])
    check_params_against_ptx(k.ptx, types)
    cfg = launch_config(S.launch(name, shapes, attrs, consts), k.num_warps, k.shared, drv.max_optin)
    rc = drv.launch(fn, cfg, values)
    drv._check(rc, f"cuLaunchKernel({name})")
    LAUNCHES.append(
        {
            "plugin": name,
            "kernel": k.name,
            "grid": cfg.grid,
            "block": cfg.block,
            "shared": cfg.shared,
            "opt_in": cfg.opt_in,
            "params": len(values),
        }
    )
    if cfg.opt_in:  # kept (with its buffers) for check_opt_in's launch without the attribute
        _BIG[k.name] = (k, cfg, values, ins + outs)
    return outs


def _plugin_ops(drv: Driver):
    """onnx.reference implementations of the plugin nodes that launch their kernels on the GPU."""
    import torch
    from onnx.reference.op_run import OpRun

    ops = []
    for name, pdef in S.PLUGINS.items():

        def _run(self, *arrays, _name=name, _pdef=pdef, **_):
            attrs = {a: getattr(self, a) for a in _pdef.attrs}
            ins = [torch.from_numpy(np.ascontiguousarray(a)).cuda() for a in arrays]
            outs = run_plugin(drv, _name, ins, attrs)
            torch.cuda.synchronize()
            return tuple(o.cpu().numpy() for o in outs)

        ops.append(type(name, (OpRun,), {"op_domain": S.NAMESPACE, "_run": _run}))

    def _gather_elements(self, data, indices, axis=0, **_):
        # onnx.reference's GatherElements goes through np.choose, which takes at most 64 choices (Nb > 64 fails);
        # np.take_along_axis is the operator's definition without that limit.
        return (np.take_along_axis(data, indices.astype(np.int64), axis=axis),)

    ops.append(type("GatherElements", (OpRun,), {"op_domain": "", "_run": _gather_elements}))
    return ops


def _node_model(b, s, hq, hkv, d, cfg, scale):
    from onnx import TensorProto, helper

    from export import contract

    node = helper.make_node(
        contract.OP_TYPE, ["q", "k", "v"], ["out"], domain=contract.DOMAIN, name="layer0", **contract.encode_attrs(cfg, scale=scale)
    )
    io = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT16, shape)
        for n, shape in (("q", ["B", hq, "S", d]), ("k", ["B", hkv, "S", d]), ("v", ["B", hkv, "S", d]))
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["B", hq, "S", d])
    return helper.make_model(
        helper.make_graph([node], "g", io, [out]), opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(contract.DOMAIN, 1)]
    )


def check_graph(drv: Driver, rule: int, s: int, seed: int = 0) -> dict:
    """One attention layer's engine graph, plugins on the GPU, vs the GPU path (plan and proxy_attention)."""
    import torch
    from onnx.reference import ReferenceEvaluator

    import proxyattn
    from plugins.tensorrt.graph import to_tensorrt_graph
    from proxyattn import ProxyAttnConfig
    from proxyattn.kernels import estimate_needs as en
    from proxyattn.kernels import estimate_select as esel
    from proxyattn.plan import BlockPlan, compact_plan, dense_fallback
    from proxyattn.testing import plan_mismatches, structured_qkv

    b, hq, hkv, d = 1, 32, 8, 128
    cfg = ProxyAttnConfig(budget_rule=rule, dense_below_tokens=4096)  # the sparse path at every checked length
    scale = 1.0 / math.sqrt(d)
    q, k, v = structured_qkv(b, s, hq, hkv, d, dtype=torch.float16, device="cuda", seed=seed)
    model = to_tensorrt_graph(_node_model(b, s, hq, hkv, d, cfg, scale), max_seq_len=max(s, 1 << (s - 1).bit_length()))
    feeds = {n: t.transpose(1, 2).contiguous().cpu().numpy() for n, t in (("q", q), ("k", k), ("v", v))}
    t0 = time.perf_counter()
    res = ReferenceEvaluator(model, new_ops=_plugin_ops(drv)).run(None, feeds, intermediate=True)
    wall = time.perf_counter() - t0
    tagged = {}
    for key, val in res.items():
        if key.startswith("layer0/"):
            tagged.setdefault(key.rsplit("/", 1)[-1].rsplit("_", 1)[0], torch.from_numpy(np.asarray(val)).cuda())
    out = torch.from_numpy(res["out"]).cuda().transpose(1, 2)
    order, counts, scores = tagged["ProxyRank"], tagged["counts"], tagged["ProxyScores"]
    nb = scores.shape[-1]
    info = {"S": s, "rule": rule, "graph_seconds": round(wall, 1)}
    if s > cfg.dense_below_tokens:
        early = tagged.get("early_dense")
        if rule == 3:
            want = en.needs_plan(q, k, scores, cfg, scale, early=early)
            assert torch.equal(order, want.order), "rule 3: order differs from the GPU path's ranking kernel"
            # The same kernels on the same values; the AOT wrappers take the softmax scale as a compile-time constant
            # (the Python launch passes it as an fp32 argument), so a need sitting exactly at gamma may round the
            # other way: at most 1 entry in 10,000, by one block, is accepted and recorded.
            diff = (counts.long() - want.counts.long()).abs()
            info["counts_differing"] = int((diff > 0).sum())
            assert int(diff.max()) <= 1 and info["counts_differing"] <= max(1, counts.numel() // 10_000), (
                f"rule 3: counts differ in {info['counts_differing']} entries, by up to {int(diff.max())} blocks"
            )
        else:
            budgets = tagged["budgets"].to(torch.int32)
            want = dense_fallback(compact_plan(scores, budgets, s, cfg), hkv, cfg, early=early)
            assert torch.equal(counts, want.counts), f"counts differ from compact_plan in {int((counts != want.counts).sum())} entries"
            gpu_budgets = proxyattn.head_budgets(q, k, cfg, scale=scale, scores=scores)
            info["budgets_differing"] = int((gpu_budgets != budgets).sum())
            assert int((gpu_budgets - budgets).abs().max()) <= 1, "budgets differ from the GPU path's by more than a tie"
            ref_plan = dense_fallback(esel.select_blocks(scores, gpu_budgets, s, cfg), hkv, cfg, early=early)
            info["plan_mismatches_vs_gpu_path"] = plan_mismatches(
                BlockPlan(order, counts, budgets, cfg.block_size, s), ref_plan, scores, cfg.min_budget_blocks
            )
        gpu_plan = proxyattn.plan_blocks(q, k, cfg, scale=scale)
        info["density_graph"] = round(float(counts.sum()) / (b * hq * nb * (nb + 1) / 2), 4)
        info["density_plan_blocks"] = round(float(gpu_plan.density().mean()), 4)
        info["dense_groups"] = int(tagged["dense_groups"].sum()) if "dense_groups" in tagged else 0
    else:
        assert bool((counts == torch.arange(1, nb + 1, device="cuda", dtype=torch.int32)).all()), "dense path: full rows"
    want_out = proxyattn.proxy_attention(q, k, v, cfg, scale=scale)
    rel = float((out.float() - want_out.float()).norm() / want_out.float().norm())
    info["rel_error_vs_proxy_attention"] = rel
    assert rel <= 2e-3 * 4, f"output rel. error {rel:.2e} vs proxy_attention"  # fp16 operands, another summation order
    return info


def check_opt_in(drv: Driver) -> dict:
    """Every launched kernel above 48 KiB was opted in; each is launched once more from a fresh module without the
    attribute, and the driver's answer is recorded (non-zero: TensorRT's launcher must opt in as we do)."""
    import torch

    answers = {}
    for name, (k, cfg, values, _buffers) in _BIG.items():
        fn = drv.load(k.ptx, k.name)  # a fresh function: no attribute set
        # The same launch on the same (live) buffers: if the driver accepts it, it recomputes the same outputs.
        answers[name] = {"shared": k.shared, "status_without_opt_in": int(drv.launch(fn, cfg, values, opt_in=False))}
        torch.cuda.synchronize()
    assert all(r["opt_in"] for r in LAUNCHES if r["shared"] > SMEM_DEFAULT_LIMIT)
    return {"kernels_above_48k": answers, "max_optin": drv.max_optin}


def check_topk_ties() -> dict:
    """TensorRT's TopK (largest, k = n) on tie-heavy rows vs the stable descending order."""
    x = tie_inputs(64, 300)
    want = stable_desc_order(x)
    try:
        import tensorrt as trt
    except ImportError:
        return {"run": False, "reason": "import tensorrt failed on this machine; TensorRT's TopK tie order not checked"}
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    net = builder.create_network(0)
    inp = net.add_input("x", trt.float32, x.shape)
    topk = net.add_topk(inp, trt.TopKOperation.MAX, x.shape[1], 1 << 1)
    net.mark_output(topk.get_output(1))
    engine = trt.Runtime(logger).deserialize_cuda_engine(builder.build_serialized_network(net, builder.create_builder_config()))
    ctx = engine.create_execution_context()
    xin = torch.from_numpy(x).cuda()
    idx = torch.empty(x.shape, dtype=torch.int32, device="cuda")
    ctx.set_tensor_address("x", xin.data_ptr())
    ctx.set_tensor_address(engine.get_tensor_name(1), idx.data_ptr())
    ctx.execute_async_v3(torch.cuda.current_stream().cuda_stream)
    torch.cuda.synchronize()
    got = idx.cpu().numpy()
    rows_equal = int((got == want).all(axis=1).sum())
    assert rows_equal == x.shape[0], f"TensorRT TopK orders ties differently in {x.shape[0] - rows_equal} of {x.shape[0]} rows"
    return {"run": True, "tensorrt": trt.__version__, "rows": x.shape[0], "rows_equal": rows_equal}


def record(name: str, fn) -> None:
    t0 = time.perf_counter()
    entry = {"check": name}
    try:
        info = fn()
        entry.update(ok=True, seconds=round(time.perf_counter() - t0, 1), info=info)
    except Exception as e:  # noqa: BLE001 - every failure is recorded and fails the script at the end
        entry.update(ok=False, seconds=round(time.perf_counter() - t0, 1), error=f"{type(e).__name__}: {str(e)[:600]}")
    RESULTS.append(entry)
    print(("PASS " if entry["ok"] else "FAIL ") + name + " " + json.dumps(entry.get("info", entry.get("error"))), flush=True)


def main(argv=None) -> int:
    import torch
    import triton

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="directory for trt_launch_<date>.json")
    ap.add_argument("--commit", default=None)
    ap.add_argument("--quick", action="store_true", help="8K-32K only")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_trt_launch: needs CUDA", file=sys.stderr)
        return 2
    drv = Driver()
    lengths = (8192, 16384, 32768) if args.quick else (8192, 16384, 32768, 65536)
    for s in lengths:
        for rule in (3, 0, 1, 2):
            record(f"graph_rule{rule}_{s}", lambda rule=rule, s=s: check_graph(drv, rule, s, seed=s + rule))
    record("opt_in", lambda: check_opt_in(drv))
    record("topk_ties", check_topk_ties)
    commit = (
        args.commit
        or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        or "unknown"
    )
    doc = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": "python3 -m tests.gpu.check_trt_launch " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__},
        "checks": RESULTS,
        "launches": LAUNCHES,
    }
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"trt_launch_{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {path}")
    failed = [r["check"] for r in RESULTS if not r["ok"]]
    print(f"{len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
