"""`python -m engines.plugin_kernels --model NAME --out DIR [--archs 80 89 90] [--precision bf16|fp16]
[--profiles P ...]`: compile the TensorRT plugin kernels one model of the table needs and print their table as JSON.

The compiler is `plugins.tensorrt.aot` (it knows plugins and shapes, not models); the model and its profiles come
from `engines.models`, which is why this command lives in the engines layer. `build.py` runs the same compilation
as its `aot` stage.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from plugins.tensorrt.aot import ARCHS, compile_all, model_shapes

from .models import get_model, select_profiles

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engines.plugin_kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--archs", nargs="+", type=int, default=list(ARCHS))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16"))
    p.add_argument("--profiles", nargs="+", default=())
    args = p.parse_args(argv)
    spec = get_model(args.model)
    entries = model_shapes(spec, spec.proxyattn, args.precision, select_profiles(spec, list(args.profiles)))
    table = compile_all(entries, Path(args.out), archs=args.archs)
    print(json.dumps(table, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
