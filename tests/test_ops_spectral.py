"""DFT, STFT, the Hann/Hamming/Blackman windows and MelWeightMatrix, compiled into bundles,
run by the reference executor and compared with onnxruntime (fp32 max relative error
<= 1e-4, fp16 cosine >= 0.999, shape and dtype first); the op table's references on their
own; the MIL ops each lowering chooses; an audio front end (window -> STFT -> power ->
mel) end to end; and the compile-time limit on a DFT's matrix."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from op_cases import case, make_inputs, make_model, x

import applec
from applec import interpreter
from applec.errors import UnsupportedOpError
from applec.onnx_import import import_model
from applec.validate import compare, onnxruntime_outputs


def s64(value):
    return np.array(value, np.int64)


def f32(value):
    return np.array(value, np.float32)


HANN_16 = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(16) / 16)).astype(np.float32)

# DFT opset 17: axis an attribute (default 1); opset 20: input 2 (default -2)
CASES = [
    case("dft17_real", "DFT", [x(2, 8, 3, 1)], {"axis": 1}, opset=17),
    case("dft17_complex_default_axis", "DFT", [x(2, 8, 3, 2)], opset=17),
    case("dft17_inverse_axis2", "DFT", [x(2, 8, 3, 2)], {"axis": 2, "inverse": 1}, opset=17),
    case("dft20_rfft", "DFT", [x(2, 8, 3, 1), None, s64(1)], {"onesided": 1}, opset=20),
    case("dft20_irfft_default_length", "DFT", [x(2, 5, 3, 2), None, s64(-3)],
         {"onesided": 1, "inverse": 1}, opset=20),
    case("dft20_irfft_odd_length", "DFT", [x(2, 5, 3, 2), s64(9), s64(1)],
         {"onesided": 1, "inverse": 1}, opset=20),
    case("dft20_zero_padded", "DFT", [x(2, 8, 3, 1), s64(12), s64(1)], opset=20),
    case("dft17_truncated_rfft", "DFT", [x(2, 8, 3, 1), s64(5)], {"onesided": 1}, opset=17),
    case("dft20_default_axis", "DFT", [x(3, 6, 2)], opset=20),
    case("stft_frame_length", "STFT", [x(2, 64, 1), s64(8), None, s64(16)]),
    case("stft_constant_window", "STFT", [x(2, 64, 1), s64(8), HANN_16]),
    case("stft_runtime_window", "STFT", [x(2, 64, 1), s64(8), x(16)]),
    case("stft_complex_two_sided", "STFT", [x(1, 60, 2), s64(7), None, s64(15)],
         {"onesided": 0}),
    case("hann_periodic", "HannWindow", [s64(10)]),
    case("hamming_symmetric_fp16", "HammingWindow", [s64(11)],
         {"periodic": 0, "output_datatype": np.dtype(np.float16)}),
    case("blackman_int64", "BlackmanWindow", [s64(9)],
         {"output_datatype": np.dtype(np.int64)}),
    case("mel", "MelWeightMatrix", [s64(10), s64(64), s64(16000), f32(20), f32(7600)]),
]

# MIL ops a case's node must become
MIL_CHOICE = {"dft17_real": ["transpose", "reshape", "linear", "reshape", "transpose"],
              "dft20_default_axis": ["reshape", "linear", "reshape"],
              "stft_constant_window": ["transpose", "conv", "transpose", "reshape"],
              "stft_runtime_window": ["gather", "reshape", "mul", "reshape", "linear",
                                      "reshape"]}

PARAMS = [pytest.param(c, p, id=f"{c.id}-{p}") for c in CASES for p in ("fp32", "fp16")]


def check(got, want, precision):
    for name, expected in want.items():
        assert got[name].shape == expected.shape, name
        assert got[name].dtype == expected.dtype, name
        result = compare(name, got[name], expected, precision)
        if expected.dtype.kind != "f":
            assert result.ok, result
        elif precision == "fp32" or expected.dtype == np.float16:
            assert result.max_rel <= 1e-4, result
        else:
            assert result.cosine >= 0.999, result


@pytest.mark.parametrize("case, precision", PARAMS)
def test_compiled_matches_onnxruntime(case, precision, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(case), path)
    result = applec.compile(path, output=tmp_path / "b", precision=precision)
    feeds = make_inputs(case, seed=0)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(path, feeds), precision)
    if case.id in MIL_CHOICE:
        entry = next(e for e in result.report["nodes"].values()
                     if e["op_type"] == case.op_type)
        assert entry["mil_ops"] == MIL_CHOICE[case.id]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_reference_matches_onnxruntime(case, tmp_path):
    """The op table's shape rules and numpy references on their own: the imported IR
    (canonical forms, constants folded) run by the IR interpreter."""
    onnx.save(make_model(case), tmp_path / "op.onnx")
    feeds = make_inputs(case, seed=1)
    got = interpreter.run(import_model(tmp_path / "op.onnx"), feeds)
    check(got, onnxruntime_outputs(tmp_path / "op.onnx", feeds), "fp32")


def front_end_model(batch, samples, frame, step, mels):
    """Whisper's shape of front end: HannWindow(frame) -> STFT -> |X|^2 -> MatMul with
    MelWeightMatrix -> Log(max(., 1e-10)). The window and mel ops fold to constants."""
    bins = frame // 2 + 1
    consts = {"frame": s64(frame), "step": s64(step), "mels": s64(mels), "rate": s64(16000),
              "low": f32(0), "high": f32(8000), "axis": np.array([-1], np.int64),
              "floor": f32(1e-10)}
    nodes = [
        helper.make_node("HannWindow", ["frame"], ["window"]),
        helper.make_node("STFT", ["signal", "step", "window"], ["spectrum"]),
        helper.make_node("Mul", ["spectrum", "spectrum"], ["squares"]),
        helper.make_node("ReduceSum", ["squares", "axis"], ["power"], keepdims=0),
        helper.make_node("MelWeightMatrix", ["mels", "frame", "rate", "low", "high"],
                         ["filters"]),
        helper.make_node("MatMul", ["power", "filters"], ["mel"]),
        helper.make_node("Max", ["mel", "floor"], ["clamped"]),
        helper.make_node("Log", ["clamped"], ["log_mel"]),
    ]
    frames = (samples - frame) // step + 1
    graph = helper.make_graph(
        nodes, "front_end",
        [helper.make_tensor_value_info("signal", TensorProto.FLOAT, [batch, samples, 1])],
        [helper.make_tensor_value_info("log_mel", TensorProto.FLOAT, [batch, frames, mels])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()])
    assert bins > mels
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_audio_front_end(precision, tmp_path):
    onnx.save(front_end_model(batch=1, samples=800, frame=64, step=16, mels=12),
              tmp_path / "front_end.onnx")
    result = applec.compile(tmp_path / "front_end.onnx", output=tmp_path / "b",
                            precision=precision)
    statuses = {e["op_type"]: e["status"] for e in result.report["nodes"].values()}
    assert statuses["HannWindow"] == statuses["MelWeightMatrix"] == "folded"
    t = np.arange(800) / 16000
    feeds = {"signal": (np.sin(2 * np.pi * 440 * t) + 0.1 * np.random.default_rng(0)
                        .standard_normal(800)).astype(np.float32).reshape(1, 800, 1)}
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    check(got, onnxruntime_outputs(tmp_path / "front_end.onnx", feeds), precision)


def test_dft_matrix_limit(tmp_path):
    """A DFT is a dense matrix: one of more than 2**26 weights is refused, not built."""
    node = helper.make_node("DFT", ["x"], ["y"], axis=1)
    graph = helper.make_graph(
        [node], "dft", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4097, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4097, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), tmp_path / "dft.onnx")
    with pytest.raises(UnsupportedOpError, match="DFT node '.*': a 4097-point DFT would be a "
                                                 "dense matrix of 67141636 weights"):
        applec.compile(tmp_path / "dft.onnx", output=tmp_path / "b")
    assert not (tmp_path / "b").exists()
