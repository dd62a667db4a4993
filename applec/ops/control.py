"""Op table entries: If, Loop and Scan.

An If node's branches are `Graph`s in `attrs["then_branch"]` / `attrs["else_branch"]`;
`inputs[0]` is the condition and `inputs[1:]` bind the branches' inputs (then's, then
else's), the outer values they read (see `applec.ir`). The importer inlines the taken
branch when the condition is a compile-time constant and gives the branches static shapes
before this entry's rule runs, so `infer` only checks that both branches agree.

Loop and Scan keep their body in `attrs["body"]`, whose inputs are the ONNX body's declared
inputs followed by `attrs["num_captures"]` captures (outer values the body reads); the
node's inputs bind them by position:

    Loop: inputs  M, cond, v_initial..., captures...   body inputs  i, cond, v..., captures...
          outputs v_final..., scans...                 body outputs cond, v..., scan slices...
    Scan: inputs  states..., scan inputs..., captures... body inputs  states..., slices...,
          outputs states..., scan outputs...                          captures...

`attrs["batched"]` marks an opset-8 Scan (no sequence_lens): axis 0 of every input and
output is a batch the body never sees, and the scan axis is 1. The importer unrolls every
Loop and Scan (`applec.control_flow`), so `infer` is never reached for one that was; the
references run the body with the interpreter.
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from . import REQUIRED, OpDef, register


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


def loop_layout(node) -> tuple[int, int]:
    """(loop-carried values N, scan outputs K) of a Loop node."""
    carried = len(node.attrs["body"].inputs) - 2 - node.attrs.get("num_captures", 0)
    return carried, len(node.outputs) - carried


def scan_layout(node) -> tuple[int, int, int]:
    """(states N, scan inputs M, scan outputs K) of a Scan node."""
    scans = node.attrs["num_scan_inputs"]
    states = len(node.attrs["body"].inputs) - scans - node.attrs.get("num_captures", 0)
    return states, scans, len(node.outputs) - states


class _Unrolled(OpDef):
    """Loop and Scan: unrolled by the importer; an unrolled node has no shape rule."""

    def infer(self, node):
        raise UnsupportedOpError(f"{self.op_type} node '{node.name}': it was not unrolled "
                                 "at import, and CoreML programs have no other form for it")


@register
class Loop(_Unrolled):
    attrs = {"body": REQUIRED, "num_captures": 0}
    static_inputs = (0, 1)  # the trip count and the first condition decide output shapes

    def reference(self, node, inputs):
        from ..interpreter import run_values  # the interpreter is built on this table

        carried_count, scan_count = loop_layout(node)
        trip, cond = inputs[0], inputs[1]
        limit = None if trip is None else int(np.asarray(trip).reshape(-1)[0])
        running = True if cond is None else condition_value(self, node, cond)
        carried = list(inputs[2:2 + carried_count])
        captures = list(inputs[2 + carried_count:])
        steps, i = [], 0
        while running and (limit is None or i < limit):
            outs = run_values(node.attrs["body"],
                              [np.asarray(i, np.int64), np.asarray(True), *carried, *captures])
            running = condition_value(self, node, outs[0])
            carried = outs[1:1 + carried_count]
            steps.append(outs[1 + carried_count:])
            i += 1
        stacked = [np.stack([step[k] for step in steps]) if steps else np.zeros((0,))
                   for k in range(scan_count)]
        return [*carried, *stacked]


@register
class Scan(_Unrolled):
    attrs = {"body": REQUIRED, "num_scan_inputs": REQUIRED, "num_captures": 0,
             "scan_input_axes": None, "scan_input_directions": None,
             "scan_output_axes": None, "scan_output_directions": None, "batched": False}

    def reference(self, node, inputs):
        state_count, scan_count, _ = scan_layout(node)
        if not self.attr(node, "batched"):
            return self._scan(node, inputs, state_count, scan_count)
        per_batch = [self._scan(node, [x[b] if i < state_count + scan_count else x
                                       for i, x in enumerate(inputs)],
                                state_count, scan_count)
                     for b in range(inputs[0].shape[0])]
        return [np.stack(outs) for outs in zip(*per_batch)]

    def _scan(self, node, inputs, state_count, scan_count):
        from ..interpreter import run_values  # the interpreter is built on this table

        states = list(inputs[:state_count])
        scans = inputs[state_count:state_count + scan_count]
        captures = list(inputs[state_count + scan_count:])
        in_axes = self.int_list(node, "scan_input_axes", scan_count)
        in_dirs = self.int_list(node, "scan_input_directions", scan_count)
        in_axes = [a % x.ndim for a, x in zip(in_axes, scans)]
        length = scans[0].shape[in_axes[0]]
        steps = []
        for t in range(length):
            slices = [np.take(x, length - 1 - t if d else t, axis=a)
                      for x, a, d in zip(scans, in_axes, in_dirs)]
            outs = run_values(node.attrs["body"], [*states, *slices, *captures])
            states = outs[:state_count]
            steps.append(outs[state_count:])
        outputs = []
        out_count = len(node.outputs) - state_count
        out_axes = self.int_list(node, "scan_output_axes", out_count)
        out_dirs = self.int_list(node, "scan_output_directions", out_count)
        for k in range(out_count):
            values = [step[k] for step in steps][::-1 if out_dirs[k] else 1]
            axis = out_axes[k] % (values[0].ndim + 1)
            outputs.append(np.stack(values, axis=axis))
        return [*states, *outputs]

    def int_list(self, node, name: str, count: int) -> list[int]:
        """A per-scan-input or per-scan-output attribute; 0 for each when absent."""
        values = self.attr(node, name)
        values = [0] * count if values is None else [int(v) for v in values]
        if len(values) != count:
            self.fail(node, f"{name} has {len(values)} entries for {count} values")
        return values
