"""Quantized ONNX models (applec/ops/qdq.py, passes/fold_qdq_weights.py,
targets/coreml/rules_qdq.py), beyond the one-node cases of tests/op_cases.py:

- a QDQ CNN from onnxruntime's quantize_static: weights stay int8 in weight.bin (1/4 of the
  float bundle's), numbers equal onnxruntime's in fp32, cosine >= 0.999 in fp16;
- a dynamically quantized MLP (DynamicQuantizeLinear + MatMulInteger): exact in fp32; in
  fp16 its int32 accumulators cast to float overflow, which the report notes;
- hand-built QDQ weights: QuantizeLinear of a float weight, a Gather table, int4 blocks;
  what fold_qdq_weights compresses, what it folds and why;
- what CoreML cannot do fails at compile time, with UnsupportedOpError.

onnxruntime is run with graph optimizations off where it would fuse DequantizeLinear +
MatMul into its own int4 kernel (MatMulNBits), which quantizes activations on the way.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import applec
from applec import interpreter
from applec.errors import TargetError, UnsupportedOpError
from applec.onnx_import import import_model
from applec.passes import run_pipeline
from applec.testing import GraphBuilder, tensor
from applec.validate import compare, onnxruntime_outputs

F = TensorProto.FLOAT
WEIGHT_BIN = "partitions/p0.mlpackage/Data/com.apple.CoreML/weights/weight.bin"


def weight_bytes(bundle) -> int:
    return (bundle / WEIGHT_BIN).stat().st_size


def mil_ops(result, op_type: str) -> list[list[str]]:
    return [e.get("mil_ops") for e in result.report["nodes"].values() if e["op_type"] == op_type]


def spec_outputs(path, feeds) -> dict[str, np.ndarray]:
    """onnxruntime without graph optimizations: each op as the ONNX spec defines it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def run_bundle(bundle, feeds) -> dict[str, np.ndarray]:
    return applec.load(bundle, backend="reference").run(feeds)


# -- models ---------------------------------------------------------------------------------
def float_cnn() -> onnx.ModelProto:
    """Three convs and two dense layers: 581k weights, 97% of them in the MatMul and convs."""
    b = GraphBuilder(0)
    h = b.op("Relu", [b.op("Conv", ["image", b.weight("c1", (32, 3, 3, 3)),
                                    b.weight("c1b", (32,), 0.1)], pads=[1, 1, 1, 1])])
    for i, (n, c) in enumerate(((64, 32), (64, 64)), 2):
        h = b.op("Relu", [b.op("Conv", [h, b.weight(f"c{i}", (n, c, 3, 3)),
                                        b.weight(f"c{i}b", (n,), 0.1)],
                               pads=[1, 1, 1, 1], strides=[2, 2])])
    h = b.op("Flatten", [h], axis=1)
    h = b.op("Relu", [b.op("MatMul", [h, b.weight("fc1", (4096, 128))])])
    b.op("Gemm", [h, b.weight("fc2", (10, 128)), b.weight("fc2b", (10,), 0.1)], transB=1,
         name="logits")
    return b.model([tensor("image", F, [1, 3, 32, 32])], [tensor("logits", F, [1, 10])],
                   opset=13)


def float_mlp() -> onnx.ModelProto:
    b = GraphBuilder(1)
    h = b.op("Relu", [b.op("Add", [b.op("MatMul", ["x", b.weight("w1", (256, 512))]),
                                   b.weight("b1", (512,), 0.1)])])
    b.op("MatMul", [h, b.weight("w2", (512, 64))], name="y")
    return b.model([tensor("x", F, [4, 256])], [tensor("y", F, [4, 64])], opset=13)


@pytest.fixture(scope="module")
def static_qdq(tmp_path_factory):
    """The float CNN and its QDQ form (int8 per-channel weights, uint8 activations)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Samples(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.feeds = iter([{"image": rng.standard_normal((1, 3, 32, 32), np.float32)}
                               for _ in range(8)])

        def get_next(self):
            return next(self.feeds, None)

    root = tmp_path_factory.mktemp("static_qdq")
    onnx.save(float_cnn(), root / "float.onnx")
    quantize_static(str(root / "float.onnx"), str(root / "qdq.onnx"), Samples(),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return root


def image_feeds(seed: int = 1) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((1, 3, 32, 32), np.float32)}


# -- onnxruntime's quantizers ---------------------------------------------------------------
def test_static_qdq_weights_stay_int8(static_qdq, tmp_path):
    applec.compile(static_qdq / "float.onnx", output=tmp_path / "f", precision="fp32")
    result = applec.compile(static_qdq / "qdq.onnx", output=tmp_path / "q", precision="fp32")
    # every weight DequantizeLinear is one constexpr op; the int32 biases are folded
    weights = [ops for ops in mil_ops(result, "DequantizeLinear") if ops is not None and
               ops[0].startswith("constexpr")]
    assert weights == [["constexpr_blockwise_shift_scale"]] * 5
    assert not result.report["notes"]
    ratio = weight_bytes(tmp_path / "q") / weight_bytes(tmp_path / "f")
    assert 0.24 < ratio < 0.26, ratio  # int8 data + one fp32 scale and zero point per channel
    feeds = image_feeds()
    got = run_bundle(tmp_path / "q", feeds)["logits"]
    for want in (onnxruntime_outputs(static_qdq / "qdq.onnx", feeds)["logits"],
                 spec_outputs(static_qdq / "qdq.onnx", feeds)["logits"]):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert compare("logits", got, want, "fp32").max_rel <= 1e-4


def test_static_qdq_fp16(static_qdq, tmp_path):
    applec.compile(static_qdq / "qdq.onnx", output=tmp_path / "q", precision="fp16")
    feeds = image_feeds(2)
    got = run_bundle(tmp_path / "q", feeds)["logits"]
    want = onnxruntime_outputs(static_qdq / "qdq.onnx", feeds)["logits"]
    assert compare("logits", got, want, "fp16").cosine >= 0.999


def test_static_qdq_before_ios18(static_qdq, tmp_path):
    """Per-channel int8 is constexpr_affine_dequantize on iOS16/17."""
    result = applec.compile(static_qdq / "qdq.onnx", output=tmp_path / "q", precision="fp32",
                            deployment_target="macOS13")
    assert ["constexpr_affine_dequantize"] in mil_ops(result, "DequantizeLinear")
    feeds = image_feeds()
    got = run_bundle(tmp_path / "q", feeds)["logits"]
    want = spec_outputs(static_qdq / "qdq.onnx", feeds)["logits"]
    assert compare("logits", got, want, "fp32").max_rel <= 1e-4


def test_dynamic_quantized_mlp(tmp_path):
    """quantize_dynamic: DynamicQuantizeLinear + MatMulInteger (uint8 weights kept 8-bit)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx.save(float_mlp(), tmp_path / "float.onnx")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "q.onnx"),
                     weight_type=QuantType.QUInt8)
    result = applec.compile(tmp_path / "q.onnx", output=tmp_path / "b", precision="fp32")
    for ops in mil_ops(result, "MatMulInteger"):
        assert "constexpr_blockwise_shift_scale" in ops and "matmul" in ops
    assert weight_bytes(tmp_path / "b") < (256 * 512 + 512 * 64) * 1.05
    feeds = {"x": np.random.default_rng(3).standard_normal((4, 256), np.float32)}
    got = run_bundle(tmp_path / "b", feeds)["y"]
    want = onnxruntime_outputs(tmp_path / "q.onnx", feeds)["y"]
    assert compare("y", got, want, "fp32").max_rel <= 1e-4
    # fp16: the int32 accumulators onnxruntime's pattern casts to float overflow fp16, so
    # fp16 safety keeps each Cast and the Mul by the scales in fp32, by the static rule alone
    # (no calibration, no random-input check)
    result = applec.compile(tmp_path / "q.onnx", output=tmp_path / "b16", precision="fp16",
                            fp16_check=False)
    assert not any("compile with --precision fp32" in n for n in result.report["notes"])
    kept = result.report["fp16_safety"]["fp32_nodes"].values()
    assert sorted(r["op_type"] for r in kept) == ["Cast", "Cast", "Mul", "Mul"]
    assert {v["kind"] for v in result.report["fp16_safety"]["values"].values()} == {"range"}
    check = compare("y", run_bundle(tmp_path / "b16", feeds)["y"], want, "fp16")
    assert check.cosine >= 0.999, check


# -- hand-built QDQ weights -----------------------------------------------------------------
def qdq_weights_model() -> onnx.ModelProto:
    """A float weight through QuantizeLinear -> DequantizeLinear into MatMul; a uint8 Gather
    table (per tensor); int4 blocks into a second MatMul; an int8 constant into an Add."""
    rng = np.random.default_rng(4)
    nodes, inits = [], []

    def init(name, array, elem_type=None):
        if elem_type is None:
            inits.append(numpy_helper.from_array(np.asarray(array), name))
        else:
            inits.append(helper.make_tensor(name, elem_type, array.shape,
                                            array.reshape(-1).tolist()))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    table = node("DequantizeLinear", [
        init("table_q", rng.integers(0, 256, (50, 64)).astype(np.uint8)),
        init("table_s", np.float32(0.02)), init("table_zp", np.uint8(128))], "table")
    h = node("Gather", [table, "ids"], "embed")
    w1 = node("QuantizeLinear", [init("w1_f", rng.standard_normal((64, 96), np.float32)),
                                 init("w1_s", rng.uniform(0.01, 0.03, 96).astype(np.float32)),
                                 init("w1_zp", np.zeros(96, np.int8))], "w1_q", axis=1)
    w1 = node("DequantizeLinear", [w1, "w1_s", "w1_zp"], "w1", axis=1)
    h = node("Relu", [node("MatMul", [h, w1], "fc1")], "relu")
    w2 = node("DequantizeLinear", [
        init("w2_q", rng.integers(-8, 8, (96, 32)).astype(np.int8), TensorProto.INT4),
        init("w2_s", rng.uniform(0.01, 0.02, (3, 32)).astype(np.float32))], "w2",
        axis=0, block_size=32)
    h = node("MatMul", [h, w2], "fc2")
    bias = node("DequantizeLinear", [init("b_q", rng.integers(-100, 100, 32).astype(np.int8)),
                                     init("b_s", np.float32(0.01))], "bias")
    node("Add", [h, bias], "y")
    graph = helper.make_graph(nodes, "qdq_weights",
                              [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 5])],
                              [helper.make_tensor_value_info("y", F, [2, 5, 32])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                              ir_version=10)
    onnx.checker.check_model(model)
    return model


def ids_feeds() -> dict[str, np.ndarray]:
    return {"ids": np.random.default_rng(5).integers(0, 50, (2, 5))}


def test_fold_qdq_weights_structure(tmp_path):
    onnx.save(qdq_weights_model(), tmp_path / "m.onnx")
    graph = import_model(tmp_path / "m.onnx")
    before = interpreter.run(graph, ids_feeds())["y"]
    assert graph.op_counts()["DequantizeLinear"] == 4  # import folds none of them
    run_pipeline(graph)
    counts = graph.op_counts()
    assert counts.get("applec.DequantizeWeight") == 3 and "DequantizeLinear" not in counts
    compressed = {n.outputs[0].name: n for n in graph.nodes
                  if n.op_type == "applec.DequantizeWeight"}
    assert sorted(compressed) == ["table", "w1", "w2"]
    assert compressed["w1"].inputs[0].dtype == np.int8 and len(compressed["w1"].inputs) == 2
    assert compressed["table"].inputs[2].const.shape == (50, 1)  # per tensor -> per row
    assert compressed["w2"].attrs["bits"] == 4
    assert compressed["w2"].inputs[1].const.shape == (3, 32)  # one scale per 32 rows
    add = next(n for n in graph.nodes if n.op_type == "Add")
    assert add.inputs[1].is_const and add.inputs[1].dtype == np.float32  # folded, no note
    assert not graph.meta.get("notes")
    np.testing.assert_array_equal(interpreter.run(graph, ids_feeds())["y"], before)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_qdq_weights_compiled(tmp_path, precision):
    onnx.save(qdq_weights_model(), tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision=precision)
    assert sorted(map(tuple, filter(None, mil_ops(result, "DequantizeLinear")))) == \
        [("constexpr_blockwise_shift_scale",)] * 3
    # int8 table and w1, int4 w2, float bias and scales: well under a fp16 copy of them
    quantized = 50 * 64 + 64 * 96 + 96 * 32 // 2
    assert weight_bytes(tmp_path / "b") < quantized + 3000
    feeds = ids_feeds()
    got = run_bundle(tmp_path / "b", feeds)["y"]
    want = spec_outputs(tmp_path / "m.onnx", feeds)["y"]
    check = compare("y", got, want, precision)
    assert check.max_rel <= 1e-4 if precision == "fp32" else check.cosine >= 0.999, check


def blocked_weight_model(rows: int, block: int, opset: int = 21) -> onnx.ModelProto:
    rng = np.random.default_rng(6)
    q = numpy_helper.from_array(rng.integers(-128, 128, (rows, 8)).astype(np.int8), "w_q")
    s = numpy_helper.from_array(
        rng.uniform(0.01, 0.02, (-(-rows // block), 8)).astype(np.float32), "w_s")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq", axis=0,
                              block_size=block),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "blocked", [tensor("x", F, [2, rows])],
                              [tensor("y", F, [2, 8])], [q, s])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=10)


def test_block_that_does_not_divide_is_folded_with_a_note(tmp_path):
    onnx.save(blocked_weight_model(10, 4), tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32")
    assert result.report["nodes"]["dq"]["status"] == "folded"
    assert any("block_size 4 does not divide dim 0 (10)" in n for n in result.report["notes"])
    feeds = {"x": np.random.default_rng(7).standard_normal((2, 10), np.float32)}
    got = run_bundle(tmp_path / "b", feeds)["y"]
    assert compare("y", got, spec_outputs(tmp_path / "m.onnx", feeds)["y"], "fp32").ok


def test_blocked_int8_needs_ios18(tmp_path):
    onnx.save(blocked_weight_model(8, 4), tmp_path / "m.onnx")
    with pytest.raises(TargetError, match="needs iOS18"):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32",
                       deployment_target="macOS14")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("per_axis", [True, False], ids=["per_axis", "per_tensor"])
@pytest.mark.parametrize("deployment", [None, "macOS13"])
def test_conv_transpose_weight(tmp_path, per_axis, deployment):
    """A ConvTranspose weight (output channels on axis 1); a per-tensor scale is repeated
    per channel, as constexpr_affine_dequantize (before iOS18) wants."""
    rng = np.random.default_rng(9)
    shape = (6,) if per_axis else ()
    inits = [numpy_helper.from_array(rng.integers(-128, 128, (4, 6, 3, 3)).astype(np.int8), "q"),
             numpy_helper.from_array(rng.uniform(0.01, 0.02, shape).astype(np.float32), "s"),
             numpy_helper.from_array(rng.integers(-5, 5, shape).astype(np.int8), "zp")]
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["w"], axis=1, name="dq"),
             helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2])]
    graph = helper.make_graph(nodes, "deconv", [tensor("x", F, [1, 4, 5, 5])],
                              [tensor("y", F, [1, 6, 11, 11])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                                ir_version=8), tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32",
                            deployment_target=deployment)
    assert result.report["nodes"]["dq"]["mil_ops"] == [
        "constexpr_affine_dequantize" if deployment else "constexpr_blockwise_shift_scale"]
    feeds = {"x": rng.standard_normal((1, 4, 5, 5), np.float32)}
    got = run_bundle(tmp_path / "b", feeds)["y"]
    assert compare("y", got, spec_outputs(tmp_path / "m.onnx", feeds)["y"], "fp32").ok


# -- what CoreML cannot do ------------------------------------------------------------------
def one_node(tmp_path, node, inputs, outputs, inits=(), opset=21):
    graph = helper.make_graph([node], "one", inputs, outputs, list(inits))
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                ir_version=10), path)
    return path


@pytest.mark.parametrize("elem_type, match", [
    (TensorProto.INT4, "int4"),
    (TensorProto.FLOAT8E4M3FN, "quantized type float8_e4m3fn is not supported"),
])
def test_unsupported_activation_types_fail_at_compile_time(tmp_path, elem_type, match):
    node = helper.make_node("QuantizeLinear", ["x", "s"], ["y"], output_dtype=elem_type)
    path = one_node(tmp_path, node, [tensor("x", F, [4])],
                    [helper.make_tensor_value_info("y", elem_type, [4])],
                    [numpy_helper.from_array(np.float32(0.1), "s")])
    with pytest.raises(UnsupportedOpError, match=match):
        applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert not (tmp_path / "b").exists()


def test_dilated_conv_integer_with_runtime_weight_fails_at_compile_time(tmp_path):
    node = helper.make_node("ConvInteger", ["x", "w"], ["y"], dilations=[2, 2])
    path = one_node(tmp_path, node, [tensor("x", TensorProto.UINT8, [1, 1, 6, 6]),
                                     tensor("w", TensorProto.UINT8, [1, 1, 2, 2])],
                    [tensor("y", TensorProto.INT32, [1, 1, 4, 4])], opset=10)
    with pytest.raises(UnsupportedOpError, match="dilations with a run-time weight"):
        applec.compile(path, output=tmp_path / "b", precision="fp32")


def test_exactness_note_for_large_integer_products(tmp_path):
    """K * 255 * 255 >= 2^24: fp32 sums may round in the worst case; the report says so."""
    node = helper.make_node("MatMulInteger", ["a", "b"], ["y"])
    rng = np.random.default_rng(8)
    path = one_node(tmp_path, node, [tensor("a", TensorProto.UINT8, [2, 300])],
                    [tensor("y", TensorProto.INT32, [2, 4])],
                    [numpy_helper.from_array(rng.integers(0, 256, (300, 4)).astype(np.uint8),
                                             "b")], opset=10)
    result = applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert any("exact while partial sums stay below 2^24" in n for n in result.report["notes"])
    feeds = {"a": rng.integers(0, 256, (2, 300)).astype(np.uint8)}
    got = run_bundle(tmp_path / "b", feeds)["y"]
    np.testing.assert_array_equal(got, onnxruntime_outputs(path, feeds)["y"])


# -- a quantized embedding table: Gather then DequantizeLinear ------------------------------
def gathered_table_model(scale_shape: tuple, axis: int, ids_shape=(2, 5)) -> onnx.ModelProto:
    """quantize_dynamic's embedding form: Gather from a uint8 table, then DequantizeLinear."""
    rng = np.random.default_rng(7)
    table = rng.integers(0, 256, (50, 16)).astype(np.uint8)
    scale = (rng.random(scale_shape) * 0.1 + 0.01).astype(np.float32)
    zero = rng.integers(100, 150, scale_shape).astype(np.uint8)
    out_shape = list(ids_shape) + [16]
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0, name="embed"),
         helper.make_node("DequantizeLinear", ["rows", "scale", "zero"], ["y"], axis=axis,
                          name="dequantize")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, list(ids_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (scale, "scale"),
                                                     (zero, "zero"))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("scale_shape, axis, compressed", [
    ((), 1, True),      # per tensor
    ((16,), 2, True),   # per column of the table: an axis the Gather keeps
    ((5,), 1, False),   # along the gathered indices: stays Gather, then dequantize
])
def test_gathered_table_stays_8_bit(tmp_path, scale_shape, axis, compressed):
    onnx.save(gathered_table_model(scale_shape, axis), tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32")
    nodes = result.report["nodes"]
    if compressed:
        assert nodes["dequantize"]["mil_ops"][0] == "constexpr_blockwise_shift_scale"
        assert nodes["embed"]["status"] == "fused" and \
            nodes["embed"]["fused_into"] == "dequantize"
        # one byte an entry plus scales and blob headers: under half the int32 table's 3200
        assert weight_bytes(tmp_path / "b") < 50 * 16 * 4 / 2
    else:
        assert nodes["embed"]["status"] == "lowered"
        assert "constexpr_blockwise_shift_scale" not in nodes["dequantize"]["mil_ops"]
    ids = np.random.default_rng(8).integers(0, 50, (2, 5)).astype(np.int64)
    got = run_bundle(tmp_path / "b", {"ids": ids})["y"]
    want = onnxruntime_outputs(tmp_path / "m.onnx", {"ids": ids})["y"]
    np.testing.assert_array_equal(got, want)
