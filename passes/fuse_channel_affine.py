"""fuse_channel_affine: fold a per-channel constant scale or shift into the Conv or
BatchNormalization that makes its input.

    before: c = Conv(x, W, b); y = c * s          after: y = Conv(x, W * s, b * s)
            c = Conv(x, W, b); y = c + t                 y = Conv(x, W, b + t)
            n = BatchNormalization(x, g, beta, ...); y = n * s      -> g * s, beta * s
            n = BatchNormalization(x, g, beta, ...); y = n + t      -> beta + t

`- t` and `/ s` fold the same way. `s` and `t` are constants holding one number per output
channel (shape [C, 1, 1], [1, C, 1, 1], ...) or one number in all. Caffe-era models write
their "Scale" layers this way (onnx's inception_v2 and densenet121: Conv, BatchNorm, Mul,
Add, Relu), and every such op folded is one pass over an activation fewer, on the device
and in the reference executor. A chain (Mul then Add) folds one op per pipeline round.

The folding is done in float64 and cast back to the parameter's dtype. Refused when the
constant varies along a non-channel axis, when its broadcast would change the output's
shape, or when a weight, bias or BatchNormalization parameter is not a constant.
"""

from __future__ import annotations

import numpy as np

from applec.ir import Graph

from ._patterns import Const, Either, Fusion, Match, Op, Var, apply

CONV = Either(Op("Conv", Var("x"), Var("w"), Var("b"), name="producer"),
              Op("Conv", Var("x"), Var("w"), name="producer"))
NORM = Op("BatchNormalization", Var("x"), Var("gamma"), Var("beta"), Var("mean"), Var("var"),
          name="producer")
# Sub and Div match only with the producer first (c - conv, c / conv are not affine in it).
PATTERN = Either(*(Op(op, source, Const("c"), name="affine")
                   for op in ("Mul", "Add", "Sub", "Div") for source in (CONV, NORM)))
SCALES = {"Mul": np.multiply, "Div": np.divide}
SHIFTS = {"Add": np.add, "Sub": np.subtract}


def per_channel(m: Match) -> np.ndarray | str:
    """The constant as one float64 number per channel of the producer's output, or why not."""
    out, c = m["producer"].outputs[0], m["c"]
    rank, channels = len(out.shape), out.shape[1] if len(out.shape) > 1 else 0
    shape = (1,) * (rank - len(c.shape)) + tuple(c.shape)
    if len(c.shape) > rank or rank < 2:
        return f"the constant '{c.name}' has rank {len(c.shape)}, above the output's {rank}"
    if any(n != 1 for i, n in enumerate(shape) if i != 1) or shape[1] not in (1, channels):
        return (f"the constant '{c.name}' of shape {list(c.shape)} is not one number per "
                f"channel of the {list(out.shape)} output")
    values = np.asarray(c.const, np.float64).reshape(-1)
    return np.broadcast_to(values, (channels,)) if values.size == 1 else values


def check(m: Match) -> str | None:
    affine, producer = m["affine"], m["producer"]
    if m["x"].dtype.kind != "f" or m["c"].dtype != m["x"].dtype:
        return "the operands are not floats of one dtype"
    params = ("w", "b") if producer.op_type == "Conv" else ("gamma", "beta", "mean", "var")
    for name in params:
        if name in m and not m[name].is_const:
            return f"{producer.op_type} input '{m[name].name}' is not a constant"
    values = per_channel(m)
    if isinstance(values, str):
        return values
    if affine.op_type == "Div" and not np.all(values):
        return f"the divisor '{m['c'].name}' holds a zero"
    return None


def rewrite(e, m: Match):
    affine, producer = m["affine"], m["producer"]
    c = per_channel(m)
    scale = SCALES[affine.op_type](1.0, c) if affine.op_type in SCALES else None
    shift = SHIFTS[affine.op_type](0.0, c) if affine.op_type in SHIFTS else None

    def new(value, array, suffix):
        return e.const(np.asarray(array).astype(value.dtype), f"{producer.name}_{suffix}")

    if producer.op_type == "Conv":
        w = m["w"]
        weight, bias = w.const.astype(np.float64), \
            m["b"].const.astype(np.float64) if "b" in m else np.zeros(c.shape)
        if scale is not None:
            weight = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias = bias * scale
        else:
            bias = bias + shift
        inputs = [m["x"], new(w, weight, "w_affine"), new(w, bias, "b_affine")]
    else:
        gamma, beta = (m[p].const.astype(np.float64) for p in ("gamma", "beta"))
        if scale is not None:
            gamma, beta = gamma * scale, beta * scale
        else:
            beta = beta + shift
        inputs = [m["x"], new(m["gamma"], gamma, "scale_affine"),
                  new(m["beta"], beta, "bias_affine"), m["mean"], m["var"]]
    return producer.op_type, inputs, dict(producer.attrs)


FUSION = Fusion("fuse_channel_affine", PATTERN, check, rewrite, anchor="producer")


def run(graph: Graph) -> int:
    return apply(graph, FUSION)
