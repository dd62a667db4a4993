"""Op table entries: elementwise math, activations, comparisons and logic."""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import special

from . import Binary, OpDef, Unary, broadcast_shapes, register


def erf(x: np.ndarray) -> np.ndarray:
    """The error function in float64 (numpy has none)."""
    return special.erf(np.asarray(x, np.float64))


def _sigmoid(x):
    # Both branches only ever exponentiate non-positive numbers, so nothing overflows.
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def _same_dtype(x: np.ndarray, out) -> np.ndarray:
    return np.asarray(out).astype(x.dtype, copy=False)


class Math(Unary):
    """An attribute-free elementwise function; subclasses set `fn`."""

    fn = staticmethod(lambda x: x)

    def reference(self, node, inputs):
        with np.errstate(all="ignore"):  # log(0) = -inf, sqrt(-1) = NaN: ONNX's answers
            return [_same_dtype(inputs[0], self.fn(inputs[0]))]


# -- unary math --------------------------------------------------------------------------
@register
class Relu(Unary):
    def reference(self, node, inputs):
        return [np.maximum(inputs[0], 0).astype(inputs[0].dtype)]


@register
class Sigmoid(Math):
    fn = staticmethod(_sigmoid)


@register
class Tanh(Math):
    fn = staticmethod(np.tanh)


@register
class Erf(Math):
    fn = staticmethod(erf)


@register
class Sqrt(Math):
    fn = staticmethod(np.sqrt)


@register
class Exp(Math):
    fn = staticmethod(np.exp)


@register
class Log(Math):
    fn = staticmethod(np.log)


@register
class Neg(Math):
    fn = staticmethod(np.negative)


@register
class Abs(Math):
    fn = staticmethod(np.abs)


@register
class Reciprocal(Math):
    fn = staticmethod(np.reciprocal)


@register
class Floor(Math):
    fn = staticmethod(np.floor)


@register
class Ceil(Math):
    fn = staticmethod(np.ceil)


@register
class Sign(Math):
    fn = staticmethod(np.sign)


@register
class Sin(Math):
    fn = staticmethod(np.sin)


@register
class Cos(Math):
    fn = staticmethod(np.cos)


@register
class Softplus(Math):
    fn = staticmethod(lambda x: np.logaddexp(0, x))


@register
class HardSwish(Math):
    fn = staticmethod(lambda x: x * np.clip(x / 6 + 0.5, 0, 1))


@register
class Not(Math):
    fn = staticmethod(np.logical_not)


class FloatTest(OpDef):
    """IsNaN / IsInf: a bool mask of the input's shape."""

    def infer(self, node):
        x = node.inputs[0]
        return [(x.shape, np.dtype(bool))]


@register
class IsNaN(FloatTest):
    def reference(self, node, inputs):
        return [np.isnan(inputs[0])]


@register
class IsInf(FloatTest):
    attrs = {"detect_negative": 1, "detect_positive": 1}

    def reference(self, node, inputs):
        x = inputs[0]
        negative = np.isneginf(x) if self.attr(node, "detect_negative") else np.zeros_like(x, bool)
        positive = np.isposinf(x) if self.attr(node, "detect_positive") else np.zeros_like(x, bool)
        return [negative | positive]


@register
class Identity(Math):
    pass


# -- activations with attributes ---------------------------------------------------------
@register
class HardSigmoid(Unary):
    attrs = {"alpha": 0.2, "beta": 0.5}

    def reference(self, node, inputs):
        x = inputs[0]
        alpha, beta = self.attr(node, "alpha"), self.attr(node, "beta")
        return [_same_dtype(x, np.clip(alpha * x + beta, 0, 1))]


@register
class LeakyRelu(Unary):
    attrs = {"alpha": 0.01}

    def reference(self, node, inputs):
        x = inputs[0]
        return [_same_dtype(x, np.where(x >= 0, x, self.attr(node, "alpha") * x))]


@register
class Elu(Unary):
    attrs = {"alpha": 1.0}

    def reference(self, node, inputs):
        x = inputs[0]
        negative = self.attr(node, "alpha") * np.expm1(np.minimum(x, 0))
        return [_same_dtype(x, np.where(x > 0, x, negative))]


@register
class Gelu(Unary):
    """Opset 20; `approximate` is "none" (erf) or "tanh"."""

    attrs = {"approximate": "none"}

    def infer(self, node):
        if self.attr(node, "approximate") not in ("none", "tanh"):
            self.fail(node, f"unknown approximate '{self.attr(node, 'approximate')}'")
        return super().infer(node)

    def reference(self, node, inputs):
        x = np.asarray(inputs[0], np.float64)
        if self.attr(node, "approximate") == "tanh":
            inner = math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)
            y = 0.5 * x * (1 + np.tanh(inner))
        else:
            y = 0.5 * x * (1 + erf(x / math.sqrt(2)))
        return [_same_dtype(inputs[0], y)]


@register
class Clip(Unary):
    """Min and max are optional scalar inputs 1 and 2 (constants for every lowering)."""

    static_inputs = (1, 2)

    def infer(self, node):
        for bound in node.inputs[1:3]:
            if bound is not None and bound.size != 1:
                self.fail(node, f"bound '{bound.name}' must be a scalar")
        return super().infer(node)

    def reference(self, node, inputs):
        x = inputs[0]
        lo, hi = (inputs + [None, None])[1:3]
        if lo is not None:
            x = np.maximum(x, lo.reshape(()).astype(x.dtype))
        if hi is not None:
            x = np.minimum(x, hi.reshape(()).astype(x.dtype))
        return [x]


@register
class Dropout(OpDef):
    """Inference form: output = input; the optional mask output is all True."""

    attrs = {"seed": None}
    static_inputs = (2,)  # training_mode: a run-time flag could turn randomness on

    def infer(self, node):
        training = self.static(node, 2)
        if training is not None and bool(np.asarray(training).reshape(-1)[0]):
            self.fail(node, "training_mode=True is not supported (inference only)")
        x = node.inputs[0]
        return [(x.shape, x.dtype), (x.shape, np.dtype(bool))]

    def reference(self, node, inputs):
        x = inputs[0]
        return [x, np.ones(x.shape, bool)]


# -- binary arithmetic -------------------------------------------------------------------
@register
class Add(Binary):
    def reference(self, node, inputs):
        return [inputs[0] + inputs[1]]


@register
class Sub(Binary):
    def reference(self, node, inputs):
        return [inputs[0] - inputs[1]]


@register
class Mul(Binary):
    def reference(self, node, inputs):
        return [inputs[0] * inputs[1]]


@register
class Div(Binary):
    """Integer division truncates toward zero (C semantics), unlike numpy's floor."""

    def reference(self, node, inputs):
        a, b = inputs
        if a.dtype.kind not in "iu":
            with np.errstate(all="ignore"):  # x / 0 = +-inf or NaN, as IEEE says
                return [a / b]
        with np.errstate(divide="ignore"):
            q = a // b
            inexact = (a % b != 0) & ((a < 0) != (b < 0))
        return [(q + inexact).astype(a.dtype)]


@register
class Pow(Binary):
    """Output has the base's dtype; the exponent may have another dtype. Integer powers
    stay exact; a negative integer exponent goes through float64, truncated like C."""

    def reference(self, node, inputs):
        base, exponent = inputs
        if base.dtype.kind in "iu" and exponent.dtype.kind in "iu" and (exponent >= 0).all():
            return [np.power(base, exponent.astype(base.dtype))]
        if base.dtype.kind == "f":
            return [np.power(base, exponent.astype(base.dtype))]
        with np.errstate(divide="ignore"):
            out = np.power(base.astype(np.float64), exponent.astype(np.float64))
        return [out.astype(base.dtype)]


@register
class Mod(Binary):
    """fmod=0: a - floor(a / b) * b, the divisor's sign (floats too since opset 28, with
    Python's special cases: x % inf keeps x when the signs agree); fmod=1: C's fmod, the
    dividend's sign."""

    attrs = {"fmod": 0}

    def reference(self, node, inputs):
        a, b = inputs
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.fmod(a, b) if self.attr(node, "fmod") else np.mod(a, b)
        return [out.astype(a.dtype)]


# -- variadic ----------------------------------------------------------------------------
class Variadic(OpDef):
    """Elementwise over any number of broadcast inputs; subclasses set `combine`."""

    combine = staticmethod(np.add)

    def infer(self, node):
        return [(broadcast_shapes(node, *node.inputs), node.inputs[0].dtype)]

    def reference(self, node, inputs):
        return [functools.reduce(self.combine, inputs).astype(inputs[0].dtype)]


@register
class Max(Variadic):
    combine = staticmethod(np.maximum)


@register
class Min(Variadic):
    combine = staticmethod(np.minimum)


@register
class Sum(Variadic):
    combine = staticmethod(np.add)


@register
class Mean(Variadic):
    def reference(self, node, inputs):
        total = functools.reduce(np.add, inputs)
        return [(total / len(inputs)).astype(inputs[0].dtype)]


# -- comparisons and logic ---------------------------------------------------------------
class Compare(Binary):
    out_dtype = np.dtype(bool)
    combine = staticmethod(np.equal)

    def reference(self, node, inputs):
        return [self.combine(inputs[0], inputs[1])]


@register
class Equal(Compare):
    combine = staticmethod(np.equal)


@register
class Less(Compare):
    combine = staticmethod(np.less)


@register
class LessOrEqual(Compare):
    combine = staticmethod(np.less_equal)


@register
class Greater(Compare):
    combine = staticmethod(np.greater)


@register
class GreaterOrEqual(Compare):
    combine = staticmethod(np.greater_equal)


@register
class And(Compare):
    combine = staticmethod(np.logical_and)


@register
class Or(Compare):
    combine = staticmethod(np.logical_or)


@register
class Xor(Compare):
    combine = staticmethod(np.logical_xor)


@register
class Where(OpDef):
    def infer(self, node):
        cond, x, y = node.inputs
        if cond.dtype != np.dtype(bool):
            self.fail(node, f"condition must be bool, not {cond.dtype}")
        return [(broadcast_shapes(node, cond, x, y), x.dtype)]

    def reference(self, node, inputs):
        cond, x, y = inputs
        return [np.where(cond, x, y).astype(x.dtype)]
