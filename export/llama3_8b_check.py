"""Export the Llama-3-8B architecture on this machine: meta-device graph, weights streamed to external data.

    python3 -m export.llama3_8b_check OUT_DIR [--zeros] [--keep]

Prints the time, the peak resident memory of this process, the file sizes and the node count; deletes the files
afterwards unless --keep. The weights are random (or zeros): a structural build, not a usable model.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import onnx
import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--zeros", action="store_true", help="zero weights (fast) instead of random ones")
    ap.add_argument("--keep", action="store_true", help="keep the written files")
    args = ap.parse_args(argv)

    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from proxyattn import ProxyAttnConfig

    from .onnx_export import count_proxy_nodes, estimate_export_memory, export_model, random_weights

    cfg = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    with init_empty_weights(include_buffers=False):
        model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"Llama-3-8B architecture: {n_params / 1e9:.2f}B parameters; planned export memory "
        f"{estimate_export_memory(model, torch.bfloat16) / 1024**3:.1f} GiB",
        flush=True,
    )
    out = args.out_dir / "llama3-8b.onnx"
    t0 = time.time()
    export_model(model, out, config=ProxyAttnConfig(), dtype=torch.bfloat16, weights=random_weights(model, std=0.0 if args.zeros else 0.02))
    seconds = time.time() - t0
    proto = onnx.load(str(out), load_external_data=False)
    result = {
        "parameters": n_params,
        "seconds": round(seconds, 1),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
        "onnx_bytes": out.stat().st_size,
        "data_bytes": (args.out_dir / "llama3-8b.onnx.data").stat().st_size,
        "proxy_nodes": count_proxy_nodes(proto),
    }
    print(json.dumps(result, indent=2))
    if not args.keep:
        shutil.rmtree(args.out_dir)
    return result


if __name__ == "__main__":
    main()
