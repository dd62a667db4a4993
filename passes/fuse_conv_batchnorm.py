"""fuse_conv_batchnorm: fold an inference BatchNormalization into the Conv before it.

    before: c = Conv(x, W, b); y = BatchNormalization(c, gamma, beta, mean, var)
    after:  y = Conv(x, W * s, (b - mean) * s + beta)    with s = gamma / sqrt(var + eps)

The folding is done in float64 and cast back to the weight's dtype. Refused when the Conv
output is read elsewhere (it would have to be kept), or when the weight, bias or any
BatchNormalization parameter is not a compile-time constant.
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph

from ._patterns import Either, Fusion, Match, Op, Var, apply

CONV = Either(Op("Conv", Var("x"), Var("w"), Var("b"), name="conv"),
              Op("Conv", Var("x"), Var("w"), name="conv"))
PATTERN = Op("BatchNormalization", CONV, Var("gamma"), Var("beta"), Var("mean"), Var("var"),
             name="bn")
PARAMS = ("gamma", "beta", "mean", "var")


def check(m: Match) -> str | None:
    if m["x"].dtype.kind != "f":
        return "the Conv is not on floats"
    for name, what in (("w", "Conv weight"), ("b", "Conv bias")):
        if name in m and not m[name].is_const:
            return f"{what} '{m[name].name}' is not a constant"
    for name in PARAMS:
        if not m[name].is_const:
            return f"BatchNormalization {name} '{m[name].name}' is not a constant"
    return None


def rewrite(e, m: Match):
    conv, bn = m["conv"], m["bn"]
    w = m["w"].const
    gamma, beta, mean, var = (m[p].const.astype(np.float64) for p in PARAMS)
    scale = gamma / np.sqrt(var + float(bn.attrs.get("epsilon", 1e-5)))
    bias = m["b"].const.astype(np.float64) if "b" in m else np.zeros_like(mean)
    weight = w.astype(np.float64) * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    new_w = e.const(weight.astype(w.dtype), f"{conv.name}_w_bn")
    new_b = e.const(((bias - mean) * scale + beta).astype(w.dtype), f"{conv.name}_b_bn")
    return "Conv", [m["x"], new_w, new_b], dict(conv.attrs)


FUSION = Fusion("fuse_conv_batchnorm", PATTERN, check, rewrite, anchor="conv")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
