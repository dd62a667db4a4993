"""The compile driver: ONNX file -> IR -> passes -> partitions -> lowering -> bundle.

Stages run in this order and report to an optional `on_stage(name, detail)` callback (the
CLI shows them as progress). All of the graph work is ours; coremltools only serialises.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, bundle
from .errors import ApplecError
from .ir import Graph
from .onnx_import import import_model

PRECISIONS = ("fp16", "fp32")
STAGES = ("import", "optimize", "partition", "lower", "write")


@dataclass
class CompileResult:
    bundle: Path
    manifest: dict
    report: dict
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict:
        nodes = self.report["nodes"]
        statuses: dict[str, int] = {}
        for entry in nodes.values():
            statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
        return {"bundle": str(self.bundle), "target": self.manifest["target"],
                "partitions": [{"id": p["id"], "backend": p["backend"],
                                "mil_ops": p.get("op_count", 0)}
                               for p in self.manifest["partitions"]],
                "onnx_nodes": len(nodes), "node_status": statuses,
                "bundle_bytes": _tree_size(self.bundle), "seconds": self.seconds}


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def compile_model(model: str | Path, *, output: str | Path, target: str = "m2",
                  precision: str = "fp16", shapes: dict[str, tuple[int, ...]] | None = None,
                  on_stage: Callable[[str, str], None] | None = None,
                  deployment_target: str | None = None, quantize: str | None = None,
                  block_size: int | None = None, quantize_min_size: int | None = None,
                  quantize_embeddings: str | None = None, calibration=None,
                  disable_passes=None, fp16_check: bool = True) -> CompileResult:
    """Compile an ONNX file into a bundle at `output`; see the module doc for the stages.

    `deployment_target` overrides the profile's default CoreML target (one the chip
    supports). `quantize` (int8 | int4 | palette4) compresses large weights, see
    docs/quantization.md; `calibration` is a .npz path or a mapping of input name -> samples:
    GPTQ rounding for `quantize`, and fp16 safety (applec/fp16_safety.py) for fp16.
    `disable_passes` names passes to skip ("fusions": every fuse_* pass). An fp16 compile
    without calibration checks activation ranges on seeded random inputs instead, unless
    `fp16_check` is False (see applec/fp16_safety.py).
    """
    from applec.passes import pipeline_without, run_pipeline
    from applec.passes._quant import make_config
    from applec.passes._quant_calibration import load_calibration
    from applec.targets.coreml import lower_to_program, write_mlpackage
    from applec.targets.profiles import load_profile

    if precision not in PRECISIONS:
        raise ApplecError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                          f"not '{precision}'")
    pipeline = pipeline_without(disable_passes)
    if calibration is not None and quantize is None and precision != "fp16":
        raise ApplecError("--calibration without --quantize drives fp16 safety, which has "
                          "nothing to do with --precision fp32")
    profile = load_profile(target)
    ct_target, deployment = _coreml_target(profile, deployment_target)
    quant = make_config(quantize, block_size=block_size, min_size=quantize_min_size,
                        calibration=calibration, precision=precision,
                        embeddings=quantize_embeddings,
                        ios18=_is_ios18(ct_target),
                        target_text=f"target {profile.id} deploys to {deployment}")
    notify = on_stage or (lambda stage, detail: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str, detail: str = "") -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = round(now - clock, 4)
        clock = now
        notify(stage, detail)

    output = Path(output)
    with bundle.staged_directory(output) as staging:
        graph = import_model(model, shapes)
        lap("import", f"{len(graph.nodes)} nodes")
        samples = None
        if calibration is not None:
            samples = load_calibration(calibration, graph.inputs)
        if quant is not None:
            if samples is not None:
                quant.calibration = samples
                quant.calibration_source = str(calibration) \
                    if isinstance(calibration, (str, Path)) else "the given arrays"
            graph.meta["quantize"] = quant
        pass_records = run_pipeline(graph, pipeline)
        lap("optimize", f"{len(graph.nodes)} nodes after passes")
        quantization = None
        watch = None
        if samples is not None and precision == "fp16":
            from .fp16_safety import Watch

            watch = Watch()   # fed by the accuracy report's run when there is one
        if quant is not None:
            from .accuracy import quantization_report, release_float_weights

            quantization = quantization_report(graph, quant, watch)
            release_float_weights(graph)
            lap("accuracy", f"{len(quant.layers)} weights quantized ({quantize})")
        fp16_safety = None
        if precision == "fp16":
            from .fp16_safety import check_ranges

            fp16_safety = check_ranges(graph, samples, watch, random_check=fp16_check)
            if fp16_safety is not None:
                source = "" if fp16_safety["source"] == "none" else f" {fp16_safety['source']}"
                lap("fp16", f"{len(fp16_safety['fp32_nodes'])} op(s) kept in fp32 "
                    f"({fp16_safety['samples']}{source} sample(s))")
        partitions = [{"id": "p0", "backend": "coreml",
                       "artifact": "partitions/p0.mlpackage"}]
        lap("partition", "1 partition (coreml)")
        lowered = lower_to_program(graph, precision, ct_target)
        artifact_dir = staging / "partitions" / "p0.mlpackage"
        artifact_dir.parent.mkdir(parents=True)
        write_mlpackage(lowered, ct_target, artifact_dir,
                        description=f"applec {__version__}: {graph.meta.get('source')} "
                                    f"for {profile.id} ({precision})")
        lap("lower", f"{sum(len(v) for v in lowered.mil_ops.values())} MIL ops")
        partitions[0].update(
            inputs=[p.to_json() for p in lowered.inputs],
            outputs=[p.to_json() for p in lowered.outputs],
            op_count=sum(len(v) for v in lowered.mil_ops.values()))
        manifest = _manifest(graph, profile, precision, partitions, deployment)
        report = _report(graph, pass_records, lowered, precision)
        if quantization is not None:
            _report_quantization(report, quantization, profile)
        if fp16_safety is not None:
            _report_fp16_safety(report, fp16_safety)
        manifest = bundle.finish(staging, manifest, report)
        lap("write", str(output))
    return CompileResult(output, manifest, report, seconds)


def _coreml_target(profile, deployment_target: str | None):
    """The coremltools target and its name: the profile's default, or an override the chip
    supports (`--deployment-target macOS14`)."""
    from applec.errors import TargetError
    from applec.targets.profiles import coreml_target

    if deployment_target is None:
        return coreml_target(profile), profile.coreml.deployment_target
    supported = profile.coreml.supported_targets
    if deployment_target not in supported:
        raise TargetError(f"--deployment-target {deployment_target}: {profile.id} supports "
                          f"{', '.join(supported)}")
    import coremltools as ct

    target = getattr(ct.target, deployment_target, None)
    if target is None:
        raise TargetError(f"--deployment-target {deployment_target}: coremltools "
                          f"{ct.__version__} does not know it")
    return target, deployment_target


def _is_ios18(ct_target) -> bool:
    import coremltools as ct

    return ct_target >= ct.target.iOS18


def _mil_opset(profile, deployment: str) -> str:
    """CoreML<spec - 1>: spec 6..10 are the opsets CoreML5..CoreML9 (coremltools _OPSET)."""
    if deployment == profile.coreml.deployment_target:
        return profile.coreml.mil_opset
    import coremltools as ct

    return f"CoreML{int(getattr(ct.target, deployment)) - 1}"


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in values]


def _manifest(graph: Graph, profile, precision: str, partitions, deployment: str) -> dict:
    import coremltools

    return {
        "format": bundle.FORMAT,
        "format_version": bundle.FORMAT_VERSION,
        "compiler": {"name": "applec", "version": __version__,
                     "coremltools": coremltools.__version__},
        "target": {"chip": profile.id, "name": profile.name,
                   "deployment_target": deployment,
                   "mil_opset": _mil_opset(profile, deployment), "precision": precision},
        "model": {"source": graph.meta.get("source"), "opset": graph.meta.get("opset"),
                  "inputs": _io(graph.inputs), "outputs": _io(graph.outputs)},
        "partitions": partitions,
    }


def _report(graph: Graph, pass_records, lowered, precision: str) -> dict:
    nodes = {name: dict(entry) for name, entry in graph.meta["report"].items()}
    for node in graph.nodes:
        source = node.meta.get("onnx_node")
        entry = nodes.get(source)
        if entry is None:
            continue
        entry.update(status="lowered", partition="p0", backend="coreml")
        entry.setdefault("mil_ops", []).extend(lowered.mil_ops.get(node.name, []))
        entry["reason"] = f"CoreML ML program ({precision})"
    return {
        "passes": [{"pass": r["pass"], "rewrites": r["rewrites"]} for r in pass_records],
        "nodes": nodes,
        "notes": sorted(set(lowered.notes) | set(graph.meta.get("notes", []))),
    }


def _report_fp16_safety(report: dict, safety: dict) -> None:
    """The fp16_safety section, and `precision` on each ONNX node kept in fp32."""
    report["fp16_safety"] = safety
    report["notes"] = sorted(set(report["notes"]) | set(safety["notes"]))
    for record in safety["fp32_nodes"].values():
        entry = report["nodes"].get(record["onnx_node"])
        if entry is not None:
            entry["precision"] = "fp32"
            entry.setdefault("fp16_safety", [])
            entry["fp16_safety"] += [w for w in record["because"]
                                     if w not in entry["fp16_safety"]]


def _report_quantization(report: dict, quantization: dict, profile) -> None:
    """The quantization section, and on each quantized ONNX node what was done to it."""
    report["quantization"] = quantization
    nodes = report["nodes"]
    blockwise_on_ane = profile.ane_constraints.blockwise_quantized_weights
    for layer in quantization["layers"].values():
        entry = nodes.get(layer.get("onnx_node"))
        if entry is None:
            continue
        keys = ("mode", "method", "shape", "block_size", "weight_snr_db", "output_snr_db",
                "float_bytes", "quantized_bytes")
        entry["quantization"] = {k: layer[k] for k in keys if k in layer}
        if layer.get("blockwise") and not blockwise_on_ane:
            entry.setdefault("notes", []).append(
                "block-wise quantized weight: the Neural Engine runs only per-tensor and "
                "per-channel quantization (coremltools#2510), so CoreML runs this layer on "
                "the CPU or GPU")
