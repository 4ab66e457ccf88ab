#!/usr/bin/env python3
"""Build deployment artifacts for a model: ONNX export, parity check, TensorRT plugin kernels, engines per profile
(TensorRT) or optimized ONNX Runtime models (the embedded default), the Triton model repository and a manifest.

    python build.py                                   # smollm2-135m on the embedded default (ONNX Runtime)
    python build.py --model llama3-8b --random-weights
    python build.py --model tiny-llama --profiles up-to-128 --out build/tiny
    python build.py --check build/tiny                 # verify a build against its manifest

Every stage is a function in `engines.pipeline` returning a path; this file only parses arguments, prints the
summary, and turns bad input into one clear message (nothing is written before all checks pass).

Exit codes: 0 done; 1 the build failed (parity outside its tolerance, a tool failed) or --check found differences;
2 bad input (one line naming the value and what is allowed; --debug adds the traceback); 130 Ctrl-C, 143 SIGTERM
(what was kept is printed; nothing half-written remains).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path

PROG = "build.py"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other error of build.py."""

    def error(self, message: str):
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C (temporaries removed, manifest marked interrupted)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def _parser() -> argparse.ArgumentParser:
    from engines.models import MODELS
    from engines.pipeline import BACKENDS, PRECISIONS
    from proxyattn.config import BudgetRule, Estimator

    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help=f"one of: {', '.join(MODELS)} (default smollm2-135m)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="DIR", help="transformers checkpoint directory (llama3-8b, llama3.1-8b, qwen2.5-7b, mistral-7b)")
    w.add_argument("--random-weights", action="store_true", help="random weights: a structural build")
    p.add_argument(
        "--profiles", nargs="+", metavar="P", default=(), help="profile names of the model, or MIN:OPT:MAX (default: all of the model's)"
    )
    p.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp32 for ONNX Runtime, bf16 for TensorRT")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="auto: TensorRT when installed, else ONNX Runtime")
    p.add_argument("--gamma", type=float, default=None, help="ProxyAttn gamma (default: the model's config, 0.83)")
    p.add_argument(
        "--budget-rule",
        type=BudgetRule.cli_type(),
        default=None,
        help=f"ProxyAttn budget rule, by name or number: {BudgetRule.allowed()} (default: the model's config)",
    )
    p.add_argument(
        "--estimator",
        type=Estimator.cli_type(),
        default=None,
        help=f"ProxyAttn block-score estimator: {Estimator.allowed()} (default: the model's config)",
    )
    p.add_argument("--out", default=None, help="output directory (default build/<model>)")
    p.add_argument("--force", action="store_true", help="rebuild every stage even if its inputs did not change")
    p.add_argument("--max-batch", type=int, default=8, help="max batch size of the served models (default 8)")
    p.add_argument("--no-parity", action="store_true", help="skip the parity check")
    p.add_argument("--list-models", action="store_true", help="list the models and their profiles, then exit")
    p.add_argument(
        "--check",
        metavar="DIR",
        help="verify the build in DIR against its manifest (hashes, config, tool versions); exits 1 on any difference",
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _summary(plan, manifest_path: Path) -> str:
    manifest = json.loads(manifest_path.read_text())
    lines = [
        f"\nProxyAttn build: {plan.spec.name}  ({plan.weights}, {plan.precision}, backend {plan.backend})",
        f"output: {plan.out}",
        f"embedded backend (ONNX Runtime): {plan.ort_reason}",
        "",
        "stage            status      artifacts  size",
    ]
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
            lines.append(
                f"  {r['tokens']:>6}  {r['rel_error']:.2e}   {r['max_abs_error']:.2e}   {r['sparse_layers']:>13}  {dm:>12}  {dn:>11}"
            )
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


def _check(path: str) -> int:
    from engines.build_dir import verify_build

    diffs = verify_build(Path(path))
    for d in diffs:
        print(f"{PROG} --check: {d}")
    print(f"{PROG} --check {path}: {'intact' if not diffs else f'{len(diffs)} difference(s)'}")
    return 1 if diffs else 0


def _kept(plan) -> str:
    """What an interrupted build kept, from its manifest."""
    from engines.artifacts import Manifest

    manifest = Manifest.read(plan.out)
    stages = manifest.data["stages"] if manifest else {}
    done = [f"{name} ({rec['status']})" for name, rec in stages.items()]
    return (
        f"kept in {plan.out}: {', '.join(done) if done else 'nothing'}; no partial file remains "
        f"(the next build resumes, `{PROG} --check {plan.out}` shows what is missing)"
    )


def _build(args) -> int:
    from engines.pipeline import BuildRequest, resolve, run

    req = BuildRequest(
        model=args.model,
        weights=args.weights,
        random_weights=args.random_weights,
        profiles=tuple(args.profiles),
        precision=args.precision,
        backend=args.backend,
        gamma=args.gamma,
        budget_rule=args.budget_rule,
        estimator=args.estimator,
        out=args.out,
        force=args.force,
        max_batch=args.max_batch,
        parity=not args.no_parity,
    )
    plan = resolve(req)
    try:
        manifest_path = run(plan)
    except KeyboardInterrupt as e:
        code = 143 if isinstance(e, Terminated) else 130
        print(
            f"{PROG}: {'terminated' if code == 143 else 'interrupted'} during stage {plan.results.get('stage', '?')}; {_kept(plan)}",
            file=sys.stderr,
        )
        return code
    print(_summary(plan, manifest_path))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.list_models:
        from engines.models import MODELS

        for spec in MODELS.values():
            profs = ", ".join(f"{p.name} ({p.min}..{p.max}, opt {p.opt})" for p in spec.profiles)
            print(f"{spec.name:<14} {spec.description}\n{'':<14} profiles: {profs}")
        return 0
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _check(args.check) if args.check is not None else _build(args)
    except ValueError as e:  # bad input: named by the message
        return _fail(args, e, 2)
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError) as e:
        return _fail(args, e, 2, f"cannot write {e.filename}: {e.strerror}" if e.filename else None)
    except OSError as e:
        return _fail(args, e, 1, f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
    except RuntimeError as e:  # a stage failed (parity outside tolerance, a tool)
        return _fail(args, e, 1)
    except KeyboardInterrupt:  # before the build started: nothing written
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours: one line; --debug shows where
        return _fail(args, e, 1, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(args, e: BaseException, code: int, message: str | None = None) -> int:
    if args.debug:
        traceback.print_exception(e)
    text = " ".join((message or str(e)).split())
    print(f"{PROG}: error: {text}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
