"""Every op-table case compiled into a bundle, run by the reference executor, and compared
with onnxruntime: fp32 max relative error <= 1e-4, fp16 cosine >= 0.999.

Cases that CoreML cannot express are listed in UNSUPPORTED with the reason; for those the
test asserts that compilation fails with that clear error (never a failure at run time).
"""

from __future__ import annotations

import onnx
import pytest
from op_cases import CASES, make_inputs, make_model, output_names

import applec
from applec.errors import UnsupportedOpError
from applec.validate import compare, onnxruntime_outputs

# case id -> the message compilation must fail with
UNSUPPORTED: dict[str, str] = {
    "maxpool2d_dilation": "dilated pooling has no CoreML equivalent",
    "avgpool2d_dilation": "dilated pooling has no CoreML equivalent",
    "pad_wrap": "mode 'wrap' is not supported",
    "resize_cubic": "mode 'cubic' .* matches no CoreML resize",
    "resize_linear_fractional_scale": "axis 2 \\(5 -> 7, scale 1.5\\) matches no CoreML resize",
    "resize_linear_antialias_down": "mode 'linear' with antialias .* matches no CoreML resize",
}

PARAMS = [pytest.param(case, precision, id=f"{case.id}-{precision}")
          for case in CASES for precision in ("fp32", "fp16")
          if precision == "fp32" or case.fp16_ok]


@pytest.mark.parametrize("case, precision", PARAMS)
def test_op_compiled(case, precision, tmp_path):
    path = tmp_path / "op.onnx"
    onnx.save(make_model(case), path)
    if case.id in UNSUPPORTED:
        with pytest.raises(UnsupportedOpError, match=UNSUPPORTED[case.id]):
            applec.compile(path, output=tmp_path / "b", precision=precision)
        assert not (tmp_path / "b").exists()
        return
    applec.compile(path, output=tmp_path / "b", precision=precision)
    feeds = make_inputs(case, seed=0)
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)
    want = onnxruntime_outputs(path, feeds)
    for name in output_names(case):
        assert got[name].shape == want[name].shape, name
        assert got[name].dtype == want[name].dtype, name
        check = compare(name, got[name], want[name], precision)
        if precision == "fp32" and want[name].dtype.kind == "f":
            assert check.max_rel <= 1e-4, check
        elif want[name].dtype.kind == "f":
            assert check.cosine >= 0.999, check
        else:
            assert check.ok, check


LEGACY_RESIZE = [  # (op, opset, mode, scales as attribute?, scales)
    ("Upsample", 7, "nearest", True, [1, 1, 2, 3]),
    ("Upsample", 9, "nearest", False, [1, 1, 2, 2]),
    ("Upsample", 9, "linear", False, [1, 1, 2, 2]),
    ("Resize", 10, "nearest", False, [1, 1, 0.5, 0.5]),
    ("Resize", 10, "linear", False, [1, 1, 3, 2]),
]


@pytest.mark.parametrize("op, opset, mode, as_attr, scales", LEGACY_RESIZE,
                         ids=[f"{o}{v}_{m}_{'x'.join(map(str, s))}"
                              for o, v, m, _, s in LEGACY_RESIZE])
def test_legacy_resize_forms(op, opset, mode, as_attr, scales, tmp_path):
    """Upsample and Resize-10 become canonical Resize with asymmetric coordinates and the
    nearest rounding onnxruntime used before nearest_mode existed."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    scales = np.asarray(scales, np.float32)
    inits = [] if as_attr else [numpy_helper.from_array(scales, "scales")]
    node = helper.make_node(op, ["x"] if as_attr else ["x", "scales"], ["y"], mode=mode,
                            **({"scales": scales.tolist()} if as_attr else {}))
    graph = helper.make_graph([node], "legacy", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 2, 4, 6])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, np.floor(scales * [1, 2, 4, 6]).astype(int).tolist())],
        initializer=inits)
    path = tmp_path / "legacy.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                ir_version=7), path)
    applec.compile(path, output=tmp_path / "b", precision="fp32")
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 6)).astype(np.float32)}
    got = applec.load(tmp_path / "b", backend="reference").run(feeds)["y"]
    want = onnxruntime_outputs(path, feeds)["y"]
    assert got.shape == want.shape
    assert compare("y", got, want, "fp32").max_rel <= 1e-6
