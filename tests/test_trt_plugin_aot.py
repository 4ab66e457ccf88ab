"""AOT compilation of every plugin kernel to PTX for sm_80, sm_89 and sm_90 on this CPU machine, and the check of
each PTX entry against TensorRT's AOT calling convention (inputs, int32 scalars, outputs, then Triton's two hidden
scratch pointers; no scratch memory needed). Runs in a subprocess: the test session may have switched Triton to
its interpreter (TRITON_INTERPRET=1), under which nothing compiles."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("ptx") / "kernels"
    res = subprocess.run(
        [sys.executable, "-m", "engines.plugin_kernels", "--model", "tiny-llama", "--out", str(out), "--profiles", "up-to-128"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out, json.loads(res.stdout.strip().splitlines()[-1])


def test_every_plugin_tactic_and_arch_is_compiled(compiled):
    from plugins.tensorrt import spec as S

    out, table = compiled
    seen = {(r["plugin"], r["tactic"], r["arch"]) for r in table}
    for plugin in S.PLUGINS:
        for tactic in S.tactics(plugin):
            for arch in (80, 89, 90):
                assert (plugin, tactic, arch) in seen, (plugin, tactic, arch)
    assert json.loads((out / "kernels.json").read_text()) == json.loads(json.dumps(table, default=str))


def test_ptx_targets_and_entries(compiled):
    from plugins.tensorrt.aot import HIDDEN_PARAMS, check_entry, entry_params
    from plugins.tensorrt import spec as S

    out, table = compiled
    for r in table:
        ptx = (out / r["file"]).read_text()
        target = {80: "sm_80", 89: "sm_89", 90: "sm_90a"}[r["arch"]]
        assert f".target {target}" in ptx, (r["file"], target)
        name, types = entry_params(ptx)
        assert name == r["kernel"]
        pdef = S.PLUGINS[r["plugin"]]
        n_scalars = len(S.extra_args(r["plugin"], [(1, 1, 1, 1)], {**S.RUNTIME_ATTRS.get(r["plugin"], {}), **r["attrs"]}))
        assert len(types) == len(pdef.inputs) + n_scalars + len(pdef.outputs) + HIDDEN_PARAMS
        sig = S.signature(r["plugin"], r["dtypes"], r["constants"])
        check_entry(ptx, sig)
        assert r["block_x"] in (128, 256) and r["shared_mem"] >= 0


def test_entry_check_refuses_a_wrong_convention():
    from plugins.tensorrt.aot import check_entry

    ptx = (
        ".visible .entry k(\n .param .u64 .ptr .global .align 1 k_param_0,\n .param .u32 k_param_1,\n"
        " .param .u64 .ptr .global .align 1 k_param_2\n)"
    )
    sig = {"x_ptr": "*fp16", "n": "i32", "y_ptr": "*fp16"}
    with pytest.raises(ValueError, match="calling convention"):
        check_entry(ptx, sig)  # no hidden scratch pointers: not what Triton >= 3.5 emits
    ptx_ok = ptx.replace(
        "k_param_2\n)", "k_param_2,\n .param .u64 .ptr .global .align 1 k_param_3,\n .param .u64 .ptr .global .align 1 k_param_4\n)"
    )
    check_entry(ptx_ok, sig)
    with pytest.raises(ValueError, match="calling convention"):
        check_entry(ptx_ok, {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32"})  # scalar after the outputs
