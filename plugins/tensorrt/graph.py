"""The TensorRT graph: every full-attention `proxy::ProxyAttention` node becomes the stage plugins plus native ops.

TensorRT's AOT plugins launch one kernel each, so one ProxyAttention node (the ONNX contract, export/contract.py)
is replaced by this subgraph (`to_tensorrt_graph`):

    pq = ProxyPool(query; step=stride)            pk = ProxyPool(key; step=1)          [plugins]
    scores = ProxyScores(query, pq, pk)                                                 [plugin]  [B, G, Nb, Nb]
    row_max, row_sum = ProxyMassStats(query, key)                                      [plugin]  fixed size
    lse = combine(row_max, row_sum)               ReduceMax, Pow, ReduceSum, Log, Where [native]
    mass = ProxyMass(query, key, lse)                                                   [plugin]  [B, Hq, Nb]
           (budget_rule 2: ProxyRowMass, the mass of every row of the last block,                  [B, Hq, BS, Nb])
    budgets = smallest n with sorted cumsum >= gamma   TopK, CumSum, Less, ReduceSum    [native]  [B, Hq]
              (budget_rule 1: cumsum along the last row's ranking, TopK + GatherElements;
               budget_rule 2: the same per row, then the largest over the rows holding mass, ReduceMax)
    order = TopK of (forced blocks +inf, causal scores, -inf above the diagonal)        [native]  [B, G, Nb, Nb]
    counts = clamp(ceil(n (m+1) / Nb), min, m+1) + forced blocks outside the top k      [native]  [B, Hq, Nb]
             (full rows when S <= dense_below_tokens: the dense path)
    output = ProxySparseAttention(query, key, value, order, counts)                     [plugin]

The native part computes exactly `proxyattn.plan.compact_plan` (ranks by comparisons, ties to the lower index);
it is checked on the CPU with ONNX's reference evaluator, the plugin nodes run by their Triton kernels in the
interpreter (tests/test_trt_plugin_interpret.py). Nodes with `sliding_window > 0` are left as they are: TensorRT's
parser imports their model-local function (exact windowed attention), which is their semantics.
Plugin nodes carry `plugin_namespace="proxy"`, `plugin_version="1"` and `aot=1` (TensorRT's ONNX parser then
uses the AOT implementation).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export import contract
from proxyattn.config import BUDGET_RULES

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


def _rewrite_node(node: onnx.NodeProto, graph: onnx.GraphProto, max_seq_len: int) -> list[onnx.NodeProto]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    config, scale, window = contract.decode_attrs(attrs)
    if config.estimator != 0:
        raise ValueError(
            f"node {node.name!r}: pa_estimator={config.estimator} has no TensorRT plugin; allowed: 0 (the proxy-head "
            "estimator of the ProxyScores plugin)"
        )
    if config.budget_rule not in (0, 1, 2):
        raise ValueError(
            f"node {node.name!r}: pa_budget_rule={config.budget_rule} ({BUDGET_RULES[config.budget_rule]}) has no "
            "TensorRT graph; allowed: 0 (mass), 1 (recall), 2 (row_recall)"
        )
    if config.dense_density is not None:
        raise ValueError(
            f"node {node.name!r}: pa_dense_density={config.dense_density} (the dense fallback) has no TensorRT graph; "
            "allowed: 0 (off)"
        )
    q, k, v = node.input
    b = _Builder(node.name or "proxy_attention", graph)
    i64 = np.int64
    bs, g = config.block_size, config.proxy_heads
    cfg_attrs = {"pa_block_size": bs, "scale": float(scale)}

    shape_q = b.op("Shape", [q])
    seq = b.op("Gather", [shape_q, b.const(2, i64)], axis=0, hint="S")
    batch = b.op("Gather", [shape_q, b.const(0, i64)], axis=0, hint="B")
    heads = b.op("Gather", [shape_q, b.const(1, i64)], axis=0, hint="Hq")
    nb = b.op("Div", [b.op("Add", [seq, b.const(bs - 1, i64)]), b.const(bs, i64)], hint="Nb")
    nb1 = b.op("Reshape", [nb, b.const([1], i64)], hint="Nb1")

    pq = b.plugin("ProxyPool", [q], groups=g, step=config.stride)
    pk = b.plugin("ProxyPool", [k], groups=g, step=1)
    scores = b.plugin("ProxyScores", [q, pq, pk], pa_proxy_heads=g, pa_stride=config.stride, **cfg_attrs)

    idx = b.op("Range", [b.const(0, i64), nb, b.const(1, i64)], hint="idx")
    rep = None

    def per_head(t):  # [B, G, Nb] -> [B, Hq, Nb], head h reads ranking h // (Hq / G)
        nonlocal rep
        if rep is None:
            rep = b.op("Div", [heads, b.const(g, i64)])
        shape = b.op("Concat", [b.op("Reshape", [x, b.const([1], i64)]) for x in (batch, b.const(g, i64), rep, nb)], axis=0)
        t4 = b.op("Expand", [b.op("Unsqueeze", [t, b.const([2], i64)]), shape])
        return b.op("Reshape", [t4, b.op("Concat", [b.op("Reshape", [x, b.const([1], i64)]) for x in (batch, heads, nb)], axis=0)])

    # ---- per-head budgets [B, Hq] (int64)
    bh = b.op("Concat", [b.op("Reshape", [batch, b.const([1], i64)]), b.op("Reshape", [heads, b.const([1], i64)])], axis=0)
    if config.budget_fraction is not None:
        nbf = b.op("Cast", [nb], to=TensorProto.FLOAT)
        n = b.op("Cast", [b.op("Ceil", [b.op("Mul", [nbf, b.const(config.budget_fraction, np.float32)])])], to=TensorProto.INT64)
        n = b.op("Min", [b.op("Max", [n, b.const(1, i64)]), nb])
        budgets = b.op("Expand", [n, bh], hint="budgets")
    elif config.gamma >= 1.0:
        budgets = b.op("Expand", [nb, bh], hint="budgets")
    else:
        row_max, row_sum = b.plugin("ProxyMassStats", [q, k], n_out=2, max_seq_len=max_seq_len, **cfg_attrs)
        top = b.op("ReduceMax", [row_max, b.const([1], i64)], keepdims=1)
        e = b.op("Pow", [b.const(2.0, np.float32), b.op("Sub", [row_max, top])])
        total = b.op("ReduceSum", [b.op("Mul", [row_sum, e]), b.const([1], i64)], keepdims=0)
        log2 = b.op("Div", [b.op("Log", [b.op("Max", [total, b.const(1e-30, np.float32)])]), b.const(math.log(2.0), np.float32)])
        lse_val = b.op("Add", [b.op("Squeeze", [top, b.const([1], i64)]), log2])
        lse = b.op("Where", [b.op("Greater", [total, b.const(0.0, np.float32)]), lse_val, b.const(-np.inf, np.float32)], hint="lse")
        rows = config.budget_rule == 2
        mass = b.plugin("ProxyRowMass" if rows else "ProxyMass", [q, k, lse], max_seq_len=max_seq_len, **cfg_attrs)
        if config.budget_rule in (1, 2):
            # Rule "recall": the head's mass along the last query block's shared ranking (forced blocks first, in
            # score order: proxy scores are probabilities, so +2 lifts them above every other block; two forced
            # scores closer than float32 rounding at 2 (2.4e-7) keep index order, where the reference compares
            # them exactly).
            last = b.op("Sub", [nb1, b.const([1], i64)])
            srow = b.op("Squeeze", [b.op("Gather", [scores, last], axis=2), b.const([2], i64)])  # [B, G, Nb]
            lforced = None
            if config.keep_sink:
                lforced = b.op("Equal", [idx, b.const(0, i64)])
            if config.keep_diagonal:
                ldiag = b.op("Equal", [idx, b.op("Sub", [nb, b.const(1, i64)])])
                lforced = ldiag if lforced is None else b.op("Or", [lforced, ldiag])
            lkey = srow if lforced is None else b.op("Where", [lforced, b.op("Add", [srow, b.const(2.0, np.float32)]), srow])
            last_order = per_head(b.op("TopK", [lkey, nb1], n_out=2, axis=-1, largest=1, sorted=1, hint="last_order")[1])
            if rows:  # the same ranking for every row of the head: [B, Hq, 1, Nb] -> [B, Hq, BS, Nb]
                last_order = b.op("Expand", [b.op("Unsqueeze", [last_order, b.const([2], i64)]), b.op("Shape", [mass])])
            ranked = b.op("GatherElements", [mass, last_order], axis=-1)
        else:
            ranked = b.op("TopK", [mass, nb1], n_out=2, axis=-1, largest=1, sorted=1)[0]
        cum = b.op("CumSum", [ranked, b.const(-1, i64)])
        below = b.op("Cast", [b.op("Less", [cum, b.const(config.gamma, np.float32)])], to=TensorProto.INT64)
        needed = b.op("Add", [b.op("ReduceSum", [below, b.const([-1], i64)], keepdims=0), b.const(1, i64)])
        if rows:
            # Rule "row_recall": the longest prefix any row of the last block needs; rows without mass (past a
            # sequence shorter than one block) need nothing.
            total = b.op("Squeeze", [b.op("Slice", [cum, b.const([-1], i64), b.const([np.iinfo(np.int64).max], i64),
                                                    b.const([-1], i64)]), b.const([-1], i64)])  # [B, Hq, BS]
            needed = b.op("Where", [b.op("Greater", [total, b.const(0.0, np.float32)]), needed, b.const(0, i64)])
            needed = b.op("ReduceMax", [needed, b.const([-1], i64)], keepdims=0)
        budgets = b.op("Min", [needed, nb], hint="budgets")

    # ---- selection: order [B, G, Nb, Nb] int32 and counts [B, Hq, Nb] int32
    row = b.op("Unsqueeze", [idx, b.const([1], i64)])
    col = b.op("Unsqueeze", [idx, b.const([0], i64)])
    causal = b.op("LessOrEqual", [col, row], hint="causal")
    neg_inf, pos_inf = b.const(-np.inf, np.float32), b.const(np.inf, np.float32)
    sc = b.op("Where", [causal, scores, neg_inf], hint="causal_scores")
    forced = None
    if config.keep_sink:
        forced = b.op("Equal", [col, b.const(0, i64)])
    if config.keep_diagonal:
        diag = b.op("Equal", [col, row])
        forced = diag if forced is None else b.op("Or", [forced, diag])
    key = sc if forced is None else b.op("Where", [b.op("And", [forced, causal]), pos_inf, sc])
    order = b.op("Cast", [b.op("TopK", [key, nb1], n_out=2, axis=-1, largest=1, sorted=1)[1]], to=TensorProto.INT32, hint="order")

    m1 = b.op("Add", [idx, b.const(1, i64)], hint="m1")
    n3 = b.op("Unsqueeze", [budgets, b.const([2], i64)])
    kk = b.op("Div", [b.op("Add", [b.op("Mul", [n3, m1]), b.op("Sub", [nb, b.const(1, i64)])]), nb])
    kk = b.op("Min", [b.op("Max", [kk, b.const(config.min_budget_blocks, i64)]), m1], hint="k")  # [B, Hq, Nb]

    counts = kk
    if config.keep_sink:
        s0 = b.op("Gather", [sc, b.const([0], i64)], axis=3)  # [B, G, Nb, 1]
        rank0 = b.op("ReduceSum", [b.op("Cast", [b.op("Greater", [sc, s0])], to=TensorProto.INT64), b.const([-1], i64)], keepdims=0)
        counts = b.op("Add", [counts, b.op("Cast", [b.op("GreaterOrEqual", [per_head(rank0), kk])], to=TensorProto.INT64)])
    if config.keep_diagonal:
        sshape = b.op("Shape", [sc])
        gidx = b.op("Expand", [b.op("Reshape", [idx, b.const([1, 1, -1, 1], i64)]),
                              b.op("Concat", [b.op("Slice", [sshape, b.const([0], i64), b.const([3], i64)]), b.const([1], i64)], axis=0)])
        sd = b.op("GatherElements", [sc, gidx], axis=3)  # [B, G, Nb, 1] diagonal scores
        ahead = b.op("Or", [b.op("Greater", [sc, sd]), b.op("And", [b.op("Equal", [sc, sd]), b.op("Less", [col, row])])])
        rankd = b.op("ReduceSum", [b.op("Cast", [b.op("And", [ahead, causal])], to=TensorProto.INT64), b.const([-1], i64)], keepdims=0)
        extra = b.op("Cast", [b.op("GreaterOrEqual", [per_head(rankd), kk])], to=TensorProto.INT64)
        if config.keep_sink:  # block 0 is both sink and diagonal in row 0
            extra = b.op("Mul", [extra, b.op("Cast", [b.op("Greater", [idx, b.const(0, i64)])], to=TensorProto.INT64)])
        counts = b.op("Add", [counts, extra])
    dense = b.op("LessOrEqual", [seq, b.const(config.dense_below_tokens, i64)])
    counts = b.op("Where", [dense, b.op("Expand", [m1, b.op("Shape", [counts])]), counts])
    counts = b.op("Cast", [counts], to=TensorProto.INT32, hint="counts")

    b.nodes.append(helper.make_node("ProxySparseAttention", [q, k, v, order, counts], list(node.output),
                                    name=b.name("ProxySparseAttention"),
                                    domain=PLUGIN_DOMAIN, plugin_namespace=S.NAMESPACE, plugin_version=S.VERSION, aot=1, **cfg_attrs))
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
