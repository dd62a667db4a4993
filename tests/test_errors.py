"""Bad input: one clear line on stderr, exit code 2, no traceback, no bundle left behind."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from applec import testing
from applec.cli import main


def run_cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    return code, lines[0]


def no_bundle_left(tmp_path, name="out") -> bool:
    return not any(p.name.startswith((name, f".{name}")) for p in tmp_path.iterdir())


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    code, line = run_cli(capsys, "compile", bad, "-o", tmp_path / "out")
    assert code == 2
    assert line.startswith("error: ") and "notes.onnx" in line and "ONNX" in line
    assert no_bundle_left(tmp_path)


def test_truncated_onnx(tmp_path, capsys):
    full = testing.cnn(batch=1).SerializeToString()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(full[: len(full) // 2])
    code, line = run_cli(capsys, "compile", bad, "-o", tmp_path / "out")
    assert code == 2 and "cut.onnx" in line
    assert no_bundle_left(tmp_path)


def test_missing_file(tmp_path, capsys):
    code, line = run_cli(capsys, "compile", tmp_path / "nope.onnx", "-o", tmp_path / "out")
    assert code == 2 and "nope.onnx: no such file" in line


def test_unsupported_op_names_op_and_node(tmp_path, capsys):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="ok"),
                               helper.make_node("Bernoulli", ["r"], ["y"], name="coin_node")],
                              "g", [x], [y])
    path = tmp_path / "coin.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, line = run_cli(capsys, "compile", path, "-o", tmp_path / "out")
    assert code == 2
    assert "Bernoulli" in line and "coin_node" in line and "opset 17" in line
    assert no_bundle_left(tmp_path)


def test_missing_shape_for_dynamic_dim(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(testing.cnn(), path)  # batch dim is "N"
    code, line = run_cli(capsys, "compile", path, "-o", tmp_path / "out")
    assert code == 2
    assert "input 'image'" in line and "--shape image=Nx3x32x32" in line
    assert no_bundle_left(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("pixels=1x3x32x32", "--shape names 'pixels', which is not a model input"),
    ("image=1x3x32", "has rank 3"),
    ("image=1x4x32x32", "conflicts with the declared shape"),
    ("image=ax3", "is not NAME=DxDx..."),
])
def test_bad_shape_override(tmp_path, capsys, override, message):
    path = tmp_path / "cnn.onnx"
    onnx.save(testing.cnn(), path)
    code, line = run_cli(capsys, "compile", path, "-o", tmp_path / "out", "--shape", override)
    assert code == 2 and message in line


def test_unknown_target(tmp_path, capsys):
    path = tmp_path / "cnn.onnx"
    onnx.save(testing.cnn(batch=1), path)
    code, line = run_cli(capsys, "compile", path, "-o", tmp_path / "out", "--target", "m9")
    assert code == 2 and "m9" in line
    assert no_bundle_left(tmp_path)


# -- run-time input errors ---------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    import applec

    root = tmp_path_factory.mktemp("errors")
    onnx.save(testing.token_mlp(), root / "mlp.onnx")
    applec.compile(root / "mlp.onnx", output=root / "mlp.bundle", shapes={"ids": (2, 6)})
    return root / "mlp.bundle"


@pytest.mark.parametrize("array, name, message", [
    (np.zeros((2, 6), np.int64), "tokens", "unknown input 'tokens'; the model's inputs are: ids"),
    (np.zeros((2, 7), np.int64), "ids", "input 'ids' has shape [2, 7], expected [2, 6]"),
    (np.zeros((2, 6), np.float32), "ids", "input 'ids' has dtype float32, expected int64"),
])
def test_wrong_input(bundle, tmp_path, capsys, array, name, message):
    np.save(tmp_path / "x.npy", array)
    code, line = run_cli(capsys, "run", bundle, "--input", f"{name}={tmp_path / 'x.npy'}")
    assert code == 2 and line == f"error: {message}"


def test_input_file_missing(bundle, capsys):
    code, line = run_cli(capsys, "run", bundle, "--input", "ids=/nonexistent.npy")
    assert code == 2 and "no such file" in line


# -- tampered bundles --------------------------------------------------------------------
def copy_bundle(bundle, tmp_path):
    target = tmp_path / "copy.bundle"
    shutil.copytree(bundle, target)
    return target


def test_one_byte_changed(bundle, tmp_path, capsys):
    target = copy_bundle(bundle, tmp_path)
    blob = next(p for p in target.rglob("*") if p.name == "model.mlmodel")
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    code, line = run_cli(capsys, "run", target, "--input", "ids=/nonexistent.npy")
    assert code == 2
    assert "model.mlmodel' does not match its sha256" in line


def test_manifest_path_outside_bundle(bundle, tmp_path, capsys):
    target = copy_bundle(bundle, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["partitions"][0]["artifact"] = "../../etc"
    (target / "manifest.json").write_text(json.dumps(manifest))
    code, line = run_cli(capsys, "inspect", target)
    assert code == 2 and "'../../etc' points outside the bundle" in line


def test_manifest_file_entry_outside_bundle(bundle, tmp_path, capsys):
    target = copy_bundle(bundle, tmp_path)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"]["/etc/passwd"] = "0" * 64
    (target / "manifest.json").write_text(json.dumps(manifest))
    code, line = run_cli(capsys, "inspect", target)
    assert code == 2 and "'/etc/passwd' points outside the bundle" in line


def test_unlisted_file_in_artifact(bundle, tmp_path, capsys):
    target = copy_bundle(bundle, tmp_path)
    (target / "partitions" / "p0.mlpackage" / "extra.bin").write_bytes(b"x")
    code, line = run_cli(capsys, "inspect", target)
    assert code == 2 and "extra.bin' is not listed in the manifest" in line


def test_not_a_bundle(tmp_path, capsys):
    code, line = run_cli(capsys, "run", tmp_path, "--input", "x.npy")
    assert code == 2 and "not an applec bundle" in line


def test_builder_refusal_is_one_line_naming_the_node(tmp_path, capsys, monkeypatch):
    """A coremltools error inside a lowering rule is an applec bug, reported as one line."""
    from applec.targets.coreml import rules

    def broken(lw, node):
        raise ValueError("Op \"x\" expects tensor of dtype fp32\nsecond line")

    monkeypatch.setitem(rules.RULES, "Relu", broken)
    path = tmp_path / "cnn.onnx"
    onnx.save(testing.cnn(batch=1), path)
    code = main(["compile", str(path), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1  # after the progress lines of the stages that finished
    line = errors[0]
    assert line.startswith("error: cannot lower Relu node 'relu_")
    assert "expects tensor of dtype fp32 (an applec bug: please report it)" in line
    assert no_bundle_left(tmp_path)
