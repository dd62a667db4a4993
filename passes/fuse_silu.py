"""fuse_silu: x * Sigmoid(x) becomes applec.Silu (MIL `silu`).

    before: s = Sigmoid(x); y = Mul(x, s)        (either operand order)
    after:  y = applec.Silu(x)

Refused when x is not a float tensor (and, like every fusion, when the Sigmoid's output
is also read elsewhere).
"""

from __future__ import annotations

from applec.ir import Graph

from ._patterns import Fusion, Match, Op, Var, apply

X = Var("x")
PATTERN = Op("Mul", X, Op("Sigmoid", X, name="sigmoid"))


def check(m: Match) -> str | None:
    return None if m["x"].dtype.kind == "f" else "x is not a float tensor"


def rewrite(e, m: Match):
    return "applec.Silu", [m["x"]], {}


FUSION = Fusion("fuse_silu", PATTERN, check, rewrite, anchor="sigmoid")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
