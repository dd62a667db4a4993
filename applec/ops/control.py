"""Op table entry: If.

An If node's branches are `Graph`s in `attrs["then_branch"]` / `attrs["else_branch"]`;
`inputs[0]` is the condition and `inputs[1:]` bind the branches' inputs (then's, then
else's), the outer values they read (see `applec.ir`). The importer inlines the taken
branch when the condition is a compile-time constant and gives the branches static shapes
before this entry's rule runs, so `infer` only checks that both branches agree.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from . import OpDef, register


def branch_inputs(node) -> dict[str, list]:
    """The outer values bound to each branch's inputs, by branch attribute."""
    then = node.attrs["then_branch"]
    split = 1 + len(then.inputs)
    return {"then_branch": node.inputs[1:split], "else_branch": node.inputs[split:]}


def condition_value(op: OpDef, node, data) -> bool:
    data = np.asarray(data)
    if data.size != 1:
        op.fail(node, f"the condition has {data.size} elements, not 1")
    return bool(data.reshape(-1)[0])


@register
class If(OpDef):
    attrs = {"then_branch": None, "else_branch": None}

    def infer(self, node):
        then, other = node.attrs["then_branch"], node.attrs["else_branch"]
        if len(node.inputs) != 1 + len(then.inputs) + len(other.inputs):
            self.fail(node, "its inputs do not bind the branches' inputs")
        if not (len(then.outputs) == len(other.outputs) == len(node.outputs)):
            self.fail(node, f"then_branch has {len(then.outputs)} outputs, else_branch "
                            f"{len(other.outputs)}, the node {len(node.outputs)}")
        results = []
        for i, (a, b) in enumerate(zip(then.outputs, other.outputs)):
            if a.shape is None or b.shape is None:
                self.fail(node, "its branches have no static shapes yet")
            if a.shape != b.shape or a.dtype != b.dtype:
                raise UnsupportedOpError(
                    f"If node '{node.name}': output {i} is {a.dtype}{list(a.shape)} in "
                    f"then_branch but {b.dtype}{list(b.shape)} in else_branch; a condition "
                    "known only at run time needs one static shape and dtype per output")
            results.append((a.shape, a.dtype))
        return results

    def reference(self, node, inputs):
        from ..interpreter import run_values  # the interpreter is built on this table

        key = "then_branch" if condition_value(self, node, inputs[0]) else "else_branch"
        then = node.attrs["then_branch"]
        split = 1 + len(then.inputs)
        args = inputs[1:split] if key == "then_branch" else inputs[split:]
        return run_values(node.attrs[key], args)
