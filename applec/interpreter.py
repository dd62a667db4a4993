"""One interpreter over the IR, built from the op table's numpy references.

It is the oracle for pass tests (run a graph before and after a pass, compare) and the
engine of constant folding (`try_fold`).
"""

from __future__ import annotations

import numpy as np

from . import ops
from .errors import InputError
from .ir import Graph, Node

# Ops whose outputs depend only on their input's static shape, not its data.
SHAPE_ONLY_OPS = {"Shape": lambda x, node: _shape_op(x, node),
                  "Size": lambda x, node: np.asarray(int(np.prod(x.shape)), np.int64)}

# Folding never creates a constant bigger than this many elements unless its inputs were
# at least as large (a transpose of a weight is fine, a 1 GB ConstantOfShape is not).
FOLD_MAX_NEW_ELEMENTS = 1 << 20


def _shape_op(value, node: Node) -> np.ndarray:
    shape = np.asarray(value.shape, np.int64)
    start = node.attrs.get("start", 0)
    end = node.attrs.get("end", None)
    return shape[start:end]


def run(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate `graph` on `feeds` (by input name); returns outputs by name."""
    for value in graph.inputs:
        if value.name not in feeds:
            raise InputError(f"missing input '{value.name}'")
    results = run_values(graph, [feeds[v.name] for v in graph.inputs])
    return {v.name: out for v, out in zip(graph.outputs, results)}


def run_values(graph: Graph, arrays) -> list[np.ndarray]:
    """Evaluate `graph` on one array per input, by position (how a subgraph is called);
    returns one array per output."""
    env: dict[int, np.ndarray] = {id(v): np.asarray(a) for v, a in zip(graph.inputs, arrays)}
    for node in graph.nodes:
        args = [None if v is None else (v.const if v.is_const else env[id(v)])
                for v in node.inputs]
        for value, out in zip(node.outputs, ops.evaluate(node, args)):
            env[id(value)] = out
    return [v.const if v.is_const else env[id(v)] for v in graph.outputs]


def try_fold(graph: Graph, node: Node) -> bool:
    """Replace `node` by constants if its outputs are computable now; True if it did."""
    if node.op_type in SHAPE_ONLY_OPS:
        x = node.inputs[0]
        if x.shape is None:
            return False
        results = [SHAPE_ONLY_OPS[node.op_type](x, node)]
    elif ops.get(node.op_type, node).foldable and \
            all(v is None or v.is_const for v in node.inputs):
        ops.infer_node(node)
        new = sum(v.size for v in node.outputs)
        old = sum(v.size for v in node.inputs if v is not None)
        if new > max(old, FOLD_MAX_NEW_ELEMENTS):
            return False
        results = ops.evaluate(node, [v.const if v is not None else None for v in node.inputs])
    else:
        return False
    graph.remove_node(node)
    for value, array in zip(node.outputs, results):
        value.set_const(np.asarray(array, dtype=value.dtype or np.asarray(array).dtype))
    source = node.meta.get("onnx_node")
    report = graph.meta.get("report", {})
    if source in report and report[source].get("status") == "imported":
        report[source].update(status="folded", reason="all inputs are constant at compile "
                                                      "time; computed by applec")
    return True
