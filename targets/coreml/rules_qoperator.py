"""CoreML lowering of onnxruntime's QOperator ops (applec/ops/qoperator.py).

CoreML holds every integer tensor as int32, so a quantized op reads int32 codes and
writes int32 codes; in between it computes what the op's reference computes, in float32
(also inside an fp16 program: every result is an integer the fp32 arithmetic rounds
exactly as onnxruntime's kernels do, and fp16 would move the ties):

- QLinearConv, QLinearMatMul, QGemm: (x - x_zp) and (w - w_zp) as in ConvInteger and
  MatMulInteger (rules_qdq.py): a constant int8/uint8 weight stays 8-bit in the bundle,
  one constexpr_blockwise_shift_scale (iOS18+) or constexpr_affine_dequantize (iOS16/17)
  with scale 1 that yields w - w_zp exactly; then MIL conv / matmul, the int32 bias added,
  and requantize: mul by M = x_scale * w_scale / y_scale (computed at compile time when
  the scales are constants), round (half to even), add y_zp, clip, cast to int32. fp32
  sums of integers are exact below 2^24; past that worst case the report notes it;
- QLinearSigmoid, QLinearLeakyRelu and QLinearConcat's requantized inputs, with constant
  scales and zero points: a gather from a 256-entry table of the op's reference on every
  code (what onnxruntime does too), so the result is the reference's bit for bit; with
  run-time ones: dequantize (sub, mul), the float op, quantize (real_div, round, add, clip);
- QLinearAdd, QLinearMul, QLinearGlobalAveragePool, QLinearAveragePool, QLinearSoftmax:
  the reference's float32 formula op by op (reduce_sum, avg_pool, exp, ...).
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.ops import OPS, qoperator
from applec.ops.qoperator import RANGES, multiplier

from .rules import explicit_pads, rule, unsupported
from .rules_qdq import as_float, bound, integer_operand, is_zero, note_limits

F32 = np.dtype(np.float32)
NUMPY = {"mul": np.multiply, "real_div": np.divide, "add": np.add, "sub": np.subtract}


# -- float32 values: numpy at compile time, MIL at run time ---------------------------------
def is_array(v) -> bool:
    return isinstance(v, (np.ndarray, np.generic))


def arith(lw, op: str, x, y, tag: str):
    """x `op` y in float32: folded in numpy when both are known, else one MIL op."""
    if is_array(x) and is_array(y):
        return NUMPY[op](np.asarray(x, F32), np.asarray(y, F32)).astype(F32)
    return getattr(mb, op)(x=x, y=y, name=lw.tmp(tag))


def param(lw, node, index: int, shape=(), tag: str = "param"):
    """A scale or zero point as float32 shaped to broadcast (`shape`, () per tensor): a
    numpy array when constant (0 when absent), else a MIL var."""
    value = node.input(index)
    if value is None:
        return np.zeros(shape, F32)
    if value.is_const:
        return value.const.astype(F32).reshape(shape)
    var = as_float(lw, value, F32, tag)
    if not shape or tuple(var.shape) == tuple(shape):
        return var  # one value broadcasts as it is
    return mb.reshape(x=var, shape=list(shape) or [1], name=lw.tmp(f"{tag}_shape"))


def codes(lw, value, tag: str):
    """An int8/uint8 tensor's codes as float32."""
    return as_float(lw, value, F32, tag)


def scale_multiplier(lw, node, numerators, denominator: int | None, extra=None):
    """M = extra * scale[i] * ... / scale[denominator], in the scales' float type (as the
    reference's `multiplier`), as float32; `numerators` are (input index, shape) pairs."""
    values = [node.inputs[i] for i, _ in numerators] + \
        ([node.inputs[denominator]] if denominator is not None else [])
    if all(v.is_const for v in values):
        scales = ([] if extra is None else [np.asarray(extra, F32)]) + \
            [node.inputs[i].const.reshape(shape) for i, shape in numerators]
        return multiplier(*scales, divide_by=None if denominator is None else
                          node.inputs[denominator].const)
    dtype = np.result_type(*(v.dtype for v in values))
    product = None if extra is None else np.asarray(extra, dtype)
    for i, shape in numerators:
        var = as_float(lw, node.inputs[i], dtype, f"scale{i}")
        if is_array(var):
            var = var.reshape(shape)
        elif shape and tuple(var.shape) != tuple(shape):
            var = mb.reshape(x=var, shape=list(shape), name=lw.tmp(f"scale{i}_shape"))
        product = var if product is None else scale_op(lw, "mul", product, var, f"scale{i}")
    if denominator is not None:
        product = scale_op(lw, "real_div", product, as_float(
            lw, node.inputs[denominator], dtype, "y_scale"), "multiplier")
    if dtype != F32:
        product = mb.cast(x=product, dtype="fp32", name=lw.tmp("multiplier32"))
    return product


def scale_op(lw, op: str, x, y, tag: str):
    """x `op` y in their own float type (numpy when both are constants)."""
    if is_array(x) and is_array(y):
        return NUMPY[op](x, y)
    return getattr(mb, op)(x=x, y=y, name=lw.tmp(tag))


def saturate(lw, v, dtype, name: str | None = None):
    """float32 codes clipped to `dtype`'s range, as int32 (named as output 0 by default)."""
    low, high = RANGES[np.dtype(dtype)]
    v = mb.clip(x=v, alpha=np.float32(low), beta=np.float32(high), name=lw.tmp("saturate"))
    return mb.cast(x=v, dtype="int32", name=name or lw.out_name())


def requantize(lw, node, acc, scale, zero_index: int, dtype, name: str | None = None):
    """saturate(round(acc * M) + zp): onnxruntime's requantization."""
    v = mb.round(x=arith(lw, "mul", acc, scale, "scaled"), name=lw.tmp("round"))
    if not is_zero(node.input(zero_index)):
        v = arith(lw, "add", v, param(lw, node, zero_index, tag="y_zero"), "shift")
    return saturate(lw, v, dtype, name)


def dequantize(lw, node, value, scale_index: int, zero_index: int, tag: str):
    """x_scale * (x - x_zp) in float32."""
    v = codes(lw, value, tag)
    if not is_zero(node.input(zero_index)):
        v = arith(lw, "sub", v, param(lw, node, zero_index, tag=f"{tag}_zero"), f"{tag}_shift")
    return arith(lw, "mul", param(lw, node, scale_index, tag=f"{tag}_scale"), v, f"{tag}_real")


def quantize(lw, node, v, scale_index: int, zero_index: int, dtype, name: str | None = None):
    """saturate(round(v / y_scale) + y_zp) as int32."""
    q = mb.round(x=arith(lw, "real_div", v, param(lw, node, scale_index, tag=f"s{scale_index}"),
                         f"div{scale_index}"), name=lw.tmp(f"round{scale_index}"))
    if not is_zero(node.input(zero_index)):
        q = arith(lw, "add", q, param(lw, node, zero_index, tag=f"z{zero_index}"),
                  f"shift{zero_index}")
    return saturate(lw, q, dtype, name)


def table_lookup(lw, value, table: np.ndarray, name: str):
    """table[x - lowest code]: one gather from a 256-entry int32 table."""
    low = RANGES[value.dtype][0]
    index = lw.get(value)
    if low:
        index = mb.sub(x=index, y=np.int32(low), name=lw.tmp("index"))
    return mb.gather(x=table.astype(np.int32), indices=index, axis=0, name=name)


def all_const(node, indices) -> bool:
    return all(node.input(i) is None or node.input(i).is_const for i in indices)


def every_code(dtype: np.dtype) -> np.ndarray:
    low, high = RANGES[dtype]
    return np.arange(low, high + 1).astype(dtype)


# -- QLinearConv, QLinearMatMul, QGemm ---------------------------------------------------------
@rule("QLinearConv")
def lower_qlinear_conv(lw, node):
    x, w, bias = node.inputs[0], node.inputs[3], node.input(8)
    x_zero, w_zero = node.input(2), node.input(5)
    rank, m = len(x.shape) - 2, w.shape[0]
    channel = (m,) + (1,) * (rank + 1)
    w_zero_shape = () if w_zero is None or w_zero.size == 1 else channel
    xv = integer_operand(lw, x, x_zero, (), "x")
    wv = integer_operand(lw, w, w_zero, w_zero_shape, "w")
    kernel, strides = list(w.shape[2:]), list(node.attrs.get("strides", [1] * rank))
    dilations = list(node.attrs.get("dilations", [1] * rank))
    if not is_array(wv) and not wv.op.op_type.startswith("constexpr_") \
            and any(d != 1 for d in dilations):
        unsupported(lw, "dilations with a run-time weight: MIL conv dilates constant "
                        "weights only")
    args = {"x": xv, "weight": wv, "strides": strides, "dilations": dilations,
            "pad_type": "custom", "groups": int(node.attrs.get("group", 1)),
            "pad": explicit_pads(node, x.shape[2:], kernel, strides, dilations),
            "name": lw.tmp("conv")}
    if bias is not None and bias.is_const:
        args["bias"] = bias.const.astype(np.float32)
    acc = mb.conv(**args)
    if bias is not None and not bias.is_const:
        acc = mb.add(x=acc, y=param(lw, node, 8, (m,) + (1,) * rank, "bias"),
                     name=lw.tmp("bias"))
    note_limits(lw, node, int(np.prod(w.shape[1:])), bound(x, x_zero, ()),
                bound(w, w_zero, w_zero_shape))
    w_scale = (m,) + (1,) * rank if node.inputs[4].size > 1 else ()
    scale = scale_multiplier(lw, node, [(1, ()), (4, w_scale)], 6)
    lw.bind(node.outputs[0], requantize(lw, node, acc, scale, 7, node.outputs[0].dtype))


@rule("QLinearMatMul")
def lower_qlinear_matmul(lw, node):
    a, b, out = node.inputs[0], node.inputs[3], node.outputs[0]
    shapes = OPS[node.op_type].shapes(node)
    av = integer_operand(lw, a, node.input(2), shapes[2], "a")
    bv = integer_operand(lw, b, node.input(5), shapes[5], "b")
    if len(a.shape) == 1:
        av = mb.expand_dims(x=av, axes=[0], name=lw.tmp("row"))
    if len(b.shape) == 1:
        bv = mb.expand_dims(x=bv, axes=[-1], name=lw.tmp("col"))
    acc = mb.matmul(x=av, y=bv, name=lw.tmp("matmul"))
    note_limits(lw, node, a.shape[-1], bound(a, node.input(2), shapes[2]),
                bound(b, node.input(5), shapes[5]))
    scale = scale_multiplier(lw, node, [(1, shapes[1]), (4, shapes[4])], 6)
    promoted = len(a.shape) == 1 or len(b.shape) == 1
    y = requantize(lw, node, acc, scale, 7, out.dtype, lw.tmp("promoted") if promoted else None)
    if promoted:  # numpy.matmul drops the dims it added to 1-D operands
        y = mb.reshape(x=y, shape=list(out.shape) or [1],
                       name=lw.out_name() if out.shape else lw.tmp("vector"))
        if not out.shape:
            y = mb.squeeze(x=y, name=lw.out_name())
    lw.bind(out, y)


@rule("com.microsoft.QGemm")
def lower_qgemm(lw, node):
    a, b, c, out = node.inputs[0], node.inputs[3], node.input(6), node.outputs[0]
    trans_a, trans_b = bool(node.attrs.get("transA", 0)), bool(node.attrs.get("transB", 0))
    b_zero = node.input(5)
    per_column = b_zero is not None and b_zero.size > 1
    b_zero_shape = ((b.shape[0], 1) if trans_b else (b.shape[1],)) if per_column else ()
    av = integer_operand(lw, a, node.input(2), (), "a")
    bv = integer_operand(lw, b, b_zero, b_zero_shape, "b")
    acc = mb.matmul(x=av, y=bv, transpose_x=trans_a, transpose_y=trans_b, name=lw.tmp("mm"))
    if c is not None:
        acc = arith(lw, "add", acc, param(lw, node, 6, c.shape, "bias"), "bias")
    note_limits(lw, node, a.shape[0] if trans_a else a.shape[1], bound(a, node.input(2), ()),
                bound(b, b_zero, b_zero_shape))
    n = out.shape[1]
    b_scale = (n,) if node.inputs[4].size > 1 else ()
    quantized = node.input(8) is not None
    scale = scale_multiplier(lw, node, [(1, ()), (4, b_scale)], 7 if quantized else None,
                             extra=np.float32(node.attrs.get("alpha", 1.0)))
    if quantized:
        lw.bind(out, requantize(lw, node, acc, scale, 8, out.dtype))
        return
    fp32 = lw.float_dtype == np.float32
    y = mb.mul(x=acc, y=scale, name=lw.out_name() if fp32 else lw.tmp("scaled"))
    lw.bind(out, y if fp32 else mb.cast(x=y, dtype="fp16", name=lw.out_name()))


# -- elementwise ----------------------------------------------------------------------------
@rule("com.microsoft.QLinearAdd")
def lower_qlinear_add(lw, node):
    a_scale, a_zero, b_scale, b_zero, c_scale, c_zero = (
        param(lw, node, i, tag=f"p{i}") for i in (1, 2, 4, 5, 6, 7))
    ra = arith(lw, "real_div", a_scale, c_scale, "ra")
    rb = arith(lw, "real_div", b_scale, c_scale, "rb")
    fixed = arith(lw, "sub", c_zero, arith(lw, "add", arith(lw, "mul", ra, a_zero, "ra_za"),
                                           arith(lw, "mul", rb, b_zero, "rb_zb"), "zeros"),
                  "fixed")
    v = arith(lw, "add", fixed, arith(lw, "mul", ra, codes(lw, node.inputs[0], "a"), "a_c"),
              "fixed_a")
    v = arith(lw, "add", v, arith(lw, "mul", rb, codes(lw, node.inputs[3], "b"), "b_c"), "sum")
    v = mb.round(x=v, name=lw.tmp("round"))
    lw.bind(node.outputs[0], saturate(lw, v, node.outputs[0].dtype))


@rule("com.microsoft.QLinearMul")
def lower_qlinear_mul(lw, node):
    terms = []
    for x_index, zero_index in ((0, 2), (3, 5)):
        v = codes(lw, node.inputs[x_index], f"x{x_index}")
        if not is_zero(node.input(zero_index)):
            v = arith(lw, "sub", v, param(lw, node, zero_index, tag=f"z{zero_index}"),
                      f"x{x_index}_shift")
        terms.append(v)
    product = arith(lw, "mul", terms[0], terms[1], "product")  # exact: |p| <= 65536
    scale = scale_multiplier(lw, node, [(1, ()), (4, ())], 6)
    v = arith(lw, "mul", product, scale, "scaled")
    if not is_zero(node.input(7)):
        v = arith(lw, "add", v, param(lw, node, 7, tag="c_zero"), "shift")
    v = mb.round(x=v, name=lw.tmp("round"))
    lw.bind(node.outputs[0], saturate(lw, v, node.outputs[0].dtype))


def lower_unary(lw, node, fn):
    """quantize(fn(dequantize(x))): a table when the parameters are constants."""
    x, out = node.inputs[0], node.outputs[0]
    if all_const(node, (1, 2, 3, 4)):
        table = OPS[node.op_type].reference(node, [every_code(x.dtype)] + [
            None if node.input(i) is None else node.inputs[i].const for i in (1, 2, 3, 4)])[0]
        lw.bind(out, table_lookup(lw, x, table.astype(np.int32), lw.out_name()))
        return
    v = fn(dequantize(lw, node, x, 1, 2, "x"))
    lw.bind(out, quantize(lw, node, v, 3, 4, out.dtype))


@rule("com.microsoft.QLinearSigmoid")
def lower_qlinear_sigmoid(lw, node):
    lower_unary(lw, node, lambda v: mb.sigmoid(x=v, name=lw.tmp("sigmoid")))


@rule("com.microsoft.QLinearLeakyRelu")
def lower_qlinear_leaky_relu(lw, node):
    alpha = np.float32(node.attrs.get("alpha", 0.01))
    lower_unary(lw, node, lambda v: mb.leaky_relu(x=v, alpha=alpha, name=lw.tmp("leaky")))


@rule("com.microsoft.QLinearConcat")
def lower_qlinear_concat(lw, node):
    out, parts = node.outputs[0], []
    for i in range(2, len(node.inputs), 3):
        x = node.inputs[i]
        if all_const(node, (0, 1, i + 1, i + 2)):
            y_params = [node.inputs[0].const, node.inputs[1].const]
            x_params = [node.inputs[i + 1].const, node.inputs[i + 2].const]
            if all(np.array_equal(p.reshape(()), q.reshape(())) for p, q in
                   zip(x_params, y_params)):
                parts.append(lw.get(x))  # same scale and zero point: the codes as they are
                continue
            scale, zero = (qoperator.scalar(p) for p in x_params)
            table = qoperator.quantize(qoperator.dequantize(every_code(x.dtype), scale, zero),
                                       *(qoperator.scalar(p) for p in y_params), x.dtype)
            parts.append(table_lookup(lw, x, table, lw.tmp(f"requant{i}")))
            continue
        v = dequantize(lw, node, x, i + 1, i + 2, f"x{i}")
        parts.append(quantize(lw, node, v, 0, 1, out.dtype, lw.tmp(f"codes{i}")))
    axis = int(node.attrs["axis"])
    y = mb.concat(values=parts, axis=axis, name=lw.out_name()) if len(parts) > 1 else \
        mb.identity(x=parts[0], name=lw.out_name())
    lw.bind(out, y)


# -- pooling and softmax --------------------------------------------------------------------
@rule("com.microsoft.QLinearGlobalAveragePool")
def lower_qlinear_global_average_pool(lw, node):
    x, out = node.inputs[0], node.outputs[0]
    rank = len(x.shape)
    axes = list(range(1, rank - 1)) if node.attrs.get("channels_last", 0) else \
        list(range(2, rank))
    n = math.prod(x.shape[i] for i in axes)
    acc = mb.reduce_sum(x=codes(lw, x, "x"), axes=axes, keep_dims=True, name=lw.tmp("sum"))
    if not is_zero(node.input(2)):
        shift = arith(lw, "mul", param(lw, node, 2, tag="x_zero"), np.float32(n), "x_zero_n")
        acc = arith(lw, "sub", acc, shift, "shift_sum")
    if n * 255 >= 1 << 24:
        lw.notes.append(f"{node.op_type} node '{node.name}': computed in fp32, exact while "
                        f"sums stay below 2^24; the worst case here is {n} codes up to 255")
    y_n = arith(lw, "mul", param(lw, node, 3, tag="y_scale"), np.float32(n), "y_scale_n")
    scale = arith(lw, "real_div", param(lw, node, 1, tag="x_scale"), y_n, "multiplier")
    lw.bind(out, requantize(lw, node, acc, scale, 4, out.dtype))


@rule("com.microsoft.QLinearAveragePool")
def lower_qlinear_average_pool(lw, node):
    x, out = node.inputs[0], node.outputs[0]
    rank = len(x.shape)
    last = bool(node.attrs.get("channels_last", 0))
    v = dequantize(lw, node, x, 1, 2, "x")
    spatial = x.shape[1:-1] if last else x.shape[2:]
    if last:
        v = mb.transpose(x=v, perm=[0, rank - 1] + list(range(1, rank - 1)),
                         name=lw.tmp("nchw"))
    v = average_pool(lw, node, v, spatial)
    if last:
        v = mb.transpose(x=v, perm=[0] + list(range(2, rank)) + [1], name=lw.tmp("nhwc"))
    lw.bind(out, quantize(lw, node, v, 3, 4, out.dtype))


def average_pool(lw, node, v, spatial):
    """MIL avg_pool with ONNX's pads, ceil_mode and count_include_pad (rules.lower_pool)."""
    n = len(spatial)
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * n))
    pads = explicit_pads(node, spatial, kernel, strides, [1] * n)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    if ceil_mode and pads[0::2] != pads[1::2]:
        unsupported(lw, "ceil_mode with asymmetric pads has no CoreML equivalent")
    return mb.avg_pool(x=v, kernel_sizes=kernel, strides=strides, pad_type="custom", pad=pads,
                       ceil_mode=ceil_mode,
                       exclude_padding_from_average=not node.attrs.get("count_include_pad", 0),
                       name=lw.tmp("pool"))


@rule("com.microsoft.QLinearSoftmax")
def lower_qlinear_softmax(lw, node):
    x, out = node.inputs[0], node.outputs[0]
    op = OPS[node.op_type]
    axis = op.axis(node, len(x.shape))
    v = codes(lw, x, "x")
    if op.attr(node, "opset") < 13 and axis != len(x.shape) - 1:
        v = mb.reshape(x=v, shape=list(x.shape[:axis]) + [-1], name=lw.tmp("flat"))
    top = mb.reduce_max(x=v, axes=[axis], keep_dims=True, name=lw.tmp("max"))
    shifted = mb.sub(x=v, y=top, name=lw.tmp("shifted"))
    e = mb.exp(x=arith(lw, "mul", shifted, param(lw, node, 1, tag="x_scale"), "real"),
               name=lw.tmp("exp"))
    total = mb.reduce_sum(x=e, axes=[axis], keep_dims=True, name=lw.tmp("sum"))
    y_scale = param(lw, node, 3, tag="y_scale")
    steps = np.floor(np.float32(1) / y_scale).astype(F32) if is_array(y_scale) else \
        mb.floor(x=mb.real_div(x=np.float32(1), y=y_scale, name=lw.tmp("inv")),
                 name=lw.tmp("steps"))
    q = arith(lw, "real_div", arith(lw, "mul", e, steps, "scaled"), total, "ratio")
    q = mb.round(x=q, name=lw.tmp("round"))
    if not is_zero(node.input(4)):
        q = arith(lw, "add", q, param(lw, node, 4, tag="y_zero"), "shift")
    low, high = RANGES[out.dtype]
    q = mb.clip(x=q, alpha=np.float32(low), beta=np.float32(high), name=lw.tmp("saturate"))
    if tuple(q.shape) != tuple(out.shape):
        q = mb.reshape(x=q, shape=list(out.shape), name=lw.tmp("unflat"))
    lw.bind(out, mb.cast(x=q, dtype="int32", name=lw.out_name()))

