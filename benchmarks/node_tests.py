"""ONNX node conformance: regenerate onnx's node tests and run applec on each one.

onnx >= 1.23 ships the node test generators, not their data. This script writes every
case of `onnx.backend.test.case.node.collect_testcases()` to a cache outside git, in the
layout of onnx's own test data (`<name>/model.onnx`, `test_data_set_0/input_*.pb`,
`output_*.pb`), then for each test whose ops are all in applec's op table: compile (fp32,
target m2) -> bundle -> reference executor -> compare with the stored outputs.

    python benchmarks/node_tests.py                      # generate if missing, run all, print
    python benchmarks/node_tests.py --json results.json  # also write per-test results
    python benchmarks/node_tests.py -k softmax -v        # tests whose name contains "softmax"
    python benchmarks/node_tests.py --generate-only --cache /tmp/node-tests

Graph inputs that decide a shape (Reshape's shape, a reduction's axes, Range's limit: what
reaches an op's `static_inputs`) are frozen into constants from the test's data, as
exporters emit them; a static-shape compiler needs them at compile time.

Tolerance: applec's fp32 rule (`applec.validate.compare`): max |got - want| <= 1e-4 *
max |want| per output (float16 outputs: 2**-10, one float16 ulp, as 1e-4 is below their
resolution); NaN and +-inf exactly where expected; integer and bool outputs exactly equal.
Shapes and dtypes are checked first. (onnx's own runner uses rtol 1e-3, atol 1e-7.)

Each test ends as one of: pass; fail (numbers, shape or dtype); compile_error (first line
of the error); run_error; skipped (an op not in the table, a non-ONNX domain, a training
op, or sequence/optional/map values). A non-pass listed in KNOWN_EXCEPTIONS of
tests/test_node_conformance.py counts as a known exception.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
INDEX = "index.json"  # written last: its presence marks a complete cache
STATUSES = ("pass", "fail", "compile_error", "run_error", "skipped")


def default_cache() -> Path:
    import onnx

    root = os.environ.get("APPLEC_NODE_TESTS_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "applec" / "onnx-node-tests"
    return base / onnx.__version__


# -- generation --------------------------------------------------------------------------
def generate(cache: Path | None = None) -> Path:
    """Write every node test under `cache` unless it is already complete; return it.

    Writes into a sibling temporary directory renamed into place at the end, so a parallel
    run (pytest-xdist workers) or an interrupted one never leaves a half-written cache.
    """
    cache = Path(cache or default_cache())
    if (cache / INDEX).is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache.name}.staging-", dir=cache.parent))
    try:
        _write_cases(staging)
        if cache.exists() and not (cache / INDEX).is_file():
            shutil.rmtree(cache, ignore_errors=True)  # an old incomplete cache
        try:
            os.rename(staging, cache)
        except OSError:
            if not (cache / INDEX).is_file():  # lost the race to a complete cache: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _write_cases(root: Path) -> None:
    import warnings

    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")  # the generators divide by zero on purpose
        cases = node_cases.collect_testcases()
    index, op_under_test = {}, None
    for case in cases:
        nodes = case.model.graph.node
        if "_expanded" not in case.name or op_under_test is None:
            op_under_test = nodes[0].op_type if len(nodes) == 1 else _main_op(case)
        test_dir = root / case.name
        test_dir.mkdir()
        (test_dir / "model.onnx").write_bytes(case.model.SerializeToString())
        for i, (inputs, outputs) in enumerate(case.data_sets):
            data_dir = test_dir / f"test_data_set_{i}"
            data_dir.mkdir()
            _write_values(data_dir, "input", inputs, case.model.graph.input)
            _write_values(data_dir, "output", outputs, case.model.graph.output)
        index[case.name] = {"op": op_under_test, "rtol": case.rtol, "atol": case.atol}
    (root / INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")


def _main_op(case) -> str:
    """The op a multi-node (non-expanded) test is about: the last node's, by convention."""
    return case.model.graph.node[-1].op_type


def _write_values(data_dir: Path, kind: str, values, infos) -> None:
    from onnx import TensorProto, numpy_helper

    for j, (value, info) in enumerate(zip(values, infos)):
        if info.type.HasField("map_type"):
            proto = numpy_helper.from_dict(value, info.name)
        elif info.type.HasField("sequence_type"):
            proto = numpy_helper.from_list(value, info.name)
        elif info.type.HasField("optional_type"):
            proto = numpy_helper.from_optional(value, info.name)
        elif isinstance(value, TensorProto):
            proto = value
        else:
            proto = numpy_helper.from_array(np.asarray(value), info.name)
        (data_dir / f"{kind}_{j}.pb").write_bytes(proto.SerializeToString())


def list_tests(cache: Path) -> list[str]:
    return sorted(json.loads((cache / INDEX).read_text()))


def ops_under_test(cache: Path) -> dict[str, str]:
    return {name: entry["op"] for name, entry in json.loads((cache / INDEX).read_text()).items()}


# -- scope -------------------------------------------------------------------------------
def out_of_scope(test_dir: Path) -> str | None:
    """Why applec does not attempt this test, or None when it is in scope."""
    import onnx

    from applec import ops
    from applec.onnx_import import ONNX_DOMAINS

    model = onnx.load(str(test_dir / "model.onnx"))
    if "training" in test_dir.name:
        return "training op"
    for info in list(model.graph.input) + list(model.graph.output):
        if not info.type.HasField("tensor_type"):
            return f"{info.type.WhichOneof('value')} values"
    for node in model.graph.node:
        if node.domain not in ONNX_DOMAINS:
            return f"domain {node.domain}"
        if node.op_type != "Constant" and node.op_type not in ops.OPS:
            return f"op {node.op_type} not in the table"
        if any(a.name == "training_mode" and a.i for a in node.attribute):
            return "training op"
    return None


# -- running -----------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    op: str
    status: str  # one of STATUSES
    detail: str = ""
    known: str | None = None  # the KNOWN_EXCEPTIONS reason, when listed
    seconds: float = 0.0


def load_data_set(test_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    import onnx
    from onnx import numpy_helper

    data_dir = test_dir / "test_data_set_0"

    def read(kind):
        arrays, j = [], 0
        while (data_dir / f"{kind}_{j}.pb").is_file():
            tensor = onnx.TensorProto()
            tensor.ParseFromString((data_dir / f"{kind}_{j}.pb").read_bytes())
            arrays.append(numpy_helper.to_array(tensor))
            j += 1
        return arrays

    return read("input"), read("output")


def freeze_static_inputs(model, inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Turn into initializers, in place, the graph inputs that an ahead-of-time compile
    needs as constants; return the feeds for the rest.

    Frozen: inputs that decide a shape, i.e. that reach a position the op table lists in
    `static_inputs` (Reshape's shape, Slice's starts, a reduction's axes, Range's limit...:
    exporters emit these as constants, the node tests as inputs), through any op but the
    shape-only Shape and Size; and zero-size inputs (no data, only a shape and a dtype,
    like CastLike's `like`).
    """
    from onnx import numpy_helper

    from applec import ops

    static = set()
    for node in reversed(model.graph.node):  # consumers first: the set grows upstream
        op = ops.OPS.get(node.op_type)
        positions = set(op.static_inputs if op is not None else ())
        if node.op_type not in ("Shape", "Size") and static.intersection(node.output):
            positions = range(len(node.input))
            static.update(_subgraph_reads(node))  # an If's branches read outer names too
        for position in positions:
            if position < len(node.input) and node.input[position]:
                static.add(node.input[position])
    feeds, keep = {}, []
    for info, array in zip(model.graph.input, inputs):
        if info.name in static or array.size == 0:
            model.graph.initializer.append(numpy_helper.from_array(array, info.name))
        else:
            feeds[info.name] = array
            keep.append(info)
    del model.graph.input[:]
    model.graph.input.extend(keep)
    return feeds


def _subgraph_reads(node) -> set[str]:
    """Names the subgraphs of `node` (If branches) read, their own ones included."""
    names = set()
    for attr in node.attribute:
        for graph in [attr.g] if attr.HasField("g") else list(attr.graphs):
            for inner in graph.node:
                names.update(n for n in inner.input if n)
                names.update(_subgraph_reads(inner))
    return names


def shape_overrides(model, inputs: list[np.ndarray]) -> dict[str, tuple[int, ...]]:
    """--shape values for inputs whose declared shape is not fully static."""
    overrides = {}
    for info, array in zip(model.graph.input, inputs):
        dims = info.type.tensor_type.shape.dim
        static = info.type.tensor_type.HasField("shape") and all(
            d.HasField("dim_value") for d in dims)
        if not static:
            overrides[info.name] = tuple(array.shape)
    return overrides


def run_test(test_dir: Path, op: str = "", work: Path | None = None) -> Result:
    """Compile, run and compare one in-scope node test."""
    import onnx

    import applec
    from applec.errors import ApplecError

    start = time.perf_counter()
    name = test_dir.name

    def done(status, detail=""):
        return Result(name, op, status, _one_line(detail), None,
                      round(time.perf_counter() - start, 3))

    model = onnx.load(str(test_dir / "model.onnx"))
    inputs, expected = load_data_set(test_dir)
    feeds = freeze_static_inputs(model, inputs)
    with tempfile.TemporaryDirectory(dir=work) as tmp:
        onnx.save(model, Path(tmp) / "model.onnx")
        try:
            applec.compile(Path(tmp) / "model.onnx", output=Path(tmp) / "bundle",
                           target="m2", precision="fp32",
                           shapes=shape_overrides(model, list(feeds.values())))
        except ApplecError as exc:
            return done("compile_error", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001  (a bug in applec: still a compile error)
            return done("compile_error", f"internal {type(exc).__name__}: {exc}")
        try:
            got = applec.load(Path(tmp) / "bundle", backend="reference").run(feeds)
        except Exception as exc:  # noqa: BLE001  (every failure is a result to report)
            return done("run_error", f"{type(exc).__name__}: {exc}")
    problems = []
    for info, want in zip(model.graph.output, expected):
        have = got.get(info.name)
        if have is None:
            problems.append(f"{info.name}: missing")
        else:
            problem = mismatch(info.name, have, want)
            if problem:
                problems.append(problem)
    return done("fail", "; ".join(problems)) if problems else done("pass")


# Largest relative error per output dtype: applec's fp32 rule, and for float16 outputs
# one float16 ulp at the output's scale (1e-4 is below float16's resolution).
MAX_REL = {np.dtype(np.float16): 2.0 ** -10}
FP32_MAX_REL = 1e-4


def mismatch(name: str, got: np.ndarray, want: np.ndarray) -> str | None:
    """None when `got` matches `want`, else what differs: shape, dtype, then values."""
    from applec.validate import compare

    if got.shape != want.shape:
        return f"{name}: shape {list(got.shape)} != {list(want.shape)}"
    if got.dtype != want.dtype:
        return f"{name}: dtype {got.dtype} != {want.dtype}"
    if want.dtype.kind not in "biuf":
        return None if np.array_equal(got, want) else f"{name}: values differ"
    if want.dtype.kind == "f":
        # NaN and +-inf are values here: they must be where expected, then are set aside
        special = ~np.isfinite(want)
        if not (np.array_equal(special, ~np.isfinite(got))
                and np.array_equal(got[special], want[special], equal_nan=True)):
            return f"{name}: NaN/inf differ at {int((special != ~np.isfinite(got)).sum())} " \
                   "positions"
        got, want = np.where(special, 0, got), np.where(special, 0, want)
    check = compare(name, got, want, "fp32")
    if want.dtype.kind != "f" and check.ok:
        return None
    if want.dtype.kind == "f" and check.max_rel <= MAX_REL.get(want.dtype, FP32_MAX_REL):
        return None
    extra = f" mismatch {check.mismatch:.3g}" if check.mismatch else ""
    return f"{name}: max_abs {check.max_abs:.3g} max_rel {check.max_rel:.3g}{extra}"


def _one_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


def evaluate(cache: Path, name: str, op: str, known: dict[str, str]) -> Result:
    """Classify one test: skipped, or the result of running it."""
    import warnings

    test_dir = cache / name
    reason = out_of_scope(test_dir)
    if reason is not None:
        result = Result(name, op, "skipped", reason)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = run_test(test_dir, op)
    if result.status != "skipped" and name in known:
        result.known = known[name]
    return result


def known_exceptions() -> dict[str, str]:
    """KNOWN_EXCEPTIONS from tests/test_node_conformance.py (one list, kept with the test)."""
    path = REPO / "tests" / "test_node_conformance.py"
    spec = importlib.util.spec_from_file_location("_node_conformance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.KNOWN_EXCEPTIONS)


def warm_up() -> None:
    """Import the compiler and freeze the heap, once per process.

    coremltools' convert runs a full `gc.collect()` on every call; with torch and
    coremltools loaded that scan costs ~0.15 s, ten times a small compile. Objects alive
    now are moved out of the collector's sight (`gc.freeze`), so each scan stays small.
    """
    import gc
    import logging

    import coremltools  # noqa: F401

    import applec.compiler  # noqa: F401
    from applec.targets import coreml  # noqa: F401

    logging.getLogger("coremltools").setLevel(logging.ERROR)
    gc.collect()
    gc.freeze()


def _worker(args) -> Result:
    global _warm
    if not _warm:
        warm_up()
        _warm = True
    return evaluate(*args)


_warm = False


def run_all(cache: Path, names: list[str], jobs: int) -> Iterator[Result]:
    ops_of = ops_under_test(cache)
    known = known_exceptions()
    work = [(cache, n, ops_of[n], known) for n in names]
    if jobs <= 1:
        yield from map(_worker, work)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(jobs, maxtasksperchild=200) as pool:
        yield from pool.imap_unordered(_worker, work, chunksize=4)


# -- reporting ---------------------------------------------------------------------------
def per_op_table(results: list[Result]) -> list[dict]:
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(r.op, {"op": r.op, "tests": 0, "pass": 0, "fail": 0,
                                     "known": 0, "skipped": 0})
        if r.status == "skipped":
            row["skipped"] += 1
            continue
        row["tests"] += 1
        if r.status == "pass":
            row["pass"] += 1
        elif r.known is not None:
            row["known"] += 1
        else:
            row["fail"] += 1
    return sorted(rows.values(), key=lambda row: (-row["fail"], -row["known"], row["op"]))


def totals(results: list[Result]) -> dict[str, int]:
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    in_scope = [r for r in results if r.status != "skipped"]
    return {"tests": len(results), "in_scope": len(in_scope),
            "pass": counts["pass"],
            "known_exceptions": sum(r.status != "pass" and r.known is not None
                                    for r in in_scope),
            "unexpected": sum(r.status != "pass" and r.known is None for r in in_scope),
            "out_of_scope": counts["skipped"], **{f"status_{s}": counts[s] for s in STATUSES}}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| op | tests | pass | fail | known exception | out of scope |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda r: r["op"]):
        if row["tests"]:
            lines.append(f"| {row['op']} | {row['tests']} | {row['pass']} | {row['fail']} | "
                         f"{row['known']} | {row['skipped']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=None,
                        help="test data directory (default ~/.cache/applec/onnx-node-tests/"
                             "<onnx version>, or $APPLEC_NODE_TESTS_CACHE/<onnx version>)")
    parser.add_argument("--generate-only", action="store_true")
    parser.add_argument("-k", dest="pattern", default="", help="only tests whose name has it")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, help="write per-test results and the table")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every non-pass")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cache = generate(args.cache)
    print(f"node tests in {cache} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
    if args.generate_only:
        return 0
    names = [n for n in list_tests(cache) if args.pattern in n]
    start = time.perf_counter()
    results = sorted(run_all(cache, names, args.jobs), key=lambda r: r.name)
    seconds = time.perf_counter() - start
    rows = per_op_table(results)
    if args.markdown:
        print(markdown_table(rows))
    else:
        print(f"{'op':<24}{'tests':>6}{'pass':>6}{'fail':>6}{'known':>6}{'skip':>6}")
        for row in rows:
            if row["tests"]:
                print(f"{row['op']:<24}{row['tests']:>6}{row['pass']:>6}{row['fail']:>6}"
                      f"{row['known']:>6}{row['skipped']:>6}")
    if args.verbose:
        for r in results:
            if r.status not in ("pass", "skipped"):
                tag = "known" if r.known is not None else "NEW"
                print(f"{tag:5} {r.status:13} {r.name}: {r.detail}")
    summary = totals(results)
    print(json.dumps(summary), f"({seconds:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps({"totals": summary, "per_op": rows,
                                         "tests": [asdict(r) for r in results]}, indent=1)
                             + "\n")
    return 1 if summary["unexpected"] else 0


if __name__ == "__main__":
    sys.exit(main())
