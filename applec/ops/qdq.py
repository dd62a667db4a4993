"""Op table entries for ONNX quantization: QuantizeLinear, DequantizeLinear,
DynamicQuantizeLinear, ConvInteger, MatMulInteger.

Canonical form is the newest opset's (QuantizeLinear/DequantizeLinear 23+: `axis`,
`block_size`, `output_dtype`, `precision`); older opsets are subsets with the same
defaults, so the importer rewrites nothing. A scale (and its zero point) is laid out one of
three ways, `param_layout` tells which:
- per tensor: one element (rank 0, or a 1-element vector);
- per axis: a vector of x.shape[axis] entries;
- blocked (opset 21, block_size > 0): x's rank, with ceil(x.shape[axis] / block_size)
  entries along `axis`; the last block may be short.

    QuantizeLinear(x, s, zp?)   = saturate(rint(x / s) + zp)   (rint: half to even)
    DequantizeLinear(x, s, zp?) = (float32(x) - zp) * s
    DynamicQuantizeLinear(x)    = uint8 y, scale, zero point from min(0, x) .. max(0, x)

Quantized types: int8/uint8, int16/uint16, int4/uint4 and int2/uint2 (the last four held in
ml_dtypes' types, as onnx reads them); DequantizeLinear also takes int32 (biases). float8
and float4 are refused (UnsupportedOpError): neither numpy nor CoreML has arithmetic for
them. The references match onnxruntime: QuantizeLinear saturates instead of wrapping, and
DynamicQuantizeLinear takes scale 1 for an all-zero input.

DequantizeLinear is `foldable = False`: a dequantized constant weight must reach
`passes/fold_qdq_weights.py`, which keeps it compressed (applec.DequantizeWeight) instead
of folding it into a float copy; that pass folds the other constant DequantizeLinears.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from ..errors import UnsupportedOpError
from . import OpDef, normalize_axis, register
from .nn import Conv, ConvBase, window_geometry

# the integer range of each quantized type, by numpy/ml_dtypes dtype name
QUANT_RANGES = {
    "uint8": (0, 255), "int8": (-128, 127), "uint16": (0, 65535), "int16": (-32768, 32767),
    "uint4": (0, 15), "int4": (-8, 7), "uint2": (0, 3), "int2": (-2, 1),
}
INT32_RANGE = (-(1 << 31), (1 << 31) - 1)  # DequantizeLinear of a quantized bias

# `output_dtype` / `precision` attributes arrive as onnx TensorProto.DataType numbers
TENSOR_TYPES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32",
                10: "float16", 16: "bfloat16", 17: "float8_e4m3fn", 18: "float8_e4m3fnuz",
                19: "float8_e5m2", 20: "float8_e5m2fnuz", 21: "uint4", 22: "int4",
                23: "float4_e2m1fn", 24: "float8_e8m0fnu", 25: "uint2", 26: "int2"}
NUMPY_NAMES = {"float32", "float16", "uint8", "int8", "uint16", "int16", "int32"}


def dtype_named(name: str) -> np.dtype:
    if name in NUMPY_NAMES:
        return np.dtype(name)
    import ml_dtypes  # onnx's own dependency; the 4- and 2-bit ints and bfloat16 live here

    return np.dtype(getattr(ml_dtypes, name))


def tensor_type(op: OpDef, node, attr: str) -> np.dtype | None:
    code = int(op.attr(node, attr) or 0)
    if not code:
        return None
    if code not in TENSOR_TYPES:
        op.fail(node, f"{attr} {code} is not a tensor type this op takes")
    return dtype_named(TENSOR_TYPES[code])


def quant_range(op: OpDef, node, dtype: np.dtype, int32_ok: bool = False) -> tuple[int, int]:
    """The integer range of a quantized type; float8/float4 are UnsupportedOpError."""
    if int32_ok and dtype == np.int32:
        return INT32_RANGE
    if dtype.name in QUANT_RANGES:
        return QUANT_RANGES[dtype.name]
    raise UnsupportedOpError(f"{op.op_type} node '{node.name}': quantized type {dtype} is not "
                             "supported (CoreML and numpy have no arithmetic for it)")


def as_int(array: np.ndarray) -> np.ndarray:
    """Quantized data as plain numpy ints (ml_dtypes' int4/int2 have no numpy arithmetic)."""
    narrow = array.dtype.kind not in "biuf" and array.dtype.name in QUANT_RANGES
    return array.astype(np.int32) if narrow else array


# -- scale / zero point layout ----------------------------------------------------------
def param_layout(op: OpDef, node, x_shape, p_shape, axis: int, block: int) -> str:
    """'tensor', 'axis' or 'block' for a scale/zero point of shape `p_shape` (module doc)."""
    rank = len(x_shape)
    if block > 0:
        axis = normalize_axis(node, axis, rank)
        want = tuple(-(-d // block) if i == axis else d for i, d in enumerate(x_shape))
        if tuple(p_shape) != want:
            op.fail(node, f"blocked scale/zero point must be {list(want)} (block_size {block} "
                          f"along axis {axis}), not {list(p_shape)}")
        return "block"
    if len(p_shape) <= 1 and math.prod(p_shape) == 1:
        return "tensor"
    if len(p_shape) == 1 and rank and p_shape[0] == x_shape[normalize_axis(node, axis, rank)]:
        return "axis"
    op.fail(node, f"scale/zero point of shape {list(p_shape)} is neither one value nor one "
                  f"per entry of axis {axis}")


def expand_param(param: np.ndarray, x_shape, layout: str, axis: int, block: int) -> np.ndarray:
    """`param` reshaped (per tensor, per axis) or repeated (blocked) to broadcast to x."""
    rank = len(x_shape)
    if layout == "tensor":
        return param.reshape(())
    axis %= rank
    if layout == "axis":
        return param.reshape([-1 if i == axis else 1 for i in range(rank)])
    return np.repeat(param, block, axis=axis).take(range(x_shape[axis]), axis=axis)


class QuantBase(OpDef):
    """Shared by QuantizeLinear and DequantizeLinear: scale and zero-point checks."""

    attrs: ClassVar[dict[str, Any]] = {"axis": 1, "block_size": 0, "saturate": 1,
                                       "output_dtype": 0, "precision": 0}

    def layout(self, node) -> str:
        x, scale, zero = node.inputs[0], node.inputs[1], node.input(2)
        axis, block = self.attr(node, "axis"), int(self.attr(node, "block_size"))
        if block < 0:
            self.fail(node, f"block_size must be >= 0, not {block}")
        layout = param_layout(self, node, x.shape, scale.shape, axis, block)
        if zero is not None and zero.shape != scale.shape and not (
                layout == "tensor" and zero.size == 1 and len(zero.shape) <= 1):
            self.fail(node, f"zero point {list(zero.shape)} must have the scale's shape "
                            f"{list(scale.shape)}")
        return layout

    def expanded(self, node, x_shape, param: np.ndarray) -> np.ndarray:
        axis, block = self.attr(node, "axis"), int(self.attr(node, "block_size"))
        layout = param_layout(self, node, x_shape, param.shape, axis, block)
        return expand_param(param, x_shape, layout, axis, block)


@register
class QuantizeLinear(QuantBase):
    """`saturate` concerns float8 outputs only, which are refused."""

    def out_dtype(self, node) -> np.dtype:
        zero, wanted = node.input(2), tensor_type(self, node, "output_dtype")
        if zero is not None and wanted is not None and zero.dtype != wanted:
            self.fail(node, f"output_dtype {wanted} differs from the zero point's {zero.dtype}")
        return zero.dtype if zero is not None else wanted or np.dtype(np.uint8)

    def infer(self, node):
        x, scale = node.inputs[:2]
        if x.dtype.kind != "f" or scale.dtype.kind != "f":
            self.fail(node, f"x and scale must be float, not {x.dtype} and {scale.dtype}")
        dtype = self.out_dtype(node)
        quant_range(self, node, dtype)
        self.layout(node)
        return [(x.shape, dtype)]

    def reference(self, node, inputs):
        x, scale = inputs[:2]
        zero = inputs[2] if len(inputs) > 2 else None
        dtype = self.out_dtype(node)
        low, high = quant_range(self, node, dtype)
        scale = self.expanded(node, x.shape, scale)
        precision = tensor_type(self, node, "precision")
        if precision is not None:
            x, scale = x.astype(precision), scale.astype(precision)
        q = np.rint(x / scale).astype(np.float64)
        if zero is not None:
            q = q + self.expanded(node, x.shape, as_int(zero))
        return [np.clip(q, low, high).astype(np.int32).astype(dtype)]


@register
class DequantizeLinear(QuantBase):
    foldable = False  # see the module doc: passes/fold_qdq_weights.py folds or compresses

    def out_dtype(self, node) -> np.dtype:
        return tensor_type(self, node, "output_dtype") or node.inputs[1].dtype

    def infer(self, node):
        x, scale = node.inputs[:2]
        quant_range(self, node, x.dtype, int32_ok=True)
        zero = node.input(2)
        if zero is not None and zero.dtype != x.dtype:
            self.fail(node, f"zero point is {zero.dtype}, x is {x.dtype}")
        dtype = self.out_dtype(node)
        if scale.dtype.kind != "f" or dtype.kind != "f":
            self.fail(node, f"scale and output must be float, not {scale.dtype} and {dtype}")
        self.layout(node)
        return [(x.shape, dtype)]

    def reference(self, node, inputs):
        x, scale = inputs[:2]
        zero = inputs[2] if len(inputs) > 2 else None
        dx = as_int(x).astype(np.float32)
        if zero is not None:
            dx = dx - self.expanded(node, x.shape, as_int(zero)).astype(np.float32)
        y = dx * self.expanded(node, x.shape, scale)
        return [y.astype(self.out_dtype(node))]


@register
class DynamicQuantizeLinear(OpDef):
    """uint8 y with scale = (max(0, x) - min(0, x)) / 255 (1 when that is 0, as in
    onnxruntime) and zero point rint(clip(-min(0, x) / scale, 0, 255))."""

    def infer(self, node):
        x = node.inputs[0]
        if x.dtype != np.float32:
            self.fail(node, f"x must be float32, not {x.dtype}")
        return [(x.shape, np.uint8), ((), np.float32), ((), np.uint8)]

    def reference(self, node, inputs):
        x = inputs[0]
        high = np.float32(max(0.0, float(np.max(x)))) if x.size else np.float32(0)
        low = np.float32(min(0.0, float(np.min(x)))) if x.size else np.float32(0)
        # onnxruntime: 1 for an all-zero x (onnx's reference says 1/255)
        scale = np.float32(1.0) if high == low else np.float32(high - low) / np.float32(255)
        zero = np.rint(np.clip(np.float32(0) - low / scale, 0, 255))
        y = np.clip(np.rint(x / scale) + zero, 0, 255)
        return [y.astype(np.uint8), np.array(scale, np.float32), np.array(zero, np.uint8)]


# -- integer products ---------------------------------------------------------------------
INT8_TYPES = (np.dtype(np.int8), np.dtype(np.uint8))


def check_int8(op: OpDef, node, *values) -> None:
    for value in values:
        if value is not None and value.dtype not in INT8_TYPES:
            op.fail(node, f"'{value.name}' must be int8 or uint8, not {value.dtype}")


@register
class ConvInteger(ConvBase):
    """Conv of (x - x_zero_point) by (w - w_zero_point) in int32; x_zero_point is one value,
    w_zero_point one value or one per output channel."""

    def infer(self, node):
        x, w, x_zero, w_zero = (node.input(i) for i in range(4))
        check_int8(self, node, x, w, x_zero, w_zero)
        window = window_geometry(self, node, x.shape[2:], self.check(node, False))
        if x_zero is not None and x_zero.size != 1:
            self.fail(node, "x_zero_point must be one value")
        if w_zero is not None and w_zero.size != 1 and w_zero.shape != (w.shape[0],):
            self.fail(node, f"w_zero_point must be one value or [{w.shape[0]}]")
        return [((x.shape[0], w.shape[0]) + window.out, np.int32)]

    def reference(self, node, inputs):
        x, w = (a.astype(np.float64) for a in inputs[:2])  # exact: |sums| < 2^53
        if len(inputs) > 2 and inputs[2] is not None:
            x = x - float(inputs[2].reshape(-1)[0])
        if len(inputs) > 3 and inputs[3] is not None:
            w = w - inputs[3].astype(np.float64).reshape((-1,) + (1,) * (w.ndim - 1))
        y = Conv.reference(self, node, [x, w])[0]
        return [np.rint(y).astype(np.int32)]


def matmul_shape(op: OpDef, node, sa, sb) -> tuple[int, ...]:
    """numpy.matmul's output shape (1-D operands gain and lose a unit dim)."""
    if not sa or not sb:
        op.fail(node, "operands must have rank >= 1")
    a = (1,) + tuple(sa) if len(sa) == 1 else tuple(sa)
    b = tuple(sb) + (1,) if len(sb) == 1 else tuple(sb)
    if a[-1] != b[-2]:
        op.fail(node, f"inner dimensions {a[-1]} and {b[-2]} differ")
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        op.fail(node, "batch dimensions do not broadcast")
    return tuple(batch) + ((a[-2],) if len(sa) > 1 else ()) + ((b[-1],) if len(sb) > 1 else ())


def zero_point_shape(op: OpDef, node, zero, operand, rows: bool) -> tuple[int, ...] | None:
    """How MatMulInteger's zero point broadcasts: per tensor, per row of A ([M] or
    [.., M, 1]) or per column of B ([N] or [.., 1, N]); None when absent."""
    if zero is None:
        return None
    shape, n = operand.shape, len(operand.shape)
    if zero.size == 1:
        return ()
    if len(zero.shape) == 1 and n >= 2:
        if rows and zero.shape[0] == shape[-2]:
            return (shape[-2], 1)
        if not rows and zero.shape[0] == shape[-1]:
            return (shape[-1],)
    elif len(zero.shape) == n and n >= 2 and zero.shape[-1 if rows else -2] == 1:
        try:
            if np.broadcast_shapes(zero.shape, shape) == tuple(shape):
                return tuple(zero.shape)
        except ValueError:
            pass
    op.fail(node, f"zero point {list(zero.shape)} fits neither per tensor nor per "
                  f"{'row' if rows else 'column'} of {list(shape)}")


@register
class MatMulInteger(OpDef):
    """numpy.matmul of (A - a_zero_point) by (B - b_zero_point) in int32."""

    def infer(self, node):
        a, b, a_zero, b_zero = (node.input(i) for i in range(4))
        check_int8(self, node, a, b, a_zero, b_zero)
        zero_point_shape(self, node, a_zero, a, rows=True)
        zero_point_shape(self, node, b_zero, b, rows=False)
        return [(matmul_shape(self, node, a.shape, b.shape), np.int32)]

    def reference(self, node, inputs):
        a, b = (v.astype(np.int64) for v in inputs[:2])
        for i, (operand, rows) in enumerate(((a, True), (b, False))):
            zero = inputs[i + 2] if len(inputs) > i + 2 else None
            shape = zero_point_shape(self, node, node.input(i + 2), node.inputs[i], rows)
            if zero is not None:
                operand -= zero.astype(np.int64).reshape(shape)
        return [np.matmul(a, b).astype(np.int32)]
