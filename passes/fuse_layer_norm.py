"""fuse_layer_norm: the decomposed LayerNorm exporters write becomes LayerNormalization.

    before: m = ReduceMean(x, last axes); d = x - m
            v = ReduceMean(d ^ 2, same axes)            (or d * d)
            n = d / Sqrt(v + eps)                       (or d * Reciprocal(Sqrt(v + eps)))
            y = n * gamma + beta                        (gamma and beta each optional)
    after:  y = LayerNormalization(x, gamma, beta, axis=-len(axes), epsilon=eps)
                                                        (MIL `layer_norm`)
Missing gamma/beta become ones/zeros. Refused when the reductions are not over the same
trailing axes with keepdims, the exponent is not 2, epsilon is not a constant scalar,
gamma/beta are not constants that broadcast to the normalized shape, or x is not float.
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph, Node, Value

from ._patterns import Const, Either, Fusion, Match, Op, Pattern, Var, apply, expect, scalar


def with_affine(normed: Pattern) -> Pattern:
    """normed * gamma + beta, each part optional (gamma and beta constants)."""
    return Either(Op("Add", Op("Mul", normed, Const("gamma")), Const("beta")),
                  Op("Mul", normed, Const("gamma")),
                  Op("Add", normed, Const("beta")),
                  normed)


def normalized_axes(reduce: Node, axes: Value, x: Value) -> tuple[list[int], str | None]:
    """The reduction's axes if they are the trailing axes of x (kept), else a refusal."""
    rank = len(x.shape)
    where = f"{reduce.op_type} '{reduce.name}'"
    if not axes.is_const or axes.size == 0:
        return [], f"{where} has no constant axes"
    if not reduce.attrs.get("keepdims", 1):
        return [], f"{where} drops the reduced axes (keepdims=0)"
    found = sorted(int(a) % rank for a in axes.const.reshape(-1))
    if found != list(range(rank - len(found), rank)):
        return [], f"{where} is over axes {found}, not the last axes of a rank-{rank} input"
    return found, None


def affine(m: Match, norm_shape: tuple[int, ...]) -> tuple[list[np.ndarray], str | None]:
    """gamma and beta as arrays of the normalized shape (ones/zeros if absent)."""
    x = m["x"]
    arrays = []
    for name, default in (("gamma", 1), ("beta", 0)):
        if name not in m:
            arrays.append(np.full(norm_shape, default, x.dtype))
            continue
        data = m[name].const
        lead = data.shape[:max(data.ndim - len(norm_shape), 0)]
        try:
            fits = (np.broadcast_shapes(data.shape, x.shape) == x.shape
                    and all(d == 1 for d in lead))
        except ValueError:
            fits = False
        if not fits:
            return [], (f"{name} {list(data.shape)} does not broadcast to the normalized "
                        f"shape {list(norm_shape)}")
        data = data.reshape(data.shape[len(lead):])
        arrays.append(np.broadcast_to(data, norm_shape).astype(x.dtype))
    return arrays, None


X = Var("x")
MEAN = Op("ReduceMean", X, Var("mean_axes"), name="mean")
CENTERED = Op("Sub", X, MEAN, name="centered")
SQUARE = Either(Op("Pow", CENTERED, Var("two")), Op("Mul", CENTERED, CENTERED))
VARIANCE = Op("ReduceMean", SQUARE, Var("var_axes"), name="variance")
STD = Op("Sqrt", Op("Add", VARIANCE, Var("eps")))
NORMED = Either(Op("Div", CENTERED, STD), Op("Mul", CENTERED, Op("Reciprocal", STD)))
PATTERN = with_affine(NORMED)


def check(m: Match) -> str | None:
    x = m["x"]
    if x.dtype.kind != "f":
        return "x is not a float tensor"
    axes, reason = normalized_axes(m["mean"], m["mean_axes"], x)
    if reason:
        return reason
    var_axes, reason = normalized_axes(m["variance"], m["var_axes"], x)
    if reason:
        return reason
    if var_axes != axes:
        return f"the mean is over axes {axes} but the variance over {var_axes}"
    return check_square_eps_affine(m, x.shape[-len(axes):])


def check_square_eps_affine(m: Match, norm_shape) -> str | None:
    """The checks LayerNorm and RMSNorm share: x squared, a constant epsilon, an affine
    scale/shift that fits the normalized shape."""
    if "two" in m and (reason := expect(m["two"], 2.0, "the exponent", "2")):
        return reason
    if scalar(m["eps"]) is None:
        return f"epsilon '{m['eps'].name}' is not a constant scalar"
    return affine(m, norm_shape)[1]


def rewrite(e, m: Match):
    x = m["x"]
    n = len(normalized_axes(m["mean"], m["mean_axes"], x)[0])
    (gamma, beta), _ = affine(m, x.shape[-n:])
    return "LayerNormalization", [x, e.const(gamma, "ln_scale"), e.const(beta, "ln_bias")], \
        {"axis": len(x.shape) - n, "epsilon": scalar(m["eps"])}


FUSION = Fusion("fuse_layer_norm", PATTERN, check, rewrite, anchor="mean")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)

