"""fuse_hard_swish: the two hard-swish forms exporters write become ONNX HardSwish.

    before: y = x * HardSigmoid(x, alpha=1/6, beta=0.5)
    after:  y = HardSwish(x)

    before: y = x * Clip(x + 3, 0, 6) / 6         (or * 1/6, in any association)
    after:  y = HardSwish(x)

MIL has no hard-swish op: HardSwish lowers to sigmoid_hard + mul, two MIL ops instead of
four. Constants must be scalars within 1e-3 (relative) of the formula's; a refusal names
the one that is off ("HardSigmoid alpha is 0.2, not 1/6").
"""

from __future__ import annotations

from applec.ir import Graph

from ._patterns import Either, Fusion, Match, Op, Var, apply, expect, product

X = Var("x")
GATE = Op("HardSigmoid", X, name="core")
RELU6 = Op("Clip", Op("Add", X, Var("three")), Var("low"), Var("high"), name="core")
PATTERN = Either(
    Op("Mul", X, GATE),
    Op("Div", Op("Mul", X, RELU6), Var("six")),
    Op("Mul", X, Op("Div", RELU6, Var("six"))),
    product(X, RELU6, Var("sixth")),
)


def check(m: Match) -> str | None:
    if m["x"].dtype.kind != "f":
        return "x is not a float tensor"
    core = m["core"]
    if core.op_type == "HardSigmoid":
        alpha, beta = core.attrs.get("alpha", 0.2), core.attrs.get("beta", 0.5)
        if abs(alpha - 1 / 6) > 1e-3 / 6:
            return f"HardSigmoid alpha is {alpha:g}, not 1/6"
        if abs(beta - 0.5) > 0.5e-3:
            return f"HardSigmoid beta is {beta:g}, not 0.5"
        return None
    return (expect(m["three"], 3.0, "the added constant", "3")
            or expect(m["low"], 0.0, "the Clip min", "0")
            or expect(m["high"], 6.0, "the Clip max", "6")
            or (expect(m["six"], 6.0, "the divisor", "6") if "six" in m
                else expect(m["sixth"], 1 / 6, "the outer factor", "1/6")))


def rewrite(e, m: Match):
    return "HardSwish", [m["x"]], {}


FUSION = Fusion("fuse_hard_swish", PATTERN, check, rewrite, anchor="core")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
