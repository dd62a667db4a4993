"""The ops of applec/ops/activations.py end to end: the op table's rules against
onnxruntime, every case compiled (fp32 and fp16) and run by the reference executor, the
MIL ops each lowering picks, the numerics a composition is there for (Round's halves,
Asinh/Acosh near 0 and far out, Mish in fp16, zero norms), old-opset forms and the errors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from op_cases import (
    IR_VERSION,
    OpCase,
    case,
    constants,
    i64,
    input_names,
    make_inputs,
    make_model,
    output_names,
    w,
    x,
)

import applec
from applec.errors import ShapeError, UnsupportedOpError
from applec.ir import Graph
from applec.ops import evaluate, infer_node
from applec.validate import compare, onnxruntime_outputs

UNARY = [("Tan", "uniform"), ("Asin", "uniform"), ("Acos", "uniform"), ("Atan", "normal"),
         ("Sinh", "normal"), ("Cosh", "normal"), ("Asinh", "normal"), ("Atanh", "uniform"),
         ("Softsign", "normal"), ("Mish", "normal"), ("Round", "normal")]

CASES: list[OpCase] = [case(op.lower(), op, [x(2, 3, 4, kind=kind)], opset=18)
                       for op, kind in UNARY] + [
    case("acosh", "Acosh", [x(2, 3, 4, kind="ints 1..20")]),
    case("round_ints_and_halves", "Round", [x(4, 6, kind="ints -9..9")]),
    case("selu", "Selu", [x(2, 3, 4)]),
    case("selu_attrs", "Selu", [x(2, 3, 4)], {"alpha": 2.0, "gamma": 0.5}),
    case("celu", "Celu", [x(2, 3, 4)], opset=12),
    case("celu_alpha", "Celu", [x(2, 3, 4)], {"alpha": 2.0}, opset=12),
    # integer-valued floats: x == alpha must give 0
    case("thresholdedrelu", "ThresholdedRelu", [x(3, 8, kind="ints -3..3")]),
    case("thresholdedrelu_alpha", "ThresholdedRelu", [x(2, 3, 4)], {"alpha": 0.5}),
    case("shrink_hard", "Shrink", [x(3, 8)]),
    case("shrink_soft", "Shrink", [x(3, 8)], {"lambd": 0.5, "bias": 0.5}),
    case("shrink_int32", "Shrink", [x(3, 8, kind="ints -5..5", dtype="int32")],
         {"lambd": 1.5, "bias": 2.0}, fp16_ok=False),
    case("swish", "Swish", [x(2, 3, 4)], opset=24),
    case("swish_alpha", "Swish", [x(2, 3, 4)], {"alpha": 0.5}, opset=24),
    case("prelu_per_channel", "PRelu", [x(2, 3, 4, 4), w(3, 1, 1)]),
    case("prelu_one_slope", "PRelu", [x(2, 3, 4), w(1)]),
    case("prelu_rank3_channels", "PRelu", [x(2, 3, 4), w(3, 1)]),
    case("prelu_runtime_slope", "PRelu", [x(3, 4, 5), x(5)]),
    case("prelu_int32", "PRelu", [x(3, 4, kind="ints -5..5", dtype="int32"),
                                  w(4, kind="ints -2..2", dtype="int32")], fp16_ok=False),
    case("hardmax", "Hardmax", [x(3, 4, 5)]),
    case("hardmax_axis0", "Hardmax", [x(3, 4, 5)], {"axis": 0}),
    case("hardmax_opset11_flattens", "Hardmax", [x(2, 3, 4)], {"axis": 1}, opset=11),
    case("lpnormalization", "LpNormalization", [x(2, 3, 4)]),
    case("lpnormalization_p1_axis0", "LpNormalization", [x(3, 4)], {"p": 1, "axis": 0}),
    # onnx's inference of the function body needs `axes` spelled out (node tests cover
    # the default)
    case("mvn", "MeanVarianceNormalization", [x(2, 3, 4, 5)], {"axes": [0, 2, 3]}),
    case("mvn_axes", "MeanVarianceNormalization", [x(2, 3, 4)], {"axes": [0, 2]}),
    case("reducelogsum", "ReduceLogSum", [x(2, 3, 4, kind="positive"), i64(1)], opset=18),
    case("reducelogsum_all", "ReduceLogSum", [x(2, 3, 4, kind="positive")], {"keepdims": 0},
         opset=18),
    case("reducelogsum_noop", "ReduceLogSum", [x(2, 3, kind="positive")],
         {"noop_with_empty_axes": 1}, opset=18),
    case("reducelogsum_int32", "ReduceLogSum", [x(3, 4, kind="ints 1..9", dtype="int32"),
                                                i64(1)], opset=18, fp16_ok=False),
    case("groupnorm", "GroupNormalization", [x(2, 6, 3, 3), w(6), w(6)], {"num_groups": 3},
         opset=21),
    case("groupnorm_runtime_params", "GroupNormalization", [x(2, 4, 5), x(4), x(4)],
         {"num_groups": 2, "epsilon": 0.01}, opset=21),
    case("groupnorm_opset18_per_group", "GroupNormalization", [x(2, 6, 3, 3), w(3), w(3)],
         {"num_groups": 3}, opset=18),
    case("groupnorm_opset18_runtime", "GroupNormalization", [x(2, 4, 5), x(2), x(2)],
         {"num_groups": 2}, opset=18),
    case("rmsnorm", "RMSNormalization", [x(2, 3, 8), w(8)], opset=23),
    case("rmsnorm_axis1", "RMSNormalization", [x(2, 3, 4), w(3, 4)], {"axis": 1,
                                                                       "epsilon": 0.1},
         opset=23),
    case("rmsnorm_runtime_scale", "RMSNormalization", [x(2, 3, 4), x(4)], opset=23),
    case("lppool_p2", "LpPool", [x(1, 3, 6, 6)], {"kernel_shape": [2, 2]}, opset=18),
    case("lppool_p2_pads_strides", "LpPool", [x(1, 2, 7, 7)],
         {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}, opset=18),
    case("lppool_p2_1d_same", "LpPool", [x(1, 2, 9)],
         {"kernel_shape": [3], "auto_pad": "SAME_UPPER", "strides": [2]}, opset=18),
    case("lppool_p1", "LpPool", [x(1, 2, 5, 5)], {"kernel_shape": [2, 2], "p": 1}, opset=18),
    case("lppool_p3_dilated_ceil", "LpPool", [x(1, 2, 7, 7)],
         {"kernel_shape": [2, 2], "p": 3, "dilations": [2, 2], "strides": [2, 2],
          "ceil_mode": 1}, opset=18),
    case("lppool_p2_3d", "LpPool", [x(1, 2, 4, 4, 4)], {"kernel_shape": [2, 2, 2]},
         opset=18),
    case("globallppool", "GlobalLpPool", [x(2, 3, 4, 4)]),
    case("globallppool_p1", "GlobalLpPool", [x(2, 3, 5)], {"p": 1}),
    case("globallppool_p3", "GlobalLpPool", [x(1, 2, 3, 3)], {"p": 3}),
]

PARAMS = [pytest.param(c, precision, id=f"{c.id}-{precision}")
          for c in CASES for precision in ("fp32", "fp16") if precision == "fp32" or c.fp16_ok]


def typed_model(c: OpCase) -> onnx.ModelProto:
    """make_model, with the output typed like input 0 where onnx's inference leaves it
    untyped (GroupNormalization's context-dependent function): every op here keeps X's
    shape and dtype."""
    model = make_model(c)
    source = model.graph.input[0].type if model.graph.input else None
    for out in model.graph.output:
        if not out.type.HasField("tensor_type") and source is not None:
            out.type.CopyFrom(source)
    return model


def build_node(c: OpCase):
    """The case as one IR node (as tests/test_op_reference.py builds it)."""
    graph = Graph(c.id)
    consts = constants(c)
    values = []
    for name, spec in zip(input_names(c), c.inputs):
        if spec is None:
            values.append(None)
        elif name in consts:
            values.append(graph.const(consts[name], name))
        else:
            values.append(graph.add_input(name, spec.dtype, spec.shape))
    return graph.add_node(c.op_type, values, c.attrs, name=c.id, outputs=c.outputs)


# forms the importer rewrites before the op table sees them (checked compiled)
OLD_FORMS = {"hardmax_opset11_flattens", "groupnorm_opset18_per_group",
             "groupnorm_opset18_runtime"}


@pytest.mark.parametrize("c", [c for c in CASES if c.id not in OLD_FORMS], ids=lambda c: c.id)
def test_reference_matches_onnxruntime(c):
    """infer (shape, dtype) and reference (values) of the canonical form."""
    feeds = make_inputs(c, seed=0)
    session = ort.InferenceSession(typed_model(c).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    node = build_node(c)
    infer_node(node)
    args = [None if v is None else v.const if v.is_const else feeds[v.name]
            for v in node.inputs]
    for value, out, want in zip(node.outputs, evaluate(node, args), expected):
        assert (value.shape, value.dtype) == (want.shape, want.dtype)
        assert (out.shape, out.dtype) == (want.shape, want.dtype)
        if want.dtype.kind == "f":
            np.testing.assert_allclose(out, want, rtol=c.rtol, atol=c.atol)
        else:
            np.testing.assert_array_equal(out, want)


@pytest.mark.parametrize("c, precision", PARAMS)
def test_compiled_matches_onnxruntime(c, precision, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(typed_model(c), path)
    applec.compile(path, output=tmp_path / "b", precision=precision)
    feeds = make_inputs(c, seed=0)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    want = onnxruntime_outputs(path, feeds)
    for name in output_names(c):
        assert (got[name].shape, got[name].dtype) == (want[name].shape, want[name].dtype)
        check = compare(name, got[name], want[name], precision)
        if precision == "fp32" and want[name].dtype.kind == "f":
            assert check.max_rel <= 1e-4, check
        elif want[name].dtype.kind == "f":
            assert check.cosine >= 0.999, check
        else:
            assert check.ok, check


# -- what each lowering emits ------------------------------------------------------------
def compiled_mil_ops(c: OpCase, tmp_path, precision="fp32") -> list[str]:
    path = tmp_path / "op.onnx"
    onnx.save(typed_model(c), path)
    result = applec.compile(path, output=tmp_path / "b", precision=precision)
    return result.report["nodes"][c.id]["mil_ops"]


@pytest.mark.parametrize("case_id, expected", [
    ("prelu_per_channel", ["prelu"]),
    ("prelu_one_slope", ["leaky_relu"]),
    ("prelu_rank3_channels", ["less", "mul", "select"]),  # MIL prelu: one slope on rank 3
    ("prelu_runtime_slope", ["less", "mul", "select"]),
    ("swish", ["silu"]),
    ("celu", ["elu"]),
    ("lppool_p2", ["l2_pool"]),
    ("lppool_p2_1d_same", ["l2_pool"]),
    ("lppool_p1", ["abs", "conv"]),
    ("lppool_p2_3d", ["square", "conv", "sqrt"]),
    ("lppool_p3_dilated_ceil", ["abs", "pow", "conv", "pow"]),
    ("globallppool", ["reduce_l2_norm"]),
    ("tan", ["tan"]),
    ("softsign", ["softsign"]),
])
def test_lowering_picks(case_id, expected, tmp_path):
    c = next(c for c in CASES if c.id == case_id)
    assert compiled_mil_ops(c, tmp_path) == expected


def test_round_never_uses_mil_round(tmp_path):
    """MIL's round leaves halves to the compute unit; ONNX rounds them to even."""
    ops = compiled_mil_ops(next(c for c in CASES if c.id == "round"), tmp_path)
    assert "round" not in ops and "floor" in ops


# -- numerics the compositions exist for -------------------------------------------------
def unary_model(op_type: str, shape, attrs=None, opset=17, dtype=TensorProto.FLOAT):
    node = helper.make_node(op_type, ["x"], ["y"], name="n", **(attrs or {}))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", dtype, shape)],
                              [helper.make_tensor_value_info("y", dtype, shape)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=IR_VERSION)


def run_compiled(model, feeds, tmp_path, precision):
    path = tmp_path / f"m_{precision}.onnx"
    onnx.save(model, path)
    applec.compile(path, output=tmp_path / f"b_{precision}", precision=precision)
    return applec.load(tmp_path / f"b_{precision}", backend="reference").run(feeds)["y"]


HALVES = np.array([-4.5, -3.5, -2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 0.49999997,
                   -0.49999997, 1.4999999, 2.5000002, 8388609.0, -8388609.0, 1023.5, 1024.5,
                   np.inf, -np.inf, np.nan, 0.0], np.float32)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_round_halves_to_even(precision, tmp_path):
    feeds = {"x": HALVES}
    got = run_compiled(unary_model("Round", [HALVES.size]), feeds, tmp_path, precision)
    with np.errstate(over="ignore"):  # 8388609 is inf in fp16, as the program holds it
        held = HALVES.astype(np.float16 if precision == "fp16" else np.float32)
    np.testing.assert_array_equal(got, np.round(held).astype(np.float32))


def test_thresholded_relu_drops_alpha_itself(tmp_path):
    feeds = {"x": np.array([0.5, 0.49, 0.51, -1, 2], np.float32)}
    got = run_compiled(unary_model("ThresholdedRelu", [5], {"alpha": 0.5}), feeds, tmp_path,
                       "fp32")
    np.testing.assert_array_equal(got, np.float32([0, 0, 0.51, 0, 2]))


@pytest.mark.parametrize("op, fn, values, precision, rtol", [
    ("Asinh", np.arcsinh, [1e-7, -1e-4, 0.3, -2.0, 100.0, 1e5, -3e7, 3e38], "fp32", 1e-6),
    ("Asinh", np.arcsinh, [1e-3, -0.01, 0.3, 10.0, 300.0, -6e4], "fp16", 2.0 ** -10),
    ("Acosh", np.arccosh, [1.0, 1.0000001, 1.001, 2.0, 100.0, 1e6, 3e38], "fp32", 1e-6),
    ("Acosh", np.arccosh, [1.0, 1.002, 1.5, 30.0, 300.0, 6e4], "fp16", 2.0 ** -10),
])
def test_inverse_hyperbolics_keep_relative_precision(op, fn, values, precision, rtol,
                                                     tmp_path):
    """Relative error per element, near 0 (Asinh) or 1 (Acosh) and where x^2 overflows."""
    data = np.array(values, np.float32)
    got = run_compiled(unary_model(op, [data.size]), {"x": data}, tmp_path, precision)
    held = data.astype(np.float16 if precision == "fp16" else np.float32).astype(np.float64)
    np.testing.assert_allclose(got, fn(held), rtol=rtol, atol=0)


def test_acosh_below_one_is_nan(tmp_path):
    got = run_compiled(unary_model("Acosh", [3]), {"x": np.array([0.5, -2, 1], np.float32)},
                       tmp_path, "fp32")
    assert np.isnan(got[:2]).all() and got[2] == 0


def test_mish_fp16_extremes_stay_finite(tmp_path):
    data = np.array([-60000, -30, -5, -0.5, 0, 0.5, 5, 30, 60000], np.float32)
    got = run_compiled(unary_model("Mish", [data.size], opset=18), {"x": data}, tmp_path,
                       "fp16")
    want = data * np.tanh(np.logaddexp(0, data.astype(np.float64)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=2.0 ** -10, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_zero_slices_normalize_to_zero(precision, tmp_path):
    """MVN of a constant slice and the Lp normalization of a zero vector are 0, not NaN
    (1e-9 is 0 in fp16; the norm is replaced by 1 where it is 0)."""
    data = np.array([[3.0, 3.0, 3.0], [0.0, 0.0, 0.0], [1.0, -2.0, 2.0]], np.float32)
    (tmp_path / "mvn").mkdir()
    mvn = run_compiled(unary_model("MeanVarianceNormalization", [3, 3], {"axes": [1]}),
                       {"x": data}, tmp_path / "mvn", precision)
    lp = run_compiled(unary_model("LpNormalization", [3, 3], {"p": 2, "axis": 1}),
                      {"x": data}, tmp_path, precision)
    np.testing.assert_array_equal(mvn[:2], 0)
    np.testing.assert_array_equal(lp[1], 0)
    np.testing.assert_allclose(lp[2], [1 / 3, -2 / 3, 2 / 3], rtol=2.0 ** -10)


def test_reduce_log_sum_of_zeros_is_minus_inf(tmp_path):
    node = helper.make_node("ReduceLogSum", ["x"], ["y"], name="n", keepdims=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 3])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                              ir_version=IR_VERSION)
    got = run_compiled(model, {"x": np.zeros((2, 3), np.float32)}, tmp_path, "fp32")
    assert got.shape == () and got == -np.inf


def test_groupnorm_opset18_expands_per_group_params(tmp_path):
    """The per-group scale and bias of opset 18 fold to per-channel constants."""
    c = next(c for c in CASES if c.id == "groupnorm_opset18_per_group")
    path = tmp_path / "op.onnx"
    onnx.save(typed_model(c), path)
    result = applec.compile(path, output=tmp_path / "b", precision="fp32")
    lowered = [n for n, e in result.report["nodes"].items() if e.get("mil_ops")]
    assert lowered == [c.id]
    assert "layer_norm" in result.report["nodes"][c.id]["mil_ops"]


# -- errors ------------------------------------------------------------------------------
def test_fractional_shrink_bias_on_integers_is_refused(tmp_path):
    model = unary_model("Shrink", [4], {"lambd": 1.0, "bias": 0.5}, dtype=TensorProto.INT32)
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpError, match=r"Shrink node 'n': a fractional bias "
                                                 r"\(0.5\) on integers rounds per element"):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("op_type, attrs, inputs, message", [
    ("LpNormalization", {"p": 3}, [("x", [2, 3])],
     r"LpNormalization node 'n': p=3: only 1 and 2 are defined"),
    ("GroupNormalization", {"num_groups": 4}, [("x", [1, 6, 2]), ("s", [6]), ("b", [6])],
     r"GroupNormalization node 'n': num_groups 4 does not divide the 6 channels"),
    ("LpPool", {"kernel_shape": [2], "p": 0}, [("x", [1, 2, 4])],
     r"LpPool node 'n': p=0.0: an Lp norm needs p >= 1"),
])
def test_invalid_attributes_name_op_and_node(op_type, attrs, inputs, message, tmp_path):
    node = helper.make_node(op_type, [n for n, _ in inputs], ["y"], name="n", **attrs)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        n, TensorProto.FLOAT, s) for n, s in inputs], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, inputs[0][1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                ir_version=IR_VERSION), tmp_path / "m.onnx")
    with pytest.raises(ShapeError, match=message):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b")


def test_other_stash_types_are_refused(tmp_path):
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], name="n",
                            num_groups=2, stash_type=10)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        n, TensorProto.FLOAT, s) for n, s in (("x", [1, 6, 2]), ("s", [6]), ("b", [6]))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)],
                                ir_version=IR_VERSION), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedOpError, match=r"GroupNormalization node 'n': only "
                                                 r"stash_type=1 \(float32\) is supported"):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "b")


def test_hardmax_opset11_coerces_to_2d(tmp_path):
    """Before opset 13 Hardmax picks one maximum over all dims from `axis` on."""
    c = next(c for c in CASES if c.id == "hardmax_opset11_flattens")
    feeds = make_inputs(c)
    path = tmp_path / "op.onnx"
    onnx.save(typed_model(c), path)
    applec.compile(path, output=tmp_path / "b", precision="fp32")
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["out0"]
    assert got.reshape(2, -1).sum(axis=1).tolist() == [1, 1]
    flat = feeds["in0"].reshape(2, -1)
    np.testing.assert_array_equal(got.reshape(2, -1).argmax(axis=1), flat.argmax(axis=1))

