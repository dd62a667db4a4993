"""GRU, RNN, and the LSTMs MIL's lstm cannot express, compiled into bundles, run by the
reference executor and compared with onnxruntime (fp32 max relative error <= 1e-4, fp16
cosine >= 0.999); the MIL ops each lowering chooses; a GRU as torch.nn.GRU exports it;
batch-first layouts (onnxruntime runs layout 0 only, so its twin runs the transposed
tensors); the executor's reverse-direction order; and the compile-time errors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from op_cases import case, make_inputs, make_model, w, x

import applec
from applec import interpreter
from applec.errors import UnsupportedOpError
from applec.onnx_import import import_model
from applec.runtime.mil_ops import MIL_OPS
from applec.validate import compare, onnxruntime_outputs

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(11)


def lens(*values):
    return np.array(values, np.int32)


# X, W, R, B, sequence_lens, initial_h (LSTM: initial_c, P)
CASES = [
    case("gru_forward", "GRU", [x(5, 2, 4), w(1, 18, 4), w(1, 18, 6), w(1, 36), None,
                                x(1, 2, 6)], {"hidden_size": 6}, opset=14, outputs=2),
    case("gru_reverse_linear_before_reset_clip", "GRU",
         [x(4, 3, 3), w(1, 15, 3), w(1, 15, 5), w(1, 30)],
         {"hidden_size": 5, "direction": "reverse", "linear_before_reset": 1, "clip": 0.7},
         opset=14, outputs=2),
    case("gru_bidirectional_activations", "GRU", [x(4, 2, 3), w(2, 12, 3), w(2, 12, 4)],
         {"hidden_size": 4, "direction": "bidirectional",
          "activations": ["HardSigmoid", "Relu", "Sigmoid", "ScaledTanh"],
          "activation_alpha": [0.3, 0.7], "activation_beta": [0.4, 1.5]},
         opset=14, outputs=2),
    case("gru_ragged_lengths", "GRU", [x(5, 3, 4), w(2, 18, 4), w(2, 18, 6), w(2, 36),
                                       lens(5, 3, 0), x(2, 3, 6)],
         {"hidden_size": 6, "direction": "bidirectional", "linear_before_reset": 1},
         opset=14, outputs=2),
    case("rnn_bidirectional", "RNN", [x(5, 2, 4), w(2, 6, 4), w(2, 6, 6), w(2, 12), None,
                                      x(2, 2, 6)],
         {"hidden_size": 6, "direction": "bidirectional"}, opset=14, outputs=2),
    case("rnn_reverse_relu", "RNN", [x(4, 2, 3), w(1, 5, 3, kind="uniform"),
                                     w(1, 5, 5, kind="uniform"), w(1, 10)],
         {"hidden_size": 5, "direction": "reverse", "activations": ["Relu"]},
         opset=14, outputs=2),
    case("rnn_clip_ragged_lengths", "RNN", [x(5, 3, 4), w(1, 6, 4), w(1, 6, 6), w(1, 12),
                                            lens(2, 5, 4), x(1, 3, 6)],
         {"hidden_size": 6, "clip": 1.0}, opset=14, outputs=2),
    case("rnn_activations", "RNN", [x(4, 2, 3), w(2, 4, 3), w(2, 4, 4)],
         {"hidden_size": 4, "direction": "bidirectional", "activations": ["Affine", "Softsign"],
          "activation_alpha": [0.5], "activation_beta": [0.1]}, opset=14, outputs=2),
    case("lstm_clip_input_forget_peepholes", "LSTM",
         [x(4, 2, 3), w(1, 16, 3), w(1, 16, 4), w(1, 32), None, x(1, 2, 4), x(1, 2, 4),
          w(1, 12)], {"hidden_size": 4, "clip": 0.8, "input_forget": 1}, opset=14, outputs=3),
    case("lstm_per_direction_activations_ragged", "LSTM",
         [x(4, 3, 3), w(2, 16, 3), w(2, 16, 4), w(2, 32), lens(4, 1, 3)],
         {"hidden_size": 4, "direction": "bidirectional",
          "activations": ["Sigmoid", "Tanh", "Tanh", "HardSigmoid", "Relu", "Softsign"]},
         opset=14, outputs=3),
]

# MIL ops a case's node must (+) and must not (-) become on the default target (macOS15)
MIL_CHOICE = {
    "gru_forward": ("linear", "gru"),
    "rnn_bidirectional": ("rnn", None),
    "rnn_reverse_relu": ("reverse", None),
    "rnn_clip_ragged_lengths": ("clip", "rnn"),
    "lstm_clip_input_forget_peepholes": ("clip", "lstm"),
}

PARAMS = [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in ("fp32", "fp16")]


def check(got, want, precision):
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        result = compare(name, got[name], expected, precision)
        assert (result.max_rel <= 1e-4) if precision == "fp32" else (result.cosine >= 0.999), \
            result


@pytest.mark.parametrize("case, precision", PARAMS)
def test_compiled_matches_onnxruntime(case, precision, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(case), path)
    result = applec.compile(path, output=tmp_path / "b", precision=precision)
    feeds = make_inputs(case, seed=0)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(path, feeds), precision)
    if case.id in MIL_CHOICE:
        ops = next(e for e in result.report["nodes"].values()
                   if e["op_type"] == case.op_type)["mil_ops"]
        wanted, unwanted = MIL_CHOICE[case.id]
        assert wanted in ops and unwanted not in ops, ops


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_matches_onnxruntime(case, tmp_path):
    """The op table's numpy references on their own: the imported IR run by the IR
    interpreter."""
    onnx.save(make_model(case), tmp_path / "op.onnx")
    feeds = make_inputs(case, seed=1)
    got = interpreter.run(import_model(tmp_path / "op.onnx"), feeds)
    check(got, onnxruntime_outputs(tmp_path / "op.onnx", feeds), "fp32")


def torch_gru_model(batch, seq, size, hidden):
    """torch.nn.GRU(size, hidden, batch_first=True, bidirectional=True) as torch.onnx
    exports it: input transposed to sequence first; torch's gate blocks (r, z, n) reordered
    to ONNX's (z, r, h); linear_before_reset=1 (torch applies the reset gate to
    W_hn h + b_hn); Y [seq, 2, batch, H] transposed and reshaped to [seq, batch, 2H], then
    back to batch first."""
    def onnx_order(blocks):  # torch r, z, n -> ONNX z, r, h
        r, z, n = np.split(blocks, 3, axis=0)
        return np.concatenate([z, r, n], axis=0)

    per_direction = [{"w_ih": RNG.standard_normal((3 * hidden, size)) * 0.4,
                      "w_hh": RNG.standard_normal((3 * hidden, hidden)) * 0.4,
                      "b_ih": RNG.standard_normal(3 * hidden) * 0.4,
                      "b_hh": RNG.standard_normal(3 * hidden) * 0.4} for _ in range(2)]
    weights = {
        "W": np.stack([onnx_order(p["w_ih"]) for p in per_direction]),
        "R": np.stack([onnx_order(p["w_hh"]) for p in per_direction]),
        "B": np.stack([np.concatenate([onnx_order(p["b_ih"]), onnx_order(p["b_hh"])])
                       for p in per_direction]),
        "perm_shape": np.array([0, 0, -1], np.int64),
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_seq"], perm=[1, 0, 2]),
        helper.make_node("GRU", ["x_seq", "W", "R", "B", "", "h0"], ["y4", "h_n"],
                         hidden_size=hidden, direction="bidirectional", linear_before_reset=1),
        helper.make_node("Transpose", ["y4"], ["y4t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["y4t", "perm_shape"], ["y3"]),
        helper.make_node("Transpose", ["y3"], ["y"], perm=[1, 0, 2]),
    ]
    graph = helper.make_graph(
        nodes, "torch_gru",
        [helper.make_tensor_value_info("x", F32, [batch, seq, size]),
         helper.make_tensor_value_info("h0", F32, [2, batch, hidden])],
        [helper.make_tensor_value_info("y", F32, [batch, seq, 2 * hidden]),
         helper.make_tensor_value_info("h_n", F32, [2, batch, hidden])],
        [numpy_helper.from_array(a if a.dtype == np.int64 else a.astype(np.float32), n)
         for n, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = {"x": RNG.standard_normal((batch, seq, size)).astype(np.float32),
             "h0": RNG.standard_normal((2, batch, hidden)).astype(np.float32)}
    return model, feeds


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_gru_as_torch_exports_it(precision, tmp_path):
    model, feeds = torch_gru_model(batch=2, seq=6, size=5, hidden=4)
    onnx.save(model, tmp_path / "gru.onnx")
    applec.compile(tmp_path / "gru.onnx", output=tmp_path / "b", precision=precision)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(tmp_path / "gru.onnx", feeds), precision)


def recurrent_model(op, seq, batch, size, hidden, direction, layout, attrs):
    """One GRU/RNN/LSTM node with constant weights and run-time initial states."""
    gates = {"GRU": 3, "RNN": 1, "LSTM": 4}[op]
    dirs = 2 if direction == "bidirectional" else 1
    weights = {"W": RNG.standard_normal((dirs, gates * hidden, size)) * 0.5,
               "R": RNG.standard_normal((dirs, gates * hidden, hidden)) * 0.5,
               "B": RNG.standard_normal((dirs, 2 * gates * hidden)) * 0.5}
    x_shape = [batch, seq, size] if layout else [seq, batch, size]
    state = [batch, dirs, hidden] if layout else [dirs, batch, hidden]
    states = ["h0", "c0"] if op == "LSTM" else ["h0"]
    outputs = ["y", "y_h", "y_c"][:1 + len(states)]
    node = helper.make_node(op, ["x", "W", "R", "B", "", *states], outputs, hidden_size=hidden,
                            direction=direction, layout=layout, **attrs)
    y_shape = [batch, seq, dirs, hidden] if layout else [seq, dirs, batch, hidden]
    graph = helper.make_graph(
        [node], op.lower(), [helper.make_tensor_value_info(n, F32, s) for n, s in
                             [("x", x_shape)] + [(n, state) for n in states]],
        [helper.make_tensor_value_info(n, F32, s) for n, s in
         zip(outputs, [y_shape, state, state])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)], ir_version=8)
    feeds = {"x": RNG.standard_normal(x_shape).astype(np.float32),
             **{n: RNG.standard_normal(state).astype(np.float32) for n in states}}
    return model, feeds


@pytest.mark.parametrize("op, direction, attrs", [
    ("GRU", "bidirectional", {"linear_before_reset": 1}),
    ("RNN", "reverse", {}),
    ("LSTM", "bidirectional", {"clip": 2.0}),
], ids=["gru", "rnn", "lstm_composed"])
def test_batch_first_layout(op, direction, attrs, tmp_path):
    """layout 1 against the layout-0 twin of the same node in onnxruntime."""
    model, feeds = recurrent_model(op, 5, 3, 4, 6, direction, 1, attrs)
    onnx.save(model, tmp_path / "model.onnx")
    applec.compile(tmp_path / "model.onnx", output=tmp_path / "b", precision="fp32")
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    twin, _ = recurrent_model(op, 5, 3, 4, 6, direction, 0, attrs)
    twin.graph.ClearField("initializer")
    twin.graph.initializer.extend(model.graph.initializer)
    onnx.save(twin, tmp_path / "twin.onnx")
    want = onnxruntime_outputs(tmp_path / "twin.onnx",
                               {k: np.swapaxes(v, 0, 1) for k, v in feeds.items()})
    want = {k: np.transpose(v, (2, 0, 1, 3)) if k == "y" else np.swapaxes(v, 0, 1)
            for k, v in want.items()}
    check(got, want, "fp32")


def test_fp16_rnn_before_ios17_is_composed(tmp_path):
    """MIL's rnn is fp32 only before iOS17: an fp16 program composes the recurrence."""
    model, feeds = recurrent_model("RNN", 4, 2, 3, 5, "bidirectional", 0, {})
    onnx.save(model, tmp_path / "model.onnx")
    result = applec.compile(tmp_path / "model.onnx", output=tmp_path / "b", precision="fp16",
                            deployment_target="macOS13")
    ops = next(e for e in result.report["nodes"].values() if e["op_type"] == "RNN")["mil_ops"]
    assert "rnn" not in ops and "cast" not in ops and ops.count("tanh") == 2 * 4
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(tmp_path / "model.onnx", feeds), "fp16")


@pytest.mark.parametrize("op", ["rnn", "lstm"])
def test_reverse_mil_recurrence_returns_processing_order(op):
    """The executor's MIL "reverse" lstm/rnn: y[0] is the first step processed (the last
    time step), so y[-1] is the final state (coremltools' own op tests expect this order;
    the lowering reverses it back to ONNX's time order)."""
    seq, batch, size, hidden = 4, 2, 3, 5
    gates = 4 if op == "lstm" else 1
    a = {"x": RNG.standard_normal((seq, batch, size)).astype(np.float32),
         "initial_h": RNG.standard_normal((batch, hidden)).astype(np.float32),
         "weight_ih": RNG.standard_normal((gates * hidden, size)).astype(np.float32),
         "weight_hh": RNG.standard_normal((gates * hidden, hidden)).astype(np.float32),
         "direction": "reverse", "output_sequence": np.array(True)}
    if op == "lstm":
        a["initial_c"] = RNG.standard_normal((batch, hidden)).astype(np.float32)
    y, h = MIL_OPS[op](a, None)[:2]
    first = MIL_OPS[op]({**a, "x": a["x"][-1:]}, None)[1]  # one step on the last time step
    np.testing.assert_allclose(y[-1], h, rtol=1e-6)
    np.testing.assert_allclose(y[0], first, rtol=1e-6)


@pytest.mark.parametrize("inputs, message", [
    (["x", "W_in", "R"], "W is computed at run time"),
    (["x", "W", "R", "", "long"], r"sequence_lens \[6, 2\] outside \[0, 5\]"),
], ids=["runtime_weights", "sequence_lens_too_long"])
def test_refused_at_compile_time(inputs, message, tmp_path):
    inits = {"W": np.ones((1, 12, 3), np.float32), "R": np.ones((1, 12, 4), np.float32),
             "long": np.array([6, 2], np.int32)}
    node = helper.make_node("GRU", inputs, ["y"], hidden_size=4)
    graph = helper.make_graph(
        [node], "gru", [helper.make_tensor_value_info("x", F32, [5, 2, 3]),
                        helper.make_tensor_value_info("W_in", F32, [1, 12, 3])],
        [helper.make_tensor_value_info("y", F32, [5, 1, 2, 4])],
        [numpy_helper.from_array(v, k) for k, v in inits.items() if k in inputs])
    graph.input.pop() if "W_in" not in inputs else None
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)],
                                ir_version=8), tmp_path / "gru.onnx")
    with pytest.raises(UnsupportedOpError, match=f"GRU node '.*': {message}"):
        applec.compile(tmp_path / "gru.onnx", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()
