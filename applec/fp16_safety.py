"""fp16 safety: ops whose activations an fp16 program cannot hold compute in fp32.

Always, for fp16 programs: the int32 result of MatMulInteger/ConvInteger cast to float
(onnxruntime's `quantize_dynamic` pattern, Cast then Mul by the scales) holds sums of
K products of 8-bit integers, far beyond 65504 for any real K; the Cast and what reads it
compute in fp32, and the value comes back to fp16 after the scale.

For fp16 programs the interpreter runs the final IR (after the passes, quantized weights
included) on the `--calibration FEEDS.npz` samples, or without them on RANDOM_SAMPLES
seeded random inputs (floats N(0, 1), integers in [0, 10): `applec.validate.random_inputs`;
`--no-fp16-check` skips this), and watches every float activation:
- overflow: |x| > 65504 somewhere (fp16 would make it inf, and inf - inf NaN downstream);
- underflow: the value is not all zero, but every element is below fp16's smallest
  subnormal (2^-24), so fp16 flushes all of it to zero.
For each such value, the op that computes it and every op that reads it are lowered in
fp32 (`node.meta["precision"] = "fp32"`; targets/coreml/lower.py casts at the edges of
such regions, and consecutive fp32 ops pass fp32 values). A graph input that fp16 cannot
hold stays fp32 on entry. CoreML ML programs allow per-op precision, so the rest of the
program stays fp16. What was kept in fp32, and why, is in report.json (`fp16_safety`, and
`precision` on each ONNX node affected); ops fp32 cannot help (control flow) get a note.

An op whose *internal* arithmetic overflows while its inputs and output fit (a fused
layer_norm summing squares, say) is not visible here: the IR's values are all we watch.
"""

from __future__ import annotations

import numpy as np

from .ir import Graph, Node, Value

FP16_MAX = float(np.finfo(np.float16).max)
FP16_TINY = 2.0 ** -24          # smallest fp16 subnormal; below half of it rounds to 0
CANNOT_PROMOTE = frozenset({"If", "Loop", "Scan"})   # bodies are lowered as their own blocks


INTEGER_ACCUMULATORS = frozenset({"MatMulInteger", "ConvInteger"})
RANDOM_SAMPLES = 1   # the data-free check: a range check, not a statistic


def check_ranges(graph: Graph, samples: list[dict] | None, watch: Watch | None = None,
                 random_check: bool = True) -> dict | None:
    """Find what an fp16 program of `graph` cannot hold and mark it fp32 (`keep_in_fp32`);
    the report section, with `samples` and their `source` ("calibration", "random", or
    "none" when only the static rule ran), or None when nothing was checked.
    Random inputs the graph cannot run (an index out of range, say) skip the check with a
    note: they are a guess at valid inputs, calibration samples are not."""
    from .validate import random_inputs

    unsafe = static_unsafe(graph)
    notes, source = [], "none"
    if samples is not None:
        unsafe.update(find_unsafe(graph, samples, watch))
        source = "calibration"
    elif random_check:
        specs = [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                 for v in graph.inputs]  # static: import fixed every input's shape
        samples = [random_inputs(specs, seed) for seed in range(RANDOM_SAMPLES)]
        try:
            unsafe.update(find_unsafe(graph, samples))
            source = "random"
        except Exception as error:  # noqa: BLE001 - a guess at inputs that did not fit
            samples = None
            first = (str(error).splitlines() or [type(error).__name__])[0]
            notes.append("fp16 range check skipped: the graph does not run on random "
                         f"inputs ({first}); pass --calibration with real samples")
    if not unsafe and source == "none" and not notes:
        return None
    safety = keep_in_fp32(graph, unsafe)
    safety["notes"] = safety["notes"] + notes
    safety["samples"], safety["source"] = len(samples or ()), source
    return safety


def static_unsafe(graph: Graph) -> dict[str, dict]:
    """Float values fp16 cannot hold whatever the inputs: integer accumulators cast to
    float whose worst case passes 65504. {name: {kind: "range", peak: worst case}}."""
    unsafe = {}
    for node in graph.nodes:
        source = node.inputs[0].producer if node.inputs else None
        if node.op_type not in ("Cast", "CastLike") or source is None or \
                source.op_type not in INTEGER_ACCUMULATORS or \
                node.outputs[0].dtype.kind != "f":
            continue
        worst = _accumulator_worst_case(source)
        if worst > FP16_MAX:
            unsafe[node.outputs[0].name] = {"kind": "range", "peak": float(f"{worst:.4g}")}
    return unsafe


def _accumulator_worst_case(node: Node) -> float:
    """|sum| bound of a MatMulInteger/ConvInteger: products x 255 x 255 (8-bit operands
    less their zero points can span 255)."""
    w = node.inputs[1]
    products = w.shape[-2] if node.op_type == "MatMulInteger" else int(np.prod(w.shape[1:]))
    return float(products) * 255 * 255


class Watch:
    """The peak |x| of every float value over the samples it is shown: graph inputs with
    `feed`, node outputs as a `run_observed` observer (the accuracy report's quantized run
    shows it the same graph on the same samples, so it needs no run of its own)."""

    def __init__(self) -> None:
        self.peaks: dict[str, float] = {}
        self.samples = 0

    def feed(self, graph: Graph, feeds: dict[str, np.ndarray]) -> None:
        self.samples += 1
        for value in graph.inputs:
            self._record(value, feeds[value.name])

    def __call__(self, node: Node, inputs, outputs) -> None:
        for value, out in zip(node.outputs, outputs):
            self._record(value, out)

    def _record(self, value: Value, array) -> None:
        array = np.asarray(array)
        if array.dtype.kind != "f" or not array.size:
            return
        peak = max(float(array.max()), -float(array.min()))  # two reductions, no copy
        if not np.isfinite(peak):  # inf or NaN somewhere: the peak of the finite part
            finite = array[np.isfinite(array)]
            peak = float(np.max(np.abs(finite))) if finite.size else 0.0
        self.peaks[value.name] = max(self.peaks.get(value.name, 0.0), peak)


def find_unsafe(graph: Graph, samples: list[dict[str, np.ndarray]],
                watch: Watch | None = None) -> dict[str, dict]:
    """Float values (by name) that fp16 cannot hold on `samples`: {name: {kind, peak}}.
    A `watch` already shown the samples is read as it is."""
    from applec.passes._quant_calibration import run_observed

    if watch is None or not watch.samples:
        watch = Watch()
        with np.errstate(all="ignore"):  # inf and NaN are what this looks for
            for feeds in samples:
                watch.feed(graph, feeds)
                run_observed(graph, feeds, watch)
    unsafe = {}
    for name, peak in watch.peaks.items():
        if peak > FP16_MAX:
            unsafe[name] = {"kind": "overflow", "peak": float(f"{peak:.4g}")}
        elif 0 < peak < FP16_TINY:
            unsafe[name] = {"kind": "underflow", "peak": float(f"{peak:.4g}")}
    return unsafe


def keep_in_fp32(graph: Graph, unsafe: dict[str, dict]) -> dict:
    """Mark the producers and readers of `unsafe` values fp32; the report section."""
    values = {v.name: v for v in graph.inputs}
    for node in graph.nodes:
        for v in node.outputs:
            values[v.name] = v
    kept: dict[str, dict] = {}   # ONNX node name (IR name if none) -> record
    notes: list[str] = []
    fp32_inputs: set[str] = set()
    graph_inputs = {id(v) for v in graph.inputs}

    def promote(node: Node, why: str) -> None:
        if node.op_type in CANNOT_PROMOTE:
            notes.append(f"{node.op_type} node '{node.name}': {why}, but control flow cannot "
                         "be kept in fp32 as a whole; compile with --precision fp32")
            return
        node.meta["precision"] = "fp32"
        key = node.meta.get("onnx_node") or node.name   # what report.json lists nodes by
        record = kept.setdefault(key, {"op_type": node.op_type,
                                       "onnx_node": node.meta.get("onnx_node"),
                                       "because": []})
        if why not in record["because"]:
            record["because"].append(why)

    for name, finding in unsafe.items():
        value = values.get(name)
        if value is None:
            continue
        why = {"overflow": f"'{name}' reaches {finding['peak']:g}",
               "range": f"'{name}' is an integer accumulator cast to float (worst case "
                        f"{finding['peak']:g})",
               "underflow": f"'{name}' is all below fp16's smallest subnormal "
                            f"({finding['peak']:.3g})"}[finding["kind"]]
        if id(value) in graph_inputs:
            fp32_inputs.add(name)
        elif value.producer is not None:
            promote(value.producer, why)
        for user in {id(u): u for u in value.users}.values():
            promote(user, why)
    graph.meta["fp32_inputs"] = fp32_inputs
    return {"values": dict(sorted(unsafe.items())), "fp32_nodes": kept,
            "fp32_inputs": sorted(fp32_inputs), "notes": notes}
