"""If: constant conditions inlined at import, run-time ones lowered to a MIL cond.

Each model is compiled, run by the reference executor and compared with onnxruntime
(fp32: max relative error <= 1e-5; fp16: cosine >= 0.999), and its structure is checked:
no If left after inlining, a `cond` in the program otherwise, report entries that say what
happened, output names kept.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import applec
from applec.errors import UnsupportedOpError
from applec.interpreter import run
from applec.onnx_import import import_model
from applec.validate import compare, onnxruntime_outputs

F32 = TensorProto.FLOAT


def value(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(array), name))


def branch(name, nodes, outputs):
    return helper.make_graph(nodes, name, [], outputs)


def save(tmp_path, nodes, inputs, outputs, inits=(), opset=16, full_check=True):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8)
    onnx.checker.check_model(model, full_check=full_check)
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return path


def check_against_onnxruntime(path, out_dir, feeds_list, precisions=("fp32", "fp16")):
    results = {}
    for precision in precisions:
        result = applec.compile(path, output=out_dir / precision, precision=precision)
        bundle = applec.load(out_dir / precision, backend="reference")
        for feeds in feeds_list:
            got, want = bundle.run(feeds), onnxruntime_outputs(path, feeds)
            for name, expected in want.items():
                assert got[name].shape == expected.shape, name
                check = compare(name, got[name], expected, precision)
                if precision == "fp32":
                    assert check.max_rel <= 1e-5, check
                else:
                    assert check.cosine >= 0.999, check
        results[precision] = result
    return results


def shape_condition_model(tmp_path, dim: int):
    """y = If(x.shape[0] == 2) then Relu(x) * 2 else Identity(x)."""
    then_g = branch("then", [helper.make_node("Relu", ["x"], ["t"], name="relu"),
                             helper.make_node("Mul", ["t", "two"], ["t2"], name="mul")],
                    [value("t2", [dim, 3])])
    else_g = branch("else", [helper.make_node("Identity", ["x"], ["e"], name="pass")],
                    [value("e", [dim, 3])])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("zero", np.int64(0)),
             helper.make_node("Gather", ["shape", "zero"], ["rows"]),
             const("two_rows", np.int64(2)),
             helper.make_node("Equal", ["rows", "two_rows"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="shape_if", then_branch=then_g,
                              else_branch=else_g)]
    return save(tmp_path, nodes, [value("x", [dim, 3])], [value("y", [dim, 3])],
                [("two", np.float32(2))])


@pytest.mark.parametrize("dim, taken", [(2, "then_branch"), (4, "else_branch")])
def test_constant_condition_inlines_the_taken_branch(tmp_path, dim, taken):
    path = shape_condition_model(tmp_path, dim)
    graph = import_model(path)
    assert "If" not in graph.op_counts()
    assert [v.name for v in graph.outputs] == ["y"]
    entry = graph.meta["report"]["shape_if"]
    assert entry["status"] == "folded" and f"{taken} inlined" in entry["reason"]
    if taken == "then_branch":
        assert graph.op_counts() == {"Relu": 1, "Mul": 1}
    else:
        assert graph.op_counts() == {"Identity": 1}
    feeds = {"x": np.random.default_rng(0).standard_normal((dim, 3)).astype(np.float32)}
    results = check_against_onnxruntime(path, tmp_path, [feeds])
    assert all("cond" not in entry.get("mil_ops", [])
               for entry in results["fp32"].report["nodes"].values())


def runtime_condition_model(tmp_path):
    """y, n = If(s > 0) then (Relu(x) * 2, x + 1) else (x - 1, Abs(x)): both branches read
    x from the outer graph, and `two` is an outer constant."""
    then_g = branch("then", [helper.make_node("Relu", ["x"], ["t1"]),
                             helper.make_node("Mul", ["t1", "two"], ["t2"]),
                             helper.make_node("Add", ["x", "one"], ["t3"])],
                    [value("t2", [2, 3]), value("t3", [2, 3])])
    else_g = branch("else", [helper.make_node("Sub", ["x", "one"], ["e1"]),
                             helper.make_node("Abs", ["x"], ["e2"])],
                    [value("e1", [2, 3]), value("e2", [2, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y", "n"], name="data_if", then_branch=then_g,
                              else_branch=else_g)]
    return save(tmp_path, nodes, [value("x", [2, 3]), value("s", [])],
                [value("y", [2, 3]), value("n", [2, 3])],
                [("two", np.float32(2)), ("one", np.float32(1)), ("zero", np.float32(0))])


def feeds_for(s: float, seed: int = 0):
    return {"x": np.random.default_rng(seed).standard_normal((2, 3)).astype(np.float32),
            "s": np.asarray(s, np.float32)}


def test_runtime_condition_lowers_to_cond(tmp_path):
    path = runtime_condition_model(tmp_path)
    results = check_against_onnxruntime(path, tmp_path, [feeds_for(1.0), feeds_for(-1.0)])
    nodes = results["fp32"].report["nodes"]
    assert nodes["data_if"]["status"] == "lowered"
    assert "cond" in nodes["data_if"]["mil_ops"]
    inner = [e for name, e in nodes.items() if name.startswith("data_if/")]
    assert len(inner) == 5 and all(e["status"] == "in_branch" for e in inner)


def test_interpreter_runs_if(tmp_path):
    """The op table's reference (the pass oracle) runs the branch the condition picks."""
    path = runtime_condition_model(tmp_path)
    graph = import_model(path)
    for s in (1.0, -1.0):
        feeds = feeds_for(s)
        got, want = run(graph, feeds), onnxruntime_outputs(path, feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_nested_ifs_read_outer_scopes(tmp_path):
    """A run-time If inside a run-time branch reads x from two scopes up and `mid` from its
    parent branch; a shape-only If in the same branch folds away."""
    inner_then = branch("inner_then", [helper.make_node("Mul", ["x", "mid"], ["it"])],
                        [value("it", [2, 3])])
    inner_else = branch("inner_else", [helper.make_node("Sub", ["mid", "x"], ["ie"])],
                        [value("ie", [2, 3])])
    fold_then = branch("fold_then", [helper.make_node("Neg", ["mid"], ["ft"])],
                       [value("ft", [2, 3])])
    fold_else = branch("fold_else", [helper.make_node("Identity", ["mid"], ["fe"])],
                       [value("fe", [2, 3])])
    outer_then = branch("outer_then", [
        helper.make_node("Add", ["x", "one"], ["mid"]),
        helper.make_node("Greater", ["t", "zero"], ["inner_cond"]),
        helper.make_node("If", ["inner_cond"], ["inner_out"], name="inner_if",
                         then_branch=inner_then, else_branch=inner_else),
        helper.make_node("Size", ["mid"], ["size"]), const("six", np.int64(6)),
        helper.make_node("Equal", ["size", "six"], ["fold_cond"]),
        helper.make_node("If", ["fold_cond"], ["folded"], name="fold_if",
                         then_branch=fold_then, else_branch=fold_else),
        helper.make_node("Add", ["inner_out", "folded"], ["ot"])], [value("ot", [2, 3])])
    outer_else = branch("outer_else", [helper.make_node("Tanh", ["x"], ["oe"])],
                        [value("oe", [2, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="outer_if", then_branch=outer_then,
                              else_branch=outer_else)]
    path = save(tmp_path, nodes, [value("x", [2, 3]), value("s", []), value("t", [])],
                [value("y", [2, 3])], [("one", np.float32(1)), ("zero", np.float32(0))])
    graph = import_model(path)
    outer = next(n for n in graph.nodes if n.op_type == "If")
    then = outer.attrs["then_branch"]
    assert then.op_counts() == {"Add": 2, "Greater": 1, "If": 1, "Neg": 1}
    feeds = [dict(feeds_for(s), t=np.asarray(t, np.float32)) for s in (1, -1) for t in (1, -1)]
    results = check_against_onnxruntime(path, tmp_path, feeds)
    report = results["fp32"].report["nodes"]
    assert report["fold_if"]["status"] == "folded"
    assert report["inner_if"]["status"] == "in_branch"


def test_branches_with_different_shapes_fail_clearly(tmp_path):
    then_g = branch("then", [helper.make_node("Relu", ["x"], ["t"])], [value("t", [2, 3])])
    else_g = branch("else", [const("row", np.zeros((1, 3), np.float32))],
                    [value("row", [1, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="ragged_if", then_branch=then_g,
                              else_branch=else_g)]
    path = save(tmp_path, nodes, [value("x", [2, 3]), value("s", [])], [value("y", ["r", 3])],
                [("zero", np.float32(0))])
    with pytest.raises(UnsupportedOpError, match=r"If node 'ragged_if': output 0 is "
                                                 r"float32\[2, 3\] in then_branch but "
                                                 r"float32\[1, 3\] in else_branch"):
        applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert not (tmp_path / "b").exists()


def test_branch_that_cannot_run_returns_nan(tmp_path):
    """The else branch reshapes 6 elements to 4 (onnxruntime fails there too): it compiles
    to NaN, the report says so, and the then branch still matches."""
    then_g = branch("then", [helper.make_node("Relu", ["x"], ["t"])], [value("t", [2, 3])])
    else_g = branch("else", [const("bad_shape", np.array([2, 2], np.int64)),
                             helper.make_node("Reshape", ["x", "bad_shape"], ["r"])],
                    [value("r", [2, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["cond"]),
             helper.make_node("If", ["cond"], ["y"], name="half_if", then_branch=then_g,
                              else_branch=else_g)]
    path = save(tmp_path, nodes, [value("x", [2, 3]), value("s", [])], [value("y", [2, 3])],
                [("zero", np.float32(0))], full_check=False)  # its shape check sees it
    results = check_against_onnxruntime(path, tmp_path, [feeds_for(1.0)], ("fp32",))
    assert any("half_if" in note and "else_branch cannot run" in note
               for note in results["fp32"].report["notes"])
    bundle = applec.load(tmp_path / "fp32", backend="reference")
    assert np.isnan(bundle.run(feeds_for(-1.0))["y"]).all()


def test_branch_node_names_that_clash_are_qualified(tmp_path):
    """Both branches and the main graph name a node 'act': report keys stay distinct."""
    then_g = branch("then", [helper.make_node("Relu", ["x"], ["t"], name="act")],
                    [value("t", [2, 3])])
    else_g = branch("else", [helper.make_node("Sigmoid", ["x"], ["e"], name="act")],
                    [value("e", [2, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["c"], name="act"),
             helper.make_node("If", ["c"], ["y"], name="if", then_branch=then_g,
                              else_branch=else_g)]
    path = save(tmp_path, nodes, [value("x", [2, 3]), value("s", [])], [value("y", [2, 3])],
                [("zero", np.float32(0))], full_check=False)  # its shape check sees it
    results = check_against_onnxruntime(path, tmp_path, [feeds_for(1.0), feeds_for(-1.0)],
                                        ("fp32",))
    report = results["fp32"].report["nodes"]
    assert {"act", "if/then_branch/act", "if/else_branch/act"} <= set(report)
