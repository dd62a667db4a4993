"""fuse_attention: scaled dot-product attention becomes one applec.Attention.

    before: s = MatMul(q, kT) / sqrt(d)         (or * 1/sqrt(d), or q and/or kT scaled)
            s = s + mask                        (optional float mask; or a bool mask:
                                                 Where(keep, s, fill) / Where(drop, fill, s))
            p = Softmax(s, axis=-1)
            p = Where(IsNaN(p), 0, p)           (optional: torch's guard for rows whose keys
                                                 are all masked)
            y = MatMul(p, v)
    after:  y = applec.Attention(q, k, v, mask, scale=1/sqrt(d), nan_to_zero=0|1)

The NaN guard moves to the output (nan_to_zero=1): a softmax row is all NaN (every key
masked with -inf) or has none, and a NaN row of p gives a NaN row of p @ v, so zeroing NaN
outputs equals zeroing NaN probabilities (for finite v; a NaN inside v itself would be
zeroed too, where the original passes it through).

The fused op takes K untransposed ([.., S, D]): when kT comes from a Transpose (exporters
write perm [0,2,3,1] from [B,S,H,D], or [0,1,3,2]), that Transpose is replaced by one that
yields K (or by nothing when K is the Transpose's input); otherwise a Transpose of the last
two dims is added. A dropped-keys Where(Not(keep), fill, s) passes keep; one without a
Not gets one. The CoreML lowering emits MIL `scaled_dot_product_attention` where the
opset has it (iOS18), else matmul/softmax.

Refused when the Softmax is not over the last axis, a scale is not a constant scalar,
q, k and v do not share their batch dims (MatMul broadcasting), the mask would broadcast
the scores to a bigger shape or its last dim is not the key length, a Where's fill is not
a constant scalar, or the data is not float.
"""

from __future__ import annotations

from applec.ir import Graph, Value

from ._patterns import Const, Either, Fusion, Match, Op, Pattern, Var, apply, describe, scalar


def scaled(name: str, inner: Pattern) -> Pattern:
    """inner, optionally multiplied or divided by a constant (bound to `name`)."""
    return Either(Op("Mul", inner, Const(name), name=f"{name}_op"),
                  Op("Div", inner, Const(name), name=f"{name}_op"),
                  inner)


Q = scaled("q_scale", Var("q"))
KT = scaled("k_scale", Either(Op("Transpose", Var("k_src"), name="k_transpose"), Var("kt")))
SCORES = scaled("s_scale", Op("MatMul", Q, KT, name="qk"))
MASKED = Either(Op("Add", SCORES, Var("mask"), name="mask_op"),
                Op("Where", Var("keep"), SCORES, Var("fill"), name="mask_op"),
                Op("Where", Op("Not", Var("keep")), Var("fill"), SCORES, name="mask_op"),
                Op("Where", Var("drop"), Var("fill"), SCORES, name="mask_op"),
                SCORES)
SOFTMAX = Op("Softmax", MASKED, name="softmax")
PROBS = Either(Op("Where", Op("IsNaN", Var("guarded"), name="isnan"), Const("nan_fill"), SOFTMAX,
                  name="nan_guard"),
               SOFTMAX)
PATTERN = Op("MatMul", PROBS, Var("v"), name="pv")


def scale_of(m: Match) -> float | None:
    """The product of every scale the match absorbed; None if one is not a scalar."""
    total = 1.0
    for name in ("q_scale", "k_scale", "s_scale"):
        if name in m:
            factor = scalar(m[name])
            if factor is None or factor == 0:
                return None
            total *= 1 / factor if m[f"{name}_op"].op_type == "Div" else factor
    return total


def key_shape(m: Match) -> tuple[int, ...]:
    kt = m["k_transpose"].outputs[0] if "k_transpose" in m else m["kt"]
    return kt.shape[:-2] + (kt.shape[-1], kt.shape[-2])


def check(m: Match) -> str | None:
    q, v, scores = m["q"], m["v"], m["qk"].outputs[0]
    if q.dtype.kind != "f":
        return "q is not a float tensor"
    softmax = m["softmax"]
    rank = len(scores.shape)
    if rank < 2:
        return "the scores are not a matrix (1-D q or k)"
    if softmax.attrs.get("axis", -1) % rank != rank - 1:
        return f"the Softmax is over axis {softmax.attrs.get('axis', -1)}, not the last axis"
    if scale_of(m) is None:
        return "a scale factor is not a constant nonzero scalar"
    if "nan_guard" in m:
        if m["guarded"] is not softmax.outputs[0]:
            return "the IsNaN guard tests another tensor than the Softmax output"
        if scalar(m["nan_fill"]) != 0:
            return f"the NaN guard fills {describe(m['nan_fill'])}, not 0"
    k = key_shape(m)
    if not len(q.shape) == len(k) == len(v.shape):
        return "q, k and v have different ranks"
    if not q.shape[:-2] == k[:-2] == v.shape[:-2]:
        return (f"q {list(q.shape)}, k {list(k)} and v {list(v.shape)} do not share their "
                "batch dims")
    if "mask_op" in m:
        mask = m.get("mask") or m.get("keep") or m.get("drop")
        if m["mask_op"].outputs[0].shape != scores.shape:
            return f"the mask {list(mask.shape)} broadcasts the scores to a bigger shape"
        if not mask.shape or mask.shape[-1] != scores.shape[-1]:
            return f"the mask {list(mask.shape)} does not span the key length"
        if mask.dtype.kind != ("f" if "mask" in m else "b"):
            return f"the mask is {mask.dtype}, not {'float' if 'mask' in m else 'bool'}"
        if "fill" in m and scalar(m["fill"]) is None:
            return f"the Where fill is {m['fill'].name}, not a constant scalar"
    return None


def untransposed_key(e, m: Match) -> Value:
    if "kt" in m:
        rank = len(m["kt"].shape)
        return e.node("Transpose", [m["kt"]], {"perm": swap_last(list(range(rank)))})
    source = m["k_src"]
    rank = len(source.shape)
    perm = list(m["k_transpose"].attrs.get("perm", list(range(rank))[::-1]))
    perm = swap_last(perm)
    if perm == list(range(rank)):
        return source
    return e.node("Transpose", [source], {"perm": perm})


def swap_last(perm: list[int]) -> list[int]:
    return perm[:-2] + [perm[-1], perm[-2]]


def rewrite(e, m: Match):
    k = untransposed_key(e, m)
    attrs = {"scale": scale_of(m)}
    if "nan_guard" in m:
        attrs["nan_to_zero"] = 1
    inputs = [m["q"], k, m["v"]]
    if "mask" in m:
        inputs.append(m["mask"])
    elif "keep" in m or "drop" in m:
        keep = m["keep"] if "keep" in m else e.node("Not", [m["drop"]])
        inputs.append(keep)
        attrs["mask_fill"] = scalar(m["fill"])
    return "applec.Attention", inputs, attrs


FUSION = Fusion("fuse_attention", PATTERN, check, rewrite, anchor="softmax")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)

