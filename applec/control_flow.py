"""Control flow while the importer propagates shapes (`onnx_import.propagate`).

`propagate_if` decides: a constant condition inlines, a run-time one propagates both
branches. The IR rewrites it uses:

- `inline_branch`: a compile-time condition; the taken branch's nodes replace the If:

      before: y = If(c=true, x)  then: { t = Relu(x_in) -> t }  else: {...}
      after:  y = Relu(x)

  The branch's inputs are replaced by the outer values they stand for, its nodes keep
  their names unless the outer graph has them already, and the If's output values
  (possibly graph outputs, whose names must stay) become the outputs of the branch nodes.
- `bind_branches`: a run-time condition; each branch input takes the shape and dtype of
  the outer value it stands for, and constant outer values become branch constants, so
  propagation can fold inside the branch.
- `drop_unused_captures`, `prune`: what folding leaves unused in and around a branch.
- `poison_branch`: a stand-in for a branch that cannot run on the given shapes.

`propagate_loop` and `propagate_scan` unroll: a static-shape program has no loop whose
trip count or output shapes are data, so the body is copied into the graph once per
iteration, each copy propagated (folded) before the next, which is how a loop condition
computed in the body becomes known:

      before: v, s = Loop(M=2, cond=true, v0)  body(i, c, v_in) { v_out = Add(v_in, i) ... }
      after:  v_0 = Add(v0, 0); v_1 = Add(v_0, 1); v = Identity(v_1)
              s = Concat(Unsqueeze(s_0), Unsqueeze(s_1))      (scan outputs, on axis 0)

A trip count or condition known only at run time, or more than MAX_ITERATIONS iterations
or MAX_UNROLLED_NODES copied nodes in one graph, is an UnsupportedOpError naming the node.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError, UnsupportedOpError
from .ir import Graph, Node, Value
from .ops import OPS, normalize_axis
from .ops.control import branch_inputs, condition_value, loop_layout, scan_layout

BRANCHES = ("then_branch", "else_branch")


def propagate_if(graph: Graph, node: Node, propagate) -> list[Node] | None:
    """Inline the taken branch of a constant condition (returns the new nodes), or
    propagate both branches of a run-time one with `propagate` (returns None).

    A run-time branch that cannot take these input shapes (a ShapeError: onnxruntime fails
    there too, e.g. silero-vad's 8 kHz branch fed a 16 kHz frame) cannot fail at run time
    in CoreML; it is compiled to return NaN (zeros for integers) and the report says so.
    """
    cond = node.inputs[0]
    if cond.is_const:
        taken = condition_value(OPS["If"], node, cond.const)
        return inline_branch(graph, node, "then_branch" if taken else "else_branch")
    bind_branches(node)
    report = graph.meta.setdefault("report", {})
    source = node.meta.get("onnx_node", node.name)
    failed: dict[str, ShapeError] = {}
    for key in BRANCHES:
        branch = node.attrs[key]
        try:
            propagate(branch)
        except ShapeError as exc:
            failed[key] = exc
            continue
        prune(branch)
        merge_branch_report(report, branch, f"inside the {key} of If '{source}' (a MIL "
                                             "cond block)")
        graph.meta.setdefault("notes", []).extend(branch.meta.get("notes", []))
    if len(failed) == 2:
        raise failed["then_branch"]
    for key, exc in failed.items():
        other = node.attrs["else_branch" if key == "then_branch" else "then_branch"]
        merge_branch_report(report, node.attrs[key], f"the {key} of If '{source}' cannot "
                                                      "run with these input shapes: it "
                                                      "returns NaN", status="eliminated")
        node.attrs[key] = poison_branch(other, f"{node.name}/{key}")
        graph.meta.setdefault("notes", []).append(
            f"If '{source}': its {key} cannot run with these input shapes ({exc}); "
            "onnxruntime fails there as well, CoreML cannot fail at run time, so that "
            "branch returns NaN (0 for integers)")
        entry = report.get(source)
        if entry is not None:
            entry.setdefault("notes", []).append(f"{key} returns NaN: it cannot run with "
                                                 "these input shapes")
    drop_unused_captures(node)
    return None


def merge_branch_report(report: dict, branch: Graph, why: str,
                         status: str = "in_branch") -> None:
    for name, entry in branch.meta.get("report", {}).items():
        if entry.get("status") == "imported":
            entry = dict(entry, status=status, reason=why)
        report[name] = entry


def inline_branch(graph: Graph, node: Node, key: str) -> list[Node]:
    """Replace If `node` by the nodes of its branch `key`; returns the nodes added."""
    branch: Graph = node.attrs[key]
    captured = branch_inputs(node)[key]
    index = graph.nodes.index(node)
    graph.remove_node(node)
    for placeholder, outer in zip(branch.inputs, captured):
        branch.replace_all_uses(placeholder, outer)
    added = list(branch.nodes)
    for inner in added:
        inner.name = graph.fresh_name(inner.name)
        for value in inner.outputs:
            value.name = graph.fresh_name(value.name)
    inside = {id(n) for n in added}
    claimed: dict[int, Value] = {}
    for out, result in zip(node.outputs, branch.outputs):
        if id(result) not in claimed and result.producer is not None \
                and id(result.producer) in inside:
            _take_over(result, out)
            claimed[id(result)] = out
            continue
        source = claimed.get(id(result), result)  # an outer value, a constant, a repeat
        identity = Node("Identity", graph.fresh_name(f"{node.name}_{key}"), [source], [out])
        identity.meta["onnx_node"] = node.meta.get("onnx_node")
        added.append(identity)
    graph.nodes[index:index] = added
    report = graph.meta.setdefault("report", {})
    report.update(branch.meta.get("report", {}))
    entry = report.get(node.meta.get("onnx_node"))
    if entry is not None:
        taken = "true" if key == "then_branch" else "false"
        entry.update(status="folded", reason=f"the condition is {taken} at compile time: "
                                             f"{key} inlined ({len(branch.nodes)} nodes)")
    graph.meta.setdefault("notes", []).extend(branch.meta.get("notes", []))
    return added


def _take_over(result: Value, out: Value) -> None:
    """Make `result`'s producer produce `out` instead, and its readers read `out`."""
    producer = result.producer
    for user in list(result.users):
        for i, value in enumerate(user.inputs):
            if value is result:
                user.set_input(i, out)
    producer.outputs[producer.outputs.index(result)] = out
    out.producer, result.producer = producer, None


def bind_branches(node: Node) -> None:
    """Give each branch input its outer value's shape and dtype; constants move inside."""
    for key, captured in branch_inputs(node).items():
        branch: Graph = node.attrs[key]
        for placeholder, outer in zip(branch.inputs, captured):
            placeholder.dtype, placeholder.shape = outer.dtype, outer.shape
            if outer.is_const and (placeholder.users or placeholder in branch.outputs):
                branch.replace_all_uses(placeholder, Value(placeholder.name, const=outer.const))


def drop_unused_captures(node: Node) -> None:
    """Unbind the branch inputs nothing in their branch reads any more."""
    inputs = [node.inputs[0]]
    for key, captured in branch_inputs(node).items():
        branch: Graph = node.attrs[key]
        outputs = {id(v) for v in branch.outputs}
        kept = [(p, outer) for p, outer in zip(branch.inputs, captured)
                if p.users or id(p) in outputs]
        branch.inputs = [p for p, _ in kept]
        inputs += [outer for _, outer in kept]
    for value in node.inputs:
        if value is not None:
            value.users.remove(node)
    node.inputs = inputs
    for value in inputs:
        value.users.append(node)


def prune(graph: Graph) -> int:
    """Remove the nodes of `graph` that no output needs (a branch's dead code)."""
    from applec.passes import eliminate_dead_code  # passes build on this module's users

    return eliminate_dead_code.run(graph)


def poison_branch(like: Graph, name: str) -> Graph:
    """A branch with `like`'s output shapes and dtypes that fills them with NaN (floats),
    0 (integers) or False: what a branch that cannot run returns instead of failing."""
    branch = Graph(name)
    for i, value in enumerate(like.outputs):
        fill = np.asarray(np.nan if value.dtype.kind == "f" else 0, value.dtype).reshape(1)
        shape = branch.const(np.asarray(value.shape, np.int64), f"shape{i}")
        node = branch.add_node("ConstantOfShape", [shape], {"value": fill}, name=f"fill{i}")
        node.outputs[0].shape, node.outputs[0].dtype = value.shape, value.dtype
        branch.outputs.append(node.outputs[0])
    branch.meta["report"] = {}
    return branch


# -- Loop and Scan: unrolling --------------------------------------------------------------
# Beyond these, unrolling would make programs (and compile times) no one wants; a loop that
# long is refused rather than compiled for minutes.
MAX_ITERATIONS = 1024
MAX_UNROLLED_NODES = 16384


def propagate_loop(graph: Graph, node: Node, propagate) -> None:
    """Replace Loop `node` by one propagated copy of its body per iteration."""
    unroll = _Unroller(graph, node, propagate)
    trip, cond = node.inputs[0], node.inputs[1]
    if trip is not None and not trip.is_const:
        unroll.refuse("the trip count depends on run-time data")
    if cond is not None and not cond.is_const:
        unroll.refuse("the loop condition depends on run-time data")
    limit = None if trip is None else int(np.asarray(trip.const).reshape(-1)[0])
    running = True if cond is None else condition_value(OPS["Loop"], node, cond.const)
    carried_count, scan_count = loop_layout(node)
    body = node.attrs["body"]
    if running and _condition_stays_true(body):
        if limit is None:
            unroll.refuse("no trip count and a condition that stays true: it never ends")
        unroll.check_budget(limit, f"a trip count of {limit}")
    carried = node.inputs[2:2 + carried_count]
    captures = node.inputs[2 + carried_count:]
    steps, i = [], 0
    while running and (limit is None or i < limit):
        unroll.check_budget(i + 1, "its condition, still true,")
        outs = unroll.step(body, [unroll.const(np.asarray(i, np.int64)),
                                  unroll.const(np.asarray(True)), *carried, *captures], f"i{i}")
        if not outs[0].is_const:
            unroll.refuse(f"the loop condition depends on run-time data (computed in the "
                          f"body, iteration {i})")
        running = condition_value(OPS["Loop"], node, outs[0].const)
        carried = outs[1:1 + carried_count]
        steps.append(outs[1 + carried_count:])
        i += 1
    if scan_count and not steps:
        unroll.refuse("zero iterations leave its scan outputs with no elements, which "
                      "CoreML cannot hold")
    stacked = [unroll.stack([step[k] for step in steps], 0) for k in range(scan_count)]
    unroll.finish([*carried, *stacked], f"{i} iterations")


def propagate_scan(graph: Graph, node: Node, propagate) -> None:
    """Replace Scan `node` by one propagated copy of its body per scan step."""
    unroll = _Unroller(graph, node, propagate)
    state_count, scan_count, _ = scan_layout(node)
    if not node.attrs.get("batched"):
        outputs, length = _scan(unroll, node, node.inputs)
        unroll.finish(outputs, f"{length} steps")
        return
    per_batch = []
    for b in range(node.inputs[0].shape[0]):  # opset 8: the body sees one batch row
        index = unroll.const(np.asarray(b, np.int64))
        rows = [unroll.emit("Gather", [x, index], {"axis": 0})
                if i < state_count + scan_count else x for i, x in enumerate(node.inputs)]
        outputs, length = _scan(unroll, node, rows)
        per_batch.append(outputs)
    unroll.finish([unroll.stack(list(outs), 0) for outs in zip(*per_batch)],
                  f"{length} steps for each of {len(per_batch)} batch rows")


def _scan(unroll: _Unroller, node: Node, inputs: list[Value]) -> tuple[list[Value], int]:
    """Unroll one (unbatched) scan over `inputs`; its final states and stacked outputs."""
    scan_op = OPS["Scan"]
    state_count, scan_count, out_count = scan_layout(node)
    states = list(inputs[:state_count])
    scans = inputs[state_count:state_count + scan_count]
    captures = inputs[state_count + scan_count:]
    axes = [normalize_axis(node, a, len(x.shape))
            for a, x in zip(scan_op.int_list(node, "scan_input_axes", scan_count), scans)]
    directions = scan_op.int_list(node, "scan_input_directions", scan_count)
    lengths = {x.shape[a] for x, a in zip(scans, axes) if x.shape}
    if len(lengths) != 1:
        scan_op.fail(node, f"its scan inputs have lengths {sorted(lengths)}, not one")
    length = lengths.pop()
    if out_count and not length:
        unroll.refuse("a scan length of 0 leaves its scan outputs with no elements, which "
                      "CoreML cannot hold")
    unroll.check_budget(unroll.steps + length, f"a scan length of {length}")
    steps = []
    for t in range(length):
        slices = [unroll.emit("Gather", [x, unroll.const(np.asarray(
                      length - 1 - t if reverse else t, np.int64))], {"axis": a})
                  for x, a, reverse in zip(scans, axes, directions)]
        outs = unroll.step(node.attrs["body"], [*states, *slices, *captures], f"t{t}")
        states = outs[:state_count]
        steps.append(outs[state_count:])
    out_axes = scan_op.int_list(node, "scan_output_axes", out_count)
    out_directions = scan_op.int_list(node, "scan_output_directions", out_count)
    stacked = []
    for k in range(out_count):
        values = [step[k] for step in steps][::-1 if out_directions[k] else 1]
        axis = normalize_axis(node, out_axes[k], len(values[0].shape) + 1)
        stacked.append(unroll.stack(values, axis))
    return [*states, *stacked], length


def _condition_stays_true(body: Graph) -> bool:
    """Whether the body passes its condition input through unchanged (or returns true)."""
    out, cond_in = body.outputs[0], body.inputs[1]
    if out.is_const:
        return bool(np.asarray(out.const).reshape(-1)[0])
    producer = out.producer
    return out is cond_in or (producer is not None and producer.op_type == "Identity"
                              and producer.inputs[0] is cond_in)


class _Unroller:
    """Copies bodies into `graph` just before `anchor` (the Loop or Scan node), propagating
    each new node at once so that what the next copy needs is folded already; `finish`
    replaces the anchor by Identity nodes that produce its output values."""

    def __init__(self, graph: Graph, anchor: Node, propagate):
        self.graph, self.anchor, self.propagate = graph, anchor, propagate
        self.source = anchor.meta.get("onnx_node", anchor.name)
        self.where = f"{anchor.op_type} node '{self.source}'"
        self.body: Graph = anchor.attrs["body"]
        self.size = body_size(self.body)
        self.steps = 0
        report = graph.meta.setdefault("report", {})
        for name, entry in self.body.meta.get("report", {}).items():
            report.setdefault(name, entry)

    def refuse(self, why: str):
        raise UnsupportedOpError(f"{self.where}: {why}; applec unrolls loops at compile "
                                 "time")

    def check_budget(self, iterations: int, cause: str) -> None:
        """Refuse `iterations` copies of the body beyond the limits; `cause` says why
        there are that many ("a trip count of 5000")."""
        if iterations > MAX_ITERATIONS:
            self.refuse(f"{cause} asks for more than {MAX_ITERATIONS} iterations")
        # what the other loops of this graph (inner ones included) copied counts too
        others = self.graph.meta.get("unrolled_nodes", 0) - self.steps * self.size
        if others + iterations * self.size > MAX_UNROLLED_NODES:
            self.refuse(f"{cause} asks for {iterations} copies of a {self.size}-node body, "
                        f"beyond the budget of {MAX_UNROLLED_NODES} unrolled nodes per graph")

    def const(self, array) -> Value:
        return self.graph.const(array, f"{self.anchor.name}_k")

    def emit(self, op_type: str, inputs, attrs=None) -> Value:
        """Add one node before the anchor and propagate it; its output value."""
        name = self.graph.fresh_name(f"{self.anchor.name}/{op_type.lower()}")
        node = Node(op_type, name, inputs, [Value(self.graph.fresh_name(f"{name}_out"))],
                    attrs)
        node.meta["onnx_node"] = self.anchor.meta.get("onnx_node")
        self._insert([node])
        return node.outputs[0]

    def stack(self, values: list[Value], axis: int) -> Value:
        """Concat of the values, each given a new unit axis `axis`."""
        axes = self.const(np.asarray([axis], np.int64))
        return self.emit("Concat", [self.emit("Unsqueeze", [v, axes]) for v in values],
                         {"axis": axis})

    def step(self, body: Graph, bound: list[Value], tag: str) -> list[Value]:
        """Copy `body` with its inputs bound to `bound`; the values of its outputs."""
        mapping = {id(p): v for p, v in zip(body.inputs, bound)}
        added = copy_nodes(body.nodes, mapping,
                           lambda base: self.graph.fresh_name(f"{base}_{tag}"))
        for node in added:
            for value in node.outputs:
                value.meta.pop("onnx_shape", None)  # onnx infers one shape for all copies
        self.steps += 1
        self.graph.meta["unrolled_nodes"] = self.graph.meta.get("unrolled_nodes", 0) \
            + self.size
        self._insert(added)
        return [_copied(v, mapping, self.graph.fresh_name) for v in body.outputs]

    def finish(self, results: list[Value], what: str) -> None:
        """Replace the anchor by Identity nodes from `results` to its output values."""
        index = self.graph.nodes.index(self.anchor)
        self.graph.remove_node(self.anchor)
        identities = [Node("Identity", self.graph.fresh_name(f"{self.anchor.name}_out"),
                           [result], [out])
                      for result, out in zip(results, self.anchor.outputs)]
        for node in identities:
            node.meta["onnx_node"] = self.anchor.meta.get("onnx_node")
        self.graph.nodes[index:index] = identities
        self.propagate(self.graph, identities)
        report = self.graph.meta["report"]
        if not self.steps:
            for name in self.body.meta.get("report", {}):
                if report[name].get("status") == "imported":
                    report[name].update(status="eliminated", reason=f"{self.where} runs its "
                                                                    "body zero times")
        entry = report.get(self.source)
        if entry is not None:
            why = f"unrolled at compile time: {what} of a {self.size}-node body"
            entry.update(status="folded", reason=why)
            entry.setdefault("notes", []).append(why)  # kept when its Concats are lowered

    def _insert(self, nodes: list[Node]) -> None:
        index = self.graph.nodes.index(self.anchor)
        self.graph.nodes[index:index] = nodes
        self.propagate(self.graph, nodes)


def body_size(body: Graph) -> int:
    """The nodes of `body`, those of its subgraphs included."""
    return sum(1 + sum(body_size(a) for a in n.attrs.values() if isinstance(a, Graph))
               for n in body.nodes)


def copy_nodes(nodes: list[Node], mapping: dict[int, Value], fresh) -> list[Node]:
    """Copies of `nodes` reading `mapping[id(v)]` for each value `v` it maps (extended
    with every value copied); constants get new values sharing the data, subgraphs are
    copied whole. `fresh(base)` names the copies."""
    copies = []
    for node in nodes:
        inputs = [None if v is None else _copied(v, mapping, fresh) for v in node.inputs]
        outputs = []
        for value in node.outputs:
            copy = Value(fresh(value.name), value.dtype, value.shape)
            copy.meta.update(value.meta)
            mapping[id(value)] = copy
            outputs.append(copy)
        attrs = {k: copy_graph(v) if isinstance(v, Graph) else v for k, v in node.attrs.items()}
        copy = Node(node.op_type, fresh(node.name), inputs, outputs, attrs)
        copy.meta.update(node.meta)
        copies.append(copy)
    return copies


def _copied(value: Value, mapping: dict[int, Value], fresh) -> Value:
    found = mapping.get(id(value))
    if found is None:
        if not value.is_const:
            raise ShapeError(f"'{value.name}' is read in a body that neither defines nor "
                             "binds it")
        found = mapping[id(value)] = Value(fresh(value.name), const=value.const)
    return found


def copy_graph(graph: Graph) -> Graph:
    """A copy of `graph` (a subgraph inside a body being unrolled) that shares no value or
    node with it, so that propagating one copy leaves the others as they were."""
    copy = Graph(graph.name)
    mapping: dict[int, Value] = {}
    for value in graph.inputs:
        mapping[id(value)] = Value(value.name, value.dtype, value.shape)
        copy.inputs.append(mapping[id(value)])

    def keep(base: str) -> str:
        copy.reserve_name(base)
        return base

    for value in graph.inputs:
        keep(value.name)
    copy.nodes = copy_nodes(graph.nodes, mapping, keep)
    copy.outputs = [_copied(v, mapping, keep) for v in graph.outputs]
    copy.meta = {k: v for k, v in graph.meta.items() if k not in ("report", "notes")}
    copy.meta["report"] = {k: dict(e) for k, e in graph.meta.get("report", {}).items()}
    copy.meta["notes"] = list(graph.meta.get("notes", []))
    return copy
