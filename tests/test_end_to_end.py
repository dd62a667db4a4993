"""Whole models through compile -> bundle -> reference executor, against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import seeded

from applec import testing


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cnn(compiled, precision):
    c = compiled(testing.cnn(), precision, shapes={"image": (2, 3, 32, 32)})
    checks = c.check({"image": seeded((2, 3, 32, 32))})
    if precision == "fp32":
        assert checks["probs"].max_rel <= 1e-4
    else:
        assert checks["probs"].cosine >= 0.999
    ops = c.result.report["nodes"]
    assert ops["depthwise"]["mil_ops"] == ["conv"]
    assert all(entry["status"] in ("lowered", "fused") for entry in ops.values())
    assert ops["batchnormalization_2"]["fused_into"] == "conv1"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_token_mlp_int64_ids(compiled, precision):
    c = compiled(testing.token_mlp(vocab=100), precision, shapes={"ids": (3, 6)})
    assert c.bundle.inputs == [{"name": "ids", "dtype": "int64", "shape": [3, 6]}]
    part = c.bundle.manifest["partitions"][0]
    assert part["inputs"][0]["dtype"] == "int32"  # CoreML has no int64: narrowed at the edge
    c.check({"ids": seeded((3, 6), dtype=np.int64, low=0, high=100)})


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_transformer_block(compiled, precision):
    c = compiled(testing.transformer_block(), precision,
                 shapes={"hidden": (2, 8, 32), "attention_mask": (2, 8)})
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0  # padding in the second sequence
    c.check({"hidden": seeded((2, 8, 32)), "attention_mask": mask})
    # the Shape -> Gather -> Concat -> Reshape head-splitting subgraphs folded away
    nodes = c.result.report["nodes"]
    for op_type in ("Shape", "Gather", "Concat"):
        assert {e["status"] for e in nodes.values() if e["op_type"] == op_type} == {"folded"}


def test_bundle_runs_many_times(compiled):
    c = compiled(testing.cnn(), "fp32", shapes={"image": (1, 3, 32, 32)})
    first = c.run({"image": seeded((1, 3, 32, 32), 1)})["probs"]
    second = c.run({"image": seeded((1, 3, 32, 32), 2)})["probs"]
    again = c.run({"image": seeded((1, 3, 32, 32), 1)})["probs"]
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(first, again)
