"""onnxruntime's QOperator format (applec/ops/qoperator.py, targets/coreml/rules_qoperator.py)
and quantize_dynamic models, end to end, against onnxruntime running the same model:

- quantize_static(quant_format=QOperator) of a small CNN (Conv, Add, Sigmoid, Mul,
  LeakyRelu, Concat, MaxPool, AveragePool, GlobalAveragePool, Gemm, Softmax) and of an
  attention block (MatMul, Softmax, Add): the contrib ops it emits, fp32 and fp16 bundles;
- the quantized part alone (codes in, codes out): fp16 bundles give fp32's codes exactly;
- one node per op, scales and zero points constant (the table and folded paths) and
  run-time (MIL arithmetic);
- quantize_dynamic (default, per_channel=True) of a small transformer layer;
- structure: weights stay int8 in the saved program; what is refused, and how.

Tolerance: the references replicate onnxruntime's x86 CPU kernels in float32, so on this
machine the outputs are equal; elsewhere a float32 value within rounding error of a tie
(x.5) may round the other way. So codes may differ by one quantization step, float outputs
by one step of the final DequantizeLinear's scale (fp32 bundles). fp16 bundles quantize the
fp16 input, which moves some input codes by one step: cosine >= 0.999 and a few steps.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import applec
from applec import interpreter
from applec.errors import ModelError, UnsupportedOpError
from applec.onnx_import import import_model
from applec.runtime.mil_reader import read_mlpackage, walk
from applec.testing import GraphBuilder, tensor
from applec.validate import compare, onnxruntime_outputs

F, U8, I8 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8
MS = "com.microsoft"
PACKAGE = "partitions/p0.mlpackage"
WEIGHT_BIN = f"{PACKAGE}/Data/com.apple.CoreML/weights/weight.bin"
OPSETS = [helper.make_opsetid("", 13), helper.make_opsetid(MS, 1)]


# -- models and onnxruntime's quantizers -------------------------------------------------------
def float_cnn() -> onnx.ModelProto:
    b = GraphBuilder(0)
    h = b.op("Conv", ["image", b.weight("c1", (8, 3, 3, 3)), b.weight("c1b", (8,), 0.1)],
             pads=[1, 1, 1, 1])
    h = b.op("Relu", [h])
    h2 = b.op("Conv", [h, b.weight("c2", (8, 8, 3, 3)), b.weight("c2b", (8,), 0.1)],
              pads=[1, 1, 1, 1])
    h = b.op("Add", [h, h2])
    h = b.op("Mul", [h, b.op("Sigmoid", [h])])
    h = b.op("Concat", [h, b.op("LeakyRelu", [h], alpha=0.1)], axis=1)
    h = b.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = b.op("AveragePool", [h], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [h])], axis=1)
    h = b.op("Gemm", [h, b.weight("fc", (10, 16)), b.weight("fcb", (10,), 0.1)], transB=1)
    b.op("Softmax", [h], axis=-1, name="probs")
    return b.model([tensor("image", F, [1, 3, 16, 16])], [tensor("probs", F, [1, 10])],
                   opset=13)


def float_attention() -> onnx.ModelProto:
    b = GraphBuilder(1)
    q, k, v = (b.op("MatMul", ["x", b.weight(f"w{n}", (16, 16))]) for n in "qkv")
    s = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
    o = b.op("MatMul", [b.op("Softmax", [s], axis=-1), v])
    b.op("MatMul", [b.op("Add", [o, "x"]), b.weight("wo", (16, 8))], name="y")
    return b.model([tensor("x", F, [1, 6, 16])], [tensor("y", F, [1, 6, 8])], opset=13)


def float_transformer() -> onnx.ModelProto:
    """Embedding Gather, LayerNormalization, softmax attention, a ReLU MLP."""
    b, d = GraphBuilder(2), 16
    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
    h = b.op("Add", [b.op("Gather", [b.weight("table", (50, d), 1.0), "ids"]),
                     b.weight("pos", (1, 6, d), 0.1)])
    x = b.op("LayerNormalization", [h, b.init("g1", ones), b.init("b1", zeros)], axis=-1)
    q, k, v = (b.op("Add", [b.op("MatMul", [x, b.weight(f"w{n}", (d, d))]),
                            b.weight(f"b{n}", (d,), 0.1)]) for n in "qkv")
    s = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])]),
                     b.init("scale", np.float32(0.25))])
    o = b.op("MatMul", [b.op("Softmax", [s], axis=-1), v])
    h = b.op("Add", [h, b.op("MatMul", [o, b.weight("wo", (d, d))])])
    x = b.op("LayerNormalization", [h, b.init("g2", ones), b.init("b2", zeros)], axis=-1)
    f = b.op("Relu", [b.op("MatMul", [x, b.weight("w1", (d, 32))])])
    b.op("Add", [h, b.op("MatMul", [f, b.weight("w2", (32, d))])], name="y")
    return b.model([tensor("ids", TensorProto.INT64, [1, 6])], [tensor("y", F, [1, 6, d])],
                   opset=17)


MODELS = {"cnn": (float_cnn, "image", (1, 3, 16, 16), "probs"),
          "attention": (float_attention, "x", (1, 6, 16), "y")}


def quantize_qoperator(path, out, model: str, per_channel: bool, types: str) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    _, name, shape, _ = MODELS[model]

    class Samples(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{name: rng.standard_normal(shape, np.float32)}
                               for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    activations, weights = (QuantType.QUInt8 if t == "u8" else QuantType.QInt8
                            for t in types.split("/"))
    quantize_static(str(path), str(out), Samples(), quant_format=QuantFormat.QOperator,
                    per_channel=per_channel, activation_type=activations,
                    weight_type=weights)


@pytest.fixture(scope="module")
def qoperator(tmp_path_factory):
    """quantize_static(QOperator) of each model, made once per configuration."""
    root, made = tmp_path_factory.mktemp("qoperator"), {}

    def get(model: str, per_channel: bool = True, types: str = "u8/s8"):
        key = (model, per_channel, types)
        if key not in made:
            source = root / f"{model}.onnx"
            if not source.exists():
                onnx.save(MODELS[model][0](), source)
            made[key] = root / f"{model}_{int(per_channel)}_{types.replace('/', '')}.onnx"
            quantize_qoperator(source, made[key], model, per_channel, types)
        return made[key]
    return get


def feeds_for(model: str, seed: int = 1) -> dict[str, np.ndarray]:
    _, name, shape, _ = MODELS[model]
    return {name: np.random.default_rng(seed).standard_normal(shape, np.float32)}


def output_step(path) -> float:
    """The scale of the DequantizeLinear that makes the model's float output."""
    model = onnx.load(str(path))
    out = model.graph.output[0].name
    node = next(n for n in model.graph.node if n.output[0] == out)
    scale = next(i for i in model.graph.initializer if i.name == node.input[1])
    return float(numpy_helper.to_array(scale))


def run_bundle(bundle, feeds) -> dict[str, np.ndarray]:
    return applec.load(bundle, backend="reference").run(feeds)


def report_ops(result, op_type: str) -> list[list[str]]:
    return [e.get("mil_ops") or [] for e in result.report["nodes"].values()
            if e["op_type"] == op_type]


# -- quantize_static(QOperator) --------------------------------------------------------------------
def test_quantize_static_emits_the_contrib_ops_applec_takes(qoperator):
    emitted = {(n.domain or "", n.op_type) for model in MODELS
               for n in onnx.load(str(qoperator(model))).graph.node}
    assert {op for domain, op in emitted if domain == MS} == {
        "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat",
        "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearSoftmax", "QGemm"}
    assert {("", "QLinearConv"), ("", "QLinearMatMul")} <= emitted


@pytest.mark.parametrize("model, per_channel, types", [
    ("cnn", False, "u8/s8"), ("cnn", True, "u8/s8"), ("cnn", True, "s8/s8"),
    ("cnn", True, "u8/u8"), ("attention", False, "u8/s8"), ("attention", True, "s8/s8")])
def test_static_qoperator_fp32(qoperator, tmp_path, model, per_channel, types):
    path = qoperator(model, per_channel, types)
    result = applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert not result.report["notes"]
    out, step = MODELS[model][3], output_step(path)
    for seed in (1, 2):
        feeds = feeds_for(model, seed)
        got, want = run_bundle(tmp_path / "b", feeds)[out], onnxruntime_outputs(path, feeds)[out]
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.abs(got - want).max() <= step * 1.001, (seed, np.abs(got - want).max() / step)


@pytest.mark.parametrize("model", list(MODELS))
def test_static_qoperator_fp16(qoperator, tmp_path, model):
    path = qoperator(model)
    applec.compile(path, output=tmp_path / "b", precision="fp16")
    out, step = MODELS[model][3], output_step(path)
    feeds = feeds_for(model, 3)
    got, want = run_bundle(tmp_path / "b", feeds)[out], onnxruntime_outputs(path, feeds)[out]
    check = compare(out, got, want, "fp16")
    assert check.cosine >= 0.999 and np.abs(got - want).max() <= 8 * step * 1.001, check


def codes_only(path, tmp_path) -> tuple:
    """The quantized model without its float edges: the QuantizeLinear's output becomes the
    graph input, the final DequantizeLinear's input the graph output."""
    model = onnx.load(str(path))
    quantize, dequantize = model.graph.node[0], model.graph.node[-1]
    assert (quantize.op_type, dequantize.op_type) == ("QuantizeLinear", "DequantizeLinear")
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    x_in, y_out = quantize.output[0], dequantize.input[0]
    elem = next(i for i in model.graph.initializer if i.name == quantize.input[2]).data_type
    shape = [d.dim_value for d in types[quantize.input[0]].type.tensor_type.shape.dim]
    out_shape = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    graph = helper.make_graph(list(model.graph.node[1:-1]), "codes",
                              [helper.make_tensor_value_info(x_in, elem, shape)],
                              [helper.make_tensor_value_info(y_out, elem, out_shape)],
                              list(model.graph.initializer))
    codes = helper.make_model(graph, opset_imports=model.opset_import,
                              ir_version=model.ir_version)
    onnx.save(codes, tmp_path / "codes.onnx")
    low, high = (-128, 128) if elem == I8 else (0, 256)
    feeds = {x_in: np.random.default_rng(4).integers(low, high, shape).astype(
        helper.tensor_dtype_to_np_dtype(elem))}
    return tmp_path / "codes.onnx", feeds, y_out


@pytest.mark.parametrize("model, types", [("cnn", "u8/s8"), ("attention", "s8/s8")])
def test_quantized_codes_fp16_equal_fp32(qoperator, tmp_path, model, types):
    """Every QOperator op computes in fp32 inside an fp16 program: the same codes."""
    path, feeds, out = codes_only(qoperator(model, True, types), tmp_path)
    got = {}
    for precision in ("fp32", "fp16"):
        applec.compile(path, output=tmp_path / precision, precision=precision)
        got[precision] = run_bundle(tmp_path / precision, feeds)[out]
    want = onnxruntime_outputs(path, feeds)[out]
    assert got["fp32"].dtype == want.dtype and got["fp32"].shape == want.shape
    np.testing.assert_array_equal(got["fp16"], got["fp32"])
    assert np.abs(got["fp32"].astype(np.int32) - want).max() <= 1


# -- structure: weights stay 8-bit ----------------------------------------------------------------
def program_weights(bundle) -> dict[str, tuple]:
    """For each conv / matmul of the saved program: the op producing its weight operand
    and that op's data dtype (None when the weight is a plain const)."""
    program = read_mlpackage(str(bundle / PACKAGE))
    producers = {out.name: op for op in walk(program.main) for out in op.outputs}
    found = {}
    for op in walk(program.main):
        key = {"conv": "weight", "matmul": "y"}.get(op.type)
        if key is None or not isinstance(op.inputs.get(key), str):
            continue
        source = producers.get(op.inputs[key])
        data = None
        if source is not None and source.type.startswith("constexpr_"):
            # iOS18 constexprs take the data as an input, iOS16 ones as an attribute
            args = {**source.attributes, **source.inputs}
            data = args.get("data", args.get("quantized_data"))
            data = (data if isinstance(data, np.ndarray) else producers[data].attributes["val"])
            data = data.dtype
        found[op.name] = (source.type if source is not None else "input", data)
    return found


@pytest.mark.parametrize("deployment, constexpr", [
    (None, "constexpr_blockwise_shift_scale"), ("macOS13", "constexpr_affine_dequantize")])
def test_weights_stay_int8_in_the_program(qoperator, tmp_path, deployment, constexpr):
    # uint8 weights: onnxruntime keeps per-channel conv weights int8, the Gemm's are uint8
    # with one zero point per column
    path = qoperator("cnn", True, "u8/u8")
    result = applec.compile(path, output=tmp_path / "b", precision="fp16",
                            deployment_target=deployment)
    for op_type in ("QLinearConv", "QGemm"):
        ops = report_ops(result, op_type)
        assert ops and all(constexpr in o for o in ops), (op_type, ops)
    weights = program_weights(tmp_path / "b")
    assert sorted(weights.values()) == [(constexpr, np.dtype(np.int8))] * 2 + [
        (constexpr, np.dtype(np.uint8))], weights
    onnx_weights = 8 * 3 * 9 + 8 * 8 * 9 + 10 * 16  # bytes, one per weight
    assert (tmp_path / "b" / WEIGHT_BIN).stat().st_size < onnx_weights + 4096  # + tables
    feeds = feeds_for("cnn")
    got = run_bundle(tmp_path / "b", feeds)["probs"]
    want = onnxruntime_outputs(path, feeds)["probs"]
    assert compare("probs", got, want, "fp16").cosine >= 0.999


def test_static_lookups_and_folding(qoperator, tmp_path):
    """Constant scales: Sigmoid and LeakyRelu are one gather from a 256-entry table, a
    constant QLinearAdd operand is folded into the constants."""
    result = applec.compile(qoperator("cnn"), output=tmp_path / "b", precision="fp32")
    for op_type in ("QLinearSigmoid", "QLinearLeakyRelu"):
        assert report_ops(result, op_type) == [["gather"]]
    assert all("gather" in ops for ops in report_ops(result, "QLinearConcat"))
    assert report_ops(result, "QLinearSoftmax")[0].count("exp") == 1
    # attention: the four weight products read a constexpr, the two activation products not
    result = applec.compile(qoperator("attention"), output=tmp_path / "a", precision="fp32")
    products = report_ops(result, "QLinearMatMul")
    assert sorted("constexpr_blockwise_shift_scale" in ops for ops in products) == \
        [False] * 2 + [True] * 4


# -- one node per op: constant and run-time scales -----------------------------------------------
def scale(value: float) -> np.ndarray:
    return np.asarray(value, np.float32)


def zero(value: int, dtype=np.uint8) -> np.ndarray:
    return np.asarray(value, dtype)


def codes(shape, dtype=np.uint8, seed=0) -> np.ndarray:
    low, high = (-128, 128) if dtype == np.int8 else (0, 256)
    return np.random.default_rng(seed).integers(low, high, shape).astype(dtype)


# (op, domain, ordered inputs as (name, array, is a parameter), output type, attrs)
RNG = np.random.default_rng(5)
CASES = {
    "QLinearConv": ("", [("x", codes((1, 4, 6, 6)), 0), ("xs", scale(0.02), 1),
                         ("xz", zero(120), 1), ("w", codes((6, 2, 3, 3), seed=1), 1),
                         ("ws", RNG.uniform(0.005, 0.01, 6).astype(np.float32), 1),
                         ("wz", RNG.integers(100, 150, 6).astype(np.uint8), 1),
                         ("ys", scale(0.05), 1),
                         ("yz", zero(100), 1),
                         ("bias", RNG.integers(-500, 500, 6).astype(np.int32), 1)],
                    U8, {"group": 2, "pads": [1, 0, 1, 2], "strides": [2, 1]}),
    "QLinearMatMul": ("", [("a", codes((2, 3, 8), np.int8), 0), ("as", scale(0.03), 1),
                           ("az", zero(3, np.int8), 1), ("b", codes((8, 5), np.int8, 1), 1),
                           ("bs", RNG.uniform(0.005, 0.01, 5).astype(np.float32), 1),
                           ("bz", RNG.integers(-5, 5, 5).astype(np.int8), 1),
                           ("ys", scale(0.1), 1),
                           ("yz", zero(-5, np.int8), 1)], I8, {}),
    "QGemm": (MS, [("a", codes((3, 8)), 0), ("as", scale(0.03), 1), ("az", zero(128), 1),
                   ("b", codes((5, 8), np.int8, 1), 1),
                   ("bs", RNG.uniform(0.005, 0.01, 5).astype(np.float32), 1),
                   ("bz", np.zeros(5, np.int8), 1),
                   ("c", RNG.integers(-900, 900, 5).astype(np.int32), 1),
                   ("ys", scale(0.1), 1), ("yz", zero(120), 1)], U8,
              {"transB": 1, "alpha": 0.5}),
    "QGemm_float": (MS, [("a", codes((8, 3)), 0), ("as", scale(0.03), 1),
                         ("az", zero(128), 1), ("b", codes((8, 5), np.int8, 1), 1),
                         ("bs", scale(0.007), 1), ("bz", zero(0, np.int8), 1)], F,
                    {"transA": 1}),
    "QLinearAdd": (MS, [("a", codes((2, 3, 4)), 0), ("as", scale(0.0213), 1),
                        ("az", zero(110), 1), ("b", codes((3, 1), seed=1), 0),
                        ("bs", scale(0.0171), 1), ("bz", zero(140), 1),
                        ("cs", scale(0.0297), 1), ("cz", zero(128), 1)], U8, {}),
    "QLinearMul": (MS, [("a", codes((2, 3, 4), np.int8), 0), ("as", scale(0.02), 1),
                        ("az", zero(-10, np.int8), 1), ("b", codes((4,), np.int8, 1), 0),
                        ("bs", scale(0.015), 1), ("bz", zero(5, np.int8), 1),
                        ("cs", scale(0.01), 1), ("cz", zero(0, np.int8), 1)], I8, {}),
    "QLinearSigmoid": (MS, [("x", codes((2, 50), np.int8), 0), ("xs", scale(0.05), 1),
                            ("xz", zero(10, np.int8), 1), ("ys", scale(1 / 256), 1),
                            ("yz", zero(-128, np.int8), 1)], I8, {}),
    "QLinearLeakyRelu": (MS, [("x", codes((2, 50)), 0), ("xs", scale(0.05), 1),
                              ("xz", zero(100), 1), ("ys", scale(0.04), 1),
                              ("yz", zero(20), 1)], U8, {"alpha": 0.2}),
    "QLinearConcat": (MS, [("ys", scale(0.03), 1), ("yz", zero(128), 1),
                           ("x0", codes((1, 2, 3)), 0), ("x0s", scale(0.03), 1),
                           ("x0z", zero(128), 1), ("x1", codes((1, 4, 3), seed=1), 0),
                           ("x1s", scale(0.05), 1), ("x1z", zero(90), 1)], U8, {"axis": 1}),
    "QLinearGlobalAveragePool": (MS, [("x", codes((1, 3, 5, 7)), 0), ("xs", scale(0.02), 1),
                                      ("xz", zero(128), 1), ("ys", scale(0.01), 1),
                                      ("yz", zero(130), 1)], U8, {}),
    "QLinearAveragePool": (MS, [("x", codes((1, 3, 7, 7), np.int8), 0),
                                ("xs", scale(0.02), 1), ("xz", zero(3, np.int8), 1),
                                ("ys", scale(0.015), 1), ("yz", zero(-2, np.int8), 1)], I8,
                           {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                            "count_include_pad": 1, "ceil_mode": 1}),
    "QLinearGlobalAveragePool_nhwc": (MS, [("x", codes((2, 4, 3, 5), np.int8), 0),
                                           ("xs", scale(0.02), 1), ("xz", zero(-3, np.int8), 1),
                                           ("ys", scale(0.01), 1), ("yz", zero(4, np.int8), 1)],
                                      I8, {"channels_last": 1}),
    "QLinearAveragePool_nhwc": (MS, [("x", codes((1, 6, 5, 3)), 0), ("xs", scale(0.02), 1),
                                     ("xz", zero(128), 1), ("ys", scale(0.017), 1),
                                     ("yz", zero(120), 1)], U8,
                                {"kernel_shape": [2, 2], "strides": [2, 1],
                                 "auto_pad": "SAME_UPPER", "channels_last": 1}),
    "QLinearSoftmax": (MS, [("x", codes((2, 3, 6)), 0), ("xs", scale(0.1), 1),
                            ("xz", zero(128), 1), ("ys", scale(1 / 256), 1),
                            ("yz", zero(0), 1)], U8, {"axis": 1, "opset": 13}),
    "QLinearSoftmax_flat": (MS, [("x", codes((2, 3, 6), np.int8), 0), ("xs", scale(0.07), 1),
                                 ("xz", zero(0, np.int8), 1), ("ys", scale(1 / 256), 1),
                                 ("yz", zero(-128, np.int8), 1)], I8, {"axis": 1, "opset": 12}),
    "QuantizeLinear": (MS, [("x", RNG.standard_normal((2, 5)).astype(np.float32), 0),
                            ("s", scale(0.02), 1), ("z", zero(-3, np.int8), 1)], I8, {}),
    "DequantizeLinear": (MS, [("x", codes((2, 5)), 0), ("s", scale(0.02), 1),
                              ("z", zero(7), 1)], F, {}),
}


def one_op_model(case: str, runtime_params: bool) -> tuple[onnx.ModelProto, dict]:
    """One node of `case` (CASES); its parameters initializers or graph inputs."""
    domain, args, out_type, attrs = CASES[case]
    inputs, inits, feeds = [], [], {}
    for name, array, is_param in args:
        if is_param and not runtime_params:
            inits.append(numpy_helper.from_array(array, name))
            continue
        elem = helper.np_dtype_to_tensor_dtype(array.dtype)
        inputs.append(helper.make_tensor_value_info(name, elem, list(array.shape)))
        feeds[name] = array
    node = helper.make_node(case.split("_")[0], [a[0] for a in args], ["y"], name="op",
                            domain=domain, **attrs)
    graph = helper.make_graph([node], case, inputs,
                              [helper.make_tensor_value_info("y", out_type, None)], inits)
    return helper.make_model(graph, opset_imports=OPSETS, ir_version=8), feeds


@pytest.mark.parametrize("runtime_params", [False, True], ids=["const", "runtime"])
@pytest.mark.parametrize("case", list(CASES))
def test_one_op(tmp_path, case, runtime_params):
    model, feeds = one_op_model(case, runtime_params)
    onnx.save(model, tmp_path / "m.onnx")
    want = onnxruntime_outputs(tmp_path / "m.onnx", feeds)["y"]
    assert want.dtype == helper.tensor_dtype_to_np_dtype(CASES[case][2])
    # onnx's checker wants the output's shape, which its inference cannot give a contrib op
    model.graph.output[0].CopyFrom(tensor("y", CASES[case][2], list(want.shape)))
    onnx.save(model, tmp_path / "m.onnx")
    # the op table's reference (constant folding, the IR interpreter), then the bundles
    runs = {"reference": lambda: interpreter.run(import_model(tmp_path / "m.onnx"), feeds)}
    for precision in ("fp32", "fp16") if not runtime_params else ("fp32",):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / precision, precision=precision)
        runs[precision] = lambda bundle=tmp_path / precision: run_bundle(bundle, feeds)
    for precision, run in runs.items():
        got = run()["y"]
        assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape)
        if want.dtype.kind == "f":
            tolerance = 2e-3 if precision == "fp16" else 1e-4
            assert np.abs(got - want).max() <= tolerance * np.abs(want).max(), precision
        else:
            diff = np.abs(got.astype(np.int32) - want)
            assert diff.max() <= 1, (precision, diff)
            if precision != "fp16" or case != "QuantizeLinear":  # (fp16 rounds x itself)
                assert diff.mean() <= 0.01, (precision, diff)


def test_qdq_with_contrib_quantize_ops(tmp_path):
    """quantize_static(QDQ, UseQDQContribOps): com.microsoft QuantizeLinear/DequantizeLinear
    are the ONNX ops, so the weights stay int8 as in any QDQ model. Compared with
    onnxruntime without graph optimizations (which would fuse the QDQ pairs into its
    integer kernels and requantize in between)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantFormat, quantize_static

    onnx.save(float_cnn(), tmp_path / "float.onnx")
    samples = iter([feeds_for("cnn", seed) for seed in range(4)])

    class Samples:
        def get_next(self):
            return next(samples, None)

    quantize_static(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"), Samples(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    extra_options={"UseQDQContribOps": True})
    domains = {(n.domain, n.op_type) for n in onnx.load(str(tmp_path / "q.onnx")).graph.node
               if n.domain}
    assert domains == {(MS, "QuantizeLinear"), (MS, "DequantizeLinear")}
    result = applec.compile(tmp_path / "q.onnx", output=tmp_path / "b", precision="fp32")
    weights = [ops for ops in report_ops(result, "DequantizeLinear") if ops and
               ops[0].startswith("constexpr")]
    assert weights == [["constexpr_blockwise_shift_scale"]] * 3
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), options,
                                   providers=["CPUExecutionProvider"])
    feeds = feeds_for("cnn", 7)
    check = compare("probs", run_bundle(tmp_path / "b", feeds)["probs"],
                    session.run(["probs"], feeds)[0], "fp32")
    assert check.max_rel <= 1e-4, check


# -- quantize_dynamic ------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"])
def test_quantize_dynamic_transformer(tmp_path, per_channel):
    """quantize_dynamic emits ONNX ops only (DynamicQuantizeLinear, MatMulInteger, a uint8
    Gather table with DequantizeLinear); onnxruntime fuses them into its contrib ops at
    session time, never in the file."""
    from onnxruntime.quantization import quantize_dynamic

    onnx.save(float_transformer(), tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"),
                     per_channel=per_channel)
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    feeds = {"ids": np.random.default_rng(6).integers(0, 50, (1, 6))}
    want = onnxruntime_outputs(tmp_path / "q.onnx", feeds)["y"]
    for precision in ("fp32", "fp16"):
        result = applec.compile(tmp_path / "q.onnx", output=tmp_path / precision,
                                precision=precision)
        ops = report_ops(result, "MatMulInteger")
        assert len(ops) == 6 and all("constexpr_blockwise_shift_scale" in o for o in ops)
        check = compare("y", run_bundle(tmp_path / precision, feeds)["y"], want, precision)
        assert check.max_rel <= 1e-4 if precision == "fp32" else check.cosine >= 0.999, check


# -- refusals --------------------------------------------------------------------------------------
def contrib_model(tmp_path, op: str, domain: str, inputs, outputs, inits=(), **attrs):
    node = helper.make_node(op, [i.name for i in inputs] + [i.name for i in inits], ["y"],
                            name="node", domain=domain, **attrs)
    opsets = OPSETS + ([helper.make_opsetid(domain, 1)] if domain not in ("", MS) else [])
    graph = helper.make_graph([node], "m", inputs, outputs, list(inits))
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), path)
    return path


@pytest.mark.parametrize("domain, op", [(MS, "QLinearWhere"), (MS, "FusedConv"),
                                        ("applec", "DequantizeWeight"),
                                        ("my.domain", "QLinearAdd")])
def test_other_contrib_ops_are_refused_with_their_domain(tmp_path, domain, op):
    path = contrib_model(tmp_path, op, domain, [tensor("x", F, [2])], [tensor("y", F, [2])])
    with pytest.raises(UnsupportedOpError,
                       match=rf"^unsupported op at opset 13: {domain}\.{op} \(node 'node'\)$"):
        applec.compile(path, output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


def pool_inits(dtype=np.uint8):
    return [numpy_helper.from_array(scale(0.02), "xs"), numpy_helper.from_array(zero(0, dtype), "xz"),
            numpy_helper.from_array(scale(0.02), "ys"), numpy_helper.from_array(zero(0, dtype), "yz")]


def test_ceil_mode_with_asymmetric_pads_fails_at_compile_time(tmp_path):
    path = contrib_model(tmp_path, "QLinearAveragePool", MS, [tensor("x", U8, [1, 1, 6, 6])],
                         [tensor("y", U8, [1, 1, 4, 4])], pool_inits(), kernel_shape=[2, 2],
                         strides=[2, 2], pads=[1, 1, 0, 0], ceil_mode=1)
    with pytest.raises(UnsupportedOpError, match="QLinearAveragePool node 'node': ceil_mode "
                                                 "with asymmetric pads"):
        applec.compile(path, output=tmp_path / "b")


def test_dilated_qlinear_conv_with_runtime_weight_fails_at_compile_time(tmp_path):
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"],
                            ["y"], dilations=[2, 2])
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("xs", scale(0.1)), ("xz", zero(0)), ("ws", scale(0.1)), ("wz", zero(0)),
        ("ys", scale(0.1)), ("yz", zero(0)))]
    graph = helper.make_graph([node], "m", [tensor("x", U8, [1, 1, 6, 6]),
                                            tensor("w", U8, [1, 1, 2, 2])],
                              [tensor("y", U8, [1, 1, 4, 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=OPSETS, ir_version=8), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpError, match="dilations with a run-time weight"):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b")


def test_mixed_quantized_types_are_a_model_error(tmp_path):
    inits = [numpy_helper.from_array(v, n) for n, v in (
        ("as", scale(0.1)), ("bs", scale(0.1)), ("cs", scale(0.1)))]
    node = helper.make_node("QLinearAdd", ["a", "as", "", "b", "bs", "", "cs"], ["y"],
                            name="node", domain=MS)
    graph = helper.make_graph([node], "m", [tensor("a", U8, [3]), tensor("b", I8, [3])],
                              [tensor("y", U8, [3])], inits)
    onnx.save(helper.make_model(graph, opset_imports=OPSETS, ir_version=8), tmp_path / "m.onnx")
    with pytest.raises(ModelError, match="com.microsoft.QLinearAdd node 'node': quantized "
                                         "inputs must share one type"):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b")
