"""If nodes while the importer propagates shapes (`onnx_import.propagate`).

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
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError
from .ir import Graph, Node, Value
from .ops import OPS
from .ops.control import branch_inputs, condition_value

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
