"""quantize_weights: keep large constant weights compressed, behind applec.DequantizeWeight.

On only with `applec compile --quantize int8|int4|palette4` (a `QuantizeConfig` in
graph.meta["quantize"]); otherwise it changes nothing.

Rules:
- a weight is a float constant of at least `--quantize-min-size` elements that is a Conv's
  weight, an applec.Linear's weight, a MatMul's constant 2-D B (the MatMul becomes
  applec.Linear(x, B^T), as MIL `linear` wants [out, in]), a Gemm's constant B (an
  applec.Linear when transA = 0 and C is a bias vector; otherwise the Gemm reads the
  dequantized B), or a Gather's constant 2-D table on axis 0 (an embedding);
- embedding tables take `--quantize-embeddings` (default: int8 under int4, else the
  --quantize mode): a gathered row goes into the model as it is, with none of the averaging
  over K inputs that a linear layer's rounding errors get; on MiniLM an int4 table costs
  6 of 416 sentences their nearest neighbour for 5.9 MB (docs/quantization.md);
- biases, norm parameters, smaller or non-float tensors are never quantized, nor a
  constant something else also reads (it would be stored twice);
- int4 cuts each output channel's input dim into blocks of `--block-size` input channels
  (a whole kernel window each, for a Conv); an input dim that is larger than the block
  and not a multiple of it keeps the layer float, with the reason in the report;
- palette4 needs at least MIN_PER_LUT elements per LUT: below that (possible only with a
  lowered --quantize-min-size) it is a QuantizationError, naming the weight.
With calibration samples, layers whose inputs the interpreter can collect (Linear-like,
dense 2-D Conv) round GPTQ-style; embeddings and the rest round to nearest.

    before: y = applec.Linear(x, W[N, K] const, b)
    after:  w = applec.DequantizeWeight(q[N, K] int8, s[N, 1]; mode=affine, bits=8, axis=0)
            y = applec.Linear(x, w, b)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from applec import ops
from applec.errors import ModelError
from applec.ir import Graph, Node, Value

from ._quant import (
    MIN_PER_LUT,
    QuantizationError,
    QuantizeConfig,
    Quantized,
    palette_group,
    quantize_gptq,
    quantize_rtn,
)
from ._quant_calibration import hessians

CONFIG_KEY = "quantize"


@dataclass
class Site:
    """A node reading a quantizable weight: which input, and its output-channel axis."""

    node: Node
    slot: int
    out_axis: int

    @property
    def weight(self) -> Value:
        return self.node.inputs[self.slot]


def run(graph: Graph) -> int:
    cfg: QuantizeConfig | None = graph.meta.get(CONFIG_KEY)
    if cfg is None:
        return 0
    sites = [s for s in find_sites(graph) if eligible(graph, cfg, s)]
    if not sites:
        return 0
    layers = {id(s.node): s.node for s in sites}
    found = hessians(graph, layers, cfg.calibration) if cfg.calibration else {}
    for site in sites:
        quantize_site(graph, cfg, site, found.get(id(site.node)))
    return len(sites)


# -- finding weights -----------------------------------------------------------------------
def find_sites(graph: Graph) -> list[Site]:
    sites = []
    for node in graph.nodes:
        site = site_of(node)
        if site is not None and site.weight is not None and site.weight.is_const:
            sites.append(site)
    return sites


def site_of(node: Node) -> Site | None:
    op = node.op_type
    if op == "applec.Linear" or op == "Conv":
        return Site(node, 1, 0)
    if op == "MatMul" and node.inputs[1].is_const and len(node.inputs[1].shape) == 2:
        return Site(node, 1, 1)
    if op == "Gemm":
        return Site(node, 1, 0 if node.attrs.get("transB", 0) else 1)
    if op == "Gather" and len(node.inputs[0].shape) == 2 and \
            int(node.attrs.get("axis", 0)) % 2 == 0:
        return Site(node, 0, 0)
    return None


def eligible(graph: Graph, cfg: QuantizeConfig, site: Site) -> bool:
    """Whether to quantize; a refusal is recorded in cfg.skipped under the node."""
    reason = refusal(graph, cfg, site)
    if reason is not None:
        cfg.skipped[site.node.meta.get("onnx_node") or site.node.name] = reason
    return reason is None


def site_mode(cfg: QuantizeConfig, site: Site) -> str:
    """The mode for this weight: --quantize, or --quantize-embeddings for a Gather table."""
    return cfg.embeddings if site.node.op_type == "Gather" else cfg.mode


def refusal(graph: Graph, cfg: QuantizeConfig, site: Site) -> str | None:
    w, node = site.weight, site.node
    mode = site_mode(cfg, site)
    if mode == "float":
        return "an embedding table: --quantize-embeddings float keeps them float"
    if w.dtype.kind != "f":
        return f"weight '{w.name}' is {w.dtype}, not float"
    if site.slot == 1 and node.inputs[0].dtype.kind != "f":
        return f"{node.op_type} is not on floats"
    if w.size < cfg.min_size:
        return f"weight '{w.name}' has {w.size} elements, under --quantize-min-size {cfg.min_size}"
    if len({id(u) for u in w.users}) > 1 or any(v is w for v in graph.outputs) or \
            sum(v is w for v in node.inputs) > 1:
        return f"weight '{w.name}' is also read elsewhere (it would be stored twice)"
    canonical = canonical_shape(w.shape, site.out_axis)
    if mode == "int4":
        k = canonical[1] if len(canonical) > 1 else 1
        if k > cfg.block_size and k % cfg.block_size:
            return (f"input dim {k} of '{w.name}' is not a multiple of --block-size "
                    f"{cfg.block_size}")
    if mode == "palette4":
        group = palette_group(canonical[0]) if cfg.grouped_lut else canonical[0]
        per_lut = group * (w.size // canonical[0])
        if per_lut < MIN_PER_LUT:
            why = (f"weight '{w.name}' {list(w.shape)} is too small to palettize: "
                   f"{per_lut} elements per 16-entry LUT, palette4 needs {MIN_PER_LUT}")
            if cfg.min_size_forced:
                where = node.meta.get("onnx_node") or node.name
                raise QuantizationError(f"--quantize palette4: {why} ({node.op_type} node "
                                        f"'{where}'); raise --quantize-min-size above "
                                        f"{w.size}")
            return why
    return None


def canonical_shape(shape, out_axis: int) -> tuple[int, ...]:
    shape = list(shape)
    return tuple([shape.pop(out_axis)] + shape)


# -- rewriting -----------------------------------------------------------------------------
def quantize_site(graph: Graph, cfg: QuantizeConfig, site: Site, hessian) -> None:
    source = site.weight.name
    node = as_linear(graph, site)
    if node is not site.node:
        site = Site(node, 1, 0)
    weight = site.weight.const
    canonical = np.moveaxis(weight, site.out_axis, 0)
    n = canonical.shape[0]
    w2 = canonical.reshape(n, -1).astype(np.float32)
    inner = int(np.prod(canonical.shape[2:], dtype=np.int64))   # a Conv's kernel window
    block_channels = min(cfg.block_size, canonical.shape[1]) if canonical.ndim > 1 else 1
    mode = site_mode(cfg, site)
    block = {"int8": w2.shape[1], "int4": block_channels * inner,
             "palette4": palette_group(n) if cfg.grouped_lut else n}[mode]
    q, method = None, "rtn"
    if hessian is not None:
        try:
            q, method = quantize_gptq(mode, w2, block, cfg.float_dtype, hessian), "gptq"
        except np.linalg.LinAlgError:  # H not positive definite even damped: round instead
            method = "rtn (GPTQ failed: the input Hessian is singular)"
    if q is None:
        q = quantize_rtn(mode, w2, block, cfg.float_dtype)
    inputs = dq_inputs(q, canonical.shape, site.out_axis)
    dq = insert_dequantize(graph, site, inputs, q)
    dq.meta["float_weight"] = weight
    key = node.meta.get("onnx_node") or node.name   # what report.json lists nodes by
    record = layer_record(cfg, mode, site, q, method, source, dq, block_channels)
    cfg.layers[key if key not in cfg.layers else node.name] = record


def dq_inputs(q: Quantized, canonical_shape, out_axis: int) -> list[np.ndarray]:
    """The DequantizeWeight inputs in the weight's own layout (output channels at out_axis)."""
    rank = len(canonical_shape)

    def back(array):
        return np.ascontiguousarray(np.moveaxis(array, 0, out_axis))

    data = back(q.data.reshape(canonical_shape))
    if q.mode == "lut":
        return [data, q.params]
    blocks = q.params.shape[1] if rank > 1 else 1
    param_shape = (canonical_shape[0],) + ((blocks,) if rank > 1 else ()) + (1,) * (rank - 2)
    inputs = [data, back(q.params.reshape(param_shape))]
    if q.offset is not None:
        inputs.append(back(q.offset.reshape(param_shape)))
    return inputs


def insert_dequantize(graph: Graph, site: Site, inputs: list[np.ndarray], q: Quantized) -> Node:
    node, weight = site.node, site.weight
    names = ("codes", "scale", "offset") if q.mode == "affine" else ("indices", "lut")
    consts = [graph.const(array, f"{weight.name}_{name}") for array, name in zip(inputs, names)]
    dq = graph.add_node("applec.DequantizeWeight", consts,
                        {"mode": q.mode, "bits": q.bits, "axis": site.out_axis},
                        name=f"{node.name}_weight", index=graph.nodes.index(node))
    dq.meta["onnx_node"] = node.meta.get("onnx_node")
    ops.infer_node(dq)
    if dq.outputs[0].shape != weight.shape:
        raise ModelError(f"internal error: quantized '{weight.name}' has shape "
                         f"{list(dq.outputs[0].shape)}, not {list(weight.shape)}")
    # applec.Linear's shape rule reads the weight as a constant; it ran on the float one
    node.set_input(site.slot, dq.outputs[0])
    return dq


def as_linear(graph: Graph, site: Site) -> Node:
    """MatMul(x, B) and a bias-style Gemm as applec.Linear(x, W[out, in], bias?)."""
    node = site.node
    b = node.inputs[1]
    if node.op_type == "MatMul":
        return replace_node(graph, node, [node.inputs[0], graph.const(b.const.T, f"{b.name}_t")])
    if node.op_type != "Gemm" or node.attrs.get("transA", 0):
        return node
    c, n = node.input(2), node.outputs[0].shape[1]
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    if c is not None and not (c.is_const and c.const.size in (1, n) and
                              (c.const.ndim < 2 or c.const.shape[0] == 1)):
        return node
    weight = b.const if node.attrs.get("transB", 0) else b.const.T
    if alpha != 1:
        weight = (weight.astype(np.float64) * alpha).astype(b.dtype)
    inputs = [node.inputs[0], graph.const(np.ascontiguousarray(weight), f"{b.name}_t")]
    if c is not None and beta != 0:
        bias = np.broadcast_to(c.const.reshape(-1).astype(np.float64) * beta, (n,))
        inputs.append(graph.const(bias.astype(node.outputs[0].dtype), c.name))
    return replace_node(graph, node, inputs)


def replace_node(graph: Graph, node: Node, inputs: list[Value]) -> Node:
    out = node.outputs[0]
    shape, dtype = out.shape, out.dtype
    index = graph.nodes.index(node)
    graph.remove_node(node)
    linear = Node("applec.Linear", node.name, inputs, [out])
    graph.nodes.insert(index, linear)
    linear.meta.update(node.meta)
    linear.meta["rewritten_by"] = "quantize_weights"
    ops.infer_node(linear)
    if (out.shape, out.dtype) != (shape, dtype):
        raise ModelError(f"internal error: quantize_weights turned {node.op_type} "
                         f"'{node.name}' into a Linear of {out.dtype}{list(out.shape)}")
    return linear


# -- the record ----------------------------------------------------------------------------
def layer_record(cfg: QuantizeConfig, mode: str, site: Site, q: Quantized, method: str,
                 source: str, dq: Node, block_channels: int) -> dict:
    weight = dq.meta["float_weight"]
    float_bytes = np.dtype(cfg.float_dtype).itemsize
    params = q.params.size * float_bytes
    offsets = 0 if q.offset is None else (
        q.offset.nbytes if q.offset.dtype.kind == "f" else (q.offset.size * q.bits + 7) // 8)
    record = {
        "onnx_node": site.node.meta.get("onnx_node"),
        "op_type": site.node.op_type,
        "weight": source,
        "shape": list(weight.shape),
        "mode": mode,
        "method": method,
        "float_bytes": int(weight.size * float_bytes),
        "quantized_bytes": int((q.data.size * q.bits + 7) // 8 + params + offsets),
        "dequantize": dq.name,
    }
    if mode == "int4":
        blocks_per_channel = q.params.shape[1]
        record.update(block_size=block_channels, blockwise=blocks_per_channel > 1)
    elif mode == "int8":
        record.update(granularity="per output channel")
    else:
        groups = q.params.shape[0]
        record.update(lut_groups=groups, channels_per_lut=q.block)
    return record
