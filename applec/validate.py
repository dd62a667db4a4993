"""Compare a bundle's outputs with onnxruntime on the original ONNX model.

Error measures per output (reference = onnxruntime, fp32):
- max_abs: max |bundle - reference|
- max_rel: max_abs / max |reference| (relative to the output's scale, so values near zero
  do not blow it up)
- cosine: cosine similarity of the flattened outputs
Integer and bool outputs are compared for equality (`mismatch`: fraction of elements).
An inf or NaN in the bundle's output where the reference has another value (or the other
way round) fails the output outright: max_abs = max_rel = inf, cosine = 0.

Tolerances, by the bundle's precision: fp32 needs max_rel <= 1e-4; fp16 needs
cosine >= 0.999; integer/bool outputs must match exactly at fp32 and in 99% of elements at
fp16 (an fp16 tie can flip an argmax).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOLERANCE = {"fp32": {"max_rel": 1e-4}, "fp16": {"cosine": 0.999}}
INT_MISMATCH = {"fp32": 0.0, "fp16": 0.01}


@dataclass
class OutputCheck:
    name: str
    max_abs: float
    max_rel: float
    cosine: float
    mismatch: float | None
    ok: bool

    def to_json(self) -> dict:
        return dict(self.__dict__)


def random_inputs(specs: list[dict], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs of the declared shapes: floats ~ N(0, 1), ints in [0, 10), bools."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in specs:
        dtype, shape = np.dtype(spec["dtype"]), spec["shape"]
        if dtype.kind == "f":
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec["name"]] = rng.random(shape) < 0.5
        else:
            feeds[spec["name"]] = rng.integers(0, 10, size=shape).astype(dtype)
    return feeds


def compare(name: str, got: np.ndarray, want: np.ndarray, precision: str) -> OutputCheck:
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        return OutputCheck(name, np.inf, np.inf, 0.0, None, False)
    if want.dtype.kind in "iub":
        mismatch = float(np.mean(got != want)) if want.size else 0.0
        diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
        return OutputCheck(name, diff, diff / max(float(np.max(np.abs(want), initial=0)), 1.0),
                           1.0 if mismatch == 0 else 0.0, mismatch,
                           mismatch <= INT_MISMATCH[precision])
    g, w = got.astype(np.float64).ravel(), want.astype(np.float64).ravel()
    finite = np.isfinite(w)
    if not np.array_equal(g[~finite], w[~finite], equal_nan=True) or \
            not np.isfinite(g[finite]).all():
        # inf or NaN where the reference has another value: no error measure over the
        # finite part can call that a match (an all-NaN output has no finite part at all)
        return OutputCheck(name, np.inf, np.inf, 0.0, None, False)
    diff = np.abs(g[finite] - w[finite])
    max_abs = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(w[finite]).max()) if diff.size else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    norms = np.linalg.norm(g[finite]) * np.linalg.norm(w[finite])
    cosine = float(np.dot(g[finite], w[finite]) / norms) if norms > 0 else \
        (1.0 if max_abs == 0 else 0.0)
    limit = TOLERANCE[precision]
    ok = max_rel <= limit.get("max_rel", np.inf) and cosine >= limit.get("cosine", -np.inf)
    return OutputCheck(name, max_abs, max_rel, cosine, None, bool(ok))


def onnxruntime_outputs(model: str | Path, feeds: dict[str, np.ndarray],
                        threads: int = 0) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The oracle computes the ONNX semantics: basic rewrites only (constant folding, dead
    # nodes). onnxruntime's extended fusions are not always exact: on a quantize_static QDQ
    # transformer its fused QDQ kernels moved outputs by 1.4e-2 of their largest value, while
    # its unfused result and the bundle agree exactly.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items()
                                                if k in wanted})))


@dataclass
class ValidationReport:
    bundle: str
    precision: str
    checks: list[OutputCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_json(self) -> dict:
        return {"bundle": self.bundle, "precision": self.precision, "ok": self.ok,
                "tolerance": TOLERANCE[self.precision],
                "outputs": [c.to_json() for c in self.checks]}


def validate_bundle(bundle, onnx_model, *, inputs=None, backend="auto", seed=0):
    """`bundle` is a path, or a bundle `applec.load` already verified (not hashed again)."""
    from applec.onnx_import import load_model
    from applec.runtime import LoadedBundle, load

    load_model(onnx_model)  # a clear error for a bad ONNX file before onnxruntime sees it
    loaded = bundle if isinstance(bundle, LoadedBundle) else load(bundle, backend=backend)
    feeds = dict(inputs) if inputs else random_inputs(loaded.inputs, seed)
    got = loaded.run(feeds)
    want = onnxruntime_outputs(onnx_model, feeds)
    checks = [compare(spec["name"], got[spec["name"]], want[spec["name"]], loaded.precision)
              for spec in loaded.outputs]
    return ValidationReport(str(loaded.root), loaded.precision, checks)
