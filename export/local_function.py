"""The model-local ONNX function `proxy::ProxyAttention`: dense causal attention (with the sliding window).

A model carrying this function runs in any ONNX runtime or parser unchanged (ONNX Runtime, Polygraphy, TensorRT's
parser): the node is inlined as this body where no plugin or custom op claims it. The body computes in float32 and
casts back to the query dtype, reads K/V un-expanded through a broadcast MatMul over `[B, Hkv, Hq/Hkv, S, D]`, and
honours the node's `scale` and `sliding_window` attributes (0 = full causal). It is exactly the contract's
semantics whenever ProxyAttn takes its dense path (S <= dense_below_tokens, full budget, sliding layers).
"""

from __future__ import annotations

import onnx
from onnx import AttributeProto, TensorProto, helper

from . import contract


def _ref_attr(name: str, ref: str, kind: int) -> AttributeProto:
    attr = AttributeProto()
    attr.name = name
    attr.ref_attr_name = ref
    attr.type = kind
    return attr


def make_function(attribute_names: list[str], opset: int) -> onnx.FunctionProto:
    """The function body for nodes carrying `attribute_names` (all must be declared), in ONNX opset `opset`."""
    if opset < 18:
        raise ValueError(f"opset={opset} is not supported; allowed: 18 or later")
    for needed in ("scale", "sliding_window"):
        if needed not in attribute_names:
            raise ValueError(f"attribute {needed!r} missing from {attribute_names}")
    n = helper.make_node
    scale_const = n("Constant", [], ["scale_f"])
    scale_const.attribute.append(_ref_attr("value_float", "scale", AttributeProto.FLOAT))
    window_const = n("Constant", [], ["window"])
    window_const.attribute.append(_ref_attr("value_int", "sliding_window", AttributeProto.INT))

    def const_i64(name: str, values: list[int]):
        return n("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))

    nodes = [
        n("Cast", ["query"], ["qf"], to=TensorProto.FLOAT),
        n("Cast", ["key"], ["kf"], to=TensorProto.FLOAT),
        n("Cast", ["value"], ["vf"], to=TensorProto.FLOAT),
        n("Shape", ["qf"], ["q_shape"]),
        n("Shape", ["kf"], ["k_shape"]),
        const_i64("i0", [0]),
        const_i64("i1", [1]),
        const_i64("i2", [2]),
        const_i64("i3", [3]),
        n("Gather", ["q_shape", "i0"], ["b"], axis=0),
        n("Gather", ["q_shape", "i1"], ["hq"], axis=0),
        n("Gather", ["k_shape", "i1"], ["hkv"], axis=0),
        n("Gather", ["q_shape", "i2"], ["s"], axis=0),
        n("Gather", ["q_shape", "i3"], ["d"], axis=0),
        n("Div", ["hq", "hkv"], ["rep"]),
        n("Concat", ["b", "hkv", "rep", "s", "d"], ["q5_shape"], axis=0),
        n("Reshape", ["qf", "q5_shape"], ["q5"]),
        n("Unsqueeze", ["kf", "i2"], ["k5"]),
        n("Unsqueeze", ["vf", "i2"], ["v5"]),
        n("Transpose", ["k5"], ["k5t"], perm=[0, 1, 2, 4, 3]),
        n("MatMul", ["q5", "k5t"], ["qk"]),
        scale_const,
        n("Mul", ["qk", "scale_f"], ["scores"]),
        # causal and window mask over [S, S]: key j visible to query i iff i - W_eff < j <= i
        n("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT64, [], [0])),
        n("Constant", [], ["one"], value=helper.make_tensor("one", TensorProto.INT64, [], [1])),
        n("Squeeze", ["s", "i0"], ["s_scalar"]),
        n("Range", ["zero", "s_scalar", "one"], ["pos"]),
        n("Unsqueeze", ["pos", "i1"], ["rows"]),
        n("Unsqueeze", ["pos", "i0"], ["cols"]),
        n("LessOrEqual", ["cols", "rows"], ["causal"]),
        window_const,
        n("Greater", ["window", "zero"], ["has_window"]),
        n("Where", ["has_window", "window", "s_scalar"], ["w_eff"]),
        n("Sub", ["rows", "w_eff"], ["lower"]),
        n("Greater", ["cols", "lower"], ["in_window"]),
        n("And", ["causal", "in_window"], ["allowed"]),
        n("Constant", [], ["neg_inf"], value=helper.make_tensor("neg_inf", TensorProto.FLOAT, [], [float("-inf")])),
        n("Where", ["allowed", "scores", "neg_inf"], ["masked"]),
        n("Softmax", ["masked"], ["probs"], axis=-1),
        n("MatMul", ["probs", "v5"], ["o5"]),
        n("Reshape", ["o5", "q_shape"], ["o4"]),
        n("CastLike", ["o4", "query"], list(contract.OUTPUT_NAMES)),
    ]
    return helper.make_function(
        contract.DOMAIN,
        contract.OP_TYPE,
        list(contract.INPUT_NAMES),
        list(contract.OUTPUT_NAMES),
        nodes,
        [helper.make_opsetid("", opset)],
        attributes=list(attribute_names),
    )


def attach(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add the local function (once) to a model with `ProxyAttention` nodes, and the `proxy` opset import.

    The function declares the union of the attributes the nodes carry and uses the model's default opset.
    """
    nodes = [nd for nd in model.graph.node if nd.op_type == contract.OP_TYPE and nd.domain == contract.DOMAIN]
    if not nodes:
        raise ValueError(f"model has no {contract.DOMAIN}::{contract.OP_TYPE} node to attach the local function to")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        raise ValueError("model has no default-domain opset import")
    names: list[str] = []
    for nd in nodes:
        for a in nd.attribute:
            if a.name not in names:
                names.append(a.name)
    kept = [f for f in model.functions if not (f.domain == contract.DOMAIN and f.name == contract.OP_TYPE)]
    del model.functions[:]
    model.functions.extend(kept)
    model.functions.append(make_function(names, opset))
    if not any(o.domain == contract.DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(contract.DOMAIN, contract.DOMAIN_VERSION))
    return model
