"""Indexing, scatter and sampling ops (applec/ops/indexing.py, targets/coreml/rules_indexing.py)
against onnxruntime: each case's numpy reference (the IR interpreter) and its compiled
bundle on the reference executor, fp32 (max relative error <= 1e-4, integers exact) and
fp16 (cosine >= 0.999); then the MIL ops chosen, the legacy forms the importer rewrites,
and the compile-time errors for what is refused.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from op_cases import case, i64, make_inputs, make_model, output_names, scalar, w, x

import applec
from applec import interpreter
from applec.errors import UnsupportedOpError
from applec.onnx_import import import_model
from applec.validate import compare, onnxruntime_outputs


def f32(*values) -> np.ndarray:
    return np.array(values, np.float32)


def b(*values) -> np.ndarray:
    return np.array(values, bool)


# grids are standard normal: mostly inside [-1, 1], some outside, so padding matters
GRID_SAMPLE = [
    case(f"grid_sample_{mode}_{padding}_align{align}", "GridSample",
         [x(2, 3, 4, 5), x(2, 3, 6, 2)],
         {"mode": mode, "padding_mode": padding, "align_corners": align}, opset=20,
         fp16_ok=not align)  # fp16: half of them is enough
    for mode in ("linear", "nearest") for padding in ("zeros", "border", "reflection")
    for align in (0, 1)
] + [
    case("grid_sample_3d_linear", "GridSample", [x(1, 2, 3, 4, 5), x(1, 2, 3, 4, 3)],
         {"mode": "linear", "padding_mode": "border"}, opset=20),
    case("grid_sample_3d_nearest", "GridSample", [x(1, 2, 3, 4, 5), x(1, 2, 3, 4, 3)],
         {"mode": "nearest", "align_corners": 1}, opset=20),
    case("grid_sample_constant_grid", "GridSample", [x(1, 2, 4, 4), w(1, 3, 3, 2)],
         {"mode": "nearest", "padding_mode": "reflection"}, opset=20),
    case("grid_sample_v16_bilinear", "GridSample", [x(1, 2, 4, 4), x(1, 5, 5, 2)],
         {"mode": "bilinear"}, opset=16),
]

CASES = [
    # block rearrangement
    case("depth_to_space_dcr", "DepthToSpace", [x(2, 8, 3, 2)], {"blocksize": 2}, opset=13),
    case("depth_to_space_crd", "DepthToSpace", [x(2, 18, 2, 3)],
         {"blocksize": 3, "mode": "CRD"}, opset=13),
    case("depth_to_space_uint8", "DepthToSpace", [x(1, 4, 2, 2, kind="ints 0..200",
                                                    dtype="uint8")], {"blocksize": 2},
         opset=13, fp16_ok=False),
    case("space_to_depth", "SpaceToDepth", [x(2, 3, 4, 6)], {"blocksize": 2}, opset=13),
    case("space_to_depth_uint8", "SpaceToDepth", [x(1, 2, 4, 2, kind="ints 0..200",
                                                    dtype="uint8")],
         {"blocksize": 2}, opset=13, fp16_ok=False),
    # scatters: duplicates only where a reduction makes them well defined
    case("scatter_nd", "ScatterND", [x(4, 3, 2), i64(1, -1).reshape(2, 1), x(2, 3, 2)],
         opset=16),
    case("scatter_nd_runtime_indices", "ScatterND",
         [x(5, 4), x(1, 2, kind="ints -4..3", dtype="int64"), x(1)], opset=16),
    case("scatter_nd_add", "ScatterND",
         [x(4, 3), x(5, 1, kind="ints -4..3", dtype="int64"), x(5, 3)],
         {"reduction": "add"}, opset=16),
    case("scatter_nd_mul", "ScatterND",
         [x(4, 3), x(5, 1, kind="ints -4..3", dtype="int64"), x(5, 3)],
         {"reduction": "mul"}, opset=16),
    case("scatter_nd_max", "ScatterND",
         [x(3, 4), x(6, 2, kind="ints 0..2", dtype="int64"), x(6)], {"reduction": "max"},
         opset=18),
    case("scatter_nd_min_int32", "ScatterND",
         [x(3, 4, kind="ints -9..9", dtype="int32"), x(6, 2, kind="ints 0..2", dtype="int64"),
          x(6, kind="ints -9..9", dtype="int32")], {"reduction": "min"}, opset=18,
         fp16_ok=False),
    case("scatter_elements", "ScatterElements",
         [x(4, 3), x(1, 3, kind="ints -4..3", dtype="int64"), x(1, 3)], opset=16),
    case("scatter_elements_narrow", "ScatterElements",
         [x(4, 5), i64(0, -1, 2, 4, 1, 3).reshape(2, 3), x(2, 3)], {"axis": 1}, opset=16),
    case("scatter_elements_narrow_add", "ScatterElements",
         [x(4, 5), x(2, 6, kind="ints -5..4", dtype="int64"), x(2, 6)],
         {"axis": 1, "reduction": "add"}, opset=16),
    case("scatter_elements_mul", "ScatterElements",
         [x(3, 4), x(3, 4, kind="ints -3..2", dtype="int32"), x(3, 4)],
         {"reduction": "mul"}, opset=16),
    case("scatter_elements_max", "ScatterElements",
         [x(3, 4), x(3, 4, kind="ints 0..2", dtype="int64"), x(3, 4)],
         {"reduction": "max"}, opset=18),
    case("scatter_elements_min", "ScatterElements",
         [x(2, 3, 4), x(2, 3, 2, kind="ints -4..3", dtype="int64"), x(2, 3, 2)],
         {"axis": -1, "reduction": "min"}, opset=18),
    case("scatter_elements_bool", "ScatterElements",
         [x(3, 3, kind="bool", dtype="bool"), i64(2, 0, 1).reshape(1, 3),
          x(1, 3, kind="bool", dtype="bool")], opset=16, fp16_ok=False),
    case("scatter_deprecated", "Scatter", [x(3, 3), i64(1, 0, 2, 0, 2, 1).reshape(2, 3),
                                           x(2, 3)], {"axis": 1}, opset=10),
    # one-hot (out-of-range indices give all-off rows)
    case("one_hot", "OneHot", [x(2, 3, kind="ints -6..6", dtype="int64"),
                               scalar(5, np.int64), f32(-1, 3)], opset=11),
    case("one_hot_axis0_runtime_values", "OneHot",
         [x(4, kind="ints -3..2", dtype="int32"), scalar(3.0, np.float32), x(2)],
         {"axis": 0}, opset=11),
    case("one_hot_float_indices", "OneHot",
         [x(2, 3, kind="ints -5..5"), scalar(4, np.int64), i64(0, 5)], opset=11,
         fp16_ok=False),
    case("one_hot_int_values", "OneHot", [x(2, 2, kind="ints 0..3", dtype="int64"),
                                          i64(4), i64(2, 9)], {"axis": -2}, opset=11,
         fp16_ok=False),
    # constructing
    case("eye_like", "EyeLike", [x(3, 4)], {"k": 1}, opset=22),
    case("eye_like_int64_below", "EyeLike", [x(4, 4)], {"k": -1, "dtype": np.dtype(np.int64)},
         opset=22, fp16_ok=False),
    # einsum, as exporters write it
    case("einsum_batch_matmul", "Einsum", [x(2, 3, 4), x(2, 4, 5)],
         {"equation": "bij,bjk->bik"}, opset=12),
    case("einsum_attention_scores", "Einsum", [x(1, 2, 3, 4), x(1, 2, 5, 4)],
         {"equation": "bhid,bhjd->bhij"}, opset=12),
    case("einsum_attention_values", "Einsum", [x(1, 2, 3, 5), x(1, 2, 5, 4)],
         {"equation": "bhij,bhjd->bihd"}, opset=12),
    case("einsum_outer", "Einsum", [x(3), x(4)], {"equation": "i,j->ij"}, opset=12),
    case("einsum_inner", "Einsum", [x(5), x(5)], {"equation": "i,i"}, opset=12),
    case("einsum_trace", "Einsum", [x(2, 3, 3)], {"equation": "...ii->...i"}, opset=12),
    case("einsum_implicit", "Einsum", [x(2, 3), x(3, 4)], {"equation": "ij,jk"}, opset=12),
    case("einsum_sum_transpose", "Einsum", [x(3, 4, 2)], {"equation": "ijk->ki"}, opset=12),
    case("einsum_chain", "Einsum", [x(2, 3), x(3, 4), x(4, 2)],
         {"equation": "ij,jk,kl->il"}, opset=12),
    case("einsum_broadcast", "Einsum", [x(2, 1, 3, 4), x(1, 3, 4, 5)],
         {"equation": "...ij,...jk->...ik"}, opset=12),
    case("einsum_broadcast_summed", "Einsum", [x(2, 3), x(1)], {"equation": "ij,j->i"},
         opset=12),
    case("einsum_int32", "Einsum", [x(2, 3, kind="ints -5..5", dtype="int32"),
                                    x(3, 2, kind="ints -5..5", dtype="int32")],
         {"equation": "ij,jk->ik"}, opset=12, fp16_ok=False),
    # data movement
    case("reverse_sequence_time_major", "ReverseSequence",
         [x(4, 3, 2), x(3, kind="ints 0..4", dtype="int64")],
         {"batch_axis": 1, "time_axis": 0}, opset=10),
    case("reverse_sequence_batch_major", "ReverseSequence", [x(2, 5), i64(5, 2)],
         {"batch_axis": 0, "time_axis": 1}, opset=10),
    case("center_crop_pad", "CenterCropPad", [x(5, 4, 3), i64(2, 7, 3)], opset=18),
    case("center_crop_pad_axes", "CenterCropPad", [x(2, 6, 5), i64(3, 8)],
         {"axes": [-2, -1]}, opset=18),
    case("center_crop_pad_int32", "CenterCropPad",
         [x(3, 4, kind="ints -9..9", dtype="int32"), i64(6, 1)], opset=18, fp16_ok=False),
    # data-dependent shapes, with the data known at compile time
    case("compress", "Compress", [x(3, 4), b(True, False, True, True)], {"axis": 1},
         opset=11),
    case("compress_flat_short_condition", "Compress",
         [x(2, 3), b(False, True, True, False, True)], opset=11),
    case("non_zero_constant", "NonZero", [np.array([[0, 2, 0], [-1, 0, 3]], np.int64)],
         opset=13, fp16_ok=False),
] + GRID_SAMPLE

PARAMS = [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in ("fp32", "fp16")
          if p == "fp32" or c.fp16_ok]


def check_against(got: dict, want: dict, names, precision: str):
    for name in names:
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        result = compare(name, got[name], want[name], precision)
        if precision == "fp32" and want[name].dtype.kind == "f":
            assert result.max_rel <= 1e-4, result
        elif want[name].dtype.kind == "f":
            assert result.cosine >= 0.999, result
        else:
            assert result.ok, result


@pytest.mark.parametrize("op_case", CASES, ids=[c.id for c in CASES])
def test_reference_matches_onnxruntime(op_case, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(op_case), path)
    feeds = make_inputs(op_case, seed=1)
    got = interpreter.run(import_model(path), feeds)
    check_against(got, onnxruntime_outputs(path, feeds), output_names(op_case), "fp32")


@pytest.mark.parametrize("op_case, precision", PARAMS)
def test_compiled_matches_onnxruntime(op_case, precision, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(op_case), path)
    applec.compile(path, output=tmp_path / "b", precision=precision)
    feeds = make_inputs(op_case, seed=0)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check_against(got, onnxruntime_outputs(path, feeds), output_names(op_case), precision)


# -- what the lowering emits -------------------------------------------------------------
def compiled_mil_ops(op_case, tmp_path) -> list[str]:
    path = tmp_path / "op.onnx"
    onnx.save(make_model(op_case), path)
    result = applec.compile(path, output=tmp_path / "b", precision="fp32")
    return result.report["nodes"][op_case.id]["mil_ops"]


BY_ID = {c.id: c for c in CASES}
EMITTED = {  # case -> the MIL op types its node becomes
    "depth_to_space_dcr": {"reshape", "transpose"},  # rank <= 5 throughout
    "space_to_depth": {"reshape", "transpose"},
    "einsum_attention_scores": {"transpose", "reshape", "matmul"},
    "einsum_outer": {"reshape", "mul"},
    "scatter_elements": {"less", "add", "select", "scatter_along_axis"},
    "scatter_elements_narrow": {"reshape", "scatter_nd"},
}


@pytest.mark.parametrize("case_id", EMITTED)
def test_mil_ops_emitted(case_id, tmp_path):
    assert set(compiled_mil_ops(BY_ID[case_id], tmp_path)) == EMITTED[case_id]


def test_einsum_batch_matmul_is_one_matmul(tmp_path):
    ops = compiled_mil_ops(BY_ID["einsum_batch_matmul"], tmp_path)
    assert ops.count("matmul") == 1 and "transpose" not in ops, ops


def test_grid_sample_gathers_per_corner(tmp_path):
    ops = compiled_mil_ops(BY_ID["grid_sample_linear_zeros_align0"], tmp_path)
    assert ops.count("gather") == 4 and "resample" not in ops, ops


# -- forms checked against onnx's reference (onnxruntime lacks them) -----------------------
def single_node_model(op, inputs: dict, attrs, opset, initializers=()):
    node = helper.make_node(op, list(inputs) + [i.name for i in initializers], ["y"], **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(
            n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape) for n, a in inputs.items()],
        [onnx.ValueInfoProto(name="y")], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=10)
    return onnx.shape_inference.infer_shapes(model, strict_mode=True)


@pytest.mark.parametrize("mode", ["CRD", "DCR"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_space_to_depth_modes_of_opset_28(mode, precision, tmp_path):
    feeds = {"x": np.random.default_rng(3).standard_normal((2, 3, 4, 6)).astype(np.float32)}
    model = single_node_model("SpaceToDepth", feeds, {"blocksize": 2, "mode": mode}, 28)
    onnx.save(model, tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision=precision)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    want = ReferenceEvaluator(model).run(None, feeds)[0]
    assert got.shape == want.shape
    tolerance = 0 if precision == "fp32" else 1e-3  # data movement: exact, or fp16-rounded
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


def test_grid_sample_nearest_on_integers(tmp_path):
    """Nearest sampling moves values: integer images work too (onnxruntime has no kernel
    for them)."""
    rng = np.random.default_rng(5)
    feeds = {"x": rng.integers(-1000, 1000, (1, 2, 4, 5)).astype(np.int32),
             "grid": rng.standard_normal((1, 3, 3, 2)).astype(np.float32)}
    model = single_node_model("GridSample", feeds, {"mode": "nearest",
                                                    "padding_mode": "reflection"}, 20)
    onnx.save(model, tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp16")
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    np.testing.assert_array_equal(got, ReferenceEvaluator(model).run(None, feeds)[0])


def test_grid_sample_nearest_rounds_ties_to_even(tmp_path):
    """Coordinates landing exactly on .5 go to the even pixel (std::nearbyint)."""
    width = 4  # align_corners=0: x = ((g + 1) * 4 - 1) / 2, so g = k / 4 gives x = k / 2 ...
    g = (np.arange(-4, 5, dtype=np.float32) / width)  # ... x in -0.5, 0, 0.5, ..., 3.5
    grid = np.stack([g, np.zeros_like(g)], axis=-1).reshape(1, 1, -1, 2)
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(1, 1, 2, 4) + 1, "grid": grid}
    model = single_node_model("GridSample", feeds, {"mode": "nearest"}, 20)
    onnx.save(model, tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32")
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    want = onnxruntime_outputs(tmp_path / "m.onnx", feeds)["y"]
    np.testing.assert_array_equal(got, want)
    # row 0.5 rounds to row 0; x = -0.5, 0.5, 1.5, 2.5, 3.5 round to 0, 0, 2, 2, 4 (outside)
    np.testing.assert_array_equal(got.reshape(-1), [1, 1, 1, 2, 3, 3, 3, 4, 0])


def test_one_hot_fractional_float_indices_match_nothing(tmp_path):
    """onnxruntime and the ONNX reference compare float indices as they are (the spec's
    cast to int64 would make 2.5 hit 2); applec does as they do."""
    feeds = {"indices": np.array([1.0, 2.5, -1.0, -1.5, 4.0], np.float32)}
    constants = [numpy_helper.from_array(np.array(4, np.int64), "depth"),
                 numpy_helper.from_array(np.array([0, 7], np.int64), "values")]
    model = single_node_model("OneHot", feeds, {}, 11, constants)
    onnx.save(model, tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32")
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    np.testing.assert_array_equal(got, onnxruntime_outputs(tmp_path / "m.onnx", feeds)["y"])
    np.testing.assert_array_equal(got.argmax(axis=1)[got.max(axis=1) > 0], [1, 3])


# -- refused at compile time ---------------------------------------------------------------
REFUSED = [
    (case("grid_sample_cubic", "GridSample", [x(1, 1, 4, 4), x(1, 2, 2, 2)],
          {"mode": "cubic"}, opset=20), "mode 'cubic' is not supported"),
    (case("grid_sample_linear_int", "GridSample",
          [x(1, 1, 4, 4, kind="ints 0..9", dtype="int32"), x(1, 2, 2, 2)], opset=20),
     "linear sampling of non-float data is not supported"),
    (case("non_zero_runtime", "NonZero", [x(3, 4)], opset=13),
     (r"NonZero node 'non_zero_runtime': the output shape depends on run-time data \(the "
      r"number of non-zero elements of 'in0'\)")),
    (case("compress_runtime_condition", "Compress", [x(3, 4), x(3, kind="bool", dtype="bool")],
          {"axis": 0}, opset=11),
     "Compress node 'compress_runtime_condition': the output shape depends on run-time data"),
    (case("einsum_rank6", "Einsum", [x(2, 2), x(2, 2), x(2, 2), x(2, 2, 2), x(2, 2, 2)],
          {"equation": "ab,cd,ef,abc,def->a"}, opset=12),
     "equation 'ab,cd,ef,abc,def->a' needs an intermediate of rank 6"),
]


@pytest.mark.parametrize("op_case, message", REFUSED, ids=[c.id for c, _ in REFUSED])
def test_refused_at_compile_time(op_case, message, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(op_case), path)
    with pytest.raises(UnsupportedOpError, match=message):
        applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert not (tmp_path / "b").exists()


def test_non_zero_feeding_a_shape_folds(tmp_path):
    """NonZero of a constant (an exporter's mask) folds, and so does what reads it."""
    mask = numpy_helper.from_array(np.array([[1, 0], [0, 1], [1, 1]], np.float32), "mask")
    nodes = [helper.make_node("NonZero", ["mask"], ["nz"]),
             helper.make_node("Transpose", ["nz"], ["pairs"]),
             helper.make_node("GatherND", ["x", "pairs"], ["y"])]
    graph = helper.make_graph(nodes, "nz", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [3, 2])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [4])], [mask])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              ir_version=10)
    onnx.save(model, tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", precision="fp32")
    statuses = {e["op_type"]: e["status"] for e in result.report["nodes"].values()}
    assert statuses["NonZero"] == "folded" and statuses["Transpose"] == "folded"
    feeds = {"x": np.arange(6, dtype=np.float32).reshape(3, 2)}
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    np.testing.assert_array_equal(got, [0, 3, 4, 5])
