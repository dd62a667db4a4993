"""fuse_gelu: the two GELU formulas exporters write become one ONNX Gelu (MIL `gelu`).

Erf form, in any association and operand order of the three factors, with the Erf
argument x / sqrt(2) or x * 0.7071:

    before: y = x * 0.5 * (1 + Erf(x / 1.4142))
    after:  y = Gelu(x)                              (approximate="none")

Tanh form, with the cube as Pow(x, 3) or x * x * x:

    before: y = 0.5 * x * (1 + Tanh(0.7979 * (x + 0.044715 * x^3)))
    after:  y = Gelu(x, approximate="tanh")

Constants must be scalars within 1e-3 (relative) of the formula's; a refusal names the
constant that is off ("Erf argument is divided by 1.5, not sqrt(2)").
"""

from __future__ import annotations

import math

from applec.ir import Graph

from ._patterns import Const, Either, Fusion, Match, Op, Var, apply, expect, near, product

X = Var("x")
ERF_ARG = Either(Op("Div", X, Var("sqrt2"), name="scale"),
                 Op("Mul", X, Var("inv_sqrt2"), name="scale"))
ERF_FORM = product(X, Var("half"), Op("Add", Op("Erf", ERF_ARG, name="core"), Var("one")))

CUBE = Either(Op("Pow", X, Const("three")), Op("Mul", Op("Mul", X, X), X))
TANH_ARG = Op("Mul", Op("Add", X, Op("Mul", CUBE, Var("coeff"))), Var("sqrt_2_pi"))
TANH_FORM = product(X, Var("half"), Op("Add", Op("Tanh", TANH_ARG, name="core"), Var("one")))

PATTERN = Either(ERF_FORM, TANH_FORM)


def check(m: Match) -> str | None:
    if m["x"].dtype.kind != "f":
        return "x is not a float tensor"
    if "three" in m and not near(m["three"], 3.0):
        return expect(m["three"], 3.0, "the Pow exponent", "3")
    if "sqrt2" in m:
        reason = expect(m["sqrt2"], math.sqrt(2), "the Erf argument's divisor", "sqrt(2)")
    elif "inv_sqrt2" in m:
        reason = expect(m["inv_sqrt2"], 1 / math.sqrt(2), "the Erf argument's factor",
                        "1/sqrt(2)")
    else:
        reason = (expect(m["coeff"], 0.044715, "the cube's coefficient", "0.044715")
                  or expect(m["sqrt_2_pi"], math.sqrt(2 / math.pi), "the Tanh argument's "
                            "factor", "sqrt(2/pi)"))
    return (reason or expect(m["one"], 1.0, "the added constant", "1")
            or expect(m["half"], 0.5, "the outer factor", "0.5"))


def rewrite(e, m: Match):
    approximate = "tanh" if m["core"].op_type == "Tanh" else "none"
    return "Gelu", [m["x"]], {"approximate": approximate}


FUSION = Fusion("fuse_gelu", PATTERN, check, rewrite, anchor="core")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
