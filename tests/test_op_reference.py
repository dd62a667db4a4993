"""The op table against onnxruntime: every case in `op_cases` checks `infer` (shapes and
dtypes) and then `reference` (values) against onnxruntime's CPU provider; shape errors
must name the op and the node."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from op_cases import (
    CASES,
    COVERED_ELSEWHERE,
    In,
    OpCase,
    constants,
    input_names,
    make_inputs,
    make_model,
)

from applec.errors import ShapeError, UnsupportedOpError
from applec.ir import Graph
from applec.ops import OPS, evaluate, infer_node


def build_node(case: OpCase):
    """The case as one IR node: graph inputs for generated data, constants otherwise."""
    graph = Graph(case.id)
    consts = constants(case)
    values = []
    for name, spec in zip(input_names(case), case.inputs):
        if spec is None:
            values.append(None)
        elif name in consts:
            values.append(graph.const(consts[name], name))
        else:
            values.append(graph.add_input(name, spec.dtype, spec.shape))
    node = graph.add_node(case.op_type, values, case.attrs, name=case.id, outputs=case.outputs)
    return graph, node


def run_onnxruntime(case: OpCase, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(make_model(case).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op_matches_onnxruntime(case: OpCase):
    feeds = make_inputs(case, seed=0)
    expected = run_onnxruntime(case, feeds)

    graph, node = build_node(case)
    infer_node(node)
    graph.outputs = list(node.outputs)
    graph.validate()
    for value, want in zip(node.outputs, expected):
        assert (value.shape, value.dtype) == (want.shape, want.dtype), value.name

    args = [None if v is None else v.const if v.is_const else feeds[v.name]
            for v in node.inputs]
    got = evaluate(node, args)
    assert len(got) == len(expected)
    for value, out, want in zip(node.outputs, got, expected):
        assert (out.shape, out.dtype) == (want.shape, want.dtype), value.name
        if want.dtype.kind == "f":
            np.testing.assert_allclose(out, want, rtol=case.rtol, atol=case.atol,
                                       err_msg=value.name)
        else:
            np.testing.assert_array_equal(out, want, err_msg=value.name)


def test_every_op_has_a_case():
    covered = {c.op_type for c in CASES} | set(COVERED_ELSEWHERE)
    # internal fused ops (applec.*) have no ONNX form; tests/test_fusions.py covers them
    onnx_ops = {op for op in OPS if not op.startswith("applec.")}
    assert not onnx_ops - covered, f"ops without a case: {sorted(onnx_ops - covered)}"
    assert not covered - onnx_ops, f"cases for unknown ops: {sorted(covered - onnx_ops)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_static_inputs_are_constant_in_cases(case: OpCase):
    """The table must be compilable: inputs an op needs at compile time are initializers."""
    for index in OPS[case.op_type].static_inputs:
        if index < len(case.inputs) and case.inputs[index] is not None:
            spec = case.inputs[index]
            assert isinstance(spec, np.ndarray) or (isinstance(spec, In) and spec.const)


# -- shape errors ------------------------------------------------------------------------
def _expect_shape_error(op_type, inputs, attrs=None, name="bad_node"):
    graph = Graph()
    values = [graph.const(v) if isinstance(v, np.ndarray) else graph.add_input(*v)
              for v in inputs]
    node = graph.add_node(op_type, values, attrs, name=name)
    with pytest.raises(ShapeError) as raised:
        infer_node(node)
    message = str(raised.value)
    assert op_type in message and name in message, message
    return message


def test_add_not_broadcastable():
    message = _expect_shape_error("Add", [("a", np.float32, (2, 3)), ("b", np.float32, (4,))])
    assert "[2, 3]" in message and "[4]" in message


def test_reshape_needs_constant_shape():
    message = _expect_shape_error("Reshape", [("x", np.float32, (2, 3)),
                                              ("shape", np.int64, (2,))])
    assert "compile-time constant" in message


def test_reshape_wrong_size():
    _expect_shape_error("Reshape", [("x", np.float32, (2, 3)), np.array([4, -1, 2])])


def test_matmul_inner_mismatch():
    _expect_shape_error("MatMul", [("a", np.float32, (2, 3)), ("b", np.float32, (4, 5))])


def test_conv_channel_mismatch():
    _expect_shape_error("Conv", [("x", np.float32, (1, 3, 8, 8)),
                                 np.zeros((4, 2, 3, 3), np.float32)])


def test_concat_mismatch_and_missing_axis():
    inputs = [("a", np.float32, (2, 3)), ("b", np.float32, (3, 3))]
    _expect_shape_error("Concat", inputs, {"axis": 1})
    assert "required" in _expect_shape_error("Concat", inputs)


def test_squeeze_non_unit_axis():
    _expect_shape_error("Squeeze", [("x", np.float32, (2, 3)), np.array([0])])


def test_maxpool_indices_output_is_unsupported():
    graph = Graph()
    node = graph.add_node("MaxPool", [graph.add_input("x", np.float32, (1, 1, 4, 4))],
                          {"kernel_shape": [2, 2]}, name="pool", outputs=2)
    with pytest.raises(UnsupportedOpError, match="MaxPool node 'pool'"):
        infer_node(node)
