"""fp16 safety: ops whose activations fp16 cannot hold, on the calibration samples or on a
random input, run in fp32.

Each model has an activation out of fp16's range on the samples and an output back in
range, so an all-fp16 bundle is wrong (inf, NaN or zeros) while the mixed program matches
onnxruntime at fp32 tolerances.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import applec
from applec.cli import main
from applec.testing import GraphBuilder, tensor
from applec.validate import onnxruntime_outputs

F = onnx.TensorProto.FLOAT


def scaled_model(path, gain: float, x_scale: float = 1.0):
    """y = (x @ w) * gain * (1 / gain) + x: the middle value is out of fp16's range."""
    b = GraphBuilder(11)
    h = b.op("MatMul", ["x", b.weight("w", (32, 32))], name="fc")
    hot = b.op("Mul", [h, b.init("gain", np.float32(gain))], name="hot")
    cool = b.op("Mul", [hot, b.init("inverse", np.float32(1 / gain))], name="cool")
    b.op("Add", [cool, b.op("Mul", ["x", b.init("xs", np.float32(1 / x_scale))],
                            name="scaled_x")], name="y")
    onnx.save(b.model([tensor("x", F, [4, 32])], [tensor("y", F, [4, 32])]), path)
    return path


def samples(x_scale: float = 1.0, count: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {"x": (rng.standard_normal((count, 4, 32)) * x_scale).astype(np.float32)}


def max_rel(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("gain, kind", [(1e6, "overflow"), (1e-9, "underflow")])
def test_out_of_range_activation_runs_in_fp32(tmp_path, gain, kind):
    path = scaled_model(tmp_path / "m.onnx", gain)
    feeds = {"x": samples()["x"][0]}
    want = onnxruntime_outputs(path, feeds)["y"]
    plain = applec.compile(path, output=tmp_path / "plain.bundle", fp16_check=False)
    assert "fp16_safety" not in plain.report
    broken = applec.load(tmp_path / "plain.bundle").run(feeds)["y"]
    assert not (np.all(np.isfinite(broken)) and max_rel(broken, want) < 1e-2)
    safe = applec.compile(path, output=tmp_path / "safe.bundle", calibration=samples())
    report = safe.report["fp16_safety"]
    assert (report["source"], report["samples"]) == ("calibration", 3)
    assert report["values"] == {"hot": {"kind": kind, "peak": report["values"]["hot"]["peak"]}}
    assert sorted(report["fp32_nodes"]) == ["cool", "hot"]
    for name in ("hot", "cool"):
        entry = safe.report["nodes"][name]
        assert entry["precision"] == "fp32" and "'hot'" in entry["fp16_safety"][0]
    # casts only at the region's edges: into fp32 before 'hot', back to fp16 after 'cool'
    assert "cast" in safe.report["nodes"]["hot"]["mil_ops"]
    assert "precision" not in safe.report["nodes"]["fc"]
    got = applec.load(tmp_path / "safe.bundle").run(feeds)["y"]
    assert max_rel(got, want) < 2e-3   # fp16 elsewhere: the output's own rounding


def test_input_out_of_fp16_range_stays_fp32(tmp_path):
    path = scaled_model(tmp_path / "m.onnx", 1.0, x_scale=1e6)
    calibration = samples(x_scale=1e6)
    feeds = {"x": calibration["x"][1]}
    result = applec.compile(path, output=tmp_path / "safe.bundle", calibration=calibration)
    report = result.report["fp16_safety"]
    assert report["fp32_inputs"] == ["x"]
    # x @ w overflows too (gain 1 is folded away), so its reader y runs in fp32 as well
    assert {r["onnx_node"] for r in report["fp32_nodes"].values()} == {"fc", "scaled_x", "y"}
    got = applec.load(tmp_path / "safe.bundle").run(feeds)["y"]
    assert max_rel(got, onnxruntime_outputs(path, feeds)["y"]) < 2e-3


def test_nothing_to_keep(tmp_path, capsys):
    path = scaled_model(tmp_path / "m.onnx", 2.0)
    np.savez(tmp_path / "feeds.npz", **samples())
    code = main(["compile", str(path), "-o", str(tmp_path / "b"), "--calibration",
                 str(tmp_path / "feeds.npz")])
    assert code == 0
    assert "fp16 safety: every activation fits fp16 on 3 calibration sample(s)" in \
        capsys.readouterr().out


def test_cli_reports_kept_ops_and_refuses_fp32(tmp_path, capsys):
    path = scaled_model(tmp_path / "m.onnx", 1e6)
    np.savez(tmp_path / "feeds.npz", **samples())
    args = ["compile", str(path), "-o", str(tmp_path / "b"), "--calibration",
            str(tmp_path / "feeds.npz")]
    assert main(args) == 0
    assert "fp16 safety: 1 activation(s) fp16 cannot hold on 3 calibration sample(s): hot " \
        "(overflow" in " ".join(capsys.readouterr().out.split())
    assert main(args[:3] + [str(tmp_path / "c")] + args[4:] + ["--precision", "fp32"]) == 2
    err = capsys.readouterr().err
    assert "--calibration without --quantize drives fp16 safety" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("gain, kind", [(1e6, "overflow"), (1e-9, "underflow")])
def test_random_input_check_without_calibration(tmp_path, gain, kind):
    """No --calibration: one seeded N(0, 1) input finds the same activation."""
    path = scaled_model(tmp_path / "m.onnx", gain)
    result = applec.compile(path, output=tmp_path / "b")
    report = result.report["fp16_safety"]
    assert (report["source"], report["samples"]) == ("random", 1)
    assert list(report["values"]) == ["hot"] and report["values"]["hot"]["kind"] == kind
    assert sorted(report["fp32_nodes"]) == ["cool", "hot"]
    feeds = {"x": samples()["x"][0]}
    got = applec.load(tmp_path / "b").run(feeds)["y"]
    assert max_rel(got, onnxruntime_outputs(path, feeds)["y"]) < 2e-3


def test_random_check_misses_what_only_real_data_shows(tmp_path):
    """Inputs of scale 1e6 overflow x @ w; N(0, 1) inputs do not: only calibration tells."""
    path = scaled_model(tmp_path / "m.onnx", 1.0, x_scale=1e6)
    result = applec.compile(path, output=tmp_path / "b")
    assert result.report["fp16_safety"]["values"] == {}
    assert result.report["fp16_safety"]["fp32_nodes"] == {}


def test_random_inputs_the_graph_cannot_take_skip_the_check(tmp_path):
    """Random integers in [0, 10) index past a 4-row table: the check is skipped with a
    note naming the reason, and the compile goes on."""
    b = GraphBuilder(13)
    rows = b.op("Gather", [b.weight("table", (4, 8)), "ids"], name="lookup")
    b.op("Relu", [rows], name="y")
    path = tmp_path / "m.onnx"
    onnx.save(b.model([tensor("ids", onnx.TensorProto.INT64, [6])],
                      [tensor("y", F, [6, 8])]), path)
    result = applec.compile(path, output=tmp_path / "b")
    safety = result.report["fp16_safety"]
    assert (safety["source"], safety["samples"]) == ("none", 0)
    note = [n for n in result.report["notes"] if n.startswith("fp16 range check skipped")]
    assert len(note) == 1 and "pass --calibration" in note[0]
    feeds = {"ids": np.array([0, 3, 1, 2, 3, 0], np.int64)}
    got = applec.load(tmp_path / "b").run(feeds)["y"]
    assert max_rel(got, onnxruntime_outputs(path, feeds)["y"]) < 2e-3


def test_cli_random_check_line_and_opt_out(tmp_path, capsys):
    path = scaled_model(tmp_path / "m.onnx", 1e6)
    assert main(["compile", str(path), "-o", str(tmp_path / "b")]) == 0
    assert "fp16 safety: 1 activation(s) fp16 cannot hold on 1 random sample(s)" in \
        " ".join(capsys.readouterr().out.split())
    assert main(["compile", str(path), "-o", str(tmp_path / "c"), "--no-fp16-check"]) == 0
    assert "fp16 safety" not in capsys.readouterr().out
    assert "fp16_safety" not in json.loads((tmp_path / "c" / "report.json").read_text())
