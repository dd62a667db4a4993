"""merge_transpose_axes: bring a rank-6+ Transpose between reshapes down to rank <= 5.

CoreML tensors have rank <= 5, yet exporters write PixelUnshuffle, space-to-depth and
window partitions as Reshape to rank 6 -> Transpose -> Reshape back. Input axes that stay
next to each other, in order, through the permutation move as one block, and size-1 axes
go anywhere, so the Transpose can work on the merged axes instead:

    before: t = Reshape(x, [1, 3, 4, 2, 4, 2]); u = Transpose(t, perm=[0, 1, 3, 5, 2, 4])
            y = Reshape(u, [1, 12, 4, 4])
    after:  t = Reshape(x, [3, 4, 2, 4, 2]);    u = Transpose(t, perm=[0, 2, 4, 1, 3])
            y = Reshape(u, [1, 12, 4, 4])

Rules: the Transpose's input must come from a Reshape, Flatten, Squeeze or Unsqueeze read
by nothing else, or from a Gather whose indices have rank >= 2 (F.unfold's im2col gathers
with [kernel, blocks] indices): it gathers the flattened indices instead, which keeps the
data's rank, and the Reshape to the merged shape follows it. Every reader of the
Transpose's output must be a Reshape, Flatten, Squeeze or Unsqueeze (a graph output keeps
its rank); the merged rank must be <= 5. Element order is unchanged, so the readers
become Reshapes to their own output shapes. Refused cases are left alone, and the
lowering names the rank-6 tensor.
"""

from __future__ import annotations

import math

import numpy as np

from applec import ops
from applec.ir import Graph, Node

MAX_RANK = 5  # the rank CoreML tensors stop at; higher ranks are refused at lowering
VIEWS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze")


def merged(shape: tuple[int, ...], perm: list[int]) -> tuple[list[int], list[int]]:
    """(merged input shape, merged perm): runs of input axes the permutation keeps adjacent
    and in order become one axis; size-1 axes are dropped."""
    kept = [a for a in range(len(shape)) if shape[a] != 1]
    position = {a: i for i, a in enumerate(kept)}
    runs: list[list[int]] = []  # in output order
    for a in (a for a in perm if shape[a] != 1):
        if runs and position[a] == position[runs[-1][-1]] + 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    by_input = sorted(runs, key=lambda run: run[0])
    return ([math.prod(shape[a] for a in run) for run in by_input],
            [by_input.index(run) for run in runs])


def _plan(graph: Graph, node: Node):
    x, y = node.inputs[0], node.outputs[0]
    outputs = {id(v) for v in graph.outputs}
    producer = x.producer
    if len(x.shape) <= MAX_RANK or producer is None or len(x.users) != 1 or id(x) in outputs:
        return None
    if producer.op_type not in VIEWS and not (
            producer.op_type == "Gather" and len(producer.inputs[1].shape) >= 2 and
            len(producer.inputs[0].shape) <= MAX_RANK):
        return None
    if id(y) in outputs or not y.users or any(
            u.op_type not in VIEWS or u.inputs[0] is not y or len(u.outputs[0].shape) > MAX_RANK
            for u in y.users):
        return None
    perm = list(node.attrs.get("perm", range(len(x.shape) - 1, -1, -1)))
    shape, new_perm = merged(x.shape, [p % len(x.shape) for p in perm])
    if not 1 <= len(shape) <= MAX_RANK:
        return None
    return producer, shape, new_perm


def _shape_const(graph: Graph, shape):
    return graph.const(np.array(shape, np.int64), "merged_shape")


def _add(graph: Graph, op_type: str, inputs, attrs, index: int, name: str, origin) -> Node:
    node = graph.add_node(op_type, inputs, attrs, name=name, index=index)
    node.meta["onnx_node"] = origin
    ops.infer_node(node)
    return node


def _source(graph: Graph, producer: Node, index: int):
    """What the merged Reshape reads: a view's input, or the Gather of flattened indices
    (same elements in the same order, data's rank)."""
    if producer.op_type in VIEWS:
        return producer.inputs[0]
    data, indices = producer.inputs[0], producer.inputs[1]
    origin = producer.meta.get("onnx_node")
    if indices.is_const:
        flat = graph.const(indices.const.reshape(-1), "flat_indices")
    else:
        flat = _add(graph, "Reshape", [indices, _shape_const(graph, [-1])], {}, index,
                    f"{producer.name}_flat_indices", origin).outputs[0]
        index += 1
    return _add(graph, "Gather", [data, flat], dict(producer.attrs), index,
                f"{producer.name}_flat", origin).outputs[0]


def run(graph: Graph) -> int:
    count = 0
    for node in list(graph.nodes):
        if node.op_type != "Transpose":
            continue
        plan = _plan(graph, node)
        if plan is None:
            continue
        producer, shape, perm = plan
        source = _source(graph, producer, graph.nodes.index(node))
        before = _add(graph, "Reshape", [source, _shape_const(graph, shape)], {},
                      graph.nodes.index(node), f"{node.name}_merge",
                      producer.meta.get("onnx_node"))
        node.set_input(0, before.outputs[0])
        node.attrs["perm"] = perm
        node.outputs[0].shape = tuple(shape[p] for p in perm)
        # the old producer is dead code now; each reader becomes a Reshape of its own name
        for user in list(dict.fromkeys(node.outputs[0].users)):
            index, out = graph.nodes.index(user), user.outputs[0]
            graph.remove_node(user)
            reshape = Node("Reshape", user.name, [node.outputs[0],
                                                  _shape_const(graph, out.shape)], [out])
            reshape.meta["onnx_node"] = user.meta.get("onnx_node")
            graph.nodes.insert(index, reshape)
        count += 1
    return count
