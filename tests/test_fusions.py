"""Cleanup and fusion passes: structure after (IR op counts, MIL ops in the bundle's
report.json), numbers before/after (the interpreter on the unfused vs the fused IR), the
compiled bundle against onnxruntime, and near-misses that must not fuse, with the reason."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest
from conftest import seeded
from onnx import TensorProto

import applec
from applec import interpreter, testing
from applec.errors import ShapeError
from applec.ir import Graph
from applec.onnx_import import import_model
from applec.ops import infer_node
from applec.passes import PIPELINE, eliminate_common_subexpressions, run_pipeline
from applec.passes._patterns import refusals
from applec.testing import GraphBuilder, tensor

F = TensorProto.FLOAT
UNFUSED = [(name, fn) for name, fn in PIPELINE if not name.startswith("fuse_")]
TRANSFORMER_SHAPES = {"hidden": (2, 8, 32), "attention_mask": (2, 8)}


# -- helpers -------------------------------------------------------------------------------
def save(tmp_path, proto) -> str:
    path = tmp_path / "fusion.onnx"
    onnx.save(proto, path)
    return path


def pipelines(tmp_path, model, shapes=None):
    """The model imported twice: after the cleanup passes only, and after all passes."""
    path = save(tmp_path, model)
    unfused, fused = import_model(path, shapes), import_model(path, shapes)
    run_pipeline(unfused, UNFUSED)
    records = run_pipeline(fused)
    return unfused, fused, {r["pass"]: r["rewrites"] for r in records}


def assert_same_numbers(unfused, fused, feeds, rtol=1e-5):
    before, after = interpreter.run(unfused, feeds), interpreter.run(fused, feeds)
    assert list(after) == list(before)  # output names kept
    for name, want in before.items():
        assert after[name].shape == want.shape and after[name].dtype == want.dtype, name
        error = np.max(np.abs(after[name] - want)) / max(np.max(np.abs(want)), 1e-30)
        assert error <= rtol, f"{name}: relative error {error:.2e}"


def bundle_mil_ops(c) -> dict[str, list[str]]:
    """MIL ops per lowered ONNX node, as the bundle's report.json lists them."""
    report = json.loads((c.bundle_path / "report.json").read_text())
    return {name: entry["mil_ops"] for name, entry in report["nodes"].items()
            if entry["status"] == "lowered"}


def mil_ops_of(c, onnx_node: str) -> list[str]:
    """The MIL ops of the node `onnx_node` was lowered or fused into."""
    nodes = c.result.report["nodes"]
    return nodes[nodes[onnx_node].get("fused_into", onnx_node)]["mil_ops"]


def all_mil_ops(c) -> list[str]:
    return [op for ops in bundle_mil_ops(c).values() for op in ops]


def model(b: GraphBuilder, inputs: dict, outputs: dict, opset: int = 17):
    return b.model([tensor(n, F, s) for n, s in inputs.items()],
                   [tensor(n, F, s) for n, s in outputs.items()], opset=opset)


def f32(b: GraphBuilder, value) -> str:
    return b.init(f"c{len(b.inits)}", np.float32(value))


def i64(b: GraphBuilder, value) -> str:
    return b.init(f"i{len(b.inits)}", np.asarray(value, np.int64))


# -- eliminate_common_subexpressions -------------------------------------------------------
def test_cse_merges_equal_nodes_and_constants(tmp_path):
    b = GraphBuilder()
    two, same_two = f32(b, 2.0), f32(b, 2.0)
    a = b.op("Exp", [b.op("Mul", ["x", two])])
    c = b.op("Exp", [b.op("Mul", ["x", same_two])])           # same after the constant merge
    t1 = b.op("Transpose", [a], perm=[1, 0])
    t2 = b.op("Transpose", [c], perm=[0, 1])                    # other attributes: kept
    b.op("Add", [b.op("Add", [a, c]), b.op("Transpose", [t1], perm=[1, 0])], name="y")
    b.op("Exp", [b.op("Mul", ["x", two])], name="z")            # a graph output: kept
    b.op("Relu", [t2], name="w")
    graph = import_model(save(tmp_path, model(b, {"x": (3, 3)},
                                               {"y": (3, 3), "z": (3, 3), "w": (3, 3)})))
    feeds = {"x": seeded((3, 3))}
    before = interpreter.run(graph, feeds)
    merged = eliminate_common_subexpressions.run(graph)
    graph.validate()
    assert merged == 4  # one constant, then Mul and Exp of the second chain, then Mul of z
    assert graph.op_counts() == {"Mul": 1, "Exp": 2, "Transpose": 3, "Add": 2, "Relu": 1}
    assert [v.name for v in graph.outputs] == ["y", "z", "w"]
    after = interpreter.run(graph, feeds)
    for name in before:
        np.testing.assert_array_equal(after[name], before[name])
    assert eliminate_common_subexpressions.run(graph) == 0


# -- fuse_conv_batchnorm -------------------------------------------------------------------
def test_conv_batchnorm_cnn(tmp_path, compiled):
    shapes = {"image": (2, 3, 32, 32)}
    unfused, fused, rewrites = pipelines(tmp_path, testing.cnn(), shapes)
    assert unfused.op_counts()["BatchNormalization"] == 2
    assert "BatchNormalization" not in fused.op_counts() and fused.op_counts()["Conv"] == 3
    assert rewrites["fuse_conv_batchnorm"] == 2
    feeds = {"image": seeded((2, 3, 32, 32))}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(testing.cnn(), shapes=shapes)
    c.check(feeds)
    assert "batch_norm" not in all_mil_ops(c)
    nodes = c.result.report["nodes"]
    assert nodes["depthwise"]["mil_ops"] == ["conv"]
    bn = [e for e in nodes.values() if e["op_type"] == "BatchNormalization"]
    assert {(e["status"], e["fused_into"]) for e in bn} == {("fused", "conv1"),
                                                           ("fused", "depthwise")}


def _conv_bn(b: GraphBuilder, scale: str | None = None) -> tuple[str, str]:
    conv = b.op("Conv", ["x", b.weight("w", (4, 3, 3, 3)), b.weight("wb", (4,))],
                pads=[1, 1, 1, 1], name="conv")
    params = [scale or b.init("g", np.linspace(0.5, 1.5, 4, dtype=np.float32))] + [
        b.init(n, np.full(4, v, np.float32)) for n, v in (("bt", 0.1), ("mu", 0.2),
                                                          ("var", 1.5))]
    return conv, b.op("BatchNormalization", [conv] + params, name="bn")


def test_conv_batchnorm_near_misses(tmp_path):
    b = GraphBuilder()
    conv, bn = _conv_bn(b)
    b.op("Relu", [conv], name="also")                 # the Conv output is needed as well
    b.op("Identity", [bn], name="y")
    unfused, fused, _ = pipelines(tmp_path, model(b, {"x": (1, 3, 8, 8)},
                                                  {"y": (1, 4, 8, 8), "also": (1, 4, 8, 8)}))
    assert fused.op_counts()["BatchNormalization"] == 1
    assert "also read by Relu" in refusals(fused, "fuse_conv_batchnorm")["bn"]
    assert_same_numbers(unfused, fused, {"x": seeded((1, 3, 8, 8))})

    b = GraphBuilder()
    _, bn = _conv_bn(b, scale="gamma")                # a BN parameter fed at run time
    b.op("Identity", [bn], name="y")
    proto = b.model([tensor("x", F, (1, 3, 8, 8)), tensor("gamma", F, (4,))],
                    [tensor("y", F, (1, 4, 8, 8))])
    _, fused, _ = pipelines(tmp_path, proto)
    assert fused.op_counts()["BatchNormalization"] == 1
    assert refusals(fused, "fuse_conv_batchnorm")["bn"] == \
        "BatchNormalization gamma 'gamma' is not a constant"


# -- fuse_channel_affine -------------------------------------------------------------------
def test_channel_affine_caffe_scale_chain(tmp_path, compiled):
    """Conv, BatchNorm, Mul, Add, Relu (onnx's inception_v2) folds to Conv, Relu; a
    pre-activation BatchNorm, Mul, Add (densenet121) folds to one BatchNorm; Sub and Div
    by a scalar fold too."""
    b = GraphBuilder()
    _, bn = _conv_bn(b)
    scale = b.op("Unsqueeze", [b.init("s", np.linspace(0.5, 2, 4, dtype=np.float32)),
                               i64(b, [1, 2])])                    # [4, 1, 1], as exported
    shift = b.init("t", np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4, 1, 1))
    b.op("Relu", [b.op("Add", [b.op("Mul", [bn, scale], name="scale"), shift],
                       name="shift")], name="y")
    norm = b.op("BatchNormalization", ["x"] + [b.init(n, np.full(3, v, np.float32)) for n, v in
                                               (("g2", 1.2), ("b2", 0.1), ("m2", 0.3),
                                                ("v2", 2.0))], name="bn2")
    b.op("Relu", [b.op("Add", [b.weight("t2", (3, 1, 1)), b.op("Mul", [norm, b.weight(
        "s2", (1, 3, 1, 1))], name="scale2")], name="shift2")], name="z")
    b.op("Div", [b.op("Sub", [b.op("Conv", ["x", b.weight("w3", (2, 3, 1, 1))], name="conv3"),
                              f32(b, 0.25)], name="sub3"), f32(b, 4.0)], name="v")
    proto = model(b, {"x": (1, 3, 8, 8)}, {"y": (1, 4, 8, 8), "z": (1, 3, 8, 8),
                                           "v": (1, 2, 8, 8)})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"Conv": 2, "Relu": 2, "BatchNormalization": 1}
    assert rewrites["fuse_channel_affine"] == 6
    assert_same_numbers(unfused, fused, {"x": seeded((1, 3, 8, 8))})
    c = compiled(proto)
    c.check({"x": seeded((1, 3, 8, 8))})
    assert mil_ops_of(c, "shift") == ["conv"] and mil_ops_of(c, "sub3") == ["conv"]
    assert sorted(all_mil_ops(c)) == ["batch_norm", "conv", "conv", "relu", "relu"]
    nodes = c.result.report["nodes"]
    assert nodes["scale2"]["fused_into"] == "bn2" and nodes["shift"]["fused_into"] == "conv"


def test_channel_affine_near_misses(tmp_path):
    b = GraphBuilder()
    conv = lambda name: b.op("Conv", ["x", b.weight(f"w_{name}", (4, 3, 1, 1))], name=name)
    b.op("Mul", [conv("rows"), b.weight("per_row", (1, 1, 8, 1))], name="y1")   # not per channel
    b.op("Add", [conv("grow"), b.weight("big", (1, 1, 4, 1, 1))], name="y2")    # adds a dim
    b.op("Sub", [f32(b, 1.0), conv("reversed")], name="y3")                    # 1 - conv
    b.op("Div", [conv("zero"), b.init("zeros", np.array([1, 0, 1, 1], np.float32)
                                      .reshape(4, 1, 1))], name="y4")
    b.op("Mul", [conv("runtime"), "s"], name="y5")                              # not a constant
    proto = b.model([tensor("x", F, (1, 3, 8, 8)), tensor("s", F, (4, 1, 1))],
                    [tensor("y1", F, (1, 4, 8, 8)), tensor("y2", F, (1, 1, 4, 8, 8)),
                     tensor("y3", F, (1, 4, 8, 8)), tensor("y4", F, (1, 4, 8, 8)),
                     tensor("y5", F, (1, 4, 8, 8))])
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert rewrites.get("fuse_channel_affine", 0) == 0
    assert fused.op_counts() == {"Conv": 5, "Mul": 2, "Add": 1, "Sub": 1, "Div": 1}
    reasons = refusals(fused, "fuse_channel_affine")
    assert reasons == {
        "y1": "the constant 'per_row' of shape [1, 1, 8, 1] is not one number per channel "
              "of the [1, 4, 8, 8] output",
        "y2": "the constant 'big' has rank 5, above the output's 4",
        "y4": "the divisor 'zeros' holds a zero"}
    feeds = {"x": seeded((1, 3, 8, 8)), "s": seeded((4, 1, 1))}
    before, after = interpreter.run(unfused, feeds), interpreter.run(fused, feeds)
    for name, want in before.items():  # y4 holds inf where it divides by 0
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=1e-6, err_msg=name)


# -- fuse_matmul_add -----------------------------------------------------------------------
def test_matmul_add_to_linear(tmp_path, compiled):
    b = GraphBuilder()
    w = b.weight("w", (16, 8))
    b.op("Add", [b.op("MatMul", ["x3", w], name="mm3"), b.weight("b3", (8,))], name="y3")
    b.op("Add", [b.weight("b4", (1, 1, 1, 8)), b.op("MatMul", ["x4", w], name="mm4")],
         name="y4")
    proto = model(b, {"x3": (2, 5, 16), "x4": (2, 3, 5, 16)},
                  {"y3": (2, 5, 8), "y4": (2, 3, 5, 8)})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"applec.Linear": 2} and rewrites["fuse_matmul_add"] == 2
    feeds = {"x3": seeded((2, 5, 16)), "x4": seeded((2, 3, 5, 16), 1)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    ops = bundle_mil_ops(c)
    assert ops["mm3"] == ["linear"]              # MIL linear takes x of rank <= 3
    assert ops["mm4"] == ["matmul", "add"]


def test_matmul_add_near_misses(tmp_path):
    b = GraphBuilder()
    b.op("Add", [b.op("MatMul", ["x", b.weight("w", (16, 8))]), b.weight("b", (5, 8))],
         name="per_row")                               # bias varies along rows too
    b.op("Add", [b.op("MatMul", ["x", "m"]), b.weight("b2", (8,))], name="runtime_w")
    proto = b.model([tensor("x", F, (5, 16)), tensor("m", F, (16, 8))],
                    [tensor("per_row", F, (5, 8)), tensor("runtime_w", F, (5, 8))])
    unfused, fused, _ = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"MatMul": 2, "Add": 2}
    reasons = refusals(fused, "fuse_matmul_add")
    assert reasons["per_row"] == "bias [5, 8] varies along more than the last dim"
    assert reasons["runtime_w"] == "weight 'm' is not a constant"
    assert_same_numbers(unfused, fused, {"x": seeded((5, 16)), "m": seeded((16, 8), 1)})


# -- fuse_gelu -----------------------------------------------------------------------------
def _gelu_forms(b: GraphBuilder) -> list[str]:
    """Every GELU spelling we fuse; form i reads input xi (shared inputs would be merged
    by eliminate_common_subexpressions, and a shared Erf fuses into neither GELU)."""
    def erf_part(x: str, scale_op: str = "Div") -> str:
        c = math.sqrt(2) if scale_op == "Div" else 0.70710678
        return b.op("Add", [f32(b, 1.0), b.op("Erf", [b.op(scale_op, [x, f32(b, c)])])])

    def tanh_part(x: str, cube: str) -> str:
        x3 = b.op("Pow", [x, f32(b, 3.0)]) if cube == "pow" else \
            b.op("Mul", [b.op("Mul", [x, x]), x])
        inner = b.op("Add", [x, b.op("Mul", [f32(b, 0.044715), x3])])
        return b.op("Add", [b.op("Tanh", [b.op("Mul", [f32(b, 0.7978845608), inner])]),
                            f32(b, 1.0)])

    b.op("Mul", [b.op("Mul", ["x0", f32(b, 0.5)]), erf_part("x0")], name="x_half_erf")
    b.op("Mul", [b.op("Mul", [f32(b, 0.5), "x1"]), erf_part("x1", "Mul")], name="half_x_erf")
    b.op("Mul", [b.op("Mul", ["x2", erf_part("x2")]), f32(b, 0.5)], name="x_erf_half")
    b.op("Mul", ["x3", b.op("Mul", [erf_part("x3", "Mul"), f32(b, 0.5)])], name="x_times_rest")
    b.op("Mul", [b.op("Mul", [f32(b, 0.5), "x4"]), tanh_part("x4", "pow")], name="tanh_pow")
    b.op("Mul", [tanh_part("x5", "mul"), b.op("Mul", ["x5", f32(b, 0.5)])], name="tanh_cube")
    return ["x_half_erf", "half_x_erf", "x_erf_half", "x_times_rest", "tanh_pow", "tanh_cube"]


def test_gelu_forms(tmp_path, compiled):
    b = GraphBuilder()
    names = _gelu_forms(b)
    proto = model(b, {f"x{i}": (4, 16) for i in range(6)}, {n: (4, 16) for n in names})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"Gelu": 6} and rewrites["fuse_gelu"] == 6
    modes = [v.producer.attrs["approximate"] for v in fused.outputs]
    assert modes == ["none"] * 4 + ["tanh"] * 2
    feeds = {f"x{i}": seeded((4, 16), i) * 3 for i in range(6)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    assert all_mil_ops(c) == ["gelu"] * 6


def test_gelu_near_misses(tmp_path):
    b = GraphBuilder()
    erf = b.op("Erf", [b.op("Div", ["x", f32(b, 1.5)])])          # not sqrt(2)
    b.op("Mul", [b.op("Mul", ["x", f32(b, 0.5)]), b.op("Add", [erf, f32(b, 1.0)])], name="y")
    erf = b.op("Erf", [b.op("Div", ["x", f32(b, math.sqrt(2))])])
    b.op("Mul", [b.op("Mul", ["x", f32(b, 0.6)]), b.op("Add", [erf, f32(b, 1.0)])], name="z")
    proto = model(b, {"x": (4, 16)}, {"y": (4, 16), "z": (4, 16)})
    unfused, fused, _ = pipelines(tmp_path, proto)
    assert "Gelu" not in fused.op_counts()
    assert set(refusals(fused, "fuse_gelu").values()) == {
        "the Erf argument's divisor is 1.5, not sqrt(2)", "the outer factor is 0.6, not 0.5"}
    assert_same_numbers(unfused, fused, {"x": seeded((4, 16))})


# -- fuse_layer_norm and fuse_rms_norm -----------------------------------------------------
def _layer_norm(b: GraphBuilder, x: str, axes, square="pow", inverse="div", gamma=True,
                beta=True, name=None, var_axes=None) -> str:
    mean = b.op("ReduceMean", [x, i64(b, axes)], keepdims=1)
    d = b.op("Sub", [x, mean])
    sq = b.op("Pow", [d, f32(b, 2.0)]) if square == "pow" else b.op("Mul", [d, d])
    var = b.op("ReduceMean", [sq, i64(b, var_axes or axes)], keepdims=1)
    std = b.op("Sqrt", [b.op("Add", [var, f32(b, 1e-5)])])
    y = b.op("Div", [d, std]) if inverse == "div" else \
        b.op("Mul", [b.op("Reciprocal", [std]), d])
    if gamma:
        y = b.op("Mul", [b.weight(f"g{len(b.inits)}", (16,)), y])
    if beta:
        y = b.op("Add", [y, b.weight(f"b{len(b.inits)}", (16,))])
    return b.op("Identity", [y], name=name)


def test_layer_norm_forms(tmp_path, compiled):
    b = GraphBuilder()
    _layer_norm(b, "x0", [-1], name="pow_div_affine")
    _layer_norm(b, "x1", [2], square="mul", inverse="recip", beta=False, name="mul_recip_g")
    _layer_norm(b, "x2", [-1], gamma=False, name="beta_only")
    _layer_norm(b, "x3", [-1], gamma=False, beta=False, name="bare")
    b.op("Identity", [b.op("Add", [_layer_norm(b, "x4", [1, 2], gamma=False), "x4"])],
         name="two_axes")
    names = ["pow_div_affine", "mul_recip_g", "beta_only", "bare", "two_axes"]
    proto = model(b, {f"x{i}": (2, 4, 16) for i in range(5)}, {n: (2, 4, 16) for n in names},
                  opset=18)
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    counts = fused.op_counts()
    assert counts == {"LayerNormalization": 5, "Identity": 5, "Add": 1}
    assert rewrites["fuse_layer_norm"] == 5
    axes = [n.attrs["axis"] for n in fused.nodes if n.op_type == "LayerNormalization"]
    assert sorted(axes) == [1, 2, 2, 2, 2]
    feeds = {f"x{i}": seeded((2, 4, 16), i) * 2 + 1 for i in range(5)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    assert sorted(all_mil_ops(c)) == ["add"] + ["identity"] * 5 + ["layer_norm"] * 5


def test_layer_norm_near_miss_not_last_axis(tmp_path):
    b = GraphBuilder()
    _layer_norm(b, "x", [1], name="y")                 # normalizes over axis 1 of 3
    _layer_norm(b, "w", [-1], var_axes=[1], name="z")  # mean and variance over other axes
    unfused, fused, _ = pipelines(tmp_path, model(b, {"x": (2, 4, 16), "w": (2, 4, 16)},
                                                  {"y": (2, 4, 16), "z": (2, 4, 16)}, 18))
    counts = fused.op_counts()
    assert "LayerNormalization" not in counts and counts["ReduceMean"] == 4
    assert "applec.RMSNorm" not in counts  # the tail is not an RMSNorm over the last axes
    reasons = set(refusals(fused, "fuse_layer_norm").values())
    assert any("is over axes [1], not the last axes of a rank-3 input" in r for r in reasons)
    assert_same_numbers(unfused, fused, {"x": seeded((2, 4, 16)), "w": seeded((2, 4, 16), 1)})


def _rms_norm(b: GraphBuilder, x: str, form: str, name: str, exponent=2.0) -> str:
    ms = b.op("ReduceMean", [b.op("Pow", [x, f32(b, exponent)]), i64(b, [-1])], keepdims=1)
    rms = b.op("Sqrt", [b.op("Add", [ms, f32(b, 1e-6)])])
    if form == "llama":  # x * rsqrt(mean + eps) * gamma
        y = b.op("Mul", [b.op("Mul", [x, b.op("Reciprocal", [rms])]),
                         b.weight(f"g{len(b.inits)}", (16,))])
    else:                # T5 without a scale
        y = b.op("Div", [x, rms])
    return b.op("Identity", [y], name=name)


def test_rms_norm(tmp_path, compiled):
    b = GraphBuilder()
    _rms_norm(b, "x0", "llama", "llama")
    _rms_norm(b, "x1", "t5", "t5")
    proto = model(b, {"x0": (2, 4, 16), "x1": (2, 4, 16)},
                  {"llama": (2, 4, 16), "t5": (2, 4, 16)}, opset=18)
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"applec.RMSNorm": 2, "Identity": 2}
    assert rewrites["fuse_rms_norm"] == 2
    feeds = {"x0": seeded((2, 4, 16)), "x1": seeded((2, 4, 16), 1)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    ops = [o for o in all_mil_ops(c) if o != "identity"]
    # no RMS-norm op in MIL: 5 ops (square, mean, rsqrt, scale, gamma) instead of 7
    assert sorted(ops) == sorted(["mul", "reduce_mean", "rsqrt", "mul", "mul",
                                  "mul", "reduce_mean", "rsqrt", "mul"])


def test_rms_norm_near_miss_exponent(tmp_path):
    b = GraphBuilder()
    _rms_norm(b, "x", "t5", "y", exponent=3.0)
    unfused, fused, _ = pipelines(tmp_path, model(b, {"x": (2, 16)}, {"y": (2, 16)}, 18))
    assert "applec.RMSNorm" not in fused.op_counts()
    assert list(refusals(fused, "fuse_rms_norm").values()) == ["the exponent is 3, not 2"]
    assert_same_numbers(unfused, fused, {"x": np.abs(seeded((2, 16))) + 0.1})


# -- fuse_silu and fuse_hard_swish ---------------------------------------------------------
def test_silu_and_hard_swish(tmp_path, compiled):
    b = GraphBuilder()
    b.op("Mul", ["x0", b.op("Sigmoid", ["x0"])], name="silu")
    b.op("Mul", [b.op("Sigmoid", ["x1"]), "x1"], name="silu_swapped")
    b.op("Mul", ["x2", b.op("HardSigmoid", ["x2"], alpha=1 / 6, beta=0.5)], name="hs_gate")
    relu6 = b.op("Clip", [b.op("Add", ["x3", f32(b, 3.0)]), f32(b, 0.0), f32(b, 6.0)])
    b.op("Div", [b.op("Mul", ["x3", relu6]), f32(b, 6.0)], name="hs_div")
    relu6 = b.op("Clip", [b.op("Add", [f32(b, 3.0), "x4"]), f32(b, 0.0), f32(b, 6.0)])
    b.op("Mul", [b.op("Mul", [relu6, f32(b, 1 / 6)]), "x4"], name="hs_mul")
    names = ["silu", "silu_swapped", "hs_gate", "hs_div", "hs_mul"]
    proto = model(b, {f"x{i}": (4, 16) for i in range(5)}, {n: (4, 16) for n in names})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert fused.op_counts() == {"applec.Silu": 2, "HardSwish": 3}
    assert (rewrites["fuse_silu"], rewrites["fuse_hard_swish"]) == (2, 3)
    feeds = {f"x{i}": seeded((4, 16), i) * 4 for i in range(5)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    assert sorted(all_mil_ops(c)) == sorted(["silu"] * 2 + ["sigmoid_hard", "mul"] * 3)


def test_silu_and_hard_swish_near_misses(tmp_path):
    b = GraphBuilder()
    gate = b.op("Sigmoid", ["x"])
    b.op("Mul", ["x", gate], name="y")
    b.op("Relu", [gate], name="gate")                 # the Sigmoid is needed as well
    b.op("Mul", ["x", b.op("HardSigmoid", ["x"])], name="z")  # default alpha 0.2
    b.op("Mul", ["x", b.op("Sigmoid", ["w"])], name="other")  # the gate of another tensor
    proto = model(b, {"x": (4, 16), "w": (4, 16)},
                  {n: (4, 16) for n in ("y", "gate", "z", "other")})
    unfused, fused, _ = pipelines(tmp_path, proto)
    assert not {"applec.Silu", "HardSwish"} & set(fused.op_counts())
    assert refusals(fused, "fuse_hard_swish") == {"z": "HardSigmoid alpha is 0.2, not 1/6"}
    assert list(refusals(fused, "fuse_silu")) == ["y"]
    assert_same_numbers(unfused, fused, {"x": seeded((4, 16)), "w": seeded((4, 16), 1)})


# -- fuse_attention ------------------------------------------------------------------------
def test_transformer_block_fusions(tmp_path, compiled):
    unfused, fused, rewrites = pipelines(tmp_path, testing.transformer_block(),
                                         TRANSFORMER_SHAPES)
    counts = fused.op_counts()
    assert (counts["LayerNormalization"], counts["Gelu"], counts["applec.Attention"]) == \
        (2, 1, 1)
    assert counts["applec.Linear"] == 6 and len(fused.nodes) == 25 and len(unfused.nodes) == 55
    assert not {"Softmax", "ReduceMean", "Erf", "MatMul", "Pow"} & set(counts)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    feeds = {"hidden": seeded((2, 8, 32)), "attention_mask": mask}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(testing.transformer_block(), shapes=TRANSFORMER_SHAPES, target="m4")
    c.check(feeds)
    ops = all_mil_ops(c)
    assert ops.count("scaled_dot_product_attention") == 1 and "softmax" not in ops
    assert ops.count("layer_norm") == 2 and ops.count("gelu") == 1
    assert ops.count("linear") == 6 and "matmul" not in ops
    recorded = {r["pass"]: r["rewrites"] for r in c.result.report["passes"]}
    assert recorded == {**{name: 0 for name, _ in PIPELINE}, **rewrites}
    assert {k: v for k, v in recorded.items() if k.startswith("fuse_") and v} == {
        "fuse_layer_norm": 2, "fuse_gelu": 1, "fuse_attention": 1, "fuse_matmul_add": 6}


def _attention(b: GraphBuilder, form: str) -> str:
    """Attention on q/k/v [2,4,8,8] (B,H,S,D) inputs named after the form."""
    def i(name):
        return f"{name}_{form}"
    if form == "prescaled":  # q and kT each scaled by d^-1/4; K [B,H,S,D], perm [0,1,3,2]
        q = b.op("Mul", [i("q"), f32(b, 8 ** -0.25)])
        kt = b.op("Mul", [b.op("Transpose", [i("k")], perm=[0, 1, 3, 2]), f32(b, 8 ** -0.25)])
        masked = b.op("Where", [i("keep"), b.op("MatMul", [q, kt]), f32(b, -np.inf)])
    elif form == "mul_scale":  # kT given as it is (a graph input [B,H,D,S]); float mask
        scores = b.op("Mul", [b.op("MatMul", [i("q"), i("k")]), f32(b, 1 / math.sqrt(8))])
        masked = b.op("Add", [i("bias"), scores])
    else:  # "drop_mask": Where(Not(keep), fill, scores) with a finite fill
        kt = b.op("Transpose", [i("k")], perm=[0, 1, 3, 2])
        scores = b.op("Div", [b.op("MatMul", [i("q"), kt]), f32(b, math.sqrt(8))])
        masked = b.op("Where", [b.op("Not", [i("keep")]), f32(b, -1e9), scores])
    return b.op("MatMul", [b.op("Softmax", [masked], axis=-1), i("v")], name=form)


def attention_inputs(forms) -> tuple[list, dict]:
    """Value infos and seeded feeds for the inputs of `forms`."""
    infos, feeds = [], {}
    for n, form in enumerate(forms):
        for name in ("q", "k", "v"):
            infos.append(tensor(f"{name}_{form}", F, (2, 4, 8, 8)))
            feeds[f"{name}_{form}"] = seeded((2, 4, 8, 8), 3 * n + len(feeds))
        if form == "mul_scale":
            infos.append(tensor(f"bias_{form}", F, (2, 1, 8, 8)))
            feeds[f"bias_{form}"] = seeded((2, 1, 8, 8), 99)
        else:
            keep = np.ones((2, 1, 1, 8), bool)
            keep[1, ..., 6:] = False  # padding keys; no row is fully masked
            infos.append(tensor(f"keep_{form}", TensorProto.BOOL, (2, 1, 1, 8)))
            feeds[f"keep_{form}"] = keep
    return infos, feeds


def test_attention_forms(tmp_path, compiled):
    b = GraphBuilder()
    forms = ["prescaled", "mul_scale", "drop_mask"]
    for form in forms:
        _attention(b, form)
    infos, feeds = attention_inputs(forms)
    proto = b.model(infos, [tensor(f, F, (2, 4, 8, 8)) for f in forms])
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert rewrites["fuse_attention"] == 3
    # prescaled's and drop_mask's K is the Transpose input; mul_scale's kT needs one
    assert fused.op_counts() == {"applec.Attention": 3, "Transpose": 1}
    attention = {v.name: v.producer for v in fused.outputs}
    assert [v.name for v in attention["prescaled"].inputs] == [
        "q_prescaled", "k_prescaled", "v_prescaled", "keep_prescaled"]
    assert attention["drop_mask"].inputs[3].name == "keep_drop_mask"
    assert [round(a.attrs["scale"], 6) for a in attention.values()] == [0.353553] * 3
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    assert mil_ops_of(c, "prescaled") == ["scaled_dot_product_attention"]  # SDPA's own scale
    assert mil_ops_of(c, "mul_scale") == ["transpose", "scaled_dot_product_attention"]
    # a bool mask with a finite fill is exact only as matmul/softmax
    assert mil_ops_of(c, "drop_mask") == ["matmul", "mul", "select", "softmax", "matmul"]


def test_attention_with_torch_nan_guard(tmp_path, compiled):
    """torch exports Softmax -> Where(IsNaN(p), 0, p) -> MatMul: fused, the guard moves to
    the output; a fully masked row gives zeros exactly as the guarded original does."""
    b = GraphBuilder()
    kt = b.op("Transpose", ["k"], perm=[0, 1, 3, 2])
    scores = b.op("Div", [b.op("MatMul", ["q", kt]), f32(b, math.sqrt(8))])
    probs = b.op("Softmax", [b.op("Where", ["keep", scores, f32(b, -np.inf)])], axis=-1)
    guarded = b.op("Where", [b.op("IsNaN", [probs]), f32(b, 0.0), probs])
    b.op("MatMul", [guarded, "v"], name="y")
    infos = [tensor(n, F, (2, 4, 8, 8)) for n in ("q", "k", "v")]
    infos.append(tensor("keep", TensorProto.BOOL, (2, 1, 8, 8)))
    proto = b.model(infos, [tensor("y", F, (2, 4, 8, 8))])
    keep = np.ones((2, 1, 8, 8), bool)
    keep[1, :, 3, :] = False  # query 3 of batch 1 may attend to nothing: NaN -> 0
    feeds = {n: seeded((2, 4, 8, 8), i) for i, n in enumerate(("q", "k", "v"))}
    feeds["keep"] = keep
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert rewrites["fuse_attention"] == 1
    assert fused.op_counts() == {"applec.Attention": 1}
    assert fused.outputs[0].producer.attrs["nan_to_zero"] == 1
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto)
    c.check(feeds)
    assert np.all(c.run(feeds)["y"][1, :, 3, :] == 0)
    assert mil_ops_of(c, "y") == ["scaled_dot_product_attention", "not_equal", "select"]


def test_attention_nan_guard_near_miss(tmp_path):
    """A guard that fills NaN with 1 is not torch's: no fusion, and the report says why."""
    b = GraphBuilder()
    probs = b.op("Softmax", [b.op("MatMul", ["q", "k"])], axis=-1)
    guarded = b.op("Where", [b.op("IsNaN", [probs]), f32(b, 1.0), probs])
    b.op("MatMul", [guarded, "v"], name="y")
    infos = [tensor(n, F, (2, 8, 8)) for n in ("q", "k", "v")]
    unfused, fused, rewrites = pipelines(tmp_path, b.model(infos, [tensor("y", F, (2, 8, 8))]))
    assert rewrites["fuse_attention"] == 0
    assert "applec.Attention" not in fused.op_counts()


def test_attention_lowering_without_sdpa(tmp_path):
    """Before iOS18 there is no SDPA: the same fused op lowers to matmul/softmax/matmul."""
    import coremltools as ct

    from applec.runtime.coreml_reference import ReferenceProgram
    from applec.targets.coreml import lower_to_program, write_mlpackage

    b = GraphBuilder()
    _attention(b, "mul_scale")
    infos, feeds = attention_inputs(["mul_scale"])
    unfused, fused, _ = pipelines(tmp_path, b.model(infos, [tensor("mul_scale", F,
                                                                   (2, 4, 8, 8))]))
    lowered = lower_to_program(fused, "fp32", ct.target.macOS14)
    node = next(n for n in fused.nodes if n.op_type == "applec.Attention")
    assert lowered.mil_ops[node.name] == ["matmul", "mul", "add", "softmax", "matmul"]
    write_mlpackage(lowered, ct.target.macOS14, tmp_path / "m.mlpackage", description="t")
    got = ReferenceProgram(str(tmp_path / "m.mlpackage")).run(
        {p.feature: feeds[p.tensor] for p in lowered.inputs})
    want = interpreter.run(unfused, feeds)["mul_scale"]
    np.testing.assert_allclose(got[lowered.outputs[0].feature], want, rtol=1e-5, atol=1e-6)


def test_attention_near_misses(tmp_path):
    b = GraphBuilder()
    scores = b.op("Div", [b.op("MatMul", ["q", "kt"]), f32(b, math.sqrt(8))])
    b.op("MatMul", [b.op("Softmax", [scores], axis=2), "v"], name="y")   # not the last axis
    scores = b.op("Div", [b.op("MatMul", ["q", "k1"]), f32(b, math.sqrt(8))])
    b.op("MatMul", [b.op("Softmax", [scores], axis=-1), "v"], name="z")  # K broadcast
    proto = b.model([tensor("q", F, (2, 4, 8, 8)), tensor("kt", F, (2, 4, 8, 8)),
                     tensor("k1", F, (1, 4, 8, 8)), tensor("v", F, (2, 4, 8, 8))],
                    [tensor("y", F, (2, 4, 8, 8)), tensor("z", F, (2, 4, 8, 8))])
    unfused, fused, _ = pipelines(tmp_path, proto)
    assert "applec.Attention" not in fused.op_counts()
    assert refusals(fused, "fuse_attention") == {
        "y": "the Softmax is over axis 2, not the last axis",
        "z": "q [2, 4, 8, 8], k [1, 4, 8, 8] and v [2, 4, 8, 8] do not share their batch dims"}
    feeds = {"q": seeded((2, 4, 8, 8)), "kt": seeded((2, 4, 8, 8), 1),
             "k1": seeded((1, 4, 8, 8), 2), "v": seeded((2, 4, 8, 8), 3)}
    assert_same_numbers(unfused, fused, feeds)


# -- report and op table ---------------------------------------------------------------------
def test_refusal_reason_reaches_the_report(compiled):
    b = GraphBuilder()
    b.op("Mul", [b.op("Mul", ["x", f32(b, 0.5)]), b.op("Add", [
        b.op("Erf", [b.op("Div", ["x", f32(b, 1.5)])]), f32(b, 1.0)])], name="y")
    c = compiled(model(b, {"x": (4, 16)}, {"y": (4, 16)}))
    c.check({"x": seeded((4, 16))})
    assert c.result.report["nodes"]["y"]["not_fused"] == {
        "fuse_gelu": "the Erf argument's divisor is 1.5, not sqrt(2)"}


def test_fused_op_shape_errors_name_op_and_node():
    graph = Graph()
    q = graph.add_input("q", np.float32, (2, 8, 4))
    v = graph.add_input("v", np.float32, (2, 6, 4))
    node = graph.add_node("applec.Attention", [q, q, v], {"scale": 0.5}, name="attn")
    with pytest.raises(ShapeError, match="applec.Attention node 'attn'.*k \\[.., S, D\\]"):
        infer_node(node)
    w = graph.const(np.zeros((3, 5), np.float32))
    node = graph.add_node("applec.Linear", [q, w], name="lin")
    with pytest.raises(ShapeError, match="applec.Linear node 'lin'"):
        infer_node(node)


# -- sum_to_mean -----------------------------------------------------------------------------
def _sum_scaled(b: GraphBuilder, x: str, factor: float, op: str = "Mul") -> str:
    total = b.op("ReduceSum", [x, i64(b, [-1])], keepdims=1)
    return b.op(op, [total, f32(b, factor)])


def test_sum_to_mean_and_fp16_overflow(tmp_path, compiled):
    """Sum of squares / N: 64 squares of ~100 sum to 6.4e5 (inf in fp16); their mean does
    not overflow, so only the rewritten graph survives fp16."""
    b = GraphBuilder()
    squares = b.op("Mul", ["x", "x"])
    b.op("Sqrt", [_sum_scaled(b, squares, 1 / 64)], name="rms")
    b.op("Identity", [_sum_scaled(b, "x", 64.0, op="Div")], name="mean")
    proto = model(b, {"x": (2, 64)}, {"rms": (2, 1), "mean": (2, 1)})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert rewrites["sum_to_mean"] == 2
    assert fused.op_counts().get("ReduceSum", 0) == 0
    assert fused.op_counts()["ReduceMean"] == 2
    feeds = {"x": (100 + seeded((2, 64))).astype(np.float32)}
    assert_same_numbers(unfused, fused, feeds)
    c = compiled(proto, "fp16")
    got = c.run(feeds)["rms"]
    assert np.all(np.isfinite(got))
    c.check(feeds)


def test_sum_to_mean_near_misses(tmp_path):
    b = GraphBuilder()
    b.op("Identity", [_sum_scaled(b, "x", 1 / 65)], name="wrong_n")  # 65 is not the count
    total = b.op("ReduceSum", ["x2", i64(b, [-1])], keepdims=1)
    b.op("Mul", [total, "w"], name="runtime_scale")  # the scale is not a constant
    proto = model(b, {"x": (2, 64), "x2": (2, 64), "w": (2, 1)},
                  {"wrong_n": (2, 1), "runtime_scale": (2, 1)})
    unfused, fused, rewrites = pipelines(tmp_path, proto)
    assert rewrites["sum_to_mean"] == 0
    assert fused.op_counts()["ReduceSum"] == 2


# -- --disable-pass: the fused bundle against the unfused one -------------------------------
def test_fused_bundle_matches_unfused_bundle(tmp_path):
    """Both fp32 bundles through the reference executor: same numbers (<= 1e-4), and only
    the fused one holds layer_norm's decomposition as one op, gelu and sdpa."""
    path = tmp_path / "block.onnx"
    onnx.save(testing.transformer_block(), path)
    mask = np.ones((2, 8), np.int64)
    mask[1, 5:] = 0
    feeds = {"hidden": seeded((2, 8, 32)), "attention_mask": mask}
    outputs, ops = {}, {}
    for variant, disabled in (("fused", None), ("unfused", ["fusions"])):
        result = applec.compile(path, output=tmp_path / variant, target="m4", precision="fp32",
                                shapes=TRANSFORMER_SHAPES, disable_passes=disabled)
        outputs[variant] = applec.load(tmp_path / variant, backend="reference").run(feeds)
        ops[variant] = [op for e in result.report["nodes"].values() for op in e.get("mil_ops", [])]
        ran = {r["pass"] for r in result.report["passes"]}
        assert ("fuse_gelu" in ran) == (disabled is None)
    for name, want in outputs["unfused"].items():
        got = outputs["fused"][name]
        assert np.max(np.abs(got - want)) / np.max(np.abs(want)) <= 1e-4, name
    for op in ("gelu", "scaled_dot_product_attention", "layer_norm"):
        assert ops["fused"].count(op) >= 1 and ops["unfused"].count(op) == 0, op
    assert "softmax" in ops["unfused"] and "softmax" not in ops["fused"]


def test_disable_pass_names_the_choices(tmp_path, capsys):
    from applec.cli import main

    path = tmp_path / "block.onnx"
    onnx.save(testing.transformer_block(), path)
    assert main(["compile", str(path), "-o", str(tmp_path / "b"),
                 "--disable-pass", "fold_constants"]) == 2
    err = capsys.readouterr().err
    assert "--disable-pass fold_constants: not a pass that can be disabled; choose from " \
           "fusions, eliminate_common_subexpressions" in err
    assert not (tmp_path / "b").exists()
