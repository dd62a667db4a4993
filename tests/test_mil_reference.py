"""Tests for the CoreML reference executor (runtime/mil_reader, mil_ops, coreml_reference).

Each case builds a tiny MIL program with coremltools' builder, saves it as an .mlpackage
(no MIL passes, so the ops stay as built), runs it with `ReferenceProgram` and compares
with an independent oracle: a plain numpy formula written here, or onnxruntime on the
equivalent one-node ONNX model.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

ct = pytest.importorskip("coremltools")
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402
from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter  # noqa: E402

from applec.errors import BundleError, InputError  # noqa: E402
from applec.runtime.coreml_reference import ReferenceProgram  # noqa: E402
from applec.runtime.mil_ops import EMITTED_BY_LOWERING, MIL_OPS  # noqa: E402
from applec.runtime.mil_reader import BlobFile  # noqa: E402

iOS16, iOS17, iOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18
RNG = np.random.default_rng(0)


def rand(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def save_program(build, feeds, target, directory) -> str:
    """Build `build(*input_vars)` as a MIL program, save it unoptimised, return its path."""
    specs = [mb.TensorSpec(shape=f.shape, dtype=types.int32 if f.dtype == np.int32 else types.fp32)
             for f in feeds]
    # mb.program reads the arity from the function's code object: one wrapper per arity.
    mains = {1: lambda a: build(a), 2: lambda a, b: build(a, b), 3: lambda a, b, c: build(a, b, c)}
    prog = mb.program(input_specs=specs, opset_version=target)(mains[len(feeds)])
    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                       pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True,
                       compute_precision=ct.precision.FLOAT32)
    path = os.path.join(str(directory), "model.mlpackage")
    model.save(path)
    return path


def onnx_run(op_type, inputs: dict, attrs: dict | None = None, n_out=1, opset=18):
    """Run one ONNX node in onnxruntime; `inputs` maps input names (in order) to arrays."""
    outs = [f"y{i}" for i in range(n_out)]
    names = [n if v is not None else "" for n, v in inputs.items()]
    node = helper.make_node(op_type, names, outs, **(attrs or {}))
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in inputs.items() if v is not None]
    graph_outputs = [helper.make_tensor_value_info(o, TensorProto.UNDEFINED, None) for o in outs]
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = session.run(None, {n: v for n, v in inputs.items() if v is not None})
    return result if n_out > 1 else result[0]


def onnx_pads(mil_pad):
    """MIL pads [b0, e0, b1, e1, ...] -> ONNX pads [b0, b1, ..., e0, e1, ...]."""
    return list(mil_pad[0::2]) + list(mil_pad[1::2])


@dataclass
class Case:
    id: str
    build: Callable
    expect: Callable
    feeds: list
    target: object = iOS16
    rtol: float = 1e-5
    atol: float = 1e-6
    extra: dict = field(default_factory=dict)


CASES: list[Case] = []


def case(id, build, expect, *feeds, target=iOS16, rtol=1e-5, atol=1e-6):
    CASES.append(Case(id, build, expect, list(feeds), target, rtol, atol))


def erf(x):
    return np.vectorize(math.erf)(x.astype(np.float64))


def sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def as_f32(v):
    return mb.cast(x=v, dtype="fp32")


X = rand(2, 3, 4, 5)
POS = rand(2, 3, 4, 5, low=0.1, high=3.0)
Y = rand(2, 3, 4, 5, low=0.5, high=2.0)

# ---- elementwise -------------------------------------------------------------------------

UNARY = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": sigmoid,
    "tanh": np.tanh, "erf": erf, "exp": np.exp, "abs": np.abs, "floor": np.floor,
    "ceil": np.ceil, "round": np.round, "sign": np.sign, "sin": np.sin, "cos": np.cos,
    "square": np.square, "silu": lambda x: x * sigmoid(x), "softplus": lambda x: np.log1p(np.exp(x)),
}
for _op, _f in UNARY.items():
    case(_op, lambda x, op=_op: getattr(mb, op)(x=x), lambda x, f=_f: f(x), X * 3)
case("sqrt", lambda x: mb.sqrt(x=x), np.sqrt, POS)
case("rsqrt", lambda x: mb.rsqrt(x=x, epsilon=0.5), lambda x: 1 / np.sqrt(x + 0.5), POS)
case("log", lambda x: mb.log(x=x, epsilon=0.25), lambda x: np.log(x + 0.25), POS)
case("inverse", lambda x: mb.inverse(x=x, epsilon=0.5), lambda x: 1 / (x + 0.5), POS)
case("clip", lambda x: mb.clip(x=x, alpha=-0.5, beta=1.0), lambda x: np.clip(x, -0.5, 1.0), X)
case("sigmoid_hard", lambda x: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4),
     lambda x: np.clip(0.3 * x + 0.4, 0, 1), X * 3)
case("leaky_relu", lambda x: mb.leaky_relu(x=x, alpha=0.1), lambda x: np.where(x > 0, x, 0.1 * x), X)
case("elu", lambda x: mb.elu(x=x, alpha=0.7), lambda x: np.where(x > 0, x, 0.7 * np.expm1(x)), X)
case("gelu_exact", lambda x: mb.gelu(x=x, mode="EXACT"), lambda x: 0.5 * x * (1 + erf(x / 2**0.5)), X)
case("gelu_tanh", lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))), X)
case("gelu_sigmoid", lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
     lambda x: x * sigmoid(1.702 * x), X)
case("softmax_axis1", lambda x: mb.softmax(x=x, axis=1),
     lambda x: np.exp(x) / np.exp(x).sum(axis=1, keepdims=True), X)

BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "floor_div": np.floor_divide, "mod": np.mod, "pow": np.power, "maximum": np.maximum,
    "minimum": np.minimum,
}
for _op, _f in BINARY.items():
    case(_op, lambda x, y, op=_op: getattr(mb, op)(x=x, y=y), lambda x, y, f=_f: f(x, y), POS, Y)
case("add_broadcast", lambda x: mb.add(x=x, y=np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1)),
     lambda x: x + np.arange(3).reshape(1, 3, 1, 1), X)
for _op, _f in {"equal": np.equal, "not_equal": np.not_equal, "less": np.less,
                "less_equal": np.less_equal, "greater": np.greater,
                "greater_equal": np.greater_equal}.items():
    case(_op, lambda x, y, op=_op: as_f32(getattr(mb, op)(x=mb.round(x=x), y=mb.round(x=y))),
         lambda x, y, f=_f: f(np.round(x), np.round(y)).astype(np.float32), X, rand(2, 3, 4, 5))
for _op, _f in {"logical_and": np.logical_and, "logical_or": np.logical_or,
                "logical_xor": np.logical_xor}.items():
    case(_op, lambda x, y, op=_op: as_f32(getattr(mb, op)(x=mb.greater(x=x, y=0.0),
                                                           y=mb.greater(x=y, y=0.0))),
         lambda x, y, f=_f: f(x > 0, y > 0).astype(np.float32), X, rand(2, 3, 4, 5))
case("logical_not", lambda x: as_f32(mb.logical_not(x=mb.greater(x=x, y=0.0))),
     lambda x: (x <= 0).astype(np.float32), X)
case("select", lambda x, y: mb.select(cond=mb.greater(x=x, y=y), a=x, b=y), np.maximum, X, Y)
case("int_floor_div_mod", lambda x: (
    mb.floor_div(x=mb.cast(x=x, dtype="int32"), y=np.int32(3)),
    mb.mod(x=mb.cast(x=x, dtype="int32"), y=np.int32(3))),
     lambda x: [np.floor_divide(x.astype(np.int32), 3), np.mod(x.astype(np.int32), 3)], X * 10)
case("cast_roundtrip", lambda x: as_f32(mb.cast(x=mb.cast(x=x, dtype="int32"), dtype="fp16")),
     lambda x: x.astype(np.int32).astype(np.float32), X * 50)
case("cast_int8_uint8", lambda x: (mb.cast(x=mb.cast(x=x, dtype="int8"), dtype="int32"),
                                   mb.cast(x=mb.cast(x=mb.abs(x=x), dtype="uint8"), dtype="int32")),
     lambda x: [x.astype(np.int8).astype(np.int32), np.abs(x).astype(np.uint8).astype(np.int32)],
     X * 50, target=iOS17)

# ---- reductions, linear algebra, normalisation ---------------------------------------------

REDUCE = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod, "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(
        (x * x).sum(axis=axis, keepdims=keepdims)),
    "reduce_l1_norm": lambda x, axis, keepdims: np.abs(x).sum(axis=axis, keepdims=keepdims),
    "reduce_sum_square": lambda x, axis, keepdims: (x * x).sum(axis=axis, keepdims=keepdims),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(np.exp(x).sum(axis=axis, keepdims=keepdims)),
}
for _op, _f in REDUCE.items():
    case(_op, lambda x, op=_op: (getattr(mb, op)(x=x, axes=[1, -1], keep_dims=True),
                                 getattr(mb, op)(x=x, axes=[2], keep_dims=False),
                                 getattr(mb, op)(x=x)),
         lambda x, f=_f: [f(x, axis=(1, 3), keepdims=True), f(x, axis=2, keepdims=False),
                          f(x, axis=None, keepdims=False)], X, rtol=1e-4)
case("reduce_argmax_argmin", lambda x: (mb.reduce_argmax(x=x, axis=1, keep_dims=True),
                                        mb.reduce_argmin(x=x, axis=-1)),
     lambda x: [np.argmax(x, 1, keepdims=True).astype(np.int32), np.argmin(x, -1).astype(np.int32)], X)
case("matmul_transpose_broadcast", lambda x, y: mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True),
     lambda x, y: np.swapaxes(x, -1, -2) @ np.swapaxes(y, -1, -2), rand(2, 1, 4, 3), rand(5, 2, 4),
     rtol=1e-4)
case("matmul_vector", lambda x: mb.matmul(x=np.arange(4, dtype=np.float32), y=x),
     lambda x: np.arange(4) @ x, X, rtol=1e-4)
W_LIN, B_LIN = rand(6, 5), rand(6)
case("linear", lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN), lambda x: x @ W_LIN.T + B_LIN, X,
     rtol=1e-4)
MEAN, VAR, GAMMA, BETA = rand(3), rand(3, low=0.5, high=2), rand(3), rand(3)
case("batch_norm", lambda x: mb.batch_norm(x=x, mean=MEAN, variance=VAR, gamma=GAMMA, beta=BETA,
                                           epsilon=1e-3),
     lambda x: (x - MEAN[:, None, None]) / np.sqrt(VAR[:, None, None] + 1e-3) * GAMMA[:, None, None]
     + BETA[:, None, None], X, rtol=1e-4)
case("instance_norm", lambda x: mb.instance_norm(x=x, gamma=GAMMA, beta=BETA, epsilon=1e-3),
     lambda x: (x - x.mean((2, 3), keepdims=True)) / np.sqrt(x.var((2, 3), keepdims=True) + 1e-3)
     * GAMMA[:, None, None] + BETA[:, None, None], X, rtol=1e-4, atol=1e-5)
G2, B2 = rand(4, 5), rand(4, 5)
case("layer_norm", lambda x: mb.layer_norm(x=x, axes=[-2, -1], gamma=G2, beta=B2, epsilon=1e-4),
     lambda x: (x - x.mean((2, 3), keepdims=True)) / np.sqrt(x.var((2, 3), keepdims=True) + 1e-4)
     * G2 + B2, X, rtol=1e-4, atol=1e-5)
case("local_response_norm", lambda x: mb.local_response_norm(x=x, size=3, alpha=0.5, beta=0.75, k=2.0),
     lambda x: onnx_run("LRN", {"x": x}, dict(size=3, alpha=0.5, beta=0.75, bias=2.0)),
     rand(1, 6, 4, 4))
Q, K, V = rand(2, 3, 4, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 5)
MASK_B = RNG.random((4, 6)) > 0.3
MASK_B[:, 0] = True
MASK_F = rand(4, 6)


def sdpa(q, k, v, mask):
    s = q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + mask
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True) @ v


case("sdpa", lambda q, k, v: (
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=MASK_B),
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=MASK_F)),
     lambda q, k, v: [sdpa(q, k, v, np.where(MASK_B, 0, -np.inf)), sdpa(q, k, v, MASK_F)],
     Q, K, V, target=iOS18, rtol=1e-4, atol=1e-5)

# ---- convolution, pooling, resizing (onnxruntime oracle) -------------------------------------


def conv_case(id, x, w, bias=None, strides=None, pad_type="valid", pad=None, dil=None, groups=1):
    nd = x.ndim - 2
    strides, dil = strides or [1] * nd, dil or [1] * nd
    kw = dict(weight=w, strides=strides, pad_type=pad_type, dilations=dil, groups=groups)
    kw.update({"bias": bias} if bias is not None else {})
    kw.update({"pad": pad} if pad is not None else {})
    attrs = dict(strides=strides, dilations=dil, group=groups)
    if pad_type == "custom":
        attrs["pads"] = onnx_pads(pad)
    else:
        attrs["auto_pad"] = {"valid": "VALID", "same": "SAME_UPPER", "same_lower": "SAME_LOWER"}[pad_type]
    case(id, lambda v: mb.conv(x=v, **kw),
         lambda v: onnx_run("Conv", {"x": v, "w": w, "b": bias}, attrs), x, rtol=1e-4, atol=1e-5)


conv_case("conv_same", rand(1, 3, 9, 9), rand(4, 3, 3, 3), pad_type="same")
conv_case("conv_same_stride2", rand(1, 3, 10, 9), rand(4, 3, 4, 4), pad_type="same", strides=[2, 2])
conv_case("conv_same_lower", rand(1, 3, 10, 9), rand(4, 3, 4, 4), pad_type="same_lower", strides=[2, 2])
conv_case("conv_custom_dilated", rand(2, 4, 11, 12), rand(6, 2, 3, 2), bias=rand(6), strides=[2, 1],
          pad_type="custom", pad=[1, 2, 0, 1], dil=[2, 3], groups=2)
conv_case("conv_depthwise", rand(1, 8, 7, 7), rand(8, 1, 3, 3), bias=rand(8), pad_type="custom",
          pad=[1, 1, 1, 1], groups=8)
conv_case("conv1d", rand(2, 3, 17), rand(5, 3, 4), strides=[3], pad_type="custom", pad=[2, 1])
conv_case("conv3d", rand(1, 2, 5, 6, 7), rand(3, 2, 2, 3, 2), bias=rand(3), pad_type="same")


def pool_case(id, op, x, kernel, strides, pad_type="valid", pad=None, ceil=False, exclude=None):
    kw = dict(kernel_sizes=kernel, strides=strides, pad_type=pad_type, ceil_mode=ceil)
    kw.update({"pad": pad} if pad is not None else {})
    attrs = dict(kernel_shape=kernel, strides=strides, ceil_mode=int(ceil))
    attrs["pads"] = onnx_pads(pad) if pad is not None else [0] * 2 * len(kernel)
    onnx_op = {"max_pool": "MaxPool", "avg_pool": "AveragePool", "l2_pool": "LpPool"}[op]
    if op == "avg_pool":
        kw["exclude_padding_from_average"] = exclude
        attrs["count_include_pad"] = int(not exclude)
    if op == "l2_pool":
        attrs = dict(kernel_shape=kernel, strides=strides, pads=attrs["pads"], p=2)
    case(id, lambda v: getattr(mb, op)(x=v, **kw), lambda v: onnx_run(onnx_op, {"x": v}, attrs), x,
         rtol=1e-5, atol=1e-6)


pool_case("max_pool", "max_pool", rand(1, 3, 8, 8), [2, 2], [2, 2])
pool_case("max_pool_pad_ceil", "max_pool", rand(1, 3, 9, 8), [3, 3], [2, 2], "custom", [1, 1, 1, 1],
          ceil=True)
pool_case("avg_pool_exclude_pad", "avg_pool", rand(1, 3, 7, 8), [3, 3], [2, 2], "custom",
          [1, 1, 1, 1], exclude=True)
pool_case("avg_pool_include_pad", "avg_pool", rand(1, 3, 7, 8), [3, 2], [1, 2], "custom",
          [1, 1, 0, 0], exclude=False)
pool_case("avg_pool_ceil", "avg_pool", rand(1, 2, 8, 8), [3, 3], [2, 2], ceil=True, exclude=True)
pool_case("avg_pool1d", "avg_pool", rand(2, 3, 11), [4], [3], exclude=True)
pool_case("max_pool3d", "max_pool", rand(1, 2, 5, 6, 7), [2, 3, 2], [2, 2, 2])
pool_case("l2_pool", "l2_pool", rand(1, 3, 8, 8), [2, 3], [2, 1], "custom", [0, 0, 1, 1])
case("avg_pool_same", lambda v: mb.avg_pool(x=v, kernel_sizes=[3, 3], strides=[2, 2], pad_type="same",
                                            exclude_padding_from_average=True),
     lambda v: onnx_run("AveragePool", {"x": v}, dict(kernel_shape=[3, 3], strides=[2, 2],
                                                     auto_pad="SAME_UPPER")), rand(1, 2, 8, 9))


def resize_onnx(x, out_hw, coordinate_mode, mode="linear"):
    sizes = np.array(list(x.shape[:2]) + list(out_hw), np.int64)
    return onnx_run("Resize", {"x": x, "roi": None, "scales": None, "sizes": sizes},
                    dict(mode=mode, coordinate_transformation_mode=coordinate_mode,
                         nearest_mode="floor"))


IMG = rand(1, 2, 4, 5)
case("upsample_nearest", lambda v: mb.upsample_nearest_neighbor(x=v, scale_factor_height=2,
                                                                 scale_factor_width=3),
     lambda v: v.repeat(2, axis=2).repeat(3, axis=3), IMG)
case("upsample_bilinear_align", lambda v: mb.upsample_bilinear(x=v, scale_factor_height=2.0,
                                                               scale_factor_width=3.0, align_corners=True),
     lambda v: resize_onnx(v, (8, 15), "align_corners"), IMG)
case("upsample_bilinear_half_pixel", lambda v: mb.upsample_bilinear(
    x=v, scale_factor_height=2.0, scale_factor_width=3.0, align_corners=False),
     lambda v: resize_onnx(v, (8, 15), "half_pixel"), IMG)
# resize_bilinear: the coremltools docs list the grid for Xin=2; a ramp [0, 1] samples it.
RESIZE_GRIDS = {
    "STRICT_ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0], "ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0],
    "DEFAULT": [0.0, 0.4, 0.8, 1.0, 1.0], "OFFSET_CORNERS": [0.1, 0.3, 0.5, 0.7, 0.9],
    "UNALIGN_CORNERS": [0.0, 0.1, 0.5, 0.9, 1.0],
}
for _mode, _grid in RESIZE_GRIDS.items():
    case(f"resize_bilinear_{_mode.lower()}",
         lambda v, m=_mode: mb.resize_bilinear(x=v, target_size_height=1, target_size_width=5,
                                               sampling_mode=m),
         lambda v, g=_grid: np.array(g, np.float32).reshape(1, 1, 1, 5),
         np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2), rtol=1e-5, atol=1e-6)

# ---- shapes and data movement ----------------------------------------------------------------

IDX = np.array([[2, -1], [0, 1]], np.int32)
case("reshape", lambda x: mb.reshape(x=x, shape=[0, -1, 5]), lambda x: x.reshape(2, 12, 5), X)
case("transpose", lambda x: mb.transpose(x=x, perm=[2, 0, 3, 1]), lambda x: x.transpose(2, 0, 3, 1), X)
case("squeeze_expand", lambda x: (mb.squeeze(x=x, axes=[1]), mb.squeeze(x=x),
                                  mb.expand_dims(x=x, axes=[0, -1])),
     lambda x: [x[:, 0], x.reshape(2, 4), x.reshape(1, 2, 1, 4, 1)], rand(2, 1, 4))
case("gather", lambda x: (mb.gather(x=x, indices=IDX, axis=2), mb.gather(x=x, indices=np.int32(-2))),
     lambda x: [np.take(x, IDX % 4, axis=2), x[-2]], X)
case("gather_batch_dims", lambda x: mb.gather(x=x, indices=np.array([[0, 2, 1], [3, 3, 0]], np.int32),
                                              axis=2, batch_dims=1),
     lambda x: np.stack([x[0][:, [0, 2, 1]], x[1][:, [3, 3, 0]]]), rand(2, 3, 4, 5))
GA_IDX = RNG.integers(-4, 4, (2, 3, 2, 5)).astype(np.int32)
case("gather_along_axis", lambda x: mb.gather_along_axis(x=x, indices=GA_IDX, axis=2),
     lambda x: np.take_along_axis(x, GA_IDX % 4, axis=2), X)
ND_IDX = np.array([[[1, 0], [0, 2]], [[1, 3], [0, -1]]], np.int32)
case("gather_nd", lambda x: (mb.gather_nd(x=x, indices=ND_IDX), mb.gather_nd(
    x=x, indices=np.array([[[2], [1]], [[0], [0]]], np.int32), batch_dims=1)),
     lambda x: [x[ND_IDX[..., 0], ND_IDX[..., 1] % 3], np.stack([x[0][[2, 1]], x[1][[0, 0]]])], X)
case("concat", lambda x, y: (mb.concat(values=[x, y, x], axis=-1), mb.concat(values=[x, y], axis=1,
                                                                              interleave=True)),
     lambda x, y: [np.concatenate([x, y, x], -1), np.stack([x, y], 2).reshape(2, 6, 4, 5)], X, Y)
case("split", lambda x: (*mb.split(x=x, num_splits=2, axis=2), *mb.split(x=x, split_sizes=[1, 3, 1],
                                                                         axis=-1)),
     lambda x: np.split(x, 2, axis=2) + np.split(x, [1, 4], axis=-1), X)
case("slice_by_index", lambda x: (
    mb.slice_by_index(x=x, begin=[1, 0, 1, 0], end=[2, 3, -1, 5], stride=[1, 2, 1, 2]),
    mb.slice_by_index(x=x, begin=[0, 2, 0, -1], end=[0, 0, 4, 0], stride=[1, -1, 1, 1],
                      begin_mask=[True, False, False, False], end_mask=[True, True, False, False],
                      squeeze_mask=[False, False, False, True])),
     lambda x: [x[1:2, 0:3:2, 1:-1, 0:5:2], x[:, 2::-1, 0:4, -1]], X)
case("slice_by_size", lambda x: mb.slice_by_size(x=x, begin=[1, 0, -3, 1], size=[1, -1, 2, 3]),
     lambda x: x[1:2, :, 1:3, 1:4], X)
case("tile", lambda x: mb.tile(x=x, reps=[1, 2, 1, 3]), lambda x: np.tile(x, (1, 2, 1, 3)), X)
case("fill", lambda x: mb.add(x=x, y=mb.fill(shape=[2, 3], value=1.5)), lambda x: x + 1.5, rand(2, 3))
case("range_1d", lambda x: mb.add(x=mb.range_1d(start=1.0, end=4.0, step=0.5), y=x),
     lambda x: np.arange(1.0, 4.0, 0.5) + x, rand(6))
for _mode, _np_mode in {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.items():
    case(f"pad_{_mode}", lambda x, m=_mode: mb.pad(x=x, pad=[1, 2, 2, 1], mode=m, constant_val=0.5),
         lambda x, m=_np_mode: np.pad(x, [(0, 0), (0, 0), (1, 2), (2, 1)], mode=m,
                                      **({"constant_values": 0.5} if m == "constant" else {})), X)
case("shape", lambda x: mb.shape(x=x), lambda x: np.array(x.shape, np.int32), X)
case("topk", lambda x: (*mb.topk(x=x, k=3, axis=-1), *mb.topk(x=x, k=2, axis=1, ascending=True)),
     lambda x: [-np.sort(-x, -1)[..., :3], np.argsort(-x, -1)[..., :3].astype(np.int32),
                np.sort(x, 1)[:, :2], np.argsort(x, 1)[:, :2].astype(np.int32)], X)
case("argsort", lambda x: (mb.argsort(x=x, axis=-1), mb.argsort(x=x, axis=0, ascending=True)),
     lambda x: [np.argsort(-x, -1).astype(np.int32), np.argsort(x, 0).astype(np.int32)], X)
case("cumsum", lambda x: (mb.cumsum(x=x, axis=1), mb.cumsum(x=x, axis=-1, exclusive=True, reverse=True)),
     lambda x: [np.cumsum(x, 1), np.flip(np.cumsum(np.flip(x, -1), -1), -1) - x], X, atol=1e-5)
case("band_part", lambda x: (mb.band_part(x=x, lower=1, upper=0), mb.band_part(x=x, lower=-1, upper=2)),
     lambda x: [np.tril(np.triu(x, -1), 0), np.triu(x, -2) - np.triu(x, 3)], rand(2, 5, 6))

# ---- priority B: conv_transpose, lstm, cond, compressed constants -------------------------------


def conv_transpose_case(id, x, w, strides, pad, groups=1, dil=None, bias=None):
    nd = x.ndim - 2
    dil = dil or [1] * nd
    kw = dict(weight=w, strides=strides, pad_type="custom", pad=pad, groups=groups, dilations=dil)
    kw.update({"bias": bias} if bias is not None else {})
    attrs = dict(strides=strides, pads=onnx_pads(pad), group=groups, dilations=dil)
    case(id, lambda v: mb.conv_transpose(x=v, **kw),
         lambda v: onnx_run("ConvTranspose", {"x": v, "w": w, "b": bias}, attrs), x, rtol=1e-4,
         atol=1e-5)


conv_transpose_case("conv_transpose", rand(1, 4, 5, 6), rand(4, 3, 3, 3), [2, 2], [1, 1, 0, 1],
                    bias=rand(3))
conv_transpose_case("conv_transpose_groups", rand(2, 4, 5, 4), rand(4, 2, 2, 3), [1, 2], [0, 0, 1, 1],
                    groups=2, dil=[2, 1])
conv_transpose_case("conv_transpose1d", rand(1, 3, 7), rand(3, 2, 4), [3], [1, 2])
H, I_SZ, T, B = 4, 3, 5, 2


def lstm_case(id, direction):
    d = 2 if direction == "bidirectional" else 1
    w, r, bias = rand(d, 4 * H, I_SZ), rand(d, 4 * H, H), rand(d, 8 * H)
    h0, c0 = rand(d, B, H), rand(d, B, H)
    ifoz = np.concatenate([np.arange(H), np.arange(2 * H, 3 * H), np.arange(H, 2 * H),
                           np.arange(3 * H, 4 * H)])  # ONNX gates are i, o, f, c
    kw = dict(weight_ih=w[0][ifoz], weight_hh=r[0][ifoz], bias=(bias[0, :4 * H] + bias[0, 4 * H:])[ifoz],
              direction=direction, output_sequence=True)
    if d == 2:
        kw.update(weight_ih_back=w[1][ifoz], weight_hh_back=r[1][ifoz],
                  bias_back=(bias[1, :4 * H] + bias[1, 4 * H:])[ifoz])
    h0_mil, c0_mil = (s.transpose(1, 0, 2).reshape(B, d * H) for s in (h0, c0))

    def expect(x):
        y, yh, yc = onnx_run("LSTM", {"x": x, "w": w, "r": r, "b": bias, "seq": None, "h0": h0,
                                      "c0": c0}, dict(hidden_size=H, direction=direction), n_out=3)
        return [y.transpose(0, 2, 1, 3).reshape(T, B, d * H)] + [
            s.transpose(1, 0, 2).reshape(B, d * H) for s in (yh, yc)]

    case(id, lambda x: mb.lstm(x=x, initial_h=h0_mil, initial_c=c0_mil, **kw), expect,
         rand(T, B, I_SZ), rtol=1e-4, atol=1e-5)


for _direction in ("forward", "reverse", "bidirectional"):
    lstm_case(f"lstm_{_direction}", _direction)
case("cond", lambda x: mb.cond(pred=mb.greater(x=mb.reduce_sum(x=x), y=0.0),
                               _true_fn=lambda: mb.mul(x=x, y=2.0), _false_fn=lambda: mb.sub(x=x, y=1.0)),
     lambda x: x * 2 if x.sum() > 0 else x - 1, np.abs(X))
case("cond_false", CASES[-1].build, CASES[-1].expect, -np.abs(X))
QDATA = RNG.integers(0, 255, (6, 5)).astype(np.uint8)
QSCALE, QZERO = rand(6, low=0.1, high=1), RNG.integers(0, 255, 6).astype(np.uint8)
case("constexpr_affine_dequantize", lambda x: mb.matmul(x=x, y=mb.constexpr_affine_dequantize(
    quantized_data=QDATA, zero_point=QZERO, scale=QSCALE, axis=0)),
     lambda x: x @ ((QDATA.astype(np.float32) - QZERO[:, None]) * QSCALE[:, None]), rand(3, 6),
     rtol=1e-4)
LUT16 = rand(16)
LUT_IDX = RNG.integers(0, 16, (6, 5))
LUT_PACKED = np.packbits(((LUT_IDX.ravel()[:, None] >> np.arange(4)) & 1).astype(np.uint8).ravel(),
                         bitorder="little")
case("constexpr_lut_to_dense_ios16", lambda x: mb.matmul(x=x, y=mb.constexpr_lut_to_dense(
    indices=LUT_PACKED, lut=LUT16, shape=np.array([6, 5], np.uint32))),
     lambda x: x @ LUT16[LUT_IDX], rand(3, 6), rtol=1e-4)
LUT18 = rand(2, 1, 16, 1)
case("constexpr_lut_to_dense_ios18", lambda x: mb.matmul(x=x, y=mb.constexpr_lut_to_dense(
    indices=LUT_IDX.astype(types.np_uint4_dtype), lut=LUT18)),
     lambda x: x @ np.concatenate([LUT18[0, 0, LUT_IDX[:3], 0], LUT18[1, 0, LUT_IDX[3:], 0]]),
     rand(3, 6), target=iOS18, rtol=1e-4)
VEC_IDX = RNG.integers(0, 2, (2, 5))
VEC_LUT = rand(1, 1, 2, 3)
case("constexpr_lut_to_dense_vector", lambda x: mb.matmul(x=x, y=mb.constexpr_lut_to_dense(
    indices=VEC_IDX.astype(types.np_uint1_dtype), lut=VEC_LUT, vector_axis=0)),
     lambda x: x @ VEC_LUT[0, 0][VEC_IDX].transpose(0, 2, 1).reshape(6, 5), rand(3, 6), target=iOS18,
     rtol=1e-4)
INT4 = RNG.integers(-8, 8, (6, 8))
BS_SCALE, BS_OFFSET = rand(3, 2, low=0.1, high=1), RNG.integers(-8, 8, (3, 2))
case("constexpr_blockwise_shift_scale", lambda x: mb.matmul(x=x, y=mb.constexpr_blockwise_shift_scale(
    data=INT4.astype(types.np_int4_dtype), scale=BS_SCALE, offset=BS_OFFSET.astype(types.np_int4_dtype))),
     lambda x: x @ ((INT4 - BS_OFFSET.repeat(2, 0).repeat(4, 1)) * BS_SCALE.repeat(2, 0).repeat(4, 1)),
     rand(3, 6), target=iOS18, rtol=1e-4)
F16_W = rand(6, 5).astype(np.float16)
case("constexpr_cast", lambda x: mb.matmul(x=x, y=mb.constexpr_cast(source_val=F16_W, output_dtype="fp32")),
     lambda x: x @ F16_W.astype(np.float32), rand(3, 6), rtol=1e-4)


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_op_matches_oracle(c, tmp_path):
    program = ReferenceProgram(save_program(c.build, c.feeds, c.target, tmp_path))
    got = program.run({t.name: f for t, f in zip(program.inputs, c.feeds)})
    expected = c.expect(*c.feeds)
    expected = expected if isinstance(expected, list) else [expected]
    assert len(got) == len(expected)
    for t, want in zip(program.outputs, expected):
        want = np.asarray(want)
        assert got[t.name].shape == want.shape, t.name
        assert got[t.name].dtype == (np.float32 if want.dtype.kind == "f" else np.int32), t.name
        np.testing.assert_allclose(got[t.name], want, rtol=c.rtol, atol=c.atol, err_msg=t.name)


# ---- fp16 programs: cast in, op, cast out --------------------------------------------------

def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


W_F16 = rand(8, 3, 3, 3)
FP16_CASES = {
    "conv": (lambda h: mb.conv(x=h, weight=W_F16.astype(np.float16), pad_type="same"),
             lambda x: onnx_run("Conv", {"x": x, "w": W_F16}, dict(auto_pad="SAME_UPPER")), rand(1, 3, 8, 8)),
    "matmul": (lambda h: mb.matmul(x=h, y=W_LIN.T.astype(np.float16)), lambda x: x @ W_LIN.T, X),
    "softmax": (lambda h: mb.softmax(x=h, axis=-1),
                lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True), X),
    "layer_norm": (lambda h: mb.layer_norm(x=h, axes=[-1]),
                   lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5), X),
    "gelu": (lambda h: mb.gelu(x=h), lambda x: 0.5 * x * (1 + erf(x / 2**0.5)), X),
    "avg_pool": (lambda h: mb.avg_pool(x=h, kernel_sizes=[2, 2], strides=[2, 2], pad_type="valid"),
                 lambda x: onnx_run("AveragePool", {"x": x}, dict(kernel_shape=[2, 2], strides=[2, 2])),
                 rand(2, 3, 4, 4)),
    "reduce_sum": (lambda h: mb.reduce_sum(x=h, axes=[1, 2]), lambda x: x.sum((1, 2)), X),
}


@pytest.mark.parametrize("name", sorted(FP16_CASES))
def test_fp16_program_close_to_fp32(name, tmp_path):
    build, expect, x = FP16_CASES[name]
    path = save_program(lambda v: as_f32(build(mb.cast(x=v, dtype="fp16"))), [x], iOS16, tmp_path)
    got = ReferenceProgram(path).run({"a": x})
    out = next(iter(got.values()))
    want = expect(x)
    assert out.shape == want.shape and out.dtype == np.float32
    assert cosine(out, want) >= 0.999


def test_fp16_rounds_after_every_op(tmp_path):
    # In fp16, 1 + 2**-12 rounds back to 1, so adding it twice must leave exactly 1.
    x = np.ones((1, 4), np.float32)
    tiny = np.float16(2.0**-12)
    path = save_program(lambda v: as_f32(mb.add(x=mb.add(x=mb.cast(x=v, dtype="fp16"), y=tiny), y=tiny)),
                        [x], iOS16, tmp_path)
    (out,) = ReferenceProgram(path).run({"a": x}).values()
    np.testing.assert_array_equal(out, x)


# ---- blob storage reader -----------------------------------------------------------------------

BLOB_KINDS = [  # (MIL dtype, writer method, reader method, values)
    ("fp16", "write_fp16_data", "read_fp16_data", rand(37).astype(np.float16)),
    ("fp32", "write_float_data", "read_float_data", rand(41)),
    ("int8", "write_int8_data", "read_int8_data", RNG.integers(-128, 128, 29).astype(np.int8)),
    ("uint8", "write_uint8_data", "read_uint8_data", RNG.integers(0, 256, 30).astype(np.uint8)),
    ("int4", "write_int4_data", "read_int4_data", RNG.integers(-8, 8, 13).astype(np.int8)),
    ("uint3", "write_uint3_data", "read_uint3_data", RNG.integers(0, 8, 11).astype(np.uint8)),
    ("uint6", "write_uint6_data", "read_uint6_data", RNG.integers(0, 64, 7).astype(np.uint8)),
    ("uint1", "write_uint1_data", "read_uint1_data", RNG.integers(0, 2, 19).astype(np.uint8)),
]


def test_blob_reader_matches_coremltools(tmp_path):
    path = str(tmp_path / "weight.bin")
    writer = _BlobStorageWriter(path)
    offsets = []
    for _, write, _, values in BLOB_KINDS:
        data = values.view(np.uint16) if values.dtype == np.float16 else values
        offsets.append(getattr(writer, write)(np.ascontiguousarray(data)))
    del writer  # flushes the file
    theirs, ours = _BlobStorageReader(path), BlobFile(path)
    for (mil_dtype, _, read, values), offset in zip(BLOB_KINDS, offsets):
        expected = np.asarray(getattr(theirs, read)(offset))
        if mil_dtype == "fp16":
            expected = expected.view(np.float16)
        got = ours.read(offset, mil_dtype, values.shape)
        np.testing.assert_array_equal(got, expected[: values.size], err_msg=mil_dtype)
        np.testing.assert_array_equal(got, values, err_msg=mil_dtype)
        np.testing.assert_array_equal(ours.read_all(offset), values, err_msg=mil_dtype)


def test_program_weights_come_from_the_blob_file(tmp_path):
    w16, w8 = rand(4, 6).astype(np.float16), RNG.integers(0, 255, (6, 5)).astype(np.uint8)
    path = save_program(lambda v: as_f32(mb.matmul(x=mb.matmul(x=mb.cast(x=v, dtype="fp16"), y=w16),
                                                   y=mb.constexpr_affine_dequantize(
                                                       quantized_data=w8, zero_point=np.uint8(3),
                                                       scale=np.float16(0.01), axis=0))),
                        [rand(2, 4)], iOS16, tmp_path)
    assert os.path.getsize(os.path.join(path, "Data/com.apple.CoreML/weights/weight.bin")) > 64
    program = ReferenceProgram(path)
    assert {"matmul", "constexpr_affine_dequantize"} <= program.op_types()
    x = rand(2, 4)
    (out,) = program.run({"a": x}).values()
    want = (x @ w16.astype(np.float32)) @ ((w8.astype(np.float32) - 3) * np.float32(np.float16(0.01)))
    assert cosine(out, want) >= 0.9999


# ---- errors --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weighted_package(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weighted")
    return save_program(lambda v: mb.linear(x=v, weight=W_LIN), [rand(2, 5)], iOS16, directory)


def copy_package(src, dst) -> str:
    import shutil
    return shutil.copytree(src, os.path.join(str(dst), "copy.mlpackage"))


WEIGHT_BIN = "Data/com.apple.CoreML/weights/weight.bin"


def test_missing_weight_file_is_a_bundle_error(weighted_package, tmp_path):
    path = copy_package(weighted_package, tmp_path)
    os.remove(os.path.join(path, WEIGHT_BIN))
    with pytest.raises(BundleError, match="weight.bin"):
        ReferenceProgram(path)


def test_bad_sentinel_is_a_bundle_error(weighted_package, tmp_path):
    path = copy_package(weighted_package, tmp_path)
    with open(os.path.join(path, WEIGHT_BIN), "r+b") as f:
        f.seek(64)
        f.write(struct.pack("<I", 0x12345678))
    with pytest.raises(BundleError, match="sentinel"):
        ReferenceProgram(path)


def test_truncated_weight_file_is_a_bundle_error(weighted_package, tmp_path):
    path = copy_package(weighted_package, tmp_path)
    with open(os.path.join(path, WEIGHT_BIN), "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="past the end"):
        ReferenceProgram(path)


def test_missing_manifest_and_corrupt_spec_are_bundle_errors(weighted_package, tmp_path):
    path = copy_package(weighted_package, tmp_path)
    with open(os.path.join(path, "Data/com.apple.CoreML/model.mlmodel"), "wb") as f:
        f.write(b"\xff\x00 not a protobuf")
    with pytest.raises(BundleError, match="model.mlmodel"):
        ReferenceProgram(path)
    os.remove(os.path.join(path, "Manifest.json"))
    with pytest.raises(BundleError, match="Manifest.json"):
        ReferenceProgram(path)


@pytest.mark.parametrize("feeds, message", [
    ({"b": np.zeros((2, 5), np.float32)}, "'b'"),
    ({}, "missing input 'a'"),
    ({"a": np.zeros((2, 4), np.float32)}, r"'a'.*shape \[2, 4\].*\[2, 5\]"),
    ({"a": np.zeros((2, 5), np.float64)}, "'a'.*float64"),
])
def test_bad_feeds_are_input_errors(weighted_package, feeds, message):
    with pytest.raises(InputError, match=message):
        ReferenceProgram(weighted_package).run(feeds)


def test_unknown_op_type_is_a_bundle_error(tmp_path):
    path = save_program(lambda v: mb.space_to_depth(x=v, block_size=2, name="s2d"), [rand(1, 2, 4, 4)],
                        iOS16, tmp_path)
    with pytest.raises(BundleError, match="space_to_depth.*s2d"):
        ReferenceProgram(path)


def test_every_lowered_op_has_a_reference():
    assert not [op for op in EMITTED_BY_LOWERING if op not in MIL_OPS]
