"""Bundle guarantees: reproducible bytes, atomic replacement, verification on load."""

from __future__ import annotations

import filecmp

import onnx
import pytest

import applec
from applec import bundle as bundle_format
from applec import testing
from applec.errors import ApplecError, BundleError


def tree(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make, shapes", [
    (testing.cnn, {"image": (1, 3, 32, 32)}),
    (testing.transformer_block, {"hidden": (1, 8, 32), "attention_mask": (1, 8)}),
])
def test_two_compiles_are_byte_identical(tmp_path, make, shapes):
    onnx.save(make(), tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "a", shapes=shapes)
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "b", shapes=shapes)
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert list(a) == list(b)
    assert a == b
    assert "partitions/p0.mlpackage/Manifest.json" in a
    assert b"conversion_date" not in a["partitions/p0.mlpackage/Data/com.apple.CoreML/model.mlmodel"]


def test_manifest_lists_every_file_with_sha256(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")
    result = applec.compile(tmp_path / "m.onnx", output=tmp_path / "out")
    files = set(tree(tmp_path / "out")) - {"manifest.json"}
    assert set(result.manifest["files"]) == files
    assert all(len(h) == 64 for h in result.manifest["files"].values())
    part = result.manifest["partitions"][0]
    assert part["backend"] == "coreml"
    assert [p["tensor"] for p in part["inputs"]] == ["image"]
    assert [p["tensor"] for p in part["outputs"]] == ["probs"]


def test_failed_compile_keeps_existing_bundle(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "good.onnx")
    applec.compile(tmp_path / "good.onnx", output=tmp_path / "out")
    before = tree(tmp_path / "out")
    (tmp_path / "bad.onnx").write_bytes(b"garbage")
    with pytest.raises(ApplecError):
        applec.compile(tmp_path / "bad.onnx", output=tmp_path / "out")
    assert tree(tmp_path / "out") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx", "good.onnx", "out"]


def test_interrupted_compile_leaves_nothing(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")

    def interrupt(stage, detail):
        if stage == "lower":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        applec.compile(tmp_path / "m.onnx", output=tmp_path / "out", on_stage=interrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_recompile_replaces_bundle(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "out", precision="fp16")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "out", precision="fp32")
    assert applec.load(tmp_path / "out").precision == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out"]


def test_refuses_to_overwrite_a_non_bundle(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("...")
    with pytest.raises(BundleError, match="exists and is not an applec bundle"):
        applec.compile(tmp_path / "m.onnx", output=precious)
    assert (precious / "thesis.tex").read_text() == "..."


def test_symlink_escaping_bundle_is_refused(tmp_path):
    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "out")
    (tmp_path / "outside").mkdir()
    (tmp_path / "out" / "partitions" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(BundleError, match="points outside the bundle"):
        bundle_format.safe_path(tmp_path / "out", "partitions/link/x", "file")


def test_compile_writes_same_bundle_as_copy(tmp_path):
    """A copied bundle verifies and runs: nothing in it depends on its location."""
    import shutil

    onnx.save(testing.cnn(batch=1), tmp_path / "m.onnx")
    applec.compile(tmp_path / "m.onnx", output=tmp_path / "out")
    shutil.copytree(tmp_path / "out", tmp_path / "moved")
    assert not filecmp.dircmp(tmp_path / "out", tmp_path / "moved").diff_files
    applec.load(tmp_path / "moved", backend="reference")
