"""CoreML lowering of applec.DequantizeWeight (applec/ops/quant.py): one `constexpr_*` op,
so the .mlpackage stores the compressed weight and CoreML decompresses it at load time.

- affine, iOS18+: constexpr_blockwise_shift_scale (int8, or uint4 with an fp16/fp32
  offset; one scale and offset per block). coremltools' own quantizer uses it from iOS18 on as well;
- affine with one scale per output channel, before iOS18: constexpr_affine_dequantize;
- lut, iOS18+: constexpr_lut_to_dense with uint4 indices shaped like the weight and one
  LUT per group of output channels (lut [1.., G, 1.., 16, 1]);
- lut with one LUT for the tensor, before iOS18: the iOS16 constexpr_lut_to_dense (indices
  packed LSB first into bytes, a flat LUT and the shape).
The output dtype is the program's float type (scales and LUTs are stored in it).
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types

from applec.errors import TargetError

from .rules import rule

SUB_BYTE = {(4, "u"): types.np_uint4_dtype, (4, "i"): types.np_int4_dtype}


def opset_is_ios18(lw) -> bool:
    import coremltools as ct

    return lw.opset is not None and lw.opset >= ct.target.iOS18


def needs_ios18(lw, what: str):
    raise TargetError(f"{lw.node.op_type} node '{lw.node.name}': {what} needs "
                      "iOS18/macOS15 (constexpr_blockwise_shift_scale / grouped "
                      "constexpr_lut_to_dense); the program targets an older OS")


def int_data(array: np.ndarray, bits: int) -> np.ndarray:
    kind = array.dtype.kind
    return array.astype(SUB_BYTE[(bits, kind)]) if bits < 8 else array


@rule("applec.DequantizeWeight")
def lower_dequantize_weight(lw, node):
    mode, bits = node.attrs["mode"], int(node.attrs["bits"])
    axis = int(node.attrs.get("axis", 0)) % len(node.outputs[0].shape)
    arrays = [v.const if v is not None else None for v in node.inputs]
    if mode == "affine":
        var = affine(lw, arrays[0], arrays[1], arrays[2] if len(arrays) > 2 else None, bits,
                     axis)
    else:
        var = lut(lw, arrays[0], arrays[1], bits, axis)
    lw.bind(node.outputs[0], var)


def affine(lw, data, scale, offset, bits: int, axis: int):
    scale = scale.astype(lw.float_dtype)
    if opset_is_ios18(lw):
        args = {"data": int_data(data, bits), "scale": scale, "name": lw.out_name()}
        if offset is not None:
            args["offset"] = (offset.astype(lw.float_dtype) if offset.dtype.kind == "f"
                              else int_data(offset, bits))
        return mb.constexpr_blockwise_shift_scale(**args)
    per_channel = all(s == 1 for i, s in enumerate(scale.shape) if i != axis)
    if bits != 8 or not per_channel:
        needs_ios18(lw, f"a {bits}-bit weight with block-wise scales")
    zero = np.zeros((), data.dtype) if offset is None else offset.reshape(-1)
    return mb.constexpr_affine_dequantize(quantized_data=data, zero_point=zero,
                                          scale=scale.reshape(-1), axis=axis,
                                          name=lw.out_name())


def lut(lw, indices, table, bits: int, axis: int):
    table = table.astype(lw.float_dtype)
    groups = table.shape[0]
    if opset_is_ios18(lw):
        shape = [1] * indices.ndim + list(table.shape[1:]) + [1]
        shape[axis] = groups
        return mb.constexpr_lut_to_dense(indices=int_data(indices, bits),
                                         lut=table.reshape(shape), name=lw.out_name())
    if groups != 1:
        needs_ios18(lw, "a LUT per group of channels")
    flat = indices.reshape(-1).astype(np.uint8)
    bit_array = ((flat[:, None] >> np.arange(bits, dtype=np.uint8)) & 1).astype(np.uint8)
    packed = np.packbits(bit_array.reshape(-1), bitorder="little")
    return mb.constexpr_lut_to_dense(indices=packed, lut=table.reshape(-1),
                                     shape=np.asarray(indices.shape, np.uint32),
                                     name=lw.out_name())
