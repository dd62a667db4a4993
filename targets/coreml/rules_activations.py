"""CoreML lowering of the ops in applec/ops/activations.py.

One MIL op where MIL has one that computes what ONNX asks: the trigonometric ops, softsign,
elu (Selu, Celu), silu (Swish), prelu / leaky_relu (PRelu), l2_pool (LpPool, p=2), the
l1/l2 norms (LpNormalization, GlobalLpPool). Everything else is composed from exact
pieces, and where MIL's own op differs from ONNX the composition is used instead:
- Round: MIL's round leaves halves implementation-defined per compute unit; ONNX rounds
  them to even, built from floor and comparisons (exact in fp16 and fp32);
- ThresholdedRelu: MIL's thresholded_relu keeps x == alpha, ONNX drops it;
- Asinh, Acosh: MIL has neither; log1p-accurate near 0 (near 1 for Acosh), log(2|x|)
  past a threshold so that x^2 never overflows (fp16 overflows at 256);
- LpPool with another p, dilations or rank 5: |x|^p summed by a depthwise all-ones conv.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb

from .rules import explicit_pads, is_float, per_channel, rule, unsupported, x_of

MIL_UNARY = {"Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh",
             "Cosh": "cosh", "Atanh": "atanh", "Softsign": "softsign"}

# Asinh/Acosh switch to log(2|x|) past this |x|: x^2 stays finite, and the dropped
# 1/(4x^2) term is below half an ulp of the result
LOG_ASYMPTOTE = {np.float16: 64.0, np.float32: 4096.0}


@rule(*MIL_UNARY)
def lower_mil_unary(lw, node):
    fn = getattr(mb, MIL_UNARY[node.op_type])
    lw.bind(node.outputs[0], fn(x=x_of(lw, node), name=lw.out_name()))


# -- activations -------------------------------------------------------------------------
@rule("Selu")
def lower_selu(lw, node):
    alpha = node.attrs.get("alpha", 1.67326319217681884765625)
    gamma = node.attrs.get("gamma", 1.05070102214813232421875)
    elu = mb.elu(x=x_of(lw, node), alpha=lw.scalar(alpha), name=lw.tmp("elu"))
    lw.bind(node.outputs[0], mb.mul(x=elu, y=lw.scalar(gamma), name=lw.out_name()))


@rule("Celu")
def lower_celu(lw, node):
    """alpha * elu(x / alpha), as ONNX's function body computes it."""
    alpha = float(node.attrs.get("alpha", 1.0))
    x = x_of(lw, node)
    if alpha == 1:
        lw.bind(node.outputs[0], mb.elu(x=x, alpha=lw.scalar(1), name=lw.out_name()))
        return
    scaled = mb.real_div(x=x, y=lw.scalar(alpha), name=lw.tmp("scaled"))
    elu = mb.elu(x=scaled, alpha=lw.scalar(1), name=lw.tmp("elu"))
    lw.bind(node.outputs[0], mb.mul(x=elu, y=lw.scalar(alpha), name=lw.out_name()))


@rule("Mish")
def lower_mish(lw, node):
    """x * tanh(softplus(x)): a softplus that overflows gives tanh(inf) = 1, still right."""
    x = x_of(lw, node)
    soft = mb.softplus(x=x, name=lw.tmp("softplus"))
    lw.bind(node.outputs[0], mb.mul(x=x, y=mb.tanh(x=soft, name=lw.tmp("tanh")),
                                    name=lw.out_name()))


@rule("Swish")
def lower_swish(lw, node):
    alpha = float(node.attrs.get("alpha", 1.0))
    x = x_of(lw, node)
    if alpha == 1:
        lw.bind(node.outputs[0], mb.silu(x=x, name=lw.out_name()))
        return
    gate = mb.sigmoid(x=mb.mul(x=x, y=lw.scalar(alpha), name=lw.tmp("scaled")),
                      name=lw.tmp("gate"))
    lw.bind(node.outputs[0], mb.mul(x=x, y=gate, name=lw.out_name()))


@rule("ThresholdedRelu")
def lower_thresholded_relu(lw, node):
    x = x_of(lw, node)
    keep = mb.greater(x=x, y=lw.scalar(node.attrs.get("alpha", 1.0)), name=lw.tmp("keep"))
    lw.bind(node.outputs[0], mb.select(cond=keep, a=x, b=lw.scalar(0), name=lw.out_name()))


@rule("Shrink")
def lower_shrink(lw, node):
    """Integers compare with the float thresholds rounded inward, exactly; their sums are
    exact for an integral bias (a fractional one would truncate per element)."""
    value = node.inputs[0]
    lambd, bias = float(node.attrs.get("lambd", 0.5)), float(node.attrs.get("bias", 0.0))
    if is_float(value):
        low, high, shift = lw.scalar(-lambd), lw.scalar(lambd), lw.scalar(bias)
        zero = lw.scalar(0)
    else:
        if bias != int(bias):
            unsupported(lw, f"a fractional bias ({bias}) on integers rounds per element")
        limit = np.iinfo(np.int32)
        low, high, shift = (np.int32(np.clip(v, limit.min, limit.max))
                            for v in (math.ceil(-lambd), math.floor(lambd), bias))
        zero = np.int32(0)
    x = lw.get(value)
    above = mb.greater(x=x, y=high, name=lw.tmp("above"))
    below = mb.less(x=x, y=low, name=lw.tmp("below"))
    if bias == 0:
        kept = mb.logical_or(x=above, y=below, name=lw.tmp("kept"))
        lw.bind(node.outputs[0], mb.select(cond=kept, a=x, b=zero, name=lw.out_name()))
        return
    upper = mb.select(cond=above, a=mb.sub(x=x, y=shift, name=lw.tmp("minus")), b=zero,
                      name=lw.tmp("upper"))
    lw.bind(node.outputs[0], mb.select(cond=below, a=mb.add(x=x, y=shift, name=lw.tmp("plus")),
                                       b=upper, name=lw.out_name()))


@rule("PRelu")
def lower_prelu(lw, node):
    """One slope: leaky_relu; a constant slope per channel of a rank-4 X: prelu (MIL's
    prelu takes distinct slopes on rank 4 only); otherwise Where(x < 0, slope * x, x)."""
    value, slope = node.inputs[:2]
    rank = len(value.shape)
    x = lw.get(value)
    if is_float(value) and slope.is_const:
        padded = (1,) * (rank - len(slope.shape)) + tuple(slope.shape)
        flat = slope.const.reshape(-1)
        if flat.size and np.all(flat == flat[0]):
            lw.bind(node.outputs[0], mb.leaky_relu(x=x, alpha=lw.scalar(float(flat[0])),
                                                   name=lw.out_name()))
            return
        if rank == 4 and all(d == 1 for i, d in enumerate(padded) if i != 1):
            alpha = np.broadcast_to(slope.const.reshape(-1), (value.shape[1],))
            lw.bind(node.outputs[0], mb.prelu(x=x, alpha=lw.array(alpha, slope.name),
                                              name=lw.out_name()))
            return
    zero = lw.scalar(0) if is_float(value) else np.int32(0)
    negative = mb.less(x=x, y=zero, name=lw.tmp("negative"))
    scaled = mb.mul(x=x, y=lw.get(slope), name=lw.tmp("scaled"))
    lw.bind(node.outputs[0], mb.select(cond=negative, a=scaled, b=x, name=lw.out_name()))


# -- exact compositions of math functions ------------------------------------------------
@rule("Round")
def lower_round(lw, node):
    """floor(x), plus one where the fraction is above 1/2, or exactly 1/2 and floor(x) odd."""
    x = x_of(lw, node)
    low = mb.floor(x=x, name=lw.tmp("floor"))
    fraction = mb.sub(x=x, y=low, name=lw.tmp("fraction"))  # exact: same binade or smaller
    half = mb.mul(x=low, y=lw.scalar(0.5), name=lw.tmp("half"))
    odd = mb.not_equal(x=mb.floor(x=half, name=lw.tmp("half_floor")), y=half,
                       name=lw.tmp("odd"))
    tie = mb.logical_and(x=mb.equal(x=fraction, y=lw.scalar(0.5), name=lw.tmp("is_half")),
                         y=odd, name=lw.tmp("tie_up"))
    up = mb.logical_or(x=mb.greater(x=fraction, y=lw.scalar(0.5), name=lw.tmp("above")),
                       y=tie, name=lw.tmp("up"))
    lw.bind(node.outputs[0], mb.select(cond=up, a=mb.add(x=low, y=lw.scalar(1),
                                                         name=lw.tmp("ceil")),
                                       b=low, name=lw.out_name()))


def log1p(lw, u, tag: str):
    """log(1 + u) for u >= 0, accurate for small u: log(w) * u / (w - 1) with w = 1 + u
    (the rounding of w cancels), u itself where w rounds to 1."""
    w = mb.add(x=u, y=lw.scalar(1), name=lw.tmp(f"{tag}_w"))
    step = mb.sub(x=w, y=lw.scalar(1), name=lw.tmp(f"{tag}_step"))
    ratio = mb.real_div(x=u, y=step, name=lw.tmp(f"{tag}_ratio"))
    scaled = mb.mul(x=mb.log(x=w, name=lw.tmp(f"{tag}_log")), y=ratio, name=lw.tmp(f"{tag}_lp"))
    exact = mb.equal(x=step, y=lw.scalar(0), name=lw.tmp(f"{tag}_tiny"))
    return mb.select(cond=exact, a=u, b=scaled, name=lw.tmp(tag))


def log_asymptote(lw, a, small, tag: str, name: str):
    """`small` below the threshold, log(2a) = log(a) + log 2 above it."""
    limit = LOG_ASYMPTOTE[lw.float_dtype]
    big = mb.add(x=mb.log(x=a, name=lw.tmp(f"{tag}_log")), y=lw.scalar(math.log(2)),
                 name=lw.tmp(f"{tag}_big"))
    far = mb.greater(x=a, y=lw.scalar(limit), name=lw.tmp(f"{tag}_far"))
    return mb.select(cond=far, a=big, b=small, name=name)


@rule("Asinh")
def lower_asinh(lw, node):
    """sign(x) * log1p(a + a^2 / (1 + sqrt(1 + a^2))), a = |x| (= log(a + sqrt(a^2 + 1)))."""
    x = x_of(lw, node)
    a = mb.abs(x=x, name=lw.tmp("abs"))
    near = mb.minimum(x=a, y=lw.scalar(LOG_ASYMPTOTE[lw.float_dtype]), name=lw.tmp("near"))
    square = mb.mul(x=near, y=near, name=lw.tmp("square"))
    root = mb.sqrt(x=mb.add(x=square, y=lw.scalar(1), name=lw.tmp("sq1")), name=lw.tmp("root"))
    tail = mb.real_div(x=square, y=mb.add(x=root, y=lw.scalar(1), name=lw.tmp("root1")),
                       name=lw.tmp("tail"))
    small = log1p(lw, mb.add(x=near, y=tail, name=lw.tmp("u")), "log1p")
    magnitude = log_asymptote(lw, a, small, "asym", lw.tmp("magnitude"))
    lw.bind(node.outputs[0], mb.mul(x=magnitude, y=mb.sign(x=x, name=lw.tmp("sign")),
                                    name=lw.out_name()))


@rule("Acosh")
def lower_acosh(lw, node):
    """log1p(t + sqrt(t (x + 1))), t = x - 1 (= log(x + sqrt(x^2 - 1))); NaN below 1."""
    x = x_of(lw, node)
    near = mb.minimum(x=x, y=lw.scalar(LOG_ASYMPTOTE[lw.float_dtype]), name=lw.tmp("near"))
    t = mb.sub(x=near, y=lw.scalar(1), name=lw.tmp("t"))
    product = mb.mul(x=t, y=mb.add(x=near, y=lw.scalar(1), name=lw.tmp("x1")),
                     name=lw.tmp("product"))
    u = mb.add(x=t, y=mb.sqrt(x=product, name=lw.tmp("root")), name=lw.tmp("u"))
    small = log1p(lw, u, "log1p")
    lw.bind(node.outputs[0], log_asymptote(lw, x, small, "asym", lw.out_name()))


# -- along axes --------------------------------------------------------------------------
@rule("Hardmax")
def lower_hardmax(lw, node):
    x = node.inputs[0]
    rank = len(x.shape)
    axis = int(node.attrs.get("axis", -1)) % rank
    first = mb.reduce_argmax(x=lw.get(x), axis=axis, keep_dims=True, name=lw.tmp("argmax"))
    positions = np.arange(x.shape[axis], dtype=np.int32).reshape(
        [-1 if i == axis else 1 for i in range(rank)])
    mask = mb.equal(x=first, y=positions, name=lw.tmp("mask"))
    lw.bind(node.outputs[0], mb.cast(x=mask, dtype=lw.mil_dtype_name(x.dtype),
                                     name=lw.out_name()))


@rule("LpNormalization")
def lower_lp_normalization(lw, node):
    x = node.inputs[0]
    axis = int(node.attrs.get("axis", -1)) % len(x.shape)
    norm_fn = mb.reduce_l1_norm if node.attrs.get("p", 2) == 1 else mb.reduce_l2_norm
    var = lw.get(x)
    norm = norm_fn(x=var, axes=[axis], keep_dims=True, name=lw.tmp("norm"))
    zero = mb.equal(x=norm, y=lw.scalar(0), name=lw.tmp("zero"))
    safe = mb.select(cond=zero, a=lw.scalar(1), b=norm, name=lw.tmp("safe"))  # 0 / 1 = 0
    lw.bind(node.outputs[0], mb.real_div(x=var, y=safe, name=lw.out_name()))


@rule("MeanVarianceNormalization")
def lower_mvn(lw, node):
    x = node.inputs[0]
    rank = len(x.shape)
    axes = sorted({int(a) % rank for a in node.attrs.get("axes", (0, 2, 3))})
    var = lw.get(x)
    mean = mb.reduce_mean(x=var, axes=axes, keep_dims=True, name=lw.tmp("mean"))
    centered = mb.sub(x=var, y=mean, name=lw.tmp("centered"))
    variance = mb.reduce_mean(x=mb.mul(x=centered, y=centered, name=lw.tmp("sq")), axes=axes,
                              keep_dims=True, name=lw.tmp("var"))
    # 1e-9 is 0 in fp16: its smallest subnormal keeps 0 / (0 + eps) at 0
    eps = max(1e-9, float(np.finfo(lw.float_dtype).smallest_subnormal))
    std = mb.add(x=mb.sqrt(x=variance, name=lw.tmp("std")), y=lw.scalar(eps),
                 name=lw.tmp("std_eps"))
    lw.bind(node.outputs[0], mb.real_div(x=centered, y=std, name=lw.out_name()))


@rule("ReduceLogSum")
def lower_reduce_log_sum(lw, node):
    """log(reduce_sum); log's epsilon is 0 so that a zero sum gives -inf, as ONNX says.
    Integer sums are taken exactly, their log in fp32 and truncated back."""
    x = node.inputs[0]
    axes = node.input(1)
    axes = [int(a) for a in axes.const.reshape(-1)] if axes is not None else []
    var = lw.get(x)
    if axes or not node.attrs.get("noop_with_empty_axes", 0):
        var = mb.reduce_sum(x=var, axes=axes or list(range(len(x.shape))),
                            keep_dims=bool(node.attrs.get("keepdims", 1)), name=lw.tmp("sum"))
    if is_float(x):
        lw.bind(node.outputs[0], mb.log(x=var, epsilon=lw.scalar(0), name=lw.out_name()))
        return
    total = mb.cast(x=var, dtype="fp32", name=lw.tmp("float"))
    log = mb.log(x=total, epsilon=np.float32(0), name=lw.tmp("log"))
    lw.bind(node.outputs[0], mb.cast(x=log, dtype="int32", name=lw.out_name()))


# -- normalizations with parameters ------------------------------------------------------
@rule("GroupNormalization")
def lower_group_norm(lw, node):
    """Normalize [N, G, rest] over its last axis (layer_norm), then scale and shift per
    channel."""
    x, scale, bias = node.inputs[:3]
    groups = int(node.attrs["num_groups"])
    grouped = mb.reshape(x=lw.get(x), shape=[x.shape[0], groups, -1], name=lw.tmp("grouped"))
    normed = mb.layer_norm(x=grouped, axes=[2], epsilon=lw.scalar(node.attrs.get("epsilon", 1e-5)),
                           name=lw.tmp("normed"))
    y = mb.reshape(x=normed, shape=list(x.shape), name=lw.tmp("ungrouped"))
    bshape = [-1] + [1] * (len(x.shape) - 2)
    y = mb.mul(x=y, y=per_channel(lw, scale, bshape, "scale"), name=lw.tmp("scaled"))
    lw.bind(node.outputs[0], mb.add(x=y, y=per_channel(lw, bias, bshape, "bias"),
                                    name=lw.out_name()))


@rule("RMSNormalization")
def lower_rms_normalization(lw, node):
    x, scale = node.inputs[:2]
    rank = len(x.shape)
    axes = list(range(int(node.attrs.get("axis", -1)) % rank, rank))
    var = lw.get(x)
    mean_square = mb.reduce_mean(x=mb.mul(x=var, y=var, name=lw.tmp("square")), axes=axes,
                                 keep_dims=True, name=lw.tmp("mean_square"))
    inv = mb.rsqrt(x=mean_square, epsilon=lw.scalar(node.attrs.get("epsilon", 1e-5)),
                   name=lw.tmp("inv"))
    normed = mb.mul(x=var, y=inv, name=lw.tmp("normed"))
    lw.bind(node.outputs[0], mb.mul(x=normed, y=lw.get(scale), name=lw.out_name()))


# -- Lp pooling --------------------------------------------------------------------------
def powered(lw, var, p: float):
    """|x|^p: abs, square, or pow of abs."""
    if p == 2:
        return mb.square(x=var, name=lw.tmp("square"))
    magnitude = mb.abs(x=var, name=lw.tmp("abs"))
    return magnitude if p == 1 else mb.pow(x=magnitude, y=lw.scalar(p), name=lw.tmp("pow"))


def sum_then_root(lw, p: float, sum_fn, **args):
    """sum_fn(**args)^(1/p), named as the node's output."""
    if p == 1:
        return sum_fn(**args, name=lw.out_name())
    total = sum_fn(**args, name=lw.tmp("sum"))
    if p == 2:
        return mb.sqrt(x=total, name=lw.out_name())
    return mb.pow(x=total, y=lw.scalar(1 / p), name=lw.out_name())


@rule("LpPool")
def lower_lp_pool(lw, node):
    """p=2 without dilations on 1-D/2-D windows: l2_pool. Otherwise |x|^p, summed by a
    depthwise conv with an all-ones kernel (pads add zeros, as ONNX pads), then the root.
    ceil_mode becomes end pads sized for the static output."""
    x, out = node.inputs[0], node.outputs[0]
    n = len(x.shape) - 2
    kernel = [int(k) for k in node.attrs["kernel_shape"]]
    strides = [int(s) for s in node.attrs.get("strides") or [1] * n]
    dilations = [int(d) for d in node.attrs.get("dilations") or [1] * n]
    pads = explicit_pads(node, x.shape[2:], kernel, strides, dilations)
    for i, (size, o, k, s, d) in enumerate(zip(x.shape[2:], out.shape[2:], kernel, strides,
                                               dilations)):
        pads[2 * i + 1] = max((o - 1) * s + (k - 1) * d + 1 - size - pads[2 * i], 0)
    p = float(node.attrs.get("p", 2))
    if p == 2 and n <= 2 and all(d == 1 for d in dilations):
        lw.bind(out, mb.l2_pool(x=lw.get(x), kernel_sizes=kernel, strides=strides,
                                pad_type="custom", pad=pads, name=lw.out_name()))
        return
    channels = x.shape[1]
    ones = np.ones([channels, 1] + kernel, lw.float_dtype)
    lw.bind(out, sum_then_root(lw, p, mb.conv, x=powered(lw, lw.get(x), p), weight=ones,
                               strides=strides, dilations=dilations, pad_type="custom",
                               pad=pads, groups=channels))


@rule("GlobalLpPool")
def lower_global_lp_pool(lw, node):
    x = node.inputs[0]
    axes = list(range(2, len(x.shape)))
    p = float(node.attrs.get("p", 2))
    if p in (1, 2):
        fn = mb.reduce_l1_norm if p == 1 else mb.reduce_l2_norm
        lw.bind(node.outputs[0], fn(x=lw.get(x), axes=axes, keep_dims=True,
                                    name=lw.out_name()))
        return
    lw.bind(node.outputs[0], sum_then_root(lw, p, mb.reduce_sum, x=powered(lw, lw.get(x), p),
                                           axes=axes, keep_dims=True))
