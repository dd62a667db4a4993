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
