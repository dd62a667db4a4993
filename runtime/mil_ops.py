"""Numpy reference implementations of CoreML MIL ops, one table entry per op type.

Semantics follow the op definitions in coremltools (`converters/mil/mil/ops/defs/iOS15..18`).
Every entry has the signature `fn(a, outs) -> array | tuple[array, ...]`, where `a` maps
parameter names to values (absent optional parameters are simply missing; scalars are 0-d
arrays, strings are `str`) and `outs` lists the declared outputs (`.dtype`, `.shape`).

fp16 semantics: ops never see fp16. The executor holds every fp16 value as the float32
number it equals, so an op on fp16 data computes in fp32, and the executor rounds each
result the program declares fp16 to fp16 values, once per op -- as the hardware does. An op
may therefore return float32 for an fp16 output (`cast` does). Ops whose results are values
of their inputs (data movement, maximum, clip, ...) register with `keeps_fp16=True`: on fp16
inputs their results are fp16 values already, and the executor does not round them again.

Speed: ops write into arrays they made themselves, never into their inputs.

This module is longer than the house ~600 lines because it is the one op table.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import numpy as np
from numpy.lib.stride_tricks import as_strided
from scipy.special import erf as _erf

from . import winograd

MIL_OPS: dict[str, Callable] = {}
KEEPS_FP16: set[str] = set()  # ops whose results are values of their inputs
# op type -> constant 2-D parameters the op multiplies by transposed: the executor stores
# them in Fortran order (same shape, same values), so that their transpose is C-contiguous.
TRANSPOSED: dict[str, tuple[str, ...]] = {"linear": ("weight",)}

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
    "local_response_norm", "reverse", "lstm", "rnn",
    "tan", "asin", "acos", "atan", "sinh", "cosh", "atanh", "softsign", "prelu",
    "scatter_nd", "scatter_along_axis", "reverse_sequence",
)


def mil_op(*names: str, keeps_fp16: bool = False):
    """Register the decorated function as the reference for the MIL op types `names`."""

    def register(fn):
        for name in names:
            MIL_OPS[name] = fn
            if keeps_fp16:
                KEEPS_FP16.add(name)
        return fn

    return register


# ---- parameter helpers -------------------------------------------------------------------

def _item(v):
    """A scalar parameter as a Python number (`.item()` is the fast path for arrays)."""
    return v.item() if isinstance(v, (np.ndarray, np.generic)) else np.asarray(v).item()


def _int(a, key, default=None):
    v = a.get(key)
    return default if v is None else int(_item(v))


def _float(a, key, default=None):
    v = a.get(key)
    return default if v is None else float(_item(v))


def _bool(a, key, default=False):
    v = a.get(key)
    return default if v is None else bool(_item(v))


def _str(a, key, default=None):
    return default if a.get(key) is None else str(a[key])


def _ints(a, key, default=None):
    v = a.get(key)
    if v is None:
        return default
    if isinstance(v, np.ndarray) and v.dtype.kind in "iu":
        return v.ravel().tolist()
    return [int(i) for i in np.ravel(v)]


def _axes(a, key="axes"):
    v = _ints(a, key)
    return None if v is None else tuple(v)


def _param(a, key, default, like):
    """A scalar parameter in the compute dtype of `like` (fp32 for fp16 data)."""
    return np.asarray(default if a.get(key) is None else a[key], dtype=like.dtype)


# ---- elementwise ---------------------------------------------------------------------------

def _fresh(x):
    """An uninitialised float array shaped like `x` (0-d too), for ufuncs' `out=`."""
    return np.empty(np.shape(x), x.dtype if x.dtype.kind == "f" else np.float64)


def _blockwise(f, x, block=1 << 16):
    """Elementwise `f(x)` a block at a time, so the temporaries of its many passes stay in
    cache; the same numbers as one call."""
    if x.ndim == 0:
        return f(x.reshape(1)).reshape(())
    if x.size <= block or not x.flags.c_contiguous:
        return f(x)
    out = np.empty_like(x)
    flat_x, flat_out = x.reshape(-1), out.reshape(-1)
    for start in range(0, flat_x.size, block):
        flat_out[start:start + block] = f(flat_x[start:start + block])
    return out


def _sigmoid(x):
    """1 / (1 + e) for x >= 0 and e / (1 + e) below, e = exp(-|x|): never overflows, and
    keeps precision for very negative x. The numerator, 1 or e, is exp(min(x, 0))."""
    den = np.abs(x, out=_fresh(x))
    np.negative(den, out=den)
    np.exp(den, out=den)
    den += 1
    num = np.clip(x, -np.inf, 0, out=_fresh(x))  # clip with both bounds has numpy's fast path
    np.exp(num, out=num)
    num /= den
    return num


def _relu(x):
    return np.clip(x, 0, np.inf)  # max(x, 0), NaN kept; numpy's clip is the fast maximum


def _silu(x):
    y = _sigmoid(x)
    y *= x
    return y


_UNARY = {
    "identity": lambda x: x, "relu": _relu,
    "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": _sigmoid, "tanh": np.tanh,
    "erf": lambda x: _erf(x), "sqrt": np.sqrt, "exp": np.exp, "exp2": np.exp2, "abs": np.abs,
    "floor": np.floor, "ceil": np.ceil, "round": np.round, "sign": np.sign, "sin": np.sin,
    "cos": np.cos, "tan": np.tan, "asin": np.arcsin, "acos": np.arccos, "atan": np.arctan,
    "sinh": np.sinh, "cosh": np.cosh, "atanh": np.arctanh, "square": np.square,
    "logical_not": np.logical_not, "silu": _silu,
    "softplus": lambda x: np.logaddexp(x, 0), "softsign": lambda x: x / (1 + np.abs(x)),
}
_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.true_divide,
    "floor_div": np.floor_divide, "mod": np.mod, "maximum": np.maximum, "minimum": np.minimum,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal, "logical_and": np.logical_and,
    "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}


# Results are input values or small integers (exact in fp16); comparisons make bools.
_PICKS_VALUES = {"identity", "relu", "relu6", "abs", "floor", "ceil", "round", "sign",
                 "maximum", "minimum", "equal", "not_equal", "less", "less_equal", "greater",
                 "greater_equal", "logical_and", "logical_or", "logical_xor", "logical_not",
                 "reduce_max", "reduce_min"}


def _unary_op(f):
    return lambda a, outs: f(a["x"])


def _binary_op(f):
    return lambda a, outs: f(a["x"], a["y"])


for _name, _f in _UNARY.items():
    mil_op(_name, keeps_fp16=_name in _PICKS_VALUES)(_unary_op(_f))
for _name, _f in _BINARY.items():
    mil_op(_name, keeps_fp16=_name in _PICKS_VALUES)(_binary_op(_f))


# In-place forms, for the executor: op type -> (parameters whose array the op may overwrite,
# fn(a, param) -> the result written over a[param], or None where it does not fit there).
# The executor uses them only on an array that no one else holds and nothing reads later.
IN_PLACE: dict[str, tuple[tuple[str, ...], Callable]] = {}


def _unary_in_place(f, floats_only=False):
    def run(a, param):
        x = a[param]
        return None if floats_only and x.dtype.kind != "f" else f(x, out=x)
    return run


def _binary_in_place(f):
    def run(a, param):
        target, other = a[param], a["y" if param == "x" else "x"]
        if not (_broadcasts_to(np.shape(other), target.shape)
                and np.result_type(target, other) == target.dtype):
            return None
        return f(a["x"], a["y"], out=target)
    return run


IN_PLACE.update({
    "relu": (("x",), _unary_in_place(lambda x, out: np.clip(x, 0, np.inf, out=out))),
    "relu6": (("x",), _unary_in_place(lambda x, out: np.clip(x, 0, 6, out=out))),
    "tanh": (("x",), _unary_in_place(np.tanh, floats_only=True)),
    **{name: (("x", "y"), _binary_in_place(_BINARY[name]))
       for name in ("add", "sub", "mul", "real_div", "maximum", "minimum")},
})


@mil_op("pow")
def pow_(a, outs):
    x, y = a["x"], a["y"]
    if x.dtype.kind in "iu" and y.dtype.kind in "iu":
        x = x.astype(np.float64)  # numpy refuses negative integer powers of integers
    return np.power(x, y)


@mil_op("cast")
def cast(a, outs):
    x, dtype = a["x"], outs[0].dtype
    if dtype == np.float16 and (x.dtype == np.float32 or x.dtype.kind in "iub"):
        # The executor rounds fp16 results (fast, and as astype would): hand it float32.
        # Integers go through float32 exactly up to 2**24, and from 65520 up both give inf.
        return x.astype(np.float32, copy=False)
    return x.astype(dtype, copy=False)


@mil_op("const", keeps_fp16=True)
def const(a, outs):
    return a["val"]


@mil_op("select", keeps_fp16=True)
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


@mil_op("clip", keeps_fp16=True)
def clip(a, outs):
    return np.clip(a["x"], _scalar(a["alpha"]), _scalar(a["beta"]))  # min(max(x, alpha), beta)


def _scalar(v):
    """A 0-d bound as a Python number (same value), so numpy takes its fast scalar path."""
    return v.item() if isinstance(v, np.ndarray) and v.ndim == 0 and v.dtype.kind == "f" else v


@mil_op("sigmoid_hard")
def sigmoid_hard(a, outs):
    return np.clip(a["alpha"] * a["x"] + a["beta"], 0, 1)


@mil_op("leaky_relu")
def leaky_relu(a, outs):
    x, alpha = a["x"], a["alpha"]
    if np.ndim(alpha) == 0 and 0 <= alpha <= 1:
        return np.maximum(x, alpha * x)  # the same, without np.where's slow select
    return np.where(x >= 0, x, alpha * x)


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
    if mode not in _GELU:
        raise ValueError(f"unknown gelu mode {mode!r}")
    return _blockwise(_GELU[mode], x)


def _gelu_tanh(x):
    """0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), in place on one temporary."""
    y = np.multiply(x, x, out=_fresh(x))
    y *= x  # x * x * x: numpy's x**3 is a slow pow()
    y *= 0.044715
    y += x
    y *= math.sqrt(2 / math.pi)
    np.tanh(y, out=y)
    y += 1
    y *= x
    y *= 0.5
    return y


# erfc(z) ~ t (a1 + t (a2 + ... + t a5)) exp(-z^2), t = 1 / (1 + p z), z >= 0 (Abramowitz and
# Stegun 7.1.26, |error| <= 1.5e-7); for gelu, with z = |x| / sqrt(2) and the 1/2 folded in.
_GELU_P = np.float32(0.3275911 / math.sqrt(2))
_GELU_A = tuple(np.float32(a / 2) for a in (1.061405429, -1.453152027, 1.421413741,
                                             -0.284496736, 0.254829592))


def _gelu_exact(x):
    """0.5 x (1 + erf(x / sqrt(2))) = relu(x) - |x| erfc(|x| / sqrt(2)) / 2: 21 passes, where
    erf to full relative precision in the tails (`_one_plus_erf`) takes 34. Absolute error
    <= 4e-7 for every float32 x (float32 rounding included; checked against float64 erf on
    a grid over [-10, 10]); a GELU's tail is a tiny number next to its other outputs."""
    a = np.abs(x, out=_fresh(x))
    np.minimum(a, 16, out=a)  # past 16 the erfc term is 0 in float32; keeps inf * 0 out
    t = np.multiply(a, _GELU_P)
    t += 1
    np.reciprocal(t, out=t)
    q = np.multiply(t, _GELU_A[0])
    for c in _GELU_A[1:]:
        q += c
        q *= t
    e = np.multiply(a, a, out=t)
    e *= -0.5
    np.exp(e, out=e)
    q *= e
    q *= a
    y = np.clip(x, 0, np.inf, out=a)  # max(x, 0); NaN stays NaN
    y -= q
    return y


def _gelu_sigmoid(x):
    y = _sigmoid(np.multiply(x, 1.702, out=_fresh(x)))
    y *= x
    return y


_GELU = {"EXACT": _gelu_exact, "TANH_APPROXIMATION": _gelu_tanh,
         "SIGMOID_APPROXIMATION": _gelu_sigmoid}

# erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), z >= 0: Numerical Recipes' Chebyshev
# fit (`erfcc`), relative error < 1.2e-7 for every z.
_ERFC_P = (0.17087277, -0.82215223, 1.48851587, -1.13520398, 0.27886807, -0.18628806,
           0.09678418, 0.37409196, 1.00002368, -1.26551223)


def _one_plus_erf(z):
    """1 + erf(z), overwriting `z`. In float32, as erfc(-z): relative error ~1e-7 everywhere,
    the negative tail included, where 1 + erf(z) in float32 would lose digits (and scipy's
    erf costs ~20 ns per element)."""
    if z.dtype != np.float32:
        return np.add(_erf(z), 1, out=z)
    upper = z >= 0
    t = np.abs(z)
    t *= 0.5
    t += 1
    np.reciprocal(t, out=t)
    p = np.multiply(t, _ERFC_P[0])
    for c in _ERFC_P[1:-1]:
        p += c
        p *= t
    p += _ERFC_P[-1]
    np.square(z, out=z)
    p -= z
    np.exp(p, out=p)
    p *= t  # erfc(|z|): that is 1 + erf(z) for z < 0, and 2 minus it for z >= 0
    np.subtract(1, p, out=t)
    t *= 2
    t *= upper
    p += t
    return p


@mil_op("softmax")
def softmax(a, outs):
    x, axis = a["x"], _int(a, "axis", -1)
    return _softmax_in_place(np.subtract(x, np.max(x, axis=axis, keepdims=True)), axis)


def _softmax_in_place(e, axis):
    """softmax of `e` (whose maximum along `axis` is already subtracted), overwriting it."""
    np.exp(e, out=e)
    e /= np.sum(e, axis=axis, keepdims=True)
    return e


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
    mil_op(_name, keeps_fp16=_name in _PICKS_VALUES)(_reduce_op(_f))


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
    if x.ndim > 2 and y.ndim == 2:  # one BLAS call over every row of x
        return _rows_times(x, y)
    return np.matmul(x, y)


def _rows_times(x, w):
    """x [..., K] @ w [K, N] as one BLAS call over every row, into an array of the result's
    shape that owns its memory (a reshaped view would be copied again to round to fp16)."""
    out = np.empty(x.shape[:-1] + w.shape[-1:], np.result_type(x, w))
    x2 = x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    np.matmul(x2, w, out=out.reshape(-1, w.shape[-1]) if x.ndim > 2 else out)
    return out


@mil_op("linear")
def linear(a, outs):
    x, w = a["x"], a["weight"]  # a constant: the executor stores it transposed (TRANSPOSED)
    y = _rows_times(x, w.T) if x.ndim > 1 else np.matmul(x, w.T)
    return y if a.get("bias") is None else _into(np.add, y, a["bias"])


def _per_channel(v, ndim):
    return None if v is None else np.reshape(v, (-1,) + (1,) * (ndim - 2))


def _into(f, y, v):
    """f(y, v), written over `y` (an array the op made itself) when the result fits in it."""
    if isinstance(y, np.ndarray) and y.ndim and y.dtype == np.result_type(y, v) and \
            _broadcasts_to(np.shape(v), y.shape):
        return f(y, v, out=y)
    return f(y, v)


def _broadcasts_to(shape, target):
    """Whether an array of `shape` broadcasts to `target` unchanged (np.broadcast_shapes
    costs microseconds, which small ops notice)."""
    return len(shape) <= len(target) and all(
        d == 1 or d == t for d, t in zip(shape[::-1], target[::-1]))


def _scale_shift(y, gamma, beta):
    """y * gamma + beta, overwriting `y` (made by the caller)."""
    y = y if gamma is None else _into(np.multiply, y, gamma)
    return y if beta is None else _into(np.add, y, beta)


def _channel_affine(y, a):
    """y * gamma + beta, with the optional gamma and beta given per channel (axis 1)."""
    gamma, beta = _per_channel(a.get("gamma"), y.ndim), _per_channel(a.get("beta"), y.ndim)
    return _scale_shift(y, gamma, beta)


@mil_op("batch_norm")
def batch_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    # x * scale + shift: two passes over x; the per-channel algebra costs nothing
    scale = 1 / np.sqrt(np.asarray(a["variance"], x.dtype) + x.dtype.type(eps))
    if a.get("gamma") is not None:
        scale = scale * a["gamma"]
    shift = -np.asarray(a["mean"], x.dtype) * scale
    if a.get("beta") is not None:
        shift = shift + a["beta"]
    y = np.multiply(x, _per_channel(scale.astype(x.dtype), x.ndim))
    y += _per_channel(shift.astype(x.dtype), x.ndim)
    return y


@mil_op("instance_norm")
def instance_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    axes = tuple(range(2, x.ndim))
    y = np.subtract(x, x.mean(axis=axes, keepdims=True))
    y /= np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    return _channel_affine(y, a)


@mil_op("layer_norm")
def layer_norm(a, outs):
    x, eps = a["x"], _float(a, "epsilon", 1e-5)
    axes = tuple(sorted(ax % x.ndim for ax in (_axes(a) or range(x.ndim))))
    param_shape = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    y = np.subtract(x, x.mean(axis=axes, keepdims=True))
    y /= np.sqrt(np.mean(np.square(y), axis=axes, keepdims=True) + eps)
    gamma = None if a.get("gamma") is None else np.reshape(a["gamma"], param_shape)
    beta = None if a.get("beta") is None else np.reshape(a["beta"], param_shape)
    return _scale_shift(y, gamma, beta)


@mil_op("local_response_norm")
def local_response_norm(a, outs):
    x, size = a["x"], _int(a, "size")
    alpha, beta, k = _float(a, "alpha", 1e-4), _float(a, "beta", 0.75), _float(a, "k", 1.0)
    # Channel c sums squares over [c - floor((size-1)/2), c + ceil((size-1)/2)].
    before, after = (size - 1) // 2, size - 1 - (size - 1) // 2
    sq = _pad_constant(np.square(x), [(0, 0), (before, after)] + [(0, 0)] * (x.ndim - 2), 0)
    window = sq[:, :x.shape[1]].copy()
    for i in range(1, size):  # a few contiguous adds; a cumsum over channels is strided
        window += sq[:, i:i + x.shape[1]]
    window *= alpha / size
    window += k
    np.power(window, beta, out=window)
    return np.divide(x, window, out=window)


@mil_op("scaled_dot_product_attention")
def scaled_dot_product_attention(a, outs):
    q, k, v, mask = a["query"], a["key"], a["value"], a.get("attn_mask")
    if mask is not None and mask.ndim < 2:
        mask = mask.reshape((1,) * (2 - mask.ndim) + mask.shape)
    batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2],
                                () if mask is None else mask.shape[:-2])
    rows, keys = q.shape[-2], k.shape[-2]
    if math.prod(batch) * rows * keys <= 1 << 20:
        return _attention(q, k, v, mask)
    # Big score matrices go a block of query rows at a time (~2 MB of scores: the softmax
    # passes stay in cache, the GEMMs stay wide; 350-row blocks at 1500 keys ran whisper's
    # attention 10% faster than 87-row ones); every row is computed exactly as in one piece.
    def flat(t):
        return np.broadcast_to(t, batch + t.shape[-2:]).reshape((-1,) + t.shape[-2:])

    q, k, v = flat(q), flat(k), flat(v)
    mask = None if mask is None else flat(mask)
    out = np.empty((q.shape[0], rows, v.shape[-1]), np.result_type(q, k, v))
    step = max(1, (1 << 19) // keys)
    for b in range(q.shape[0]):
        for first in range(0, rows, step):
            block = slice(first, first + step)
            m = None if mask is None else mask[b, block] if mask.shape[1] == rows else mask[b]
            out[b, block] = _attention(q[b, block], k[b], v[b], m)
    return out.reshape(batch + out.shape[1:])


def _attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v, with a boolean mask meaning "may attend"."""
    scale = np.float32(math.sqrt(q.shape[-1]))
    if math.frexp(scale)[0] == 0.5:  # a power of two: dividing q instead is exact, and smaller
        scores = np.matmul(q / scale, np.swapaxes(k, -1, -2))
    else:
        scores = np.matmul(q, np.swapaxes(k, -1, -2))
        scores /= scale
    if mask is not None and mask.dtype == bool:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = _into(np.add, scores, mask)
    scores -= np.max(scores, axis=-1, keepdims=True)
    return np.matmul(_softmax_in_place(scores, -1), v)


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
    out = [(n - (k - 1) * d - 1) // s + 1 for n, k, s, d in zip(x.shape[2:], kernel, strides,
                                                                  dilations)]
    steps = x.strides[2:]
    shape = x.shape[:2] + tuple(out) + tuple(kernel)
    strides = (x.strides[:2] + tuple(t * s for t, s in zip(steps, strides))
               + tuple(t * d for t, d in zip(steps, dilations)))
    if x.flags.c_contiguous and x.size:  # np.ndarray on x's buffer: as_strided costs ~5 us
        view = np.ndarray(shape, x.dtype, buffer=x, strides=strides)
        view.flags.writeable = False
        return view
    return as_strided(x, shape, strides, writeable=False)


def _taps(x, kernel, out_sizes, strides, dilations):
    """Yield (kernel offset, strided view of x that this tap reads for every output).

    Loops run over kernel taps, never over tensor elements: each tap is one vectorised op.
    """
    for offset in np.ndindex(*kernel):
        index = tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                      for o, d, n, s in zip(offset, dilations, out_sizes, strides))
        yield offset, x[(Ellipsis,) + index]


def _pad_spatial(x, pads, value=0.0, slot=None):
    return _pad_constant(x, [(0, 0), (0, 0)] + [tuple(p) for p in pads], value, slot)


def _pad_constant(x, pairs, value, slot=None):
    """np.pad(x, pairs, constant_values=value) as one fill and one copy; x itself if no pad.
    With a `slot`, the result lives in that scratch buffer (see `scratch`)."""
    if not any(b or e for b, e in pairs):
        return x
    if any(b < 0 or e < 0 for b, e in pairs):
        return np.pad(x, pairs, constant_values=value)
    shape = tuple(n + b + e for n, (b, e) in zip(x.shape, pairs))
    if slot:
        out = scratch(slot, shape, x.dtype)
        out.fill(value)
    else:
        out = np.zeros(shape, x.dtype) if value == 0 else np.full(shape, value, x.dtype)
    out[tuple(slice(b, b + n) for n, (b, _) in zip(x.shape, pairs))] = x
    return out


_SCRATCH = threading.local()


def scratch(slot, shape, dtype):
    """An uninitialised array in a buffer that this thread reuses for `slot` from call to
    call, valid until the slot's next use: for an op's internal temporaries. Fresh memory
    costs a page fault per 4 kB, which on some machines costs more than the op's work."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    size, dtype = math.prod(shape), np.dtype(dtype)
    buf = buffers.get((slot, dtype))
    if buf is None or buf.size < size:
        buf = buffers[slot, dtype] = np.empty(size, dtype)
    return buf[:size].reshape(shape)


def _copy_to_scratch(slot, view):
    """`view` as a C-contiguous array: itself if it is one, else a copy in scratch."""
    if view.flags.c_contiguous:
        return view
    out = scratch(slot, view.shape, view.dtype)
    np.copyto(out, view)
    return out


@mil_op("conv")
def conv(a, outs):
    x, w, groups = a["x"], a["weight"], _int(a, "groups", 1)
    nd = x.ndim - 2
    strides, dil = _ints(a, "strides", [1] * nd), _ints(a, "dilations", [1] * nd)
    eff = [(k - 1) * d + 1 for k, d in zip(w.shape[2:], dil)]
    pads = _spatial_pads(a, x.shape[2:], eff, strides)
    if winograd.fits(x, w, groups, strides, dil):
        y = winograd.conv3x3(x, w, pads, scratch)
    elif _shifted_fits(x, w, groups, strides):
        y = _conv_shifted(x, w, pads, dil)
    else:
        xp = _pad_spatial(x, pads, slot="padded")
        y = _conv_matmul(xp, w, groups, strides, dil)
    return y if a.get("bias") is None else _into(np.add, y, _per_channel(a["bias"], y.ndim))


def _shifted_fits(x, w, groups, strides):
    """Whether `_conv_shifted` beats im2col: a stride-1 2-D kernel (not 1x1) with few output
    channels. Measured on 3x3 convs (1 thread, /tmp-style microbenchmarks of both paths):
    1.1-1.4x faster at 32 outputs from 128 inputs (densenet's growth convs) and 48 from 64;
    even at 64 outputs; 5-10% slower at 96 and up, where im2col's one big GEMM wins, and on
    big maps, where the per-tap sums no longer stay in cache."""
    if groups != 1 or x.ndim != 4 or strides[0] != 1 or strides[1] != 1:
        return False
    m, (h, wd), (kh, kw) = w.shape[0], x.shape[2:], w.shape[2:]
    return x.shape[1] >= 32 and m <= 48 and kh * kw > 1 and m * h * (wd + kw) <= 1 << 18


def _conv_shifted(x, w, pads, dilations):
    """Stride-1 convolution without an im2col matrix. With the padded image flattened to
    rows of pitch Wp, the input of kernel tap (i, j) for every output position (on a grid
    Wp wide) is one contiguous run of it, offset by i * Wp + j (times the dilations): so
    the output is the sum over taps of W[:, :, i, j] @ that run, each product a plain
    GEMM on a view. The grid's Wp - W_out extra columns are computed and dropped."""
    n, c = x.shape[:2]
    m, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    (top, bottom), (left, right) = pads
    hp, wp = x.shape[2] + top + bottom, x.shape[3] + left + right
    ho, wo = hp - (kh - 1) * dilations[0], wp - (kw - 1) * dilations[1]
    slack = (kw - 1) * dilations[1]  # the last tap's run overshoots the image by this much
    flat = scratch("shifted", (c, hp * wp + slack), x.dtype)
    taps = np.ascontiguousarray(np.moveaxis(w.reshape(m, c, kh * kw), 2, 0))  # [taps, M, C]
    acc = scratch("shifted sum", (m, ho * wp), np.result_type(x, w))
    part = scratch("shifted part", (m, ho * wp), acc.dtype)
    y = np.empty((n, m, ho, wo), acc.dtype)
    for image in range(n):
        flat.fill(0)
        flat[:, :hp * wp].reshape(c, hp, wp)[:, top:top + x.shape[2], left:left + x.shape[3]] \
            = x[image]
        for t in range(kh * kw):
            start = (t // kw) * dilations[0] * wp + (t % kw) * dilations[1]
            run = flat[:, start:start + ho * wp]
            if t == 0:
                np.matmul(taps[t], run, out=acc)
            else:
                np.matmul(taps[t], run, out=part)
                acc += part
        y[image] = acc.reshape(m, ho, wp)[:, :, :wo]
    return y


def _conv_matmul(xp, w, groups, strides, dilations, budget=1 << 18):
    """Convolution of the padded `xp` as matmuls, NCHW throughout: weights [G, M/G, C/G * K]
    times the im2col matrix [N, G, C/G * K, P] is [N, G, M/G, P], already the output's
    layout. Each im2col row (one channel and kernel tap, every output position) is copied
    from a window view in long runs; a 1x1 kernel needs no copy at all. A big im2col matrix
    is made a block at a time (of groups, else of output rows), about `budget` elements, so
    that it stays in cache: depthwise convolutions are then small matmuls on cached data."""
    n, c, nd = xp.shape[0], xp.shape[1], w.ndim - 2
    m, kernel = w.shape[0], w.shape[2:]
    pointwise = all(k == 1 for k in kernel)
    if pointwise:
        cols = xp[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)]
        out_sizes = cols.shape[2:]
    else:
        cols = _windows(xp, kernel, strides, dilations)  # [N, C, *O, *K] -> [N, C, *K, *O]
        out_sizes = cols.shape[2:2 + nd]
        cols = cols.transpose((0, 1) + tuple(range(2 + nd, 2 + 2 * nd)) + tuple(range(2, 2 + nd)))
    rows, size = (c // groups) * math.prod(kernel), math.prod(out_sizes)
    wm = w.reshape(groups, m // groups, rows)
    # the result owns its memory in the output's shape (a view would be copied again to round
    # it to fp16); `y` is that memory as [N, G, M/G, P] for the matmuls
    result = np.empty((n, m) + tuple(out_sizes), np.result_type(xp, w))
    y = result.reshape(n, groups, m // groups, size)
    if groups > 1:
        step = max(1, 2 * budget // (n * rows * size)) * (c // groups)  # channels per block
        for first in range(0, c, step):
            block = _copy_to_scratch("im2col", cols[:, first:first + step])
            block = block.reshape(n, -1, rows, size)
            g = first // (c // groups)
            np.matmul(wm[g:g + block.shape[1]], block, out=y[:, g:g + block.shape[1]])
        return result
    # Few output channels make the matmul stream its im2col matrix from memory: block it
    # early then; many reuse each column enough, and big blocks multiply fastest.
    per_row, limit = size // out_sizes[0] if size else 1, budget if m <= 32 else 8 * budget
    step = out_sizes[0] if pointwise or n * rows * size <= limit else \
        max(1, budget // (n * rows * per_row))
    for first in range(0, out_sizes[0], step):
        block = cols[(slice(None),) * (cols.ndim - nd) + (slice(first, first + step),)]
        block = _copy_to_scratch("im2col", block).reshape(n, rows, -1)
        np.matmul(wm[0], block, out=y[:, 0, :, first * per_row:first * per_row + block.shape[-1]])
    return result


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
    """Combine every window's taps; `pads` are (before, after) per spatial dim. Separably,
    one spatial axis after the other: k + k taps for a k x k window instead of k * k."""
    if x.ndim == 4:
        return _pool_2d(x, kernel, strides, out, pads, combine, fill)
    acc = _pad_spatial(x, pads, fill)
    for axis, (k, s, n) in enumerate(zip(kernel, strides, out), start=2):
        src, acc = acc, None
        for i in range(k):
            view = src[(slice(None),) * axis + (slice(i, i + (n - 1) * s + 1, s),)]
            acc = view.copy() if acc is None else combine(acc, view, out=acc)
    return acc


def _pool_2d(x, kernel, strides, out, pads, combine, fill):
    """`_pool` of an NCHW `x` in passes over the whole padded image as one flat run: the
    window's rows are the runs shifted by a row pitch each, its columns the result shifted
    by one element each, so every pass is one contiguous vectorised op (a pass over strided
    views loops in short rows, 3x slower); the strided outputs are picked at the end. The
    shifted runs read up to a window past the image: a slack filled like the padding."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (oh, ow) = kernel, strides, out
    (top, bottom), (left, right) = pads
    hp, wp = h + top + bottom, w + left + right
    size = n * c * hp * wp
    padded = scratch("pool padded", (size + (kh - 1) * wp,), x.dtype)
    padded.fill(fill)
    padded[:size].reshape(n, c, hp, wp)[:, :, top:top + h, left:left + w] = x
    rows = scratch("pool rows", (size + kw - 1,), x.dtype)
    _combine_shifted(combine, padded, rows[:size], kh, wp)
    rows[size:] = fill
    grid = scratch("pool grid", (size,), x.dtype)
    _combine_shifted(combine, rows, grid, kw, 1)
    picked = grid.reshape(n, c, hp, wp)[:, :, :(oh - 1) * sh + 1:sh, :(ow - 1) * sw + 1:sw]
    return np.ascontiguousarray(picked)


def _combine_shifted(combine, src, out, taps, step):
    """out[j] = combine of src[j + t * step] over t < taps, for every j of `out`."""
    size = out.size
    if taps == 1:
        np.copyto(out, src[:size])
        return
    combine(src[:size], src[step:step + size], out=out)
    for t in range(2, taps):
        combine(out, src[t * step:t * step + size], out=out)


@mil_op("max_pool", keeps_fp16=True)
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
    return _into(np.divide, sums, _pool(cover, kernel, strides, out, full, np.add, 0.0))


# ---- shape and data movement ----------------------------------------------------------------

@mil_op("reshape", keeps_fp16=True)
def reshape(a, outs):
    x, shape = a["x"], _ints(a, "shape")
    if 0 in shape and len(shape) == x.ndim:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@mil_op("transpose", keeps_fp16=True)
def transpose(a, outs):
    return np.transpose(a["x"], _ints(a, "perm"))


@mil_op("squeeze", keeps_fp16=True)
def squeeze(a, outs):
    return np.squeeze(a["x"], axis=_axes(a))


@mil_op("expand_dims", keeps_fp16=True)
def expand_dims(a, outs):
    x, axes = a["x"], _ints(a, "axes")
    rank = x.ndim + len(axes)
    return np.expand_dims(x, tuple(sorted(ax % rank for ax in axes)))


@mil_op("tile", keeps_fp16=True)
def tile(a, outs):
    return np.tile(a["x"], _ints(a, "reps"))


@mil_op("reverse", keeps_fp16=True)
def reverse(a, outs):
    return np.flip(a["x"], axis=_axes(a))


@mil_op("shape", keeps_fp16=True)
def shape(a, outs):
    return np.array(a["x"].shape, dtype=np.int32)


@mil_op("fill", keeps_fp16=True)
def fill(a, outs):
    value, dtype = a.get("value", np.float32(0)), outs[0].dtype
    return np.full(_ints(a, "shape"), value, dtype=np.float32 if dtype == np.float16 else dtype)


@mil_op("range_1d")
def range_1d(a, outs):
    return np.arange(a["start"], a["end"], a["step"]).astype(outs[0].dtype)


@mil_op("concat", keeps_fp16=True)
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


@mil_op("stack", keeps_fp16=True)
def stack(a, outs):
    return np.stack(a["values"], axis=_int(a, "axis"))


@mil_op("split", keeps_fp16=True)
def split(a, outs):
    x, axis = a["x"], _int(a, "axis")
    sizes = _ints(a, "split_sizes")
    if sizes is None:
        num = _int(a, "num_splits")
        sizes = [x.shape[axis] // num] * num
    return tuple(np.split(x, np.cumsum(sizes)[:-1], axis=axis))


@mil_op("slice_by_index", keeps_fp16=True)
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


@mil_op("slice_by_size", keeps_fp16=True)
def slice_by_size(a, outs):
    x, begin, size = a["x"], _ints(a, "begin"), _ints(a, "size")
    index = []
    for b, s, d in zip(begin, size, x.shape):
        b = b + d if b < 0 else b
        index.append(slice(b, None if s == -1 else b + s))
    return x[tuple(index)]


@mil_op("pad", keeps_fp16=True)
def pad(a, outs):
    x, flat = a["x"], _ints(a, "pad")
    pairs = [(0, 0)] * (x.ndim - len(flat) // 2) + list(zip(flat[0::2], flat[1::2]))
    mode = _str(a, "mode", "constant")
    if mode == "constant":
        return _pad_constant(x, pairs, _float(a, "constant_val", 0.0))
    return np.pad(x, pairs, mode={"reflect": "reflect", "replicate": "edge"}[mode])


@mil_op("band_part", keeps_fp16=True)
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


@mil_op("topk", keeps_fp16=True)
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


@mil_op("gather", keeps_fp16=True)
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


@mil_op("gather_along_axis", keeps_fp16=True)
def gather_along_axis(a, outs):
    x, axis = a["x"], _int(a, "axis", 0)
    return np.take_along_axis(x, _wrap_indices(a["indices"], x.shape[axis]), axis=axis)


@mil_op("gather_nd", keeps_fp16=True)
def gather_nd(a, outs):
    x, idx, batch = a["x"], a["indices"], _int(a, "batch_dims", 0)
    depth = idx.shape[-1]
    cols = [_wrap_indices(idx[..., i], x.shape[batch + i]) for i in range(depth)]
    grids = np.ix_(*[np.arange(d) for d in x.shape[:batch]]) if batch else ()
    grids = [g.reshape(g.shape + (1,) * (idx.ndim - 1 - batch)) for g in grids]
    return x[tuple(grids) + tuple(cols)]


_SCATTER_MODES = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
                  "max": np.maximum, "min": np.minimum}


def _scatter(x, index, updates, mode):
    """A copy of x with updates written at the advanced `index` ("update": the last write
    of a duplicate wins) or combined with what is there by `mode`."""
    out = np.array(x)
    if mode == "update":
        out[index] = updates
    elif mode == "div" and out.dtype.kind != "f":
        raise ValueError("scatter mode 'div' on integers is not supported")
    else:
        _SCATTER_MODES[mode].at(out, index, updates)
    return out


@mil_op("scatter_nd")  # not keeps_fp16: add and mul make new values
def scatter_nd(a, outs):
    x, idx = a["data"], a["indices"]
    cols = [_wrap_indices(idx[..., i], x.shape[i]) for i in range(idx.shape[-1])]
    return _scatter(x, tuple(cols), a["updates"], _str(a, "mode", "add"))


@mil_op("scatter_along_axis")
def scatter_along_axis(a, outs):
    x, idx, axis = a["data"], a["indices"], _int(a, "axis", 0)
    axis %= x.ndim
    index = list(np.indices(idx.shape, sparse=True))
    index[axis] = _wrap_indices(idx, x.shape[axis])
    return _scatter(x, tuple(index), a["updates"], _str(a, "mode", "add"))


@mil_op("reverse_sequence", keeps_fp16=True)
def reverse_sequence(a, outs):
    x, lengths = a["x"], a["lengths"].astype(np.int64).reshape(-1)
    seq_axis, batch_axis = _int(a, "seq_axis", 0) % x.ndim, _int(a, "batch_axis", 0) % x.ndim
    steps = x.shape[seq_axis]
    if np.any((lengths < 0) | (lengths > steps)):
        raise ValueError(f"reverse_sequence lengths {lengths.tolist()} outside [0, {steps}]")
    t = np.arange(steps)
    source = np.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [batch, steps]
    shape = [1] * x.ndim
    shape[batch_axis], shape[seq_axis] = len(lengths), steps
    if batch_axis > seq_axis:
        source = source.T
    source = np.broadcast_to(source.reshape(shape), x.shape)
    return np.take_along_axis(x, source, axis=seq_axis)


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


@mil_op("upsample_nearest_neighbor", keeps_fp16=True)
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
    """Run one LSTM direction over xs [T, B, I]; gates are stacked [i, f, o, z]. Without
    peepholes, i, f and o go through one activation call per step."""
    hidden = w_hh.shape[1]
    rec, cell_act, out_act = acts
    x_gates = np.matmul(xs, w_ih.T)  # all steps at once
    if bias is not None:
        x_gates += bias
    joint = peephole is None
    p_i, p_f, p_o = (None,) * 3 if joint else np.split(peephole, 3)
    hs = np.empty(xs.shape[:2] + (hidden,), x_gates.dtype)
    for t, x_t in enumerate(x_gates):
        gates = np.matmul(h, w_hh.T)
        gates += x_t
        g_z = gates[..., 3 * hidden:]
        if joint:
            ifo = rec(gates[..., :3 * hidden])
            i, f, o = ifo[..., :hidden], ifo[..., hidden:2 * hidden], ifo[..., 2 * hidden:]
        else:
            g_i, g_f, g_o = (gates[..., k * hidden:(k + 1) * hidden] for k in range(3))
            i, f = rec(g_i + p_i * c), rec(g_f + p_f * c)
        c = f * c + i * cell_act(g_z)
        if clip is not None:
            c = np.clip(c, -clip, clip)
        if not joint:
            o = rec(g_o + p_o * c)
        h = hs[t] = o * out_act(c)
    return hs, h, c


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
        # a "reverse" lstm returns its sequence in processing order (coremltools' op tests
        # expect that); the backward half of a bidirectional one is in time order
        runs.append((seq[::-1] if suffix == "_back" else seq, h, c))
    if len(runs) == 1:
        seq, h, c = runs[0]
    else:
        seq = np.concatenate([r[0] for r in runs], axis=-1)
        h, c = (np.concatenate([r[i] for r in runs], axis=-1) for i in (1, 2))
    if not _bool(a, "output_sequence"):
        seq = h[None]
    return seq, h, c


@mil_op("rnn")
def rnn(a, outs):
    """h = activation(x W_ih + h W_hh + bias), one direction; a "reverse" rnn returns its
    sequence in processing order, as lstm does."""
    x, w_ih, w_hh = a["x"], a["weight_ih"], a["weight_hh"]
    act = _RNN_ACTIVATIONS[_str(a, "activation", "tanh").lower()]
    xs = x[::-1] if _str(a, "direction", "forward") == "reverse" else x
    x_proj = np.matmul(xs, w_ih.T)  # all steps at once
    if a.get("bias") is not None:
        x_proj += a["bias"]
    h = a["initial_h"]
    hs = np.empty(x_proj.shape[:2] + (w_hh.shape[0],), x_proj.dtype)
    for t, x_t in enumerate(x_proj):
        h = hs[t] = act(x_t + np.matmul(h, w_hh.T))
    return (hs if _bool(a, "output_sequence") else h[None]), h


# ---- compressed constants (constexpr_*) -------------------------------------------------------

def _along_axis(param, rank, axis):
    if param.ndim == 0 or param.ndim == rank:
        return param
    shape = [1] * rank
    shape[axis] = -1
    return param.reshape(shape)


@mil_op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(a, outs):
    data, axis = a["quantized_data"], _int(a, "axis")
    scale = _along_axis(a["scale"], data.ndim, axis)
    zero = _along_axis(a["zero_point"], data.ndim, axis)
    return (data.astype(np.float32) - zero.astype(np.float32)) * scale.astype(np.float32)


@mil_op("constexpr_cast")
def constexpr_cast(a, outs):
    return a["source_val"].astype(outs[0].dtype)


def _repeat_blocks(param, shape):
    """Expand a per-block parameter to `shape` by repeating each entry over its block."""
    for axis, (full, blocks) in enumerate(zip(shape, param.shape)):
        if blocks != full:
            param = np.repeat(param, full // blocks, axis=axis)
    return param


@mil_op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(a, outs):
    data, scale = a["data"], a["scale"]
    values = data.astype(np.float32)
    if a.get("offset") is not None:
        values = values - _repeat_blocks(a["offset"].astype(np.float32), data.shape)
    return values * _repeat_blocks(scale.astype(np.float32), data.shape)


@mil_op("constexpr_lut_to_dense", keeps_fp16=True)
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
