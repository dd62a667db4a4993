"""The CLI contract: commands, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from applec import testing
from applec.cli import main


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = root / "cnn.onnx"
    onnx.save(testing.cnn(batch=1), model)
    bundle = root / "cnn.bundle"
    assert main(["compile", str(model), "--target", "m2", "-o", str(bundle),
                 "--precision", "fp32"]) == 0
    image = root / "image.npy"
    np.save(image, np.random.default_rng(0).standard_normal((1, 3, 32, 32), np.float32))
    return root, model, bundle, image


def test_compile_json(tmp_path, capsys):
    model = tmp_path / "mlp.onnx"
    onnx.save(testing.token_mlp(), model)
    code = main(["compile", str(model), "-o", str(tmp_path / "b"), "--shape", "ids=2x6",
                 "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["target"]["chip"] == "m2"
    assert summary["partitions"][0]["backend"] == "coreml"
    assert {p["pass"] for p in summary["passes"]} >= {"fold_constants", "eliminate_dead_code"}


def test_run_writes_outputs_by_name(cnn_bundle, tmp_path, capsys):
    root, model, bundle, image = cnn_bundle
    out = tmp_path / "out.npz"
    assert main(["run", str(bundle), "--input", str(image), "-o", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["outputs"]["probs"]["shape"] == [1, 10]
    with np.load(out) as data:
        assert list(data) == ["probs"]
        assert np.isclose(data["probs"].sum(), 1.0, atol=1e-5)


def test_run_named_input(cnn_bundle, capsys):
    root, model, bundle, image = cnn_bundle
    assert main(["run", str(bundle), "--input", f"image={image}"]) == 0
    assert "probs" in capsys.readouterr().out


def test_validate_ok_and_json(cnn_bundle, capsys):
    root, model, bundle, image = cnn_bundle
    assert main(["validate", str(bundle), "--onnx", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["outputs"][0]["max_rel"] <= 1e-4


def test_validate_with_given_inputs(cnn_bundle, capsys):
    root, model, bundle, image = cnn_bundle
    assert main(["validate", str(bundle), "--onnx", str(model), "--input", f"image={image}",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["bundle"] == str(bundle)


def test_validate_mismatch_exits_1(cnn_bundle, tmp_path, capsys):
    root, model, bundle, image = cnn_bundle
    other = tmp_path / "other.onnx"
    onnx.save(testing.cnn(seed=1, batch=1), other)  # same graph, different weights
    assert main(["validate", str(bundle), "--onnx", str(other)]) == 1
    assert "outputs over tolerance: probs" in capsys.readouterr().err


def test_inspect(cnn_bundle, capsys):
    root, model, bundle, image = cnn_bundle
    assert main(["inspect", str(bundle), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"]["partitions"][0]["artifact"] == "partitions/p0.mlpackage"
    assert data["report"]["nodes"]["conv1"]["status"] == "lowered"
    assert main(["inspect", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "conv1" in text and "p0" in text


def test_targets(capsys):
    assert main(["targets", "--json"]) == 0
    ids = [p["id"] for p in json.loads(capsys.readouterr().out)]
    assert {"m1", "m2", "m3", "m4"} <= set(ids)


def test_console_script_end_to_end(cnn_bundle):
    """The installed `applec` entry point: real process, real exit codes."""
    root, model, bundle, image = cnn_bundle
    done = subprocess.run([sys.executable, "-m", "applec.cli", "run", str(bundle), "--input",
                           str(image)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([sys.executable, "-m", "applec.cli", "run", str(bundle), "--input",
                          f"nope={image}"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: unknown input 'nope'; the model's inputs are: image"]
