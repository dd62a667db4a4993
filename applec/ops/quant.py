"""Op table entry for quantized weights: applec.DequantizeWeight.

No ONNX model contains it: the `quantize_weights` pass (`passes/quantize_weights.py`) puts
it between a compressed constant weight and the op that reads it, and the CoreML lowering
turns it into one `constexpr_*` op, so the bundle stores the compressed form and CoreML
decompresses it when it loads the model. The numpy reference decompresses exactly as those
MIL ops do, so the interpreter computes with the quantized numbers.

    applec.DequantizeWeight(data, scale, offset?; mode="affine", bits, axis)
        out = scale * (data - offset), each scale/offset entry repeated over its block
        (offset: integers like data, or floats, as MIL allows):
        block_size[i] = data.shape[i] / scale.shape[i] (MIL constexpr_blockwise_shift_scale;
        one block per output channel is constexpr_affine_dequantize);
    applec.DequantizeWeight(indices, lut; mode="lut", bits, axis)
        out[..] = lut[g, indices[..]] with g the group of the element's index along `axis`:
        lut is [G, 2^bits] and groups are shape[axis] / G consecutive channels (MIL
        constexpr_lut_to_dense).

`data`/`indices` hold `bits`-wide integers widened to int8/uint8 (numpy has no int4);
`axis` is the weight's output-channel axis. The output is float32 with the data's shape.
`foldable = False`: constant folding would undo the compression.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from . import REQUIRED, OpDef, normalize_axis, register

MODES = ("affine", "lut")


def repeat_blocks(param: np.ndarray, shape) -> np.ndarray:
    """Expand a per-block parameter to `shape` by repeating each entry over its block."""
    for axis, (full, blocks) in enumerate(zip(shape, param.shape)):
        if blocks != full:
            param = np.repeat(param, full // blocks, axis=axis)
    return param


def dequantize_affine(data, scale, offset=None) -> np.ndarray:
    values = data.astype(np.float32)
    if offset is not None:
        values = values - repeat_blocks(offset.astype(np.float32), data.shape)
    return values * repeat_blocks(scale.astype(np.float32), data.shape)


def dequantize_lut(indices, lut, axis: int) -> np.ndarray:
    groups = lut.shape[0]
    group_of = np.arange(indices.shape[axis]) // (indices.shape[axis] // groups)
    shape = [1] * indices.ndim
    shape[axis] = -1
    return lut.astype(np.float32)[group_of.reshape(shape), indices.astype(np.int64)]


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


@register
class DequantizeWeight(OpDef):
    op_type = "applec.DequantizeWeight"
    attrs: ClassVar[dict[str, Any]] = {"mode": REQUIRED, "bits": REQUIRED, "axis": 0}
    static_inputs = (0, 1, 2)
    foldable = False

    def infer(self, node):
        mode, bits = self.attr(node, "mode"), int(self.attr(node, "bits"))
        if mode not in MODES:
            self.fail(node, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        data = self.static(node, 0)
        params = self.static(node, 1)
        axis = normalize_axis(node, self.attr(node, "axis"), data.ndim)
        if data.dtype.kind not in "iu" or data.dtype.itemsize != 1 or not 1 <= bits <= 8:
            self.fail(node, f"data must be {bits}-bit integers held as int8/uint8, "
                            f"not {data.dtype}")
        low, high = int_range(bits, data.dtype.kind == "i")
        if data.size and (int(data.min()) < low or int(data.max()) > high):
            self.fail(node, f"data holds values outside the {bits}-bit range [{low}, {high}]")
        if params.dtype.kind != "f":
            self.fail(node, "scale / lut must be float")
        if mode == "affine":
            self._check_affine(node, data, params, self.static(node, 2))
        else:
            self._check_lut(node, data, params, bits, axis)
        return [(data.shape, np.float32)]

    def _check_affine(self, node, data, scale, offset):
        if scale.ndim != data.ndim or any(d % s for d, s in zip(data.shape, scale.shape)):
            self.fail(node, f"scale {list(scale.shape)} must have the data's rank and divide "
                            f"its shape {list(data.shape)} into blocks")
        if offset is not None and (offset.shape != scale.shape or
                                   (offset.dtype != data.dtype and offset.dtype.kind != "f")):
            self.fail(node, "offset must have the scale's shape and the data's dtype or a "
                            "float dtype")

    def _check_lut(self, node, indices, lut, bits, axis):
        if indices.dtype != np.uint8:
            self.fail(node, "lut indices must be uint8")
        if lut.ndim != 2 or lut.shape[1] != 1 << bits or indices.shape[axis] % lut.shape[0]:
            self.fail(node, f"lut must be [groups, {1 << bits}] with groups dividing dim "
                            f"{axis} of the indices, not {list(lut.shape)}")

    def reference(self, node, inputs):
        if self.attr(node, "mode") == "affine":
            offset = inputs[2] if len(inputs) > 2 else None
            return [dequantize_affine(inputs[0], inputs[1], offset)]
        axis = self.attr(node, "axis") % inputs[0].ndim
        return [dequantize_lut(inputs[0], inputs[1], axis)]
