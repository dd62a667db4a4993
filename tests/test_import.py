"""ONNX import: opset forms, constants, external data, int64, shape folding."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import seeded
from onnx import TensorProto, helper, numpy_helper

import applec
from applec.onnx_import import import_model
from applec.testing import GraphBuilder, tensor


def save(tmp_path, model, name="m.onnx"):
    path = tmp_path / name
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("opset", [11, 13, 17, 18])
def test_axes_attribute_or_input_by_opset(compiled, opset):
    """Squeeze/Unsqueeze/ReduceMean/Split take axes as attributes in old opsets."""
    b = GraphBuilder()
    axes_kw = lambda name, value: ({} if opset >= 13 else {"axes": value})  # noqa: E731
    axes_in = lambda value: ([b.init(f"ax{b.count}", np.asarray(value, np.int64))]  # noqa: E731
                             if opset >= 13 else [])
    u = b.op("Unsqueeze", ["x"] + axes_in([0]), **axes_kw("u", [0]))
    s = b.op("Squeeze", [u] + axes_in([0]), **axes_kw("s", [0]))
    reduce_axes = ([b.init("rax", np.asarray([1], np.int64))] if opset >= 18 else [])
    r = b.op("ReduceMean", [s] + reduce_axes, keepdims=1,
             **({} if opset >= 18 else {"axes": [1]}))
    split_in = [b.init("sp", np.asarray([2, 2], np.int64))] if opset >= 13 else []
    halves = b.op("Split", ["x"] + split_in, n_out=2, axis=1,
                  **({} if opset >= 13 else {"split": [2, 2]}))
    b.op("Add", [halves[0], halves[1]], name="y")
    b.op("Identity", [r], name="m")
    model = b.model([tensor("x", TensorProto.FLOAT, [3, 4])],
                    [tensor("y", TensorProto.FLOAT, [3, 2]), tensor("m", TensorProto.FLOAT, [3, 1])],
                    opset=opset)
    compiled(model, "fp32").check({"x": seeded((3, 4))})


@pytest.mark.parametrize("axis", [1, 2])
def test_softmax_before_opset_13_flattens(compiled, axis):
    b = GraphBuilder()
    b.op("Softmax", ["x"], axis=axis, name="y")
    model = b.model([tensor("x", TensorProto.FLOAT, [2, 3, 4])],
                    [tensor("y", TensorProto.FLOAT, [2, 3, 4])], opset=11)
    compiled(model, "fp32").check({"x": seeded((2, 3, 4))})


def test_constant_nodes_become_constants(tmp_path):
    b = GraphBuilder()
    b.nodes.append(helper.make_node("Constant", [], ["w"], name="const_w",
                                    value=numpy_helper.from_array(np.ones((4, 4), np.float32))))
    b.op("MatMul", ["x", "w"], name="y")
    path = save(tmp_path, b.model([tensor("x", TensorProto.FLOAT, [2, 4])],
                                  [tensor("y", TensorProto.FLOAT, [2, 4])]))
    graph = import_model(path)
    assert graph.op_counts() == {"MatMul": 1}
    assert graph.nodes[0].inputs[1].is_const
    assert graph.meta["report"]["const_w"]["status"] == "folded"


def test_shape_subgraph_folds_to_constant_reshape(tmp_path):
    b = GraphBuilder()
    dim = b.op("Gather", [b.op("Shape", ["x"]), b.init("zero", np.asarray(0, np.int64))])
    shape = b.op("Concat", [b.op("Unsqueeze", [dim, b.init("ax", np.asarray([0], np.int64))]),
                            b.init("rest", np.asarray([-1], np.int64))], axis=0)
    b.op("Reshape", ["x", shape], name="y")
    path = save(tmp_path, b.model([tensor("x", TensorProto.FLOAT, ["n", 3, 4])],
                                  [tensor("y", TensorProto.FLOAT, ["n", 12])]))
    graph = import_model(path, {"x": (5, 3, 4)})
    assert graph.op_counts() == {"Reshape": 1}
    assert graph.nodes[0].inputs[1].const.tolist() == [5, -1]
    assert graph.outputs[0].shape == (5, 12)


def test_external_data(tmp_path, compiled):
    b = GraphBuilder()
    b.op("MatMul", ["x", b.weight("w", (64, 64))], name="y")
    model = b.model([tensor("x", TensorProto.FLOAT, [2, 64])],
                    [tensor("y", TensorProto.FLOAT, [2, 64])])
    weight = numpy_helper.to_array(model.graph.initializer[0])
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    assert (tmp_path / "ext.weights").stat().st_size == 64 * 64 * 4
    bundle = applec.compile(path, output=tmp_path / "ext.bundle", precision="fp32")
    x = seeded((2, 64))
    got = applec.load(bundle.bundle).run({"x": x})["y"]
    np.testing.assert_allclose(got, x @ weight,
                               rtol=1e-4, atol=1e-5)
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(applec.ApplecError, match="ext.onnx: cannot load external data"):
        applec.compile(path, output=tmp_path / "again.bundle")


def test_graph_input_with_initializer_is_a_constant(tmp_path):
    b = GraphBuilder()
    b.op("Add", ["x", b.init("bias", np.full(4, 2, np.float32))], name="y")
    model = b.model([tensor("x", TensorProto.FLOAT, [1, 4]),
                     tensor("bias", TensorProto.FLOAT, [4])],
                    [tensor("y", TensorProto.FLOAT, [1, 4])])
    graph = import_model(save(tmp_path, model))
    assert [v.name for v in graph.inputs] == ["x"]
    assert graph.nodes[0].inputs[1].is_const


def test_unused_outputs_are_dropped(tmp_path, compiled):
    b = GraphBuilder()
    b.op("Relu", ["x"], name="y")
    b.op("Sigmoid", ["x"], name="dead")
    b.nodes.append(helper.make_node("Split", ["x"], ["a", "unused"], name="split", axis=1))
    b.op("Neg", ["a"], name="z")
    model = b.model([tensor("x", TensorProto.FLOAT, [2, 4])],
                    [tensor("y", TensorProto.FLOAT, [2, 4]), tensor("z", TensorProto.FLOAT, [2, 2])],
                    opset=17)
    c = compiled(model, "fp32")
    c.check({"x": seeded((2, 4))})
    assert c.result.report["nodes"]["dead"]["status"] == "eliminated"


def test_int64_constants_saturate_with_a_note(compiled):
    b = GraphBuilder()
    big = b.init("big", np.asarray([2**40, -(2**40), 7], np.int64))
    b.op("Add", [b.op("Min", ["ids", big]), b.init("one", np.asarray(1, np.int64))], name="y")
    model = b.model([tensor("ids", TensorProto.INT64, [3])], [tensor("y", TensorProto.INT64, [3])])
    c = compiled(model, "fp32")
    assert any("saturated" in note for note in c.result.report["notes"])
    out = c.run({"ids": np.asarray([5, 6, 9], np.int64)})["y"]
    assert out.dtype == np.int64
    assert out.tolist() == [6, np.iinfo(np.int32).min + 1, 8]  # saturated, never wrapped


def test_int64_inputs_beyond_int32_saturate_with_a_warning(compiled):
    b = GraphBuilder()
    b.op("Identity", ["ids"], name="y")
    model = b.model([tensor("ids", TensorProto.INT64, [2])], [tensor("y", TensorProto.INT64, [2])])
    c = compiled(model, "fp32")
    with pytest.warns(UserWarning, match="saturated"):
        out = c.run({"ids": np.asarray([2**35, 3], np.int64)})["y"]
    assert out.tolist() == [np.iinfo(np.int32).max, 3]


def test_softmax_before_opset_13_with_runtime_computed_shape(compiled):
    """The flattening rewrite waits for shapes that only folding makes known."""
    b = GraphBuilder()
    shape = b.op("Concat", [b.op("Shape", ["x"]), b.init("one", np.asarray([1], np.int64))],
                 axis=0)
    h = b.op("Reshape", ["x", shape])  # rank 4 only after Shape folds
    b.op("Softmax", [h], axis=1, name="y")
    model = b.model([tensor("x", TensorProto.FLOAT, ["n", 3, 4])],
                    [tensor("y", TensorProto.FLOAT, ["n", 3, 4, 1])], opset=11)
    c = compiled(model, "fp32", shapes={"x": (2, 3, 4)})
    c.check({"x": seeded((2, 3, 4))})
    assert c.result.report["nodes"]["y"]["mil_ops"] == ["reshape", "softmax", "reshape"]
