"""ONNX -> IR. The only module (with the conformance tests) that touches `onnx.*` messages.

Import does, in order:
1. load the file (external data included) and reject what is not a valid ONNX model;
2. fix every graph input's shape: static dims as declared, symbolic ones from `--shape`
   overrides, or a ShapeError naming the input that needs one;
3. run onnx's shape inference (with data propagation) on the fixed-shape model;
4. build the IR: initializers and Constant nodes become constants, attributes become Python
   values (dtypes as numpy dtypes), and ops are rewritten to their canonical newest-opset
   form (axes as inputs, Softmax opset-13 semantics, ...), so nothing later sees the opset;
5. propagate: fold every node whose inputs are all constant (this is what turns
   Shape -> Gather -> Concat -> Reshape into a constant shape) and give every other value a
   static shape from the op table, checked against onnx's inference where it has one.

Graph inputs that also have an initializer are treated as constants (the ONNX spec lets a
runtime override them; a compiled bundle does not).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import ops
from .errors import ModelError, ShapeError, UnsupportedOpError
from .ir import Graph, Node, Value

ONNX_DOMAINS = ("", "ai.onnx")


def onnx_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError):
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type else "UNDEFINED"
        raise ModelError(f"tensor type {name} is not supported") from None


# -- 1. loading ------------------------------------------------------------------------
def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; every failure is a one-line ModelError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise ModelError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    if not model.HasField("graph") or not (model.graph.node or model.graph.output):
        raise ModelError(f"{path}: not an ONNX model (no graph in the file)")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise ModelError(f"{path}: cannot load external data ({_first_line(exc)})") from None
    return model


# Initializers above this size are left out of the model that onnx checks and infers
# shapes on: both only need their types and shapes, and copying hundreds of MB of weights
# through them dominated the import time of BERT-sized models.
LIGHT_INITIALIZER_BYTES = 4096


def light_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` in which large initializers are typed graph inputs, not data."""
    light = onnx.ModelProto()
    light.ir_version = max(model.ir_version, 4)  # IR 4+: initializers need not be inputs
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    g, lg = model.graph, light.graph
    lg.name = g.name
    lg.node.extend(g.node)
    lg.input.extend(g.input)
    lg.output.extend(g.output)
    lg.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for tensor in g.initializer:
        if len(tensor.raw_data) + 4 * len(tensor.float_data) <= LIGHT_INITIALIZER_BYTES:
            lg.initializer.append(tensor)
        elif tensor.name not in declared:
            lg.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                          list(tensor.dims)))
    return light


def check_and_infer(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """onnx's checker and shape inference (with data propagation) on the light model."""
    light = light_model(model)
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{path}: onnx shape inference failed: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def opset_of(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ONNX_DOMAINS:
            return entry.version
    return 1


# -- 2. input shapes -------------------------------------------------------------------
def fix_input_shapes(model: onnx.ModelProto, overrides: dict[str, tuple[int, ...]]) -> None:
    """Make every non-initializer graph input static, in place."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    known = {i.name for i in inputs}
    for name in overrides:
        if name not in known:
            raise ShapeError(f"--shape names '{name}', which is not a model input "
                             f"(inputs: {', '.join(sorted(known)) or 'none'})")
    for value in inputs:
        if not value.type.HasField("tensor_type"):
            raise ModelError(f"input '{value.name}' is not a tensor (sequences and maps "
                             "are not supported)")
        tensor_type = value.type.tensor_type
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                    for d in tensor_type.shape.dim]
        if value.name in overrides:
            shape = overrides[value.name]
            if tensor_type.HasField("shape") and len(shape) != len(declared):
                raise ShapeError(f"--shape {value.name}={'x'.join(map(str, shape))} has rank "
                                 f"{len(shape)}, but the model declares {_dims(declared)}")
            for got, want in zip(shape, declared):
                if isinstance(want, int) and want > 0 and got != want:
                    raise ShapeError(f"--shape {value.name}={'x'.join(map(str, shape))} "
                                     f"conflicts with the declared shape {_dims(declared)}")
        elif not tensor_type.HasField("shape"):
            raise ShapeError(f"input '{value.name}' has no declared shape; pass "
                             f"--shape {value.name}=DxDx...")
        elif any(not (isinstance(d, int) and d > 0) for d in declared):
            raise ShapeError(f"input '{value.name}' has dynamic shape {_dims(declared)}; pass "
                             f"--shape {value.name}="
                             + "x".join(str(d) if isinstance(d, int) and d > 0 else "N"
                                        for d in declared))
        else:
            shape = tuple(declared)
        if any(d <= 0 for d in shape):
            raise ShapeError(f"input '{value.name}': dims must be positive, got {list(shape)}")
        tensor_type.shape.Clear()
        for d in shape:
            tensor_type.shape.dim.add().dim_value = int(d)


def _dims(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def parse_shape_override(text: str) -> tuple[str, tuple[int, ...]]:
    """'x=1x3x224x224' -> ('x', (1, 3, 224, 224)); a ShapeError for anything else."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if dims else ()
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise ShapeError(f"--shape '{text}' is not NAME=DxDx... with positive dims")
    return name, shape


# -- 3 + 4. building the IR --------------------------------------------------------------
def import_model(path: str | os.PathLike,
                 shapes: dict[str, tuple[int, ...]] | None = None) -> Graph:
    """Load an ONNX file and return a static-shape IR graph in canonical form."""
    model = load_model(path)
    opset = opset_of(model)
    fix_input_shapes(model, dict(shapes or {}))
    inferred = check_and_infer(model, path)
    _check_ops_supported(model, opset)
    graph = _Builder(model, inferred, opset).build()
    graph.meta["source"] = Path(path).name
    graph.meta["opset"] = opset
    propagate(graph)
    graph.validate()
    return graph


def _check_ops_supported(model: onnx.ModelProto, opset: int) -> None:
    missing: dict[str, str] = {}
    for node in model.graph.node:
        if node.domain not in ONNX_DOMAINS:
            key = f"{node.domain}.{node.op_type}"
        elif node.op_type == "Constant" or node.op_type in ops.OPS \
                or node.op_type in CANONICAL_REWRITES:
            continue
        else:
            key = node.op_type
        missing.setdefault(key, node.name or node.output[0])
    if missing:
        listed = ", ".join(f"{op} (node '{name}')" for op, name in missing.items())
        word = "op" if len(missing) == 1 else "ops"
        raise UnsupportedOpError(f"unsupported {word} at opset {opset}: {listed}")


class _Builder:
    """Walks one ONNX graph and emits IR nodes in canonical form."""

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto, opset: int):
        self.model = model
        self.inferred_model = inferred
        self.opset = opset
        self.graph = Graph(model.graph.name or "main")
        self.values: dict[str, Value] = {}
        self.inferred: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
        report: dict[str, dict] = {}
        self.graph.meta["report"] = report

    def build(self) -> Graph:
        g = self.model.graph
        self._collect_inferred()
        for init in g.initializer:
            self.values[init.name] = Value(init.name, const=self._array(init))
            self.graph.reserve_name(init.name)
        for value in g.input:
            if value.name in self.values:
                continue
            tensor_type = value.type.tensor_type
            shape = tuple(d.dim_value for d in tensor_type.shape.dim)
            self.values[value.name] = self.graph.add_input(
                value.name, onnx_dtype(tensor_type.elem_type), shape)
        for index, node in enumerate(g.node):
            self._node(node, index)
        for value in g.output:
            if value.name not in self.values:
                raise ModelError(f"graph output '{value.name}' is not produced by any node")
            self.graph.outputs.append(self.values[value.name])
        return self.graph

    def _collect_inferred(self) -> None:
        g = self.inferred_model.graph
        for info in list(g.value_info) + list(g.output):
            tensor_type = info.type.tensor_type
            if not info.type.HasField("tensor_type") or not tensor_type.HasField("shape"):
                continue
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in tensor_type.shape.dim]
            if tensor_type.elem_type and all(d >= 0 for d in dims):
                try:
                    self.inferred[info.name] = (tuple(dims), onnx_dtype(tensor_type.elem_type))
                except ModelError:
                    pass

    @staticmethod
    def _array(tensor: onnx.TensorProto) -> np.ndarray:
        try:
            return numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelError(f"tensor '{tensor.name}' cannot be read: {_first_line(exc)}") \
                from None

    def _node(self, proto: onnx.NodeProto, index: int) -> None:
        name = proto.name or f"{proto.op_type}_{index}"
        attrs = {a.name: self._attr(a, name) for a in proto.attribute}
        self.graph.meta["report"][name] = {"op_type": proto.op_type, "status": "imported",
                                           "index": index}
        if proto.op_type == "Constant":
            self._constant(proto, name, attrs)
            return
        inputs = []
        for input_name in proto.input:
            if not input_name:
                inputs.append(None)
            elif input_name not in self.values:
                raise ModelError(f"node '{name}' ({proto.op_type}) reads '{input_name}', "
                                 "which no earlier node produces")
            else:
                inputs.append(self.values[input_name])
        outputs = []
        for output_name in proto.output:
            value = Value(output_name or self.graph.fresh_name(f"{name}_unused"))
            self.graph.reserve_name(value.name)
            if output_name in self.inferred:
                value.meta["onnx_shape"] = self.inferred[output_name]
            outputs.append(value)
        rewrite = CANONICAL_REWRITES.get(proto.op_type)
        if rewrite is not None:
            node = rewrite(self, name, inputs, outputs, attrs)
        else:
            node = self.graph.add_node(proto.op_type, inputs, attrs, name=name, outputs=outputs)
        node.meta["onnx_node"] = name
        for output_name, value in zip(proto.output, outputs):
            if output_name:
                self.values[output_name] = value

    def _constant(self, proto, name, attrs) -> None:
        for key, value in attrs.items():
            if key == "sparse_value":
                raise UnsupportedOpError(f"Constant node '{name}': sparse_value is not supported")
            array = np.asarray(value)
            if key in ("value_float", "value_floats"):
                array = array.astype(np.float32)
            elif key in ("value_int", "value_ints"):
                array = array.astype(np.int64)
            elif key in ("value_string", "value_strings"):
                raise UnsupportedOpError(f"Constant node '{name}': string tensors are not "
                                         "supported")
            self.values[proto.output[0]] = Value(proto.output[0], const=array)
            self.graph.reserve_name(proto.output[0])
            self.graph.meta["report"][name].update(status="folded",
                                                   reason="Constant node became a constant")
            return
        raise ModelError(f"Constant node '{name}' has no value attribute")

    def _attr(self, attr: onnx.AttributeProto, node_name: str):
        if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            raise UnsupportedOpError(f"node '{node_name}': subgraph attribute '{attr.name}' "
                                     "(control flow) is not supported yet")
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            return self._array(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode("utf-8", errors="replace") for v in value]
        if attr.name == "to" and attr.type == onnx.AttributeProto.INT:
            return onnx_dtype(value)
        return value

    # helpers for rewrites
    def const(self, array, name: str) -> Value:
        return self.graph.const(np.asarray(array), name)

    def opset_below(self, version: int) -> bool:
        return self.opset < version


# -- canonical forms ---------------------------------------------------------------------
def _attr_to_input(attr_name: str, position: int, below: int, dtype=np.int64):
    """Rewrite: before opset `below`, attribute `attr_name` becomes input `position`."""

    def rewrite(b: _Builder, name, inputs, outputs, attrs):
        op_type = b.graph.meta["report"][name]["op_type"]
        if b.opset_below(below) and attr_name in attrs:
            value = b.const(np.asarray(attrs.pop(attr_name), dtype=dtype), f"{name}_{attr_name}")
            inputs = list(inputs) + [None] * (position + 1 - len(inputs))
            inputs[position] = value
        return b.graph.add_node(op_type, inputs, attrs, name=name, outputs=outputs)

    return rewrite


def _clip_v6(b: _Builder, name, inputs, outputs, attrs):
    if b.opset_below(11):
        low = attrs.pop("min", float(np.finfo(np.float32).min))
        high = attrs.pop("max", float(np.finfo(np.float32).max))
        inputs = [inputs[0], b.const(np.float32(low), f"{name}_min"),
                  b.const(np.float32(high), f"{name}_max")]
    return b.graph.add_node("Clip", inputs, attrs, name=name, outputs=outputs)


def _pad_v2(b: _Builder, name, inputs, outputs, attrs):
    if b.opset_below(11):
        pads = b.const(np.asarray(attrs.pop("pads"), np.int64), f"{name}_pads")
        value = b.const(np.float32(attrs.pop("value", 0.0)), f"{name}_value")
        inputs = [inputs[0], pads, value]
    return b.graph.add_node("Pad", inputs, attrs, name=name, outputs=outputs)


def _slice_v1(b: _Builder, name, inputs, outputs, attrs):
    if b.opset_below(10):
        starts = attrs.pop("starts")
        ends = attrs.pop("ends")
        axes = attrs.pop("axes", list(range(len(starts))))
        inputs = [inputs[0]] + [b.const(np.asarray(v, np.int64), f"{name}_{k}")
                                for k, v in (("starts", starts), ("ends", ends), ("axes", axes))]
    return b.graph.add_node("Slice", inputs, attrs, name=name, outputs=outputs)


def _softmax_family(op_type: str):
    """Before opset 13, Softmax(axis) flattens to 2-D at `axis` (default 1).

    The rewrite needs the input's rank, which exporters often compute at run time
    (Shape -> Reshape), so it is done in `propagate`, where every shape is known.
    """

    def rewrite(b: _Builder, name, inputs, outputs, attrs):
        node = b.graph.add_node(op_type, inputs, {"axis": attrs.get("axis", -1)}, name=name,
                                outputs=outputs)
        if b.opset_below(13):
            node.attrs["axis"] = -1
            node.meta["flatten_axis"] = attrs.get("axis", 1)
        return node

    return rewrite


def _expand_flattening_softmax(graph: Graph, node: Node) -> list[Node]:
    """Softmax over the flattened trailing dims: Flatten -> Softmax(-1) -> Reshape."""
    x = node.inputs[0]
    axis = node.meta.pop("flatten_axis") % max(len(x.shape), 1)
    if axis == len(x.shape) - 1:
        return [node]
    index = graph.nodes.index(node)
    out, source = node.outputs[0], node.meta.get("onnx_node")
    graph.remove_node(node)
    flat = graph.add_node("Flatten", [x], {"axis": axis}, name=f"{node.name}_flatten",
                          index=index)
    soft = graph.add_node(node.op_type, [flat.outputs[0]], {"axis": -1},
                          name=f"{node.name}_2d", index=index + 1)
    shape = graph.const(np.asarray(x.shape, np.int64), f"{node.name}_shape")
    reshape = graph.add_node("Reshape", [soft.outputs[0], shape], {}, name=node.name,
                             outputs=[out], index=index + 2)
    for new in (flat, soft, reshape):
        new.meta["onnx_node"] = source
    return [flat, soft, reshape]


def _dropout_old(b: _Builder, name, inputs, outputs, attrs):
    for key in ("ratio", "is_test", "consumed_inputs", "seed"):
        attrs.pop(key, None)
    return b.graph.add_node("Dropout", inputs[:1], attrs, name=name, outputs=outputs)


def _batchnorm(b: _Builder, name, inputs, outputs, attrs):
    for key in ("spatial", "is_test", "consumed_inputs", "momentum", "training_mode"):
        attrs.pop(key, None)
    extra = [v for v in outputs[1:] if v.name]
    if any(not v.name.startswith(f"{name}_unused") for v in extra):
        pass  # training-only outputs; unused in inference graphs, DCE removes them
    return b.graph.add_node("BatchNormalization", inputs, attrs, name=name,
                            outputs=outputs[:1])


REDUCE_AXES_INPUT_SINCE = {"ReduceSum": 13}
for _op in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
            "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"):
    REDUCE_AXES_INPUT_SINCE[_op] = 18

CANONICAL_REWRITES = {
    "Squeeze": _attr_to_input("axes", 1, 13),
    "Unsqueeze": _attr_to_input("axes", 1, 13),
    "Split": _attr_to_input("split", 1, 13),
    "Clip": _clip_v6,
    "Pad": _pad_v2,
    "Slice": _slice_v1,
    "Softmax": _softmax_family("Softmax"),
    "LogSoftmax": _softmax_family("LogSoftmax"),
    "Dropout": _dropout_old,
    "BatchNormalization": _batchnorm,
    **{op: _attr_to_input("axes", 1, since) for op, since in REDUCE_AXES_INPUT_SINCE.items()},
}


# -- 5. propagation ----------------------------------------------------------------------
def propagate(graph: Graph) -> None:
    """Fold all-constant nodes and give every value a static shape (see module doc)."""
    from .interpreter import try_fold  # the interpreter depends on ops only

    for original in list(graph.nodes):
        if original.op_type not in ops.OPS:
            raise UnsupportedOpError(f"unsupported op {original.op_type} "
                                     f"(node '{original.name}')")
        expanded = _expand_flattening_softmax(graph, original) \
            if "flatten_axis" in original.meta else [original]
        for node in expanded:
            if try_fold(graph, node):
                continue
            ops.infer_node(node)
            _check_against_onnx(graph, node)


def _check_against_onnx(graph: Graph, node: Node) -> None:
    """Record where onnx's shape inference and the op table disagree.

    The op table follows the operator spec, and onnx's inference has known gaps (e.g.
    MaxPool ceil_mode windows that start in the padding), so ours wins; the note makes a
    real bug of ours visible in the report.
    """
    for value in node.outputs:
        expected = value.meta.pop("onnx_shape", None)
        if expected is not None and tuple(expected[0]) != value.shape:
            graph.meta.setdefault("notes", []).append(
                f"{node.op_type} node '{node.name}': onnx shape inference says "
                f"{list(expected[0])} for '{value.name}', applec uses {list(value.shape)} "
                "(from the operator spec)")
