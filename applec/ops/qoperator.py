"""Op table entries for onnxruntime's QOperator quantization format: the ONNX ops
QLinearConv and QLinearMatMul, and the com.microsoft contrib ops that onnxruntime's
`quantize_static(quant_format=QuantFormat.QOperator)` emits: QLinearAdd, QLinearMul,
QLinearSigmoid, QLinearLeakyRelu, QLinearConcat, QLinearGlobalAveragePool,
QLinearAveragePool, QLinearSoftmax and QGemm.

A contrib op is keyed '<domain>.<op_type>' ("com.microsoft.QLinearAdd"). The importer
takes the ops of `CONTRIB_DOMAINS` that are in the table and nothing else from those
domains; `CONTRIB_ALIASES` maps contrib ops that are ONNX ops under another domain
(com.microsoft QuantizeLinear/DequantizeLinear) to the ONNX entries.

Quantized tensors are int8 or uint8 with float32 scales (QLinearMatMul also takes float16
ones, as ONNX allows; its scale arithmetic is then done in float16, as onnx's reference
does); zero points have the tensor's type and default to 0. A scale and zero point is one
value per tensor, except for weights: QLinearConv's w one per output channel ([M]),
QLinearMatMul's and QGemm's b one per column ([N], or [.., 1, N]), QLinearMatMul's a
one per row.

The references compute what onnxruntime's x86 CPU kernels compute, in float32 and in the
same order, so that both agree exactly except where a float32 result lies within rounding
error of a tie (rint rounds halves to even; saturate clips to the type's range):

    requantize(acc, M, zp) = saturate(rint(float32(acc) * M) + zp)     (MlasRequantizeOutput)
    QLinearConv, QLinearMatMul, QGemm: acc = the exact integer product of (x - x_zp) and
        (w - w_zp), plus the int32 bias; M = x_scale * w_scale / y_scale per output channel
        (QGemm: alpha * a_scale * b_scale [/ y_scale]; without y_zero_point its output is
        float32(acc) * M, float32)
    QLinearGlobalAveragePool: acc = sum(x) - x_zp * n; M = x_scale / (y_scale * n)
    QLinearAdd: saturate(rint(c_zp - (ra * a_zp + rb * b_zp) + ra * a + rb * b)),
        ra = a_scale / c_scale, rb = b_scale / c_scale
    QLinearMul: saturate(rint(float32((a - a_zp) * (b - b_zp)) * (a_scale * b_scale /
        c_scale) + c_zp))
    QLinearSigmoid, QLinearLeakyRelu, QLinearAveragePool and the QLinearConcat inputs whose
        scale or zero point differ from Y's: quantize(f(dequantize(x))) with
        dequantize(x) = x_scale * (x - x_zp), quantize(v) = saturate(rint(v / y_scale) + y_zp)
    QLinearSoftmax: e = exp((x - max x) * x_scale); saturate(rint(e * floor(1 / y_scale) /
        sum e) + y_zp). onnxruntime multiplies by floor(1 / y_scale) (256 for the 1/256
        that quantize_static gives every softmax) rather than dividing by y_scale; its
        int8 kernel does not saturate a probability that rounds to 256/256 but wraps it to
        -128, which we do not copy (we give 127).

Sums of integers are exact in float32 below 2^24; the lowering notes where a product's
worst case goes beyond (targets/coreml/rules_qoperator.py).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from . import REQUIRED, OpDef, broadcast_shapes, normalize_axis, register
from .nn import AveragePool, Conv, ConvBase, window_geometry
from .qdq import matmul_shape

CONTRIB_DOMAINS = ("com.microsoft",)
MS = f"{CONTRIB_DOMAINS[0]}."
CONTRIB_ALIASES = {f"{MS}QuantizeLinear": "QuantizeLinear",
                   f"{MS}DequantizeLinear": "DequantizeLinear"}

RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}
F32 = np.float32


# -- checks --------------------------------------------------------------------------------
def check_8bit(op: OpDef, node, *values) -> None:
    """Quantized tensors: int8 or uint8, all of one type."""
    for value in values:
        if value.dtype not in RANGES:
            op.fail(node, f"'{value.name}' must be int8 or uint8, not {value.dtype}")
    if len({v.dtype for v in values}) > 1:
        op.fail(node, "quantized inputs must share one type, not "
                      f"{', '.join(str(v.dtype) for v in values)}")


def check_scale(op: OpDef, node, index: int, count: int | None = 1,
                required: bool = True) -> None:
    """Input `index` is a float scale: one value, or `count` of them in a vector (any
    shape when `count` is None: the caller checks it)."""
    scale = node.input(index)
    if scale is None:
        if required:
            op.fail(node, f"input {index} (a scale) is required")
        return
    if scale.dtype.kind != "f":
        op.fail(node, f"scale '{scale.name}' must be float, not {scale.dtype}")
    if count is not None:
        check_count(op, node, scale, count)


def check_zero(op: OpDef, node, index: int, like, count: int = 1) -> None:
    """Optional input `index` is a zero point of `like`'s type: one value, or `count`."""
    zero = node.input(index)
    if zero is None:
        return
    if zero.dtype != like.dtype:
        op.fail(node, f"zero point '{zero.name}' is {zero.dtype}, '{like.name}' is {like.dtype}")
    check_count(op, node, zero, count)


def check_count(op: OpDef, node, value, count: int) -> None:
    one = value.size == 1 and len(value.shape) <= 1
    if not one and not (count > 1 and value.shape == (count,)):
        want = "one value" if count == 1 else f"one value or [{count}]"
        op.fail(node, f"'{value.name}' of shape {list(value.shape)} must be {want}")


def check_out_zero(op: OpDef, node, index: int) -> None:
    """The output's zero point (it decides the output type): int8 or uint8, one value."""
    zero = node.input(index)
    if zero is not None:
        check_8bit(op, node, zero)
        check_count(op, node, zero, 1)


def out_dtype(node, zero_index: int, fallback) -> np.dtype:
    zero = node.input(zero_index)
    return zero.dtype if zero is not None else fallback.dtype


# -- arithmetic shared by the references -----------------------------------------------------
def arg(inputs, index: int):
    return inputs[index] if index < len(inputs) else None


def scalar(array, default=0):
    """One value of a scale or zero point (float32 scale, Python int zero point)."""
    if array is None:
        return default
    value = np.asarray(array).reshape(-1)[0]
    return F32(value) if value.dtype.kind == "f" else int(value)


def saturate(q: np.ndarray, dtype: np.dtype) -> np.ndarray:
    low, high = RANGES[np.dtype(dtype)]
    return np.clip(q, low, high).astype(dtype)


def requantize(acc: np.ndarray, multiplier, zero: int, dtype) -> np.ndarray:
    """saturate(rint(float32(acc) * M) + zp), onnxruntime's MlasRequantizeOutput."""
    scaled = np.asarray(acc).astype(F32) * np.asarray(multiplier, F32)
    return saturate(np.rint(scaled) + F32(zero), dtype)


def dequantize(x: np.ndarray, scale, zero) -> np.ndarray:
    return F32(scale) * (x.astype(np.int32) - zero).astype(F32)


def quantize(v: np.ndarray, scale, zero, dtype) -> np.ndarray:
    return saturate(np.rint(v.astype(F32) / F32(scale)) + F32(zero), dtype)


def multiplier(*scales, divide_by=None) -> np.ndarray:
    """The product of `scales` (broadcast), divided by `divide_by`, in the scales' own
    float type (onnxruntime and onnx multiply left to right), as float32."""
    dtype = np.result_type(*(np.asarray(s).dtype for s in scales))
    product = np.asarray(scales[0], dtype)
    for scale in scales[1:]:
        product = product * np.asarray(scale, dtype)
    if divide_by is not None:
        product = product / np.asarray(divide_by, dtype).reshape(())
    return product.astype(F32)


def offset(data: np.ndarray, zero, shape=()) -> np.ndarray:
    """data - zero point in int64, the zero point reshaped to broadcast (() per tensor)."""
    data = data.astype(np.int64)
    if zero is None:
        return data
    return data - np.asarray(zero).astype(np.int64).reshape(shape)


def param_shape(op: OpDef, node, value, operand, rows: bool):
    """How a matrix product's scale or zero point broadcasts against its operand: () per
    tensor, (M, 1) per row of A, (N,) per column of B, or the value's own [.., M, 1] /
    [.., 1, N] shape; None when absent."""
    if value is None:
        return None
    shape, n = operand.shape, len(operand.shape)
    if value.size == 1 and len(value.shape) <= 1:
        return ()
    if len(value.shape) == 1 and n >= 2:
        if rows and value.shape[0] == shape[-2]:
            return (shape[-2], 1)
        if not rows and value.shape[0] == shape[-1]:
            return (shape[-1],)
    elif len(value.shape) == n and n >= 2 and value.shape[-1 if rows else -2] == 1 and \
            all(v in (1, s) for v, s in zip(value.shape, shape)):
        return tuple(value.shape)
    op.fail(node, f"'{value.name}' of shape {list(value.shape)} is neither one value nor one "
                  f"per {'row' if rows else 'column'} of {list(shape)}")


# -- ONNX: QLinearConv, QLinearMatMul -----------------------------------------------------------
@register
class QLinearConv(ConvBase):
    """Inputs x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point,
    B (int32 bias, optional); Conv's attributes."""

    def infer(self, node):
        x, w, bias = node.inputs[0], node.inputs[3], node.input(8)
        check_8bit(self, node, x)
        check_8bit(self, node, w)
        kernel = self.kernel(node, x, w)
        m = w.shape[0]
        for index, count in ((1, 1), (4, m), (6, 1)):
            check_scale(self, node, index, count)
        for index, like, count in ((2, x, 1), (5, w, m)):
            check_zero(self, node, index, like, count)
        check_out_zero(self, node, 7)
        if bias is not None and (bias.dtype != np.int32 or bias.shape != (m,)):
            self.fail(node, f"bias must be int32 [{m}], not {bias.dtype} {list(bias.shape)}")
        window = window_geometry(self, node, x.shape[2:], kernel)
        return [((x.shape[0], m) + window.out, out_dtype(node, 7, x))]

    def kernel(self, node, x, w) -> tuple[int, ...]:
        """Conv's rank, channel and kernel_shape checks, with W at input 3."""
        if len(x.shape) < 3 or len(w.shape) != len(x.shape):
            self.fail(node, "x must be (N, C, ...) and w of the same rank")
        group = self.attr(node, "group")
        if group < 1 or x.shape[1] % group or w.shape[1] * group != x.shape[1] or \
                w.shape[0] % group:
            self.fail(node, f"channels do not match weights with group={group}")
        declared = self.attr(node, "kernel_shape")
        if declared is not None and tuple(declared) != tuple(w.shape[2:]):
            self.fail(node, f"kernel_shape {list(declared)} does not match w")
        return tuple(w.shape[2:])

    def reference(self, node, inputs):
        x, x_scale, x_zero, w, w_scale, w_zero, y_scale, y_zero = (arg(inputs, i)
                                                                   for i in range(8))
        bias = arg(inputs, 8)
        rank = w.ndim - 2
        channel = (-1,) + (1,) * (w.ndim - 1)
        xq = offset(x, scalar(x_zero)).astype(np.float64)  # exact: |sums| < 2^53
        wq = offset(w, w_zero, channel if np.size(w_zero) > 1 else ()).astype(np.float64)
        acc = Conv.reference(self, node, [xq, wq])[0]
        if bias is not None:
            acc = acc + bias.astype(np.float64).reshape((-1,) + (1,) * rank)
        scale = multiplier(x_scale.reshape(()), w_scale.reshape(-1), divide_by=y_scale)
        return [requantize(acc, scale.reshape((-1,) + (1,) * rank), scalar(y_zero),
                           out_dtype(node, 7, node.inputs[0]))]


@register
class QLinearMatMul(OpDef):
    """Inputs a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point;
    numpy.matmul's shapes."""

    def infer(self, node):
        a, b = node.inputs[0], node.inputs[3]
        check_8bit(self, node, a)
        check_8bit(self, node, b)
        for index in (1, 4, 6):
            check_scale(self, node, index, count=None)
        scales = {node.inputs[i].dtype for i in (1, 4, 6)}
        if len(scales) > 1:
            self.fail(node, f"scales must share one float type, not {sorted(map(str, scales))}")
        for index, operand, rows in ((1, a, True), (2, a, True), (4, b, False), (5, b, False)):
            param_shape(self, node, node.input(index), operand, rows)
        check_out_zero(self, node, 7)
        for index, like in ((2, a), (5, b)):
            zero = node.input(index)
            if zero is not None and zero.dtype != like.dtype:
                self.fail(node, f"zero point '{zero.name}' is {zero.dtype}, not {like.dtype}")
        return [(matmul_shape(self, node, a.shape, b.shape), out_dtype(node, 7, a))]

    def reference(self, node, inputs):
        a, a_scale, a_zero, b, b_scale, b_zero, y_scale, y_zero = (arg(inputs, i)
                                                                   for i in range(8))
        shapes = self.shapes(node)
        # numpy.matmul's 1-D operands as matrices (their scales are per tensor), and back
        lhs = offset(a, a_zero, shapes[2]).reshape((1, -1) if a.ndim == 1 else a.shape)
        rhs = offset(b, b_zero, shapes[5]).reshape((-1, 1) if b.ndim == 1 else b.shape)
        scale = multiplier(a_scale.reshape(shapes[1]), b_scale.reshape(shapes[4]),
                           divide_by=y_scale)
        y = requantize(np.matmul(lhs, rhs), scale, scalar(y_zero),
                       out_dtype(node, 7, node.inputs[0]))
        if b.ndim == 1:
            y = y[..., 0]
        if a.ndim == 1:
            y = y[..., 0] if b.ndim == 1 else y[..., 0, :]
        return [y]

    def shapes(self, node) -> dict[int, tuple]:
        """Broadcast shape of each scale / zero point input, by position."""
        a, b = node.inputs[0], node.inputs[3]
        return {i: param_shape(self, node, node.input(i), a if i < 3 else b, i < 3) or ()
                for i in (1, 2, 4, 5)}


# -- com.microsoft: QGemm ---------------------------------------------------------------------
@register
class QGemm(OpDef):
    """Inputs A, a_scale, a_zero_point, B, b_scale, b_zero_point, C (int32, optional),
    y_scale, y_zero_point (both optional: without them Y is float32). Y = alpha * A' @ B'
    (+ C) on the zero-point-shifted integers, requantized."""

    op_type = f"{MS}QGemm"
    attrs: ClassVar[dict[str, Any]] = {"alpha": 1.0, "transA": 0, "transB": 0}

    def infer(self, node):
        a, b, c = node.inputs[0], node.inputs[3], node.input(6)
        check_8bit(self, node, a)
        check_8bit(self, node, b)
        if len(a.shape) != 2 or len(b.shape) != 2:
            self.fail(node, "A and B must be matrices")
        m, k = a.shape[::-1] if self.attr(node, "transA") else a.shape
        kb, n = b.shape[::-1] if self.attr(node, "transB") else b.shape
        if k != kb:
            self.fail(node, f"inner dimensions {k} and {kb} differ")
        for index, count in ((1, 1), (4, n)):
            check_scale(self, node, index, count)
        check_scale(self, node, 7, required=False)
        for index, like, count in ((2, a, 1), (5, b, n), (8, a, 1)):
            check_zero(self, node, index, like, count)
        if (node.input(7) is None) != (node.input(8) is None):
            self.fail(node, "y_scale and y_zero_point must be given together")
        if c is not None and (c.dtype != np.int32 or
                              c.shape not in ((), (1,), (n,), (1, n), (m, 1), (m, n), (1, 1))):
            self.fail(node, f"C must be int32 broadcasting to [{m}, {n}], not {c.dtype} "
                            f"{list(c.shape)}")
        dtype = node.inputs[8].dtype if node.input(8) is not None else np.dtype(np.float32)
        return [((m, n), dtype)]

    def reference(self, node, inputs):
        a, a_scale, a_zero, b, b_scale, b_zero, c, y_scale, y_zero = (arg(inputs, i)
                                                                      for i in range(9))
        a = a.T if self.attr(node, "transA") else a
        b = b.T if self.attr(node, "transB") else b
        acc = offset(a, scalar(a_zero)) @ offset(b, b_zero, (-1,) if np.size(b_zero) > 1
                                                 else ())
        if c is not None:
            acc = acc + c.astype(np.int64)
        alpha = np.asarray(self.attr(node, "alpha"), F32)
        scale = multiplier(alpha, a_scale.reshape(()), b_scale.reshape(-1),
                           divide_by=y_scale)
        if y_zero is None:
            return [acc.astype(F32) * scale]
        return [requantize(acc, scale, scalar(y_zero), y_zero.dtype)]


# -- com.microsoft: elementwise --------------------------------------------------------------
class QLinearBinary(OpDef):
    """Inputs A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point;
    numpy broadcasting; one scale and zero point per tensor."""

    def infer(self, node):
        a, b = node.inputs[0], node.inputs[3]
        check_8bit(self, node, a, b)
        for index in (1, 4, 6):
            check_scale(self, node, index)
        for index in (2, 5, 7):
            check_zero(self, node, index, a)
        return [(broadcast_shapes(node, a, b), a.dtype)]

    @staticmethod
    def params(inputs) -> tuple:
        return tuple(scalar(arg(inputs, i)) for i in (1, 2, 4, 5, 6, 7))


@register
class QLinearAdd(QLinearBinary):
    op_type = f"{MS}QLinearAdd"

    def reference(self, node, inputs):
        a_scale, a_zero, b_scale, b_zero, c_scale, c_zero = self.params(inputs)
        ra, rb = a_scale / c_scale, b_scale / c_scale
        fixed = F32(c_zero) - (ra * F32(a_zero) + rb * F32(b_zero))
        v = (fixed + ra * inputs[0].astype(F32)) + rb * inputs[3].astype(F32)
        return [saturate(np.rint(v), inputs[0].dtype)]


@register
class QLinearMul(QLinearBinary):
    op_type = f"{MS}QLinearMul"

    def reference(self, node, inputs):
        a_scale, a_zero, b_scale, b_zero, c_scale, c_zero = self.params(inputs)
        product = offset(inputs[0], a_zero) * offset(inputs[3], b_zero)
        v = product.astype(F32) * (a_scale * b_scale / c_scale) + F32(c_zero)
        return [saturate(np.rint(v), inputs[0].dtype)]


class QLinearUnary(OpDef):
    """Inputs X, X_scale, X_zero_point, Y_scale, Y_zero_point; Y = quantize(f(dequantize X))
    (module doc), `f` on float32."""

    def infer(self, node):
        x = node.inputs[0]
        check_8bit(self, node, x)
        for index in (1, 3):
            check_scale(self, node, index)
        for index in (2, 4):
            check_zero(self, node, index, x)
        return [(x.shape, x.dtype)]

    def fn(self, node, v: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def reference(self, node, inputs):
        x_scale, x_zero, y_scale, y_zero = (scalar(arg(inputs, i)) for i in (1, 2, 3, 4))
        v = self.fn(node, dequantize(inputs[0], x_scale, x_zero))
        return [quantize(v, y_scale, y_zero, inputs[0].dtype)]


@register
class QLinearSigmoid(QLinearUnary):
    op_type = f"{MS}QLinearSigmoid"

    def fn(self, node, v):
        with np.errstate(over="ignore"):
            return (F32(1) / (F32(1) + np.exp(-v))).astype(F32)


@register
class QLinearLeakyRelu(QLinearUnary):
    op_type = f"{MS}QLinearLeakyRelu"
    attrs: ClassVar[dict[str, Any]] = {"alpha": 0.01}

    def fn(self, node, v):
        return np.where(v >= 0, v, v * F32(self.attr(node, "alpha"))).astype(F32)


@register
class QLinearConcat(OpDef):
    """Inputs Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input tensor.
    An input with Y's scale and zero point is copied, any other requantized."""

    op_type = f"{MS}QLinearConcat"
    attrs: ClassVar[dict[str, Any]] = {"axis": REQUIRED}

    def tensors(self, node) -> list:
        if len(node.inputs) < 5 or (len(node.inputs) - 2) % 3:
            self.fail(node, "inputs must be Y_scale, Y_zero_point, then (X, scale, zero "
                            "point) triples")
        return node.inputs[2::3]

    def infer(self, node):
        xs = self.tensors(node)
        if any(x is None for x in xs):
            self.fail(node, "every (X, scale, zero point) triple needs its X")
        check_8bit(self, node, *xs)
        check_scale(self, node, 0)
        for index in range(3, len(node.inputs), 3):
            check_scale(self, node, index)
        for index in range(1, len(node.inputs), 3):
            if node.input(index) is None:
                self.fail(node, f"input {index} (a zero point) is required")
            check_zero(self, node, index, xs[0])
        first = xs[0].shape
        axis = normalize_axis(node, self.attr(node, "axis"), len(first))
        if any(len(x.shape) != len(first) or
               any(p != q for i, (p, q) in enumerate(zip(x.shape, first)) if i != axis)
               for x in xs):
            self.fail(node, f"shapes differ outside axis {axis}")
        total = sum(x.shape[axis] for x in xs)
        return [(first[:axis] + (total,) + first[axis + 1:], xs[0].dtype)]

    def reference(self, node, inputs):
        y_scale, y_zero = scalar(inputs[0]), scalar(inputs[1])
        parts = []
        for x, x_scale, x_zero in zip(inputs[2::3], inputs[3::3], inputs[4::3]):
            x_scale, x_zero = scalar(x_scale), scalar(x_zero)
            same = x_scale == y_scale and x_zero == y_zero
            parts.append(x if same else quantize(dequantize(x, x_scale, x_zero), y_scale,
                                                 y_zero, x.dtype))
        axis = normalize_axis(node, self.attr(node, "axis"), inputs[2].ndim)
        return [np.concatenate(parts, axis=axis)]


# -- com.microsoft: pooling and softmax ---------------------------------------------------------
def check_pool_params(op: OpDef, node) -> None:
    """Inputs X, x_scale, x_zero_point, y_scale, y_zero_point of the pooling ops."""
    x = node.inputs[0]
    check_8bit(op, node, x)
    for index in (1, 3):
        check_scale(op, node, index)
    for index in (2, 4):
        check_zero(op, node, index, x)
    if len(x.shape) < 3:
        op.fail(node, "X must be (N, C, ...) or, with channels_last, (N, ..., C)")


def channels_first(x: np.ndarray, channels_last: bool) -> np.ndarray:
    return np.moveaxis(x, -1, 1) if channels_last else x


@register
class QLinearGlobalAveragePool(OpDef):
    op_type = f"{MS}QLinearGlobalAveragePool"
    attrs: ClassVar[dict[str, Any]] = {"channels_last": 0}

    def spatial(self, node, rank: int) -> tuple[int, ...]:
        return tuple(range(1, rank - 1)) if self.attr(node, "channels_last") else \
            tuple(range(2, rank))

    def infer(self, node):
        check_pool_params(self, node)
        x = node.inputs[0]
        axes = self.spatial(node, len(x.shape))
        return [(tuple(1 if i in axes else d for i, d in enumerate(x.shape)), x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        x_scale, x_zero, y_scale, y_zero = (scalar(arg(inputs, i)) for i in (1, 2, 3, 4))
        axes = self.spatial(node, x.ndim)
        n = math.prod(x.shape[i] for i in axes)
        acc = x.astype(np.int64).sum(axis=axes, keepdims=True) - x_zero * n
        return [requantize(acc, x_scale / (y_scale * F32(n)), y_zero, x.dtype)]


@register
class QLinearAveragePool(AveragePool):
    """AveragePool's attributes (no dilations) on dequantized X, requantized."""

    op_type = f"{MS}QLinearAveragePool"
    attrs: ClassVar[dict[str, Any]] = {**AveragePool.attrs, "channels_last": 0}

    def infer(self, node):
        check_pool_params(self, node)
        if self.attr(node, "dilations") is not None:
            self.fail(node, "QLinearAveragePool has no dilations")
        x = node.inputs[0]
        last = bool(self.attr(node, "channels_last"))
        shape = (x.shape[0], x.shape[-1]) + x.shape[1:-1] if last else x.shape
        out = shape[:2] + self.window(node, shape).out
        return [((out[0],) + out[2:] + (out[1],) if last else out, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        x_scale, x_zero, y_scale, y_zero = (scalar(arg(inputs, i)) for i in (1, 2, 3, 4))
        last = bool(self.attr(node, "channels_last"))
        v = channels_first(dequantize(x, x_scale, x_zero), last)
        pooled = AveragePool.reference(self, node, [v])[0]
        y = quantize(pooled, y_scale, y_zero, x.dtype)
        return [np.moveaxis(y, 1, -1) if last else y]


@register
class QLinearSoftmax(OpDef):
    """Inputs X, X_scale, x_zero_point, y_scale, y_zero_point. `opset` is the Softmax
    opset it stands for: 13+ normalizes along `axis` (default -1), before that over X
    flattened to 2-D at `axis` (default 1)."""

    op_type = f"{MS}QLinearSoftmax"
    attrs: ClassVar[dict[str, Any]] = {"axis": None, "opset": REQUIRED}

    def axis(self, node, rank: int) -> int:
        axis = self.attr(node, "axis")
        if axis is None:
            axis = -1 if self.attr(node, "opset") >= 13 else 1
        return normalize_axis(node, axis, rank)

    def infer(self, node):
        x = node.inputs[0]
        check_8bit(self, node, x)
        for index in (1, 3):
            check_scale(self, node, index)
        for index in (2, 4):
            check_zero(self, node, index, x)
        if not x.shape:
            self.fail(node, "X must have rank >= 1")
        self.axis(node, len(x.shape))
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        x_scale, y_scale, y_zero = (scalar(arg(inputs, i)) for i in (1, 3, 4))
        axis = self.axis(node, x.ndim)
        flat = self.attr(node, "opset") < 13
        v = x.reshape(x.shape[:axis] + (-1,)) if flat else x
        axis = v.ndim - 1 if flat else axis
        shifted = (v.astype(np.int32) - v.max(axis=axis, keepdims=True)).astype(F32)
        e = np.exp(shifted * x_scale)
        total = e.sum(axis=axis, keepdims=True, dtype=F32)
        q = np.rint(e * F32(math.floor(1 / float(y_scale))) / total) + F32(y_zero)
        return [saturate(q, x.dtype).reshape(x.shape)]

