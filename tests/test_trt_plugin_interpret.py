"""The TensorRT plugins' kernels launched exactly as TensorRT's AOT launcher would (inputs, extra int32 scalars,
outputs; grid, constants and output shapes from plugins.tensorrt.spec), in Triton's interpreter on CPU tensors in
TensorRT's `[B, H, S, D]` layout, against the fp32 reference and against the project's own kernel entry points.

This checks the plugin logic end to end (strides, scalars, grids, fixed-size intermediates, output shapes), not
TensorRT itself (not installable here)."""

import math

import pytest
import torch
import triton.runtime.interpreter as _interp

from plugins.tensorrt import spec as S
from plugins.tensorrt.kernels import WRAPPERS
from proxyattn import ProxyAttnConfig, reference
from proxyattn.kernels import estimate_budgets as eb
from proxyattn.kernels import estimate_scores as es
from proxyattn.plan import compact_plan
from proxyattn.testing import row_budget_mismatches
from tests.helpers import assert_close

# Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py before any kernel is defined).
pytestmark = pytest.mark.interpret

_NP = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32", torch.int32: "int32"}
_TORCH = {v: k for k, v in _NP.items()}


def test_wrappers_run_in_the_interpreter():
    assert isinstance(WRAPPERS["trt_sparse_attention"], _interp.InterpretedFunction), (
        "proxyattn.kernels was imported before TRITON_INTERPRET=1 was set; run this module in its own process"
    )


def run_plugin(name, inputs, attrs, tactic=1):
    """Allocate outputs, launch the plugin kernel like TensorRT's AOT launcher, return the outputs."""
    shapes = [list(t.shape) for t in inputs]
    dtypes = [_NP[t.dtype] for t in inputs]
    consts, _ = S.constants(name, shapes, dtypes, attrs, tactic)
    outs = [
        torch.full(sh, float("nan"), dtype=_TORCH[dt]) if _TORCH[dt].is_floating_point else torch.zeros(sh, dtype=_TORCH[dt])
        for sh, dt in zip(S.output_shapes(name, shapes, attrs), S.output_dtypes(name, dtypes))
    ]
    grid = S.launch(name, shapes, attrs, consts)
    args = [t.contiguous() for t in inputs] + S.extra_args(name, shapes, attrs) + outs
    WRAPPERS[S.PLUGINS[name].kernel][grid](*args, **consts)
    return outs


# (B, S, Hq, Hkv, D, block, stride, proxy heads): S not divisible by the block, GQA 1/2/4, B > 1
CASES = [
    (2, 200, 4, 2, 64, 64, 4, 1),
    (1, 150, 4, 4, 64, 64, 4, 2),
    (2, 260, 4, 1, 128, 64, 8, 1),
]


def _qkv(b, s, hq, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(torch.float16)
    k = torch.randn(b, hkv, s, d, generator=g).to(torch.float16)
    v = torch.randn(b, hkv, s, d, generator=g).to(torch.float16)
    return q, k, v


def _attrs(cfg, scale, **extra):
    return dict(cfg.to_attrs(), scale=scale, **extra)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_estimation_plugins_match_reference(case):
    b, s, hq, hkv, d, bs, st, g = case
    q, k, _ = _qkv(b, s, hq, hkv, d, seed=s)
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, gamma=0.9, min_budget_tokens=bs)
    scale = 1.0 / math.sqrt(d)
    nb = -(-s // bs)
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)  # [B, S, H, D] for the reference

    (pq,) = run_plugin("ProxyPool", [q], {"groups": g, "step": st})
    (pk,) = run_plugin("ProxyPool", [k], {"groups": g, "step": 1})
    own_pq, own_pk = es.pool_proxies(qt, kt, cfg)  # the project's entry point, [B, S, H, D] strides
    assert pq.shape == own_pq.shape and pk.shape == own_pk.shape
    rq, rk = reference.proxy_queries_keys(qt, kt, g)  # [B, S, G, D]
    for bi in range(b):  # rows a sequence owns (the rest of the fixed-size buffer is padding, never read)
        rows_q = (bi * s) // st + bi + torch.arange(-(-s // st))
        rows_k = bi * s + bi + torch.arange(s)
        assert torch.equal(pq[:, rows_q], own_pq[:, rows_q]) and torch.equal(pk[:, rows_k], own_pk[:, rows_k])
        assert_close(pq[:, rows_q].float(), rq[bi, ::st].transpose(0, 1), "fp16", what="pooled q")
        assert_close(pk[:, rows_k].float(), rk[bi].transpose(0, 1), "fp16", what="pooled k")

    (scores,) = run_plugin("ProxyScores", [q, pq, pk], _attrs(cfg, scale))
    assert scores.shape == (b, g, nb, nb)
    assert torch.equal(scores, es.proxy_scores(qt, kt, cfg, scale))
    ref_scores = reference.proxy_scores(qt, kt, proxy_heads=g, block_size=bs, stride=st, scale=scale)
    assert_close(scores, ref_scores, "tf32", allow_inf=True, what="proxy scores (fp16 proxies)")

    # Budget estimate: two kernels with a fixed-size [B*Hq, NCHUNK, BS] intermediate sized by the profile's max.
    attrs = _attrs(cfg, scale, max_seq_len=1024)
    mstat, lstat = run_plugin("ProxyMassStats", [q, k], attrs)
    cb, nchunk = S.mass_chunks(bs, 1024)
    assert mstat.shape == (b * hq, nchunk, bs) and not torch.isnan(mstat).any()
    top = mstat.amax(dim=1, keepdim=True)  # the combine step (native ops in the engine graph)
    total = (lstat * torch.exp2(mstat - top)).sum(dim=1)
    lse = torch.where(total > 0, top.squeeze(1) + torch.log2(total.clamp_min(1e-30)), torch.full_like(total, float("-inf")))
    (mass,) = run_plugin("ProxyMass", [q, k, lse.contiguous()], attrs)
    assert mass.shape == (b, hq, nb)
    assert_close(mass, eb.block_mass(qt, kt, cfg, scale), "fp32", what="block mass vs the project's kernel")
    # Budgets from the mass, as the reference defines them.
    cum = mass.sort(dim=-1, descending=True).values.cumsum(dim=-1)
    budgets = ((cum < cfg.gamma).sum(dim=-1) + 1).clamp(max=nb).to(torch.int32)
    ref_budgets = reference.head_budgets(qt, kt, block_size=bs, gamma=cfg.gamma, scale=scale)
    assert (budgets - ref_budgets).abs().max() <= 1  # a mass exactly at a cumulative boundary may round either way
    # Per-row mass (budget_rule 2): the project's kernel with ROWS; every row sums to 1 over the sequence.
    (row_mass,) = run_plugin("ProxyRowMass", [q, k, lse.contiguous()], attrs)
    assert row_mass.shape == (b, hq, bs, nb)
    own = eb._launch_mass(qt, kt, None, b, s, bs, scale, rows=True)
    assert_close(row_mass, own, "fp32", what="row mass vs the project's kernel")
    assert_close(row_mass, reference.last_block_row_mass(qt, kt, block_size=bs, scale=scale), "fp16", what="row mass")
    assert_close(row_mass.mean(dim=2), mass, "fp32", what="mean of the row masses")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("tactic", S.tactics("ProxySparseAttention"))
def test_sparse_attention_plugin_matches_reference(case, tactic):
    b, s, hq, hkv, d, bs, st, g = case
    q, k, v = _qkv(b, s, hq, hkv, d, seed=s + 1)
    cfg = ProxyAttnConfig(block_size=bs, stride=st, proxy_heads=g, min_budget_tokens=0, budget_fraction=0.3)
    scale = 1.0 / math.sqrt(d)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    scores = reference.proxy_scores(qt, kt, proxy_heads=g, block_size=bs, stride=st, scale=scale)
    budgets = reference.fraction_budgets(b, hq, -(-s // bs), cfg.budget_fraction, q.device)  # random q/k: force drops
    plan = compact_plan(scores, budgets, s, cfg)
    assert (plan.density() < 1).any(), "the case must actually drop blocks"
    (out,) = run_plugin("ProxySparseAttention", [q, k, v, plan.order, plan.counts], _attrs(cfg, scale), tactic=tactic)
    ref, _ = reference.block_sparse_attention(qt, kt, vt, plan.to_mask(), block_size=bs, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out.transpose(1, 2), ref, "fp16", what=f"sparse attention plugin tactic {tactic}")


# ------------------------------------------------------------------------------------------------ engine graph
def _plugin_ops():
    """onnx.reference implementations of the plugin nodes: their Triton kernels, launched as TensorRT would."""
    from onnx.reference.op_run import OpRun

    ops = []
    for name, pdef in S.PLUGINS.items():

        def _run(self, *inputs, _name=name, _pdef=pdef, **_):
            attrs = {a: getattr(self, a) for a in _pdef.attrs}
            outs = run_plugin(_name, [torch.from_numpy(np_array.copy()) for np_array in inputs], attrs)
            return tuple(o.numpy() for o in outs)

        ops.append(type(name, (OpRun,), {"op_domain": S.NAMESPACE, "_run": _run}))
    return ops


def _attention_model(b, s, hq, hkv, d, cfg, scale):
    from onnx import TensorProto, helper

    from export import contract

    attrs = contract.encode_attrs(cfg, scale=scale)
    node = helper.make_node(contract.OP_TYPE, ["q", "k", "v"], ["out"], domain=contract.DOMAIN, name="layer0", **attrs)
    io = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT16, shape)
        for n, shape in (("q", ["B", hq, "S", d]), ("k", ["B", hkv, "S", d]), ("v", ["B", hkv, "S", d]))
    ]
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["B", hq, "S", d])
    graph = helper.make_graph([node], "g", io, [out])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(contract.DOMAIN, 1)])


@pytest.mark.parametrize(
    "case",
    [
        # (B, S, Hq, Hkv, D, block, stride, proxy heads, gamma, dense_below, budget_rule)
        (2, 300, 4, 2, 64, 64, 4, 1, 0.9, 64, 0),
        (1, 330, 4, 4, 64, 64, 4, 2, 0.6, 64, 0),
        (1, 200, 4, 2, 64, 64, 4, 1, 0.9, 256, 0),  # S <= dense_below_tokens: full rows (the dense path)
        (2, 300, 4, 2, 64, 64, 4, 1, 0.5, 64, 1),  # budget rule "recall"
        (1, 330, 4, 4, 64, 64, 4, 2, 0.4, 64, 1),
        (2, 300, 4, 2, 64, 64, 4, 1, 0.5, 64, 2),  # budget rule "row_recall"
        (1, 330, 4, 4, 64, 64, 4, 2, 0.4, 64, 2),
        (1, 40, 4, 2, 64, 64, 4, 1, 0.5, 16, 2),  # S below one block: rows past the sequence hold no mass
    ],
    ids=lambda c: "-".join(map(str, c)),
)
def test_tensorrt_graph_computes_the_plan_and_attention(case):
    """The rewritten engine graph (plugins + native ops) in ONNX's reference evaluator: the native selection equals
    compact_plan on the graph's own scores and budgets, the budgets match the reference, and the output equals
    block-sparse attention with that plan."""
    from onnx.reference import ReferenceEvaluator

    from plugins.tensorrt.graph import to_tensorrt_graph
    from proxyattn.plan import BlockPlan

    b, s, hq, hkv, d, bs, st, g, gamma, dense_below, rule = case
    cfg = ProxyAttnConfig(
        block_size=bs,
        stride=st,
        proxy_heads=g,
        gamma=gamma,
        min_budget_tokens=bs,
        dense_below_tokens=dense_below,
        budget_rule=rule,
        dense_density=None,
    )
    scale = 1.0 / math.sqrt(d)
    model = to_tensorrt_graph(_attention_model(b, s, hq, hkv, d, cfg, scale), max_seq_len=1024)
    kinds = [n.op_type for n in model.graph.node if n.domain == S.NAMESPACE]
    mass_plugin = "ProxyRowMass" if rule == 2 else "ProxyMass"
    assert kinds == ["ProxyPool", "ProxyPool", "ProxyScores", "ProxyRank", "ProxyMassStats", mass_plugin, "ProxySparseAttention"]
    plugin_nodes = [n for n in model.graph.node if n.domain == S.NAMESPACE]
    assert all({"plugin_namespace", "plugin_version", "aot"} <= {a.name for a in n.attribute} for n in plugin_nodes)

    # Structured inputs (a few strong keys) so that budgets are below the full sequence.
    q, k, v = _qkv(b, s, hq, hkv, d, seed=s + 2)
    k[:, :, 3] = (q.float().mean(dim=(1, 2), keepdim=False)[:, None] * 3).to(torch.float16).expand(b, hkv, d)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    ev = ReferenceEvaluator(model, new_ops=_plugin_ops())
    results = ev.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}, intermediate=True)

    def pick(tag):
        return torch.from_numpy(
            next(val for key, val in results.items() if key.startswith("layer0/") and key.rsplit("/", 1)[-1].rsplit("_", 1)[0] == tag)
        )

    order, counts = pick("ProxyRank"), pick("counts")  # ProxyRank's first output is the order
    scores = torch.from_numpy(next(val for key, val in results.items() if key.startswith("layer0/ProxyScores")))
    nb = -(-s // bs)
    assert order.shape == (b, g, nb, nb) and counts.shape == (b, hq, nb) and order.dtype == counts.dtype == torch.int32

    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if s <= dense_below:
        assert counts.tolist() == [[list(range(1, nb + 1))] * hq] * b
    else:
        last_order = reference.last_row_order(scores, keep_sink=True, keep_diagonal=True) if rule else None
        ref_budgets = reference.head_budgets(qt, kt, block_size=bs, gamma=gamma, scale=scale, last_order=last_order, per_row=rule == 2)
        budgets = pick("budgets").to(torch.int32)
        assert (budgets - ref_budgets).abs().max() <= 1
        if rule == 2:
            head_order = last_order.repeat_interleave(hq // g, dim=1)
            row_mass = reference.last_block_row_mass(qt, kt, block_size=bs, scale=scale)
            assert row_budget_mismatches(budgets, row_mass, gamma, head_order, tol=2e-3) == 0
            rule1 = reference.head_budgets(qt, kt, block_size=bs, gamma=gamma, scale=scale, last_order=last_order)
            assert (budgets >= rule1 - 1).all()
        assert (budgets < nb).any() or nb == 1, "the case must drop blocks"
        expected = compact_plan(scores, budgets, s, cfg)
        assert torch.equal(counts, expected.counts)
        plan = BlockPlan(order.contiguous(), counts.contiguous(), budgets, bs, s)
        assert torch.equal(plan.to_mask(), expected.to_mask())
    plan = BlockPlan(order.contiguous(), counts.contiguous(), counts[..., -1].contiguous(), bs, s)
    out = torch.from_numpy(results["out"])
    ref, _ = reference.block_sparse_attention(qt, kt, vt, plan.to_mask(), block_size=bs, scale=scale)
    assert_close(out.transpose(1, 2), ref, "fp16", what="engine graph output")


def _run_graph(model, q, k, v):
    """The engine graph in ONNX's reference evaluator: (output, tag -> first intermediate of layer0 with that hint)."""
    from onnx.reference import ReferenceEvaluator

    results = ReferenceEvaluator(model, new_ops=_plugin_ops()).run(
        None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy()}, intermediate=True
    )
    tagged = {}
    for key, val in results.items():
        if key.startswith("layer0/"):
            tagged.setdefault(key.rsplit("/", 1)[-1].rsplit("_", 1)[0], torch.from_numpy(val))
    return torch.from_numpy(results["out"]), tagged


def _structured(b, s, hq, hkv, d, seed):
    """Inputs in the node's [B, H, S, D] layout with sinks, locality and heavy hitters (budgets below Nb)."""
    from proxyattn.testing import structured_qkv

    q, k, v = structured_qkv(b, s, hq, hkv, d, dtype=torch.float16, seed=seed)
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


@pytest.mark.parametrize(
    "case",
    [
        # (B, S, Hq, Hkv, D, block, stride, proxy heads, gamma, min_budget_tokens, recall_rows, dense_density)
        (2, 330, 4, 2, 64, 64, 4, 1, 0.9, 64, 4, None),  # rule 3, no fallback
        (1, 300, 4, 4, 64, 64, 4, 2, 0.8, 0, 2, None),  # GQA 1, two rankings, no minimum budget
        (2, 700, 4, 2, 64, 64, 4, 1, 0.8, 64, 4, 0.45),  # the dense fallback on one group's plan (mixed execution)
        (2, 330, 4, 2, 64, 64, 4, 1, 0.9, 64, 4, 0.4),  # early dense groups: not measured, every block
        (1, 260, 8, 1, 64, 64, 4, 1, 1.0, 64, 4, 0.9),  # gamma 1: every block (and every group dense)
    ],
    ids=lambda c: "-".join(map(str, c)),
)
def test_tensorrt_graph_block_recall_and_dense_fallback(case):
    """Budget rule 3 in the engine graph: ProxyRank + ProxyNeedsMass + ProxyNeedsCut give exactly the plan of the
    project's GPU path (`estimate_needs.needs_plan`, same kernels, in the interpreter) on the graph's own scores and
    early decision; the needs obey the rule on the reference mass; the dense fallback's groups equal
    `plan.dense_fallback`'s; the output equals block-sparse attention with that plan."""
    from plugins.tensorrt.graph import to_tensorrt_graph
    from proxyattn.kernels import estimate_needs as en
    from proxyattn.plan import BlockPlan
    from proxyattn.testing import need_mismatches

    b, s, hq, hkv, d, bs, st, g, gamma, min_tokens, rows, density = case
    cfg = ProxyAttnConfig(
        block_size=bs,
        stride=st,
        proxy_heads=g,
        gamma=gamma,
        min_budget_tokens=min_tokens,
        dense_below_tokens=bs,
        budget_rule=3,
        recall_rows=rows,
        dense_density=density,
    )
    scale = 1.0 / math.sqrt(d)
    model = to_tensorrt_graph(_attention_model(b, s, hq, hkv, d, cfg, scale), max_seq_len=1024)
    kinds = [n.op_type for n in model.graph.node if n.domain == S.NAMESPACE]
    expected_kinds = ["ProxyPool", "ProxyPool", "ProxyScores", "ProxyRank"]
    if density is not None and gamma < 1:
        expected_kinds += ["ProxyMassStats", "ProxyMass"]  # the early decision's rule-0 budgets
    if gamma < 1:
        expected_kinds += ["ProxyNeedsMass", "ProxyNeedsCut"]
    assert kinds == expected_kinds + ["ProxySparseAttention"]

    q, k, v = _structured(b, s, hq, hkv, d, seed=1 if s == 700 else s)
    out, t = _run_graph(model, q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    nb = -(-s // bs)
    scores, order, counts = t["ProxyScores"], t["ProxyRank"], t["counts"]
    early = None
    if density is not None:
        early = t["early_dense"]
        ref_early = reference.early_dense_groups(t["early_budgets"], hkv, cfg.dense_density_permille, torch.full((b,), nb))
        assert torch.equal(early, ref_early)
        mass_budgets = reference.head_budgets(qt, kt, block_size=bs, gamma=gamma, scale=scale)
        assert (t["early_budgets"] - mass_budgets).abs().max() <= 1
    expected = en.needs_plan(qt, kt, scores, cfg, scale, early=early)  # the GPU path's kernels on the same inputs
    assert torch.equal(order, expected.order) and torch.equal(counts, expected.counts)
    assert torch.equal(t["budgets"].to(torch.int32), expected.budget_blocks)
    if density is not None:
        assert torch.equal(t["dense_heads"], expected.dense_heads)
        if s == 700:  # the case is chosen so that some groups run dense and some do not
            assert expected.dense_heads.any() and not expected.dense_heads.all()
        if s == 330:
            assert early.any()
    if gamma < 1:
        need = t["ProxyNeedsCut"]
        grp = hq // hkv
        for bi in range(b):  # measured groups obey the rule on the reference mass; skipped ones need every block
            for j in range(hkv):
                heads = slice(j * grp, (j + 1) * grp)
                if early is not None and bool(early[bi, j]):
                    assert torch.equal(need[bi, heads], torch.arange(1, nb + 1, dtype=torch.int32).expand(grp, nb))
                    continue
                rank_rows = scores[bi : bi + 1, (j * g) // hkv : (j * g) // hkv + 1]
                assert (
                    need_mismatches(
                        need[bi : bi + 1, heads], qt[bi : bi + 1, :, heads], kt[bi : bi + 1, :, j : j + 1], rank_rows, cfg, scale, tol=2e-3
                    )
                    == 0
                )
        assert (counts[..., -1] < nb).any() or density is not None, "the case must drop blocks"
    else:
        assert counts.tolist() == [[list(range(1, nb + 1))] * hq] * b
    plan = BlockPlan(order.contiguous(), counts.contiguous(), counts[..., -1].contiguous(), bs, s)
    ref, _ = reference.block_sparse_attention(qt, kt, vt, plan.to_mask(), block_size=bs, scale=scale)
    assert_close(out.transpose(1, 2), ref, "fp16", what="engine graph output (rule 3)")


@pytest.mark.parametrize("rule, density", [(0, 0.4), (1, 0.4), (2, 0.6)])
def test_tensorrt_graph_dense_fallback_rules_0_to_2(rule, density):
    """The dense fallback with budget rules 0-2: the graph's counts equal `plan.dense_fallback` of compact_plan on
    the graph's own scores and budgets, with the graph's early decision."""
    from plugins.tensorrt.graph import to_tensorrt_graph
    from proxyattn.plan import BlockPlan, dense_fallback

    b, s, hq, hkv, d, bs = 2, 700, 4, 2, 64, 64
    cfg = ProxyAttnConfig(block_size=bs, gamma=0.8, min_budget_tokens=64, dense_below_tokens=bs, budget_rule=rule, dense_density=density)
    scale = 1.0 / math.sqrt(d)
    model = to_tensorrt_graph(_attention_model(b, s, hq, hkv, d, cfg, scale), max_seq_len=1024)
    q, k, v = _structured(b, s, hq, hkv, d, seed=1)
    out, t = _run_graph(model, q, k, v)
    nb = -(-s // bs)
    early = t["early_dense"]
    assert torch.equal(early, reference.early_dense_groups(t["early_budgets"], hkv, cfg.dense_density_permille, torch.full((b,), nb)))
    budgets = t["budgets"].to(torch.int32)
    expected = dense_fallback(compact_plan(t["ProxyScores"], budgets, s, cfg), hkv, cfg, early=early)
    assert torch.equal(t["ProxyRank"], expected.order) and torch.equal(t["counts"], expected.counts)
    assert torch.equal(t["dense_heads"], expected.dense_heads)
    assert expected.dense_heads.any() and not expected.dense_heads.all(), "the case must mix dense and sparse groups"
    plan = BlockPlan(t["ProxyRank"].contiguous(), t["counts"].contiguous(), budgets, bs, s)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    ref, _ = reference.block_sparse_attention(qt, kt, vt, plan.to_mask(), block_size=bs, scale=scale)
    assert_close(out.transpose(1, 2), ref, "fp16", what=f"engine graph output (rule {rule}, dense fallback)")


def test_profiles_beyond_the_ranking_kernel_are_refused():
    from plugins.tensorrt.graph import to_tensorrt_graph

    model = _attention_model(1, 10, 4, 1, 64, ProxyAttnConfig(block_size=64), 0.125)
    with pytest.raises(ValueError, match=r"max_seq_len=262208 gives 4097 key blocks .*allowed: max_seq_len <= 262144"):
        to_tensorrt_graph(model, max_seq_len=262208)


def test_estimators_without_a_plugin_are_refused():
    from plugins.tensorrt.graph import to_tensorrt_graph

    model = _attention_model(1, 10, 4, 1, 64, ProxyAttnConfig(block_size=64, estimator=1), 0.125)
    with pytest.raises(ValueError, match=r"pa_estimator=1 \(head_max\) has no TensorRT plugin; allowed: 0 \(proxy"):
        to_tensorrt_graph(model, max_seq_len=1024)


def test_vertical_columns_are_refused():
    from plugins.tensorrt.graph import to_tensorrt_graph

    model = _attention_model(1, 10, 4, 1, 64, ProxyAttnConfig(block_size=64, column_fraction=0.02), 0.125)
    with pytest.raises(ValueError, match=r"pa_column_fraction=0.02 \(vertical columns\) has no TensorRT plugin; allowed: 0"):
        to_tensorrt_graph(model, max_seq_len=1024)


def test_sliding_window_nodes_are_left_to_their_local_function():
    from plugins.tensorrt.graph import to_tensorrt_graph
    from export import contract

    cfg = ProxyAttnConfig(block_size=64)
    model = _attention_model(1, 10, 4, 1, 64, cfg, 0.125)
    for a in model.graph.node[0].attribute:
        if a.name == "sliding_window":
            a.i = 512
    with pytest.raises(ValueError, match="no full-attention"):
        to_tensorrt_graph(model, max_seq_len=1024)
    with pytest.raises(ValueError, match="max_seq_len=0"):
        to_tensorrt_graph(model, max_seq_len=0)
    assert model.graph.node[0].op_type == contract.OP_TYPE
