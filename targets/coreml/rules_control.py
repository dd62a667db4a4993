"""CoreML lowering of If: a MIL `cond` whose two blocks are the lowered branches.

The importer has inlined every If whose condition was known at compile time, so the ones
left depend on run-time data. Each branch graph is lowered op by op into its block with
the same rules as the main function; a branch input reads the outer var it is bound to
(MIL blocks see their enclosing scope). What a block defines stays in it: the var table is
restored after each branch, so a constant materialised inside one block is never reused
outside it. Both branches have one static shape and dtype per output (the op table checked
that at import), which is what `cond` requires.
"""

from __future__ import annotations

from coremltools.converters.mil import Builder as mb

from applec.ops.control import branch_inputs

from .lower import lower_node
from .rules import RULES, rule


@rule("If")
def lower_if(lw, node):
    pred = lw.get(node.inputs[0])
    if node.inputs[0].shape:  # [1] -> the rank-0 predicate cond takes
        pred = mb.squeeze(x=pred, name=lw.tmp("pred"))
    bound = branch_inputs(node)
    results = mb.cond(pred=pred, _true_fn=_branch_fn(lw, node, "then_branch", bound),
                      _false_fn=_branch_fn(lw, node, "else_branch", bound),
                      name=lw.tmp("cond"))
    results = results if isinstance(results, (list, tuple)) else [results]
    for value, var in zip(node.outputs, results):
        lw.bind(value, var)


def _branch_fn(lw, node, key, bound):
    branch = node.attrs[key]

    def build():
        # vars, consts and casts made inside the branch's block are not visible outside it
        saved = dict(lw.vars), dict(lw.consts), dict(lw.casts)
        try:
            for placeholder, outer in zip(branch.inputs, bound[key]):
                lw.vars[id(placeholder)] = lw.get(outer)
            for inner in branch.nodes:
                lower_node(lw, inner, RULES)
            inputs = {id(v) for v in branch.inputs}
            outputs = []
            for i, value in enumerate(branch.outputs):
                var = lw.get(value)
                if value.is_const or id(value) in inputs:  # defined outside this block
                    var = mb.identity(x=var, name=lw.unique(f"{node.name}__{key}_out{i}"))
                outputs.append(var)
            return tuple(outputs)
        finally:
            lw.vars, lw.consts, lw.casts = saved

    return build
