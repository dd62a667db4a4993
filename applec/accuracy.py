"""What weight quantization cost: the accuracy report of a quantized compile.

The interpreter runs the final IR twice on the same inputs (the calibration samples, or
seeded random ones as `applec validate` makes them: floats ~ N(0, 1), ints in [0, 10)):
once as compiled, and once with every applec.DequantizeWeight giving back the float weight
it replaced (kept in the node's meta by `quantize_weights`). Both runs are the IR's fp32
numerics, so the figures isolate quantization from fp16 rounding.

Reported:
- per output: cosine and SNR (dB) of quantized vs float, over all samples; a warning when
  the cosine is under COSINE_WARNING;
- per quantized layer: the weight's relative Frobenius error and SNR, and the SNR of the
  layer's own output on its float input (what GPTQ minimises).
Activations beyond the fp16 range are fp16 safety's business (applec/fp16_safety.py).
"""

from __future__ import annotations

import math

import numpy as np

from .ir import Graph, Node
from .validate import random_inputs

COSINE_WARNING = 0.99
RANDOM_SAMPLES = 2
DEQUANTIZE = "applec.DequantizeWeight"


def snr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    ref = reference.astype(np.float64).ravel()
    noise = float(np.sum((ref - approx.astype(np.float64).ravel()) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0:
        return math.inf
    return 10 * math.log10(signal / noise) if signal > 0 else -math.inf


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    if norms == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.dot(a, b) / norms)


def _rounded(value: float, digits: int = 6):
    return value if math.isinf(value) or math.isnan(value) else round(value, digits)


def quantization_report(graph: Graph, cfg, fp16_watch=None) -> dict:
    """The `quantization` section of report.json (see the module doc). `fp16_watch`
    (an applec.fp16_safety.Watch) observes the quantized runs on the calibration samples."""
    from applec.passes._quant_calibration import run_observed

    calibrated = bool(cfg.calibration)
    samples = cfg.calibration if calibrated else [
        random_inputs([{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)}
                       for v in graph.inputs], seed) for seed in range(RANDOM_SAMPLES)]
    dequantizers = {id(n): n for n in graph.nodes if n.op_type == DEQUANTIZE}
    readers = {id(u): (u, n) for n in dequantizers.values() for u in n.outputs[0].users}
    layer_noise: dict[str, list[float]] = {}
    floats, quants = [], []

    def float_weight(node: Node):
        return [node.meta["float_weight"]] if id(node) in dequantizers else None

    def watch(node: Node, inputs, outputs):
        if id(node) in readers:
            dq = readers[id(node)][1]
            _layer_output_error(node, dq, inputs, outputs,
                                layer_noise.setdefault(dq.name, [0.0, 0.0]))

    from . import interpreter

    for feeds in samples:
        floats.append(run_observed(graph, feeds, watch, replace=float_weight))
        if fp16_watch is not None and calibrated:
            fp16_watch.feed(graph, feeds)
            quants.append(run_observed(graph, feeds, fp16_watch))
        else:
            quants.append(interpreter.run(graph, feeds))
    outputs = {v.name: _compare(v.name, floats, quants) for v in graph.outputs}
    layers = {}
    for name, record in cfg.layers.items():
        layers[name] = dict(record, **_weight_error(graph, record))
        signal, noise = layer_noise.get(record["dequantize"], (0.0, 0.0))
        if signal > 0:
            layers[name]["output_snr_db"] = _rounded(
                10 * math.log10(signal / noise) if noise > 0 else math.inf, 2)
    warnings = [f"output '{n}': cosine {o['cosine']:.4f} vs the unquantized model is under "
                f"{COSINE_WARNING}" for n, o in outputs.items()
                if o.get("cosine", 1.0) < COSINE_WARNING]
    warnings += [f"output '{n}': {o['mismatch']:.1%} of its elements differ from the "
                 "unquantized model" for n, o in outputs.items() if o.get("mismatch", 0) > 0.01]
    float_bytes = sum(r["float_bytes"] for r in cfg.layers.values())
    quant_bytes = sum(r["quantized_bytes"] for r in cfg.layers.values())
    return {
        "mode": cfg.mode,
        "block_size": cfg.block_size if cfg.mode == "int4" else None,
        "min_size": cfg.min_size,
        "method": "gptq" if calibrated else "rtn",
        "inputs": (f"calibration: {len(samples)} sample(s) from {cfg.calibration_source}"
                   if calibrated else f"{len(samples)} seeded random sample(s)"),
        "weights": {"layers": len(cfg.layers), "float_bytes": float_bytes,
                    "quantized_bytes": quant_bytes,
                    "ratio": round(float_bytes / quant_bytes, 3) if quant_bytes else None},
        "outputs": outputs,
        "layers": layers,
        "skipped": dict(cfg.skipped),
        "warnings": warnings,
    }


def _layer_output_error(node: Node, dq: Node, inputs, outputs, acc: list[float]) -> None:
    """The layer's output with its float weight vs its quantized one, on the float input."""
    from . import ops

    slot = next(i for i, v in enumerate(node.inputs) if v is dq.outputs[0])
    quantized_inputs = list(inputs)
    quantized_inputs[slot] = ops.evaluate(dq, [v.const if v is not None else None
                                               for v in dq.inputs])[0]
    quantized = ops.evaluate(node, quantized_inputs)[0]
    reference = outputs[0].astype(np.float64)
    acc[0] += float(np.sum(reference ** 2))
    acc[1] += float(np.sum((reference - quantized) ** 2))


def _weight_error(graph: Graph, record: dict) -> dict:
    node = next((n for n in graph.nodes if n.name == record["dequantize"]), None)
    if node is None:
        return {}
    from . import ops

    weight = node.meta["float_weight"].astype(np.float64)
    quantized = ops.evaluate(node, [v.const if v is not None else None for v in node.inputs])[0]
    norm = float(np.linalg.norm(weight))
    error = float(np.linalg.norm(weight - quantized))
    return {"weight_rel_error": _rounded(error / norm if norm else 0.0),
            "weight_snr_db": _rounded(snr_db(weight, quantized), 2)}


def _compare(name: str, floats: list[dict], quants: list[dict]) -> dict:
    want = np.concatenate([np.asarray(f[name]).ravel() for f in floats])
    got = np.concatenate([np.asarray(q[name]).ravel() for q in quants])
    if want.dtype.kind != "f":
        return {"mismatch": float(np.mean(want != got)) if want.size else 0.0}
    finite = np.isfinite(want) & np.isfinite(got)
    return {"cosine": _rounded(cosine(want[finite], got[finite])),
            "snr_db": _rounded(snr_db(want[finite], got[finite]), 2)}


def release_float_weights(graph: Graph) -> None:
    """Drop the float copies kept for this report (they are not needed to lower)."""
    for node in graph.nodes:
        node.meta.pop("float_weight", None)
