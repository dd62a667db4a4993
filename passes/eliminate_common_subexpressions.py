"""eliminate_common_subexpressions: compute each distinct thing once.

Rules:
- constants with the same dtype, shape and bytes are one constant (found by a hash of the
  data, confirmed byte for byte);
- nodes with the same op type, the same inputs (by identity, after the constant merge)
  and equal attributes are one node: readers of the later one read the earlier one;
- a node producing a graph output is never the one removed, so output names stay; ops
  whose result is random are never merged.

    before: a = Exp(x); b = Exp(x); y = Add(a, b)
    after:  a = Exp(x); y = Add(a, a)
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph, Node, Value

RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
              "Multinomial", "Bernoulli"}


def run(graph: Graph) -> int:
    return _merge_constants(graph) + _merge_nodes(graph)


def _merge_constants(graph: Graph) -> int:
    outputs = {id(v) for v in graph.outputs}
    first: dict[tuple, list[Value]] = {}
    merged = 0
    for node in graph.nodes:
        for i, value in enumerate(node.inputs):
            if value is None or not value.is_const:
                continue
            # cheap key first (weights of one shape are common; their bytes rarely are)
            same = first.setdefault(_key(value.const), [])
            keep = next((c for c in same if c is value or _same_bytes(c.const, value.const)),
                        None)
            if keep is None:
                same.append(value)
            elif keep is not value and id(value) not in outputs:
                node.set_input(i, keep)
                merged += 1 if not value.users else 0  # count each constant once, when gone
    return merged


SAMPLE = 64  # elements compared before the whole tensor


def _key(data: np.ndarray) -> tuple:
    flat = data.reshape(-1)
    step = max(flat.size // SAMPLE, 1)
    return data.dtype.str, data.shape, flat[::step][:SAMPLE].tobytes()


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    # bytes, not values: -0.0 and 0.0 must stay apart (1/x tells them apart)
    return a.dtype == b.dtype and a.shape == b.shape and \
        np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _merge_nodes(graph: Graph) -> int:
    outputs = {id(v) for v in graph.outputs}
    seen: dict[tuple, Node] = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op_type in RANDOM_OPS:
            continue
        key = (node.op_type, tuple(id(v) if v is not None else None for v in node.inputs),
               _frozen(node.attrs), len(node.outputs))
        earlier = seen.setdefault(key, node)
        if earlier is node or any(id(v) in outputs for v in node.outputs):
            continue
        for old, new in zip(node.outputs, earlier.outputs):
            graph.replace_all_uses(old, new)
        graph.remove_node(node)
        merged += 1
        entry = graph.meta.get("report", {}).get(node.meta.get("onnx_node"))
        if (entry is not None and entry.get("status") == "imported"
                and node.meta.get("onnx_node") != earlier.meta.get("onnx_node")):
            entry.update(status="eliminated",
                         reason=f"computes the same as '{earlier.name}'")
    return merged


def _frozen(value):
    """A hashable, equality-preserving form of an attribute value."""
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, np.dtype):
        return ("dtype", value.str)
    if isinstance(value, np.generic):
        return value.item()
    return value
