"""LSTM beyond the one-node table of op_cases: batch-first layout (onnxruntime runs layout
0 only, so it runs the same LSTM on transposed tensors), the fp32 detour an fp16 program
takes before iOS17, an LSTM inside a run-time If branch (silero-vad's shape), and the
MIL gate order the lowering converts to."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import applec
from applec.validate import compare, onnxruntime_outputs

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(7)


def lstm_model(seq, batch, size, hidden, direction="forward", layout=0, peepholes=False):
    dirs = 2 if direction == "bidirectional" else 1
    weights = {"W": RNG.standard_normal((dirs, 4 * hidden, size)) * 0.5,
               "R": RNG.standard_normal((dirs, 4 * hidden, hidden)) * 0.5,
               "B": RNG.standard_normal((dirs, 8 * hidden)) * 0.5}
    if peepholes:
        weights["P"] = RNG.standard_normal((dirs, 3 * hidden))
    x_shape = [batch, seq, size] if layout else [seq, batch, size]
    state = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    inputs = ["x", "W", "R", "B", "", "h0", "c0"] + (["P"] if peepholes else [])
    node = helper.make_node("LSTM", inputs, ["y", "y_h", "y_c"], hidden_size=hidden,
                            direction=direction, layout=layout)
    y_shape = [batch, seq, dirs, hidden] if layout else [seq, dirs, batch, hidden]
    graph = helper.make_graph(
        [node], "lstm", [helper.make_tensor_value_info(n, F32, s) for n, s in
                         (("x", x_shape), ("h0", state), ("c0", state))],
        [helper.make_tensor_value_info("y", F32, y_shape),
         helper.make_tensor_value_info("y_h", F32, state),
         helper.make_tensor_value_info("y_c", F32, state)],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                              ir_version=8)
    feeds = {"x": RNG.standard_normal(x_shape).astype(np.float32),
             "h0": RNG.standard_normal(state).astype(np.float32),
             "c0": RNG.standard_normal(state).astype(np.float32)}
    return model, feeds


def seq_first(model: onnx.ModelProto, feeds):
    """The layout-0 twin of a layout-1 model, and its feeds."""
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    for attr in twin.graph.node[0].attribute:
        if attr.name == "layout":
            attr.i = 0
    for info in twin.graph.input:
        dims = info.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = dims[1].dim_value, dims[0].dim_value
    del twin.graph.output[:]
    twin.graph.output.extend(onnx.ValueInfoProto(name=n) for n in ("y", "y_h", "y_c"))
    return twin, {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()}


def expected_batch_first(model, feeds, tmp_path):
    twin, twin_feeds = seq_first(model, feeds)
    onnx.save(twin, tmp_path / "twin.onnx")
    want = onnxruntime_outputs(tmp_path / "twin.onnx", twin_feeds)
    return {"y": np.transpose(want["y"], (2, 0, 1, 3)),
            "y_h": np.swapaxes(want["y_h"], 0, 1), "y_c": np.swapaxes(want["y_c"], 0, 1)}


def check(got, want, precision):
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        result = compare(name, got[name], expected, precision)
        assert (result.max_rel <= 1e-4) if precision == "fp32" else (result.cosine >= 0.999), \
            result


@pytest.mark.parametrize("direction, peepholes", [("forward", False), ("reverse", True),
                                                  ("bidirectional", True)])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_batch_first_layout(tmp_path, direction, peepholes, precision):
    model, feeds = lstm_model(5, 3, 4, 6, direction, layout=1, peepholes=peepholes)
    onnx.save(model, tmp_path / "model.onnx")
    applec.compile(tmp_path / "model.onnx", output=tmp_path / "b", precision=precision)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, expected_batch_first(model, feeds, tmp_path), precision)


def test_fp16_before_ios17_runs_lstm_in_fp32(tmp_path):
    model, feeds = lstm_model(4, 2, 3, 5, "bidirectional")
    onnx.save(model, tmp_path / "model.onnx")
    result = applec.compile(tmp_path / "model.onnx", output=tmp_path / "b", precision="fp16",
                            deployment_target="macOS13")
    ops = next(e for e in result.report["nodes"].values() if e["op_type"] == "LSTM")["mil_ops"]
    assert "lstm" in ops and ops.count("cast") == 6  # x, h0, c0 in; y, y_h, y_c out
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(tmp_path / "model.onnx", feeds), "fp16")


def test_lstm_inside_a_runtime_branch(tmp_path):
    """silero-vad's shape: If(sr == 16000) picks one of two LSTMs at run time."""
    hidden, size = 4, 3

    def branch(tag):
        weights = [numpy_helper.from_array((RNG.standard_normal(s) * 0.5).astype(np.float32),
                                           f"{tag}_{n}")
                   for n, s in (("W", (1, 16, size)), ("R", (1, 16, hidden)), ("B", (1, 32)))]
        nodes = [helper.make_node("LSTM", ["x", f"{tag}_W", f"{tag}_R", f"{tag}_B", "", "h0",
                                           "c0"], ["", f"{tag}_h"], hidden_size=hidden)]
        return helper.make_graph(nodes, tag, [], [helper.make_tensor_value_info(
            f"{tag}_h", F32, [1, 1, hidden])], weights)

    nodes = [helper.make_node("Equal", ["sr", "sr16k"], ["is16k"]),
             helper.make_node("If", ["is16k"], ["h"], then_branch=branch("k16"),
                              else_branch=branch("k8"))]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", F32, [2, 1, size]),
                     helper.make_tensor_value_info("h0", F32, [1, 1, hidden]),
                     helper.make_tensor_value_info("c0", F32, [1, 1, hidden]),
                     helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("h", F32, [1, 1, hidden])],
        [numpy_helper.from_array(np.int64(16000), "sr16k")])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)],
                                ir_version=8), path)
    for precision in ("fp32", "fp16"):
        applec.compile(path, output=tmp_path / precision, precision=precision)
        bundle = applec.load(tmp_path / precision, backend="reference")
        for sr in (16000, 8000):
            feeds = {"x": RNG.standard_normal((2, 1, size)).astype(np.float32),
                     "h0": RNG.standard_normal((1, 1, hidden)).astype(np.float32),
                     "c0": RNG.standard_normal((1, 1, hidden)).astype(np.float32),
                     "sr": np.asarray(sr, np.int64)}
            check(bundle.run(feeds), onnxruntime_outputs(path, feeds), precision)


def test_gate_reorder():
    """ONNX stacks i, o, f, c; MIL i, f, o, c (peepholes: i, o, f -> i, f, o)."""
    from applec.targets.coreml.rules_rnn import GATES, PEEPHOLES, reorder

    onnx_gates = np.repeat(np.array([[0], [1], [2], [3]]), 2, axis=0)  # i i o o f f c c
    assert reorder(onnx_gates, GATES, 4).ravel().tolist() == [0, 0, 2, 2, 1, 1, 3, 3]
    assert reorder(np.arange(3), PEEPHOLES, 3).tolist() == [0, 2, 1]
