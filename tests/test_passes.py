"""Cleanup passes: structure after, numbers unchanged, and cases that must not fire."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import seeded
from onnx import TensorProto

from applec import interpreter
from applec.onnx_import import import_model
from applec.passes import (
    PIPELINE,
    eliminate_dead_code,
    eliminate_identity,
    fold_constants,
    run_pipeline,
)
from applec.testing import GraphBuilder, tensor


def load(tmp_path, builder, inputs, outputs, shapes=None):
    path = tmp_path / "m.onnx"
    onnx.save(builder.model(inputs, outputs), path)
    return import_model(path, shapes)


def numbers_unchanged(graph, run_pass, feeds):
    before = interpreter.run(graph, feeds)
    changed = run_pass(graph)
    graph.validate()
    after = interpreter.run(graph, feeds)
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_allclose(after[name], before[name], rtol=1e-6)
    return changed


def test_identity_elimination(tmp_path):
    b = GraphBuilder()
    h = b.op("Identity", ["x"])
    h = b.op("Cast", [h], to=TensorProto.FLOAT)
    h = b.op("Transpose", [h], perm=[0, 1])
    h = b.op("Mul", [h, b.init("one", np.float32(1))])
    h = b.op("Add", [h, b.init("zero", np.zeros(4, np.float32))])
    h = b.op("Relu", [h])
    b.op("Reshape", [h, b.init("same", np.asarray([2, 4], np.int64))], name="y")
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [2, 4])],
                 [tensor("y", TensorProto.FLOAT, [2, 4])])
    removed = numbers_unchanged(graph, eliminate_identity.run, {"x": seeded((2, 4))})
    assert removed == 5
    # the Reshape produces the graph output "y": kept so the output name survives
    assert graph.op_counts() == {"Relu": 1, "Reshape": 1}
    assert [v.name for v in graph.outputs] == ["y"]


def test_identity_near_misses_are_kept(tmp_path):
    b = GraphBuilder()
    h = b.op("Mul", ["x", b.init("two", np.float32(2))])          # not 1
    h = b.op("Add", [h, b.init("zeros", np.zeros((3, 2, 4), np.float32))])  # broadcasts up
    h = b.op("Transpose", [h], perm=[0, 2, 1])                      # not identity
    b.op("Relu", [h], name="y")
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [2, 4])],
                 [tensor("y", TensorProto.FLOAT, [3, 4, 2])])
    assert numbers_unchanged(graph, eliminate_identity.run, {"x": seeded((2, 4))}) == 0
    assert graph.op_counts() == {"Mul": 1, "Add": 1, "Transpose": 1, "Relu": 1}


def test_dead_code(tmp_path):
    b = GraphBuilder()
    b.op("Relu", ["x"], name="y")
    b.op("Sigmoid", [b.op("Exp", ["x"])])
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [4])],
                 [tensor("y", TensorProto.FLOAT, [4])])
    assert numbers_unchanged(graph, eliminate_dead_code.run, {"x": seeded((4,))}) == 2
    assert graph.op_counts() == {"Relu": 1}


def test_fold_constants_after_rewrites(tmp_path):
    """A constant chain left behind by import is folded; data-dependent nodes are not."""
    b = GraphBuilder()
    w = b.op("Transpose", [b.weight("w", (4, 3))], perm=[1, 0])
    w = b.op("Mul", [w, b.init("s", np.float32(0.5))])
    b.op("MatMul", ["x", b.op("Transpose", [w], perm=[1, 0])], name="y")
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [2, 4])],
                 [tensor("y", TensorProto.FLOAT, [2, 3])])
    # import already folds; folding again changes nothing and keeps the MatMul
    assert graph.op_counts() == {"MatMul": 1}
    assert numbers_unchanged(graph, fold_constants.run, {"x": seeded((2, 4))}) == 0


def test_fold_respects_size_cap(tmp_path):
    b = GraphBuilder()
    big = b.op("ConstantOfShape", [b.init("shape", np.asarray([2048, 1024], np.int64))],
               value=onnx.numpy_helper.from_array(np.ones(1, np.float32)))
    b.op("Add", ["x", big], name="y")
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [2048, 1024])],
                 [tensor("y", TensorProto.FLOAT, [2048, 1024])])
    assert "ConstantOfShape" in graph.op_counts()  # 2M elements from a 2-element shape


def test_pipeline_order_and_records(tmp_path):
    b = GraphBuilder()
    b.op("Relu", [b.op("Identity", ["x"])], name="y")
    graph = load(tmp_path, b, [tensor("x", TensorProto.FLOAT, [4])],
                 [tensor("y", TensorProto.FLOAT, [4])])
    records = run_pipeline(graph)
    assert [r["pass"] for r in records] == [name for name, _ in PIPELINE]
    assert {r["pass"]: r["rewrites"] for r in records}["eliminate_identity"] == 1
