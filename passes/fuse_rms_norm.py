"""fuse_rms_norm: the decomposed RMSNorm (T5, LLaMA exports) becomes applec.RMSNorm.

    before: r = Sqrt(ReduceMean(x ^ 2, last axes) + eps)     (or x * x)
            y = x / r * gamma                                (or x * Reciprocal(r); gamma
                                                              optional, beta too)
    after:  y = applec.RMSNorm(x, gamma, axis=-len(axes), epsilon=eps)   (+ Add beta kept)

MIL (coremltools 9) has no RMS-norm op, so this lowers to square, reduce_mean, rsqrt and
two muls: the fusion saves IR nodes and MIL ops (Sqrt + Reciprocal become one rsqrt).
Refused for the same reasons as fuse_layer_norm: reductions not over trailing axes with
keepdims, exponent not 2, epsilon not a constant scalar, gamma not a constant that
broadcasts to the normalized shape. An Add of a constant beta after the scale is not part
of RMSNorm and stays an Add.
"""

from __future__ import annotations

from applec.ir import Graph

from ._patterns import Const, Either, Fusion, Match, Op, Var, apply, scalar
from .fuse_layer_norm import affine, check_square_eps_affine, normalized_axes

X = Var("x")
SQUARE = Either(Op("Pow", X, Var("two")), Op("Mul", X, X))
RMS = Op("Sqrt", Op("Add", Op("ReduceMean", SQUARE, Var("axes"), name="mean"), Var("eps")))
NORMED = Either(Op("Div", X, RMS), Op("Mul", X, Op("Reciprocal", RMS)))
PATTERN = Either(Op("Mul", NORMED, Const("gamma")), NORMED)


def check(m: Match) -> str | None:
    x = m["x"]
    if x.dtype.kind != "f":
        return "x is not a float tensor"
    axes, reason = normalized_axes(m["mean"], m["axes"], x)
    if reason:
        return reason
    return check_square_eps_affine(m, x.shape[-len(axes):])


def rewrite(e, m: Match):
    x = m["x"]
    n = len(normalized_axes(m["mean"], m["axes"], x)[0])
    inputs = [x]
    if "gamma" in m:
        (gamma, _), _ = affine(m, x.shape[-n:])
        inputs.append(e.const(gamma, "rms_scale"))
    return "applec.RMSNorm", inputs, {"axis": len(x.shape) - n, "epsilon": scalar(m["eps"])}


FUSION = Fusion("fuse_rms_norm", PATTERN, check, rewrite, anchor="mean")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
