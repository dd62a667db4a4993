"""Tests for the CoreML reference executor (runtime/mil_reader, mil_ops, coreml_reference).

Each case builds a tiny MIL program with coremltools' builder, saves it as an .mlpackage
(no MIL passes, so the ops stay as built), runs it with `ReferenceProgram` and compares it
with an independent oracle: a numpy formula written here, or onnxruntime running the
equivalent one-node ONNX model.
"""

from __future__ import annotations

import math
import os
import shutil
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from unittest import mock

import coremltools as ct
import numpy as np
import onnxruntime as ort
import pytest
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import types
from coremltools.libmilstoragepython import _BlobStorageReader, _BlobStorageWriter
from onnx import TensorProto, helper

from applec.errors import BundleError, InputError
from applec.runtime.coreml_reference import ReferenceProgram, round_to_fp16
from applec.runtime.mil_ops import EMITTED_BY_LOWERING, MIL_OPS
from applec.runtime.mil_reader import BlobFile

iOS16, iOS17, iOS18 = ct.target.iOS16, ct.target.iOS17, ct.target.iOS18
RNG = np.random.default_rng(0)


def rand(*shape, low=-2.0, high=2.0):
    return RNG.uniform(low, high, shape).astype(np.float32)


def save_program(build, feeds, target, directory) -> str:
    """Save `build(*input_vars)` as an unoptimised ML program; inputs are named a, b, c."""
    specs = [mb.TensorSpec(shape=f.shape, dtype=types.fp32) for f in feeds]
    # mb.program reads the arity from the function's code object: one wrapper per arity.
    mains = {1: lambda a: build(a), 2: lambda a, b: build(a, b),
             3: lambda a, b, c: build(a, b, c)}
    prog = mb.program(input_specs=specs, opset_version=target)(mains[len(feeds)])
    # ct.convert runs a full gc.collect() per call: most of its time in a big test process.
    with mock.patch("gc.collect", lambda *args: 0):
        model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                           pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True,
                           compute_precision=ct.precision.FLOAT32)
    path = os.path.join(str(directory), "model.mlpackage")
    model.save(path)
    return path


def onnx_run(op_type, inputs: dict, attrs: dict | None = None, n_out=1):
    """Run one ONNX node in onnxruntime; `inputs` maps names, in order, to arrays or None."""
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op_type, [n if v is not None else "" for n, v in inputs.items()],
                            outs, **(attrs or {}))
    given = {n: v for n, v in inputs.items() if v is not None}
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for n, v in given.items()],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    result = session.run(None, given)
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


CASES: list[Case] = []


def case(id, build, expect, *feeds, target=iOS16, rtol=1e-5, atol=1e-6):
    CASES.append(Case(id, build, expect, list(feeds), target, rtol, atol))


def erf(x):
    return np.vectorize(math.erf)(x.astype(np.float64))


def sigmoid(x):
    return 1 / (1 + np.exp(-x.astype(np.float64)))


def softmax(x, axis):
    e = np.exp(x - x.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def as_f32(v):
    return mb.cast(x=v, dtype="fp32")


X = rand(2, 3, 4, 5)
POS = rand(2, 3, 4, 5, low=0.1, high=3.0)
Y = rand(2, 3, 4, 5, low=0.5, high=2.0)

# ---- elementwise ----------------------------------------------------------------------------

UNARY = {
    "relu": lambda x: np.maximum(x, 0), "relu6": lambda x: np.clip(x, 0, 6), "sigmoid": sigmoid,
    "tanh": np.tanh, "erf": erf, "exp": np.exp, "abs": np.abs, "floor": np.floor,
    "ceil": np.ceil, "round": np.round, "sign": np.sign, "sin": np.sin, "cos": np.cos,
    "tan": np.tan, "atan": np.arctan, "sinh": np.sinh, "cosh": np.cosh, "square": np.square,
    "silu": lambda x: x * sigmoid(x), "softplus": lambda x: np.log1p(np.exp(x)),
    "exp2": np.exp2, "identity": lambda x: x,
}
for _op, _f in UNARY.items():
    case(_op, lambda x, op=_op: getattr(mb, op)(x=x), lambda x, f=_f: f(x), X * 1.5)
case("asin_acos_atanh", lambda x: (mb.asin(x=x), mb.acos(x=x), mb.atanh(x=x)),
     lambda x: [np.arcsin(x), np.arccos(x), np.arctanh(x)], X / 2.5, rtol=1e-4)
case("sqrt", lambda x: mb.sqrt(x=x), np.sqrt, POS)
case("rsqrt", lambda x: mb.rsqrt(x=x, epsilon=0.5), lambda x: 1 / np.sqrt(x + 0.5), POS)
case("log", lambda x: mb.log(x=x, epsilon=0.25), lambda x: np.log(x + 0.25), POS)
case("inverse", lambda x: mb.inverse(x=x, epsilon=0.5), lambda x: 1 / (x + 0.5), POS)
case("clip", lambda x: mb.clip(x=x, alpha=-0.5, beta=1.0), lambda x: np.clip(x, -0.5, 1.0), X)
case("sigmoid_hard", lambda x: mb.sigmoid_hard(x=x, alpha=0.3, beta=0.4),
     lambda x: np.clip(0.3 * x + 0.4, 0, 1), X * 3)
case("leaky_relu", lambda x: mb.leaky_relu(x=x, alpha=0.1),
     lambda x: np.where(x > 0, x, 0.1 * x), X)
case("elu", lambda x: mb.elu(x=x, alpha=0.7), lambda x: np.where(x > 0, x, 0.7 * np.expm1(x)), X)
PRELU = rand(3)
case("prelu", lambda x: mb.prelu(x=x, alpha=PRELU),
     lambda x: np.where(x > 0, x, PRELU[:, None, None] * x), X)
case("gelu_exact", lambda x: mb.gelu(x=x, mode="EXACT"),
     lambda x: 0.5 * x * (1 + erf(x / 2**0.5)), X)
case("gelu_tanh", lambda x: mb.gelu(x=x, mode="TANH_APPROXIMATION"),
     lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))), X)
case("gelu_sigmoid", lambda x: mb.gelu(x=x, mode="SIGMOID_APPROXIMATION"),
     lambda x: x * sigmoid(1.702 * x), X)
case("softmax", lambda x: (mb.softmax(x=x, axis=1), mb.softmax(x=x)),
     lambda x: [softmax(x, 1), softmax(x, -1)], X)

BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "floor_div": np.floor_divide, "mod": np.mod, "pow": np.power, "maximum": np.maximum,
    "minimum": np.minimum,
}
for _op, _f in BINARY.items():
    case(_op, lambda x, y, op=_op: getattr(mb, op)(x=x, y=y), lambda x, y, f=_f: f(x, y), POS, Y)
case("add_broadcast", lambda x: mb.add(x=x, y=np.arange(3, dtype=np.float32).reshape(3, 1, 1)),
     lambda x: x + np.arange(3).reshape(3, 1, 1), X)
COMPARE = {"equal": np.equal, "not_equal": np.not_equal, "less": np.less,
           "less_equal": np.less_equal, "greater": np.greater, "greater_equal": np.greater_equal}
for _op, _f in COMPARE.items():
    case(_op, lambda x, y, op=_op: as_f32(getattr(mb, op)(x=mb.round(x=x), y=mb.round(x=y))),
         lambda x, y, f=_f: f(np.round(x), np.round(y)), X, rand(2, 3, 4, 5))
LOGICAL = {"logical_and": np.logical_and, "logical_or": np.logical_or,
           "logical_xor": np.logical_xor}
for _op, _f in LOGICAL.items():
    case(_op, lambda x, y, op=_op: as_f32(getattr(mb, op)(x=mb.greater(x=x, y=0.0),
                                                           y=mb.greater(x=y, y=0.0))),
         lambda x, y, f=_f: f(x > 0, y > 0), X, rand(2, 3, 4, 5))
case("logical_not", lambda x: as_f32(mb.logical_not(x=mb.greater(x=x, y=0.0))),
     lambda x: x <= 0, X)
case("select", lambda x, y: mb.select(cond=mb.greater(x=x, y=y), a=x, b=y), np.maximum, X, Y)
case("int32_floor_div_mod", lambda x: (mb.floor_div(x=mb.cast(x=x, dtype="int32"), y=np.int32(3)),
                                       mb.mod(x=mb.cast(x=x, dtype="int32"), y=np.int32(3))),
     lambda x: [x.astype(np.int32) // 3, x.astype(np.int32) % 3], X * 10)
case("cast_int32_fp16", lambda x: as_f32(mb.cast(x=mb.cast(x=x, dtype="int32"), dtype="fp16")),
     lambda x: x.astype(np.int32).astype(np.float16), X * 50)
case("cast_int8_uint8", lambda x: (
    mb.cast(x=mb.cast(x=x, dtype="int8"), dtype="int32"),
    mb.cast(x=mb.cast(x=mb.abs(x=x), dtype="uint8"), dtype="int32")),
     lambda x: [x.astype(np.int8).astype(np.int32), np.abs(x).astype(np.uint8).astype(np.int32)],
     X * 50, target=iOS17)

# ---- reductions, linear algebra, normalisation -----------------------------------------------


def _sum_of(f):
    return lambda x, axis, keepdims: f(x).sum(axis=axis, keepdims=keepdims)


REDUCE = {
    "reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max, "reduce_min": np.min,
    "reduce_prod": np.prod, "reduce_l1_norm": _sum_of(np.abs),
    "reduce_sum_square": _sum_of(np.square),
    "reduce_l2_norm": lambda x, axis, keepdims: np.sqrt(_sum_of(np.square)(x, axis, keepdims)),
    "reduce_log_sum_exp": lambda x, axis, keepdims: np.log(_sum_of(np.exp)(x, axis, keepdims)),
}
for _op, _f in REDUCE.items():
    case(_op, lambda x, op=_op: (getattr(mb, op)(x=x, axes=[1, -1], keep_dims=True),
                                 getattr(mb, op)(x=x, axes=[2], keep_dims=False),
                                 getattr(mb, op)(x=x)),
         lambda x, f=_f: [f(x, axis=(1, 3), keepdims=True), f(x, axis=2, keepdims=False),
                          f(x, axis=None, keepdims=False)], X, rtol=1e-4)
case("reduce_argmax_argmin", lambda x: (mb.reduce_argmax(x=x, axis=1, keep_dims=True),
                                        mb.reduce_argmin(x=x, axis=-1)),
     lambda x: [np.argmax(x, 1, keepdims=True), np.argmin(x, -1)], X)
case("matmul_transposed_broadcast",
     lambda x, y: mb.matmul(x=x, y=y, transpose_x=True, transpose_y=True),
     lambda x, y: np.swapaxes(x, -1, -2) @ np.swapaxes(y, -1, -2), rand(2, 1, 4, 3),
     rand(5, 6, 4), rtol=1e-4)
case("matmul_vector", lambda x: mb.matmul(x=np.arange(4, dtype=np.float32), y=x),
     lambda x: np.arange(4) @ x, rand(4, 5), rtol=1e-4)
W_LIN, B_LIN = rand(6, 5), rand(6)
case("linear", lambda x: mb.linear(x=x, weight=W_LIN, bias=B_LIN),
     lambda x: x @ W_LIN.T + B_LIN, X, rtol=1e-4)
MEAN, VAR, GAMMA, BETA = rand(3), rand(3, low=0.5, high=2), rand(3), rand(3)


def per_channel(v):
    return v[:, None, None]


case("batch_norm", lambda x: mb.batch_norm(x=x, mean=MEAN, variance=VAR, gamma=GAMMA,
                                           beta=BETA, epsilon=1e-3),
     lambda x: (x - per_channel(MEAN)) / np.sqrt(per_channel(VAR) + 1e-3) * per_channel(GAMMA)
     + per_channel(BETA), X, rtol=1e-4)
case("instance_norm", lambda x: mb.instance_norm(x=x, gamma=GAMMA, beta=BETA, epsilon=1e-3),
     lambda x: (x - x.mean((2, 3), keepdims=True)) / np.sqrt(x.var((2, 3), keepdims=True) + 1e-3)
     * per_channel(GAMMA) + per_channel(BETA), X, rtol=1e-4, atol=1e-5)
G2, B2 = rand(4, 5), rand(4, 5)
case("layer_norm", lambda x: mb.layer_norm(x=x, axes=[-2, -1], gamma=G2, beta=B2, epsilon=1e-4),
     lambda x: (x - x.mean((2, 3), keepdims=True)) / np.sqrt(x.var((2, 3), keepdims=True) + 1e-4)
     * G2 + B2, X, rtol=1e-4, atol=1e-5)
case("local_response_norm",
     lambda x: mb.local_response_norm(x=x, size=3, alpha=0.5, beta=0.75, k=2.0),
     lambda x: onnx_run("LRN", {"x": x}, {"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 2.0}),
     rand(1, 6, 4, 4))
MASK_B = RNG.random((4, 6)) > 0.3
MASK_B[:, 0] = True
MASK_F = rand(4, 6)


def sdpa(q, k, v, mask):
    return softmax(q @ np.swapaxes(k, -1, -2) / np.sqrt(q.shape[-1]) + mask, -1) @ v


case("scaled_dot_product_attention", lambda q, k, v: (
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=MASK_B),
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=MASK_F)),
     lambda q, k, v: [sdpa(q, k, v, np.where(MASK_B, 0, -np.inf)), sdpa(q, k, v, MASK_F)],
     rand(2, 3, 4, 8), rand(2, 3, 6, 8), rand(2, 3, 6, 5), target=iOS18, rtol=1e-4, atol=1e-5)
# 2 x 1100 x 600 > 2**20 scores: the executor goes a block of query rows at a time
BIG_MASK_B = RNG.random((1100, 600)) > 0.3
BIG_MASK_B[:, 0] = True
BIG_MASK_F = rand(1, 1100, 600)
case("scaled_dot_product_attention_blocked", lambda q, k, v: (
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=BIG_MASK_B),
    mb.scaled_dot_product_attention(query=q, key=k, value=v, attn_mask=BIG_MASK_F)),
     lambda q, k, v: [sdpa(q, k, v, np.where(BIG_MASK_B, 0, -np.inf)), sdpa(q, k, v, BIG_MASK_F)],
     rand(1, 2, 1100, 8), rand(1, 2, 600, 8), rand(1, 2, 600, 4), target=iOS18, rtol=1e-4,
     atol=1e-5)

# ---- convolution, pooling, resizing (onnxruntime is the oracle) ---------------------------------

AUTO_PAD = {"valid": "VALID", "same": "SAME_UPPER", "same_lower": "SAME_LOWER"}


def conv_case(id, x, w, bias=None, strides=None, pad_type="valid", pad=None, dil=None, groups=1,
              atol=1e-5):
    nd = x.ndim - 2
    strides, dil = strides or [1] * nd, dil or [1] * nd
    kw = {"weight": w, "strides": strides, "pad_type": pad_type, "dilations": dil,
          "groups": groups, **({"bias": bias} if bias is not None else {}),
          **({"pad": pad} if pad is not None else {})}
    attrs = {"strides": strides, "dilations": dil, "group": groups}
    attrs.update({"pads": onnx_pads(pad)} if pad_type == "custom" else
                 {"auto_pad": AUTO_PAD[pad_type]})
    case(id, lambda v: mb.conv(x=v, **kw),
         lambda v: onnx_run("Conv", {"x": v, "w": w, "b": bias}, attrs), x, rtol=1e-4, atol=atol)


conv_case("conv_same", rand(1, 3, 9, 9), rand(4, 3, 3, 3), pad_type="same")
conv_case("conv_same_stride2", rand(1, 3, 10, 9), rand(4, 3, 4, 4), pad_type="same",
          strides=[2, 2])
conv_case("conv_same_lower", rand(1, 3, 10, 9), rand(4, 3, 4, 4), pad_type="same_lower",
          strides=[2, 2])
conv_case("conv_custom_dilated_groups", rand(2, 4, 11, 12), rand(6, 2, 3, 2), bias=rand(6),
          strides=[2, 1], pad_type="custom", pad=[1, 2, 0, 1], dil=[2, 3], groups=2)
conv_case("conv_depthwise", rand(1, 8, 7, 7), rand(8, 1, 3, 3), bias=rand(8), pad_type="custom",
          pad=[1, 1, 1, 1], groups=8)
conv_case("conv_depthwise_multiplier", rand(1, 4, 9, 8), rand(8, 1, 3, 2), strides=[2, 2],
          dil=[1, 2], groups=4)
conv_case("conv_depthwise_stride2_dilated", rand(2, 6, 13, 12), rand(6, 1, 3, 3), bias=rand(6),
          strides=[2, 2], pad_type="custom", pad=[2, 1, 1, 2], dil=[2, 2], groups=6)
conv_case("conv_pointwise_stride2", rand(1, 5, 9, 8), rand(7, 5, 1, 1), bias=rand(7),
          strides=[2, 2])
conv_case("conv1d", rand(2, 3, 17), rand(5, 3, 4), strides=[3], pad_type="custom", pad=[2, 1])
conv_case("conv3d", rand(1, 2, 5, 6, 7), rand(3, 2, 2, 3, 2), bias=rand(3), pad_type="same")
# >= 32 inputs, <= 48 outputs, stride 1: the shifted-GEMM path (`_conv_shifted`)
conv_case("conv_shifted_custom_pad", rand(2, 32, 9, 11), rand(16, 32, 3, 3), bias=rand(16),
          pad_type="custom", pad=[1, 0, 2, 1])
conv_case("conv_shifted_dilated_valid", rand(1, 40, 12, 10), rand(8, 40, 3, 2), dil=[2, 3])
conv_case("conv_shifted_same_wide", rand(1, 33, 5, 14), rand(48, 33, 1, 5), pad_type="same")
# 3x3, stride 1, >= 32 inputs, >= 48 outputs, >= 49 tiles of 4x4: Winograd F(4x4, 3x3). Its
# error scales with the terms summed, not with each output: ~5e-6 of the outputs' largest
# (~100 here; 5e-4 measured against float64), so the absolute tolerance is 1e-5 of that.
conv_case("conv_winograd_same", rand(1, 32, 28, 30), rand(48, 32, 3, 3), bias=rand(48),
          pad_type="same", atol=1e-3)
conv_case("conv_winograd_ragged_batch", rand(2, 40, 27, 31), rand(56, 40, 3, 3),
          pad_type="custom", pad=[0, 2, 1, 0], atol=1e-3)
ONNX_POOL = {"max_pool": "MaxPool", "avg_pool": "AveragePool", "l2_pool": "LpPool"}


def pool_case(id, op, x, kernel, strides, pad=None, ceil=False, exclude=None):
    kw = {"kernel_sizes": kernel, "strides": strides, "ceil_mode": ceil,
          "pad_type": "custom" if pad else "valid", **({"pad": pad} if pad else {})}
    attrs = {"kernel_shape": kernel, "strides": strides,
             "pads": onnx_pads(pad) if pad else [0] * 2 * len(kernel)}
    if op == "l2_pool":
        attrs["p"] = 2
    else:
        attrs["ceil_mode"] = int(ceil)
    if op == "avg_pool":
        kw["exclude_padding_from_average"] = exclude
        attrs["count_include_pad"] = int(not exclude)
    case(id, lambda v: getattr(mb, op)(x=v, **kw),
         lambda v: onnx_run(ONNX_POOL[op], {"x": v}, attrs), x)


pool_case("max_pool", "max_pool", rand(1, 3, 8, 8), [2, 2], [2, 2])
pool_case("max_pool_pad_ceil", "max_pool", rand(1, 3, 9, 8), [3, 3], [2, 2], [1, 1, 1, 1],
          ceil=True)
pool_case("avg_pool_exclude_pad", "avg_pool", rand(1, 3, 7, 8), [3, 3], [2, 2], [1, 1, 1, 1],
          exclude=True)
pool_case("avg_pool_include_pad", "avg_pool", rand(1, 3, 7, 8), [3, 2], [1, 2], [1, 1, 0, 0],
          exclude=False)
pool_case("avg_pool_ceil", "avg_pool", rand(1, 2, 8, 8), [3, 3], [2, 2], ceil=True, exclude=True)
pool_case("avg_pool_pad_ceil_include", "avg_pool", rand(1, 2, 8, 9), [3, 3], [2, 2],
          [1, 1, 1, 1], ceil=True, exclude=False)
pool_case("avg_pool1d", "avg_pool", rand(2, 3, 11), [4], [3], exclude=True)
pool_case("max_pool3d", "max_pool", rand(1, 2, 5, 6, 7), [2, 3, 2], [2, 2, 2])
pool_case("max_pool_batch_asymmetric", "max_pool", rand(2, 3, 9, 7), [3, 2], [2, 3],
          [0, 2, 1, 0])
pool_case("avg_pool_batch_wide", "avg_pool", rand(3, 2, 5, 11), [2, 4], [1, 1], [1, 0, 2, 1],
          exclude=True)
pool_case("l2_pool", "l2_pool", rand(1, 3, 8, 8), [2, 3], [2, 1], [0, 0, 1, 1])
case("avg_pool_same", lambda v: mb.avg_pool(x=v, kernel_sizes=[3, 3], strides=[2, 2],
                                            pad_type="same", exclude_padding_from_average=True),
     lambda v: onnx_run("AveragePool", {"x": v}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                  "auto_pad": "SAME_UPPER"}), rand(1, 2, 8, 9))


def onnx_resize(x, out_hw, coordinate_mode):
    sizes = np.array(list(x.shape[:2]) + list(out_hw), np.int64)
    return onnx_run("Resize", {"x": x, "roi": None, "scales": None, "sizes": sizes},
                    {"mode": "linear", "coordinate_transformation_mode": coordinate_mode})


IMG = rand(1, 2, 4, 5)
case("upsample_nearest", lambda v: mb.upsample_nearest_neighbor(x=v, scale_factor_height=2,
                                                                 scale_factor_width=3),
     lambda v: v.repeat(2, axis=2).repeat(3, axis=3), IMG)
for _align, _mode in ((True, "align_corners"), (False, "half_pixel")):
    case(f"upsample_bilinear_{_mode}", lambda v, al=_align: mb.upsample_bilinear(
        x=v, scale_factor_height=2.0, scale_factor_width=3.0, align_corners=al),
         lambda v, m=_mode: onnx_resize(v, (8, 15), m), IMG)
# resize_bilinear: the coremltools docs list each mode's grid for Xin=2, Xout=5; resizing
# the ramp [0, 1] samples that grid.
RESIZE_GRIDS = {
    "STRICT_ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0],
    "ALIGN_CORNERS": [0.0, 0.25, 0.5, 0.75, 1.0], "DEFAULT": [0.0, 0.4, 0.8, 1.0, 1.0],
    "OFFSET_CORNERS": [0.1, 0.3, 0.5, 0.7, 0.9], "UNALIGN_CORNERS": [0.0, 0.1, 0.5, 0.9, 1.0],
}
for _mode, _grid in RESIZE_GRIDS.items():
    case(f"resize_bilinear_{_mode.lower()}",
         lambda v, m=_mode: mb.resize_bilinear(x=v, target_size_height=1, target_size_width=5,
                                               sampling_mode=m),
         lambda v, g=_grid: np.array(g, np.float32).reshape(1, 1, 1, 5),
         np.array([0.0, 1.0], np.float32).reshape(1, 1, 1, 2))

# ---- shapes and data movement ---------------------------------------------------------------

IDX = np.array([[2, -1], [0, 1]], np.int32)
GA_IDX = RNG.integers(-4, 4, (2, 3, 2, 5)).astype(np.int32)
ND_IDX = np.array([[[1, 0], [0, 2]], [[1, -3], [0, -1]]], np.int32)
ND_BATCH_IDX = np.array([[[2], [1]], [[0], [0]]], np.int32)
case("reshape", lambda x: mb.reshape(x=x, shape=[0, -1, 1, 5]),
     lambda x: x.reshape(2, 12, 1, 5), X)
case("transpose", lambda x: mb.transpose(x=x, perm=[2, 0, 3, 1]),
     lambda x: x.transpose(2, 0, 3, 1), X)
case("squeeze_expand_dims", lambda x: (mb.squeeze(x=x, axes=[1]), mb.squeeze(x=x),
                                       mb.expand_dims(x=x, axes=[0, -1])),
     lambda x: [x[:, 0], x.reshape(2, 4), x.reshape(1, 2, 1, 4, 1)], rand(2, 1, 4))
case("gather", lambda x: (mb.gather(x=x, indices=IDX, axis=2),
                          mb.gather(x=x, indices=np.int32(-2))),
     lambda x: [np.take(x, IDX % 4, axis=2), x[-2]], X)
case("gather_batch_dims", lambda x: mb.gather(
    x=x, indices=np.array([[0, 2, 1], [3, 3, 0]], np.int32), axis=2, batch_dims=1),
     lambda x: np.stack([x[0][:, [0, 2, 1]], x[1][:, [3, 3, 0]]]), X)
case("gather_along_axis", lambda x: mb.gather_along_axis(x=x, indices=GA_IDX, axis=2),
     lambda x: np.take_along_axis(x, GA_IDX % 4, axis=2), X)
case("gather_nd", lambda x: (mb.gather_nd(x=x, indices=ND_IDX),
                             mb.gather_nd(x=x, indices=ND_BATCH_IDX, batch_dims=1)),
     lambda x: [x[ND_IDX[..., 0], ND_IDX[..., 1] % 3], np.stack([x[0][[2, 1]], x[1][[0, 0]]])],
     X)
case("concat", lambda x, y: (mb.concat(values=[x, y, x], axis=-1),
                             mb.concat(values=[x, y], axis=1, interleave=True),
                             mb.concat(values=[x], axis=0)),
     lambda x, y: [np.concatenate([x, y, x], -1), np.stack([x, y], 2).reshape(2, 6, 4, 5), x],
     X, Y)
case("stack_reverse", lambda x, y: (mb.stack(values=[x, y], axis=1), mb.reverse(x=x, axes=[1, 3])),
     lambda x, y: [np.stack([x, y], 1), x[:, ::-1, :, ::-1]], X, Y)
case("split", lambda x: (*mb.split(x=x, num_splits=2, axis=2),
                         *mb.split(x=x, split_sizes=[1, 3, 1], axis=-1)),
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
case("fill", lambda x: mb.add(x=x, y=mb.fill(shape=[2, 3], value=1.5)), lambda x: x + 1.5,
     rand(2, 3))
case("range_1d", lambda x: mb.add(x=mb.range_1d(start=1.0, end=4.0, step=0.5), y=x),
     lambda x: np.arange(1.0, 4.0, 0.5) + x, rand(6))
for _mode, _np_mode in {"constant": "constant", "reflect": "reflect", "replicate": "edge"}.items():
    case(f"pad_{_mode}", lambda x, m=_mode: mb.pad(x=x, pad=[1, 2, 2, 1], mode=m,
                                                   constant_val=0.5),
         lambda x, m=_np_mode: np.pad(x, [(0, 0), (0, 0), (1, 2), (2, 1)], mode=m,
                                      **({"constant_values": 0.5} if m == "constant" else {})),
         X)
case("shape", lambda x: mb.shape(x=x), lambda x: np.array(x.shape, np.int32), X)
case("topk", lambda x: (*mb.topk(x=x, k=3, axis=-1), *mb.topk(x=x, k=2, axis=1, ascending=True)),
     lambda x: [-np.sort(-x, -1)[..., :3], np.argsort(-x, -1)[..., :3],
                np.sort(x, 1)[:, :2], np.argsort(x, 1)[:, :2]], X)
case("argsort", lambda x: (mb.argsort(x=x, axis=-1), mb.argsort(x=x, axis=0, ascending=True)),
     lambda x: [np.argsort(-x, -1), np.argsort(x, 0)], X)
case("cumsum", lambda x: (mb.cumsum(x=x, axis=1),
                          mb.cumsum(x=x, axis=-1, exclusive=True, reverse=True)),
     lambda x: [np.cumsum(x, 1), np.flip(np.cumsum(np.flip(x, -1), -1), -1) - x], X, atol=1e-5)
case("band_part", lambda x: (mb.band_part(x=x, lower=1, upper=0),
                             mb.band_part(x=x, lower=-1, upper=2)),
     lambda x: [np.tril(np.triu(x, -1), 0), x - np.triu(x, 3)], rand(2, 5, 6))

# ---- priority B: conv_transpose, lstm, cond, compressed constants -----------------------------


def conv_transpose_case(id, x, w, strides, pad, groups=1, dil=None, bias=None):
    dil = dil or [1] * (x.ndim - 2)
    kw = {"weight": w, "strides": strides, "pad_type": "custom", "pad": pad, "groups": groups,
          "dilations": dil, **({"bias": bias} if bias is not None else {})}
    attrs = {"strides": strides, "pads": onnx_pads(pad), "group": groups, "dilations": dil}
    case(id, lambda v: mb.conv_transpose(x=v, **kw),
         lambda v: onnx_run("ConvTranspose", {"x": v, "w": w, "b": bias}, attrs), x,
         rtol=1e-4, atol=1e-5)


conv_transpose_case("conv_transpose", rand(1, 4, 5, 6), rand(4, 3, 3, 3), [2, 2], [1, 1, 0, 1],
                    bias=rand(3))
conv_transpose_case("conv_transpose_groups", rand(2, 4, 5, 4), rand(4, 2, 2, 3), [1, 2],
                    [0, 0, 1, 1], groups=2, dil=[2, 1])
conv_transpose_case("conv_transpose1d", rand(1, 3, 7), rand(3, 2, 4), [3], [1, 2])
W_CT = rand(4, 3, 3, 3)
case("conv_transpose_same", lambda v: mb.conv_transpose(x=v, weight=W_CT, strides=[3, 2],
                                                        pad_type="same"),
     lambda v: onnx_run("ConvTranspose", {"x": v, "w": W_CT},
                        {"strides": [3, 2], "auto_pad": "SAME_UPPER"}), rand(1, 4, 5, 6),
     rtol=1e-4, atol=1e-5)
HID, T, BATCH = 4, 5, 2
# ONNX stacks LSTM gates as i, o, f, c; MIL as i, f, o, z (z = cell).
IFOZ = np.concatenate([np.arange(HID), np.arange(2 * HID, 3 * HID), np.arange(HID, 2 * HID),
                       np.arange(3 * HID, 4 * HID)])


def lstm_case(direction):
    d = 2 if direction == "bidirectional" else 1
    w, r, bias = rand(d, 4 * HID, 3), rand(d, 4 * HID, HID), rand(d, 8 * HID)
    h0, c0 = rand(d, BATCH, HID), rand(d, BATCH, HID)
    kw = {"direction": direction, "output_sequence": True}
    for i, suffix in enumerate(["", "_back"][:d]):
        kw.update({"weight_ih" + suffix: w[i][IFOZ], "weight_hh" + suffix: r[i][IFOZ],
                   "bias" + suffix: (bias[i, :4 * HID] + bias[i, 4 * HID:])[IFOZ]})

    def to_mil(state):  # [D, B, H] -> [B, D * H]
        return state.transpose(1, 0, 2).reshape(BATCH, d * HID)

    def expect(x):
        y, yh, yc = onnx_run("LSTM", {"x": x, "w": w, "r": r, "b": bias, "seq": None, "h0": h0,
                                      "c0": c0}, {"hidden_size": HID, "direction": direction},
                             n_out=3)
        y = y.transpose(0, 2, 1, 3).reshape(T, BATCH, d * HID)
        # MIL's "reverse" lstm returns its sequence in processing order, last step first
        # (coremltools' own lstm/gru/rnn op tests expect that); ONNX's Y is in time order
        return [y[::-1] if direction == "reverse" else y, to_mil(yh), to_mil(yc)]

    case(f"lstm_{direction}", lambda x: mb.lstm(x=x, initial_h=to_mil(h0), initial_c=to_mil(c0),
                                                **kw),
         expect, rand(T, BATCH, 3), rtol=1e-4, atol=1e-5)


for _direction in ("forward", "reverse", "bidirectional"):
    lstm_case(_direction)


def cond_program(x):
    return mb.cond(pred=mb.greater(x=mb.reduce_sum(x=x), y=0.0),
                   _true_fn=lambda: mb.mul(x=x, y=2.0), _false_fn=lambda: mb.sub(x=x, y=1.0))


case("cond_true", cond_program, lambda x: x * 2, np.abs(X))
case("cond_false", cond_program, lambda x: x - 1, -np.abs(X))


def weight_case(id, weight, expected_weight, target=iOS16):
    """x @ weight, where `weight` builds a (compressed) constant."""
    case(id, lambda x: mb.matmul(x=x, y=weight()), lambda x: x @ expected_weight, rand(3, 6),
         target=target, rtol=1e-4)


QDATA, QZERO = RNG.integers(0, 255, (6, 5)).astype(np.uint8), np.arange(6, dtype=np.uint8)
QSCALE = rand(6, low=0.1, high=1)
weight_case("constexpr_affine_dequantize", lambda: mb.constexpr_affine_dequantize(
    quantized_data=QDATA, zero_point=QZERO, scale=QSCALE, axis=0),
    (QDATA.astype(np.float32) - QZERO[:, None]) * QSCALE[:, None])
Q8 = RNG.integers(-128, 128, (6, 1)).astype(np.int8)  # 6 values: an immediate, not a blob
weight_case("constexpr_affine_dequantize_int8", lambda: mb.constexpr_affine_dequantize(
    quantized_data=Q8, zero_point=np.int8(-3), scale=np.float32(0.5), axis=1),
    (Q8.astype(np.float32) + 3) * 0.5)
LUT16, LUT_IDX = rand(16), RNG.integers(0, 16, (6, 5))
LUT_BITS = ((LUT_IDX.ravel()[:, None] >> np.arange(4)) & 1).astype(np.uint8)
weight_case("constexpr_lut_to_dense_ios16", lambda: mb.constexpr_lut_to_dense(
    indices=np.packbits(LUT_BITS.ravel(), bitorder="little"), lut=LUT16,
    shape=np.array([6, 5], np.uint32)), LUT16[LUT_IDX])
LUT18 = rand(2, 1, 16, 1)  # two lookup tables, one per half of the rows
weight_case("constexpr_lut_to_dense_ios18", lambda: mb.constexpr_lut_to_dense(
    indices=LUT_IDX.astype(types.np_uint4_dtype), lut=LUT18),
    np.concatenate([LUT18[0, 0, LUT_IDX[:3], 0], LUT18[1, 0, LUT_IDX[3:], 0]]), target=iOS18)
SMALL_IDX, SMALL_LUT = RNG.integers(0, 4, (6, 1)), rand(1, 1, 4, 1)  # uint2 immediate bytes
weight_case("constexpr_lut_to_dense_immediate", lambda: mb.constexpr_lut_to_dense(
    indices=SMALL_IDX.astype(types.np_uint2_dtype), lut=SMALL_LUT),
    SMALL_LUT[0, 0, SMALL_IDX, 0], target=iOS18)
VEC_IDX, VEC_LUT = RNG.integers(0, 2, (2, 5)), rand(1, 1, 2, 3)
weight_case("constexpr_lut_to_dense_vector", lambda: mb.constexpr_lut_to_dense(
    indices=VEC_IDX.astype(types.np_uint1_dtype), lut=VEC_LUT, vector_axis=0),
    VEC_LUT[0, 0][VEC_IDX].transpose(0, 2, 1).reshape(6, 5), target=iOS18)
INT4, BS_SCALE = RNG.integers(-8, 8, (6, 8)), rand(3, 2, low=0.1, high=1)
BS_OFFSET = RNG.integers(-8, 8, (3, 2))


def blocks(v):  # per-block parameter [3, 2] -> per-element [6, 8]
    return v.repeat(2, 0).repeat(4, 1)


case("constexpr_blockwise_shift_scale", lambda x: mb.matmul(
    x=x, y=mb.constexpr_blockwise_shift_scale(data=INT4.astype(types.np_int4_dtype),
                                              scale=BS_SCALE,
                                              offset=BS_OFFSET.astype(types.np_int4_dtype))),
     lambda x: x @ ((INT4 - blocks(BS_OFFSET)) * blocks(BS_SCALE)), rand(3, 6), target=iOS18,
     rtol=1e-4)
F16_W = rand(6, 5).astype(np.float16)
weight_case("constexpr_cast", lambda: mb.constexpr_cast(source_val=F16_W, output_dtype="fp32"),
            F16_W.astype(np.float32))


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_op_matches_oracle(c, tmp_path):
    program = ReferenceProgram(save_program(c.build, c.feeds, c.target, tmp_path))
    got = program.run(dict(zip("abc", c.feeds)))
    expected = c.expect(*c.feeds)
    expected = expected if isinstance(expected, list) else [expected]
    assert len(got) == len(expected)
    for t, want in zip(program.outputs, expected):
        want = np.asarray(want)
        assert got[t.name].shape == want.shape, t.name
        assert got[t.name].dtype == (np.int32 if want.dtype.kind in "iu" else np.float32), t.name
        np.testing.assert_allclose(got[t.name], want, rtol=c.rtol, atol=c.atol, err_msg=t.name)


# ---- fp16 programs: cast in, op, cast out ------------------------------------------------------

def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


W_F16 = rand(8, 3, 3, 3)
FP16_CASES = {
    "conv": (lambda h: mb.conv(x=h, weight=W_F16.astype(np.float16), pad_type="same"),
             lambda x: onnx_run("Conv", {"x": x, "w": W_F16}, {"auto_pad": "SAME_UPPER"}),
             rand(1, 3, 8, 8)),
    "matmul": (lambda h: mb.matmul(x=h, y=W_LIN.T.astype(np.float16)), lambda x: x @ W_LIN.T, X),
    "linear": (lambda h: mb.linear(x=h, weight=W_LIN.astype(np.float16),
                                   bias=B_LIN.astype(np.float16)),
               lambda x: x @ W_LIN.T + B_LIN, rand(3, 70, 5)),
    "softmax": (lambda h: mb.softmax(x=h, axis=-1), lambda x: softmax(x, -1), X),
    "layer_norm": (lambda h: mb.layer_norm(x=h, axes=[-1]), lambda x: (
        x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5), X),
    "gelu": (lambda h: mb.gelu(x=h), lambda x: 0.5 * x * (1 + erf(x / 2**0.5)), X),
    "avg_pool": (lambda h: mb.avg_pool(x=h, kernel_sizes=[2, 2], strides=[2, 2],
                                       pad_type="valid"),
                 lambda x: x.reshape(2, 3, 2, 2, 2, 2).mean((3, 5)), rand(2, 3, 4, 4)),
    "reduce_sum": (lambda h: mb.reduce_sum(x=h, axes=[1, 2]), lambda x: x.sum((1, 2)), X),
}


@pytest.mark.parametrize("name", sorted(FP16_CASES))
def test_fp16_program_close_to_fp32(name, tmp_path):
    build, expect, x = FP16_CASES[name]
    path = save_program(lambda v: as_f32(build(mb.cast(x=v, dtype="fp16"))), [x], iOS16, tmp_path)
    (out,) = ReferenceProgram(path).run({"a": x}).values()
    want = expect(x)
    assert out.shape == want.shape and out.dtype == np.float32
    assert cosine(out, want) >= 0.999


def test_fp16_rounds_after_every_op(tmp_path):
    # In fp16, 1 + 2**-12 rounds back to 1: adding it twice leaves exactly 1 if each add rounds.
    x, tiny = np.ones((1, 4), np.float32), np.float16(2.0**-12)
    path = save_program(lambda v: as_f32(mb.add(x=mb.add(x=mb.cast(x=v, dtype="fp16"), y=tiny),
                                                y=tiny)), [x], iOS16, tmp_path)
    (out,) = ReferenceProgram(path).run({"a": x}).values()
    np.testing.assert_array_equal(out, x)


def fp16_edge_values():
    """Every kind of float32 the fp16 rounding treats apart, and random bit patterns."""
    f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    exact = f16.astype(np.float32)
    bits = exact.view(np.uint32)
    steps = (np.uint32(1 << 12), np.uint32(1), np.uint32(2**32 - 1), np.uint32((1 << 12) - 1))
    # bits + 2**12: ties between neighbouring fp16 values; the others just off them.
    near = np.concatenate([(bits + d).view(np.float32) for d in steps])
    special = np.array([0.0, -0.0, 65504, 65519.996, 65520, -65520, 1e30, -1e30, 2.0**-25,
                        -(2.0**-25), 2.0**-25 * 1.0000001, 2.0**-26, 2.0**-14, 1e-45, np.inf,
                        -np.inf, np.nan], np.float32)
    noise = RNG.integers(0, 2**32, 2**16, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([exact, near, special, noise])


def test_round_to_fp16_matches_numpy_bit_for_bit():
    x = fp16_edge_values()
    # specials only in a later block (the -0 and overflow mending is found per block)
    tail = np.concatenate([RNG.standard_normal(300_000).astype(np.float32), x])
    with np.errstate(all="ignore"):
        want = x.astype(np.float16).astype(np.float32)
        cases = {"blocks": (round_to_fp16(tail)[-x.size:], want),
                 "copy": (round_to_fp16(x), want),
                 "in place": (round_to_fp16(x.copy(), in_place=True), want),
                 "strided": (round_to_fp16(x[::3]), want[::3]),
                 "small": (round_to_fp16(x[:1000]), want[:1000])}
    for name, (got, w) in cases.items():
        same = (got.view(np.uint32) == w.view(np.uint32)) | (np.isnan(got) & np.isnan(w))
        assert same.all(), (name, x[:got.size][~same][:5])


def test_fp16_chain_rounds_like_numpy(tmp_path):
    # Big enough for the executor's fast rounding; values from fp16 subnormals to overflow.
    x = (RNG.standard_normal((64, 160)) * 10.0 ** RNG.uniform(-7, 5, (64, 160))).astype(np.float32)
    c, d = np.float16(1.37), np.float16(-0.011)
    path = save_program(lambda v: as_f32(mb.relu(x=mb.add(
        x=mb.mul(x=mb.cast(x=v, dtype="fp16"), y=c), y=d))), [x], iOS16, tmp_path)
    (out,) = ReferenceProgram(path).run({"a": x}).values()
    f16, f32 = np.float16, np.float32
    with np.errstate(all="ignore"):
        want = (x.astype(f16).astype(f32) * f32(c)).astype(f16)
        want = np.maximum((want.astype(f32) + f32(d)).astype(f16), 0).astype(f32)
    np.testing.assert_array_equal(out, want)


# ---- blob storage reader and executor internals --------------------------------------------------

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
    offsets = [getattr(writer, write)(values.view(np.uint16) if kind == "fp16" else values)
               for kind, write, _, values in BLOB_KINDS]
    del writer  # closes and flushes the file
    theirs, ours = _BlobStorageReader(path), BlobFile(path)
    for (kind, _, read, values), offset in zip(BLOB_KINDS, offsets):
        expected = np.asarray(getattr(theirs, read)(offset))
        expected = expected.view(np.float16) if kind == "fp16" else expected
        got = ours.read(offset, kind, values.shape)
        np.testing.assert_array_equal(got, expected, err_msg=kind)
        np.testing.assert_array_equal(got, values, err_msg=kind)
        np.testing.assert_array_equal(ours.read_all(offset), values, err_msg=kind)


def test_weights_are_read_from_the_blob_file(tmp_path):
    w16, w8 = rand(4, 6).astype(np.float16), RNG.integers(0, 255, (6, 5)).astype(np.uint8)

    def build(v):
        weight = mb.constexpr_affine_dequantize(quantized_data=w8, zero_point=np.uint8(3),
                                                scale=np.float16(0.01), axis=0)
        return as_f32(mb.matmul(x=mb.matmul(x=mb.cast(x=v, dtype="fp16"), y=w16), y=weight))

    path = save_program(build, [rand(2, 4)], iOS16, tmp_path)
    assert os.path.getsize(os.path.join(path, WEIGHT_BIN)) > 64 + 2 * (64 + 24)
    program = ReferenceProgram(path)
    assert {"cast", "matmul", "constexpr_affine_dequantize"} <= program.op_types()
    x = rand(2, 4)
    (out,) = program.run({"a": x}).values()
    dequantized = (w8.astype(np.float32) - 3) * np.float32(np.float16(0.01))
    assert cosine(out, x @ w16.astype(np.float32) @ dequantized) >= 0.9999


def test_ops_on_constants_only_are_folded_at_load(tmp_path, monkeypatch):
    calls, real_fill = [], MIL_OPS["fill"]
    monkeypatch.setitem(MIL_OPS, "fill", lambda a, outs: calls.append(1) or real_fill(a, outs))
    path = save_program(lambda v: mb.add(x=v, y=mb.fill(shape=[2, 5], value=3.0)), [rand(2, 5)],
                        iOS16, tmp_path)
    program = ReferenceProgram(path)
    x = rand(2, 5)
    for _ in range(2):
        (out,) = program.run({"a": x}).values()
        np.testing.assert_array_equal(out, x + 3)
    assert "fill" in program.op_types() and len(calls) == 1


def test_intermediates_are_freed_after_their_last_reader(tmp_path, monkeypatch):
    path = save_program(lambda v: mb.sigmoid(x=mb.sigmoid(x=mb.sigmoid(x=mb.sigmoid(x=v)))),
                        [rand(64)], iOS16, tmp_path)
    program, real_sigmoid = ReferenceProgram(path), MIL_OPS["sigmoid"]
    made, alive_at_call = [], []

    def spy(a, outs):
        alive_at_call.append([ref() is not None for ref in made])
        out = real_sigmoid(a, outs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setitem(MIL_OPS, "sigmoid", spy)
    program.run({"a": rand(64)})
    # When sigmoid k runs, only sigmoid k-1's output (its input) may still be held.
    assert alive_at_call == [[], [True], [False, True], [False, False, True]]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_ops_overwrite_only_arrays_nobody_else_holds(tmp_path, monkeypatch, dtype):
    """relu and add write over their input where it is a dead intermediate the executor made,
    never over a feed, a constant, a value read later, or a view of one."""
    from applec.runtime import mil_ops
    c = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)

    def build(v):
        v, c_ = (mb.cast(x=v, dtype=dtype), c.astype(np.float16)) if dtype == "fp16" else (v, c)
        fed = mb.relu(x=v)                     # a feed: never overwritten
        made = mb.sub(x=fed, y=c_)             # dies at the relu below: overwritten
        twice = mb.relu(x=made)
        kept = mb.add(x=twice, y=c_)           # `twice` is read again below: not overwritten
        view = mb.reshape(x=kept, shape=[12])  # a view of `kept`, which is read again
        flat = mb.relu(x=view)
        total = mb.add(x=mb.reshape(x=flat, shape=[3, 4]), y=mb.mul(x=twice, y=kept))
        return mb.cast(x=total, dtype="fp32") if dtype == "fp16" else total

    path = save_program(build, [rand(3, 4)], iOS16, tmp_path)
    program = ReferenceProgram(path)
    used = []
    for name in ("relu", "add", "sub", "mul"):
        params, fn = mil_ops.IN_PLACE[name]
        monkeypatch.setitem(mil_ops.IN_PLACE, name, (params, lambda a, p, fn=fn, name=name:
                                                     used.append((name, p)) or fn(a, p)))
    x = rand(3, 4)
    before = x.copy()
    (out,) = program.run({"a": x}).values()
    np.testing.assert_array_equal(x, before)
    q = (lambda t: t.astype(np.float16).astype(np.float32)) if dtype == "fp16" else (lambda t: t)
    fed, cq = np.maximum(q(x), 0), q(c)
    twice = np.maximum(q(fed - cq), 0)
    kept = q(twice + cq)
    want = q(np.maximum(kept, 0) + q(twice * kept))
    np.testing.assert_array_equal(out, want)
    # sub over `fed` (a relu's result), the relu over `made`, mul over `twice` or `kept` (both
    # die there), the last add over the product; in fp16 the first relu over the feed's cast
    assert [name for name, _ in used] == ["relu"] * (dtype == "fp16") + [
        "sub", "relu", "mul", "add"]
    assert used[-1] == ("add", "y") and ("sub", "x") in used


# ---- errors -------------------------------------------------------------------------------------

WEIGHT_BIN = "Data/com.apple.CoreML/weights/weight.bin"


@pytest.fixture(scope="module")
def weighted_package(tmp_path_factory):
    directory = tmp_path_factory.mktemp("weighted")
    return save_program(lambda v: mb.linear(x=v, weight=W_LIN), [rand(2, 5)], iOS16, directory)


@pytest.fixture
def package_copy(weighted_package, tmp_path):
    return shutil.copytree(weighted_package, str(tmp_path / "copy.mlpackage"))


def test_missing_weight_file_is_a_bundle_error(package_copy):
    os.remove(os.path.join(package_copy, WEIGHT_BIN))
    with pytest.raises(BundleError, match="weight.bin"):
        ReferenceProgram(package_copy)


def test_bad_sentinel_is_a_bundle_error(package_copy):
    with open(os.path.join(package_copy, WEIGHT_BIN), "r+b") as f:
        f.seek(64)
        f.write(struct.pack("<I", 0x12345678))
    with pytest.raises(BundleError, match="weight.bin: bad blob sentinel 0x12345678"):
        ReferenceProgram(package_copy)


def test_blob_past_the_end_is_a_bundle_error(package_copy):
    with open(os.path.join(package_copy, WEIGHT_BIN), "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="weight.bin: blob offset 64 is past the end"):
        ReferenceProgram(package_copy)


def test_corrupt_spec_and_missing_manifest_are_bundle_errors(package_copy):
    with open(os.path.join(package_copy, "Data/com.apple.CoreML/model.mlmodel"), "wb") as f:
        f.write(b"\xff\x00 not a protobuf")
    with pytest.raises(BundleError, match="model.mlmodel: corrupt model spec"):
        ReferenceProgram(package_copy)
    os.remove(os.path.join(package_copy, "Manifest.json"))
    with pytest.raises(BundleError, match="Manifest.json: missing"):
        ReferenceProgram(package_copy)


@pytest.mark.parametrize("feeds, message", [
    ({"a": np.zeros((2, 5), np.float32), "b": np.zeros(1, np.float32)}, "unknown input 'b'"),
    ({}, "missing input 'a'"),
    ({"a": np.zeros((2, 4), np.float32)}, r"input 'a': shape \[2, 4\], expected \[2, 5\]"),
    ({"a": np.zeros((2, 5), np.float64)}, "input 'a': dtype float64, expected float32"),
])
def test_bad_feeds_are_input_errors(weighted_package, feeds, message):
    with pytest.raises(InputError, match=message):
        ReferenceProgram(weighted_package).run(feeds)


def test_unknown_op_type_is_a_bundle_error(tmp_path):
    path = save_program(lambda v: mb.space_to_depth(x=v, block_size=2, name="s2d"),
                        [rand(1, 2, 4, 4)], iOS16, tmp_path)
    with pytest.raises(BundleError, match="'space_to_depth' .*'s2d'"):
        ReferenceProgram(path)


def test_every_lowered_op_has_a_reference():
    assert [op for op in EMITTED_BY_LOWERING if op not in MIL_OPS] == []


def test_winograd_blocks_and_weight_cache():
    """Blocks of tile rows (a last, shorter one too) give the direct convolution's numbers;
    the transformed weight is kept while a read-only weight lives, never for a writable one."""
    import gc

    from applec.runtime import mil_ops, winograd
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32, 27, 25)).astype(np.float32)  # 7 x 7 tiles of 4 x 4
    w = rng.standard_normal((48, 32, 3, 3)).astype(np.float32)
    pads = [(1, 1), (0, 2)]
    want = mil_ops._conv_matmul(mil_ops._pad_spatial(x, pads).astype(np.float64),
                                w.astype(np.float64), 1, [1, 1], [1, 1])
    for budget in (1 << 18, 36 * 48 * 7 * 2):  # one block of 7 tile rows; blocks of 2, 2, 2, 1
        got = winograd.conv3x3(x, w, pads, mil_ops.scratch, budget=budget)
        assert got.shape == want.shape and got.flags.c_contiguous
        assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert id(w) not in winograd._WEIGHTS  # writable: it may change between runs
    w.flags.writeable = False
    first = winograd.transformed_weight(w)
    assert winograd.transformed_weight(w) is first and id(w) in winograd._WEIGHTS
    key = id(w)
    del w, first
    gc.collect()
    assert key not in winograd._WEIGHTS
