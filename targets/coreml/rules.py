"""CoreML lowering rules, one per ONNX op (canonical form), registered by op type.

Each rule reads IR inputs through `lw.get` (MIL vars; constants become `const` ops) and
binds every IR output with `lw.bind`. Static shapes are known, so rules resolve ONNX's
data-dependent arguments (Reshape's 0/-1, Slice's clamping, auto_pad) at compile time.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from coremltools.converters.mil import Builder as mb

from applec.errors import UnsupportedOpError
from applec.ir import Node

from .lower import Lowerer

RULES: dict[str, Callable[[Lowerer, Node], None]] = {}

MAX_RANK = 5  # CoreML ML programs hold tensors of rank 0 to 5
# dtypes a program can hold after narrowing (lower.py): int64 -> int32, float64 -> fp32...
NARROWABLE = {np.dtype(t) for t in (bool, np.int8, np.int16, np.int32, np.int64, np.uint8,
                                    np.uint16, np.uint32, np.uint64, np.float16,
                                    np.float32, np.float64)}


def rule(*op_types: str):
    """Register the decorated function as the lowering of `op_types`, behind the checks
    every rule needs (`check_representable`)."""
    def register(fn):
        def checked(lw, node):
            check_representable(lw, node)
            fn(lw, node)

        checked.__name__, checked.__doc__ = fn.__name__, fn.__doc__
        for op_type in op_types:
            RULES[op_type] = checked
        return fn
    return register


def check_representable(lw: Lowerer, node: Node) -> None:
    """Refuse, at compile time, a node whose tensors CoreML cannot hold: rank above 5,
    zero elements, or a dtype with no CoreML counterpart (float8, bfloat16, int4...)."""
    for value in list(node.inputs) + list(node.outputs):
        if value is None:
            continue
        if len(value.shape) > MAX_RANK:
            unsupported(lw, f"'{value.name}' has rank {len(value.shape)}; CoreML tensors "
                            f"have rank <= {MAX_RANK}")
        if value.dtype not in NARROWABLE:
            unsupported(lw, f"'{value.name}' has dtype {value.dtype}, which CoreML lacks")
        # empty constants are read as data; an empty Split part that only Concat reads
        # never becomes a tensor (Split leaves it out, Concat skips it)
        if value.size == 0 and not value.is_const and not (
                node.op_type in ("Split", "Concat") and only_concatenated(lw, value)):
            unsupported(lw, f"'{value.name}' has shape {list(value.shape)}: CoreML cannot "
                            "hold a tensor with zero elements")


def only_concatenated(lw: Lowerer, value) -> bool:
    return bool(value.users) and all(u.op_type == "Concat" for u in value.users) \
        and all(value is not out for out in lw.graph.outputs)


def unsupported(lw: Lowerer, why: str):
    node = lw.node
    raise UnsupportedOpError(f"{node.op_type} node '{node.name}': {why}")


def x_of(lw: Lowerer, node: Node, i: int = 0):
    return lw.get(node.inputs[i])


def is_float(value) -> bool:
    return value.dtype.kind == "f"


# -- elementwise -------------------------------------------------------------------------
UNARY = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Erf": "erf", "Sqrt": "sqrt",
         "Exp": "exp", "Log": "log", "Abs": "abs", "Floor": "floor",
         "Ceil": "ceil", "Sign": "sign", "Sin": "sin", "Cos": "cos", "Softplus": "softplus",
         "Not": "logical_not"}  # Round: rules_activations (MIL rounds halves per device)


@rule(*UNARY)
def lower_unary(lw, node):
    fn = getattr(mb, UNARY[node.op_type])
    lw.bind(node.outputs[0], fn(x=x_of(lw, node), name=lw.out_name()))


@rule("Identity", "Dropout")
def lower_identity(lw, node):
    lw.bind(node.outputs[0], mb.identity(x=x_of(lw, node), name=lw.out_name()))
    if len(node.outputs) > 1:  # inference: the mask keeps everything
        mask = node.outputs[1]
        lw.bind(mask, mb.const(val=np.ones(mask.shape, bool), name=lw.out_name(1)))


@rule("Reciprocal")
def lower_reciprocal(lw, node):
    # not MIL's inverse: it computes 1 / (x + epsilon)
    x = node.inputs[0]
    lw.bind(node.outputs[0], mb.real_div(x=lw.const(1, lw.mil_dtype(x.dtype)), y=lw.get(x),
                                         name=lw.out_name()))


@rule("Neg")
def lower_neg(lw, node):
    x = node.inputs[0]
    lw.bind(node.outputs[0], mb.mul(x=lw.get(x), y=lw.const(-1, lw.mil_dtype(x.dtype)),
                                    name=lw.out_name()))


@rule("HardSigmoid")
def lower_hard_sigmoid(lw, node):
    lw.bind(node.outputs[0], mb.sigmoid_hard(
        x=x_of(lw, node), alpha=lw.scalar(node.attrs.get("alpha", 0.2)),
        beta=lw.scalar(node.attrs.get("beta", 0.5)), name=lw.out_name()))


@rule("HardSwish")
def lower_hard_swish(lw, node):
    x = x_of(lw, node)
    gate = mb.sigmoid_hard(x=x, alpha=lw.scalar(1.0 / 6), beta=lw.scalar(0.5), name=lw.tmp("gate"))
    lw.bind(node.outputs[0], mb.mul(x=x, y=gate, name=lw.out_name()))


@rule("LeakyRelu")
def lower_leaky_relu(lw, node):
    lw.bind(node.outputs[0], mb.leaky_relu(x=x_of(lw, node),
                                           alpha=lw.scalar(node.attrs.get("alpha", 0.01)),
                                           name=lw.out_name()))


@rule("Elu")
def lower_elu(lw, node):
    lw.bind(node.outputs[0], mb.elu(x=x_of(lw, node), alpha=lw.scalar(node.attrs.get("alpha", 1.0)),
                                    name=lw.out_name()))


@rule("Gelu")
def lower_gelu(lw, node):
    mode = "TANH_APPROXIMATION" if node.attrs.get("approximate", "none") == "tanh" else "EXACT"
    lw.bind(node.outputs[0], mb.gelu(x=x_of(lw, node), mode=mode, name=lw.out_name()))


@rule("Clip")
def lower_clip(lw, node):
    x = node.inputs[0]
    low, high = node.input(1), node.input(2)
    var = lw.get(x)
    lo = float(low.const) if low is not None and low.is_const else -np.inf
    hi = float(high.const) if high is not None and high.is_const else np.inf
    # MIL clip needs min < max; ONNX gives max everywhere when min > max (min first)
    if is_float(x) and (low is None or low.is_const) and (high is None or high.is_const) \
            and lo < hi:
        lo = max(lo, float(np.finfo(lw.float_dtype).min))
        hi = min(hi, float(np.finfo(lw.float_dtype).max))
        lw.bind(node.outputs[0], mb.clip(x=var, alpha=np.asarray(lo, lw.float_dtype),
                                         beta=np.asarray(hi, lw.float_dtype),
                                         name=lw.out_name()))
        return
    if low is not None:
        var = mb.maximum(x=var, y=lw.get(low),
                         name=lw.out_name() if high is None else lw.tmp("low"))
    if high is not None:
        var = mb.minimum(x=var, y=lw.get(high), name=lw.out_name())
    if low is None and high is None:
        var = mb.identity(x=var, name=lw.out_name())
    lw.bind(node.outputs[0], var)


BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Pow": "pow", "Equal": "equal",
          "Less": "less", "LessOrEqual": "less_equal", "Greater": "greater",
          "GreaterOrEqual": "greater_equal", "And": "logical_and", "Or": "logical_or",
          "Xor": "logical_xor"}


@rule(*BINARY)
def lower_binary(lw, node):
    a, b = node.inputs[:2]
    x, y = lw.get(a), lw.get(b)
    if lw.mil_dtype(a.dtype) != lw.mil_dtype(b.dtype):  # Pow(float, int exponent)
        y = mb.cast(x=y, dtype=lw.mil_dtype_name(a.dtype), name=lw.tmp("exp"))
    fn = getattr(mb, BINARY[node.op_type])
    lw.bind(node.outputs[0], fn(x=x, y=y, name=lw.out_name()))


@rule("Div")
def lower_div(lw, node):
    a, b = node.inputs[:2]
    if is_float(a):
        lw.bind(node.outputs[0], mb.real_div(x=lw.get(a), y=lw.get(b), name=lw.out_name()))
        return
    # ONNX integer division truncates toward zero; MIL's floor_div floors.
    t = truncated_quotient(lw, a, b)
    lw.bind(node.outputs[0], mb.cast(x=t, dtype="int32", name=lw.out_name()))


def truncated_quotient(lw, a, b):
    """trunc(a / b) in fp32 (MIL has floor and ceil, not trunc)."""
    fa = mb.cast(x=lw.get(a), dtype="fp32", name=lw.tmp("a")) if a.dtype.kind != "f" \
        or lw.float_dtype != np.float32 else lw.get(a)
    fb = mb.cast(x=lw.get(b), dtype="fp32", name=lw.tmp("b")) if b.dtype.kind != "f" \
        or lw.float_dtype != np.float32 else lw.get(b)
    q = mb.real_div(x=fa, y=fb, name=lw.tmp("q"))
    neg = mb.less(x=q, y=np.float32(0), name=lw.tmp("neg"))
    return mb.select(cond=neg, a=mb.ceil(x=q, name=lw.tmp("ceil")),
                     b=mb.floor(x=q, name=lw.tmp("floor")), name=lw.tmp("trunc"))


@rule("Mod")
def lower_mod(lw, node):
    a, b = node.inputs[:2]
    if not node.attrs.get("fmod", 0):
        lw.bind(node.outputs[0], mb.mod(x=lw.get(a), y=lw.get(b), name=lw.out_name()))
        return
    t = mb.cast(x=truncated_quotient(lw, a, b), dtype=lw.mil_dtype_name(a.dtype),
                name=lw.tmp("tq"))
    lw.bind(node.outputs[0], mb.sub(x=lw.get(a), y=mb.mul(x=t, y=lw.get(b), name=lw.tmp("ty")),
                                    name=lw.out_name()))


@rule("Max", "Min", "Sum", "Mean")
def lower_variadic(lw, node):
    fn = {"Max": mb.maximum, "Min": mb.minimum, "Sum": mb.add, "Mean": mb.add}[node.op_type]
    vars_ = [lw.get(v) for v in node.inputs]
    last = node.op_type != "Mean"
    acc = vars_[0]
    if len(vars_) == 1:
        acc = mb.identity(x=acc, name=lw.out_name() if last else lw.tmp("acc"))
    for i, var in enumerate(vars_[1:], 1):
        final = last and i == len(vars_) - 1
        acc = fn(x=acc, y=var, name=lw.out_name() if final else lw.tmp(f"acc{i}"))
    if not last:
        acc = mb.mul(x=acc, y=lw.const(1.0 / len(vars_), lw.float_dtype), name=lw.out_name())
    lw.bind(node.outputs[0], acc)


@rule("Where")
def lower_where(lw, node):
    cond, a, b = node.inputs
    shape = node.outputs[0].shape
    # MIL select takes its shape from a and b alone: a wider cond must widen one of them
    if np.broadcast_shapes(a.shape, b.shape) != shape:
        a_var = broadcast_to(lw, a, shape)
    else:
        a_var = lw.get(a)
    lw.bind(node.outputs[0], mb.select(cond=lw.get(cond), a=a_var, b=lw.get(b),
                                       name=lw.out_name()))


def broadcast_to(lw, value, shape):
    """`value` broadcast to `shape` (numpy rules): constants in place, vars by tiling."""
    shape = tuple(shape)
    if value.is_const:
        return lw.array(np.broadcast_to(value.const, shape), value.name)
    var = lw.get(value)
    if value.shape == shape:
        return var
    padded = (1,) * (len(shape) - len(value.shape)) + tuple(value.shape)
    if padded != value.shape:
        var = mb.reshape(x=var, shape=list(padded), name=lw.tmp("rank"))
    if padded == shape:
        return var
    return mb.tile(x=var, reps=[o // p for o, p in zip(shape, padded)], name=lw.tmp("tile"))


@rule("Cast", "CastLike")
def lower_cast(lw, node):
    x = node.inputs[0]
    target = node.outputs[0].dtype
    want = lw.mil_dtype_name(target)
    if lw.mil_dtype_name(x.dtype) == want:
        lw.bind(node.outputs[0], mb.identity(x=lw.get(x), name=lw.out_name()))
    else:
        lw.bind(node.outputs[0], mb.cast(x=lw.get(x), dtype=want, name=lw.out_name()))


# -- activations with an axis -----------------------------------------------------------
@rule("Softmax")
def lower_softmax(lw, node):
    lw.bind(node.outputs[0], mb.softmax(x=x_of(lw, node), axis=node.attrs.get("axis", -1),
                                        name=lw.out_name()))


@rule("LogSoftmax")
def lower_log_softmax(lw, node):
    x = x_of(lw, node)
    axis = node.attrs.get("axis", -1)
    lse = mb.reduce_log_sum_exp(x=x, axes=[axis], keep_dims=True, name=lw.tmp("lse"))
    lw.bind(node.outputs[0], mb.sub(x=x, y=lse, name=lw.out_name()))


# -- matrix products ---------------------------------------------------------------------
@rule("MatMul")
def lower_matmul(lw, node):
    a, b = node.inputs[:2]
    if b.is_const and len(b.shape) == 2 and 1 <= len(a.shape) <= 3:
        weight = lw.array(b.const.T, b.name)  # linear takes [out, in]
        lw.bind(node.outputs[0], mb.linear(x=lw.get(a), weight=weight, name=lw.out_name()))
        return
    x, y = lw.get(a), lw.get(b)
    if len(a.shape) > 1 and len(b.shape) > 1:
        lw.bind(node.outputs[0], mb.matmul(x=x, y=y, name=lw.out_name()))
        return
    # numpy semantics for 1-D operands: promote to a matrix, multiply, drop the added dim
    if len(a.shape) == 1:
        x = mb.expand_dims(x=x, axes=[0], name=lw.tmp("row"))
    if len(b.shape) == 1:
        y = mb.expand_dims(x=y, axes=[-1], name=lw.tmp("col"))
    product = mb.matmul(x=x, y=y, name=lw.tmp("mm"))
    lw.bind(node.outputs[0], mb.reshape(x=product, shape=list(node.outputs[0].shape) or [1],
                                        name=lw.out_name()) if node.outputs[0].shape
            else mb.squeeze(x=product, name=lw.out_name()))


@rule("Gemm")
def lower_gemm(lw, node):
    a, b, c = node.inputs[0], node.inputs[1], node.input(2)
    alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
    trans_a, trans_b = node.attrs.get("transA", 0), node.attrs.get("transB", 0)
    n = node.outputs[0].shape[1]
    x = lw.get(a)
    if trans_a:
        x = mb.transpose(x=x, perm=[1, 0], name=lw.tmp("at"))
    bias_ok = c is None or (c.is_const and c.const.size in (1, n) and
                            (c.const.ndim < 2 or c.const.shape[0] == 1))
    if b.is_const and bias_ok:
        weight = b.const if trans_b else b.const.T
        weight = lw.array(weight.astype(np.float64) * alpha, b.name)
        args = {"x": x, "weight": weight, "name": lw.out_name()}
        if c is not None and beta != 0:
            args["bias"] = lw.array(np.broadcast_to(c.const.reshape(-1) * beta, (n,)), c.name)
        lw.bind(node.outputs[0], mb.linear(**args))
        return
    y = mb.matmul(x=x, y=lw.get(b), transpose_y=bool(trans_b),
                  name=lw.out_name() if c is None and alpha == 1 else lw.tmp("mm"))
    if alpha != 1:
        y = mb.mul(x=y, y=lw.const(alpha, lw.float_dtype),
                   name=lw.out_name() if c is None else lw.tmp("alpha"))
    if c is not None:
        cv = lw.get(c)
        if beta != 1:
            cv = mb.mul(x=cv, y=lw.const(beta, lw.float_dtype), name=lw.tmp("beta"))
        y = mb.add(x=y, y=cv, name=lw.out_name())
    lw.bind(node.outputs[0], y)


# -- convolution, pooling, normalization ------------------------------------------------
def explicit_pads(node: Node, in_spatial, kernel, strides, dilations) -> list[int]:
    """MIL custom pads [b0, e0, b1, e1, ...] from ONNX pads/auto_pad on static shapes."""
    n = len(in_spatial)
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads += [small, big] if auto_pad == "SAME_UPPER" else [big, small]
        return pads
    if auto_pad == "VALID":
        return [0] * (2 * n)
    onnx_pads = list(node.attrs.get("pads", [0] * (2 * n)))
    return [p for i in range(n) for p in (onnx_pads[i], onnx_pads[i + n])]


def conv_args(lw, node) -> tuple[dict, list[int], list[int], list[int]]:
    """MIL arguments Conv and ConvTranspose share (pads left to the caller), and the
    kernel, strides and dilations they are computed from."""
    x, w, b = node.inputs[0], node.inputs[1], node.input(2)
    n = len(x.shape) - 2
    kernel = list(w.shape[2:])
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    args = {"x": lw.get(x), "weight": lw.get(w), "strides": strides, "dilations": dilations,
            "pad_type": "custom", "groups": int(node.attrs.get("group", 1)),
            "name": lw.out_name()}
    if b is not None:
        args["bias"] = lw.get(b)
    return args, kernel, strides, dilations


@rule("Conv")
def lower_conv(lw, node):
    args, kernel, strides, dilations = conv_args(lw, node)
    args["pad"] = explicit_pads(node, node.inputs[0].shape[2:], kernel, strides, dilations)
    lw.bind(node.outputs[0], mb.conv(**args))


@rule("ConvTranspose")
def lower_conv_transpose(lw, node):
    args, kernel, strides, dilations = conv_args(lw, node)
    in_spatial, out = node.inputs[0].shape[2:], node.outputs[0].shape
    n = len(in_spatial)
    full = [(i - 1) * s + (k - 1) * d + 1
            for i, s, k, d in zip(in_spatial, strides, kernel, dilations)]
    extra = list(node.attrs.get("output_padding", [0] * n))
    args["pad"] = transpose_pads(node, full, out[2:], extra, n)
    args["output_shape"] = np.asarray(out, np.int32)
    lw.bind(node.outputs[0], mb.conv_transpose(**args))


def transpose_pads(node: Node, full, out_spatial, extra, n) -> list[int]:
    """ConvTranspose pads [b0, e0, ...]: output = full - b - e + output_padding."""
    auto_pad = node.attrs.get("auto_pad", "NOTSET")
    if "output_shape" in node.attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for f, out, e in zip(full, out_spatial, extra):
            total = max(f + e - out, 0)
            small, big = total // 2, total - total // 2
            pads += [small, big] if auto_pad == "SAME_UPPER" else [big, small]
        return pads
    onnx_pads = list(node.attrs.get("pads", [0] * (2 * n)))
    return [p for i in range(n) for p in (onnx_pads[i], onnx_pads[i + n])]


@rule("MaxPool", "AveragePool")
def lower_pool(lw, node):
    x = node.inputs[0]
    n = len(x.shape) - 2
    kernel = list(node.attrs["kernel_shape"])
    strides = list(node.attrs.get("strides", [1] * n))
    dilations = list(node.attrs.get("dilations", [1] * n))
    if any(d != 1 for d in dilations):
        unsupported(lw, "dilated pooling has no CoreML equivalent")
    if len(node.outputs) > 1 and node.outputs[1].users:
        unsupported(lw, "the Indices output is not supported")
    pads = explicit_pads(node, x.shape[2:], kernel, strides, dilations)
    ceil_mode = bool(node.attrs.get("ceil_mode", 0))
    if ceil_mode and node.op_type == "MaxPool":
        # exact in floor mode with end pads sized for the static output (pads are -inf)
        pads = floor_mode_pads(x.shape[2:], node.outputs[0].shape[2:], kernel, strides, pads)
        ceil_mode = False
    elif ceil_mode and pads[0::2] != pads[1::2]:
        unsupported(lw, "ceil_mode with asymmetric pads has no CoreML equivalent")
    var = lw.get(x)
    if not is_float(x):  # MIL pools floats only; 8/16-bit ints are exact in fp32
        var = mb.cast(x=var, dtype="fp32", name=lw.tmp("float"))
    args = {"x": var, "kernel_sizes": kernel, "strides": strides, "pad_type": "custom",
            "pad": pads, "ceil_mode": ceil_mode,
            "name": lw.out_name() if is_float(x) else lw.tmp("pool")}
    if node.op_type == "MaxPool":
        var = mb.max_pool(**args)
    else:
        args["exclude_padding_from_average"] = not node.attrs.get("count_include_pad", 0)
        var = mb.avg_pool(**args)
    if not is_float(x):
        var = mb.cast(x=var, dtype="int32", name=lw.out_name())
    lw.bind(node.outputs[0], var)


def floor_mode_pads(in_spatial, out_spatial, kernel, strides, pads) -> list[int]:
    """End pads that make floor-mode pooling produce `out_spatial` windows."""
    result = list(pads)
    for i, (size, out, k, s) in enumerate(zip(in_spatial, out_spatial, kernel, strides)):
        result[2 * i + 1] = max((out - 1) * s + k - size - pads[2 * i], 0)
    return result


@rule("GlobalAveragePool", "GlobalMaxPool")
def lower_global_pool(lw, node):
    axes = list(range(2, len(node.inputs[0].shape)))
    fn = mb.reduce_mean if node.op_type == "GlobalAveragePool" else mb.reduce_max
    lw.bind(node.outputs[0], fn(x=x_of(lw, node), axes=axes, keep_dims=True,
                                name=lw.out_name()))


@rule("BatchNormalization")
def lower_batch_norm(lw, node):
    x = node.inputs[0]
    params = node.inputs[1:5]
    eps = float(node.attrs.get("epsilon", 1e-5))
    bshape = [-1] + [1] * (len(x.shape) - 2)
    if not all(p.is_const for p in params):  # run-time statistics: the formula itself
        gamma, beta, mean, var = (per_channel(lw, p, bshape, k) for p, k in
                                  zip(params, ("gamma", "beta", "mean", "var")))
        scale = mb.mul(x=gamma, y=mb.rsqrt(x=var, epsilon=lw.scalar(eps), name=lw.tmp("inv")),
                       name=lw.tmp("scale"))
        centered = mb.sub(x=lw.get(x), y=mean, name=lw.tmp("centered"))
        y = mb.mul(x=centered, y=scale, name=lw.tmp("scaled"))
        lw.bind(node.outputs[0], mb.add(x=y, y=beta, name=lw.out_name()))
        return
    gamma, beta, mean, var = (p.const.astype(np.float64) for p in params)
    if 3 <= len(x.shape) <= 5:
        lw.bind(node.outputs[0], mb.batch_norm(
            x=lw.get(x), mean=lw.array(mean, "mean"), variance=lw.array(var, "var"),
            gamma=lw.array(gamma, "gamma"), beta=lw.array(beta, "beta"),
            epsilon=lw.scalar(eps), name=lw.out_name()))
        return
    scale = gamma / np.sqrt(var + eps)
    shift = beta - mean * scale
    y = mb.mul(x=lw.get(x), y=lw.array(scale.reshape(bshape), "scale"), name=lw.tmp("scale"))
    lw.bind(node.outputs[0], mb.add(x=y, y=lw.array(shift.reshape(bshape), "shift"),
                                    name=lw.out_name()))


def per_channel(lw, value, shape, suffix: str):
    """A (C,) parameter reshaped to broadcast over (N, C, *spatial)."""
    if value.is_const:
        return lw.array(value.const.reshape(shape), value.name)
    return mb.reshape(x=lw.get(value), shape=shape, name=lw.tmp(suffix))


@rule("InstanceNormalization")
def lower_instance_norm(lw, node):
    x, gamma, beta = node.inputs[:3]
    eps = lw.scalar(node.attrs.get("epsilon", 1e-5))
    rank = len(x.shape)
    if 3 <= rank <= 4 and gamma.is_const and beta.is_const:  # MIL instance_norm's case
        lw.bind(node.outputs[0], mb.instance_norm(
            x=lw.get(x), gamma=lw.array(gamma.const, gamma.name),
            beta=lw.array(beta.const, beta.name), epsilon=eps, name=lw.out_name()))
        return
    if 3 <= rank <= 4:
        y = mb.instance_norm(x=lw.get(x), epsilon=eps, name=lw.tmp("norm"))
    else:
        axes = list(range(2, rank))
        mean = mb.reduce_mean(x=lw.get(x), axes=axes, keep_dims=True, name=lw.tmp("mean"))
        centered = mb.sub(x=lw.get(x), y=mean, name=lw.tmp("centered"))
        var = mb.reduce_mean(x=mb.mul(x=centered, y=centered, name=lw.tmp("sq")), axes=axes,
                             keep_dims=True, name=lw.tmp("var"))
        y = mb.mul(x=centered, y=mb.rsqrt(x=var, epsilon=eps, name=lw.tmp("inv")),
                   name=lw.tmp("norm"))
    bshape = [-1] + [1] * (rank - 2)
    y = mb.mul(x=y, y=per_channel(lw, gamma, bshape, "gamma"), name=lw.tmp("scaled"))
    lw.bind(node.outputs[0], mb.add(x=y, y=per_channel(lw, beta, bshape, "beta"),
                                    name=lw.out_name()))


@rule("LayerNormalization")
def lower_layer_norm(lw, node):
    x, scale, bias = node.inputs[0], node.input(1), node.input(2)
    rank = len(x.shape)
    axis = node.attrs.get("axis", -1) % rank
    axes = list(range(axis, rank))
    norm_shape = x.shape[axis:]
    if len(node.outputs) > 1:
        layer_norm_stats(lw, node, axes)
    args = {"x": lw.get(x), "axes": axes, "epsilon": lw.scalar(node.attrs.get("epsilon", 1e-5))}
    affine_in_op = all(v is None or v.is_const for v in (scale, bias))
    if affine_in_op:
        if scale is not None:
            args["gamma"] = lw.array(np.broadcast_to(scale.const, norm_shape), scale.name)
        if bias is not None:
            args["beta"] = lw.array(np.broadcast_to(bias.const, norm_shape), bias.name)
        lw.bind(node.outputs[0], mb.layer_norm(**args, name=lw.out_name()))
        return
    y = mb.layer_norm(**args, name=lw.tmp("norm"))
    y = mb.mul(x=y, y=lw.get(scale), name=lw.out_name() if bias is None else lw.tmp("scale"))
    if bias is not None:
        y = mb.add(x=y, y=lw.get(bias), name=lw.out_name())
    lw.bind(node.outputs[0], y)


def layer_norm_stats(lw, node, axes):
    """LayerNormalization's optional Mean and InvStdDev outputs, computed separately."""
    x = lw.get(node.inputs[0])
    eps = lw.scalar(node.attrs.get("epsilon", 1e-5))
    mean = mb.reduce_mean(x=x, axes=axes, keep_dims=True, name=lw.out_name(1))
    lw.bind(node.outputs[1], mean)
    if len(node.outputs) > 2:
        centered = mb.sub(x=x, y=mean, name=lw.tmp("centered"))
        var = mb.reduce_mean(x=mb.mul(x=centered, y=centered, name=lw.tmp("sq")), axes=axes,
                             keep_dims=True, name=lw.tmp("var"))
        lw.bind(node.outputs[2], mb.rsqrt(x=var, epsilon=eps, name=lw.out_name(2)))


@rule("LRN")
def lower_lrn(lw, node):
    lw.bind(node.outputs[0], mb.local_response_norm(
        x=x_of(lw, node), size=int(node.attrs["size"]),
        alpha=lw.scalar(node.attrs.get("alpha", 1e-4)), beta=lw.scalar(node.attrs.get("beta", 0.75)),
        k=lw.scalar(node.attrs.get("bias", 1.0)), name=lw.out_name()))


# -- reductions --------------------------------------------------------------------------
REDUCE = {"ReduceMean": "reduce_mean", "ReduceSum": "reduce_sum", "ReduceMax": "reduce_max",
          "ReduceMin": "reduce_min", "ReduceProd": "reduce_prod", "ReduceL2": "reduce_l2_norm",
          "ReduceL1": "reduce_l1_norm", "ReduceSumSquare": "reduce_sum_square",
          "ReduceLogSumExp": "reduce_log_sum_exp"}


# a reduction over no axes still applies its elementwise part
NOOP_REDUCE = {"ReduceSumSquare": mb.square, "ReduceL1": mb.abs, "ReduceL2": mb.abs}


@rule(*REDUCE)
def lower_reduce(lw, node):
    x = node.inputs[0]
    axes = node.input(1)
    axes = [int(a) for a in axes.const.reshape(-1)] if axes is not None else []
    keep = bool(node.attrs.get("keepdims", 1))
    if not axes and node.attrs.get("noop_with_empty_axes", 0):
        fn = NOOP_REDUCE.get(node.op_type, mb.identity)
        lw.bind(node.outputs[0], fn(x=lw.get(x), name=lw.out_name()))
        return
    axes = axes or list(range(len(x.shape)))
    fn = getattr(mb, REDUCE[node.op_type])
    if x.dtype == bool:  # ReduceMax/Min: any/all; MIL reduces numbers only
        var = mb.cast(x=lw.get(x), dtype="int32", name=lw.tmp("int"))
        var = fn(x=var, axes=axes, keep_dims=keep, name=lw.tmp("reduce"))
        lw.bind(node.outputs[0], mb.cast(x=var, dtype="bool", name=lw.out_name()))
        return
    lw.bind(node.outputs[0], fn(x=lw.get(x), axes=axes, keep_dims=keep, name=lw.out_name()))


@rule("ArgMax", "ArgMin")
def lower_arg_reduce(lw, node):
    fn = mb.reduce_argmax if node.op_type == "ArgMax" else mb.reduce_argmin
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", 0)) % len(x.shape)
    keep = bool(node.attrs.get("keepdims", 1))
    if not node.attrs.get("select_last_index", 0):
        lw.bind(node.outputs[0], fn(x=lw.get(x), axis=axis, keep_dims=keep,
                                    name=lw.out_name()))
        return
    # the last extreme is the first one of the reversed tensor
    flipped = mb.reverse(x=lw.get(x), axes=[axis], name=lw.tmp("rev"))
    index = fn(x=flipped, axis=axis, keep_dims=keep, name=lw.tmp("idx"))
    lw.bind(node.outputs[0], mb.sub(x=np.int32(x.shape[axis] - 1), y=index,
                                    name=lw.out_name()))


# -- layout --------------------------------------------------------------------------------
@rule("Reshape", "Flatten", "Squeeze", "Unsqueeze")
def lower_reshape(lw, node):
    out = node.outputs[0]
    x = x_of(lw, node)
    if len(out.shape) == 0:
        lw.bind(out, mb.squeeze(x=x, name=lw.out_name()))
    else:
        lw.bind(out, mb.reshape(x=x, shape=list(out.shape), name=lw.out_name()))


@rule("Transpose")
def lower_transpose(lw, node):
    rank = len(node.inputs[0].shape)
    perm = list(node.attrs.get("perm", list(range(rank))[::-1]))
    lw.bind(node.outputs[0], mb.transpose(x=x_of(lw, node), perm=perm, name=lw.out_name()))


@rule("Concat")
def lower_concat(lw, node):
    values = [lw.get(v) for v in node.inputs if v is not None and v.size != 0]
    if len(values) == 1:
        lw.bind(node.outputs[0], mb.identity(x=values[0], name=lw.out_name()))
        return
    lw.bind(node.outputs[0], mb.concat(values=values, axis=int(node.attrs["axis"]),
                                       name=lw.out_name()))


@rule("Split")
def lower_split(lw, node):
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", 0)) % len(x.shape)
    outputs = [v for v in node.outputs if v.shape[axis]]  # empty parts: see Concat
    if len(outputs) == 1:
        lw.bind(outputs[0], mb.identity(x=lw.get(x), name=lw.unique(outputs[0].name)))
        return
    parts = mb.split(x=lw.get(x), split_sizes=[v.shape[axis] for v in outputs], axis=axis,
                     name=lw.tmp("split"))
    for value, part in zip(outputs, parts):
        lw.bind(value, part)


@rule("Slice")
def lower_slice(lw, node):
    x = node.inputs[0]
    rank = len(x.shape)
    starts, ends = node.inputs[1].const, node.inputs[2].const
    axes = node.input(3).const if node.input(3) is not None else np.arange(len(starts))
    steps = node.input(4).const if node.input(4) is not None else np.ones(len(starts), int)
    begin, end, stride = [0] * rank, list(x.shape), [1] * rank
    end_mask = [False] * rank
    for start, stop, axis, step in zip(starts, ends, axes, steps):
        axis = int(axis) % rank
        dim = x.shape[axis]
        first, last_bound, step = slice(int(start), int(stop), int(step)).indices(dim)
        count = len(range(first, last_bound, step))
        if count == 0:
            unsupported(lw, "a slice of size 0 cannot be held by CoreML")
        last = first + (count - 1) * step
        begin[axis], stride[axis] = first, step
        if step > 0:
            end[axis] = last + 1
        elif last - 1 >= 0:
            end[axis] = last - 1
        else:
            end[axis], end_mask[axis] = 0, True
    lw.bind(node.outputs[0], mb.slice_by_index(
        x=lw.get(x), begin=np.asarray(begin, np.int32), end=np.asarray(end, np.int32),
        stride=np.asarray(stride, np.int32), end_mask=end_mask, name=lw.out_name()))


@rule("Expand")
def lower_expand(lw, node):
    x, out = node.inputs[0], node.outputs[0]
    var = lw.get(x)
    if x.shape == out.shape:
        lw.bind(out, mb.identity(x=var, name=lw.out_name()))
        return
    padded = (1,) * (len(out.shape) - len(x.shape)) + tuple(x.shape)
    if padded != x.shape:
        var = mb.reshape(x=var, shape=list(padded), name=lw.tmp("rank"))
    reps = [o // p for o, p in zip(out.shape, padded)]
    lw.bind(out, mb.tile(x=var, reps=reps, name=lw.out_name()))


@rule("Tile")
def lower_tile(lw, node):
    reps = [int(r) for r in node.inputs[1].const.reshape(-1)]
    lw.bind(node.outputs[0], mb.tile(x=x_of(lw, node), reps=reps, name=lw.out_name()))


@rule("ConstantOfShape")
def lower_constant_of_shape(lw, node):
    out = node.outputs[0]
    value = node.attrs.get("value", np.zeros(1, np.float32)).reshape(-1)[0]
    lw.bind(out, mb.fill(shape=np.asarray(out.shape, np.int32),
                         value=lw.array(np.asarray(value, out.dtype)), name=lw.out_name()))


@rule("Range")
def lower_range(lw, node):
    lw.bind(node.outputs[0], mb.range_1d(start=x_of(lw, node, 0), end=x_of(lw, node, 1),
                                         step=x_of(lw, node, 2), name=lw.out_name()))


@rule("Pad")
def lower_pad(lw, node):
    """Crop the negative pads, then pad: MIL pad for floats, a gather per axis for edge and
    reflect on integers, concatenated fill blocks for constant integers (MIL pad takes
    floats only; going through fp32 would round integers above 2**24)."""
    x = node.inputs[0]
    rank = len(x.shape)
    pads = [int(p) for p in node.inputs[1].const.reshape(-1)]
    axes = node.input(3)
    axes = [int(a) % rank for a in axes.const] if axes is not None else list(range(rank))
    full = [0] * (2 * rank)
    for i, axis in enumerate(axes):
        full[2 * axis], full[2 * axis + 1] = pads[i], pads[i + len(axes)]
    mode = node.attrs.get("mode", "constant")
    if mode not in ("constant", "reflect", "edge"):
        unsupported(lw, f"mode '{mode}' is not supported")
    begin = [max(-full[2 * i], 0) for i in range(rank)]
    end = [d - max(-full[2 * i + 1], 0) for i, d in enumerate(x.shape)]
    inner = [e - b for b, e in zip(begin, end)]
    full = [max(p, 0) for p in full]
    var = lw.get(x)
    if inner != list(x.shape):
        var = mb.slice_by_index(x=var, begin=np.asarray(begin, np.int32),
                                end=np.asarray(end, np.int32),
                                name=lw.tmp("crop") if any(full) else lw.out_name())
    elif not any(full):
        var = mb.identity(x=var, name=lw.out_name())
    if any(full):
        # MIL replicates at most a whole dim; ONNX edge mode repeats the edge any number
        native = is_float(x) and (mode != "edge" or all(
            max(full[2 * i], full[2 * i + 1]) <= d for i, d in enumerate(inner)))
        if native:
            var = pad_native(lw, node, var, inner, full, mode)
        elif mode == "constant":
            var = pad_by_concat(lw, node, var, inner, full)
        else:
            var = pad_by_gather(lw, var, inner, full, mode)
    lw.bind(node.outputs[0], var)


def pad_value(lw, node):
    """constant_value as a number, or a MIL var when it is only known at run time."""
    value = node.input(2)
    if value is None or (value.is_const and value.size == 0):
        return 0
    if value.is_const:
        return value.const.reshape(-1)[0]
    return lw.get(value)


def pad_native(lw, node, var, inner, full, mode):
    """MIL pad (floats); a run-time constant_value is selected in around the interior."""
    first = next(i for i, p in enumerate(full) if p) // 2  # MIL pads the last dims only
    value = pad_value(lw, node)
    dynamic = not isinstance(value, (int, float, np.generic))
    padded = mb.pad(x=var, pad=np.asarray(full[2 * first:], np.int32),
                    mode={"edge": "replicate"}.get(mode, mode),
                    constant_val=lw.scalar(0 if dynamic else float(value)),
                    name=lw.tmp("pad") if dynamic and mode == "constant" else lw.out_name())
    if not dynamic or mode != "constant":
        return padded
    return select_interior(lw, padded, value, inner, full)


def select_interior(lw, padded, value_var, inner, full):
    interior = np.pad(np.ones(inner, bool), list(zip(full[0::2], full[1::2])))
    fill = mb.reshape(x=value_var, shape=[1] * len(inner), name=lw.tmp("value"))
    return mb.select(cond=interior, a=padded, b=fill, name=lw.out_name())


def pad_by_concat(lw, node, var, inner, full):
    """Constant padding of integers and bools: fill blocks concatenated on each axis."""
    dtype = lw.mil_dtype(node.inputs[0].dtype)
    value = pad_value(lw, node)
    dynamic = not isinstance(value, (int, float, np.generic))
    shape = list(inner)
    padded_axes = [i for i in range(len(shape)) if full[2 * i] or full[2 * i + 1]]
    for n, axis in enumerate(padded_axes):
        parts = []
        for width, after in ((full[2 * axis], False), (full[2 * axis + 1], True)):
            if width:
                block = shape[:axis] + [width] + shape[axis + 1:]
                parts.append(np.full(block, 0 if dynamic else value, dtype))
            if not after:
                parts.append(var)
        shape[axis] += full[2 * axis] + full[2 * axis + 1]
        last = n == len(padded_axes) - 1 and not dynamic
        var = mb.concat(values=parts, axis=axis,
                        name=lw.out_name() if last else lw.tmp(f"pad{axis}"))
    return select_interior(lw, var, value, inner, full) if dynamic else var


def pad_by_gather(lw, var, inner, full, mode):
    """Edge/reflect padding as one gather per padded axis: the source index of every
    output position is numpy.pad of the positions themselves."""
    padded_axes = [i for i in range(len(inner)) if full[2 * i] or full[2 * i + 1]]
    for n, axis in enumerate(padded_axes):
        index = np.pad(np.arange(inner[axis]), (full[2 * axis], full[2 * axis + 1]),
                       mode=mode)
        last = n == len(padded_axes) - 1
        var = mb.gather(x=var, indices=index.astype(np.int32), axis=axis,
                        name=lw.out_name() if last else lw.tmp(f"pad{axis}"))
    return var


# -- indexing ------------------------------------------------------------------------------
@rule("Gather")
def lower_gather(lw, node):
    data, indices = node.inputs[:2]
    axis = int(node.attrs.get("axis", 0)) % len(data.shape)
    dim = data.shape[axis]
    if indices.is_const:
        idx = lw.array(np.where(indices.const < 0, indices.const + dim, indices.const))
    else:
        idx = wrap_negative(lw, lw.get(indices), dim)
    x, was_bool = bool_as_int(lw, data)
    y = mb.gather(x=x, indices=idx, axis=axis,
                  name=lw.tmp("gather") if was_bool else lw.out_name())
    lw.bind(node.outputs[0], from_int(lw, y, was_bool))


@rule("IsNaN")
def lower_isnan(lw, node):
    x = x_of(lw, node)  # NaN is the one value not equal to itself
    lw.bind(node.outputs[0], mb.not_equal(x=x, y=x, name=lw.out_name()))


@rule("IsInf")
def lower_isinf(lw, node):
    x = node.inputs[0]
    var, dtype = lw.get(x), lw.mil_dtype(x.dtype)
    tests = [mb.equal(x=var, y=np.asarray(sign * np.inf, dtype), name=lw.tmp(attr))
             for attr, sign in (("detect_negative", -1), ("detect_positive", 1))
             if node.attrs.get(attr, 1)]
    if not tests:
        mask = mb.not_equal(x=var, y=var, name=lw.tmp("nan"))
        lw.bind(node.outputs[0], mb.logical_and(x=mask, y=mb.logical_not(
            x=mask, name=lw.tmp("not")), name=lw.out_name()))
    elif len(tests) == 1:
        lw.bind(node.outputs[0], mb.identity(x=tests[0], name=lw.out_name()))
    else:
        lw.bind(node.outputs[0], mb.logical_or(x=tests[0], y=tests[1], name=lw.out_name()))


def bool_as_int(lw, value):
    """MIL's gathers take no bool data: gather an int32 copy and cast the result back."""
    var = lw.get(value)
    if value.dtype.kind != "b":
        return var, False
    return mb.cast(x=var, dtype="int32", name=lw.tmp("as_int")), True


def from_int(lw, var, was_bool: bool):
    return mb.cast(x=var, dtype="bool", name=lw.out_name()) if was_bool else var


@rule("GatherElements")
def lower_gather_elements(lw, node):
    data, indices = node.inputs[:2]
    axis = int(node.attrs.get("axis", 0)) % len(data.shape)
    x, was_bool = bool_as_int(lw, data)
    # ONNX reads only the leading part of data in the other dims; MIL wants equal sizes
    end = [d if i == axis else n for i, (d, n) in enumerate(zip(data.shape, indices.shape))]
    if list(data.shape) != end:
        x = mb.slice_by_index(x=x, begin=np.zeros(len(end), np.int32),
                              end=np.asarray(end, np.int32), name=lw.tmp("crop"))
    idx = lw.get(indices)
    if not indices.is_const:
        idx = wrap_negative(lw, idx, data.shape[axis])
    else:
        idx = lw.array(np.where(indices.const < 0, indices.const + data.shape[axis],
                                indices.const))
    y = mb.gather_along_axis(x=x, indices=idx, axis=axis,
                             name=lw.tmp("gather") if was_bool else lw.out_name())
    lw.bind(node.outputs[0], from_int(lw, y, was_bool))


def wrap_negative(lw, raw, dim: int):
    """Run-time indices: i < 0 -> i + dim (ONNX allows negative indices)."""
    neg = mb.less(x=raw, y=np.int32(0), name=lw.tmp("neg"))
    shifted = mb.add(x=raw, y=np.int32(dim), name=lw.tmp("wrap"))
    return mb.select(cond=neg, a=shifted, b=raw, name=lw.tmp("idx"))


@rule("GatherND")
def lower_gather_nd(lw, node):
    x, was_bool = bool_as_int(lw, node.inputs[0])
    args = {"x": x, "indices": x_of(lw, node, 1),
            "name": lw.tmp("gather") if was_bool else lw.out_name()}
    if node.attrs.get("batch_dims", 0):
        args["batch_dims"] = int(node.attrs["batch_dims"])  # iOS17+ gather_nd
    lw.bind(node.outputs[0], from_int(lw, mb.gather_nd(**args), was_bool))


@rule("TopK")
def lower_topk(lw, node):
    k = int(node.inputs[1].const.reshape(-1)[0])
    values, indices = mb.topk(x=x_of(lw, node), k=k, axis=int(node.attrs.get("axis", -1)),
                              ascending=not node.attrs.get("largest", 1), name=lw.tmp("topk"))
    lw.bind(node.outputs[0], values)
    lw.bind(node.outputs[1], indices)


@rule("CumSum")
def lower_cumsum(lw, node):
    axis = int(node.inputs[1].const.reshape(-1)[0])
    lw.bind(node.outputs[0], mb.cumsum(x=x_of(lw, node), axis=axis,
                                       exclusive=bool(node.attrs.get("exclusive", 0)),
                                       reverse=bool(node.attrs.get("reverse", 0)),
                                       name=lw.out_name()))


@rule("Trilu")
def lower_trilu(lw, node):
    x = node.inputs[0]
    k = int(node.input(1).const) if node.input(1) is not None else 0
    rows, cols = x.shape[-2:]
    i, j = np.arange(rows)[:, None], np.arange(cols)[None, :]
    keep = (j - i >= k) if node.attrs.get("upper", 1) else (j - i <= k)
    zeros = np.zeros((), lw.mil_dtype(x.dtype))
    lw.bind(node.outputs[0], mb.select(cond=keep, a=lw.get(x), b=zeros, name=lw.out_name()))


# the rules of the fused ops, Resize, If and LSTM, one module each
from . import rules_control, rules_fused, rules_qdq, rules_resize, rules_rnn  # noqa: E402,F401
from . import rules_activations  # noqa: E402,F401
from . import rules_indexing  # noqa: E402,F401
from . import rules_spectral  # noqa: E402,F401
from . import rules_qoperator  # noqa: E402,F401
