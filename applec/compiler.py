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
                  on_stage: Callable[[str, str], None] | None = None) -> CompileResult:
    """Compile an ONNX file into a bundle at `output`; see the module doc for the stages."""
    from applec.passes import run_pipeline
    from applec.targets.coreml import lower_to_program, write_mlpackage
    from applec.targets.profiles import coreml_target, load_profile

    if precision not in PRECISIONS:
        raise ApplecError(f"--precision must be one of {', '.join(PRECISIONS)}, "
                          f"not '{precision}'")
    profile = load_profile(target)
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
        pass_records = run_pipeline(graph)
        lap("optimize", f"{len(graph.nodes)} nodes after passes")
        partitions = [{"id": "p0", "backend": "coreml",
                       "artifact": "partitions/p0.mlpackage"}]
        lap("partition", "1 partition (coreml)")
        ct_target = coreml_target(profile)
        lowered = lower_to_program(graph, precision, ct_target)
        artifact_dir = staging / "partitions" / "p0.mlpackage"
        artifact_dir.parent.mkdir(parents=True)
        write_mlpackage(lowered, ct_target, artifact_dir,
                        description=f"applec {__version__}: {graph.meta.get('source')} "
                                    f"for {profile_key(profile)} ({precision})")
        lap("lower", f"{sum(len(v) for v in lowered.mil_ops.values())} MIL ops")
        partitions[0].update(
            inputs=[p.to_json() for p in lowered.inputs],
            outputs=[p.to_json() for p in lowered.outputs],
            op_count=sum(len(v) for v in lowered.mil_ops.values()))
        manifest = _manifest(graph, profile, precision, partitions)
        report = _report(graph, pass_records, lowered, precision)
        manifest = bundle.finish(staging, manifest, report)
        lap("write", str(output))
    return CompileResult(output, manifest, report, seconds)


def profile_key(profile) -> str:
    return profile.id


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": v.dtype.name, "shape": list(v.shape)} for v in values]


def _manifest(graph: Graph, profile, precision: str, partitions) -> dict:
    import coremltools

    return {
        "format": bundle.FORMAT,
        "format_version": bundle.FORMAT_VERSION,
        "compiler": {"name": "applec", "version": __version__,
                     "coremltools": coremltools.__version__},
        "target": {"chip": profile.id, "name": profile.name,
                   "deployment_target": profile.coreml.deployment_target,
                   "mil_opset": profile.coreml.mil_opset, "precision": precision},
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
