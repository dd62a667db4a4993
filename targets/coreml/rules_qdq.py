"""CoreML lowering of the quantization ops on run-time tensors (applec/ops/qdq.py).

Constant weights behind DequantizeLinear never get here: `passes/fold_qdq_weights.py`
turns them into applec.DequantizeWeight (rules_quant.py: constexpr ops). What is left is
float arithmetic that reproduces ONNX:

- QuantizeLinear: round(x / scale) (+ zero point), clip to the type's range, cast to int32
  (CoreML holds every integer tensor as int32). MIL `round` rounds halves to even: its
  doc says 0.5 -> 0 and coremltools' value inference is numpy's round, half to even;
  the zero point is added after rounding, as ONNX does (an odd zero point would flip ties);
- DequantizeLinear: (float(x) - zero point) * scale;
- DynamicQuantizeLinear: reduce_min / reduce_max, then the ONNX formula in fp32;
- ConvInteger / MatMulInteger: (x - zero point) in fp32, MIL conv / matmul, cast to int32.
  A constant integer weight stays 8-bit in the bundle: constexpr_blockwise_shift_scale
  (iOS18+) or constexpr_affine_dequantize with scale 1 gives w - zero point exactly.
  fp32 sums of integers are exact while every partial sum stays below 2^24: with K
  products of |x - zp| <= 255 by |w - zp| <= 255 that holds for K <= 258, and K <= 1024
  for int8 data with zero point 0 (|x|, |w| <= 128); beyond that worst case a note says so. (Every fp32 sum
  of integers is an integer, so the cast to int32 never truncates a fraction.)

Scales and zero points may be run-time values: per-axis ones are reshaped, blocked ones
gathered (np.arange(n) // block_size) to x's shape.

Precision: the arithmetic runs in fp16 inside an fp16 program when every integer involved
is 8-bit (|q|, |q - zp| <= 255 are exact in fp16); 16- and 32-bit types and the integer
products always run in fp32 (fp16 stops at 65504 and is exact to 2048 only).
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from applec.ops import OPS
from applec.ops.qdq import QUANT_RANGES, as_int, expand_param, param_layout, tensor_type
from applec.ops.qdq import zero_point_shape as matmul_zero_shape

from .rules import explicit_pads, rule, unsupported

MIL_FLOAT = {np.dtype(np.float16): "fp16", np.dtype(np.float32): "fp32"}
EXACT_FP32_SUM = 1 << 24


def opset_at_least(lw, name: str) -> bool:
    import coremltools as ct

    return lw.opset is not None and lw.opset >= getattr(ct.target, name)


def work_dtype(lw, *int_dtypes) -> np.dtype:
    """The float dtype the arithmetic runs in (module doc)."""
    if lw.float_dtype == np.float16 and all(np.dtype(d).itemsize == 1 for d in int_dtypes):
        return np.dtype(np.float16)
    return np.dtype(np.float32)


def as_float(lw, value, dtype: np.dtype, tag: str):
    """An IR value in float `dtype`: a numpy array for a constant, else a (cast) MIL var."""
    if value.is_const:
        return as_int(value.const).astype(dtype)
    var = lw.get(value)
    if types.builtin_to_string(var.dtype) == MIL_FLOAT[dtype]:
        return var
    return mb.cast(x=var, dtype=MIL_FLOAT[dtype], name=lw.tmp(tag))


def param(lw, node, value, x_shape, dtype: np.dtype, tag: str):
    """A scale or zero point in float `dtype`, shaped to broadcast against x."""
    op = OPS[node.op_type]
    axis, block = op.attr(node, "axis"), int(op.attr(node, "block_size"))
    layout = param_layout(op, node, x_shape, value.shape, axis, block)
    if value.is_const:
        return expand_param(as_int(value.const), x_shape, layout, axis, block).astype(dtype)
    var = as_float(lw, value, dtype, tag)
    rank = len(x_shape)
    if layout == "block":
        axis %= rank
        index = (np.arange(x_shape[axis]) // block).astype(np.int32)
        return mb.gather(x=var, indices=index, axis=axis, name=lw.tmp(f"{tag}_blocks"))
    if layout == "tensor":
        if rank == 0:
            return mb.squeeze(x=var, name=lw.tmp(f"{tag}_scalar")) if value.shape else var
        shape = [1] * rank
    else:
        shape = [-1 if i == axis % rank else 1 for i in range(rank)]
    return mb.reshape(x=var, shape=shape, name=lw.tmp(f"{tag}_axis"))


def is_zero(value) -> bool:
    return value is None or (value.is_const and not as_int(value.const).any())


@rule("QuantizeLinear")
def lower_quantize_linear(lw, node):
    x, scale, zero = node.inputs[0], node.inputs[1], node.input(2)
    out = node.outputs[0]
    low, high = QUANT_RANGES[out.dtype.name]
    dtype = work_dtype(lw, out.dtype)
    q = mb.real_div(x=as_float(lw, x, dtype, "x"),
                    y=param(lw, node, scale, x.shape, dtype, "scale"), name=lw.tmp("div"))
    quotient = tensor_type(OPS[node.op_type], node, "precision") or \
        np.result_type(x.dtype, scale.dtype)
    if quotient == np.float16 and dtype == np.float32:  # ONNX divides in fp16 here
        q = mb.cast(x=mb.cast(x=q, dtype="fp16", name=lw.tmp("div16")), dtype="fp32",
                    name=lw.tmp("div32"))
    q = mb.round(x=q, name=lw.tmp("round"))
    if not is_zero(zero):
        q = mb.add(x=q, y=param(lw, node, zero, x.shape, dtype, "zero"), name=lw.tmp("shift"))
    q = mb.clip(x=q, alpha=dtype.type(low), beta=dtype.type(high), name=lw.tmp("saturate"))
    lw.bind(out, mb.cast(x=q, dtype="int32", name=lw.out_name()))


@rule("DequantizeLinear")
def lower_dequantize_linear(lw, node):
    x, scale, zero = node.inputs[0], node.inputs[1], node.input(2)
    dtype = work_dtype(lw, x.dtype)
    last = dtype == lw.float_dtype
    v = as_float(lw, x, dtype, "x")
    if not is_zero(zero):
        v = mb.sub(x=v, y=param(lw, node, zero, x.shape, dtype, "zero"), name=lw.tmp("shift"))
    y = mb.mul(x=v, y=param(lw, node, scale, x.shape, dtype, "scale"),
               name=lw.out_name() if last else lw.tmp("scaled"))
    if not last:
        y = mb.cast(x=y, dtype=MIL_FLOAT[np.dtype(lw.float_dtype)], name=lw.out_name())
    lw.bind(node.outputs[0], y)


@rule("DynamicQuantizeLinear")
def lower_dynamic_quantize_linear(lw, node):
    f32 = np.float32
    x = as_float(lw, node.inputs[0], np.dtype(f32), "x")
    high = mb.maximum(x=mb.reduce_max(x=x, keep_dims=False, name=lw.tmp("max")), y=f32(0),
                      name=lw.tmp("max0"))
    low = mb.minimum(x=mb.reduce_min(x=x, keep_dims=False, name=lw.tmp("min")), y=f32(0),
                     name=lw.tmp("min0"))
    span = mb.real_div(x=mb.sub(x=high, y=low, name=lw.tmp("span")), y=f32(255),
                       name=lw.tmp("step"))
    flat = mb.equal(x=high, y=low, name=lw.tmp("flat"))  # all zeros: scale 1, as onnxruntime
    fp32_program = lw.float_dtype == f32
    scale = mb.select(cond=flat, a=f32(1), b=span,
                      name=lw.out_name(1) if fp32_program else lw.tmp("scale"))
    shift = mb.sub(x=f32(0), y=mb.real_div(x=low, y=scale, name=lw.tmp("low_q")),
                   name=lw.tmp("zero_f"))
    zero = mb.round(x=mb.clip(x=shift, alpha=f32(0), beta=f32(255), name=lw.tmp("zero_c")),
                    name=lw.tmp("zero_r"))
    q = mb.round(x=mb.real_div(x=x, y=scale, name=lw.tmp("div")), name=lw.tmp("round"))
    q = mb.clip(x=mb.add(x=q, y=zero, name=lw.tmp("shift")), alpha=f32(0), beta=f32(255),
                name=lw.tmp("saturate"))
    lw.bind(node.outputs[0], mb.cast(x=q, dtype="int32", name=lw.out_name(0)))
    lw.bind(node.outputs[1], scale if fp32_program else
            mb.cast(x=scale, dtype="fp16", name=lw.out_name(1)))
    lw.bind(node.outputs[2], mb.cast(x=zero, dtype="int32", name=lw.out_name(2)))


# -- integer products ---------------------------------------------------------------------
def integer_operand(lw, value, zero, zero_shape, tag: str):
    """value - zero point as fp32: a constexpr for constants (module doc), else cast + sub.
    `zero_shape` is how the zero point broadcasts against the value (() per tensor)."""
    if value.is_const and (zero is None or zero.is_const):
        zeros = None if zero is None else zero.const.reshape(zero_shape)
        return integer_constant(lw, value.const, zeros, lw.tmp(tag))
    var = as_float(lw, value, np.dtype(np.float32), tag)
    if is_zero(zero):
        return var
    z = as_float(lw, zero, np.dtype(np.float32), f"{tag}_zero")
    if tuple(zero.shape) != tuple(zero_shape) and zero_shape:
        z = z.reshape(zero_shape) if isinstance(z, np.ndarray) else \
            mb.reshape(x=z, shape=list(zero_shape), name=lw.tmp(f"{tag}_zero_shape"))
    return mb.sub(x=var, y=z, name=lw.tmp(f"{tag}_shift"))


def integer_constant(lw, data: np.ndarray, zero: np.ndarray | None, name: str):
    """A constant int8/uint8 tensor minus its zero point, kept 8-bit in the bundle."""
    rank = data.ndim
    if zero is None:
        zero = np.zeros((1,) * rank, data.dtype)
    zero = zero.reshape((1,) * (rank - zero.ndim) + zero.shape).astype(data.dtype)
    varying = [i for i, d in enumerate(zero.shape) if d != 1]
    if rank and opset_at_least(lw, "iOS18"):
        return mb.constexpr_blockwise_shift_scale(
            data=data, scale=np.ones(zero.shape, np.float32),
            offset=zero if zero.any() else None, name=name)
    if rank and opset_at_least(lw, "iOS16") and len(varying) <= 1:
        axis = varying[0] if varying else 0
        return mb.constexpr_affine_dequantize(
            quantized_data=data, zero_point=zero.reshape(-1) if varying else zero.reshape(()),
            scale=np.float32(1), axis=axis, name=name)
    return data.astype(np.float32) - zero.astype(np.float32)


def bound(value, zero, zero_shape) -> int:
    """The largest |value - zero point| the data (a constant) or its dtype allows."""
    z = None if zero is None or not zero.is_const else \
        as_int(zero.const).astype(np.int64).reshape(zero_shape)
    if value.is_const:
        data = value.const.astype(np.int64)
        return int(np.max(np.abs(data - (0 if z is None else z)), initial=0))
    low, high = QUANT_RANGES[value.dtype.name]
    if zero is not None and z is None:  # a run-time zero point: anything in the range
        return high - low
    z = np.zeros(1, np.int64) if z is None else z
    return int(max(high - z.min(), z.max() - low))


def note_limits(lw, node, products: int, x_bound: int, w_bound: int) -> None:
    """A note where the worst case leaves exact arithmetic: fp32 sums past 2^24. (An int32
    result cast to float beyond fp16's range is kept in fp32 by applec/fp16_safety.py.)"""
    worst = products * x_bound * w_bound
    if worst >= EXACT_FP32_SUM:
        lw.notes.append(f"{node.op_type} node '{node.name}': computed in fp32, exact while "
                        f"partial sums stay below 2^24; the worst case here is {worst:.3g} "
                        f"({products} products of integers up to {x_bound} and {w_bound})")


@rule("ConvInteger")
def lower_conv_integer(lw, node):
    x, w, x_zero, w_zero = (node.input(i) for i in range(4))
    rank = len(x.shape) - 2
    w_zero_shape = () if w_zero is None or w_zero.size == 1 else (w.shape[0],) + (1,) * (
        len(w.shape) - 1)
    xv = integer_operand(lw, x, x_zero, (), "x")
    wv = integer_operand(lw, w, w_zero, w_zero_shape, "w")
    kernel, strides = list(w.shape[2:]), list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    if not isinstance(wv, np.ndarray) and not wv.op.op_type.startswith("constexpr_") \
            and any(d != 1 for d in dilations):
        unsupported(lw, "dilations with a run-time weight: MIL conv dilates constant "
                        "weights only")
    y = mb.conv(x=xv, weight=wv, strides=strides, dilations=dilations, pad_type="custom",
                pad=explicit_pads(node, x.shape[2:], kernel, strides, dilations),
                groups=int(node.attrs.get("group", 1)), name=lw.tmp("conv"))
    note_limits(lw, node, int(np.prod(w.shape[1:])), bound(x, x_zero, ()),
                   bound(w, w_zero, w_zero_shape))
    lw.bind(node.outputs[0], mb.cast(x=y, dtype="int32", name=lw.out_name()))


@rule("MatMulInteger")
def lower_matmul_integer(lw, node):
    a, b, a_zero, b_zero = (node.input(i) for i in range(4))
    op = OPS[node.op_type]
    a_shape = matmul_zero_shape(op, node, a_zero, a, True) or ()
    b_shape = matmul_zero_shape(op, node, b_zero, b, False) or ()
    av = integer_operand(lw, a, a_zero, a_shape, "a")
    bv = integer_operand(lw, b, b_zero, b_shape, "b")
    if len(a.shape) == 1:
        av = mb.expand_dims(x=av, axes=[0], name=lw.tmp("row"))
    if len(b.shape) == 1:
        bv = mb.expand_dims(x=bv, axes=[-1], name=lw.tmp("col"))
    y = mb.matmul(x=av, y=bv, name=lw.tmp("matmul"))
    out = node.outputs[0]
    if len(a.shape) == 1 or len(b.shape) == 1:
        y = mb.reshape(x=y, shape=list(out.shape) or [1], name=lw.tmp("squeeze"))
        if not out.shape:
            y = mb.squeeze(x=y, name=lw.tmp("scalar"))
    note_limits(lw, node, a.shape[-1], bound(a, a_zero, a_shape), bound(b, b_zero, b_shape))
    lw.bind(out, mb.cast(x=y, dtype="int32", name=lw.out_name()))
