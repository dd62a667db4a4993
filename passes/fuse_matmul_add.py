"""fuse_matmul_add: a MatMul by a constant matrix plus a constant bias is one applec.Linear.

    before: h = MatMul(x, W[K, N]); y = Add(h, b[N])
    after:  y = applec.Linear(x, W.T[N, K], b[N])        (MIL `linear`, or matmul + add)

Refused when W is not a constant 2-D matrix, when the bias is not a constant, when the
bias varies along any dim but the last (a [S, N] bias) or broadcasts the product to a
bigger shape, or on integer data. Gemm with a constant B already lowers to `linear`.
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph

from ._patterns import Fusion, Match, Op, Var, apply

PATTERN = Op("Add", Op("MatMul", Var("x"), Var("w"), name="matmul"), Var("bias"), name="add")


def check(m: Match) -> str | None:
    x, w, bias = m["x"], m["w"], m["bias"]
    if x.dtype.kind != "f":
        return "the MatMul is not on floats"
    if not w.is_const:
        return f"weight '{w.name}' is not a constant"
    if len(w.shape) != 2:
        return f"weight has rank {len(w.shape)}, not 2"
    if not bias.is_const:
        return f"bias '{bias.name}' is not a constant"
    if m["add"].outputs[0].shape != m["matmul"].outputs[0].shape:
        return f"bias {list(bias.shape)} broadcasts the product to a bigger shape"
    if any(d != 1 for d in bias.shape[:-1]):
        return f"bias {list(bias.shape)} varies along more than the last dim"
    return None


def rewrite(e, m: Match):
    w, bias = m["w"].const, m["bias"].const
    n = w.shape[1]
    # a transposed view: the lowering's cast to the compute dtype makes the one copy
    weight = e.const(w.T, f"{m['w'].name}_t")
    b = e.const(np.broadcast_to(bias.reshape(-1), (n,)).astype(m["x"].dtype), m["bias"].name)
    return "applec.Linear", [m["x"], weight, b], {}


FUSION = Fusion("fuse_matmul_add", PATTERN, check, rewrite, anchor="matmul")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
