"""Loop and Scan: unrolled at import, one propagated copy of the body per iteration.

Each model is compiled at fp32 and fp16, run by the reference executor and compared with
onnxruntime (fp32: max relative error <= 1e-5; fp16: cosine >= 0.999); the structure is
checked (no Loop or Scan left, the report says how it was unrolled). Loops that cannot be
unrolled (a trip count or condition known only at run time, past the budgets) fail at
compile time with the exact message, and leave no bundle behind.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import applec
from applec import control_flow
from applec.errors import UnsupportedOpError
from applec.interpreter import run
from applec.onnx_import import _Builder, check_and_infer, import_model, opset_of
from applec.validate import compare, onnxruntime_outputs

F32, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
RNG = np.random.default_rng(0)


def value(name, shape, elem=F32):
    return helper.make_tensor_value_info(name, elem, shape)


def const(name, array):
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(
        np.asarray(array), name))


def body(nodes, inputs, outputs, name="body"):
    return helper.make_graph(nodes, name, inputs, outputs)


def loop_io(carried=(("acc", [2, 3]),)):
    """The Loop body's declared inputs: iteration number, condition, carried values."""
    return [value("i", [], I64), value("c", [], BOOL)] + [value(f"{n}_in", s)
                                                          for n, s in carried]


def save(tmp_path, nodes, inputs, outputs, inits=(), opset=16):
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(a), n) for n, a in inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              ir_version=8)
    onnx.checker.check_model(model, full_check=True)
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
            assert set(got) == set(want)
            for name, expected in want.items():
                assert got[name].shape == expected.shape, name
                check = compare(name, got[name], expected, precision)
                if precision == "fp32":
                    assert check.max_rel <= 1e-5, check
                else:
                    assert check.cosine >= 0.999, check
        results[precision] = result
    return results


def assert_refused(path, tmp_path, message):
    with pytest.raises(UnsupportedOpError) as caught:
        applec.compile(path, output=tmp_path / "b", precision="fp32")
    assert str(caught.value) == message
    assert not (tmp_path / "b").exists()


def x_feed(shape=(2, 3), seed=0):
    return {"x": np.random.default_rng(seed).standard_normal(shape).astype(np.float32)}


# -- Loop ---------------------------------------------------------------------------------
def accumulate_model(tmp_path, trip=4):
    """acc, s = Loop(M=trip, cond=true, x): acc += x * i; s[i] = tanh(acc); x is read from
    the outer graph, i is the iteration number."""
    loop_body = body([helper.make_node("Identity", ["c"], ["c_out"]),
                      helper.make_node("Cast", ["i"], ["fi"], to=F32),
                      helper.make_node("Mul", ["x", "fi"], ["t"]),
                      helper.make_node("Add", ["acc_in", "t"], ["acc_out"]),
                      helper.make_node("Tanh", ["acc_out"], ["s"])],
                     loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3]),
                                 value("s", [2, 3])])
    nodes = [helper.make_node("Loop", ["M", "cond", "x"], ["acc", "scan"], name="loop",
                              body=loop_body)]
    return save(tmp_path, nodes, [value("x", [2, 3])],
                [value("acc", [2, 3]), value("scan", [trip, 2, 3])],
                [("M", np.int64(trip)), ("cond", np.bool_(True))])


def test_constant_trip_count_unrolls(tmp_path):
    path = accumulate_model(tmp_path)
    graph = import_model(path)
    assert "Loop" not in graph.op_counts()
    assert graph.op_counts()["Tanh"] == 4 and graph.op_counts()["Concat"] == 1
    assert [v.name for v in graph.outputs] == ["acc", "scan"]
    assert graph.outputs[1].shape == (4, 2, 3)
    entry = graph.meta["report"]["loop"]
    assert entry["status"] == "folded"
    assert entry["reason"] == "unrolled at compile time: 4 iterations of a 5-node body"
    results = check_against_onnxruntime(path, tmp_path, [x_feed(), x_feed(seed=1)])
    report = results["fp32"].report["nodes"]
    assert report["loop"]["notes"] == [
        "unrolled at compile time: 4 iterations of a 5-node body"]
    assert "concat" in report["loop"]["mil_ops"]


def counted_condition_model(tmp_path, trip):
    """acc, s = Loop(M=trip or none, cond=true, x): acc = acc * 0.5 + x while i < 2; the
    condition is computed in the body from the iteration number, so it folds."""
    loop_body = body([const("two", np.int64(2)), const("half", np.float32(0.5)),
                      helper.make_node("Less", ["i", "two"], ["c_out"]),
                      helper.make_node("Mul", ["acc_in", "half"], ["h"]),
                      helper.make_node("Add", ["h", "x"], ["acc_out"]),
                      helper.make_node("Identity", ["acc_out"], ["s"])],
                     loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3]),
                                 value("s", [2, 3])])
    inits = [("cond", np.bool_(True))] + ([("M", np.int64(trip))] if trip else [])
    nodes = [helper.make_node("Loop", ["M" if trip else "", "cond", "x"], ["acc", "scan"],
                              name="loop", body=loop_body)]
    return save(tmp_path, nodes, [value("x", [2, 3])],
                [value("acc", [2, 3]), value("scan", ["n", 2, 3])], inits)


@pytest.mark.parametrize("trip, iterations", [(None, 3), (100, 3), (2, 2)])
def test_condition_computed_in_the_body_folds(tmp_path, trip, iterations):
    """No trip count or a large one: the condition stops it after i = 2; a trip count of
    2 stops it first."""
    path = counted_condition_model(tmp_path, trip)
    graph = import_model(path)
    assert graph.outputs[1].shape == (iterations, 2, 3)
    assert "Loop" not in graph.op_counts()
    check_against_onnxruntime(path, tmp_path, [x_feed()])


def test_trip_count_from_a_shape(tmp_path):
    """As torch exports a loop over rows: M = Shape(x)[0], row = Gather(x, i); no cond."""
    loop_body = body([helper.make_node("Identity", ["c"], ["c_out"]),
                      helper.make_node("Gather", ["x", "i"], ["row"], axis=0),
                      helper.make_node("Mul", ["row", "row"], ["sq"]),
                      helper.make_node("Add", ["acc_in", "sq"], ["acc_out"]),
                      helper.make_node("Sub", ["row", "acc_out"], ["d"]),
                      helper.make_node("Relu", ["d"], ["s"])],
                     loop_io((("acc", [4]),)),
                     [value("c_out", [], BOOL), value("acc_out", [4]), value("s", [4])])
    nodes = [helper.make_node("Shape", ["x"], ["shape"]), const("zero", np.int64(0)),
             helper.make_node("Gather", ["shape", "zero"], ["rows"]),
             helper.make_node("Loop", ["rows", "", "acc0"], ["acc", "scan"], name="loop",
                              body=loop_body)]
    path = save(tmp_path, nodes, [value("x", [3, 4])], [value("acc", [4]),
                                                          value("scan", [3, 4])],
                [("acc0", np.zeros(4, np.float32))])
    check_against_onnxruntime(path, tmp_path, [x_feed((3, 4)), x_feed((3, 4), seed=2)])


def test_zero_iterations_pass_the_initial_values_through(tmp_path):
    loop_body = body([helper.make_node("Identity", ["c"], ["c_out"]),
                      helper.make_node("Neg", ["acc_in"], ["acc_out"])],
                     loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3])])
    nodes = [helper.make_node("Loop", ["M", "", "x"], ["acc"], name="loop", body=loop_body),
             helper.make_node("Relu", ["acc"], ["y"])]
    path = save(tmp_path, nodes, [value("x", [2, 3])], [value("y", [2, 3])],
                [("M", np.int64(0))])
    graph = import_model(path)
    assert graph.op_counts() == {"Identity": 1, "Relu": 1}  # the passes drop Identity
    assert graph.meta["report"]["loop/body/Neg_1"]["status"] == "eliminated"
    check_against_onnxruntime(path, tmp_path, [x_feed()])


def test_ifs_and_loops_inside_a_body(tmp_path):
    """Each iteration copies a run-time If (a MIL cond per copy), an If on the iteration
    number (inlined per copy) and an inner Loop whose trip count is i + 1."""
    inner_loop = body([helper.make_node("Identity", ["c2"], ["c2_out"]),
                       const("k", np.float32(1.5)),
                       helper.make_node("Mul", ["v_in", "k"], ["v_out"])],
                      [value("j", [], I64), value("c2", [], BOOL), value("v_in", [2, 3])],
                      [value("c2_out", [], BOOL), value("v_out", [2, 3])], "inner")
    then_g = body([helper.make_node("Mul", ["acc_in", "x"], ["t"])], [], [value("t", [2, 3])],
                  "then")
    else_g = body([helper.make_node("Sub", ["acc_in", "x"], ["e"])], [], [value("e", [2, 3])],
                  "else")
    first_g = body([helper.make_node("Neg", ["picked"], ["f"])], [], [value("f", [2, 3])],
                   "first")
    other_g = body([helper.make_node("Identity", ["picked"], ["o"])], [],
                   [value("o", [2, 3])], "other")
    loop_body = body([
        helper.make_node("Identity", ["c"], ["c_out"]),
        helper.make_node("If", ["positive"], ["picked"], name="data_if", then_branch=then_g,
                         else_branch=else_g),
        const("one", np.int64(1)), helper.make_node("Equal", ["i", "one"], ["is_one"]),
        helper.make_node("If", ["is_one"], ["signed"], name="index_if", then_branch=first_g,
                         else_branch=other_g),
        helper.make_node("Add", ["i", "one"], ["inner_trip"]),
        helper.make_node("Loop", ["inner_trip", "", "signed"], ["acc_out"], name="inner_loop",
                         body=inner_loop)],
        loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3])])
    nodes = [helper.make_node("Greater", ["s", "zero"], ["positive"]),
             helper.make_node("Loop", ["M", "", "x"], ["acc"], name="loop", body=loop_body)]
    path = save(tmp_path, nodes, [value("x", [2, 3]), value("s", [])], [value("acc", [2, 3])],
                [("M", np.int64(3)), ("zero", np.float32(0))])
    graph = import_model(path)
    counts = graph.op_counts()
    assert counts["If"] == 3 and counts["Mul"] == 1 + 2 + 3 and counts["Neg"] == 1
    assert "Loop" not in counts
    feeds = [dict(x_feed(seed=3), s=np.asarray(s, np.float32)) for s in (1, -1)]
    results = check_against_onnxruntime(path, tmp_path, feeds)
    report = results["fp32"].report["nodes"]
    assert report["data_if"]["mil_ops"].count("cond") == 3
    assert report["index_if"]["status"] == "folded"


def test_interpreter_runs_loop_and_scan_bodies(tmp_path):
    """The op table's references (the IR interpreter, before any unrolling) agree with
    onnxruntime."""
    (tmp_path / "loop").mkdir(), (tmp_path / "scan").mkdir()
    for path, feeds in [(accumulate_model(tmp_path / "loop"), x_feed()),
                        (scan_model(tmp_path / "scan"), scan_feeds())]:
        model = onnx.load(path)
        graph = _Builder(model, check_and_infer(model, path), opset_of(model)).build()
        assert {"Loop", "Scan"} & set(graph.op_counts())
        got, want = run(graph, feeds), onnxruntime_outputs(path, feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6)


# -- Loop: what is refused ----------------------------------------------------------------
def refusal_model(tmp_path, trip=("M", 3), cond=("cond", True), body_cond="Identity",
                  body_nodes=1):
    """acc = Loop(trip, cond, x) with acc = Neg(...Neg(acc)) (`body_nodes` of them); a name
    with None value is a graph input (data at run time), else an initializer."""
    inputs, inits = [value("x", [2, 3])], []
    for (name, data), elem in ((trip, I64), (cond, BOOL)):
        if name and data is None:
            inputs.append(value(name, [], elem))
        elif name:
            inits.append((name, np.asarray(data, helper.tensor_dtype_to_np_dtype(elem))))
    chain = [helper.make_node("Neg", ["acc_in" if k == 0 else f"n{k - 1}"],
                              ["acc_out" if k == body_nodes - 1 else f"n{k}"])
             for k in range(body_nodes)]
    if body_cond == "Identity":
        decide = [helper.make_node("Identity", ["c"], ["c_out"])]
    else:  # from the data: sum(acc) > 0
        decide = [helper.make_node("ReduceSum", ["acc_out"], ["total"], keepdims=0),
                  const("zero", np.float32(0)),
                  helper.make_node("Greater", ["total", "zero"], ["c_out"])]
    loop_body = body(chain + decide, loop_io(),
                     [value("c_out", [], BOOL), value("acc_out", [2, 3])])
    nodes = [helper.make_node("Loop", [trip[0], cond[0], "x"], ["acc"], name="loop",
                              body=loop_body)]
    return save(tmp_path, nodes, inputs, [value("acc", [2, 3])], inits)


REFUSED = [  # (case, refusal_model arguments, message)
    ("runtime_trip_count", {"trip": ("M", None)},
     ("Loop node 'loop': the trip count depends on run-time data; applec unrolls loops at "
      "compile time")),
    ("runtime_condition", {"cond": ("cond", None)},
     ("Loop node 'loop': the loop condition depends on run-time data; applec unrolls loops at "
      "compile time")),
    ("condition_from_data", {"body_cond": "data"},
     ("Loop node 'loop': the loop condition depends on run-time data (computed in the body, "
      "iteration 0); applec unrolls loops at compile time")),
    ("too_many_iterations", {"trip": ("M", 5000)},
     ("Loop node 'loop': a trip count of 5000 asks for more than 1024 iterations; applec "
      "unrolls loops at compile time")),
    ("too_many_nodes", {"trip": ("M", 1000), "body_nodes": 20},
     ("Loop node 'loop': a trip count of 1000 asks for 1000 copies of a 21-node body, beyond "
      "the budget of 16384 unrolled nodes per graph; applec unrolls loops at compile time")),
    ("never_ends", {"trip": ("", None)},
     ("Loop node 'loop': no trip count and a condition that stays true: it never ends; "
      "applec unrolls loops at compile time")),
]


@pytest.mark.parametrize("kwargs, message", [pytest.param(k, m, id=c) for c, k, m in REFUSED])
def test_loops_that_cannot_unroll_are_refused(tmp_path, kwargs, message):
    assert_refused(refusal_model(tmp_path, **kwargs), tmp_path, message)


def test_condition_that_stays_true_is_refused_past_the_iteration_limit(tmp_path,
                                                                       monkeypatch):
    """A condition the importer cannot see through (a computed true) is checked as it
    unrolls."""
    monkeypatch.setattr(control_flow, "MAX_ITERATIONS", 8)
    loop_body = body([const("big", np.int64(1 << 40)),
                      helper.make_node("Less", ["i", "big"], ["c_out"]),
                      helper.make_node("Neg", ["acc_in"], ["acc_out"])],
                     loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3])])
    nodes = [helper.make_node("Loop", ["", "cond", "x"], ["acc"], name="loop",
                              body=loop_body)]
    path = save(tmp_path, nodes, [value("x", [2, 3])], [value("acc", [2, 3])],
                [("cond", np.bool_(True))])
    assert_refused(path, tmp_path, "Loop node 'loop': its condition, still true, asks for "
                                   "more than 8 iterations; applec unrolls loops at compile "
                                   "time")


def test_zero_iterations_with_scan_outputs_are_refused(tmp_path):
    loop_body = body([helper.make_node("Identity", ["c"], ["c_out"]),
                      helper.make_node("Neg", ["acc_in"], ["acc_out"])],
                     loop_io(), [value("c_out", [], BOOL), value("acc_out", [2, 3]),
                                 value("acc_out", [2, 3])])
    nodes = [helper.make_node("Loop", ["M", "", "x"], ["acc", "scan"], name="loop",
                              body=loop_body)]
    path = save(tmp_path, nodes, [value("x", [2, 3])],
                [value("acc", [2, 3]), value("scan", [0, 2, 3])], [("M", np.int64(0))])
    assert_refused(path, tmp_path, "Loop node 'loop': zero iterations leave its scan outputs "
                                   "with no elements, which CoreML cannot hold; applec "
                                   "unrolls loops at compile time")


def test_sequences_in_a_body_are_refused(tmp_path):
    """SequenceEmpty/SequenceInsert/ConcatFromSequence (lists built by a loop) are not in
    the op table: the import names them."""
    loop_body = body([helper.make_node("Identity", ["c"], ["c_out"]),
                      helper.make_node("SequenceInsert", ["seq_in", "x"], ["seq_out"],
                                       name="insert")],
                     [value("i", [], I64), value("c", [], BOOL),
                      helper.make_tensor_sequence_value_info("seq_in", F32, [2, 3])],
                     [value("c_out", [], BOOL),
                      helper.make_tensor_sequence_value_info("seq_out", F32, [2, 3])])
    nodes = [helper.make_node("SequenceEmpty", [], ["empty"], name="empty", dtype=F32),
             helper.make_node("Loop", ["M", "", "empty"], ["seq"], name="loop",
                              body=loop_body),
             helper.make_node("ConcatFromSequence", ["seq"], ["y"], name="concat", axis=0)]
    path = save(tmp_path, nodes, [value("x", [2, 3])], [value("y", [6, 3])],
                [("M", np.int64(2))])
    assert_refused(path, tmp_path, "unsupported ops at opset 16: SequenceEmpty (node "
                                   "'empty'), SequenceInsert (node 'insert'), "
                                   "ConcatFromSequence (node 'concat')")


# -- Scan ---------------------------------------------------------------------------------
def scan_model(tmp_path):
    """Two states, two scan inputs (a along axis 1, reversed; b along axis 0), two scan
    outputs (y1 reversed on axis 0, y2 on the last axis), and a capture w."""
    scan_body = body([
        const("axis0", np.asarray([0], np.int64)),
        helper.make_node("ReduceSum", ["a_t", "axis0"], ["a_sum"], keepdims=0),
        helper.make_node("Mul", ["a_sum", "w"], ["a_w"]),
        helper.make_node("Add", ["h_in", "a_w"], ["h1"]),
        helper.make_node("Add", ["h1", "b_t"], ["h2"]),
        helper.make_node("Tanh", ["h2"], ["h_out"]),
        helper.make_node("Add", ["n_in", "b_t"], ["n_out"]),
        helper.make_node("Mul", ["h_out", "w"], ["y1"]),
        helper.make_node("Mul", ["a_t", "h_out"], ["y2"])],
        [value("h_in", [4]), value("n_in", [4]), value("a_t", [3, 4]), value("b_t", [4])],
        [value("h_out", [4]), value("n_out", [4]), value("y1", [4]), value("y2", [3, 4])])
    nodes = [helper.make_node("Scan", ["h0", "n0", "a", "b"], ["h", "n", "y1s", "y2s"],
                              name="scan", body=scan_body, num_scan_inputs=2,
                              scan_input_axes=[1, 0], scan_input_directions=[1, 0],
                              scan_output_axes=[0, -1], scan_output_directions=[1, 0])]
    return save(tmp_path, nodes, [value("h0", [4]), value("n0", [4]), value("a", [3, 5, 4]),
                                  value("b", [5, 4])],
                [value("h", [4]), value("n", [4]), value("y1s", [5, 4]),
                 value("y2s", [3, 4, 5])], [("w", np.float32(0.3))])


def scan_feeds(seed=0):
    rng = np.random.default_rng(seed)
    return {"h0": rng.standard_normal(4).astype(np.float32),
            "n0": rng.standard_normal(4).astype(np.float32),
            "a": rng.standard_normal((3, 5, 4)).astype(np.float32),
            "b": rng.standard_normal((5, 4)).astype(np.float32)}


def test_scan_axes_and_directions(tmp_path):
    path = scan_model(tmp_path)
    graph = import_model(path)
    assert "Scan" not in graph.op_counts() and graph.op_counts()["Tanh"] == 5
    assert [v.shape for v in graph.outputs] == [(4,), (4,), (5, 4), (3, 4, 5)]
    assert graph.meta["report"]["scan"]["reason"] == \
        "unrolled at compile time: 5 steps of a 8-node body"
    check_against_onnxruntime(path, tmp_path, [scan_feeds(), scan_feeds(1)])


def scan8_model(tmp_path, sequence_lens=False):
    """Opset 8: a batch axis first, the scan on axis 1, one reversed scan input."""
    scan_body = body([helper.make_node("Add", ["sum_in", "next"], ["sum_out"]),
                      helper.make_node("Mul", ["sum_out", "next"], ["out"])],
                     [value("sum_in", [3]), value("next", [3])],
                     [value("sum_out", [3]), value("out", [3])])
    inputs = [value("init", [2, 3]), value("x", [2, 4, 3])]
    if sequence_lens:
        inputs.append(value("lens", [2], I64))
    nodes = [helper.make_node("Scan", ["lens" if sequence_lens else "", "init", "x"],
                              ["final", "outs"], name="scan", body=scan_body,
                              num_scan_inputs=1, directions=[1])]
    return save(tmp_path, nodes, inputs, [value("final", [2, 3]), value("outs", [2, 4, 3])],
                opset=8)


def test_scan_opset8_batched_form(tmp_path):
    path = scan8_model(tmp_path)
    graph = import_model(path)
    assert "Scan" not in graph.op_counts() and graph.op_counts()["Mul"] == 8
    feeds = {"init": RNG.standard_normal((2, 3)).astype(np.float32),
             "x": RNG.standard_normal((2, 4, 3)).astype(np.float32)}
    check_against_onnxruntime(path, tmp_path, [feeds])


def test_scan_opset8_sequence_lens_is_refused(tmp_path):
    assert_refused(scan8_model(tmp_path, sequence_lens=True), tmp_path,
                   "Scan node 'scan' (opset 8): sequence_lens is not supported")
