"""eliminate_identity: remove ops that return their input unchanged.

Rules (each checked on static shapes/dtypes or constant data):
- Identity, and Dropout in inference (one output read);
- Cast to the input's own dtype; Reshape/Expand/Flatten/Squeeze/Unsqueeze to the same shape;
- Transpose with the identity permutation;
- Mul/Div by a constant 1 and Add/Sub of a constant 0 when broadcasting does not change the
  shape or dtype of the other operand.
A graph output is never removed: its producer may change but its name stays (the reader
of the bundle asks for it by name), so no-ops that produce graph outputs are kept.

    before: y = Identity(x); z = Relu(y)
    after:  z = Relu(x)
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph, Node, Value

SAME_SHAPE_OPS = {"Reshape", "Expand", "Flatten", "Squeeze", "Unsqueeze"}


def _passthrough(node: Node) -> Value | None:
    """The input `node` forwards unchanged, or None."""
    x = node.inputs[0] if node.inputs else None
    out = node.outputs[0]
    if x is None or x.shape != out.shape or x.dtype != out.dtype:
        return None
    op = node.op_type
    if op == "Identity" or op == "Cast" or op in SAME_SHAPE_OPS:
        return x
    if op == "Dropout":
        return x if all(not v.users for v in node.outputs[1:]) else None
    if op == "Transpose":
        perm = node.attrs.get("perm", list(range(len(x.shape)))[::-1])
        return x if list(perm) == list(range(len(x.shape))) else None
    if op in ("Mul", "Div", "Add", "Sub"):
        neutral = 1 if op in ("Mul", "Div") else 0
        other = node.inputs[1]
        if other.is_const and np.all(other.const == neutral):
            return x
        if op in ("Mul", "Add") and x.is_const and np.all(x.const == neutral):
            y = node.inputs[1]
            return y if y.shape == out.shape and y.dtype == out.dtype else None
    return None


def run(graph: Graph) -> int:
    outputs = {id(v) for v in graph.outputs}
    removed = 0
    for node in list(graph.nodes):
        source = _passthrough(node)
        if source is None or any(id(v) in outputs for v in node.outputs):
            continue
        graph.replace_all_uses(node.outputs[0], source)
        graph.remove_node(node)
        removed += 1
        entry = graph.meta.get("report", {}).get(node.meta.get("onnx_node"))
        if entry is not None and entry.get("status") == "imported":
            entry.update(status="eliminated", reason=f"{node.op_type} is a no-op here")
    return removed
