"""The pass pipeline: an explicit ordered list of IR-to-IR passes.

Each pass is one module named after its registry id, exposing `run(graph) -> int` (how
many rewrites it made; 0 means unchanged). The IR is validated after every pass, and a
failure names the pass that broke it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from applec.errors import ApplecError, ModelError
from applec.ir import Graph

from . import (
    eliminate_common_subexpressions,
    eliminate_dead_code,
    eliminate_identity,
    fold_constants,
    fold_qdq_weights,
    fuse_attention,
    fuse_channel_affine,
    fuse_conv_batchnorm,
    fuse_gelu,
    fuse_hard_swish,
    fuse_layer_norm,
    fuse_matmul_add,
    fuse_rms_norm,
    fuse_silu,
    merge_transpose_axes,
    quantize_weights,
    sum_to_mean,
)

PassFn = Callable[[Graph], int]

# Order matters:
# - fold_qdq_weights before fold_constants: import leaves DequantizeLinear of constants
#   unfolded so QDQ weights stay compressed; it compresses or folds each, then folding goes on.
# - fold_constants first: exporters leave shape arithmetic that other passes must see as
#   constants (a Reshape's target shape, a Squeeze's axes).
# - eliminate_identity after folding: folding turns Cast/Reshape into no-ops it can spot.
# - merge_transpose_axes after folding (it reads the static shapes folding settles) and
#   before CSE, which could give the rank-6 Reshape it bypasses a second reader.
# - eliminate_common_subexpressions after both (folding leaves equal constants to merge)
#   and before the fusions: patterns that read a value twice (x * x, x - mean(x),
#   x * sigmoid(x)) match only when it is one value, not two equal computations.
# - the fusions after the cleanups: they match constants (weights, epsilons, axes) and
#   need the Identity/Cast no-ops between pattern nodes gone.
# - sum_to_mean before the fusions: a LayerNorm written as ReduceSum * 1/N fuses only once
#   it reads ReduceMean (and in fp16 the sum alone can overflow).
# - fuse_layer_norm before fuse_rms_norm: the RMSNorm pattern also matches a LayerNorm's
#   tail (with x - mean as its input), which would leave the LayerNorm unfusable.
# - fuse_attention before fuse_matmul_add: an unscaled attention's Add(MatMul(q, kT), mask)
#   is a biased MatMul when K and the mask are constants.
# - fuse_channel_affine after fuse_conv_batchnorm: Conv, BatchNorm, Mul, Add folds to one
#   Conv only once the BatchNorm is in it (the pipeline's rounds fold the chain op by op).
# - fuse_conv_batchnorm, fuse_gelu, fuse_silu, fuse_hard_swish touch disjoint ops and
#   commute with the others.
# - quantize_weights after the fusions: it reads applec.Linear's [out, in] weight and the
#   folded Conv+BatchNorm weights, and a quantized weight is no constant a fusion could
#   match; it is a no-op unless `--quantize` put a config in graph.meta["quantize"].
# - eliminate_dead_code last: every pass above leaves unused values behind.
PIPELINE: list[tuple[str, PassFn]] = [
    ("fold_qdq_weights", fold_qdq_weights.run),
    ("fold_constants", fold_constants.run),
    ("eliminate_identity", eliminate_identity.run),
    ("merge_transpose_axes", merge_transpose_axes.run),
    ("eliminate_common_subexpressions", eliminate_common_subexpressions.run),
    ("sum_to_mean", sum_to_mean.run),
    ("fuse_conv_batchnorm", fuse_conv_batchnorm.run),
    ("fuse_channel_affine", fuse_channel_affine.run),
    ("fuse_layer_norm", fuse_layer_norm.run),
    ("fuse_rms_norm", fuse_rms_norm.run),
    ("fuse_gelu", fuse_gelu.run),
    ("fuse_silu", fuse_silu.run),
    ("fuse_hard_swish", fuse_hard_swish.run),
    ("fuse_attention", fuse_attention.run),
    ("fuse_matmul_add", fuse_matmul_add.run),
    ("quantize_weights", quantize_weights.run),
    ("eliminate_dead_code", eliminate_dead_code.run),
]


# passes a user may switch off (`applec compile --disable-pass NAME`, or "fusions" for every
# fuse_* pass): to compare against an unfused compile, or to step around a pass's bug.
# Folding stays: lowering needs the constants it makes.
OPTIONAL = frozenset(name for name, _ in PIPELINE
                     if name.startswith(("fuse_", "eliminate_")) or name == "sum_to_mean")


def pipeline_without(disabled) -> list[tuple[str, PassFn]]:
    """PIPELINE minus the passes named in `disabled` ("fusions": every fuse_* pass)."""
    names = set()
    for name in disabled or ():
        if name == "fusions":
            names |= {n for n in OPTIONAL if n.startswith("fuse_")}
        elif name in OPTIONAL:
            names.add(name)
        else:
            raise ApplecError(f"--disable-pass {name}: not a pass that can be disabled; "
                              f"choose from fusions, {', '.join(sorted(OPTIONAL))}")
    return [(name, fn) for name, fn in PIPELINE if name not in names]


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
