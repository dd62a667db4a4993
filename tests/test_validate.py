"""applec.validate.compare: the error measures and the match rule per precision."""

from __future__ import annotations

import numpy as np
import pytest

from applec.validate import compare

WANT = np.array([[0.5, -1.0, 2.0, 0.25]], np.float32)


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_nan_where_the_reference_is_finite_fails(precision):
    """An all-NaN output has no finite element to take a cosine over: it must fail, not
    come out as cosine 1 (which once called six NaN bundles a match)."""
    check = compare("y", np.full_like(WANT, np.nan), WANT, precision)
    assert not check.ok
    assert (check.max_rel, check.cosine) == (np.inf, 0.0)
    one_inf = WANT.copy()
    one_inf[0, 1] = np.inf
    assert not compare("y", one_inf, WANT, precision).ok


def test_non_finite_values_that_agree_are_fine():
    want = WANT.copy()
    want[0, 0], want[0, 3] = np.inf, np.nan
    got = want.copy()
    got[0, 2] = 2.001
    check = compare("y", got, want, "fp16")
    assert check.ok and check.cosine > 0.9999
    got[0, 0] = -np.inf  # the wrong infinity
    assert not compare("y", got, want, "fp16").ok
    got[0, 0], got[0, 3] = np.inf, 1.0  # a number where the reference has NaN
    assert not compare("y", got, want, "fp16").ok


def test_tolerances():
    assert compare("y", WANT * (1 + 5e-5), WANT, "fp32").ok
    assert not compare("y", WANT + 1e-3, WANT, "fp32").ok
    assert compare("y", WANT + 1e-3, WANT, "fp16").ok
    assert not compare("y", WANT[:, ::-1].copy(), WANT, "fp16").ok


def test_oracle_runs_onnxruntime_with_basic_rewrites_only(tmp_path, monkeypatch):
    """The oracle computes ONNX semantics: no extended fusions (their QDQ kernels are not
    exact). It still answers, for the inputs the model takes."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from applec.validate import onnxruntime_outputs
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                ir_version=8), path)
    levels, real = [], ort.InferenceSession

    def spy(model, options, **kw):
        levels.append(options.graph_optimization_level)
        return real(model, options, **kw)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    out = onnxruntime_outputs(path, {"x": np.array([-1, 2], np.float32), "unused": np.ones(1)})
    np.testing.assert_array_equal(out["y"], [0, 2])
    assert levels == [ort.GraphOptimizationLevel.ORT_ENABLE_BASIC]
