"""Shared fixtures: compile a model into tmp_path, run it, compare with onnxruntime."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

logging.getLogger("coremltools").setLevel(logging.ERROR)


class Compiled:
    """A model compiled into a bundle under tmp_path, with helpers to run and compare."""

    def __init__(self, tmp_path, model: onnx.ModelProto, precision: str, shapes=None,
                 target: str = "m2", name: str = "model"):
        import applec

        self.onnx_path = tmp_path / f"{name}.onnx"
        onnx.save(model, self.onnx_path)
        self.bundle_path = tmp_path / f"{name}_{precision}.bundle"
        self.result = applec.compile(self.onnx_path, output=self.bundle_path, target=target,
                                     precision=precision, shapes=shapes)
        self.bundle = applec.load(self.bundle_path, backend="reference")
        self.precision = precision

    def run(self, feeds):
        return self.bundle.run(feeds)

    def oracle(self, feeds):
        from applec.validate import onnxruntime_outputs

        return onnxruntime_outputs(self.onnx_path, feeds)

    def check(self, feeds):
        """Run both, assert names, shapes, dtypes, then values within the tolerance."""
        from applec.validate import compare

        got, want = self.run(feeds), self.oracle(feeds)
        assert set(got) == set(want)
        checks = {}
        for name, expected in want.items():
            assert got[name].shape == expected.shape, name
            assert got[name].dtype == expected.dtype, name
            check = compare(name, got[name], expected, self.precision)
            assert check.ok, f"{name}: {check}"
            checks[name] = check
        return checks


@pytest.fixture
def compiled(tmp_path):
    def make(model, precision="fp32", shapes=None, target="m2", name="model"):
        return Compiled(tmp_path, model, precision, shapes, target, name)
    return make


def seeded(shape, seed=0, dtype=np.float32, low=None, high=None):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        return rng.integers(low or 0, high or 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)
