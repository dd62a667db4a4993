"""The op table: one entry per ONNX op applec supports.

Each entry (an `OpDef` subclass registered with `@register`) declares, in one place:
- `attrs`: the attributes it reads and their defaults (`REQUIRED` when there is none);
- `static_inputs`: input positions that must be compile-time constants (shapes, axes, pads);
- `infer(node)`: the shape/dtype rule, returning one `(shape, dtype)` per output;
- `reference(node, inputs)`: the numpy reference, returning one array per output.

Entries describe ONNX semantics in the canonical (newest-opset) form; the importer rewrites
older forms. The references are the interpreter (`applec.interpreter`) that folds constants
and serves as the oracle in pass tests. Lowerings live per target under `targets/`.

Shape errors name the op, the node and the shapes (see `OpDef.fail`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from ..errors import ShapeError, UnsupportedOpError
from ..ir import Node, Value

REQUIRED = object()

OPS: dict[str, "OpDef"] = {}


class OpDef:
    """Base of every op entry. Subclasses override `infer` and `reference`."""

    op_type: ClassVar[str] = ""
    attrs: ClassVar[dict[str, Any]] = {}
    static_inputs: ClassVar[tuple[int, ...]] = ()
    # False for ops whose constant inputs must reach the lowering as they are (a quantized
    # weight's dequantization is done by the target, not folded back to floats)
    foldable: ClassVar[bool] = True

    # -- the two rules ------------------------------------------------------------------
    def infer(self, node: Node) -> list[tuple[tuple[int, ...], np.dtype]]:
        raise NotImplementedError

    def reference(self, node: Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
        raise NotImplementedError

    # -- helpers for entries ------------------------------------------------------------
    def attr(self, node: Node, name: str):
        """The attribute's value on `node`, or its declared default."""
        if name in node.attrs:
            return node.attrs[name]
        default = self.attrs[name]
        if default is REQUIRED:
            self.fail(node, f"attribute '{name}' is required")
        return default

    def static(self, node: Node, index: int, default=None) -> np.ndarray | None:
        """The constant data of input `index` (None if omitted and default is None)."""
        value = node.input(index)
        if value is None:
            return None if default is None else np.asarray(default)
        if value.const is None:
            self.fail(node, f"input {index} ('{value.name}') must be a compile-time constant")
        return value.const

    def fail(self, node: Node, why: str):
        shapes = ", ".join(str(list(v.shape)) if v is not None and v.shape is not None
                           else "?" for v in node.inputs)
        raise ShapeError(f"{self.op_type} node '{node.name}': {why} (input shapes {shapes})")


def register(cls: type[OpDef]) -> type[OpDef]:
    """Class decorator: add an entry to OPS under `cls.op_type` (default: class name)."""
    if not cls.op_type:
        cls.op_type = cls.__name__
    if cls.op_type in OPS:
        raise RuntimeError(f"op {cls.op_type} registered twice")
    OPS[cls.op_type] = cls()
    return cls


def get(op_type: str, node: Node | None = None) -> OpDef:
    try:
        return OPS[op_type]
    except KeyError:
        where = f" (node '{node.name}')" if node is not None else ""
        raise UnsupportedOpError(f"unsupported op {op_type}{where}") from None


def infer_node(node: Node) -> None:
    """Set shape and dtype on every output of `node` from its op's rule."""
    results = get(node.op_type, node).infer(node)
    for value, (shape, dtype) in zip(node.outputs, results):
        value.shape = tuple(int(d) for d in shape)
        value.dtype = np.dtype(dtype)


def evaluate(node: Node, inputs: list[np.ndarray | None]) -> list[np.ndarray]:
    """Run the numpy reference of `node` on `inputs`, casting to the declared dtypes."""
    outs = get(node.op_type, node).reference(node, inputs)
    fixed = []
    for value, out in zip(node.outputs, outs):
        out = np.asarray(out)
        if value.dtype is not None and out.dtype != value.dtype:
            out = out.astype(value.dtype)
        fixed.append(out)
    return fixed


# -- shared shape rules ----------------------------------------------------------------
def broadcast_shapes(node: Node, *values: Value) -> tuple[int, ...]:
    try:
        return tuple(np.broadcast_shapes(*[v.shape for v in values]))
    except ValueError:
        get(node.op_type).fail(node, "shapes do not broadcast")


def normalize_axis(node: Node, axis: int, rank: int) -> int:
    if not -rank <= axis < max(rank, 1):
        get(node.op_type).fail(node, f"axis {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def as_ints(data) -> list[int] | None:
    """A shape/axes/pads input's data as a flat list of ints; None (omitted) stays None."""
    return None if data is None else [int(v) for v in np.asarray(data).reshape(-1)]


class Unary(OpDef):
    """Elementwise op with one input; output has the input's shape and dtype."""

    def infer(self, node):
        x = node.inputs[0]
        return [(x.shape, x.dtype)]


class Binary(OpDef):
    """Elementwise op with numpy broadcasting; output dtype is the first input's."""

    out_dtype: ClassVar[Any] = None  # e.g. bool for comparisons

    def infer(self, node):
        a, b = node.inputs[:2]
        return [(broadcast_shapes(node, a, b), self.out_dtype or a.dtype)]


# Importing the entry modules fills OPS.
from . import control, elementwise, fused, nn, qdq, quant, reduce, resize, rnn, tensor  # noqa: E402,F401
from . import activations  # noqa: E402,F401
from . import indexing  # noqa: E402,F401
from . import qoperator  # noqa: E402,F401
from . import spectral  # noqa: E402,F401
