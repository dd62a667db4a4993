"""Declarative fusions: a pattern, a check that returns the reason it refused, a rewrite.

A pattern is a tree matched backwards from one value (the root's output):
- `Op("Mul", a, b, name="m")` matches a node of that type whose inputs match `a`, `b` (Add
  and Mul also try their operands swapped) and binds the node to "m";
- `Var("x")` matches any value and binds it; a second `Var("x")` must be the same value
  (by identity), so `Op("Mul", Var("x"), Op("Sigmoid", Var("x")))` is x * sigmoid(x);
- `Const("c")` is a `Var` that only matches constants;
- `Either(a, b, ...)` tries alternatives in order (put the largest first).
A named `Op` used twice must bind the same node both times (a shared subexpression).

`apply(graph, fusion)` walks the nodes last-to-first, so the largest pattern ending at a
node is tried before the smaller ones inside it. For each match it runs the generic check
(every matched node but the root is read only inside the match and is not a graph output),
then the fusion's `check`; the first match both accept is rewritten. A refusal is kept in
`graph.meta["fusion_refusals"]` (by pass and ONNX node) and in the root's report entry (`not_fused`), so a user can
see why a near-miss did not fuse.

The rewrite returns the fused node as `(op_type, inputs, attrs)`; `apply` removes the
matched nodes, inserts the fused node where the root was (it produces the root's output
value, so graph output names survive), infers its shape and checks it against the old one.
The fused node reports under the anchor's ONNX node; the other absorbed ONNX nodes get
status "fused" with the fused node's name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from applec import ops
from applec.errors import ModelError
from applec.ir import Graph, Node, Value

COMMUTATIVE = {"Add", "Mul"}
CONST_RTOL = 1e-3  # exporters write 0.7071, 1.4142, 0.044715 with few digits


# -- patterns ------------------------------------------------------------------------------
class Pattern:
    """Base of the pattern nodes."""


class Var(Pattern):
    def __init__(self, name: str):
        self.name = name


class Const(Var):
    pass


class Op(Pattern):
    def __init__(self, op_type: str, *inputs: Pattern, name: str | None = None):
        self.op_type = op_type
        self.inputs = inputs
        self.name = name or f"_{op_type}_{id(self)}"


class Either(Pattern):
    def __init__(self, *alternatives: Pattern):
        self.alternatives = alternatives


def product(a: Pattern, b: Pattern, c: Pattern, name: str = "product") -> Pattern:
    """a * b * c in any association and order: (a*b)*c, (a*c)*b, a*(b*c)."""
    return Either(Op("Mul", Op("Mul", a, b), c, name=name),
                  Op("Mul", Op("Mul", a, c), b, name=name),
                  Op("Mul", a, Op("Mul", b, c), name=name))


def root_types(pattern: Pattern) -> set[str]:
    if isinstance(pattern, Op):
        return {pattern.op_type}
    if isinstance(pattern, Either):
        return set().union(*(root_types(p) for p in pattern.alternatives))
    return set()


# -- matching ------------------------------------------------------------------------------
class Match:
    """What one pattern match bound: values and nodes by name, and the matched nodes."""

    def __init__(self, root: Node, bindings: dict[str, Any]):
        self.root = root
        self.bindings = bindings
        nodes = {id(v): v for v in bindings.values() if isinstance(v, Node)}
        self.nodes = list(nodes.values())  # a node may fill two places (MatMul(s, s))

    def __getitem__(self, name: str):
        return self.bindings[name]

    def get(self, name: str):
        return self.bindings.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.bindings


def _inputs(node: Node) -> list[Value | None]:
    inputs = list(node.inputs)
    while inputs and inputs[-1] is None:
        inputs.pop()
    return inputs


def _match(p: Pattern, value: Value | None, b: dict) -> Iterator[dict]:
    if value is None:
        return
    if isinstance(p, Var):
        if isinstance(p, Const) and not value.is_const:
            return
        if p.name in b:
            if b[p.name] is value:
                yield b
        else:
            yield {**b, p.name: value}
    elif isinstance(p, Either):
        for alternative in p.alternatives:
            yield from _match(alternative, value, b)
    elif isinstance(p, Op):
        node = value.producer
        if node is None or node.op_type != p.op_type or node.outputs[0] is not value:
            return
        if p.name in b:
            if b[p.name] is node:
                yield b
            return
        inputs = _inputs(node)
        if len(inputs) != len(p.inputs):
            return
        orders = [inputs]
        if p.op_type in COMMUTATIVE and len(inputs) == 2:
            orders.append(inputs[::-1])
        for order in orders:
            yield from _match_all(p.inputs, order, {**b, p.name: node})


def _match_all(patterns, values, b: dict) -> Iterator[dict]:
    if not patterns:
        yield b
        return
    for bound in _match(patterns[0], values[0], b):
        yield from _match_all(patterns[1:], values[1:], bound)


def matches(pattern: Pattern, node: Node) -> Iterator[Match]:
    for bindings in _match(pattern, node.outputs[0], {}):
        yield Match(node, bindings)


# -- constants -----------------------------------------------------------------------------
def scalar(value: Value | None) -> float | None:
    """The number a one-element constant holds, else None."""
    if value is None or not value.is_const or value.size != 1:
        return None
    return float(value.const.reshape(-1)[0])


def near(value: Value | None, target: float, rtol: float = CONST_RTOL) -> bool:
    number = scalar(value)
    return number is not None and math.isclose(number, target, rel_tol=rtol, abs_tol=1e-9)


def describe(value: Value | None) -> str:
    """A constant for a refusal message: '0.8', 'a [4] tensor', 'not a constant'."""
    if value is None:
        return "absent"
    if not value.is_const:
        return f"'{value.name}' (not a constant)"
    number = scalar(value)
    return f"{number:g}" if number is not None else f"a {list(value.shape)} tensor"


def expect(value: Value | None, target: float, what: str, target_text: str) -> str | None:
    """A refusal if `value` is not the scalar constant `target` (within CONST_RTOL)."""
    if near(value, target):
        return None
    return f"{what} is {describe(value)}, not {target_text}"


# -- fusions -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fusion:
    """name: the pass id; anchor: the bound node whose ONNX node the fused node reports as;
    check(match) -> refusal reason or None; rewrite(emitter, match) -> (op, inputs, attrs)."""

    name: str
    pattern: Pattern
    check: Callable[[Match], str | None]
    rewrite: Callable[[Emitter, Match], tuple[str, list, dict]]
    anchor: str


class Emitter:
    """Lets a rewrite add constants and helper nodes; helpers go just before the root."""

    def __init__(self, graph: Graph, match: Match, fusion: Fusion):
        self.graph = graph
        self.match = match
        self.source = match[fusion.anchor].meta.get("onnx_node")

    def const(self, array, name: str) -> Value:
        return self.graph.const(np.asarray(array), name)

    def node(self, op_type: str, inputs: list, attrs: dict | None = None) -> Value:
        root = self.match.root
        node = self.graph.add_node(op_type, inputs, attrs, name=f"{root.name}_{op_type.lower()}",
                                   index=self.graph.nodes.index(root))
        node.meta["onnx_node"] = self.source
        ops.infer_node(node)
        return node.outputs[0]


def internal_reads(match: Match, graph_outputs: set[int]) -> str | None:
    """The generic check: intermediate results must not be needed outside the match."""
    inside = {id(n) for n in match.nodes}
    for node in match.nodes:
        if node is match.root:
            continue
        for value in node.outputs:
            if id(value) in graph_outputs:
                return f"{node.op_type} '{node.name}' produces graph output '{value.name}'"
            for user in value.users:
                if id(user) not in inside:
                    return (f"{node.op_type} '{node.name}' output is also read by "
                            f"{user.op_type} '{user.name}'")
    return None


def apply(graph: Graph, fusion: Fusion) -> int:
    """Rewrite every match of `fusion` the checks accept; returns how many."""
    types = root_types(fusion.pattern)
    removed: set[int] = set()
    outputs = {id(v) for v in graph.outputs}
    count = 0
    for node in reversed(list(graph.nodes)):
        if id(node) in removed or node.op_type not in types:
            continue
        refusal = None
        for match in matches(fusion.pattern, node):
            reason = internal_reads(match, outputs) or fusion.check(match)
            if reason is None:
                _rewrite(graph, fusion, match)
                removed.update(id(n) for n in match.nodes)
                count += 1
                refusal = None
                break
            refusal = refusal or reason
        if refusal is not None:
            _refused(graph, fusion, node, refusal)
    return count


def _rewrite(graph: Graph, fusion: Fusion, match: Match) -> Node:
    emitter = Emitter(graph, match, fusion)
    op_type, inputs, attrs = fusion.rewrite(emitter, match)
    root = match.root
    out = root.outputs[0]
    shape, dtype = out.shape, out.dtype
    index = graph.nodes.index(root) - (len(match.nodes) - 1)  # matched nodes precede root
    for node in match.nodes:
        graph.remove_node(node)
    # the fused node takes the anchor's name (free again), so reports keep "conv1", "depthwise"
    fused = Node(op_type, match[fusion.anchor].name, inputs, [out], attrs)
    graph.nodes.insert(index, fused)
    fused.meta["onnx_node"] = emitter.source
    fused.meta["fused_by"] = fusion.name
    ops.infer_node(fused)
    if (out.shape, out.dtype) != (shape, dtype):
        raise ModelError(f"internal error: {fusion.name} made {op_type} '{fused.name}' with "
                         f"{out.dtype}{list(out.shape)}, replacing {dtype}{list(shape)}")
    _report_fused(graph, fusion, match, fused, emitter.source)
    return fused


def _report_fused(graph: Graph, fusion: Fusion, match: Match, fused: Node, source) -> None:
    """Absorbed ONNX nodes point at the one the fused node reports under (`source`)."""
    report = graph.meta.get("report", {})
    refusals = graph.meta.get("fusion_refusals", {})
    reason = f"part of {fused.op_type} '{source}' ({fusion.name})"
    absorbed = set()
    for node in match.nodes:
        origin = node.meta.get("onnx_node")
        refusals.pop((fusion.name, origin or node.name), None)
        entry = report.get(origin)
        if entry is None:
            continue
        entry.pop("not_fused", None)
        if origin != source and entry.get("status") in ("imported", "fused"):
            entry.update(status="fused", fused_into=source, reason=reason)
            absorbed.add(origin)
    if any(n.meta.get("fused_by") for n in match.nodes):  # an earlier fusion fused again
        for entry in report.values():
            if entry.get("fused_into") in absorbed:
                entry.update(fused_into=source, reason=reason)


def _refused(graph: Graph, fusion: Fusion, node: Node, reason: str) -> None:
    origin = node.meta.get("onnx_node") or node.name
    graph.meta.setdefault("fusion_refusals", {})[(fusion.name, origin)] = reason
    entry = graph.meta.get("report", {}).get(origin)
    if entry is not None:
        entry.setdefault("not_fused", {})[fusion.name] = reason


def refusals(graph: Graph, fusion_name: str | None = None) -> dict[str, str]:
    """Refusal reasons by the root's ONNX node name (for one pass, or all)."""
    return {node: reason for (name, node), reason in graph.meta.get("fusion_refusals", {}).items()
            if fusion_name in (None, name)}
