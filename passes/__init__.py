"""The pass pipeline: an explicit ordered list of IR-to-IR passes.

Each pass is one module named after its registry id, exposing `run(graph) -> int` (how
many rewrites it made; 0 means unchanged). The IR is validated after every pass, and a
failure names the pass that broke it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from applec.errors import ModelError
from applec.ir import Graph

from . import eliminate_dead_code, eliminate_identity, fold_constants

PassFn = Callable[[Graph], int]

# Order matters:
# - fold_constants first: exporters leave shape arithmetic that other passes must see as
#   constants (a Reshape's target shape, a Squeeze's axes).
# - eliminate_identity after folding: folding turns Cast/Reshape into no-ops it can spot.
# - eliminate_dead_code last: every pass above leaves unused values behind.
PIPELINE: list[tuple[str, PassFn]] = [
    ("fold_constants", fold_constants.run),
    ("eliminate_identity", eliminate_identity.run),
    ("eliminate_dead_code", eliminate_dead_code.run),
]


def run_pipeline(graph: Graph, pipeline=None, max_rounds: int = 4) -> list[dict]:
    """Run the pipeline to a fixed point (at most `max_rounds`); returns per-pass records."""
    records: dict[str, dict] = {}
    for _ in range(max_rounds):
        changed = 0
        for name, fn in pipeline or PIPELINE:
            start = time.perf_counter()
            count = fn(graph)
            try:
                graph.validate()
            except ModelError as exc:
                raise ModelError(f"internal error: IR invalid after pass {name}: {exc}") from exc
            record = records.setdefault(name, {"pass": name, "rewrites": 0, "seconds": 0.0})
            record["rewrites"] += count
            record["seconds"] += time.perf_counter() - start
            changed += count
        if not changed:
            break
    return list(records.values())
