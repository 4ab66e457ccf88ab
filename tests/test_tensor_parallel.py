"""Tensor parallel (`proxyattn.tp`): transformers' TP plan over 2 gloo processes, ProxyAttn on each shard's heads.

A tiny random Llama (8 query / 4 KV heads, 2 layers) is saved to a temporary directory; the test runs it at TP=1 in
this process and at TP=2 under `torchrun --nproc_per_node 2` (this file is the worker script), with the sparse path
forced at 640 tokens (block_size 64, 10 blocks). Every attention call goes through `"proxyattn"` (the fp32 reference
on the CPU) wrapped by a probe that also computes the call's plan with the config that call runs
(`proxyattn.tp.shard_config`). Checked:

* per head, the kept blocks under TP=2 equal those under TP=1 (rank r holds heads r*4 .. r*4+3), and blocks are
  really skipped; the same comparison tells a misaligned grouping apart (the shard's plan with the global proxy_heads
  differs);
* per head, the attention outputs and the logits agree within the "fp32" tolerance (tests/helpers.assert_close);
  what each shard ran equals block-sparse attention with the probed plan;
* proxy_heads not a multiple of the TP degree is refused by name: by `proxyattn.tp.from_pretrained` before anything
  is loaded, and by the attention function at the first call of a model sharded by transformers directly.

The GPU benchmark benchmarks/tp_prefill.py is checked here only in its argument parsing and result merging.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

SEQ = 640
VOCAB = 96
HEADS, KV_HEADS, HEAD_DIM = 8, 4, 16
# Sparse at 640 tokens: 64-token blocks, one block of minimum budget, no dense fallback (random weights attend
# diffusely, which the fallback would send dense); gamma 0.5 keeps about 2/3 of the causal blocks.
CONFIG = dict(block_size=64, proxy_heads=2, gamma=0.5, min_budget_tokens=64, dense_below_tokens=128, dense_density=None)
TIMEOUT = 240


def _config(**over):
    from proxyattn import ProxyAttnConfig

    return ProxyAttnConfig(**{**CONFIG, **over})


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, SEQ), generator=torch.Generator().manual_seed(1))


def _save_tiny_llama(path: Path) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HEADS * HEAD_DIM,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        initializer_range=0.08,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)


# ------------------------------------------------------------------------------------------ probe (both sides)
def _install_probe(records: dict) -> str:
    """Register attention "tp_probe": runs `"proxyattn"` and records, per layer, the plan of the config that call runs
    (its shard's), the output, and block-sparse attention replayed with that plan."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    import proxyattn.hf as hf
    import proxyattn.tp as tp
    from proxyattn import block_sparse_attention, plan_blocks

    def probe(module, query, key, value, attention_mask, **kwargs):
        out, weights = hf.proxyattn_attention_forward(module, query, key, value, attention_mask, **kwargs)
        cfg = tp.shard_config(hf.active_config(), module, query.shape[1], key.shape[1])
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        plan = plan_blocks(q, k, cfg, scale=kwargs["scaling"])
        # The shard's plan had it used the global proxy_heads (possible when that divides the local KV heads).
        glob = hf.active_config()
        naive = plan_blocks(q, k, glob, scale=kwargs["scaling"]).to_mask() if key.shape[1] % glob.proxy_heads == 0 else None
        records[module.layer_idx] = {
            "mask": plan.to_mask(),
            "naive_mask": naive,
            "out": out.detach().clone(),
            "replay": block_sparse_attention(q, k, v, plan, scale=kwargs["scaling"]),
        }
        return out, weights

    AttentionInterface.register("tp_probe", probe)
    AttentionMaskInterface.register("tp_probe", sdpa_mask)
    return "tp_probe"


def _run(model_dir, tp_size: int):
    """(logits, records, paths) of one forward pass at SEQ tokens through the probe."""
    import proxyattn.hf as hf
    import proxyattn.tp as tp

    records: dict = {}
    model = tp.from_pretrained(str(model_dir), _config(), tp_size=tp_size, dtype=torch.float32)
    model.set_attn_implementation(_install_probe(records))
    with hf.record_paths() as rec, torch.no_grad():
        logits = model(_ids()).logits
    return logits, records, [r.path for r in rec]


def _worker(model_dir: str, out_dir: str) -> None:
    """One rank of `torchrun --nproc_per_node 2 tests/test_tensor_parallel.py MODEL OUT`."""
    import torch.distributed as dist
    from transformers.distributed import DistributedConfig

    import proxyattn.hf as hf

    logits, records, paths = _run(model_dir, int(os.environ["WORLD_SIZE"]))
    rank = dist.get_rank()
    # The attention function's own check, on a model sharded by transformers with a misaligned config.
    hf.register(_config(proxy_heads=1))
    try:
        with torch.no_grad():
            transformers.AutoModelForCausalLM.from_pretrained(
                model_dir,
                distributed_config=DistributedConfig(tp_plan="auto"),
                attn_implementation="proxyattn",
                dtype=torch.float32,
            )(_ids()[:, :8])
        refusal = None
    except ValueError as e:
        refusal = str(e)
    torch.save(
        {"logits": logits, "records": records, "paths": paths, "refusal": refusal, "rank": rank, "world": dist.get_world_size()},
        Path(out_dir) / f"rank{rank}.pt",
    )
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tp_llama")
    _save_tiny_llama(path)
    return path


def test_refused_before_loading(tiny_dir):
    import proxyattn.tp as tp

    class NotLoaded:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise AssertionError("the model was loaded although the config is refused")

    with pytest.raises(
        ValueError,
        match=r"proxy_heads=1 is not a multiple of .*tp_size=2.*num_key_value_heads=4.*"
        r"Allowed: proxy_heads in \[2, 4\] with tp_size=2.*tp_size in \[1\] with proxy_heads=1",
    ):
        tp.from_pretrained(str(tiny_dir), _config(proxy_heads=1), tp_size=2, model_class=NotLoaded)
    with pytest.raises(ValueError, match=r"tp_size=3 must divide the model's num_key_value_heads=4.*allowed tp_size: \[1, 2, 4\]"):
        tp.from_pretrained(str(tiny_dir), _config(proxy_heads=4), tp_size=3, model_class=NotLoaded)
    with pytest.raises(ValueError, match=r"proxy_heads=3 must divide the number of KV heads Hkv=4"):
        tp.check_tp(_config(proxy_heads=3), 1, HEADS, KV_HEADS)
    with pytest.raises(ValueError, match=r"tp_size=0 must be an int >= 1"):
        tp.check_tp(_config(), 0, HEADS, KV_HEADS)
    with pytest.raises(ValueError, match=r"implementation='eager' is not supported"):
        tp.from_pretrained(str(tiny_dir), _config(), tp_size=2, implementation="eager", model_class=NotLoaded)
    assert tp.check_tp(_config(proxy_heads=4), 2, HEADS, KV_HEADS) == _config(proxy_heads=2)
    assert tp.check_tp(_config(proxy_heads=4), 4, HEADS, KV_HEADS) == _config(proxy_heads=1)
    assert tp.check_tp(_config(proxy_heads=1), 1, HEADS, KV_HEADS) == _config(proxy_heads=1)


def test_shard_config_reads_the_module():
    """What an attention call under transformers' TP runs: the degree from the module's heads against its model's."""
    from types import SimpleNamespace

    import proxyattn.tp as tp

    def module(tp_size):
        dist = None if tp_size is None else SimpleNamespace(tp_size=tp_size)
        return SimpleNamespace(config=SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, distributed_config=dist))

    cfg = _config(proxy_heads=4)
    assert tp.shard_config(cfg, module(None), HEADS, KV_HEADS) is cfg
    assert tp.shard_config(cfg, module(2), HEADS // 2, KV_HEADS // 2) == _config(proxy_heads=2)
    assert tp.shard_config(cfg, module(4), HEADS // 4, KV_HEADS // 4) == _config(proxy_heads=1)
    assert tp.shard_config(cfg, module(2), HEADS, KV_HEADS) == cfg  # a tp_plan that leaves attention replicated
    with pytest.raises(ValueError, match=r"sees 4 query / 4 KV heads of the model's 8 / 4 under tp_size=2"):
        tp.shard_config(cfg, module(2), HEADS // 2, KV_HEADS)
    with pytest.raises(ValueError, match=r"proxy_heads=2 is not a multiple of the tensor-parallel degree tp_size=4"):
        tp.shard_config(_config(proxy_heads=2), module(4), HEADS // 4, KV_HEADS // 4)


def test_tp2_gloo_plans_and_outputs_equal_tp1(tiny_dir, tmp_path, restore_hf_config):
    from tests.helpers import ROOT, assert_close, subprocess_env

    logits1, rec1, paths1 = _run(tiny_dir, 1)
    assert paths1 == ["sparse", "sparse"], paths1

    env = {**subprocess_env(), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).resolve()),
        str(tiny_dir),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    local = HEADS // 2
    skipped = kept_naive_differs = 0
    for r, res in enumerate(ranks):
        assert res["world"] == 2 and res["paths"] == ["sparse", "sparse"], res["paths"]
        assert_close(res["logits"], logits1, "fp32", what=f"rank {r} logits")
        heads = slice(r * local, (r + 1) * local)
        for layer, ref in rec1.items():
            got = res["records"][layer]
            assert got["mask"].shape == (1, local, SEQ // 64, SEQ // 64)
            mism = (got["mask"] != ref["mask"][:, heads]).any(-1).sum().item()
            assert mism == 0, f"rank {r} layer {layer}: {mism} (head, query block) rows keep other blocks than TP=1"
            assert_close(got["out"], ref["out"][:, :, heads], "fp32", what=f"rank {r} layer {layer} attention output")
            assert_close(got["out"], got["replay"], "fp32", what=f"rank {r} layer {layer} output vs its plan")
            causal = torch.ones(SEQ // 64, SEQ // 64, dtype=torch.bool).tril()
            skipped += int((causal & ~got["mask"]).sum())
            kept_naive_differs += int((got["naive_mask"] != ref["mask"][:, heads]).any(-1).sum())
    for r, res in enumerate(ranks):
        assert res["refusal"] is not None and "proxy_heads=1 is not a multiple" in res["refusal"], (r, res["refusal"])
    total = len(rec1) * HEADS * int(torch.ones(SEQ // 64, SEQ // 64).tril().sum())  # both ranks: every head once
    assert skipped >= 0.2 * total, f"only {skipped} of {total} causal (head, block) pairs skipped: the test would not see a plan"
    assert kept_naive_differs > 0, "a shard grouping its KV heads differently gave the same plans: the comparison is blind"


# ------------------------------------------------------------------------------ benchmarks/tp_prefill.py (GPU script)
def _bench():
    import importlib.util

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("tp_prefill_benchmark", ROOT / "benchmarks" / "tp_prefill.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_arguments():
    bench = _bench()
    args = bench.parse_args(["--out", "x"])
    assert (args.sizes, args.tp, args.model, args.checkpoint) == (
        [32768, 65536, 131072],
        [1, 2],
        "llama3.1-8b",
        "/tmp/tp_prefill_llama3.1-8b",
    )
    assert bench.parse_sizes("128K,32768,32k") == [32768, 131072]
    for bad in ("32K,100", "0", "K", "-128", "32M"):
        with pytest.raises(ValueError, match=r"--sizes item .* must be a positive multiple of 128 tokens"):
            bench.parse_sizes(bad)
    with pytest.raises(ValueError, match=r"--tp item '4' is not allowed; allowed: \(1, 2\)"):
        bench.parse_tp("1,4")
    with pytest.raises(SystemExit):
        bench.parse_args(["--out", "x", "--tp", "3"])
    # The rows' config is what TP=2 accepts for the benchmark's model (8 KV heads), unchanged per degree.
    import proxyattn.tp as tp

    for _, cfg in bench.sparse_configs():
        assert tp.check_tp(cfg, 2, 32, 8).proxy_heads == 1 and tp.check_tp(cfg, 1, 32, 8) == cfg


def test_benchmark_merge():
    bench = _bench()

    def partial(n, sdpa, method, gpu="NVIDIA H100 80GB HBM3"):
        row = {"seq_len": 131072, "ttft_ms": {"sdpa": sdpa, "proxyattn default": method}}
        return {
            "tp_size": n,
            "gpu": gpu,
            "model": {"name": "m"},
            "what": "w",
            "method": "m",
            "versions": {},
            "date": f"d{n}",
            "commit": "abc",
            "command": f"c{n}",
            "gpus": [gpu] * n,
            "weights_gib_per_gpu": [1.0] * n,
            "rows": [row],
        }

    merged = bench.merge([partial(2, 600.0, 300.0), partial(1, 1000.0, 500.0)])
    (line,) = merged["summary"]
    assert line["tp_speedup"] == {"sdpa": {"tp2": 1000.0 / 600.0}, "proxyattn default": {"tp2": 500.0 / 300.0}}
    assert line["method_speedup"] == {"proxyattn default": {"tp1": 2.0, "tp2": 2.0}}
    assert merged["commit"] == "abc" and sorted(merged["runs"]) == ["tp1", "tp2"] and len(merged["rows"]) == 2
    assert bench.gpu_tag(merged["gpu"]) == "h100"
    with pytest.raises(ValueError, match="different GPUs"):
        bench.merge([partial(1, 1.0, 1.0), partial(2, 1.0, 1.0, gpu="NVIDIA H200")])
    with pytest.raises(ValueError, match="two partial results of one degree"):
        bench.merge([partial(1, 1.0, 1.0), partial(1, 1.0, 1.0)])
    with pytest.raises(ValueError, match="no partial results"):
        bench.merge([])


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
