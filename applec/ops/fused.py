"""Op table entries for applec's internal fused ops (the `applec.` namespace).

No ONNX model contains these: the fusion passes (`passes/fuse_*.py`) create them from the
decomposed forms exporters write, and each lowers to one MIL op where MIL has one. Their
numpy references compute what the decomposed graph computed, so the interpreter runs a
fused graph and pass tests compare it with the unfused one.

- applec.Linear(x, weight [N, K], bias [N]?): x @ weight.T + bias (weight and bias
  constant; MatMul + Add fused);
- applec.Silu(x): x * sigmoid(x);
- applec.RMSNorm(x, scale?; axis, epsilon): x / sqrt(mean(x^2 over axis..) + epsilon) * scale;
- applec.Attention(q [.., L, D], k [.., S, D], v [.., S, Dv], mask?; scale, mask_fill):
  softmax(q @ k^T * scale (+ mask)) @ v. A float mask is added to the scaled scores; a
  bool mask keeps the scores where it is true and puts `mask_fill` elsewhere.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from . import REQUIRED, OpDef, Unary, normalize_axis, register
from .elementwise import _sigmoid
from .nn import accumulator, broadcasts_to


@register
class Linear(OpDef):
    op_type = "applec.Linear"
    static_inputs = (2,)  # the weight may also be a quantized weight's dequantization

    def infer(self, node):
        x, weight, bias = node.inputs[0], node.inputs[1], node.input(2)
        dequantized = weight.producer is not None and \
            weight.producer.op_type == "applec.DequantizeWeight"
        if not (weight.is_const or dequantized):
            self.fail(node, f"weight '{weight.name}' must be a constant or a quantized weight")
        if not x.shape or len(weight.shape) != 2 or weight.shape[1] != x.shape[-1]:
            self.fail(node, "weight must be [out, in] with in = the last dim of x")
        n = weight.shape[0]
        if bias is not None and (bias.shape != (n,) or self.static(node, 2) is None):
            self.fail(node, f"bias must be a constant of shape [{n}]")
        return [(x.shape[:-1] + (n,), x.dtype)]

    def reference(self, node, inputs):
        x, weight = inputs[:2]
        bias = inputs[2] if len(inputs) > 2 else None
        acc = accumulator(x.dtype)
        y = np.matmul(x.astype(acc, copy=False),
                      weight.astype(acc, copy=False).T).astype(x.dtype, copy=False)
        if bias is not None:
            y = y + bias.astype(x.dtype)
        return [y]


@register
class Silu(Unary):
    op_type = "applec.Silu"

    def reference(self, node, inputs):
        x = inputs[0]
        return [(x * _sigmoid(x)).astype(x.dtype)]


@register
class RMSNorm(OpDef):
    op_type = "applec.RMSNorm"
    attrs: ClassVar[dict[str, Any]] = {"axis": REQUIRED, "epsilon": REQUIRED}

    def infer(self, node):
        x, scale = node.inputs[0], node.input(1)
        axis = normalize_axis(node, self.attr(node, "axis"), len(x.shape))
        if scale is not None and not broadcasts_to(scale.shape, x.shape[axis:]):
            self.fail(node, f"scale must broadcast to {list(x.shape[axis:])}")
        return [(x.shape, x.dtype)]

    def reference(self, node, inputs):
        x, scale = inputs[0], inputs[1] if len(inputs) > 1 else None
        axis = normalize_axis(node, self.attr(node, "axis"), x.ndim)
        xa = x.astype(accumulator(x.dtype))
        mean_square = np.mean(xa * xa, axis=tuple(range(axis, x.ndim)), keepdims=True)
        y = xa / np.sqrt(mean_square + xa.dtype.type(self.attr(node, "epsilon")))
        if scale is not None:
            y = y * scale.astype(xa.dtype)
        return [y.astype(x.dtype)]


@register
class Attention(OpDef):
    op_type = "applec.Attention"
    attrs: ClassVar[dict[str, Any]] = {"scale": REQUIRED, "mask_fill": float("-inf"),
                                       "nan_to_zero": 0}

    def infer(self, node):
        q, k, v, mask = node.inputs[0], node.inputs[1], node.inputs[2], node.input(3)
        if not len(q.shape) == len(k.shape) == len(v.shape) >= 2:
            self.fail(node, "q, k and v must have the same rank, at least 2")
        if q.shape[:-2] != k.shape[:-2] or k.shape[:-2] != v.shape[:-2]:
            self.fail(node, "q, k and v must have the same batch dims")
        if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            self.fail(node, "need q [.., L, D], k [.., S, D] and v [.., S, Dv]")
        scores = q.shape[:-1] + (k.shape[-2],)
        if mask is not None and not broadcasts_to(mask.shape, scores):
            self.fail(node, f"mask must broadcast to the scores {list(scores)}")
        if mask is not None and mask.dtype.kind not in "fb":
            self.fail(node, "mask must be float (added) or bool (kept where true)")
        return [(q.shape[:-1] + (v.shape[-1],), q.dtype)]

    def reference(self, node, inputs):
        q, k, v = inputs[:3]
        mask = inputs[3] if len(inputs) > 3 else None
        acc = accumulator(q.dtype)
        scores = np.matmul(q.astype(acc, copy=False),
                           np.swapaxes(k.astype(acc, copy=False), -1, -2))
        scores = scores * acc.type(self.attr(node, "scale"))
        if mask is not None and mask.dtype == bool:
            scores = np.where(mask, scores, acc.type(self.attr(node, "mask_fill")))
        elif mask is not None:
            scores = scores + mask.astype(acc)
        with np.errstate(invalid="ignore"):  # fully masked rows: NaN, as ONNX gives
            shifted = scores - scores.max(axis=-1, keepdims=True)
            probs = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
        out = np.matmul(probs, v.astype(acc, copy=False))
        if self.attr(node, "nan_to_zero"):
            out = np.where(np.isnan(out), 0, out)
        return [out.astype(q.dtype)]
