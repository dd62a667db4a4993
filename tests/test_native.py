"""The native CoreML path (macOS only) against the reference executor on the same bundle.

Off macOS these tests skip with the reason: CoreML cannot load models here. The rest of
the suite checks the same bundles through the reference executor.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import applec
from applec import testing
from applec.errors import ApplecError
from applec.runtime import native_available
from applec.validate import compare

needs_coreml = pytest.mark.skipif(not native_available(),
                                  reason="CoreML runs only on macOS (coremltools.libcoremlpython)")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    onnx.save(testing.cnn(batch=1), root / "cnn.onnx")
    applec.compile(root / "cnn.onnx", output=root / "cnn.bundle")
    return root / "cnn.bundle"


@needs_coreml
@pytest.mark.parametrize("units", ["cpu", "all"])
def test_native_matches_reference(bundle, units):
    image = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    native = applec.load(bundle, backend="native", compute_units=units).run({"image": image})
    reference = applec.load(bundle, backend="reference").run({"image": image})
    assert compare("probs", native["probs"], reference["probs"], "fp16").ok


@pytest.mark.skipif(native_available(), reason="checks the error shown off macOS")
def test_native_backend_off_macos_is_a_clear_error(bundle):
    with pytest.raises(ApplecError, match="--backend native needs macOS with CoreML"):
        applec.load(bundle, backend="native")


def test_auto_backend_picks_what_this_machine_has(bundle):
    loaded = applec.load(bundle, backend="auto")
    kind = type(loaded.executors[0]).__name__
    assert kind == ("NativeProgram" if native_available() else "ReferenceProgram")
