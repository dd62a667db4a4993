"""Op table entries: more activations, trigonometry, Round, Hardmax, the Lp and group/RMS
normalizations, ReduceLogSum and the Lp pools.

References compute in float64 where the formula has several steps (float16 sums in
float32, as `nn.accumulator` says) and return the input's dtype. Old-opset forms are
rewritten by the importer: Hardmax before 13 flattens like Softmax, GroupNormalization
before 21 takes per-group scale and bias (expanded to per-channel there).
"""

from __future__ import annotations

import numpy as np

from ..errors import UnsupportedOpError
from . import REQUIRED, Binary, OpDef, Unary, normalize_axis, register
from .elementwise import Math, _same_dtype, _sigmoid
from .nn import GlobalPool, Pool, accumulator, broadcasts_to, pad_windows, windows
from .reduce import Reduce


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)


# -- attribute-free elementwise math -----------------------------------------------------
@register
class Tan(Math):
    fn = staticmethod(np.tan)


@register
class Asin(Math):
    fn = staticmethod(np.arcsin)


@register
class Acos(Math):
    fn = staticmethod(np.arccos)


@register
class Atan(Math):
    fn = staticmethod(np.arctan)


@register
class Sinh(Math):
    fn = staticmethod(np.sinh)


@register
class Cosh(Math):
    fn = staticmethod(np.cosh)


@register
class Asinh(Math):
    fn = staticmethod(np.arcsinh)


@register
class Acosh(Math):
    fn = staticmethod(np.arccosh)


@register
class Atanh(Math):
    fn = staticmethod(np.arctanh)


@register
class Round(Math):
    """Halves to even (numpy's rule too); integral values, +-0, NaN and inf unchanged."""

    fn = staticmethod(np.round)


@register
class Softsign(Math):
    fn = staticmethod(lambda x: _f64(x) / (1 + np.abs(_f64(x))))


@register
class Mish(Math):
    """x * tanh(softplus(x)); softplus as logaddexp(0, x) never overflows."""

    fn = staticmethod(lambda x: _f64(x) * np.tanh(np.logaddexp(0, _f64(x))))


# -- activations with attributes ---------------------------------------------------------
@register
class Selu(Unary):
    attrs = {"alpha": 1.67326319217681884765625, "gamma": 1.05070102214813232421875}

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        alpha, gamma = self.attr(node, "alpha"), self.attr(node, "gamma")
        with np.errstate(over="ignore"):
            y = np.where(x > 0, gamma * x, gamma * alpha * np.expm1(np.minimum(x, 0)))
        return [_same_dtype(inputs[0], y)]


@register
class Celu(Unary):
    """max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""

    attrs = {"alpha": 1.0}

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        alpha = self.attr(node, "alpha")
        y = np.maximum(x, 0) + np.minimum(0, alpha * np.expm1(np.minimum(x, 0) / alpha))
        return [_same_dtype(inputs[0], y)]


@register
class ThresholdedRelu(Unary):
    """x where x > alpha (strictly), else 0."""

    attrs = {"alpha": 1.0}

    def reference(self, node, inputs):
        x = inputs[0]
        alpha = np.asarray(self.attr(node, "alpha")).astype(x.dtype)
        return [np.where(x > alpha, x, 0).astype(x.dtype)]


@register
class Shrink(Unary):
    """x + bias where x < -lambd, x - bias where x > lambd, else 0. On integers the
    comparisons and sums are in floating point and the result truncates, as onnxruntime
    computes them."""

    attrs = {"bias": 0.0, "lambd": 0.5}

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        lambd, bias = self.attr(node, "lambd"), self.attr(node, "bias")
        y = np.where(x < -lambd, x + bias, np.where(x > lambd, x - bias, 0))
        return [_same_dtype(inputs[0], y)]


@register
class Swish(Unary):
    """Opset 24: x * sigmoid(alpha * x)."""

    attrs = {"alpha": 1.0}

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        return [_same_dtype(inputs[0], x * _sigmoid(self.attr(node, "alpha") * x))]


@register
class PRelu(Binary):
    """x where x >= 0, slope * x elsewhere; slope broadcasts to X (unidirectionally)."""

    def infer(self, node):
        x, slope = node.inputs[:2]
        if not broadcasts_to(slope.shape, x.shape):
            self.fail(node, "slope must broadcast to X")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, slope = inputs
        return [np.where(x < 0, slope * x, x).astype(x.dtype)]


# -- along an axis -----------------------------------------------------------------------
@register
class Hardmax(Unary):
    """1 at the first maximum along `axis`, 0 elsewhere (opset 13; older opsets flatten,
    see the importer)."""

    attrs = {"axis": -1}

    def infer(self, node):
        x = node.inputs[0]
        normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = inputs[0]
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        first = np.expand_dims(np.argmax(x, axis=axis), axis)
        positions = np.arange(x.shape[axis]).reshape(
            [-1 if i == axis else 1 for i in range(x.ndim)])
        return [(positions == first).astype(x.dtype)]


@register
class LpNormalization(Unary):
    """x / ||x||_p along `axis` (p is 1 or 2); 0 where the norm is 0."""

    attrs = {"axis": -1, "p": 2}

    def infer(self, node):
        x = node.inputs[0]
        normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        if self.attr(node, "p") not in (1, 2):
            self.fail(node, f"p={self.attr(node, 'p')}: only 1 and 2 are defined")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        if self.attr(node, "p") == 1:
            norm = np.sum(np.abs(x), axis=axis, keepdims=True)
        else:
            norm = np.sqrt(np.sum(x * x, axis=axis, keepdims=True))
        return [_same_dtype(inputs[0], x / np.where(norm == 0, 1, norm))]


@register
class MeanVarianceNormalization(Unary):
    """(x - mean) / (std + 1e-9) over `axes`; the variance as the mean squared deviation
    (the spec's E[x^2] - E[x]^2, without its cancellation)."""

    attrs = {"axes": (0, 2, 3)}
    EPSILON = 1e-9

    def axes(self, node, rank: int) -> tuple[int, ...]:
        axes = {normalize_axis(node, int(a), rank) for a in self.attr(node, "axes")}
        if len(axes) != len(self.attr(node, "axes")):
            self.fail(node, f"repeated axes {list(self.attr(node, 'axes'))}")
        return tuple(sorted(axes))

    def infer(self, node):
        x = node.inputs[0]
        self.axes(node, len(x.shape))
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x = _f64(inputs[0])
        axes = self.axes(node, x.ndim)
        centered = x - x.mean(axis=axes, keepdims=True)
        std = np.sqrt(np.mean(centered * centered, axis=axes, keepdims=True))
        return [_same_dtype(inputs[0], centered / (std + self.EPSILON))]


@register
class ReduceLogSum(Reduce):
    """log(sum(x)); an empty sum gives -inf. Integers (before opset 28) truncate."""

    def reduce(self, x, axes, keep):
        total = np.sum(x, axis=axes, keepdims=keep, dtype=x.dtype)
        return np.log(total.astype(np.float64)) if x.dtype.kind in "iu" else np.log(total)


# -- normalizations with learned parameters ----------------------------------------------
def _float32_stash(op: OpDef, node) -> None:
    """Stage one in float32 (stash_type=1) only, as LayerNormalization."""
    if op.attr(node, "stash_type") != 1:
        raise UnsupportedOpError(f"{op.op_type} node '{node.name}': only stash_type=1 "
                                 "(float32) is supported")


@register
class GroupNormalization(OpDef):
    """Opset-21 form: per-channel scale and bias [C]; mean and variance per instance and
    group of C / num_groups consecutive channels."""

    attrs = {"epsilon": 1e-5, "num_groups": REQUIRED, "stash_type": 1}

    def infer(self, node):
        _float32_stash(self, node)
        x, scale, bias = node.inputs[:3]
        groups = int(self.attr(node, "num_groups"))
        if len(x.shape) < 3:
            self.fail(node, "X must be (N, C, ...)")
        channels = x.shape[1]
        if groups <= 0 or channels % groups:
            self.fail(node, f"num_groups {groups} does not divide the {channels} channels")
        for value in (scale, bias):
            if value.shape != (channels,):
                self.fail(node, f"scale and bias must be ({channels},)")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, scale, bias = inputs
        acc = accumulator(x.dtype)
        groups = int(self.attr(node, "num_groups"))
        grouped = x.astype(acc).reshape(x.shape[0], groups, -1)
        centered = grouped - grouped.mean(axis=-1, keepdims=True)
        var = np.mean(centered * centered, axis=-1, keepdims=True)
        y = (centered / np.sqrt(var + acc.type(self.attr(node, "epsilon")))).reshape(x.shape)
        shape = (-1,) + (1,) * (x.ndim - 2)
        return [(y * scale.astype(acc).reshape(shape)
                 + bias.astype(acc).reshape(shape)).astype(x.dtype)]


@register
class RMSNormalization(OpDef):
    """Opset 23: x / sqrt(mean(x^2 over axis..) + epsilon) * scale (scale broadcasts to X)."""

    attrs = {"axis": -1, "epsilon": 1e-5, "stash_type": 1}

    def infer(self, node):
        _float32_stash(self, node)
        x, scale = node.inputs[:2]
        normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        if not broadcasts_to(scale.shape, x.shape):
            self.fail(node, "scale must broadcast to X")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, scale = inputs
        acc = accumulator(x.dtype)
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        xa = x.astype(acc)
        mean_square = np.mean(xa * xa, axis=tuple(range(axis, x.ndim)), keepdims=True)
        y = xa / np.sqrt(mean_square + acc.type(self.attr(node, "epsilon")))
        return [(y * scale.astype(acc)).astype(x.dtype)]


# -- Lp pooling --------------------------------------------------------------------------
def _lp_order(op: OpDef, node) -> float:
    """p: an int since opset 2, a float in opset 1; at least 1 for a norm."""
    p = float(op.attr(node, "p"))
    if not p >= 1:
        op.fail(node, f"p={p}: an Lp norm needs p >= 1")
    return p


def _lp_root(total: np.ndarray, p: float) -> np.ndarray:
    if p == 1:
        return total
    return np.sqrt(total) if p == 2 else np.power(total, 1 / p)


@register
class LpPool(Pool):
    """(sum over the window of |x|^p)^(1/p); padding adds nothing to the sum."""

    attrs = {**Pool.attrs, "p": 2}

    def infer(self, node):
        _lp_order(self, node)
        return super().infer(node)

    def reference(self, node, inputs):
        x = inputs[0]
        p = _lp_order(self, node)
        window = self.window(node, x.shape)
        powered = np.power(np.abs(_f64(x)), p)
        view = windows(pad_windows(powered, window, 0), window)
        total = view.sum(axis=tuple(range(-len(window.kernel), 0)))
        return [_lp_root(total, p).astype(x.dtype)]


@register
class GlobalLpPool(GlobalPool):
    attrs = {"p": 2}

    def infer(self, node):
        _lp_order(self, node)
        return super().infer(node)

    def reference(self, node, inputs):
        x = inputs[0]
        p = _lp_order(self, node)
        total = np.sum(np.power(np.abs(_f64(x)), p), axis=tuple(range(2, x.ndim)),
                       keepdims=True)
        return [_lp_root(total, p).astype(x.dtype)]
