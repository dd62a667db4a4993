"""One table of single-op test cases, shared by every per-op test.

Each `OpCase` is one ONNX node: its op type, attributes in applec's IR form (`Cast.to` as
a numpy dtype, tensor attributes as numpy arrays), its inputs and its opset. An input is
- `In(shape, dtype, kind)`: generated data; a graph input, or an initializer if `const`;
- a numpy array: a constant, always an initializer (shapes, axes, pads, k...);
- None: an omitted optional input.

`make_model(case)` builds the ONNX model (output types from ONNX shape inference),
`make_inputs(case, seed)` its run-time feeds and `constants(case)` its initializers, so a
test can run the same case through onnxruntime, the numpy references or the compiler.
Tensors stay small (< 100k elements). `fp16_ok` is False where float16 makes no sense
(integer and bool ops); `as_float16(case)` gives the float16 variant of the others.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

IR_VERSION = 10  # accepted by every onnxruntime we support, enough for opset 21


@dataclass(frozen=True)
class In:
    """A generated input. `kind`: normal, uniform (-1..1), positive (0.5..2), bool,
    distinct (a shuffled grid without ties), "ints LO..HI", "nonzero LO..HI"."""

    shape: tuple[int, ...]
    dtype: str = "float32"
    kind: str = "normal"
    const: bool = False


@dataclass(frozen=True)
class OpCase:
    id: str
    op_type: str
    attrs: dict[str, Any]
    inputs: tuple[In | np.ndarray | None, ...]
    opset: int = 17
    outputs: int = 1
    fp16_ok: bool = True
    rtol: float = 1e-5
    atol: float = 1e-6


def x(*shape, kind="normal", dtype="float32") -> In:
    return In(tuple(shape), dtype, kind)


def w(*shape, kind="normal", dtype="float32") -> In:
    """A generated constant (weights): an initializer, not a graph input."""
    return In(tuple(shape), dtype, kind, const=True)


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def scalar(value, dtype) -> np.ndarray:
    return np.array(value, dtype)


def case(id, op_type, inputs, attrs=None, **options) -> OpCase:
    return OpCase(id, op_type, dict(attrs or {}), tuple(inputs), **options)


BIG = np.iinfo(np.int64).max

# -- the table ---------------------------------------------------------------------------
UNARY_FLOAT = [
    ("Relu", "normal"), ("Sigmoid", "normal"), ("Tanh", "normal"), ("Erf", "normal"),
    ("Sqrt", "positive"), ("Exp", "normal"), ("Log", "positive"), ("Neg", "normal"),
    ("Abs", "normal"), ("Reciprocal", "positive"), ("Floor", "normal"), ("Ceil", "normal"),
    ("Sign", "normal"), ("Sin", "normal"), ("Cos", "normal"), ("Softplus", "normal"),
    ("HardSwish", "normal"), ("HardSigmoid", "normal"), ("LeakyRelu", "normal"),
    ("Elu", "normal"), ("Identity", "normal"),
]

ELEMENTWISE = [case(op.lower(), op, [x(2, 3, 4, kind=kind)]) for op, kind in UNARY_FLOAT] + [
    case("neg_int32", "Neg", [x(3, 4, kind="ints -9..9", dtype="int32")], fp16_ok=False),
    case("abs_int64", "Abs", [x(3, 4, kind="ints -9..9", dtype="int64")], fp16_ok=False),
    case("sign_int32", "Sign", [x(3, 4, kind="ints -3..3", dtype="int32")], fp16_ok=False),
    case("relu_4d", "Relu", [x(2, 3, 5, 5)]),
    case("hardsigmoid_attrs", "HardSigmoid", [x(2, 3, 4)], {"alpha": 0.3, "beta": 0.4}),
    case("leakyrelu_alpha", "LeakyRelu", [x(2, 3, 4)], {"alpha": 0.2}),
    case("elu_alpha", "Elu", [x(2, 3, 4)], {"alpha": 0.5}),
    case("gelu", "Gelu", [x(2, 3, 8)], opset=20),
    case("gelu_tanh", "Gelu", [x(2, 3, 8)], {"approximate": "tanh"}, opset=20),
    case("not", "Not", [x(3, 4, kind="bool", dtype="bool")], fp16_ok=False),
    case("identity_int64", "Identity", [x(5, kind="ints 0..9", dtype="int64")], fp16_ok=False),
    case("dropout", "Dropout", [x(2, 3, 4)]),
    case("dropout_mask", "Dropout", [x(2, 3, 4)], outputs=2),
    case("clip", "Clip", [x(2, 3, 4), scalar(-0.5, np.float32), scalar(0.7, np.float32)]),
    case("clip_min_only", "Clip", [x(2, 3, 4), scalar(0.0, np.float32)]),
    case("clip_max_only", "Clip", [x(2, 3, 4), None, scalar(6.0, np.float32)]),
    case("clip_no_bounds", "Clip", [x(2, 3, 4)]),
    case("clip_int32", "Clip", [x(3, 4, kind="ints -9..9", dtype="int32"),
                                scalar(-3, np.int32), scalar(5, np.int32)], fp16_ok=False),
    # binary arithmetic, with broadcasting
    case("add", "Add", [x(2, 3, 4), x(2, 3, 4)]),
    case("add_broadcast", "Add", [x(3, 1, 5), x(4, 1)]),
    case("add_scalar", "Add", [x(2, 3), x()]),
    case("add_const", "Add", [x(2, 3, 4), w(4)]),
    case("add_int64", "Add", [x(3, 4, kind="ints -9..9", dtype="int64"),
                              x(4, kind="ints -9..9", dtype="int64")], fp16_ok=False),
    case("sub_broadcast", "Sub", [x(4, 1), x(2, 1, 3)]),
    case("mul_broadcast", "Mul", [x(2, 3, 4, 5), x(3, 1, 1)]),
    case("div", "Div", [x(2, 3, 4), x(2, 3, 4, kind="positive")]),
    case("div_broadcast", "Div", [x(2, 3, 4), x(4, kind="positive")]),
    case("div_int32", "Div", [x(3, 8, kind="ints -20..20", dtype="int32"),
                              x(3, 8, kind="nonzero -5..5", dtype="int32")], fp16_ok=False),
    case("div_int64", "Div", [x(12, kind="ints -50..50", dtype="int64"),
                              x(12, kind="nonzero -7..7", dtype="int64")], fp16_ok=False),
    case("pow", "Pow", [x(2, 3, 4, kind="positive"), x(2, 3, 4)]),
    case("pow_square", "Pow", [x(2, 3, 4), scalar(2.0, np.float32)]),
    case("pow_int_exponent", "Pow", [x(2, 3, 4), i64(3)]),
    case("pow_int32_negative_exponent", "Pow", [x(3, 4, kind="nonzero -3..3", dtype="int32"),
                                                x(3, 4, kind="ints -2..2", dtype="int64")],
         fp16_ok=False),
    case("pow_int32", "Pow", [x(3, 4, kind="ints -4..4", dtype="int32"),
                              x(3, 4, kind="ints 0..3", dtype="int32")], fp16_ok=False),
    case("mod_int32", "Mod", [x(3, 8, kind="ints -20..20", dtype="int32"),
                              x(3, 8, kind="nonzero -5..5", dtype="int32")], fp16_ok=False),
    case("mod_fmod_int64", "Mod", [x(3, 8, kind="ints -20..20", dtype="int64"),
                                   x(3, 8, kind="nonzero -5..5", dtype="int64")],
         {"fmod": 1}, fp16_ok=False),
    case("mod_fmod_float", "Mod", [x(2, 3, 4), x(2, 3, 4, kind="positive")], {"fmod": 1}),
    # variadic
    case("max_variadic", "Max", [x(2, 3, 4), x(3, 1), x(4)]),
    case("min_pair", "Min", [x(2, 3, 4), x(2, 3, 4)]),
    case("max_int32", "Max", [x(3, 4, kind="ints -9..9", dtype="int32"),
                              x(4, kind="ints -9..9", dtype="int32")], fp16_ok=False),
    case("sum_variadic", "Sum", [x(2, 3, 4), x(3, 4), x(1, 4)]),
    case("sum_single", "Sum", [x(2, 3)]),
    case("mean_variadic", "Mean", [x(2, 3, 4), x(2, 3, 4), x(4)]),
    # comparisons use small integers (as floats) so equality happens
    case("equal_int64", "Equal", [x(3, 4, kind="ints 0..3", dtype="int64"),
                                  x(4, kind="ints 0..3", dtype="int64")], fp16_ok=False),
    case("equal_float", "Equal", [x(3, 4, kind="ints 0..3"), x(3, 4, kind="ints 0..3")]),
    case("less", "Less", [x(2, 3, 4), x(2, 3, 4)]),
    case("less_or_equal", "LessOrEqual", [x(3, 4, kind="ints 0..3"), x(4, kind="ints 0..3")]),
    case("greater_broadcast", "Greater", [x(2, 3, 4), x(3, 1)]),
    case("greater_or_equal", "GreaterOrEqual",
         [x(3, 4, kind="ints 0..3"), x(3, 4, kind="ints 0..3")]),
    case("and", "And", [x(3, 4, kind="bool", dtype="bool"), x(4, kind="bool", dtype="bool")],
         fp16_ok=False),
    case("or", "Or", [x(3, 4, kind="bool", dtype="bool"), x(3, 4, kind="bool", dtype="bool")],
         fp16_ok=False),
    case("xor", "Xor", [x(2, 3, 4, kind="bool", dtype="bool"),
                        x(3, 1, kind="bool", dtype="bool")], fp16_ok=False),
    case("where", "Where", [x(2, 3, 4, kind="bool", dtype="bool"), x(2, 3, 4), x(2, 3, 4)]),
    case("where_broadcast", "Where", [x(3, 1, kind="bool", dtype="bool"), x(2, 3, 4), x(4)]),
]

CONV = [
    case("conv2d", "Conv", [x(1, 3, 8, 8), w(4, 3, 3, 3), w(4)]),
    case("conv2d_pads_strides", "Conv", [x(2, 3, 9, 9), w(5, 3, 3, 3), w(5)],
         {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
    case("conv2d_asymmetric_pads", "Conv", [x(1, 2, 7, 6), w(3, 2, 3, 2)],
         {"pads": [0, 1, 2, 1]}),
    case("conv2d_dilation", "Conv", [x(1, 3, 10, 10), w(4, 3, 3, 3), w(4)],
         {"dilations": [2, 2], "pads": [2, 2, 2, 2]}),
    case("conv2d_dilation_stride", "Conv", [x(1, 2, 11, 9), w(3, 2, 3, 3)],
         {"dilations": [2, 1], "strides": [2, 3], "kernel_shape": [3, 3]}),
    case("conv2d_grouped", "Conv", [x(1, 4, 6, 6), w(6, 2, 3, 3), w(6)], {"group": 2}),
    case("conv2d_depthwise", "Conv", [x(1, 4, 7, 7), w(4, 1, 3, 3), w(4)],
         {"group": 4, "pads": [1, 1, 1, 1]}),
    case("conv2d_depthwise_multiplier", "Conv", [x(2, 3, 6, 6), w(6, 1, 3, 3)],
         {"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    case("conv2d_pointwise", "Conv", [x(2, 8, 5, 5), w(4, 8, 1, 1)]),
    case("conv2d_same_upper", "Conv", [x(1, 2, 7, 7), w(3, 2, 4, 4)], {"auto_pad": "SAME_UPPER"}),
    case("conv2d_same_lower", "Conv", [x(1, 2, 7, 7), w(3, 2, 4, 4)], {"auto_pad": "SAME_LOWER"}),
    case("conv2d_same_upper_stride", "Conv", [x(1, 2, 8, 7), w(3, 2, 3, 3), w(3)],
         {"auto_pad": "SAME_UPPER", "strides": [2, 2]}),
    case("conv2d_valid", "Conv", [x(1, 2, 8, 7), w(3, 2, 3, 3)],
         {"auto_pad": "VALID", "strides": [2, 2]}),
    case("conv1d", "Conv", [x(2, 3, 10), w(4, 3, 3), w(4)], {"pads": [1, 1], "strides": [2]}),
    case("conv3d", "Conv", [x(1, 2, 5, 5, 5), w(3, 2, 3, 3, 3), w(3)],
         {"pads": [1, 1, 1, 1, 1, 1]}),
    case("conv_transpose2d", "ConvTranspose", [x(1, 4, 5, 5), w(4, 3, 3, 3), w(3)]),
    case("conv_transpose2d_stride", "ConvTranspose", [x(1, 4, 5, 5), w(4, 3, 3, 3)],
         {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}),
    case("conv_transpose2d_grouped", "ConvTranspose", [x(1, 4, 4, 4), w(4, 2, 3, 3), w(4)],
         {"group": 2, "strides": [2, 2]}),
    case("conv_transpose2d_output_shape", "ConvTranspose", [x(1, 2, 4, 5), w(2, 3, 3, 3)],
         {"strides": [2, 2], "output_shape": [8, 10]}),
    case("conv_transpose2d_same_upper", "ConvTranspose", [x(1, 2, 4, 5), w(2, 3, 3, 3)],
         {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    case("conv_transpose2d_same_lower", "ConvTranspose", [x(1, 2, 4, 5), w(2, 3, 3, 3)],
         {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    case("conv_transpose2d_dilation", "ConvTranspose", [x(1, 2, 5, 5), w(2, 2, 3, 3)],
         {"dilations": [2, 2]}),
    case("conv_transpose1d", "ConvTranspose", [x(2, 3, 6), w(3, 2, 4), w(2)],
         {"strides": [2], "pads": [1, 1]}),
]

POOL = [
    case("maxpool2d", "MaxPool", [x(1, 3, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    case("maxpool2d_pads", "MaxPool", [x(2, 3, 7, 7)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    case("maxpool2d_ceil", "MaxPool", [x(1, 2, 7, 7)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    # The last ceil_mode window would start in the end padding, so it is dropped (ONNX
    # spec, onnxruntime). onnx 1.23's shape inference still declares 3x3 instead of 2x2.
    case("maxpool2d_ceil_drop_last", "MaxPool", [x(1, 2, 6, 6)],
         {"kernel_shape": [2, 2], "strides": [3, 3], "pads": [0, 0, 1, 1], "ceil_mode": 1}),
    case("maxpool2d_dilation", "MaxPool", [x(1, 2, 9, 9)],
         {"kernel_shape": [3, 3], "dilations": [2, 2]}),
    case("maxpool2d_same_upper", "MaxPool", [x(1, 2, 7, 7)],
         {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    case("maxpool2d_same_lower", "MaxPool", [x(1, 2, 7, 7)],
         {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    case("maxpool1d", "MaxPool", [x(2, 3, 10)], {"kernel_shape": [3], "strides": [2]}),
    case("maxpool3d", "MaxPool", [x(1, 2, 6, 6, 6)], {"kernel_shape": [2, 2, 2],
                                                       "strides": [2, 2, 2]}),
    case("maxpool2d_uint8", "MaxPool", [x(1, 2, 6, 6, kind="ints 0..255", dtype="uint8")],
         {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, fp16_ok=False),
    case("avgpool2d", "AveragePool", [x(1, 3, 8, 8)], {"kernel_shape": [2, 2], "strides": [2, 2]}),
    case("avgpool2d_pads", "AveragePool", [x(1, 2, 7, 7)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    case("avgpool2d_pads_count_pad", "AveragePool", [x(1, 2, 7, 7)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
          "count_include_pad": 1}),
    case("avgpool2d_ceil", "AveragePool", [x(1, 2, 7, 7)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    case("avgpool2d_ceil_count_pad", "AveragePool", [x(1, 2, 6, 6)],
         {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1,
          "count_include_pad": 1}),
    case("avgpool2d_same_upper", "AveragePool", [x(1, 2, 7, 7)],
         {"kernel_shape": [2, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    case("avgpool2d_dilation", "AveragePool", [x(1, 2, 9, 9)],
         {"kernel_shape": [3, 3], "dilations": [2, 2]}, opset=19),
    case("avgpool1d", "AveragePool", [x(2, 3, 10)], {"kernel_shape": [4], "strides": [3]}),
    case("avgpool3d", "AveragePool", [x(1, 2, 6, 6, 6)],
         {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2], "pads": [1, 1, 1, 1, 1, 1]}),
    case("global_avgpool", "GlobalAveragePool", [x(2, 3, 4, 5)]),
    case("global_avgpool3d", "GlobalAveragePool", [x(1, 3, 4, 4, 4)]),
    case("global_maxpool", "GlobalMaxPool", [x(2, 3, 4, 5)]),
]

NORM = [
    case("batchnorm", "BatchNormalization",
         [x(2, 3, 4, 4), w(3), w(3), w(3), w(3, kind="positive")], {"epsilon": 1e-3}),
    case("batchnorm_2d", "BatchNormalization",
         [x(4, 3), w(3), w(3), w(3), w(3, kind="positive")]),
    case("instancenorm", "InstanceNormalization", [x(2, 3, 5, 5), w(3), w(3)]),
    case("layernorm", "LayerNormalization", [x(2, 3, 8), w(8), w(8)]),
    case("layernorm_axis1_stats", "LayerNormalization", [x(2, 3, 4), w(3, 4), w(3, 4)],
         {"axis": 1}, outputs=3),
    case("layernorm_no_bias", "LayerNormalization", [x(4, 16), w(16)], {"epsilon": 1e-3}),
    case("lrn", "LRN", [x(1, 5, 4, 4)], {"size": 3}),
    case("lrn_attrs", "LRN", [x(2, 6, 3, 3)],
         {"size": 5, "alpha": 1e-2, "beta": 0.5, "bias": 2.0}),
]

LINEAR = [
    case("gemm", "Gemm", [x(3, 4), w(4, 5)]),
    case("gemm_transB_bias", "Gemm", [x(3, 4), w(5, 4), w(5)], {"transB": 1}),
    case("gemm_alpha_beta", "Gemm", [x(4, 3), x(4, 5), x(3, 5)],
         {"transA": 1, "alpha": 0.5, "beta": 2.0}),
    case("gemm_c_column", "Gemm", [x(3, 4), w(4, 5), w(3, 1)], {"beta": 0.5}),
    case("gemm_c_scalar", "Gemm", [x(3, 4), w(4, 5), w(1)]),
    case("matmul", "MatMul", [x(3, 4), x(4, 5)]),
    case("matmul_batched", "MatMul", [x(2, 3, 4), w(4, 5)]),
    case("matmul_broadcast", "MatMul", [x(2, 1, 3, 4), x(3, 4, 5)]),
    case("matmul_vector_left", "MatMul", [x(4), x(2, 4, 5)]),
    case("matmul_vector_right", "MatMul", [x(2, 3, 4), x(4)]),
    case("matmul_dot", "MatMul", [x(6), x(6)]),
    case("matmul_int32", "MatMul", [x(3, 4, kind="ints -5..5", dtype="int32"),
                                    x(4, 2, kind="ints -5..5", dtype="int32")], fp16_ok=False),
    case("softmax", "Softmax", [x(2, 3, 8)]),
    case("softmax_axis1", "Softmax", [x(2, 3, 4)], {"axis": 1}),
    case("logsoftmax", "LogSoftmax", [x(2, 3, 8)]),
    case("logsoftmax_axis0", "LogSoftmax", [x(3, 4)], {"axis": 0}),
]

REDUCE_OPS = ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd",
              "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp"]

REDUCE = [case(f"{op.lower()}_axis1", op, [x(2, 3, 4), i64(1)], opset=18)
          for op in REDUCE_OPS] + [
    case("reducesum_opset13_form", "ReduceSum", [x(2, 3, 4), i64(-1)], {"keepdims": 0}),
    case("reducesum_all", "ReduceSum", [x(2, 3, 4)], {"keepdims": 0}, opset=18),
    case("reducesum_noop", "ReduceSum", [x(2, 3, 4)], {"noop_with_empty_axes": 1}, opset=18),
    case("reducesum_empty_axes", "ReduceSum", [x(2, 3, 4), i64()], opset=18),
    case("reducemax_empty_axes_noop", "ReduceMax", [x(2, 3, 4), i64()],
         {"noop_with_empty_axes": 1}, opset=18),
    case("reducesum_int64", "ReduceSum", [x(2, 3, 4, kind="ints -9..9", dtype="int64"),
                                          i64(0, 2)], opset=18, fp16_ok=False),
    case("reducemean_two_axes", "ReduceMean", [x(2, 3, 4, 5), i64(2, -1)], {"keepdims": 0},
         opset=18),
    case("reducemean_all_keepdims", "ReduceMean", [x(2, 3, 4)], opset=18),
    case("reducemax_int32", "ReduceMax", [x(3, 4, kind="ints -9..9", dtype="int32"), i64(0)],
         {"keepdims": 0}, opset=18, fp16_ok=False),
    case("reducemin_all", "ReduceMin", [x(2, 3, 4)], {"keepdims": 0}, opset=18),
    case("reducel2_all", "ReduceL2", [x(2, 3, 4)], opset=18),
    case("reducesumsquare_noop", "ReduceSumSquare", [x(2, 3)], {"noop_with_empty_axes": 1},
         opset=18),
    case("reducelogsumexp_all", "ReduceLogSumExp", [x(2, 3, 4)], {"keepdims": 0}, opset=18),
    case("argmax", "ArgMax", [x(2, 3, 4, kind="distinct")], {"axis": 1}),
    case("argmax_last_axis_nokeep", "ArgMax", [x(2, 3, 4, kind="distinct")],
         {"axis": -1, "keepdims": 0}),
    case("argmax_select_last", "ArgMax", [x(3, 6, kind="ints 0..2", dtype="int32")],
         {"axis": 1, "select_last_index": 1}, fp16_ok=False),
    case("argmin", "ArgMin", [x(2, 3, 4, kind="distinct")], {"axis": 0, "keepdims": 0}),
    case("argmin_ties", "ArgMin", [x(3, 6, kind="ints 0..2", dtype="int32")], {"axis": 1},
         fp16_ok=False),
    case("topk", "TopK", [x(2, 3, 8, kind="distinct"), i64(3)], outputs=2),
    case("topk_smallest_axis0", "TopK", [x(5, 4, kind="distinct"), i64(2)],
         {"axis": 0, "largest": 0}, outputs=2),
    case("topk_ties_int32", "TopK", [x(3, 8, kind="ints 0..3", dtype="int32"), i64(4)],
         outputs=2, fp16_ok=False),
    case("cumsum", "CumSum", [x(2, 5, 3), i64(1)]),
    case("cumsum_exclusive_reverse", "CumSum", [x(2, 5, 3), scalar(-1, np.int64)],
         {"exclusive": 1, "reverse": 1}),
    case("cumsum_exclusive", "CumSum", [x(4, 5), scalar(0, np.int32)], {"exclusive": 1}),
    case("cumsum_int64_reverse", "CumSum", [x(6, kind="ints -9..9", dtype="int64"),
                                            scalar(0, np.int64)], {"reverse": 1},
         fp16_ok=False),
]

TENSOR = [
    case("reshape", "Reshape", [x(2, 3, 4), i64(0, -1)]),
    case("reshape_flat", "Reshape", [x(2, 3, 4), i64(-1)]),
    case("reshape_split_dims", "Reshape", [x(2, 12), i64(0, 3, -1, 2)]),
    case("reshape_allowzero", "Reshape", [x(2, 3, 4), i64(4, 6)], {"allowzero": 1}, opset=14),
    case("reshape_int64", "Reshape", [x(6, kind="ints 0..9", dtype="int64"), i64(2, 3)],
         fp16_ok=False),
    case("flatten", "Flatten", [x(2, 3, 4, 5)]),
    case("flatten_axis0", "Flatten", [x(2, 3, 4)], {"axis": 0}),
    case("flatten_axis_neg", "Flatten", [x(2, 3, 4, 5)], {"axis": -1}),
    case("flatten_axis_rank", "Flatten", [x(2, 3, 4)], {"axis": 3}),
    case("transpose_default", "Transpose", [x(2, 3, 4)]),
    case("transpose_nhwc", "Transpose", [x(2, 3, 4, 5)], {"perm": [0, 2, 3, 1]}),
    case("squeeze", "Squeeze", [x(2, 1, 3, 1), i64(1)]),
    case("squeeze_all", "Squeeze", [x(1, 3, 1, 4)]),
    case("squeeze_negative", "Squeeze", [x(2, 1, 3, 1), i64(-1, 1)]),
    case("unsqueeze", "Unsqueeze", [x(3, 4), i64(0)]),
    case("unsqueeze_many", "Unsqueeze", [x(3, 4), i64(-1, 1)]),
    case("shape", "Shape", [x(2, 3, 4)]),
    case("shape_start", "Shape", [x(2, 3, 4, 5)], {"start": 1}, opset=15),
    case("shape_start_end_negative", "Shape", [x(2, 3, 4, 5)], {"start": -3, "end": -1},
         opset=15),
    case("size", "Size", [x(2, 3, 4)]),
    case("concat", "Concat", [x(2, 3, 4), x(2, 1, 4), x(2, 2, 4)], {"axis": 1}),
    case("concat_negative_axis", "Concat", [x(2, 3), x(2, 5)], {"axis": -1}),
    case("concat_int64", "Concat", [x(3, kind="ints 0..9", dtype="int64"), i64(7, 8)],
         {"axis": 0}, fp16_ok=False),
    case("split_sizes", "Split", [x(2, 5, 3), i64(2, 3)], {"axis": 1}, outputs=2),
    case("split_equal", "Split", [x(6, 4)], outputs=3),
    case("split_num_outputs", "Split", [x(2, 7)], {"axis": -1, "num_outputs": 3}, outputs=3,
         opset=18),
    case("slice", "Slice", [x(4, 6), i64(1, 2), i64(3, 5)]),
    case("slice_axes_steps", "Slice", [x(3, 8, 6), i64(1, 0), i64(7, 6), i64(1, 2), i64(2, 3)]),
    case("slice_negative_steps", "Slice", [x(5, 7), i64(-1, 5), i64(-BIG - 1, 0), i64(0, 1),
                                           i64(-1, -2)]),
    case("slice_negative_bounds", "Slice", [x(4, 6), i64(-3), i64(-1), i64(-1)]),
    case("slice_clamped", "Slice", [x(4, 6), i64(2, -100), i64(BIG, 100)]),
    case("gather", "Gather", [x(5, 4), x(3, kind="ints 0..4", dtype="int64")]),
    case("gather_bool_data", "Gather", [x(4, 6, kind="bool", dtype="bool"),
                                        x(2, 3, kind="ints 0..5", dtype="int64")], {"axis": 1},
         fp16_ok=False),
    case("gather_nd_bool_data", "GatherND", [x(3, 4, kind="bool", dtype="bool"),
                                             x(2, 1, kind="ints 0..2", dtype="int64")],
         fp16_ok=False),
    case("isnan", "IsNaN", [x(3, 7, kind="specials")]),
    case("isinf", "IsInf", [x(3, 7, kind="specials")]),
    case("isinf_negative_only", "IsInf", [x(3, 7, kind="specials")],
         {"detect_positive": 0}),
    case("gather_axis1_negative", "Gather", [x(3, 5, 2), x(2, 3, kind="ints -5..4",
                                                           dtype="int64")], {"axis": 1}),
    case("gather_scalar_index", "Gather", [x(5, 4), scalar(-2, np.int64)]),
    case("gather_const_indices", "Gather", [x(2, 6), np.array([5, 0, -1], np.int32)],
         {"axis": -1}),
    case("gather_int64_data", "Gather", [x(6, kind="ints 0..9", dtype="int64"),
                                         x(2, 2, kind="ints 0..5", dtype="int32")],
         fp16_ok=False),
    case("gather_elements", "GatherElements", [x(3, 4), x(3, 4, kind="ints -4..3",
                                                           dtype="int64")], {"axis": 1}),
    case("gather_elements_axis0_smaller", "GatherElements",
         [x(4, 3), x(2, 2, kind="ints 0..3", dtype="int64")]),
    case("gather_nd", "GatherND", [x(3, 4, 5), x(2, 2, kind="ints 0..2", dtype="int64")]),
    case("gather_nd_full_index", "GatherND", [x(3, 4), i64(0, -1, 2, 1).reshape(2, 2)]),
    case("gather_nd_batch_dims", "GatherND", [x(2, 3, 4), x(2, 2, 1, kind="ints 0..2",
                                                            dtype="int64")],
         {"batch_dims": 1}),
    case("cast_to_int32", "Cast", [x(3, 4, kind="uniform")], {"to": np.dtype(np.int32)}),
    case("cast_int64_to_float", "Cast", [x(3, 4, kind="ints -9..9", dtype="int64")],
         {"to": np.dtype(np.float32)}, fp16_ok=False),
    case("cast_to_bool", "Cast", [x(3, 4, kind="ints -1..1")], {"to": np.dtype(bool)}),
    case("cast_bool_to_float", "Cast", [x(3, 4, kind="bool", dtype="bool")],
         {"to": np.dtype(np.float32)}, fp16_ok=False),
    case("cast_to_float16", "Cast", [x(3, 4)], {"to": np.dtype(np.float16)}, atol=1e-3),
    case("cast_int64_to_int32", "Cast", [x(5, kind="ints -99..99", dtype="int64")],
         {"to": np.dtype(np.int32)}, fp16_ok=False),
    case("castlike", "CastLike", [x(3, 4, kind="ints -9..9", dtype="int32"), x(1)], opset=15,
         fp16_ok=False),
    case("expand", "Expand", [x(3, 1), i64(2, 3, 4)]),
    case("expand_smaller_shape", "Expand", [x(2, 1, 4), i64(3, 1)]),
    case("tile", "Tile", [x(2, 3, 1), i64(2, 1, 3)]),
    case("constant_of_shape", "ConstantOfShape", [i64(2, 3)]),
    case("constant_of_shape_int64", "ConstantOfShape", [i64(4)],
         {"value": np.array([7], np.int64)}, fp16_ok=False),
    case("constant_of_shape_float", "ConstantOfShape", [i64(2, 1, 3)],
         {"value": np.array([1.5], np.float32)}),
    case("range_int64", "Range", [scalar(0, np.int64), scalar(10, np.int64),
                                  scalar(3, np.int64)], fp16_ok=False),
    case("range_negative_delta", "Range", [scalar(10, np.int32), scalar(2, np.int32),
                                           scalar(-3, np.int32)], fp16_ok=False),
    case("range_float", "Range", [scalar(1.0, np.float32), scalar(3.1, np.float32),
                                  scalar(0.25, np.float32)], fp16_ok=False),  # no fp16 Range
    case("pad_constant", "Pad", [x(2, 3), i64(0, 1, 1, 2), scalar(1.5, np.float32)]),
    case("pad_zero_default", "Pad", [x(1, 2, 3, 3), i64(0, 0, 1, 1, 0, 0, 1, 1)]),
    case("pad_reflect", "Pad", [x(1, 2, 4, 4), i64(0, 0, 2, 1, 0, 0, 1, 2)],
         {"mode": "reflect"}),
    case("pad_edge", "Pad", [x(2, 4), i64(1, 2, 2, 1)], {"mode": "edge"}),
    case("pad_wrap", "Pad", [x(3, 4), i64(1, 2, 2, 1)], {"mode": "wrap"}, opset=19),
    case("pad_axes", "Pad", [x(2, 3, 4), i64(1, 2, 3, 0), None, i64(-1, 0)], opset=18),
    case("pad_negative_crops", "Pad", [x(3, 5), i64(1, -1, -1, 2)]),
    case("trilu_upper", "Trilu", [x(4, 5)], opset=14),
    case("trilu_lower_k", "Trilu", [x(2, 4, 4), scalar(-1, np.int64)], {"upper": 0}, opset=14),
    case("trilu_upper_k", "Trilu", [x(3, 5), scalar(1, np.int64)], opset=14),
]

NO_ROI = np.zeros(0, np.float32)


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)


RESIZE = [
    # ppocrv6_det_small's form: 2x nearest, asymmetric + floor (upsample_nearest_neighbor)
    case("resize_nearest_2x_asymmetric_floor", "Resize", [x(1, 3, 4, 5), NO_ROI, f32(1, 1, 2, 2)],
         {"mode": "nearest", "coordinate_transformation_mode": "asymmetric",
          "nearest_mode": "floor"}, opset=11),
    case("resize_nearest_3x_half_pixel", "Resize", [x(1, 2, 3, 4), NO_ROI, f32(1, 1, 3, 3)],
         {"nearest_mode": "round_prefer_ceil"}, opset=13),
    case("resize_nearest_sizes_gather", "Resize", [x(1, 2, 4, 5), NO_ROI, None, i64(1, 2, 7, 3)],
         {"nearest_mode": "round_prefer_floor"}, opset=13),
    case("resize_nearest_downsample_floor", "Resize", [x(1, 2, 6, 5), NO_ROI, f32(1, 1, 0.5, 0.6)],
         {"coordinate_transformation_mode": "pytorch_half_pixel", "nearest_mode": "floor"},
         opset=13),
    case("resize_nearest_align_corners_ceil", "Resize", [x(1, 1, 4, 4), NO_ROI, None,
                                                         i64(1, 1, 7, 6)],
         {"coordinate_transformation_mode": "align_corners", "nearest_mode": "ceil"}, opset=13),
    case("resize_nearest_channels", "Resize", [x(1, 2, 3, 3), NO_ROI, f32(1, 2, 1, 1)],
         {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, opset=13),
    case("resize_nearest_rank3", "Resize", [x(2, 3, 5), NO_ROI, f32(1, 1, 2)],
         {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, opset=13),
    case("resize_nearest_int32", "Resize", [x(1, 1, 3, 4, kind="ints -9..9", dtype="int32"),
                                            NO_ROI, f32(1, 1, 2, 1.5)],
         {"coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}, opset=13,
         fp16_ok=False),
    case("resize_linear_half_pixel_2x", "Resize", [x(1, 3, 4, 5), NO_ROI, f32(1, 1, 2, 2)],
         {"mode": "linear"}, opset=13),
    case("resize_linear_align_corners_sizes", "Resize", [x(1, 2, 4, 5), NO_ROI, None,
                                                         i64(1, 2, 7, 9)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=13),
    case("resize_linear_asymmetric_2x", "Resize", [x(1, 2, 3, 4), NO_ROI, f32(1, 1, 2, 2)],
         {"mode": "linear", "coordinate_transformation_mode": "asymmetric"}, opset=13),
    case("resize_linear_pytorch_half_pixel_down", "Resize", [x(1, 2, 8, 6), NO_ROI, None,
                                                             i64(1, 2, 3, 4)],
         {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"}, opset=13),
    case("resize_linear_half_pixel_half", "Resize", [x(1, 2, 8, 6), NO_ROI, f32(1, 1, 0.5, 0.5)],
         {"mode": "linear"}, opset=13),
    case("resize_linear_axes_sizes", "Resize", [x(1, 2, 4, 5), NO_ROI, None, i64(6, 10)],
         {"mode": "linear", "axes": [2, 3]}, opset=18),
    case("resize_linear_one_axis_3d", "Resize", [x(2, 3, 4), NO_ROI, f32(1, 1, 3)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=13),
    # no MIL op computes these: compile-time errors (tests/test_ops_compiled.py UNSUPPORTED)
    case("resize_cubic", "Resize", [x(1, 1, 4, 4), NO_ROI, f32(1, 1, 2, 2)], {"mode": "cubic"},
         opset=13),
    case("resize_linear_fractional_scale", "Resize", [x(1, 1, 5, 5), NO_ROI, f32(1, 1, 1.5, 1.5)],
         {"mode": "linear"}, opset=13),
    case("resize_linear_antialias_down", "Resize", [x(1, 1, 8, 8), NO_ROI, f32(1, 1, 0.5, 0.5)],
         {"mode": "linear", "antialias": 1}, opset=18),
]

# X, W, R, B, sequence_lens, initial_h, initial_c, P (layout 1 is in tests/test_rnn.py:
# onnxruntime runs layout 0 only)
LSTM = [
    # silero-vad's form: forward, default activations, no sequence_lens, initial h and c
    case("lstm_forward", "LSTM", [x(5, 2, 4), w(1, 24, 4), w(1, 24, 6), w(1, 48), None,
                                  x(1, 2, 6), x(1, 2, 6)], {"hidden_size": 6}, opset=14,
         outputs=3),
    case("lstm_reverse_no_bias_no_state", "LSTM", [x(4, 3, 5), w(1, 16, 5), w(1, 16, 4)],
         {"hidden_size": 4, "direction": "reverse"}, opset=14, outputs=3),
    case("lstm_bidirectional", "LSTM", [x(6, 2, 3), w(2, 20, 3), w(2, 20, 5), w(2, 40), None,
                                        x(2, 2, 5), x(2, 2, 5)],
         {"hidden_size": 5, "direction": "bidirectional"}, opset=14, outputs=3),
    case("lstm_peepholes_full_lengths", "LSTM", [x(4, 2, 3), w(1, 16, 3), w(1, 16, 4),
                                                 w(1, 32), np.array([4, 4], np.int32),
                                                 x(1, 2, 4), x(1, 2, 4), w(1, 12)],
         {"hidden_size": 4}, opset=14, outputs=3),
    case("lstm_relu_cell", "LSTM", [x(3, 1, 2), w(1, 12, 2, kind="uniform"),
                                    w(1, 12, 3, kind="uniform")],
         {"hidden_size": 3, "activations": ["Sigmoid", "Relu", "Tanh"]}, opset=14, outputs=3),
    # beyond MIL's lstm: composed step by step (targets/coreml/rules_rnn.py)
    case("lstm_clip", "LSTM", [x(3, 1, 2), w(1, 12, 2), w(1, 12, 3)],
         {"hidden_size": 3, "clip": 0.5}, opset=14, outputs=3),
    case("lstm_short_sequence_lens", "LSTM", [x(4, 2, 3), w(1, 12, 3), w(1, 12, 3), None,
                                              np.array([4, 2], np.int32)],
         {"hidden_size": 3}, opset=14, outputs=3),
]

def u8(*values) -> np.ndarray:
    return np.array(values, np.uint8)


# Quantization (applec/ops/qdq.py). Integer outputs are compared exactly; QuantizeLinear and
# DynamicQuantizeLinear have no fp16 variant (a float16 input moves x / scale by more than
# the rounding step), the integer products do (they compute in fp32 in any program).
QDQ_SCALE = scalar(0.05, np.float32)
QDQ = [
    case("quantizelinear_uint8", "QuantizeLinear", [x(2, 3, 4), QDQ_SCALE, scalar(128, np.uint8)],
         opset=13, fp16_ok=False),
    case("quantizelinear_no_zero_point", "QuantizeLinear", [x(2, 3, 4), QDQ_SCALE], opset=10,
         fp16_ok=False),
    # x / scale lands on halves: round half to even, before the (odd) zero point is added
    case("quantizelinear_ties_half_even", "QuantizeLinear",
         [x(4, 8, kind="distinct"), scalar(0.25, np.float32), scalar(3, np.int8)], opset=13,
         fp16_ok=False),
    case("quantizelinear_saturate", "QuantizeLinear",
         [x(2, 3, 4), scalar(0.005, np.float32), scalar(-20, np.int8)], opset=13, fp16_ok=False),
    case("quantizelinear_per_axis_int8", "QuantizeLinear",
         [x(2, 3, 4), w(3, kind="positive"), np.array([-3, 0, 5], np.int8)], {"axis": 1},
         opset=13, fp16_ok=False),
    case("quantizelinear_runtime_scale", "QuantizeLinear",
         [x(2, 3, 4), x(4, kind="positive"), x(4, kind="ints 0..255", dtype="uint8")],
         {"axis": -1}, opset=13, fp16_ok=False),
    case("quantizelinear_int16", "QuantizeLinear",
         [x(3, 8), scalar(1e-4, np.float32), scalar(-7, np.int16)], opset=21, fp16_ok=False),
    case("quantizelinear_uint16", "QuantizeLinear",
         [x(3, 8), scalar(1e-4, np.float32), scalar(30000, np.uint16)], opset=21,
         fp16_ok=False),
    case("quantizelinear_blocked", "QuantizeLinear",
         [x(4, 6), w(4, 2, kind="positive"), w(4, 2, kind="ints 0..255", dtype="uint8")],
         {"axis": 1, "block_size": 3}, opset=21, fp16_ok=False),
    case("quantizelinear_blocked_short_block", "QuantizeLinear",
         [x(5, 3), w(3, 3, kind="positive")], {"axis": 0, "block_size": 2, "output_dtype": 3},
         opset=21, fp16_ok=False),
    case("dequantizelinear_uint8", "DequantizeLinear",
         [x(2, 3, 4, kind="ints 0..255", dtype="uint8"), QDQ_SCALE, scalar(100, np.uint8)],
         opset=13),
    case("dequantizelinear_per_axis_int8", "DequantizeLinear",
         [x(2, 3, 4, kind="ints -128..127", dtype="int8"), w(3, kind="positive"),
          np.array([-3, 0, 5], np.int8)], {"axis": 1}, opset=13),
    case("dequantizelinear_int32_bias", "DequantizeLinear",
         [x(6, kind="ints -100000..100000", dtype="int32"), scalar(1e-3, np.float32)], opset=13),
    case("dequantizelinear_int16", "DequantizeLinear",
         [x(3, 8, kind="ints -32768..32767", dtype="int16"), scalar(1e-3, np.float32),
          scalar(-7, np.int16)], opset=21),
    case("dequantizelinear_uint16", "DequantizeLinear",
         [x(3, 8, kind="ints 0..65535", dtype="uint16"), scalar(1e-3, np.float32),
          scalar(30000, np.uint16)], opset=21),
    case("dequantizelinear_blocked", "DequantizeLinear",
         [x(4, 6, kind="ints 0..255", dtype="uint8"), w(4, 2, kind="positive"),
          w(4, 2, kind="ints 0..255", dtype="uint8")], {"axis": 1, "block_size": 3}, opset=21),
    case("dequantizelinear_runtime_scale", "DequantizeLinear",
         [x(2, 3, 4, kind="ints -128..127", dtype="int8"), x(3, kind="positive"),
          x(3, kind="ints -128..127", dtype="int8")], {"axis": 1}, opset=13),
    # all constant: fold_qdq_weights folds it (it feeds no weight)
    case("dequantizelinear_constant", "DequantizeLinear",
         [w(3, 4, kind="ints -128..127", dtype="int8"), w(4, kind="positive"),
          np.array([1, 0, -1, 2], np.int8)], {"axis": 1}, opset=13),
    case("dynamicquantizelinear", "DynamicQuantizeLinear", [x(2, 3, 4)], opset=11, outputs=3,
         fp16_ok=False),
    case("dynamicquantizelinear_positive", "DynamicQuantizeLinear", [x(3, 4, kind="positive")],
         opset=11, outputs=3, fp16_ok=False),
    # (onnxruntime takes one w_zero_point only; the node tests check one per channel)
    case("convinteger_uint8", "ConvInteger",
         [x(1, 3, 6, 6, kind="ints 0..255", dtype="uint8"),
          w(4, 3, 3, 3, kind="ints 0..255", dtype="uint8"), scalar(128, np.uint8),
          u8(120)], {"pads": [1, 1, 1, 1]}, opset=10),
    case("convinteger_strided_no_zero_points", "ConvInteger",
         [x(2, 4, 7, 7, kind="ints 0..255", dtype="uint8"),
          w(6, 2, 3, 3, kind="ints 0..255", dtype="uint8")],
         {"strides": [2, 2], "group": 2, "dilations": [2, 1]}, opset=10),
    case("convinteger_runtime_weight", "ConvInteger",
         [x(1, 2, 5, 5, kind="ints 0..255", dtype="uint8"),
          x(3, 2, 2, 2, kind="ints 0..255", dtype="uint8"), scalar(7, np.uint8),
          scalar(131, np.uint8)], {"auto_pad": "SAME_UPPER"}, opset=10),
    case("matmulinteger_uint8_per_column", "MatMulInteger",
         [x(2, 4, 8, kind="ints 0..255", dtype="uint8"),
          w(8, 5, kind="ints 0..255", dtype="uint8"), scalar(12, np.uint8),
          u8(100, 128, 130, 0, 255)], opset=10),
    case("matmulinteger_int8_runtime", "MatMulInteger",
         [x(3, 4, kind="ints 0..255", dtype="uint8"), x(4, 6, kind="ints -128..127",
                                                           dtype="int8"),
          scalar(9, np.uint8), scalar(-5, np.int8)], opset=10),
]

# ops tested elsewhere, because a one-node case cannot hold them
COVERED_ELSEWHERE = {"If": "tests/test_control_flow.py: its branches are subgraphs"}
COVERED_ELSEWHERE.update(dict.fromkeys(["GRU", "RNN"], "tests/test_ops_recurrent.py"))
COVERED_ELSEWHERE.update(dict.fromkeys(
    ["DFT", "STFT", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix"],
    "tests/test_ops_spectral.py"))
COVERED_ELSEWHERE.update(dict.fromkeys(
    ["Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Round",
     "Softsign", "Mish", "Selu", "Celu", "ThresholdedRelu", "Shrink", "Swish", "PRelu",
     "Hardmax", "LpNormalization", "MeanVarianceNormalization", "ReduceLogSum",
     "GroupNormalization", "RMSNormalization", "LpPool", "GlobalLpPool"],
    "tests/test_ops_activations.py"))
COVERED_ELSEWHERE.update(dict.fromkeys(
    ["DepthToSpace", "SpaceToDepth", "ScatterND", "ScatterElements", "OneHot", "EyeLike",
     "Einsum", "ReverseSequence", "CenterCropPad", "GridSample", "NonZero", "Compress"],
    "tests/test_ops_indexing.py"))
COVERED_ELSEWHERE.update(dict.fromkeys(
    ["Loop", "Scan"], "tests/test_loop_scan.py: their bodies are subgraphs"))
COVERED_ELSEWHERE.update(dict.fromkeys(
    ["QLinearConv", "QLinearMatMul"] + [f"com.microsoft.{op}" for op in (
        "QGemm", "QLinearAdd", "QLinearAveragePool", "QLinearConcat", "QLinearGlobalAveragePool",
        "QLinearLeakyRelu", "QLinearMul", "QLinearSigmoid", "QLinearSoftmax")],
    "tests/test_qoperator.py: compared with onnxruntime on quantized inputs"))

CASES: list[OpCase] = ELEMENTWISE + CONV + POOL + NORM + LINEAR + REDUCE + TENSOR + RESIZE \
    + LSTM + QDQ


# -- building models and data ------------------------------------------------------------
def input_names(case: OpCase) -> list[str | None]:
    """ONNX names of the inputs: 'in0', 'in1'...; None for an omitted optional input."""
    return [None if spec is None else f"in{i}" for i, spec in enumerate(case.inputs)]


def output_names(case: OpCase) -> list[str]:
    return [f"out{i}" for i in range(case.outputs)]


def generate(spec: In, rng: np.random.Generator) -> np.ndarray:
    """Data for one generated input, following its `kind`."""
    shape, kind = spec.shape, spec.kind
    if kind == "normal":
        data = rng.standard_normal(shape)
    elif kind == "uniform":
        data = rng.uniform(-1, 1, shape)
    elif kind == "positive":
        data = rng.uniform(0.5, 2, shape)
    elif kind == "bool":
        data = rng.random(shape) < 0.5
    elif kind == "specials":  # normal values with NaN, +inf and -inf sprinkled in
        data = rng.standard_normal(shape)
        flat = data.reshape(-1)
        flat[::5], flat[1::7], flat[2::11] = np.nan, np.inf, -np.inf
    elif kind == "distinct":
        count = int(np.prod(shape))
        data = (rng.permutation(count) - count / 2).reshape(shape) / 8  # exact in float16
    elif match := re.fullmatch(r"(ints|nonzero) (-?\d+)\.\.(-?\d+)", kind):
        low, high = int(match[2]), int(match[3])
        data = rng.integers(low, high + 1, shape)
        if match[1] == "nonzero":
            data = np.where(data == 0, high, data)
    else:
        raise ValueError(f"unknown input kind '{kind}'")
    return np.asarray(data).astype(spec.dtype)


def constants(case: OpCase) -> dict[str, np.ndarray]:
    """The initializers: constant arrays and generated `const` inputs (fixed seed)."""
    result = {}
    for i, (name, spec) in enumerate(zip(input_names(case), case.inputs)):
        if isinstance(spec, np.ndarray):
            result[name] = spec
        elif isinstance(spec, In) and spec.const:
            result[name] = generate(spec, np.random.default_rng([1234, i]))
    return result


def make_inputs(case: OpCase, seed: int = 0) -> dict[str, np.ndarray]:
    """Run-time feeds for the graph inputs of `case`."""
    return {name: generate(spec, np.random.default_rng([seed, i]))
            for i, (name, spec) in enumerate(zip(input_names(case), case.inputs))
            if isinstance(spec, In) and not spec.const}


def _onnx_attr(value):
    if isinstance(value, np.dtype):
        return helper.np_dtype_to_tensor_dtype(value)
    if isinstance(value, np.ndarray):
        return numpy_helper.from_array(value)
    return value


def make_model(case: OpCase) -> onnx.ModelProto:
    """A one-node ONNX model of `case`, its output types from ONNX shape inference."""
    names = input_names(case)
    while names and names[-1] is None:
        names.pop()
    node = helper.make_node(case.op_type, [n or "" for n in names], output_names(case),
                            name=case.id, **{k: _onnx_attr(v) for k, v in case.attrs.items()})
    inits = constants(case)
    graph_inputs = [helper.make_tensor_value_info(
                        name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)), spec.shape)
                    for name, spec in zip(names, case.inputs)
                    if isinstance(spec, In) and not spec.const]
    graph = helper.make_graph(
        [node], case.id, graph_inputs, [onnx.ValueInfoProto(name=n) for n in output_names(case)],
        initializer=[numpy_helper.from_array(a, name) for name, a in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", case.opset)],
                              ir_version=IR_VERSION)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)


def as_float16(case: OpCase) -> OpCase:
    """The float16 variant of a case: float32 inputs and constants become float16."""
    def convert(spec):
        if isinstance(spec, In) and spec.dtype == "float32":
            return dataclasses.replace(spec, dtype="float16")
        if isinstance(spec, np.ndarray) and spec.dtype == np.float32:
            return spec.astype(np.float16)
        return spec
    return dataclasses.replace(case, id=f"{case.id}_fp16",
                               inputs=tuple(convert(s) for s in case.inputs))
