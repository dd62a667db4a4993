"""Patterns torch.onnx.export writes (TorchScript and dynamo exporters) that applec once
refused, rebuilt with onnx.helper and compared with onnxruntime at fp32 and fp16:

- torch.stft: an STFT whose real signal is [batch, length], without the spec's trailing 1
  (onnxruntime accepts it);
- nn.PixelUnshuffle and Swin's window partition: Reshape to rank 6 -> Transpose -> Reshape,
  which merge_transpose_axes brings to rank <= 5;
- F.unfold (im2col): two Gathers with [kernel, blocks] indices -> rank-6 Transpose.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import seeded
from onnx import TensorProto

from applec.errors import UnsupportedOpError
from applec.onnx_import import import_model
from applec.passes import run_pipeline
from applec.testing import GraphBuilder, tensor

F = TensorProto.FLOAT
PRECISIONS = ["fp32", "fp16"]


def i64(*values):
    return np.asarray(values, np.int64)


# -- STFT of a [batch, length] signal ------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("window_as_input", [False, True])
def test_stft_signal_without_trailing_dim(compiled, precision, window_as_input):
    b = GraphBuilder()
    window = "window" if window_as_input else b.init("window", np.hanning(16).astype(np.float32))
    spec = b.op("STFT", ["wav", b.init("step", np.int64(4)), window, b.init("len", np.int64(16))],
                onesided=1)
    b.op("ReduceSum", [b.op("Mul", [spec, spec]), b.init("last", i64(-1))], keepdims=0,
         name="power")
    inputs = [tensor("wav", F, [2, 64])] + ([tensor("window", F, [16])] if window_as_input
                                            else [])
    model = b.model(inputs, [tensor("power", F, [2, 13, 9])])
    feeds = {"wav": seeded((2, 64))}
    if window_as_input:
        feeds["window"] = np.hanning(16).astype(np.float32)
    compiled(model, precision).check(feeds)


# -- rank-6 Reshape -> Transpose -> Reshape ------------------------------------------------
def reshape_transpose_reshape(x_shape, wide_shape, perm, out_shape):
    b = GraphBuilder()
    h = b.op("Reshape", ["x", b.init("wide", i64(*wide_shape))])
    h = b.op("Transpose", [h], perm=perm)
    b.op("Reshape", [h, b.init("narrow", i64(*out_shape))], name="y")
    return b.model([tensor("x", F, list(x_shape))], [tensor("y", F, list(out_shape))])


RESHAPE_CASES = {
    # nn.PixelUnshuffle(2) as the TorchScript exporter writes it
    "pixel_unshuffle": ((1, 3, 8, 8), (1, 3, 4, 2, 4, 2), [0, 1, 3, 5, 2, 4], (1, 12, 4, 4)),
    # Swin window partition, batch 2 (no size-1 axis to drop)
    "window_partition": ((2, 8, 8, 4), (2, 2, 4, 2, 4, 4), [0, 1, 3, 2, 4, 5], (8, 16, 4)),
    # a Flatten reads the transposed tensor (readers may be any view op)
    "depth_to_space_flatten": ((2, 8, 3, 3), (2, 2, 2, 2, 3, 3), [0, 3, 4, 1, 5, 2], None),
}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("case", RESHAPE_CASES)
def test_rank6_transpose_merges(compiled, tmp_path, precision, case):
    x_shape, wide, perm, out_shape = RESHAPE_CASES[case]
    if out_shape is None:  # Flatten reader
        b = GraphBuilder()
        h = b.op("Transpose", [b.op("Reshape", ["x", b.init("wide", i64(*wide))])], perm=perm)
        b.op("Flatten", [h], axis=1, name="y")
        model = b.model([tensor("x", F, list(x_shape))], [tensor("y", F, [2, 72])])
    else:
        model = reshape_transpose_reshape(x_shape, wide, perm, out_shape)
    compiled(model, precision).check({"x": seeded(x_shape)})


def test_rank6_merge_leaves_no_rank6_value(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(reshape_transpose_reshape(*RESHAPE_CASES["pixel_unshuffle"]), path)
    graph = import_model(path)
    reader = graph.outputs[0].producer.name
    records = run_pipeline(graph)
    assert {r["pass"]: r["rewrites"] for r in records}["merge_transpose_axes"] == 1
    assert max(len(v.shape) for v in graph.values()) <= 5
    transpose = next(n for n in graph.nodes if n.op_type == "Transpose")
    assert transpose.attrs["perm"] == [0, 2, 4, 1, 3]  # size-1 batch dropped, 0+1 merged
    assert graph.outputs[0].producer.name == reader  # the reader keeps its name (reports)


def test_rank6_transpose_that_cannot_merge_is_refused(compiled):
    # six non-unit axes fully reversed: no two stay adjacent, so rank 6 it stays
    model = reshape_transpose_reshape((2, 3, 2, 3, 2, 3), (2, 3, 2, 3, 2, 3),
                                      [5, 4, 3, 2, 1, 0], (6, 36))
    with pytest.raises(UnsupportedOpError, match="has rank 6; CoreML tensors have rank <= 5"):
        compiled(model, "fp32")


# -- F.unfold: Gather with 2-D indices twice, then a rank-6 Transpose ----------------------
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("indices_as_input", [False, True])
def test_unfold_gathers(compiled, precision, indices_as_input):
    """F.unfold(x, kernel_size=2, stride=2) on [1, 4, 6, 6] -> [1, 16, 9]."""
    blocks = np.asarray([[0, 2, 4], [1, 3, 5]], np.int64)  # [kernel, blocks]
    b = GraphBuilder()
    idx = "idx" if indices_as_input else b.init("idx", blocks)
    h = b.op("Gather", ["x", idx], axis=2)           # [1, 4, 2, 3, 6]
    h = b.op("Gather", [h, idx], axis=4)             # [1, 4, 2, 3, 2, 3]
    h = b.op("Transpose", [h], perm=[0, 1, 2, 4, 3, 5])
    b.op("Reshape", [h, b.init("cols", i64(1, 16, -1))], name="y")
    inputs = [tensor("x", F, [1, 4, 6, 6])] + \
        ([tensor("idx", TensorProto.INT64, [2, 3])] if indices_as_input else [])
    model = b.model(inputs, [tensor("y", F, [1, 16, 9])])
    feeds = {"x": seeded((1, 4, 6, 6))}
    if indices_as_input:
        feeds["idx"] = blocks
    compiled(model, precision).check(feeds)
