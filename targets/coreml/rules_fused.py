"""CoreML lowering rules for applec's internal fused ops (see applec/ops/fused.py).

Each fused op becomes the one MIL op that computes it where MIL has one (`linear`, `silu`,
`scaled_dot_product_attention`); otherwise the shortest sequence (RMSNorm: MIL has no
RMS-norm op; Attention before iOS18: no SDPA). Registered into the same RULES table.
"""

from __future__ import annotations

import math

import numpy as np
from coremltools.converters.mil import Builder as mb

from .rules import rule, x_of

SDPA_TOLERANCE = 1e-6  # a scale this close to 1/sqrt(D) is SDPA's own: no pre-scaling


def opset_has_sdpa(lw) -> bool:
    """Whether the program targets iOS18+ (scaled_dot_product_attention)."""
    import coremltools as ct

    return lw.opset is not None and lw.opset >= ct.target.iOS18


@rule("applec.Linear")
def lower_linear(lw, node):
    x, weight, bias = node.inputs[0], node.inputs[1], node.input(2)
    # a quantized weight is the output of applec.DequantizeWeight: a MIL constexpr var
    if len(x.shape) <= 3:  # MIL linear takes x of rank 1 to 3
        w = lw.array(weight.const, weight.name) if weight.is_const else lw.get(weight)
        args = {"x": lw.get(x), "weight": w, "name": lw.out_name()}
        if bias is not None:
            args["bias"] = lw.array(bias.const, bias.name)
        lw.bind(node.outputs[0], mb.linear(**args))
        return
    y_args = {"y": lw.array(weight.const.T, weight.name)} if weight.is_const else \
        {"y": lw.get(weight), "transpose_y": True}
    y = mb.matmul(x=lw.get(x), **y_args, name=lw.out_name() if bias is None else lw.tmp("mm"))
    if bias is not None:
        y = mb.add(x=y, y=lw.array(bias.const, bias.name), name=lw.out_name())
    lw.bind(node.outputs[0], y)


@rule("applec.Silu")
def lower_silu(lw, node):
    lw.bind(node.outputs[0], mb.silu(x=x_of(lw, node), name=lw.out_name()))


@rule("applec.RMSNorm")
def lower_rms_norm(lw, node):
    x, scale = node.inputs[0], node.input(1)
    rank = len(x.shape)
    axes = list(range(node.attrs["axis"] % rank, rank))
    var = lw.get(x)
    mean_square = mb.reduce_mean(x=mb.mul(x=var, y=var, name=lw.tmp("square")), axes=axes,
                                 keep_dims=True, name=lw.tmp("mean_square"))
    inv = mb.rsqrt(x=mean_square, epsilon=lw.scalar(node.attrs["epsilon"]), name=lw.tmp("inv"))
    y = mb.mul(x=var, y=inv, name=lw.out_name() if scale is None else lw.tmp("normed"))
    if scale is not None:
        y = mb.mul(x=y, y=lw.get(scale), name=lw.out_name())
    lw.bind(node.outputs[0], y)


@rule("applec.Attention")
def lower_attention(lw, node):
    q, k, v, mask = node.inputs[0], node.inputs[1], node.inputs[2], node.input(3)
    scale = float(node.attrs["scale"])
    fill = float(node.attrs.get("mask_fill", -np.inf))
    guard = bool(node.attrs.get("nan_to_zero", 0))
    # SDPA's bool mask fills with -inf; another fill is exact only in the decomposed form
    sdpa_mask = mask is None or mask.dtype.kind == "f" or fill == -np.inf
    if opset_has_sdpa(lw) and len(q.shape) >= 3 and sdpa_mask:
        query = lw.get(q)
        # SDPA divides by sqrt(D) itself and has no scale input: pre-scale q to match
        factor = scale * math.sqrt(q.shape[-1])
        if abs(factor - 1) > SDPA_TOLERANCE:
            query = mb.mul(x=query, y=lw.scalar(factor), name=lw.tmp("q_scaled"))
        args = {"query": query, "key": lw.get(k), "value": lw.get(v),
                "name": lw.tmp("sdpa") if guard else lw.out_name()}
        if mask is not None:
            args["attn_mask"] = lw.get(mask)
        lw.bind(node.outputs[0], nan_to_zero(lw, mb.scaled_dot_product_attention(**args), guard))
        return
    scores = mb.matmul(x=lw.get(q), y=lw.get(k), transpose_y=True, name=lw.tmp("scores"))
    if scale != 1:
        scores = mb.mul(x=scores, y=lw.scalar(scale), name=lw.tmp("scaled"))
    if mask is not None and mask.dtype.kind == "f":
        scores = mb.add(x=scores, y=lw.get(mask), name=lw.tmp("masked"))
    elif mask is not None:
        scores = mb.select(cond=lw.get(mask), a=scores,
                           b=lw.array(np.asarray(fill, np.float32), f"{node.name}_fill"),
                           name=lw.tmp("masked"))
    probs = mb.softmax(x=scores, axis=-1, name=lw.tmp("probs"))
    out = mb.matmul(x=probs, y=lw.get(v), name=lw.tmp("pv") if guard else lw.out_name())
    lw.bind(node.outputs[0], nan_to_zero(lw, out, guard))


def nan_to_zero(lw, var, guard: bool):
    """Where(IsNaN(var), 0, var) when the fused pattern carried torch's NaN guard."""
    if not guard:
        return var
    is_nan = mb.not_equal(x=var, y=var, name=lw.tmp("isnan"))
    return mb.select(cond=is_nan, a=lw.scalar(0.0), b=var, name=lw.out_name())


from . import rules_quant  # noqa: E402,F401  (registers applec.DequantizeWeight)
