"""IR -> MIL program, and MIL program -> a reproducible .mlpackage.

Precision is ours, not coremltools': with `fp16`, float inputs are cast to fp16 on entry,
float constants are stored as fp16 (saturated to the fp16 range, so -1e9 masks stay finite)
and float outputs are cast back to fp32. coremltools' default MIL pass pipeline is not run
(`PassPipeline.EMPTY`): what we build is what the bundle holds, op for op.

Mixed precision: a node whose `meta["precision"]` is "fp32" (set by fp16 safety, see
applec/fp16_safety.py) is lowered with fp32 constants and parameters in an fp16 program;
its float inputs are cast to fp32 and its fp32 results cast back to fp16 only where an fp16
op reads them (`Lowerer.get`), so values passed between fp32 ops never go through fp16.

Dtypes CoreML lacks are narrowed here: int64 (and other ints) become int32, with constants
saturated to the int32 range and each saturation recorded; bool tensors may live inside
the program but cross its boundary as int32.

The per-op rules are in `rules.py`; each rule binds the MIL var of every IR output, and the
lowerer checks that the var's shape is the IR's, so a wrong rule fails at compile time
naming the node.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from applec.errors import ApplecError, LoweringError, ModelError, UnsupportedOpError
from applec.ir import Graph, Node, Value, unique_name

FP16_MAX = float(np.finfo(np.float16).max)
INT32_MIN, INT32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max

# words coremltools' name sanitizer renames (to "<word>_workaround") even in an empty pass
# pipeline (`passes/defs/preprocess.py`); a feature must keep the name the manifest gives
MIL_RESERVED = frozenset({
    "any", "bool", "program", "func", "tensor", "list", "dict", "tuple", "true", "false",
    "string", "bf16", "fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8",
    "uint16", "uint32", "uint64", "state"})

# dtype a tensor has at the program boundary, keyed by the IR dtype's kind
BOUNDARY = {"f": "fp32", "i": "int32", "u": "int32", "b": "int32"}


@dataclass
class Port:
    """One program input or output: the ONNX tensor name and its CoreML feature."""

    tensor: str
    feature: str
    dtype: str  # the CoreML dtype at the boundary: fp32 | int32
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        return {"tensor": self.tensor, "feature": self.feature, "dtype": self.dtype,
                "shape": list(self.shape)}


@dataclass
class Lowered:
    program: object
    inputs: list[Port]
    outputs: list[Port]
    mil_ops: dict[str, list[str]] = field(default_factory=dict)  # IR node -> MIL op types
    notes: list[str] = field(default_factory=list)


class Lowerer:
    """State of one lowering: IR value -> MIL var, names, dtypes."""

    def __init__(self, graph: Graph, precision: str, opset=None):
        from coremltools.converters.mil import Builder as mb

        self.mb = mb
        self.graph = graph
        self.precision = precision
        self.opset = opset  # a coremltools target (ct.target.iOS18, ...): rules may ask
        self.float_dtype = np.float16 if precision == "fp16" else np.float32
        self.vars: dict[int, object] = {}
        self.consts: dict[tuple, object] = {}   # (IR value, float type) -> MIL const
        self.casts: dict[tuple, object] = {}    # (IR value, fp16|fp32) -> MIL cast
        self.names: set[str] = set()
        self.notes: list[str] = []
        self.node: Node | None = None

    # -- names and dtypes ---------------------------------------------------------------
    def unique(self, base: str) -> str:
        name = re.sub(r"\W", "_", base) or "v"
        if name[0].isdigit():
            name = "v_" + name
        if name in MIL_RESERVED:  # coremltools would rename it behind the manifest's back
            name += "_"
        return unique_name(name, self.names)

    def tmp(self, suffix: str) -> str:
        """A fresh name for a helper op of the current node."""
        return self.unique(f"{self.node.name}__{suffix}")

    def mil_dtype(self, dtype: np.dtype) -> np.dtype:
        kind = np.dtype(dtype).kind
        if kind == "f":
            return np.dtype(self.float_dtype)
        if kind == "b":
            return np.dtype(bool)
        if kind in "iu":
            return np.dtype(np.int32)
        raise UnsupportedOpError(f"dtype {dtype} has no CoreML equivalent")

    def mil_dtype_name(self, dtype: np.dtype) -> str:
        return {"float16": "fp16", "float32": "fp32", "int32": "int32",
                "bool": "bool"}[self.mil_dtype(dtype).name]

    # -- values -------------------------------------------------------------------------
    def array(self, array: np.ndarray, name: str = "const") -> np.ndarray:
        """Constant data narrowed to what CoreML holds (see module doc)."""
        array = np.asarray(array)
        target = self.mil_dtype(array.dtype)
        if array.dtype.kind == "f" and target == np.float16 and array.size:
            # one pass over the weights in the common case: min/max ignore nothing, but
            # an infinite extreme just sends us to the slower exact path
            if max(-float(array.min()), float(array.max())) > FP16_MAX:
                finite = np.isfinite(array)
                if np.any(np.abs(array[finite]) > FP16_MAX):
                    self.notes.append(f"{name}: float values beyond the fp16 range "
                                      f"saturated to +-{FP16_MAX:g}")
                    array = np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array)
        elif array.dtype.kind in "iu" and array.dtype != np.int32 and array.size:
            low, high = array.min(), array.max()
            if low < INT32_MIN or high > INT32_MAX:
                self.notes.append(f"{name}: integer values beyond the int32 range saturated")
                array = np.clip(array, INT32_MIN, INT32_MAX)
        return array.astype(target)

    def get(self, value: Value):
        """The MIL var (or constant array) for an IR value, in the current node's float type:
        a float var of the other type is cast once, and the cast reused (mixed precision)."""
        if value.is_const:
            key = (id(value), np.dtype(self.float_dtype).name)
            if key not in self.consts:
                data = self.array(value.const, value.name)
                self.consts[key] = self.mb.const(val=data, name=self.unique(value.name))
            return self.consts[key]
        try:
            var = self.vars[id(value)]
        except KeyError:
            raise ModelError(f"internal error: '{value.name}' lowered before it is defined") \
                from None
        if value.dtype.kind != "f" or self.precision == "fp32":
            return var
        want = "fp16" if self.float_dtype == np.float16 else "fp32"
        if var.dtype.__name__ == want:
            return var
        key = (id(value), want)
        if key not in self.casts:
            self.casts[key] = self.mb.cast(x=var, dtype=want,
                                           name=self.unique(f"{value.name}__{want}"))
        return self.casts[key]

    def const(self, array, dtype=None):
        """A constant argument for a helper op (dtype as given, else narrowed)."""
        array = np.asarray(array)
        return array.astype(dtype) if dtype is not None else self.array(array)

    def scalar(self, number: float):
        """A float scalar parameter in the compute dtype (MIL requires it to match)."""
        return self.float_dtype(number)

    def bind(self, value: Value, var) -> None:
        shape = tuple(int(d) for d in var.shape)
        if shape != value.shape:
            raise ModelError(f"internal error: lowering {self.node.op_type} node "
                             f"'{self.node.name}' gives shape {list(shape)} for "
                             f"'{value.name}', IR says {list(value.shape)}")
        self.vars[id(value)] = var

    def out_name(self, index: int = 0) -> str:
        return self.unique(self.node.outputs[index].name)


def lower_to_program(graph: Graph, precision: str, opset) -> Lowered:
    """Build the MIL program for the whole `graph` (one CoreML partition)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    from .rules import RULES

    lw = Lowerer(graph, precision, opset)
    keep_fp32 = graph.meta.get("fp32_inputs", set())   # fp16 safety: inputs fp16 cannot hold
    specs, inputs = {}, []
    for value in graph.inputs:
        feature = lw.unique(value.name)
        boundary = BOUNDARY.get(value.dtype.kind)
        if boundary is None:
            raise UnsupportedOpError(f"input '{value.name}' has dtype {value.dtype}, which "
                                     "CoreML cannot take")
        shape = value.shape or (1,)  # CoreML has no rank-0 inputs: scalars cross as [1]
        specs[feature] = mb.placeholder(shape=shape, dtype=getattr(types, boundary))
        inputs.append(Port(value.name, feature, boundary, shape))
    # Output features get their ONNX names; the ops computing them get suffixed names.
    out_features = [lw.unique(value.name) for value in graph.outputs]
    mil_ops: dict[str, list[str]] = {}
    with Function(specs, opset_version=opset) as func:
        for port, value in zip(inputs, graph.inputs):
            var = func.inputs[port.feature]
            want = lw.mil_dtype_name(value.dtype)
            if not value.shape:
                var = mb.squeeze(x=var, name=lw.unique(port.feature + "__scalar"))
            if want != port.dtype and value.name not in keep_fp32:
                var = mb.cast(x=var, dtype=want, name=lw.unique(port.feature + "__in"))
            lw.vars[id(value)] = var
        for node in graph.nodes:
            before = len(func.operations)
            lower_node(lw, node, RULES)
            # the ops it appended, read from the end: a list of all of them per node would
            # make lowering quadratic in the program's size
            added = itertools.islice(reversed(func.operations), len(func.operations) - before)
            mil_ops[node.name] = [op.op_type for op in added if op.op_type != "const"][::-1]
        outputs, out_vars = [], []
        for feature, value in zip(out_features, graph.outputs):
            boundary = BOUNDARY[value.dtype.kind]
            # as computed: an fp32 result (fp16 safety) goes out without an fp16 round trip
            var = lw.vars[id(value)] if id(value) in lw.vars else lw.get(value)
            shape = value.shape or (1,)
            cast = var.dtype != getattr(types, boundary)
            if not value.shape:
                var = mb.reshape(x=var, shape=[1], name=lw.unique(feature + "__vec")
                                 if cast else feature)
            if cast:
                var = mb.cast(x=var, dtype=boundary, name=feature)
            elif value.shape:
                var = mb.identity(x=var, name=feature)
            out_vars.append(var)
            outputs.append(Port(value.name, feature, boundary, shape))
        func.set_outputs(out_vars)
    program = Program()
    program.add_function("main", func)
    return Lowered(program, inputs, outputs, mil_ops, lw.notes)


def lower_node(lw: Lowerer, node: Node, rules) -> None:
    """Run `node`'s rule in the current MIL block (the function's, or a cond branch's)."""
    rule = rules.get(node.op_type)
    if rule is None:
        raise UnsupportedOpError(f"op {node.op_type} (node '{node.name}') has no "
                                 "CoreML lowering")
    outer, lw.node = lw.node, node
    program_dtype = lw.float_dtype
    if node.meta.get("precision") == "fp32":   # fp16 safety: this op computes in fp32
        lw.float_dtype = np.float32
    try:
        rule(lw, node)
    except ApplecError:
        raise
    except Exception as exc:  # coremltools refusing what a rule built: our bug
        text = (str(exc).strip() or type(exc).__name__).splitlines()[0][:300]
        raise LoweringError(f"cannot lower {node.op_type} node '{node.name}' to "
                            f"CoreML: {text} (an applec bug: please report it)") from exc
    finally:
        lw.node = outer
        lw.float_dtype = program_dtype


# -- .mlpackage writing ------------------------------------------------------------------
def write_mlpackage(lowered: Lowered, target, path: Path, *, description: str) -> None:
    """Convert the MIL program and save it at `path`, byte-for-byte reproducibly.

    coremltools stamps the conversion date into the model metadata and random UUIDs into
    Manifest.json; we drop the date and derive the UUIDs from the package's content.
    """
    import coremltools as ct
    from coremltools.proto import Model_pb2

    # coremltools draws a progress bar per (empty) pass pipeline on stderr, and runs a full
    # gc.collect() per conversion: with the heap frozen that scan costs ~0 instead of
    # ~0.15 s (ten times a small model's whole compile)
    gc.freeze()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            # package_dir: written in place, not built in a temp dir and copied by save()
            ct.convert(lowered.program, convert_to="mlprogram",
                       minimum_deployment_target=target,
                       compute_precision=ct.precision.FLOAT32,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True,
                       package_dir=str(path))
    finally:
        gc.unfreeze()
    data = path / "Data" / "com.apple.CoreML"
    spec = Model_pb2.Model()
    spec.ParseFromString((data / "model.mlmodel").read_bytes())
    meta = spec.description.metadata
    meta.userDefined.pop("com.github.apple.coremltools.conversion_date", None)
    meta.userDefined["com.github.apple.coremltools.source"] = "applec"
    meta.shortDescription = description
    (data / "model.mlmodel").write_bytes(spec.SerializeToString(deterministic=True))
    _write_manifest(path, data)
    for file in path.rglob("*"):
        os.chmod(file, 0o755 if file.is_dir() else 0o644)


def _write_manifest(path: Path, data: Path) -> None:
    digest = hashlib.sha256((data / "model.mlmodel").read_bytes()).hexdigest()
    model_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"applec:model:{digest}")).upper()
    weights_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"applec:weights:{digest}")).upper()
    entries = {
        model_id: {"author": "com.apple.CoreML", "description": "CoreML Model Specification",
                   "name": "model.mlmodel", "path": "com.apple.CoreML/model.mlmodel"},
    }
    if (data / "weights").is_dir():
        entries[weights_id] = {"author": "com.apple.CoreML",
                               "description": "CoreML Model Weights", "name": "weights",
                               "path": "com.apple.CoreML/weights"}
    manifest = {"fileFormatVersion": "1.0.0", "itemInfoEntries": entries,
                "rootModelIdentifier": model_id}
    (path / "Manifest.json").write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n")
