"""sum_to_mean: a sum scaled by 1/N over the N reduced elements is a ReduceMean.

    before: s = ReduceSum(x, axes); y = s * (1/N)      (or y = s / N)
    after:  y = ReduceMean(x, axes)

Exact in real arithmetic, and it matters in fp16: hand-written LayerNorms (magika's, from
jax2tf) sum squares before dividing, and the sum overflows fp16's 65504 where the mean
does not. Refused when the scale is not the constant 1/N (or N) for the reduced dims, or
the data is not float. Runs before the fusions, so the result can then fuse as a
LayerNorm or RMSNorm.
"""

from __future__ import annotations

import math

from applec.ir import Graph

from ._patterns import Const, Either, Fusion, Match, Op, Var, apply, scalar

SUM = Either(Op("ReduceSum", Var("x"), Const("axes"), name="sum"),
             Op("ReduceSum", Var("x"), name="sum"))
PATTERN = Either(Op("Mul", SUM, Const("factor"), name="scale"),
                 Op("Div", SUM, Const("factor"), name="scale"))


def reduced_count(m: Match) -> int:
    x = m["x"]
    axes = [int(a) % len(x.shape) for a in m["axes"].const.reshape(-1)] \
        if "axes" in m else list(range(len(x.shape)))
    return math.prod(x.shape[a] for a in axes)


def check(m: Match) -> str | None:
    if m["x"].dtype.kind != "f":
        return "the sum is not over floats"
    if m["sum"].attrs.get("noop_with_empty_axes", 0) and "axes" not in m:
        return "the ReduceSum reduces nothing (noop_with_empty_axes)"
    factor = scalar(m["factor"])
    if factor is None:
        return f"the scale '{m['factor'].name}' is not a constant scalar"
    n = reduced_count(m)
    want = n if m["scale"].op_type == "Div" else 1 / n
    if not math.isclose(factor, want, rel_tol=1e-6):
        return f"the scale is {factor:g}, not {want:g} for the {n} reduced elements"
    return None


def rewrite(e, m: Match):
    inputs = [m["x"]] + ([m["axes"]] if "axes" in m else [])
    return "ReduceMean", inputs, {"keepdims": m["sum"].attrs.get("keepdims", 1)}


FUSION = Fusion("sum_to_mean", PATTERN, check, rewrite, anchor="sum")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
