#!/usr/bin/env python3
"""Build deployment artifacts for a model: ONNX export, parity check, TensorRT plugin kernels, engines per profile
(TensorRT) or optimized ONNX Runtime models (the embedded default), the Triton model repository and a manifest.

    python build.py                                   # smollm2-135m on the embedded default (ONNX Runtime)
    python build.py --model llama3-8b --random-weights
    python build.py --model tiny-llama --profiles up-to-128 --out build/tiny

Every stage is a function in `engines.pipeline` returning a path; this file only parses arguments, prints the
summary, and turns bad input into one clear message and a non-zero exit (nothing is written before all checks pass).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    from engines.models import MODELS
    from engines.pipeline import BACKENDS, PRECISIONS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help=f"one of: {', '.join(MODELS)} (default smollm2-135m)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="DIR", help="transformers checkpoint directory (llama3-8b, llama3.1-8b, qwen2.5-7b, mistral-7b)")
    w.add_argument("--random-weights", action="store_true", help="random weights: a structural build")
    p.add_argument("--profiles", nargs="+", metavar="P", default=(), help="profile names of the model, or MIN:OPT:MAX (default: all of the model's)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp32 for ONNX Runtime, bf16 for TensorRT")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TensorRT when installed, else ONNX Runtime")
    p.add_argument("--gamma", type=float, default=None, help="ProxyAttn gamma (default: the model's config, 0.95)")
    p.add_argument("--out", default=None, help="output directory (default build/<model>)")
    p.add_argument("--force", action="store_true", help="rebuild every stage even if its inputs did not change")
    p.add_argument("--max-batch", type=int, default=8, help="max batch size of the served models (default 8)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--list-models", action="store_true", help="list the models and their profiles, then exit")
    return p


def _summary(plan, manifest_path: Path) -> str:
    manifest = json.loads(manifest_path.read_text())
    lines = [f"\nProxyAttn build: {plan.spec.name}  ({plan.weights}, {plan.precision}, backend {plan.backend})",
             f"output: {plan.out}", f"embedded backend (ONNX Runtime): {plan.ort_reason}", "", "stage            status      artifacts  size"]
    from engines.pipeline import STAGES

    for name in STAGES:
        rec = manifest["stages"].get(name)
        if rec is None:
            continue
        arts = rec.get("artifacts", {})
        size = sum((plan.out / a).stat().st_size for a in arts if (plan.out / a).is_file())
        status = rec.get("status", "?")
        note = rec.get("info", {}).get("reason", "")
        lines.append(f"{name:<16} {status:<11} {len(arts):>9}  {size / 1024**2:8.1f} MiB  {note}")
    parity = plan.results.get("parity")
    if isinstance(parity, str) and parity.startswith("skipped") and (plan.out / "parity.json").is_file():
        parity = json.loads((plan.out / "parity.json").read_text())  # unchanged: show the recorded check
    if isinstance(parity, dict):
        lines.append("")
        lines.append("parity (ONNX Runtime sparse custom op vs PyTorch reference, fp32) and density:")
        lines.append("  tokens  rel.error   max|err|   sparse layers  mean density  min density")
        for r in parity["rows"]:
            dm = "-" if r["density_mean"] is None else f"{r['density_mean']:.3f}"
            dn = "-" if r["density_min"] is None else f"{r['density_min']:.3f}"
            lines.append(f"  {r['tokens']:>6}  {r['rel_error']:.2e}   {r['max_abs_error']:.2e}   {r['sparse_layers']:>13}  {dm:>12}  {dn:>11}")
        lines.append(f"  passed: {parity['passed']} (tolerance {parity['tolerance_rel']:g})")
        if parity.get("note"):
            lines.append(f"  note: {parity['note']}")
    elif parity:
        lines.append(f"\nparity: {parity}")
    for key in ("engines", "ort_models", "repository"):
        val = plan.results.get(key)
        if val:
            lines.append(f"{key}: {val}")
    lines.append(f"manifest: {manifest_path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from engines.models import MODELS
    from engines.pipeline import BuildRequest, resolve, run

    if args.list_models:
        for spec in MODELS.values():
            profs = ", ".join(f"{p.name} ({p.min}..{p.max}, opt {p.opt})" for p in spec.profiles)
            print(f"{spec.name:<14} {spec.description}\n{'':<14} profiles: {profs}")
        return 0
    req = BuildRequest(model=args.model, weights=args.weights, random_weights=args.random_weights, profiles=tuple(args.profiles),
                       precision=args.precision, backend=args.backend, gamma=args.gamma, out=args.out, force=args.force,
                       max_batch=args.max_batch, parity=not args.no_parity)
    try:
        plan = resolve(req)
    except ValueError as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 2
    try:
        manifest_path = run(plan)
    except (ValueError, RuntimeError) as e:
        print(f"build.py: error: {e}", file=sys.stderr)
        return 1
    print(_summary(plan, manifest_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
