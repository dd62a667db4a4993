"""fold_qdq_weights: QDQ weights stay quantized in the bundle; other constant
DequantizeLinears are folded.

A QDQ model stores each weight as int8/uint8 (or int4/uint4) data with a scale and zero
point, dequantized by a DequantizeLinear in front of the op that reads it. Folding that
into a float constant would store the weight 4x larger, so DequantizeLinear is not
foldable (applec/ops/qdq.py) and this pass decides, for each one whose inputs are all
constant (a QuantizeLinear of a float weight has been folded to int8 data at import):

- compress: when its output is read only as a weight -- Conv's or ConvTranspose's W,
  MatMul's or Gemm's A/B, Gather's data -- it becomes applec.DequantizeWeight (the
  `--quantize` representation, applec/ops/quant.py) with the same data, scale and zero
  point: affine mode, 8 or 4 bits, one scale per tensor (repeated per channel of axis 0:
  constexpr_affine_dequantize wants a scalar or one per channel), per axis, or per block.
  The target keeps it compressed (constexpr_blockwise_shift_scale on iOS18+,
  constexpr_affine_dequantize before; block-wise scales need iOS18);
- fold: anything else (a bias, a DequantizeLinear read by an Add, float16 output, a block
  size that does not divide the axis) becomes the float constant it computes; a weight
  kept float this way gets a note saying why.
Both are exact: DequantizeWeight computes (data - offset) * scale in fp32, as ONNX does.

First, a DequantizeLinear of a Gather from a constant table (onnxruntime's
`quantize_dynamic` quantizes embeddings that way) dequantizes the table before the Gather
instead, so the table is a compressed weight like the others (it was an int32 constant:
CoreML programs hold no uint8 tensors, 4 bytes an entry). Exact: dequantization is
elementwise with one scale and zero point, or one per axis that the Gather keeps.

    before: e = Gather(table uint8[V, D], ids); y = DequantizeLinear(e, s, zp)
    after:  t = DequantizeLinear(table, s, zp); y = Gather(t, ids)     (t compressed below)

Ordering: it runs first in the pipeline; fold_constants then folds what the folded
DequantizeLinears fed. (Import already folds everything else that is constant; only
DequantizeLinear waits for this pass.)

    before: w = DequantizeLinear(q int8[64, 32, 3, 3], s[64], zp int8[64]; axis=0)
            y = Conv(x, w)
    after:  w = applec.DequantizeWeight(q, s[64, 1, 1, 1], zp[64, 1, 1, 1]; affine, bits=8)
            y = Conv(x, w)
"""

from __future__ import annotations

import numpy as np

from applec import ops
from applec.ir import Graph, Node
from applec.ops.qdq import as_int, expand_param, param_layout

# op type -> input positions that read a weight the target takes as a (constexpr) tensor
WEIGHT_SLOTS = {"Conv": {1}, "ConvTranspose": {1}, "MatMul": {0, 1}, "Gemm": {0, 1},
                "Gather": {0}}
BITS = {"int8": 8, "uint8": 8, "int4": 4, "uint4": 4}


def run(graph: Graph) -> int:
    count = sum(dequantize_table(graph, node) for node in list(graph.nodes)
                if node.op_type == "DequantizeLinear")
    for node in list(graph.nodes):
        if node.op_type != "DequantizeLinear" or \
                not all(v is None or v.is_const for v in node.inputs):
            continue
        reason = refusal(graph, node)
        if reason is None:
            compress(graph, node)
        else:
            fold(graph, node, reason)
        count += 1
    return count


def dequantize_table(graph: Graph, node: Node) -> bool:
    """Dequantize(Gather(constant table, ids)) -> Gather(Dequantize(table), ids), when the
    Gather output is read by nothing else and the scale and zero point are per tensor or
    along an axis the Gather keeps (not block-wise). Returns whether it rewrote."""
    gathered = node.inputs[0]
    gather = gathered.producer
    if gather is None or gather.op_type != "Gather" or not gather.inputs[0].is_const or \
            len(gathered.users) != 1 or any(gathered is v for v in graph.outputs) or \
            not all(v is None or v.is_const for v in node.inputs[1:]):
        return False
    op, table, ids = ops.OPS[node.op_type], gather.inputs[0], gather.inputs[1]
    rank, index_rank = len(gathered.shape), len(ids.shape)
    g = int(gather.attrs.get("axis", 0)) % len(table.shape)
    attrs = {k: v for k, v in node.attrs.items() if k != "axis"}
    if int(op.attr(node, "block_size")):
        return False
    if node.inputs[1].size != 1:  # per axis: map the output axis back to the table's
        axis = op.attr(node, "axis") % rank
        if g <= axis < g + index_rank:
            return False  # scales that vary along the gathered indices
        attrs["axis"] = axis if axis < g else axis - index_rank + 1
    index = graph.nodes.index(gather)
    dequantized = graph.add_node("DequantizeLinear", [table, *node.inputs[1:]], attrs,
                                 name=f"{node.name}_table", index=index)
    dequantized.meta.update(node.meta)
    ops.infer_node(dequantized)
    replace(graph, node, "Gather", [dequantized.outputs[0], ids], {"axis": g})
    graph.remove_node(gather)
    entry = graph.meta.get("report", {}).get(gather.meta.get("onnx_node"))
    source = node.meta.get("onnx_node") or node.name
    if entry is not None and source != gather.meta.get("onnx_node"):
        entry.update(status="fused", fused_into=source, reason="gathers from the table "
                     f"'{source}' dequantizes, kept 8-bit (fold_qdq_weights)")
    return True


def refusal(graph: Graph, node: Node) -> str | None:
    """Why this constant DequantizeLinear is folded rather than kept compressed; None to
    compress. Reasons are noted only when it feeds a weight (else folding is the plan)."""
    out, x = node.outputs[0], node.inputs[0]
    reads = [(user, i) for user in out.users for i, v in enumerate(user.inputs) if v is out]
    if not reads or any(out is v for v in graph.outputs) or \
            any(i not in WEIGHT_SLOTS.get(user.op_type, ()) for user, i in reads):
        return ""
    if x.dtype.name not in BITS:
        return f"{x.dtype} data has no CoreML compressed form (int8/uint8/int4/uint4)"
    if out.dtype != np.float32:
        return f"the weight is {out.dtype}, not float32"
    if not x.shape:
        return "the weight is a scalar"
    op = ops.OPS[node.op_type]
    block = int(op.attr(node, "block_size"))
    axis = op.attr(node, "axis") % len(x.shape)
    if block and x.shape[axis] % block:
        return f"block_size {block} does not divide dim {axis} ({x.shape[axis]})"
    return None


def compress(graph: Graph, node: Node) -> None:
    x, scale, zero = node.inputs[0], node.inputs[1], node.input(2)
    op = ops.OPS[node.op_type]
    block, rank = int(op.attr(node, "block_size")), len(x.shape)
    axis = op.attr(node, "axis") % rank
    layout = param_layout(op, node, x.shape, scale.shape, axis, block)
    if layout == "tensor":
        layout, axis = "axis", 0
    shape = [x.shape[i] // block if block and i == axis else 1 for i in range(rank)]
    if layout == "axis":
        shape[axis] = x.shape[axis]

    def per_block(array: np.ndarray) -> np.ndarray:
        if layout == "block":
            return np.ascontiguousarray(array)
        return np.ascontiguousarray(np.broadcast_to(
            expand_param(array, x.shape, param_layout(op, node, x.shape, array.shape, axis,
                                                      block), axis, block), shape))

    bits = BITS[x.dtype.name]
    held = np.int8 if x.dtype.name.startswith("int") else np.uint8  # 4-bit data widened
    inputs = [graph.const(as_int(x.const).astype(held), f"{x.name}_q"),
              graph.const(per_block(scale.const).astype(np.float32), f"{scale.name}_scale")]
    if zero is not None and as_int(zero.const).any():
        inputs.append(graph.const(per_block(as_int(zero.const)).astype(held),
                                  f"{zero.name}_offset"))
    replace(graph, node, "applec.DequantizeWeight", inputs,
            {"mode": "affine", "bits": bits, "axis": axis})


def replace(graph: Graph, node: Node, op_type: str, inputs, attrs) -> Node:
    """A node computing `node`'s output value in its place (same Value, same position)."""
    out, index = node.outputs[0], graph.nodes.index(node)
    shape, dtype = out.shape, out.dtype
    graph.remove_node(node)
    new = Node(op_type, graph.fresh_name(f"{node.name}_weight"), inputs, [out], attrs)
    graph.nodes.insert(index, new)
    new.meta.update(node.meta)
    ops.infer_node(new)
    assert (out.shape, out.dtype) == (shape, dtype), f"{op_type} changed '{out.name}'"
    return new


def fold(graph: Graph, node: Node, reason: str) -> None:
    out = node.outputs[0]
    array = ops.evaluate(node, [v.const if v is not None else None for v in node.inputs])[0]
    graph.remove_node(node)
    out.set_const(array)
    source = node.meta.get("onnx_node")
    report = graph.meta.get("report", {})
    if source in report and report[source].get("status") == "imported":
        report[source].update(status="folded", reason="all inputs are constant at compile "
                                                      "time; computed by applec")
    if reason:
        graph.meta.setdefault("notes", []).append(
            f"DequantizeLinear node '{source or node.name}': weight '{out.name}' stored as "
            f"float, not compressed: {reason}")
