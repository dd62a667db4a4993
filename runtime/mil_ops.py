"""Numpy reference implementations of CoreML MIL ops, one table entry per op type.

Semantics follow the op definitions in coremltools (`converters/mil/mil/ops/defs/iOS15..18`).
Every entry has the signature `fn(a, outs) -> array | tuple[array, ...]`, where `a` maps
parameter names to values (absent optional parameters are simply missing; scalars are 0-d
arrays, strings are `str`) and `outs` lists the declared outputs (`.dtype`, `.shape`).

fp16 semantics: the registry hands every fp16 array to the op as fp32 (`upcast=True`, the
default), and the executor casts each result to the dtype the program declares. So an
op on fp16 data is computed in fp32 and rounded to fp16 once, per op -- as the hardware
does. Pure data-movement ops register with `upcast=False`: they never change values.

This module is longer than the house ~600 lines because it is the one op table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from scipy.special import erf as _erf

MIL_OPS: dict[str, Callable] = {}

# Every op type the CoreML lowering may emit today (targets/coreml); a test keeps this list
# and MIL_OPS in step.
EMITTED_BY_LOWERING = (
    "const", "cast", "identity", "add", "sub", "mul", "real_div", "floor_div", "mod", "pow",
    "maximum", "minimum", "equal", "not_equal", "less", "less_equal", "greater",
    "greater_equal", "logical_and", "logical_or", "logical_not", "logical_xor", "select",
    "relu", "relu6", "sigmoid", "sigmoid_hard", "tanh", "erf", "sqrt", "rsqrt", "exp", "log",
    "abs", "floor", "ceil", "round", "sign", "sin", "cos", "inverse", "square", "clip", "gelu",
    "silu", "softmax", "softplus", "leaky_relu", "elu", "conv", "batch_norm", "instance_norm",
    "layer_norm", "max_pool", "avg_pool", "l2_pool", "reduce_mean", "reduce_sum", "reduce_max",
    "reduce_min", "reduce_prod", "reduce_l2_norm", "reduce_l1_norm", "reduce_sum_square",
    "reduce_log_sum_exp", "reduce_argmax", "reduce_argmin", "matmul", "linear", "reshape",
    "transpose", "gather", "gather_along_axis", "gather_nd", "concat", "split",
    "slice_by_index", "slice_by_size", "squeeze", "expand_dims", "tile", "fill", "range_1d",
    "pad", "shape", "topk", "cumsum", "argsort", "band_part", "scaled_dot_product_attention",
    "upsample_nearest_neighbor", "upsample_bilinear", "resize_bilinear", "conv_transpose",
    "local_response_norm", "reverse", "lstm",
)


def mil_op(*names: str, upcast: bool = True):
    """Register the decorated function as the reference for the MIL op types `names`."""

    def register(fn):
        entry = _fp16_as_fp32(fn) if upcast else fn
        for name in names:
            MIL_OPS[name] = entry
        return fn

    return register


def _fp16_as_fp32(fn):
    def upcast(v):
        if isinstance(v, np.ndarray) and v.dtype == np.float16:
            return v.astype(np.float32)
        return [upcast(i) for i in v] if isinstance(v, list) else v

    def wrapped(a, outs):
        return fn({k: upcast(v) for k, v in a.items()}, outs)

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


# ---- parameter helpers -------------------------------------------------------------------

def _int(a, key, default=None):
    return default if a.get(key) is None else int(np.asarray(a[key]).item())


def _float(a, key, default=None):
    return default if a.get(key) is None else float(np.asarray(a[key]).item())


def _bool(a, key, default=False):
    return default if a.get(key) is None else bool(np.asarray(a[key]).item())


def _str(a, key, default=None):
    return default if a.get(key) is None else str(a[key])


def _ints(a, key, default=None):
    return default if a.get(key) is None else [int(v) for v in np.ravel(a[key])]


def _axes(a, key="axes"):
    return None if a.get(key) is None else tuple(int(v) for v in np.ravel(a[key]))


def _param(a, key, default, like):
    """A scalar parameter in the compute dtype of `like` (fp32 for fp16 data)."""
    return np.asarray(default if a.get(key) is None else a[key], dtype=like.dtype)


# ---- elementwise ---------------------------------------------------------------------------

def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows, and keeps precision for very negative x
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


_UNARY = {
    "identity": lambda x: x, "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": _sigmoid, "tanh": np.tanh,
    "erf": lambda x: _erf(x), "sqrt": np.sqrt, "exp": np.exp, "exp2": np.exp2, "abs": np.abs,
    "floor": np.floor, "ceil": np.ceil, "round": np.round, "sign": np.sign, "sin": np.sin,
    "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "atanh": np.arctanh, "square": np.square,
    "logical_not": np.logical_not, "silu": lambda x: x * _sigmoid(x),
    "softplus": lambda x: np.logaddexp(x, 0),
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": np.floor_divide, "mod": np.mod, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


def _unary_op(f):
    return lambda a, outs: f(a["x"])


def _binary_op(f):
    return lambda a, outs: f(a["x"], a["y"])


for _name, _f in _UNARY.items():
    mil_op(_name, upcast=_name != "identity")(_unary_op(_f))
for _name, _f in _BINARY.items():
    mil_op(_name)(_binary_op(_f))


@mil_op("pow")
def pow_(a, outs):
    x, y = a["x"], a["y"]
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        x = x.astype(np.float64)  # numpy refuses negative integer powers of integers
    return np.power(x, y)


@mil_op("cast", upcast=False)
def cast(a, outs):
    return a["x"].astype(outs[0].dtype)


@mil_op("const", upcast=False)
def const(a, outs):
    return a["val"]


@mil_op("select")
def select(a, outs):
    return np.where(a["cond"], a["a"], a["b"])


@mil_op("rsqrt")
def rsqrt(a, outs):
    return 1 / np.sqrt(a["x"] + _param(a, "epsilon", 1e-12, a["x"]))


@mil_op("log")
def log(a, outs):
    return np.log(a["x"] + _param(a, "epsilon", 1e-45, a["x"]))


@mil_op("inverse")
def inverse(a, outs):
    return 1 / (a["x"] + _param(a, "epsilon", 1e-4, a["x"]))


@mil_op("clip")
def clip(a, outs):
    return np.minimum(np.maximum(a["x"], a["alpha"]), a["beta"])


@mil_op("sigmoid_hard")
def sigmoid_hard(a, outs):
    return np.clip(a["alpha"] * a["x"] + a["beta"], 0, 1)


@mil_op("leaky_relu")
def leaky_relu(a, outs):
    x = a["x"]
    return np.where(x >= 0, x, a["alpha"] * x)


@mil_op("elu")
def elu(a, outs):
    x = a["x"]
    return np.where(x > 0, x, a["alpha"] * np.expm1(np.minimum(x, 0)))


@mil_op("prelu")
def prelu(a, outs):
    x = a["x"]
    alpha = a["alpha"].reshape((-1,) + (1,) * (x.ndim - 2))
    return np.where(x >= 0, x, alpha * x)


@mil_op("gelu")
def gelu(a, outs):
    x, mode = a["x"], _str(a, "mode", "EXACT")
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(1.702 * x)
    if mode != "EXACT":
        raise ValueError(f"unknown gelu mode {mode!r}")
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


@mil_op("softmax")
def softmax(a, outs):
    x, axis = a["x"], _int(a, "axis", -1)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


# ---- reductions ----------------------------------------------------------------------------

def _log_sum_exp(x, axis, keepdims):
    m = np.max(x, axis=axis, keepdims=True)
    s = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return s if keepdims else np.squeeze(s, axis=axis)


_REDUCTIONS = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod, "reduce_log_sum_exp": _log_sum_exp,
    "reduce_l1_norm": lambda x, axis, keepdims: np.sum(np.abs(x), axis=axis, keepdims=keepdims),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(
        np.sum(np.square(x), axis=axis, keepdims=keepdims)),
    "reduce_sum_square": lambda x, axis, keepdims: np.sum(
        np.square(x), axis=axis, keepdims=keepdims),
}


def _reduce_op(f):
    def reduce(a, outs):
        axes = _axes(a)  # None reduces over every axis
        axes = tuple(range(a["x"].ndim)) if axes is None else axes
        return f(a["x"], axis=axes, keepdims=_bool(a, "keep_dims"))

    return reduce


for _name, _f in _REDUCTIONS.items():
    mil_op(_name)(_reduce_op(_f))


@mil_op("reduce_argmax")
def reduce_argmax(a, outs):
    return np.argmax(a["x"], axis=_int(a, "axis", -1), keepdims=_bool(a, "keep_dims"))


@mil_op("reduce_argmin")
def reduce_argmin(a, outs):
    return np.argmin(a["x"], axis=_int(a, "axis", -1), keepdims=_bool(a, "keep_dims"))


# ---- linear algebra, normalisation ----------------------------------------------------------

@mil_op("matmul")
def matmul(a, outs):
    x, y = a["x"], a["y"]
    if _bool(a, "transpose_x") and x.ndim > 1:
        x = np.swapaxes(x, -1, -2)
    if _bool(a, "transpose_y") and y.ndim > 1:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@mil_op("linear")
def linear(a, outs):
    y = np.matmul(a["x"], a["weight"].T)
    return y if a.get("bias") is None else y + a["bias"]


def _per_channel(v, ndim):
    return None if v is None else np.reshape(v, (-1,) + (1,) * (ndim - 2))


def _scale_shift(y, gamma, beta):
    y = y if gamma is None else y * gamma
    return y if beta is None else y + beta


def _channel_affine(y, a):
    """y * gamma + beta, with the optional gamma and beta given per channel (axis 1)."""
    gamma, beta = _per_channel(a.get("gamma"), y.ndim), _per_channel(a.get("beta"), y.ndim)
    return _scale_shift(y, gamma, beta)


@mil_op("batch_norm")
def batch_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    mean, var = _per_channel(a["mean"], x.ndim), _per_channel(a["variance"], x.ndim)
    y = (x - mean) / np.sqrt(var + eps)
    return _channel_affine(y, a)


@mil_op("instance_norm")
def instance_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    axes = tuple(range(2, x.ndim))
    y = (x - x.mean(axis=axes, keepdims=True)) / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return _channel_affine(y, a)


@mil_op("layer_norm")
def layer_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    axes = sorted(ax % x.ndim for ax in (_axes(a) or range(x.ndim)))
    param_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    centred = x - x.mean(axis=tuple(axes), keepdims=True)
    y = centred / np.sqrt(np.mean(np.square(centred), axis=tuple(axes), keepdims=True) + eps)
    gamma = None if a.get("gamma") is None else np.reshape(a["gamma"], param_shape)
    beta = None if a.get("beta") is None else np.reshape(a["beta"], param_shape)
    return _scale_shift(y, gamma, beta)


@mil_op("local_response_norm")
def local_response_norm(a, outs):
    x, size = a["x"], _int(a, "size")
    alpha, beta, k = _float(a, "alpha", 1e-4), _float(a, "beta", 0.75), _float(a, "k", 1.0)
    # Channel c sums squares over [c - floor((size-1)/2), c + ceil((size-1)/2)].
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = np.pad(np.square(x), [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2))
    csum = np.cumsum(np.concatenate([np.zeros_like(sq[:, :1]), sq], axis=1), axis=1)
    window = csum[:, size:] - csum[:, :-size]
    return x / (k + alpha / size * window) ** beta


@mil_op("scaled_dot_product_attention")
def scaled_dot_product_attention(a, outs):
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    scores = np.matmul(q, np.swapaxes(k, -1, -2)) / np.float32(math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = np.where(mask, scores, -np.inf) if mask.dtype == bool else scores + mask
    return np.matmul(softmax({"x": scores}, outs), v)


# ---- convolution and pooling ------------------------------------------------------------------

def _spatial_pads(a, in_sizes, eff_kernel, strides):
    """(before, after) padding per spatial dim for pad_type valid/custom/same/same_lower."""
    pad_type, n = _str(a, "pad_type", "valid"), len(in_sizes)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        pad = _ints(a, "pad", [0] * 2 * n)
        return [(pad[2 * i], pad[2 * i + 1]) for i in range(n)]
    if pad_type not in ("same", "same_lower"):
        raise ValueError(f"unknown pad_type {pad_type!r}")
    pads = []
    for size, k, s in zip(in_sizes, eff_kernel, strides):
        total = max(0, s * math.ceil(size / s) - size + k - s)
        small = total // 2  # "same" puts the odd element after, "same_lower" before
        pads.append((small, total - small) if pad_type == "same" else (total - small, small))
    return pads


def _windows(x, kernel, strides, dilations):
    """View [N, C, *out, *kernel] of every window of the (already padded) x."""
    nd = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    win = sliding_window_view(x, eff, axis=tuple(range(2, 2 + nd)))
    return win[(slice(None),) * 2 + tuple(slice(None, None, s) for s in strides)
               + tuple(slice(None, None, d) for d in dilations)]


def _taps(x, kernel, out_sizes, strides, dilations):
    """Yield (kernel offset, strided view of x that this tap reads for every output).

    Loops run over kernel taps, never over tensor elements: each tap is one vectorised op.
    """
    for offset in np.ndindex(*kernel):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offset, dilations, out_sizes, strides))
        yield offset, x[(Ellipsis,) + index]


def _pad_spatial(x, pads, value=0.0):
    return np.pad(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads], constant_values=value)


@mil_op("conv")
def conv(a, outs):
    x, w, groups = a["x"], a["weight"], _int(a, "groups", 1)
    nd = x.ndim - 2
    strides, dil = _ints(a, "strides", [1] * nd), _ints(a, "dilations", [1] * nd)
    eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dil)]
    xp = _pad_spatial(x, _spatial_pads(a, x.shape[2:], eff, strides))
    if groups > 1 and groups == x.shape[1]:
        y = _depthwise(xp, w, strides, dil, eff)
    else:
        y = _im2col_matmul(_windows(xp, w.shape[2:], strides, dil), w, groups)
    return y if a.get("bias") is None else y + _per_channel(a["bias"], y.ndim)


def _im2col_matmul(win, w, groups):
    """Convolution as one batched matmul over the window view `win` [N, C, *O, *K]."""
    n, c, nd = win.shape[0], win.shape[1], w.ndim - 2
    out_sizes = win.shape[2:2 + nd]
    cg, m = c // groups, w.shape[0]
    win = win.reshape((n, groups, cg) + win.shape[2:])
    perm = (0, 1) + tuple(range(3, 3 + nd)) + (2,) + tuple(range(3 + nd, 3 + 2 * nd))
    cols = win.transpose(perm).reshape(n, groups, math.prod(out_sizes), -1)
    wm = w.reshape(groups, m // groups, -1).transpose(0, 2, 1)
    y = np.matmul(cols, wm)  # [N, G, P, M/G]
    return y.transpose(0, 1, 3, 2).reshape((n, m) + tuple(out_sizes))


def _depthwise(xp, w, strides, dil, eff):
    """One input channel per group: a multiply-add per kernel tap beats tiny matmuls."""
    mult = w.shape[0] // xp.shape[1]  # channel multiplier
    xp = np.repeat(xp, mult, axis=1) if mult > 1 else xp
    out = [(n - e) // s + 1 for n, e, s in zip(xp.shape[2:], eff, strides)]
    y = np.zeros(xp.shape[:2] + tuple(out), np.result_type(xp, w))
    for offset, view in _taps(xp, w.shape[2:], out, strides, dil):
        y += view * w[(slice(None), 0) + offset].reshape((-1,) + (1,) * len(out))
    return y


@mil_op("conv_transpose")
def conv_transpose(a, outs):
    x, w = a["x"], a["weight"]  # w: [C_in, C_out / groups, *K]
    nd, groups = x.ndim - 2, _int(a, "groups", 1)
    strides, dil = _ints(a, "strides", [1] * nd), _ints(a, "dilations", [1] * nd)
    n, c_in, in_sizes, kernel = x.shape[0], x.shape[1], x.shape[2:], w.shape[2:]
    cg, mg = c_in // groups, w.shape[1]
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(in_sizes, strides, kernel, dil)]
    # Every input pixel scatters weight * value into a kernel-shaped patch of the output.
    xs = x.reshape(n, groups, cg, -1)
    ws = w.reshape(groups, cg, mg * math.prod(kernel)).transpose(0, 2, 1)
    cols = np.matmul(ws, xs).reshape((n, groups * mg) + tuple(kernel) + tuple(in_sizes))
    y = np.zeros((n, groups * mg) + tuple(full), dtype=cols.dtype)
    for offset, view in _taps(y, kernel, in_sizes, strides, dil):
        view += cols[(slice(None), slice(None)) + offset]
    y = _crop_transpose_output(a, y, full, outs[0].shape, strides, in_sizes)
    return y if a.get("bias") is None else y + _per_channel(a["bias"], y.ndim)


def _crop_transpose_output(a, y, full, declared, strides, in_sizes):
    """Crop conv_transpose's full result to the output size, zero-padding after if it is
    larger. An `output_shape` (or the declared shape) wins; "same" centres the crop with
    the odd element after, as TensorFlow does; "custom" starts at the leading pad."""
    nd, pad_type = len(full), _str(a, "pad_type", "valid")
    wanted = _ints(a, "output_shape") or list(declared)
    wanted = wanted[2:] if len(wanted) == nd + 2 else [None] * nd
    pad = _ints(a, "pad", [0] * 2 * nd) if pad_type == "custom" else [0] * 2 * nd
    if pad_type == "same":
        sizes = [i * s for i, s in zip(in_sizes, strides)]
    else:
        sizes = [f - pad[2 * i] - pad[2 * i + 1] for i, f in enumerate(full)]
    sizes = [w if w is not None else s for w, s in zip(wanted, sizes)]
    if pad_type == "same":
        starts = [max(0, f - sz) // 2 for f, sz in zip(full, sizes)]
    else:
        starts = [pad[2 * i] for i in range(nd)]
    grow = [(0, max(0, st + sz - f)) for st, sz, f in zip(starts, sizes, full)]
    crop = tuple(slice(st, st + sz) for st, sz in zip(starts, sizes))
    return _pad_spatial(y, grow)[(slice(None), slice(None)) + crop]


def _pool_geometry(a, x):
    """Kernel, strides, output sizes and (before, after) padding of a pooling op; `after`
    includes the overhang of ceil_mode windows past the padded input."""
    nd = x.ndim - 2
    kernel, strides = _ints(a, "kernel_sizes"), _ints(a, "strides", [1] * nd)
    pads, out = _spatial_pads(a, x.shape[2:], kernel, strides), []
    for size, k, s, (pb, pa) in zip(x.shape[2:], kernel, strides, pads):
        total = pb + pa
        if not _bool(a, "ceil_mode"):
            out.append((size + total - k) // s + 1)
            continue
        o = (size + total - k + s - 1) // s + 1
        # The last window may not start inside the right padding (coremltools / PyTorch rule).
        out.append(o - 1 if (o - 1) * s >= size + total / 2 and total > 0 else o)
    overhang = [max(0, (o - 1) * s + k - (size + pb + pa))
                for o, s, k, size, (pb, pa) in zip(out, strides, kernel, x.shape[2:], pads)]
    return kernel, strides, out, pads, overhang


def _pool(x, kernel, strides, out, pads, combine, fill):
    """Combine every window's taps; `pads` are (before, after) per spatial dim."""
    acc = None
    padded = _pad_spatial(x, pads, fill)
    for _, view in _taps(padded, kernel, out, strides, [1] * len(kernel)):
        acc = view.copy() if acc is None else combine(acc, view, out=acc)
    return acc


@mil_op("max_pool")
def max_pool(a, outs):
    kernel, strides, out, pads, over = _pool_geometry(a, a["x"])
    pads = [(pb, pa + e) for (pb, pa), e in zip(pads, over)]
    return _pool(a["x"], kernel, strides, out, pads, np.maximum, -np.inf)


@mil_op("l2_pool")
def l2_pool(a, outs):
    kernel, strides, out, pads, over = _pool_geometry(a, a["x"])
    pads = [(pb, pa + e) for (pb, pa), e in zip(pads, over)]
    return np.sqrt(_pool(np.square(a["x"]), kernel, strides, out, pads, np.add, 0.0))


@mil_op("avg_pool")
def avg_pool(a, outs):
    x = a["x"]
    kernel, strides, out, pads, over = _pool_geometry(a, x)
    full = [(pb, pa + e) for (pb, pa), e in zip(pads, over)]
    sums = _pool(x, kernel, strides, out, full, np.add, 0.0)
    # Divide by what each window covers: the input, plus the padding unless it is excluded,
    # but never the ceil_mode overhang.
    cover = np.ones((1, 1) + x.shape[2:], x.dtype)
    if not _bool(a, "exclude_padding_from_average"):
        cover, full = _pad_spatial(cover, pads, 1.0), [(0, e) for e in over]
    return sums / _pool(cover, kernel, strides, out, full, np.add, 0.0)


# ---- shape and data movement ----------------------------------------------------------------

@mil_op("reshape", upcast=False)
def reshape(a, outs):
    x, shape = a["x"], _ints(a, "shape")
    if 0 in shape and len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@mil_op("transpose", upcast=False)
def transpose(a, outs):
    return np.transpose(a["x"], _ints(a, "perm"))


@mil_op("squeeze", upcast=False)
def squeeze(a, outs):
    return np.squeeze(a["x"], axis=_axes(a))


@mil_op("expand_dims", upcast=False)
def expand_dims(a, outs):
    x, axes = a["x"], _ints(a, "axes")
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(ax % rank for ax in axes)))


@mil_op("tile", upcast=False)
def tile(a, outs):
    return np.tile(a["x"], _ints(a, "reps"))


@mil_op("reverse", upcast=False)
def reverse(a, outs):
    return np.flip(a["x"], axis=_axes(a))


@mil_op("shape", upcast=False)
def shape(a, outs):
    return np.array(a["x"].shape, dtype=np.int32)


@mil_op("fill", upcast=False)
def fill(a, outs):
    value = a.get("value", np.float32(0))
    return np.full(_ints(a, "shape"), value, dtype=outs[0].dtype)


@mil_op("range_1d")
def range_1d(a, outs):
    return np.arange(a["start"], a["end"], a["step"]).astype(outs[0].dtype)


@mil_op("concat", upcast=False)
def concat(a, outs):
    values, axis = a["values"], _int(a, "axis")
    if values[0].ndim == 0:
        return np.stack(values)
    if _bool(a, "interleave"):
        stacked = np.stack(values, axis=axis % values[0].ndim + 1)
        shape = list(values[0].shape)
        shape[axis] *= len(values)
        return stacked.reshape(shape)
    return np.concatenate(values, axis=axis)


@mil_op("stack", upcast=False)
def stack(a, outs):
    return np.stack(a["values"], axis=_int(a, "axis"))


@mil_op("split", upcast=False)
def split(a, outs):
    x, axis = a["x"], _int(a, "axis")
    sizes = _ints(a, "split_sizes")
    if sizes is None:
        num = _int(a, "num_splits")
        sizes = [x.shape[axis] // num] * num
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@mil_op("slice_by_index", upcast=False)
def slice_by_index(a, outs):
    x = a["x"]
    begin, end = _ints(a, "begin"), _ints(a, "end")
    stride = _ints(a, "stride", [1] * x.ndim)
    begin_mask = _ints(a, "begin_mask", [0] * x.ndim)
    end_mask = _ints(a, "end_mask", [0] * x.ndim)
    squeeze_mask = _ints(a, "squeeze_mask", [0] * x.ndim)
    index = []
    for i in range(x.ndim):
        b = None if begin_mask[i] else begin[i]
        if squeeze_mask[i]:  # pure index at begin[i]
            index.append((b or 0) % x.shape[i])
        else:
            index.append(slice(b, None if end_mask[i] else end[i], stride[i]))
    return np.asarray(x[tuple(index)])


@mil_op("slice_by_size", upcast=False)
def slice_by_size(a, outs):
    x, begin, size = a["x"], _ints(a, "begin"), _ints(a, "size")
    index = []
    for b, s, d in zip(begin, size, x.shape):
        b = b + d if b < 0 else b
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


@mil_op("pad")
def pad(a, outs):
    x, flat = a["x"], _ints(a, "pad")
    pairs = [(0, 0)] * (x.ndim - len(flat) // 2) + list(zip(flat[0::2], flat[1::2]))
    mode = _str(a, "mode", "constant")
    if mode == "constant":
        return np.pad(x, pairs, constant_values=_float(a, "constant_val", 0.0))
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@mil_op("band_part")
def band_part(a, outs):
    x, lower, upper = a["x"], _int(a, "lower", -1), _int(a, "upper", -1)
    m = np.arange(x.shape[-2])[:, None]
    n = np.arange(x.shape[-1])[None, :]
    keep = ((lower < 0) | (m - n <= lower)) & ((upper < 0) | (n - m <= upper))
    return np.where(keep, x, np.zeros((), x.dtype))


@mil_op("cumsum")
def cumsum(a, outs):
    x, axis = a["x"], _int(a, "axis", 0)
    y = np.flip(x, axis) if _bool(a, "reverse") else x
    y = np.cumsum(y, axis=axis)
    if _bool(a, "exclusive"):
        y = y - (np.flip(x, axis) if _bool(a, "reverse") else x)
    return np.flip(y, axis) if _bool(a, "reverse") else y


def _descending_key(x):
    return -x.astype(np.float64) if x.dtype.kind in "iub" else -x


@mil_op("argsort")
def argsort(a, outs):
    x, axis = a["x"], _int(a, "axis", -1)
    key = x if _bool(a, "ascending") else _descending_key(x)
    return np.argsort(key, axis=axis, kind="stable")


@mil_op("topk")
def topk(a, outs):
    x, axis, k = a["x"], _int(a, "axis", -1), _int(a, "k", 1)
    key = x if _bool(a, "ascending") else _descending_key(x)
    order = np.argsort(key, axis=axis, kind="stable")
    if k != -1:
        order = np.take(order, np.arange(k), axis=axis)
    values = np.take_along_axis(x, order, axis=axis)
    return (values, order) if len(outs) == 2 else values


def _wrap_indices(indices, size):
    indices = indices.astype(np.int64)
    if np.any((indices < -size) | (indices >= size)):
        raise ValueError(f"index out of range [{-size}, {size})")
    return np.where(indices < 0, indices + size, indices)


@mil_op("gather", upcast=False)
def gather(a, outs):
    x, axis, batch = a["x"], _int(a, "axis", 0), _int(a, "batch_dims", 0)
    axis %= x.ndim
    idx = _wrap_indices(a["indices"], x.shape[axis])
    if batch == 0:
        return np.take(x, idx, axis=axis)
    # Gather x'[b..., idx[b..., i...]] with the axis moved next to the batch dims, then put
    # the dims between batch and axis back in front of the index dims.
    moved = np.moveaxis(x, axis, batch)
    grids = np.ix_(*[np.arange(d) for d in x.shape[:batch]]) if batch else ()
    grids = [g.reshape(g.shape + (1,) * (idx.ndim - batch)) for g in grids]
    y = moved[tuple(grids) + (idx,)]  # [B..., I..., x.shape[batch:axis], x.shape[axis+1:]]
    n_idx, n_mid = idx.ndim - batch, axis - batch
    perm = (list(range(batch)) + list(range(batch + n_idx, batch + n_idx + n_mid))
            + list(range(batch, batch + n_idx)) + list(range(batch + n_idx + n_mid, y.ndim)))
    return y.transpose(perm)


@mil_op("gather_along_axis", upcast=False)
def gather_along_axis(a, outs):
    x, axis = a["x"], _int(a, "axis", 0)
    return np.take_along_axis(x, _wrap_indices(a["indices"], x.shape[axis]), axis=axis)


@mil_op("gather_nd", upcast=False)
def gather_nd(a, outs):
    x, idx, batch = a["x"], a["indices"], _int(a, "batch_dims", 0)
    depth = idx.shape[-1]
    cols = [_wrap_indices(idx[..., i], x.shape[batch + i]) for i in range(depth)]
    grids = np.ix_(*[np.arange(d) for d in x.shape[:batch]]) if batch else ()
    grids = [g.reshape(g.shape + (1,) * (idx.ndim - 1 - batch)) for g in grids]
    return x[tuple(grids) + tuple(cols)]


# ---- resizing -------------------------------------------------------------------------------

def sampling_grid(n_in, n_out, mode):
    """Source coordinate of each output pixel along one axis (coremltools sampling modes).

    The CoreML lowering of Resize compares these grids with ONNX's coordinates to pick a
    MIL op only where it is exact, so this is the one definition of what they compute."""
    i = np.arange(n_out, dtype=np.float64)
    if mode in ("STRICT_ALIGN_CORNERS", "ALIGN_CORNERS"):
        if n_out == 1:
            g = np.full(1, (n_in - 1) / 2 if mode == "ALIGN_CORNERS" else 0.0)
        else:
            g = i * (n_in - 1) / (n_out - 1)
    elif mode == "DEFAULT":
        g = i * ((n_in - n_in / n_out) / (n_out - 1) if n_out > 1 else 0.0)
    elif mode == "OFFSET_CORNERS":
        delta = max(1, n_in - 1) / n_out
        g = 0.5 * delta + i * delta
    elif mode == "UNALIGN_CORNERS":
        g = (i + 0.5) * n_in / n_out - 0.5
    elif mode == "ASYMMETRIC":
        g = i * n_in / n_out
    else:
        raise ValueError(f"unknown sampling mode {mode!r}")
    return np.clip(g, 0, n_in - 1)


def _lerp_axis(x, grid, axis):
    lo = np.floor(grid).astype(np.int64)
    hi = np.minimum(lo + 1, x.shape[axis] - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = (grid - lo).astype(x.dtype).reshape(shape)
    x_lo, x_hi = np.take(x, lo, axis=axis), np.take(x, hi, axis=axis)
    return x_lo + (x_hi - x_lo) * frac


def _bilinear(x, out_h, out_w, mode):
    y = _lerp_axis(x, sampling_grid(x.shape[-2], out_h, mode), x.ndim - 2)
    return _lerp_axis(y, sampling_grid(x.shape[-1], out_w, mode), x.ndim - 1)


@mil_op("upsample_bilinear")
def upsample_bilinear(a, outs):
    x = a["x"]
    out_h = math.floor(x.shape[-2] * _float(a, "scale_factor_height", 1.0))
    out_w = math.floor(x.shape[-1] * _float(a, "scale_factor_width", 1.0))
    align = _bool(a, "align_corners", True)
    half_pixel = _bool(a, "half_pixel_centers", not align)
    return _bilinear(x, out_h, out_w, upsample_bilinear_mode(align, half_pixel))


def upsample_bilinear_mode(align_corners: bool, half_pixel_centers: bool) -> str:
    """The sampling grid of upsample_bilinear, in resize_bilinear's names."""
    if align_corners:
        return "STRICT_ALIGN_CORNERS"
    return "UNALIGN_CORNERS" if half_pixel_centers else "ASYMMETRIC"


@mil_op("resize_bilinear")
def resize_bilinear(a, outs):
    return _bilinear(a["x"], _int(a, "target_size_height", 1), _int(a, "target_size_width", 1),
                     _str(a, "sampling_mode", "DEFAULT"))


@mil_op("upsample_nearest_neighbor", upcast=False)
def upsample_nearest_neighbor(a, outs):
    x = a["x"]
    scales = (_float(a, "scale_factor_height", 1.0), _float(a, "scale_factor_width", 1.0))
    for axis, scale in zip((x.ndim - 2, x.ndim - 1), scales):
        n_in = x.shape[axis]
        n_out = math.floor(n_in * scale)
        src = np.minimum(np.floor(np.arange(n_out) / scale).astype(np.int64), n_in - 1)
        x = np.take(x, src, axis=axis)
    return x


# ---- recurrent --------------------------------------------------------------------------------

_RNN_ACTIVATIONS = {
    "sigmoid": _sigmoid, "tanh": np.tanh, "relu": lambda v: np.maximum(v, 0),
    "linear": lambda v: v, "scaled_tanh": np.tanh,
    "hard_sigmoid": lambda v: np.clip(0.2 * v + 0.5, 0, 1),
}


def _lstm_direction(xs, h, c, w_ih, w_hh, bias, peephole, acts, clip):
    """Run one LSTM direction over xs [T, B, I]; gates are stacked [i, f, o, z]."""
    hidden = w_hh.shape[1]
    rec, cell_act, out_act = acts
    p_i, p_f, p_o = (np.zeros(hidden, xs.dtype),) * 3 if peephole is None else np.split(peephole, 3)
    x_gates = np.matmul(xs, w_ih.T) + (0 if bias is None else bias)  # all steps at once
    hs = []
    for x_t in x_gates:
        g_i, g_f, g_o, g_z = np.split(x_t + h @ w_hh.T, 4, axis=-1)
        i, f = rec(g_i + p_i * c), rec(g_f + p_f * c)
        c = f * c + i * cell_act(g_z)
        if clip is not None:
            c = np.clip(c, -clip, clip)
        h = rec(g_o + p_o * c) * out_act(c)
        hs.append(h)
    return np.stack(hs), h, c


@mil_op("lstm")
def lstm(a, outs):
    x, direction = a["x"], _str(a, "direction", "forward")
    acts = tuple(_RNN_ACTIVATIONS[_str(a, key, default).lower()] for key, default in
                 (("recurrent_activation", "sigmoid"), ("cell_activation", "tanh"),
                  ("activation", "tanh")))
    clip = _float(a, "clip")
    h0, c0 = a["initial_h"], a["initial_c"]
    hidden = a["weight_hh"].shape[1]
    runs = []
    suffixes = ["", "_back"] if direction == "bidirectional" else [""]
    for d, suffix in enumerate(suffixes):
        backward = direction == "reverse" or suffix == "_back"
        xs = x[::-1] if backward else x
        state = slice(d * hidden, (d + 1) * hidden)
        seq, h, c = _lstm_direction(
            xs, h0[:, state], c0[:, state], a["weight_ih" + suffix], a["weight_hh" + suffix],
            a.get("bias" + suffix), a.get("peephole" + suffix), acts, clip)
        runs.append((seq[::-1] if backward else seq, h, c))
    seq = np.concatenate([r[0] for r in runs], axis=-1)
    h, c = (np.concatenate([r[i] for r in runs], axis=-1) for i in (1, 2))
    if not _bool(a, "output_sequence"):
        seq = h[None]
    return seq, h, c


# ---- compressed constants (constexpr_*) -------------------------------------------------------

def _along_axis(param, rank, axis):
    if param.ndim == 0 or param.ndim == rank:
        return param
    shape = [1] * rank
    shape[axis] = -1
    return param.reshape(shape)


@mil_op("constexpr_affine_dequantize", upcast=False)
def constexpr_affine_dequantize(a, outs):
    data, axis = a["quantized_data"], _int(a, "axis")
    scale = _along_axis(a["scale"], data.ndim, axis)
    zero = _along_axis(a["zero_point"], data.ndim, axis)
    return (data.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


@mil_op("constexpr_cast", upcast=False)
def constexpr_cast(a, outs):
    return a["source_val"].astype(outs[0].dtype)


def _repeat_blocks(param, shape):
    """Expand a per-block parameter to `shape` by repeating each entry over its block."""
    for axis, (full, blocks) in enumerate(zip(shape, param.shape)):
        if blocks != full:
            param = np.repeat(param, full // blocks, axis=axis)
    return param


@mil_op("constexpr_blockwise_shift_scale", upcast=False)
def constexpr_blockwise_shift_scale(a, outs):
    data, scale = a["data"], a["scale"]
    values = data.astype(np.float32)
    if a.get("offset") is not None:
        values = values - _repeat_blocks(a["offset"].astype(np.float32), data.shape)
    return values * _repeat_blocks(scale.astype(np.float32), data.shape)


@mil_op("constexpr_lut_to_dense", upcast=False)
def constexpr_lut_to_dense(a, outs):
    if a.get("shape") is not None:  # iOS16 form: packed uint8 indices + flat lut + shape
        shape = _ints(a, "shape")
        from .mil_reader import unpack_bits  # shared bit layout, LSB first

        bits = int(math.log2(a["lut"].size))
        flat = unpack_bits(a["indices"].astype(np.uint8), bits, math.prod(shape), signed=False)
        return a["lut"][flat].reshape(shape)
    return _lut_blockwise(a["indices"], a["lut"], _int(a, "vector_axis"))


def _lut_blockwise(indices, lut, vector_axis):
    """iOS18 form: lut [*groups, palettes, vector] indexed per block of `indices`."""
    grids = []
    for axis, (n, groups) in enumerate(zip(indices.shape, lut.shape[:-2])):
        g = np.arange(n) // (n // groups)
        grids.append(g.reshape([-1 if i == axis else 1 for i in range(indices.ndim)]))
    values = lut[tuple(grids) + (indices.astype(np.int64),)]  # [*indices.shape, vector]
    vector = lut.shape[-1]
    if vector == 1:
        return values[..., 0]
    axis = vector_axis % indices.ndim
    values = np.moveaxis(values, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vector
    return values.reshape(shape)
