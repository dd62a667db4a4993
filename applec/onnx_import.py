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
   static shape from the op table, checked against onnx's inference where it has one. An
   If whose condition is constant by then is replaced by its taken branch; the branches of
   the others are propagated in turn; a Loop or Scan is unrolled (`applec.control_flow`).

Graph inputs that also have an initializer are treated as constants (the ONNX spec lets a
runtime override them; a compiled bundle does not).

Ops come from the ONNX domain, and from onnxruntime's com.microsoft domain those the op
table has (keyed '<domain>.<op_type>', see `op_key` and applec/ops/qoperator.py); any
other op fails at import with an UnsupportedOpError naming it with its domain.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from . import control_flow, ops
from .errors import ModelError, ShapeError, UnsupportedOpError
from .ir import Graph, Node, Value, unique_name
from .ops.qoperator import CONTRIB_ALIASES, CONTRIB_DOMAINS

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
    _stand_in_deprecated(light)
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: invalid ONNX model: {_first_line(exc)}") from None
    try:
        return onnx.shape_inference.infer_shapes(light, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"{path}: onnx shape inference failed: {_first_line(exc)}") from None


# Old forms onnx's checker refuses as deprecated, though they are valid at their opset,
# onnxruntime runs them and the importer rewrites them (CANONICAL_REWRITES): op -> the
# opset of the form that replaced it.
DEPRECATED_FORMS = {"GroupNormalization": 21}


def _stand_in_deprecated(light: onnx.ModelProto) -> None:
    """In the copy that onnx checks, an old-form node becomes Identity of its first input:
    the same output type and shape, all that checking and inference need from it."""
    opset = opset_of(light)
    for node in _all_nodes(light.graph):
        if node.domain in ONNX_DOMAINS and opset < DEPRECATED_FORMS.get(node.op_type, 0):
            node.op_type = "Identity"
            del node.input[1:]
            del node.attribute[:]


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
    for node in _all_nodes(model.graph):
        if node.domain not in ONNX_DOMAINS:
            key = f"{node.domain}.{node.op_type}"
            if node.domain in CONTRIB_DOMAINS and op_key(node) in ops.OPS:
                continue
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


def op_key(node: onnx.NodeProto) -> str:
    """The op table key of an ONNX node: its op_type in the ONNX domain, else
    '<domain>.<op_type>' (an onnxruntime contrib op an ONNX op also is: that op)."""
    if node.domain in ONNX_DOMAINS:
        return node.op_type
    key = f"{node.domain}.{node.op_type}"
    return CONTRIB_ALIASES.get(key, key)


def _all_nodes(graph: onnx.GraphProto):
    """Every node of `graph` and of its subgraphs (If branches), depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub)


class _Builder:
    """Walks one ONNX graph and emits IR nodes in canonical form.

    A branch of an If gets a child builder with its own IR graph: a name it does not define
    is looked up in the enclosing builders; an outer constant is shared as a branch
    constant, any other outer value becomes a branch input (a capture), bound by the If.
    """

    def __init__(self, model: onnx.ModelProto, inferred: onnx.ModelProto, opset: int,
                 parent: _Builder | None = None, graph_name: str = "", prefix: str = ""):
        self.model = model
        self.inferred_model = inferred
        self.opset = opset
        self.parent = parent
        self.prefix = prefix  # qualifies a branch's node names that clash in the report
        self.graph = Graph(graph_name or model.graph.name or "main")
        self.values: dict[str, Value] = {}
        self.captures: list[Value] = []  # the outer value bound to each graph input
        self.inferred: dict[str, tuple[tuple[int, ...], np.dtype]] = \
            parent.inferred if parent else {}
        self.report_names: set[str] = parent.report_names if parent else set()
        report: dict[str, dict] = {}
        self.graph.meta["report"] = report

    def build(self) -> Graph:
        g = self.model.graph
        self._collect_inferred(self.inferred_model.graph)
        self._initializers(g)
        for value in g.input:
            if value.name in self.values:
                continue
            tensor_type = value.type.tensor_type
            shape = tuple(d.dim_value for d in tensor_type.shape.dim)
            self.values[value.name] = self.graph.add_input(
                value.name, onnx_dtype(tensor_type.elem_type), shape)
        self._body(g)
        return self.graph

    def _initializers(self, g: onnx.GraphProto) -> None:
        for init in g.initializer:
            self.values[init.name] = Value(init.name, const=self._array(init))
            self.graph.reserve_name(init.name)

    def _body(self, g: onnx.GraphProto) -> None:
        for index, node in enumerate(g.node):
            self._node(node, index)
        for value in g.output:
            found = self._lookup(value.name)
            if found is None:
                raise ModelError(f"graph output '{value.name}' is not produced by any node")
            self.graph.outputs.append(found)

    def _lookup(self, name: str) -> Value | None:
        """The value called `name` here, capturing it from an enclosing graph if needed."""
        if name in self.values:
            return self.values[name]
        outer = self.parent._lookup(name) if self.parent is not None else None
        if outer is None:
            return None
        if outer.is_const:
            value = Value(name, const=outer.const)  # the same array, no copy
        else:
            value = Value(name, outer.dtype, outer.shape)
            self.graph.inputs.append(value)
            self.captures.append(outer)
        self.graph.reserve_name(name)
        self.values[name] = value
        return value

    def _collect_inferred(self, g: onnx.GraphProto) -> None:
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
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    self._collect_inferred(attr.g)

    @staticmethod
    def _array(tensor: onnx.TensorProto) -> np.ndarray:
        try:
            return numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelError(f"tensor '{tensor.name}' cannot be read: {_first_line(exc)}") \
                from None

    def _report_name(self, proto: onnx.NodeProto, index: int) -> str:
        """The node's report key: its ONNX name, qualified when a branch reuses one."""
        name = proto.name or f"{self.prefix}{proto.op_type}_{index}"
        if name in self.report_names:
            name = f"{self.prefix}{name}"
        return unique_name(name, self.report_names)

    def _node(self, proto: onnx.NodeProto, index: int) -> None:
        name = self._report_name(proto, index)
        attrs = {a.name: self._attr(a, name) for a in proto.attribute}
        self.graph.meta["report"][name] = {"op_type": proto.op_type, "status": "imported",
                                           "index": index}
        if proto.op_type == "Constant":
            self._constant(proto, name, attrs)
            return
        inputs = []
        for input_name in proto.input:
            value = self._lookup(input_name) if input_name else None
            if input_name and value is None:
                raise ModelError(f"node '{name}' ({proto.op_type}) reads '{input_name}', "
                                 "which no earlier node produces")
            inputs.append(value)
        outputs = []
        for output_name in proto.output:
            value = Value(output_name or self.graph.fresh_name(f"{name}_unused"))
            self.graph.reserve_name(value.name)
            if output_name in self.inferred:
                value.meta["onnx_shape"] = self.inferred[output_name]
            outputs.append(value)
        rewrite = CANONICAL_REWRITES.get(proto.op_type)
        if proto.op_type == "If":
            node = self._if(name, inputs, outputs, attrs)
        elif proto.op_type in ("Loop", "Scan"):
            node = self._loop(proto.op_type, name, inputs, outputs, attrs)
        elif any(isinstance(v, onnx.GraphProto) for v in attrs.values()):
            raise UnsupportedOpError(f"node '{name}' ({proto.op_type}): subgraph attributes "
                                     "are supported on If, Loop and Scan only")
        elif rewrite is not None:
            node = rewrite(self, name, inputs, outputs, attrs)
        else:
            node = self.graph.add_node(op_key(proto), inputs, attrs, name=name, outputs=outputs)
        node.meta["onnx_node"] = name
        for output_name, value in zip(proto.output, outputs):
            if output_name:
                self.values[output_name] = value

    def _if(self, name, inputs, outputs, attrs) -> Node:
        """If: each branch becomes an IR graph; the node binds cond, then their captures."""
        branches, captures = {}, []
        for key in ("then_branch", "else_branch"):
            proto = attrs.get(key)
            if not isinstance(proto, onnx.GraphProto):
                raise ModelError(f"If node '{name}' has no {key}")
            if len(proto.input):
                raise ModelError(f"If node '{name}': {key} declares inputs")
            child = _Builder(self.model, self.inferred_model, self.opset, parent=self,
                             graph_name=f"{name}/{key}", prefix=f"{name}/{key}/")
            child._initializers(proto)
            child._body(proto)
            branches[key] = child.graph
            captures += child.captures
        return self.graph.add_node("If", [inputs[0], *captures], branches, name=name,
                                   outputs=outputs)

    def _loop(self, op_type, name, inputs, outputs, attrs) -> Node:
        """Loop, Scan: the body's IR graph takes its declared inputs, then its captures,
        which the node binds after its own inputs (see `applec.ops.control`). An opset-8
        Scan (a batch axis first, no sequence_lens) keeps its form, marked `batched`."""
        proto = attrs.get("body")
        if not isinstance(proto, onnx.GraphProto):
            raise ModelError(f"{op_type} node '{name}' has no body")
        if op_type == "Scan" and self.opset_below(9):
            if inputs and inputs[0] is not None:
                raise UnsupportedOpError(f"Scan node '{name}' (opset {self.opset}): "
                                         "sequence_lens is not supported")
            inputs = inputs[1:]
            attrs["batched"] = True
            if "directions" in attrs:
                attrs["scan_input_directions"] = attrs.pop("directions")
        child = _Builder(self.model, self.inferred_model, self.opset, parent=self,
                         graph_name=f"{name}/body", prefix=f"{name}/body/")
        child._initializers(proto)
        for info in proto.input:  # an untyped one takes the type of what it is bound to
            kind = info.type.WhichOneof("value")
            if kind not in (None, "tensor_type"):
                raise UnsupportedOpError(f"{op_type} node '{name}': body input '{info.name}' "
                                         f"holds {kind} values; only tensors are supported")
            tensor_type = info.type.tensor_type
            dims = [d.dim_value if d.HasField("dim_value") else -1
                    for d in tensor_type.shape.dim]
            shape = dims if tensor_type.HasField("shape") and min(dims, default=0) >= 0 \
                else None
            dtype = onnx_dtype(tensor_type.elem_type) if tensor_type.elem_type else None
            child.values[info.name] = child.graph.add_input(info.name, dtype, shape)
        child._body(proto)
        attrs.update(body=child.graph, num_captures=len(child.captures))
        if op_type == "Loop":
            inputs = list(inputs) + [None] * (2 - len(inputs))  # M and cond may be absent
        return self.graph.add_node(op_type, [*inputs, *child.captures], attrs, name=name,
                                   outputs=outputs)

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
        if attr.type == onnx.AttributeProto.GRAPH:
            return attr.g  # If turns it into an IR graph; any other op is refused
        if attr.type == onnx.AttributeProto.GRAPHS:
            raise UnsupportedOpError(f"node '{node_name}': attribute '{attr.name}' holds a "
                                     "list of subgraphs, which is not supported")
        value = helper.get_attribute_value(attr)
        if isinstance(value, onnx.TensorProto):
            return self._array(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, list) and value and isinstance(value[0], bytes):
            return [v.decode("utf-8", errors="replace") for v in value]
        if attr.name in ("to", "dtype", "output_datatype") and \
                attr.type == onnx.AttributeProto.INT:
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
    # outputs past the first are training-only statistics; inference graphs never read them
    return b.graph.add_node("BatchNormalization", inputs, attrs, name=name,
                            outputs=outputs[:1])


def _group_norm_per_group(b: _Builder, name, inputs, outputs, attrs):
    """GroupNormalization before opset 21 scales and shifts per group: scale and bias [G]
    become per-channel [C], each repeated C / G times. C is read with Shape, so the helper
    nodes fold to constants once shapes are known (a run-time scale keeps them)."""
    groups = attrs.get("num_groups")
    if b.opset_below(21) and groups is not None and len(inputs) == 3:
        g = b.graph
        helpers = [g.add_node("Shape", [inputs[0]], {"start": 1, "end": 2},
                              name=f"{name}_channels")]
        helpers.append(g.add_node("Div", [helpers[-1].outputs[0], b.const(
            np.asarray([groups], np.int64), f"{name}_groups")], name=f"{name}_group_size"))
        helpers.append(g.add_node("Concat", [b.const(np.asarray([1], np.int64), f"{name}_one"),
                                             helpers[-1].outputs[0]], {"axis": 0},
                                  name=f"{name}_reps"))
        reps = helpers[-1].outputs[0]
        per_channel = []
        for value in inputs[1:]:
            helpers.append(g.add_node("Unsqueeze", [value, b.const(
                np.asarray([1], np.int64), f"{name}_axis")], name=f"{name}_column"))
            helpers.append(g.add_node("Tile", [helpers[-1].outputs[0], reps],
                                      name=f"{name}_tiled"))
            helpers.append(g.add_node("Reshape", [helpers[-1].outputs[0], b.const(
                np.asarray([-1], np.int64), f"{name}_flat")], name=f"{name}_per_channel"))
            per_channel.append(helpers[-1].outputs[0])
        for helper in helpers:
            helper.meta["onnx_node"] = name
        inputs = [inputs[0], *per_channel]
    return b.graph.add_node("GroupNormalization", inputs, attrs, name=name, outputs=outputs)


def _scatter_v9(b: _Builder, name, inputs, outputs, attrs):
    """Scatter (deprecated in opset 11) is ScatterElements without a reduction."""
    return b.graph.add_node("ScatterElements", inputs, attrs, name=name, outputs=outputs)


def _grid_sample_v16(b: _Builder, name, inputs, outputs, attrs):
    """GridSample-16 names its modes bilinear and bicubic; opset 20 linear and cubic."""
    if "mode" in attrs:
        attrs["mode"] = {"bilinear": "linear", "bicubic": "cubic"}.get(attrs["mode"],
                                                                       attrs["mode"])
    return b.graph.add_node("GridSample", inputs, attrs, name=name, outputs=outputs)


def _resize_legacy(b: _Builder, name, inputs, outputs, attrs):
    """Upsample (opsets 7-9) and Resize-10 -> Resize: scales become input 2; coordinates
    are asymmetric; nearest rounds as onnxruntime did before nearest_mode existed
    (truncate when upsampling, ceil when downsampling: floor and ceil on x >= 0)."""
    op_type = b.graph.meta["report"][name]["op_type"]
    if op_type == "Resize" and not b.opset_below(11):
        return b.graph.add_node("Resize", inputs, attrs, name=name, outputs=outputs)
    mode = {"bilinear": "linear"}.get(attrs.get("mode", "nearest"), attrs.get("mode", "nearest"))
    if "scales" in attrs:
        scales = b.const(np.asarray(attrs["scales"], np.float32), f"{name}_scales")
    else:
        scales = inputs[1]
    new_attrs = {"mode": mode, "coordinate_transformation_mode": "asymmetric"}
    if mode == "nearest":
        if scales is None or not scales.is_const:
            raise UnsupportedOpError(f"{op_type} node '{name}' (opset {b.opset}): its scales "
                                     "must be a constant to pick the rounding")
        values = np.asarray(scales.const, np.float32).reshape(-1)
        if np.all(values >= 1):
            new_attrs["nearest_mode"] = "floor"
        elif np.all(values <= 1):
            new_attrs["nearest_mode"] = "ceil"
        else:
            raise UnsupportedOpError(f"{op_type} node '{name}' (opset {b.opset}): nearest "
                                     "resizing that both up- and downsamples rounds per axis")
    return b.graph.add_node("Resize", [inputs[0], None, scales, None], new_attrs, name=name,
                            outputs=outputs)


def _dft_v17(b: _Builder, name, inputs, outputs, attrs):
    """Before opset 20 DFT's axis is an attribute (default 1); since, input 2 (default -2)."""
    if b.opset_below(20):
        axis = b.const(np.int64(attrs.pop("axis", 1)), f"{name}_axis")
        inputs = (list(inputs) + [None, None])[:2] + [axis]
    return b.graph.add_node("DFT", inputs, attrs, name=name, outputs=outputs)


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
    "Resize": _resize_legacy,
    "Upsample": _resize_legacy,
    "DFT": _dft_v17,
    "Hardmax": _softmax_family("Hardmax"),
    "GroupNormalization": _group_norm_per_group,
    "Scatter": _scatter_v9,
    "GridSample": _grid_sample_v16,
    **{op: _attr_to_input("axes", 1, since) for op, since in REDUCE_AXES_INPUT_SINCE.items()},
}


# -- 5. propagation ----------------------------------------------------------------------
UNROLLED = {"Loop": control_flow.propagate_loop, "Scan": control_flow.propagate_scan}


def propagate(graph: Graph, nodes: list[Node] | None = None) -> None:
    """Fold all-constant nodes and give every value a static shape (see module doc); only
    `nodes` of `graph` when given (a Loop's copies of its body, one iteration at a time).

    An If whose condition is constant by now is replaced by its taken branch, which is
    then propagated like the rest; any other If has its branches propagated first. A Loop
    or Scan is unrolled, each copy of its body propagated before the next.
    """
    from .interpreter import try_fold  # the interpreter depends on ops only

    pending = deque(graph.nodes if nodes is None else nodes)
    while pending:
        original = pending.popleft()
        if original.op_type not in ops.OPS:
            raise UnsupportedOpError(f"unsupported op {original.op_type} "
                                     f"(node '{original.name}')")
        if original.op_type == "If":
            inlined = control_flow.propagate_if(graph, original, propagate)
            if inlined is not None:
                pending.extendleft(reversed(inlined))
                continue
        if original.op_type in UNROLLED:
            UNROLLED[original.op_type](graph, original, propagate)
            continue
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
