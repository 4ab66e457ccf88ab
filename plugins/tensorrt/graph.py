"""The TensorRT graph: every full-attention `proxy::ProxyAttention` node becomes the stage plugins plus native ops.

TensorRT's AOT plugins launch one kernel each, so one ProxyAttention node (the ONNX contract, export/contract.py)
is replaced by this subgraph (`to_tensorrt_graph`); every budget rule and the dense fallback of
`ProxyAttnConfig` are implemented, with the same integer arithmetic as `proxyattn.plan`:

    pq = ProxyPool(query; step=stride)            pk = ProxyPool(key; step=1)          [plugins]
    scores = ProxyScores(query, pq, pk)                                                 [plugin]  [B, G, Nb, Nb]
    order, rank, sink_rank, diag_rank = ProxyRank(scores)                               [plugin]  the plan's rankings
    -- when needed (mass, recall, row_recall, the dense fallback's early decision):
    row_max, row_sum = ProxyMassStats(query, key)                                      [plugin]  fixed size
    lse = combine(row_max, row_sum)               ReduceMax, Pow, ReduceSum, Log, Where [native]
    mass = ProxyMass(query, key, lse)                                                   [plugin]  [B, Hq, Nb]
           (row_recall: ProxyRowMass, the mass of every row of the last block,                    [B, Hq, BS, Nb])
    budgets: mass: sorted cumsum >= gamma (TopK of the values, CumSum, Less, ReduceSum)   [native]  [B, Hq]
             recall / row_recall: cumsum along row Nb-1 of `order` (GatherElements; per row, ReduceMax over rows)
    early = sum of the group's mass budgets * 1000 >= dense_density_permille * group * Nb  [native] [B, Hkv]
    -- mass / recall / row_recall / budget_fraction:
    counts = clamp(ceil(n (m+1) / Nb), min, m+1) + forced blocks outside the top k      [native]  [B, Hq, Nb]
    -- block_recall (the default):
    mass3, lse3 = ProxyNeedsMass(query, key, skip=early)                                [plugin]  log2 block masses
    need, counts = ProxyNeedsCut(query, mass3, lse3, order, sink_rank, diag_rank, skip) [plugin]  [B, Hq, Nb]
    -- every rule:
    counts = m + 1 when S <= dense_below_tokens (the dense path)                        [native]
    dense groups = early | kept * 1000 >= permille * causal blocks; their counts m + 1  [native]  (dense fallback)
    output = ProxySparseAttention(query, key, value, order, counts)                     [plugin]

The plan equals `proxyattn.plan_blocks` (`compact_plan`, `compact_plan_needs`, `dense_fallback`); dense groups run
as full rows in the block-sparse kernel, decided on the device (what the Python GPU path does under CUDA graph
capture). It is checked on the CPU with ONNX's reference evaluator, the plugin nodes run by their Triton kernels in
the interpreter (tests/test_trt_plugin_interpret.py, tests/test_conformance.py). No index output depends on
TensorRT's TopK tie order (TopK sorts mass values only). Nodes with `sliding_window > 0` are left as they are:
TensorRT's parser imports their model-local function (exact windowed attention), which is their semantics.
Plugin nodes carry `plugin_namespace="proxy"`, `plugin_version="1"` and `aot=1` (TensorRT's ONNX parser then
uses the AOT implementation). Each budget rule's part of the graph is one builder in `rule_counts` (`_rewrite_node`).
What the graph cannot run is refused by name when it is built: estimators other than proxy, vertical columns
(`column_fraction` other than 0), and profiles longer than `spec.MAX_RANK_BLOCKS` key blocks.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import contract
from proxyattn.config import BudgetRule, Estimator
from . import spec as S

__all__ = ["to_tensorrt_graph", "PLUGIN_DOMAIN"]

PLUGIN_DOMAIN = S.NAMESPACE


class _Builder:
    def __init__(self, prefix: str, graph: onnx.GraphProto):
        self.p = prefix
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.n = 0

    def name(self, hint: str) -> str:
        self.n += 1
        return f"{self.p}/{hint}_{self.n}"

    def const(self, value, dtype, hint="c") -> str:
        name = self.name(hint)
        self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, n_out=1, domain="", hint=None, **attrs):
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.name(op_type + "_node"), domain=domain, **attrs))
        return outs if n_out > 1 else outs[0]

    def plugin(self, op_type, inputs, n_out=1, **attrs):
        return self.op(op_type, inputs, n_out, domain=PLUGIN_DOMAIN, plugin_namespace=S.NAMESPACE, plugin_version=S.VERSION, aot=1, **attrs)


def _check_config(node: onnx.NodeProto, config, max_seq_len: int) -> None:
    """ValueError naming what the TensorRT graph cannot run (decided at build time, never changed silently)."""
    if config.estimator is not Estimator.PROXY:
        raise ValueError(
            f"node {node.name!r}: pa_estimator={int(config.estimator)} ({config.estimator.label}) has no TensorRT plugin; "
            f"allowed: {int(Estimator.PROXY)} ({Estimator.PROXY.label}, the proxy-head estimator of the ProxyScores plugin)"
        )
    if config.column_fraction != 0.0:
        raise ValueError(
            f"node {node.name!r}: pa_column_fraction={config.column_fraction} (vertical columns) has no TensorRT plugin; "
            "allowed: 0 (blocks only; columns run in the Triton kernels and the ONNX Runtime op)"
        )
    nb_max = -(-max_seq_len // config.block_size)
    if nb_max > S.MAX_RANK_BLOCKS:
        raise ValueError(
            f"node {node.name!r}: max_seq_len={max_seq_len} gives {nb_max} key blocks of {config.block_size} tokens; the "
            f"TensorRT graph's ranking plugin sorts at most {S.MAX_RANK_BLOCKS} (allowed: max_seq_len <= "
            f"{S.MAX_RANK_BLOCKS * config.block_size})"
        )


def _rewrite_node(node: onnx.NodeProto, graph: onnx.GraphProto, max_seq_len: int) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    config, scale, window = contract.decode_attrs(attrs)
    _check_config(node, config, max_seq_len)
    q, k, v = node.input
    b = _Builder(node.name or "proxy_attention", graph)
    i64 = np.int64
    bs, g = config.block_size, config.proxy_heads
    cfg_attrs = {"pa_block_size": bs, "scale": float(scale)}
    keep = {"pa_keep_sink": int(config.keep_sink), "pa_keep_diagonal": int(config.keep_diagonal)}
    permille = config.dense_density_permille
    fraction = config.budget_fraction is not None

    def vec(*xs):  # 1-D int64 shape from scalars
        return b.op("Concat", [b.op("Reshape", [x, b.const([1], i64)]) for x in xs], axis=0)

    shape_q = b.op("Shape", [q])
    seq = b.op("Gather", [shape_q, b.const(2, i64)], axis=0, hint="S")
    batch = b.op("Gather", [shape_q, b.const(0, i64)], axis=0, hint="B")
    heads = b.op("Gather", [shape_q, b.const(1, i64)], axis=0, hint="Hq")
    kv_heads = b.op("Gather", [b.op("Shape", [k]), b.const(1, i64)], axis=0, hint="Hkv")
    group = b.op("Div", [heads, kv_heads], hint="group")
    nb = b.op("Div", [b.op("Add", [seq, b.const(bs - 1, i64)]), b.const(bs, i64)], hint="Nb")
    nb1 = b.op("Reshape", [nb, b.const([1], i64)], hint="Nb1")

    pq = b.plugin("ProxyPool", [q], groups=g, step=config.stride)
    pk = b.plugin("ProxyPool", [k], groups=g, step=1)
    scores = b.plugin("ProxyScores", [q, pq, pk], pa_proxy_heads=g, pa_stride=config.stride, **cfg_attrs)
    # The plan's rankings for every rule (the order compact_plan and the GPU path keep), and the score-only ranks of
    # block 0 and block m in each row (forced blocks outside a top k are counted from these).
    order, _, sink_rank, diag_rank = b.plugin("ProxyRank", [scores], n_out=4, pa_block_size=bs, max_seq_len=max_seq_len, **keep)

    idx = b.op("Range", [b.const(0, i64), nb, b.const(1, i64)], hint="idx")
    m1 = b.op("Add", [idx, b.const(1, i64)], hint="m1")
    bh = vec(batch, heads)
    rep = None

    def per_head(t):  # [B, G, Nb] -> [B, Hq, Nb], head h reads ranking h // (Hq / G)
        nonlocal rep
        if rep is None:
            rep = b.op("Div", [heads, b.const(g, i64)])
        t4 = b.op("Expand", [b.op("Unsqueeze", [t, b.const([2], i64)]), vec(batch, b.const(g, i64), rep, nb)])
        return b.op("Reshape", [t4, vec(batch, heads, nb)])

    def count_budget(ranked, rows: bool):
        """Blocks needed to reach gamma along the last axis of `ranked` (cumsum < gamma, plus one); per row (rows):
        the largest need over the rows holding mass."""
        cum = b.op("CumSum", [ranked, b.const(-1, i64)])
        below = b.op("Cast", [b.op("Less", [cum, b.const(config.gamma, np.float32)])], to=TensorProto.INT64)
        needed = b.op("Add", [b.op("ReduceSum", [below, b.const([-1], i64)], keepdims=0), b.const(1, i64)])
        if rows:
            # Rule "row_recall": the longest prefix any row of the last block needs; rows without mass (past a
            # sequence shorter than one block) need nothing.
            total = b.op(
                "Squeeze",
                [b.op("Slice", [cum, b.const([-1], i64), b.const([np.iinfo(np.int64).max], i64), b.const([-1], i64)]), b.const([-1], i64)],
            )  # [B, Hq, BS]
            needed = b.op("Where", [b.op("Greater", [total, b.const(0.0, np.float32)]), needed, b.const(0, i64)])
            needed = b.op("ReduceMax", [needed, b.const([-1], i64)], keepdims=0)
        return b.op("Min", [needed, nb])

    lse = None

    def last_block_lse():
        nonlocal lse
        if lse is None:
            row_max, row_sum = b.plugin("ProxyMassStats", [q, k], n_out=2, max_seq_len=max_seq_len, **cfg_attrs)
            top = b.op("ReduceMax", [row_max, b.const([1], i64)], keepdims=1)
            e = b.op("Pow", [b.const(2.0, np.float32), b.op("Sub", [row_max, top])])
            total = b.op("ReduceSum", [b.op("Mul", [row_sum, e]), b.const([1], i64)], keepdims=0)
            log2 = b.op("Div", [b.op("Log", [b.op("Max", [total, b.const(1e-30, np.float32)])]), b.const(math.log(2.0), np.float32)])
            lse_val = b.op("Add", [b.op("Squeeze", [top, b.const([1], i64)]), log2])
            lse = b.op("Where", [b.op("Greater", [total, b.const(0.0, np.float32)]), lse_val, b.const(-np.inf, np.float32)], hint="lse")
        return lse

    mass = None

    def last_block_mass():  # [B, Hq, Nb]: the mean mass of each head's last query block
        nonlocal mass
        if mass is None:
            mass = b.plugin("ProxyMass", [q, k, last_block_lse()], max_seq_len=max_seq_len, **cfg_attrs)
        return mass

    def mass_budgets():  # budget rule "mass" (the paper): the fewest blocks holding gamma, mass sorted descending
        return count_budget(b.op("TopK", [last_block_mass(), nb1], n_out=2, axis=-1, largest=1, sorted=1)[0], rows=False)

    # ---- the dense fallback's early decision (api.early_dense_groups): before any score, from rule mass's budgets
    early = None
    if permille and not fraction:
        budgets0 = (
            b.op("Expand", [nb, bh], hint="early_budgets")
            if config.gamma >= 1.0
            else b.op("Identity", [mass_budgets()], hint="early_budgets")
        )
        total0 = b.op("ReduceSum", [b.op("Reshape", [budgets0, vec(batch, kv_heads, group)]), b.const([-1], i64)], keepdims=0)
        need0 = b.op("Mul", [b.op("Mul", [group, nb]), b.const(permille, i64)])
        early = b.op("GreaterOrEqual", [b.op("Mul", [total0, b.const(1000, i64)]), need0], hint="early_dense")  # [B, Hkv]

    causal_counts = b.op("Expand", [m1, b.op("Concat", [bh, nb1], axis=0)], hint="full_counts")  # [B, Hq, Nb]: m + 1

    def block_recall_counts():
        """Rule "block_recall": each (head, query block)'s need measured by the two needs kernels; the cut kernel
        writes the counts (min_budget_tokens' top blocks, forced blocks outside them, >= the need)."""
        if config.gamma >= 1.0:  # every causal block
            b.op("Expand", [nb, bh], hint="budgets")
            return causal_counts
        skip = (
            b.op("Cast", [early], to=TensorProto.INT32)
            if early is not None
            else b.op("ConstantOfShape", [vec(batch, kv_heads)], value=helper.make_tensor("zero", TensorProto.INT32, [1], [0]))
        )
        mass3, lse3 = b.plugin("ProxyNeedsMass", [q, k, skip], n_out=2, pa_recall_rows=config.recall_rows, **cfg_attrs)
        need, counts = b.plugin(
            "ProxyNeedsCut",
            [q, mass3, lse3, order, sink_rank, diag_rank, skip],
            n_out=2,
            pa_block_size=bs,
            pa_recall_rows=config.recall_rows,
            pa_gamma=float(config.gamma),
            pa_min_budget_tokens=config.min_budget_tokens,
            **keep,
        )
        counts = b.op("Cast", [counts], to=TensorProto.INT64)
        # The reported budget (reference.needs_budgets): the last block's need, at least min(min_blocks, Nb).
        last_need = b.op(
            "Squeeze",
            [
                b.op("Gather", [b.op("Cast", [need], to=TensorProto.INT64), b.op("Sub", [nb1, b.const([1], i64)])], axis=2),
                b.const([2], i64),
            ],
        )
        b.op("Max", [last_need, b.op("Min", [nb, b.const(config.min_budget_blocks, i64)])], hint="budgets")
        return counts

    def mass_rule_budgets():  # rule "mass" (the paper)
        return b.op("Identity", [mass_budgets()], hint="budgets")

    def ranked_budgets(rows: bool):
        """Rules "recall" / "row_recall" (rows): the head's mass along the last query block's shared ranking, which
        is row Nb - 1 of the plan's order (forced blocks first in score order, then descending score, lower index
        first: reference.last_row_order)."""
        lmass = b.plugin("ProxyRowMass", [q, k, last_block_lse()], max_seq_len=max_seq_len, **cfg_attrs) if rows else last_block_mass()
        last = b.op("Sub", [nb1, b.const([1], i64)])
        lorder = b.op("Cast", [b.op("Squeeze", [b.op("Gather", [order, last], axis=2), b.const([2], i64)])], to=TensorProto.INT64)
        last_order = per_head(lorder)  # [B, Hq, Nb]
        if rows:  # the same ranking for every row of the head: [B, Hq, 1, Nb] -> [B, Hq, BS, Nb]
            last_order = b.op("Expand", [b.op("Unsqueeze", [last_order, b.const([2], i64)]), b.op("Shape", [lmass])])
        return b.op("Identity", [count_budget(b.op("GatherElements", [lmass, last_order], axis=-1), rows)], hint="budgets")

    def scaled_counts(budget_rule_budgets):
        """Rules "mass" / "recall" / "row_recall" and budget_fraction: per-head budgets [B, Hq] (int64), then the
        selection counts [B, Hq, Nb]: clamp(ceil(n (m+1) / Nb), min, m+1) + forced blocks outside the top k."""
        if fraction:
            nbf = b.op("Cast", [nb], to=TensorProto.FLOAT)
            n = b.op("Cast", [b.op("Ceil", [b.op("Mul", [nbf, b.const(config.budget_fraction, np.float32)])])], to=TensorProto.INT64)
            n = b.op("Min", [b.op("Max", [n, b.const(1, i64)]), nb])
            budgets = b.op("Expand", [n, bh], hint="budgets")
        elif config.gamma >= 1.0:
            budgets = b.op("Expand", [nb, bh], hint="budgets")
        else:
            budgets = budget_rule_budgets()
        n3 = b.op("Unsqueeze", [budgets, b.const([2], i64)])
        kk = b.op("Div", [b.op("Add", [b.op("Mul", [n3, m1]), b.op("Sub", [nb, b.const(1, i64)])]), nb])
        kk = b.op("Min", [b.op("Max", [kk, b.const(config.min_budget_blocks, i64)]), m1], hint="k")  # [B, Hq, Nb]
        counts = kk
        if config.keep_sink:
            rank0 = per_head(b.op("Cast", [sink_rank], to=TensorProto.INT64))
            counts = b.op("Add", [counts, b.op("Cast", [b.op("GreaterOrEqual", [rank0, kk])], to=TensorProto.INT64)])
        if config.keep_diagonal:
            rankd = per_head(b.op("Cast", [diag_rank], to=TensorProto.INT64))
            extra = b.op("Cast", [b.op("GreaterOrEqual", [rankd, kk])], to=TensorProto.INT64)
            if config.keep_sink:  # block 0 is both sink and diagonal in row 0
                extra = b.op("Mul", [extra, b.op("Cast", [b.op("Greater", [idx, b.const(0, i64)])], to=TensorProto.INT64)])
            counts = b.op("Add", [counts, extra])
        return counts

    # BudgetRule -> the builder of its counts [B, Hq, Nb] (int64): the TensorRT graph's one dispatch on the rule.
    rule_counts = {
        BudgetRule.MASS: lambda: scaled_counts(mass_rule_budgets),
        BudgetRule.RECALL: lambda: scaled_counts(lambda: ranked_budgets(rows=False)),
        BudgetRule.ROW_RECALL: lambda: scaled_counts(lambda: ranked_budgets(rows=True)),
        BudgetRule.BLOCK_RECALL: block_recall_counts,
    }
    counts = scaled_counts(None) if fraction else rule_counts[config.budget_rule]()

    # ---- the dense path (S <= dense_below_tokens) keeps every causal block
    dense = b.op("LessOrEqual", [seq, b.const(config.dense_below_tokens, i64)])
    counts = b.op("Where", [dense, causal_counts, counts])
    # ---- the dense fallback (plan.dense_fallback): KV groups whose plan keeps >= dense_density of their causal blocks
    # (reference.dense_groups), or decided early, run as full rows in the block-sparse kernel; integer arithmetic.
    if permille:
        kept = b.op("ReduceSum", [b.op("Reshape", [counts, vec(batch, kv_heads, b.const(-1, i64))]), b.const([-1], i64)], keepdims=0)
        causal_blocks = b.op("Div", [b.op("Mul", [b.op("Mul", [group, nb]), b.op("Add", [nb, b.const(1, i64)])]), b.const(2, i64)])
        groups = b.op("GreaterOrEqual", [b.op("Mul", [kept, b.const(1000, i64)]), b.op("Mul", [causal_blocks, b.const(permille, i64)])])
        if early is not None:
            groups = b.op("Or", [groups, early])
        groups = b.op("Identity", [groups], hint="dense_groups")  # [B, Hkv]
        dense_heads = b.op(
            "Reshape",
            [b.op("Expand", [b.op("Unsqueeze", [groups, b.const([2], i64)]), vec(batch, kv_heads, group)]), bh],
            hint="dense_heads",
        )  # [B, Hq]
        counts = b.op("Where", [b.op("Unsqueeze", [dense_heads, b.const([2], i64)]), causal_counts, counts])
    counts = b.op("Cast", [counts], to=TensorProto.INT32, hint="counts")

    b.nodes.append(
        helper.make_node(
            "ProxySparseAttention",
            [q, k, v, order, counts],
            list(node.output),
            name=b.name("ProxySparseAttention"),
            domain=PLUGIN_DOMAIN,
            plugin_namespace=S.NAMESPACE,
            plugin_version=S.VERSION,
            aot=1,
            **cfg_attrs,
        )
    )
    return b.nodes


def to_tensorrt_graph(model: onnx.ModelProto, *, max_seq_len: int) -> onnx.ModelProto:
    """A copy of `model` with every full-attention ProxyAttention node replaced by the stage subgraph.

    Args:
        model: an exported model (export.onnx_export), weights may stay external.
        max_seq_len: the longest sequence of the engine's profile (sizes the budget estimate's fixed intermediates).
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len={max_seq_len!r} must be a positive int")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = []
    replaced = 0
    for node in out.graph.node:
        if node.op_type == contract.OP_TYPE and node.domain == contract.DOMAIN:
            window = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "sliding_window"), 0)
            if window == 0:
                nodes.extend(_rewrite_node(node, out.graph, max_seq_len))
                replaced += 1
                continue
        nodes.append(node)
    if not replaced:
        raise ValueError(f"model has no full-attention {contract.DOMAIN}::{contract.OP_TYPE} node to rewrite")
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out
