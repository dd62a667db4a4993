"""applec's graph IR: `Graph`, `Node` and `Value`.

Invariants (checked by `Graph.validate`):
- Every `Value` has a static `shape` (tuple of ints) and a numpy `dtype` once import is done.
- A value is produced by at most one node (`producer`); graph inputs and constants have none.
- A constant value carries its data in `const` and has no producer.
- A node adds itself to the `users` of each of its inputs when it is created, and removes
  itself when it is removed; `users` may list a node twice if it reads the value twice.
- `Graph.nodes` is in topological order.
- Ops are in the canonical (newest-opset) form of the op table: the importer rewrites older
  forms, so passes and lowerings never look at the opset.
- Subgraphs (If's `then_branch` / `else_branch` attributes) are `Graph`s of their own: they
  read outer values only through their `inputs`, which the owning node binds by position
  to its own inputs (If: `inputs[1:]` = then's inputs, then else's). So use-lists never
  cross a graph boundary, and a subgraph validates on its own.

ONNX protobuf stays out of this module: only `applec.onnx_import` touches `onnx.*`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .errors import ModelError

Shape = tuple[int, ...]


class Value:
    """A tensor: graph input, constant, or the output of one node."""

    __slots__ = ("name", "dtype", "shape", "producer", "users", "const", "meta")

    def __init__(self, name: str, dtype=None, shape: Shape | None = None, const=None):
        self.name = name
        self.dtype = np.dtype(dtype) if dtype is not None else None
        self.shape = tuple(int(d) for d in shape) if shape is not None else None
        self.producer: Node | None = None
        self.users: list[Node] = []
        self.const: np.ndarray | None = None
        self.meta: dict[str, Any] = {}
        if const is not None:
            self.set_const(const)

    def set_const(self, array) -> None:
        array = np.asarray(array)
        self.const = array
        self.dtype = array.dtype
        self.shape = tuple(array.shape)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    @property
    def size(self) -> int:
        return int(np.prod(self.shape)) if self.shape is not None else -1

    def __repr__(self) -> str:
        kind = "const " if self.is_const else ""
        return f"%{self.name}: {kind}{self.dtype}{list(self.shape or [])}"


class Node:
    """One op application. `inputs` may contain None for an omitted optional input."""

    __slots__ = ("op_type", "name", "inputs", "outputs", "attrs", "meta")

    def __init__(self, op_type: str, name: str, inputs: Sequence[Value | None],
                 outputs: Sequence[Value], attrs: dict[str, Any] | None = None):
        self.op_type = op_type
        self.name = name
        self.inputs: list[Value | None] = list(inputs)
        self.outputs: list[Value] = list(outputs)
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.meta: dict[str, Any] = {}
        for value in self.inputs:
            if value is not None:
                value.users.append(self)
        for value in self.outputs:
            if value.producer is not None:
                raise ModelError(f"value '{value.name}' is produced by both "
                                 f"'{value.producer.name}' and '{name}'")
            value.producer = self

    def input(self, i: int) -> Value | None:
        return self.inputs[i] if i < len(self.inputs) else None

    def set_input(self, i: int, value: Value | None) -> None:
        old = self.inputs[i]
        if old is not None:
            old.users.remove(self)
        self.inputs[i] = value
        if value is not None:
            value.users.append(self)

    def detach(self) -> None:
        """Drop this node's uses and productions (called by Graph.remove_node)."""
        for value in self.inputs:
            if value is not None:
                value.users.remove(self)
        for value in self.outputs:
            value.producer = None

    def __repr__(self) -> str:
        ins = ", ".join(v.name if v is not None else "_" for v in self.inputs)
        outs = ", ".join(v.name for v in self.outputs)
        return f"{outs} = {self.op_type}({ins}) [{self.name}]"


class Graph:
    """A static-shape dataflow graph with named inputs and outputs."""

    __slots__ = ("name", "inputs", "outputs", "nodes", "meta", "_names")

    def __init__(self, name: str = "main"):
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        self.meta: dict[str, Any] = {}
        self._names: set[str] = set()

    # -- naming -------------------------------------------------------------------------
    def fresh_name(self, base: str) -> str:
        """A value or node name not used yet in this graph, derived from `base`."""
        return unique_name(base, self._names)

    def reserve_name(self, name: str) -> None:
        self._names.add(name)

    # -- building -----------------------------------------------------------------------
    def add_input(self, name: str, dtype, shape: Shape) -> Value:
        self.reserve_name(name)
        value = Value(name, dtype, shape)
        self.inputs.append(value)
        return value

    def const(self, array, name: str = "const") -> Value:
        return Value(self.fresh_name(name), const=np.asarray(array))

    def add_node(self, op_type: str, inputs: Sequence[Value | None],
                 attrs: dict[str, Any] | None = None, *, name: str | None = None,
                 outputs: Sequence[Value] | int = 1, index: int | None = None) -> Node:
        """Create a node; `outputs` is a count (fresh values, shapes unset) or values."""
        node_name = self.fresh_name(name or op_type.lower())
        if isinstance(outputs, int):
            outputs = [Value(self.fresh_name(f"{node_name}_out{i}" if i else node_name))
                       for i in range(outputs)]
        node = Node(op_type, node_name, inputs, outputs, attrs)
        if index is None:
            self.nodes.append(node)
        else:
            self.nodes.insert(index, node)
        return node

    def remove_node(self, node: Node) -> None:
        node.detach()
        self.nodes.remove(node)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every reader of `old` (nodes and graph outputs) read `new` instead."""
        for user in list(old.users):
            for i, value in enumerate(user.inputs):
                if value is old:
                    user.set_input(i, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    # -- queries ------------------------------------------------------------------------
    def values(self) -> Iterable[Value]:
        """Every value reachable: inputs, node inputs (incl. constants), node outputs."""
        seen: set[int] = set()
        for value in self.inputs:
            seen.add(id(value))
            yield value
        for node in self.nodes:
            for value in list(node.inputs) + list(node.outputs):
                if value is not None and id(value) not in seen:
                    seen.add(id(value))
                    yield value

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.nodes:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return counts

    def toposort(self) -> None:
        """Reorder `nodes` topologically, keeping the current order where it is valid."""
        ready = {id(v) for v in self.inputs}
        pending, ordered = list(self.nodes), []
        while pending:
            progressed = False
            rest = []
            for node in pending:
                if all(v is None or v.is_const or id(v) in ready for v in node.inputs):
                    ordered.append(node)
                    ready.update(id(v) for v in node.outputs)
                    progressed = True
                else:
                    rest.append(node)
            if not progressed:
                raise ModelError(f"graph has a cycle through node '{rest[0].name}'")
            pending = rest
        self.nodes = ordered

    def validate(self) -> None:
        """Check the invariants in the module docstring; raise ModelError naming the fault."""
        available = {id(v) for v in self.inputs}
        node_ids = {id(n) for n in self.nodes}
        for node in self.nodes:
            for value in node.inputs:
                if value is None:
                    continue
                if not (value.is_const or id(value) in available):
                    raise ModelError(f"node '{node.name}' ({node.op_type}) reads '{value.name}' "
                                     "before it is produced")
                if node not in value.users:
                    raise ModelError(f"'{value.name}' does not list its user '{node.name}'")
            for value in node.outputs:
                if value.producer is not node:
                    raise ModelError(f"'{value.name}' does not name '{node.name}' as producer")
                available.add(id(value))
        for value in self.values():
            if value.shape is None or value.dtype is None:
                raise ModelError(f"value '{value.name}' has no static shape/dtype")
            for user in value.users:
                if id(user) not in node_ids:
                    raise ModelError(f"'{value.name}' lists user '{user.name}' "
                                     "that is not in the graph")
        for value in self.outputs:
            if not (value.is_const or id(value) in available):
                raise ModelError(f"graph output '{value.name}' is never produced")
        for node in self.nodes:
            for sub in node.attrs.values():
                if isinstance(sub, Graph):
                    sub.validate()

    def __repr__(self) -> str:
        lines = [f"graph {self.name}({', '.join(map(repr, self.inputs))}) {{"]
        lines += [f"  {node!r}" for node in self.nodes]
        lines.append(f"}} -> ({', '.join(v.name for v in self.outputs)})")
        return "\n".join(lines)


def unique_name(base: str, taken: set[str]) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first not in `taken`, which then holds it."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name
