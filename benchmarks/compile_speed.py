"""Compile time and peak memory: applec on ONNX against coremltools on the same PyTorch model.

For each model in `_models.MODELS` this runs, alternately, one applec compile and one
coremltools conversion, each in a fresh subprocess, `--runs` times, and prints the medians
as a markdown table. What each timer counts:

- applec: `applec.compile(onnx file) -> finished bundle` (the ONNX export is cached and
  not timed; it is what a user already has).
- coremltools: `ct.convert(traced module) -> .save(.mlpackage)`. `torch.jit.trace` is timed
  separately and is not in the ratio.
- Neither counts interpreter start, imports or building the PyTorch module. Imports are
  timed apart (`import_seconds`): applec would otherwise import coremltools inside its
  lowering stage. The applec child blocks `import torch`, which applec never needs but
  coremltools performs whenever torch is installed. Peak RSS is the whole child process
  (VmHWM on Linux): imports included and, for coremltools, the PyTorch model it converts.

    python benchmarks/compile_speed.py --runs 3 --json figures.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = ("applec", "coremltools")  # run in this order, alternating, within each repetition
TARGET = "m2"
GOAL_RATIO = 0.5  # the issue's goal: applec at most half of coremltools' time
CHILD_TIMEOUT_S = 1800


# Child side: one measured conversion per process, result written to a JSON file.

def _peak_rss_mb() -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import peak_rss_mb

    return peak_rss_mb()


def _run_applec(job: dict) -> dict:
    # applec does not use torch, but coremltools imports it whenever it is installed (and
    # the bench extra installs it): block it so the figures are those of a torch-free install.
    sys.modules["torch"] = None
    started = time.perf_counter()
    import coremltools  # noqa: F401 - applec imports it lazily while lowering; keep it untimed
    from coremltools.converters.mil import Builder  # noqa: F401

    import applec

    shapes = {name: tuple(shape) for name, shape in job["shapes"].items()}
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    result = applec.compile(job["onnx"], output=Path(job["scratch"]) / "bundle",
                            target=TARGET, precision="fp16", shapes=shapes)
    return {"seconds": time.perf_counter() - start, "stages": result.seconds,
            "import_seconds": start - started, "rss_before_mb": rss_before}


def _run_coremltools(job: dict) -> dict:
    started = time.perf_counter()
    import coremltools as ct
    import numpy as np
    import torch

    sys.path.insert(0, str(HERE))
    from _models import MODELS

    imported_at = time.perf_counter()
    spec = MODELS[job["model"]]
    model, example = spec.build(), spec.example_inputs()
    # ML programs have no int64 inputs; coremltools' own convention is int32 token ids.
    inputs = [ct.TensorType(name=i.name, shape=i.shape,
                            dtype=np.float32 if i.dtype == "float32" else np.int32)
              for i in spec.inputs]
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    with torch.no_grad():
        traced = torch.jit.trace(model, example)
    traced_at = time.perf_counter()
    mlmodel = ct.convert(traced, inputs=inputs, convert_to="mlprogram",
                         minimum_deployment_target=ct.target.macOS15,
                         compute_precision=ct.precision.FLOAT16, skip_model_load=True)
    mlmodel.save(str(Path(job["scratch"]) / "model.mlpackage"))
    return {"seconds": time.perf_counter() - traced_at, "trace_seconds": traced_at - start,
            "import_seconds": imported_at - started, "rss_before_mb": rss_before}


RUNNERS = {"applec": _run_applec, "coremltools": _run_coremltools}


def child_main(job_json: str) -> None:
    job = json.loads(job_json)
    try:
        result = RUNNERS[job["tool"]](job)
    except Exception as error:  # noqa: BLE001 - the table records the failure and goes on
        result = {"error": f"{type(error).__name__}: {_first_line(str(error))}"}
    result["peak_rss_mb"] = _peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result))


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


# Parent side: schedule children, collect, summarise, print.

def measure(tool: str, model: str, onnx_path: Path, shapes: dict) -> dict:
    """Run one conversion in a fresh interpreter and return what it reported."""
    with tempfile.TemporaryDirectory(prefix="applec-bench-") as scratch:
        result_file = Path(scratch) / "result.json"
        job = {"tool": tool, "model": model, "onnx": str(onnx_path), "shapes": shapes,
               "scratch": scratch, "result": str(result_file)}
        command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False,
                                  timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {CHILD_TIMEOUT_S} s"}
        if result_file.exists():
            return json.loads(result_file.read_text())
        tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
        return {"error": f"child exited with code {done.returncode}: {tail[0]}"}


def benchmark(models: list[str], runs: int, cache: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from _models import MODELS, export_onnx, onnx_path

    figures = {}
    for name in models:
        spec = MODELS[name]
        cached = onnx_path(spec, cache).exists()
        start = time.perf_counter()
        path = export_onnx(spec, cache)
        export_s = None if cached else round(time.perf_counter() - start, 2)
        shapes = {key: list(value) for key, value in spec.shapes().items()}
        samples = {tool: [] for tool in TOOLS}
        for run in range(runs):
            for tool in TOOLS:
                if samples[tool] and "error" in samples[tool][-1]:
                    continue  # a compile that failed once fails again; do not wait for it
                sample = measure(tool, name, path, shapes)
                samples[tool].append(sample)
                shown = sample.get("error") or f"{sample['seconds']:.2f} s"
                print(f"[{name} {run + 1}/{runs}] {tool}: {shown}", file=sys.stderr, flush=True)
        figures[name] = {"onnx": str(path), "onnx_export_seconds": export_s,
                         "samples": samples, "summary": summarise(samples)}
    return figures


def summarise(samples: dict[str, list[dict]]) -> dict:
    summary = {}
    for tool, runs in samples.items():
        failed = [run["error"] for run in runs if "error" in run]
        if failed or not runs:
            summary[tool] = {"error": failed[0] if failed else "not run"}
            continue
        entry = {"seconds": _median(runs, "seconds"), "peak_rss_mb": _median(runs, "peak_rss_mb"),
                 "import_seconds": _median(runs, "import_seconds")}
        if tool == "coremltools":
            entry["trace_seconds"] = _median(runs, "trace_seconds")
        if tool == "applec":
            entry["stages"] = {stage: round(statistics.median(r["stages"][stage] for r in runs), 3)
                               for stage in runs[0]["stages"]}
        summary[tool] = entry
    ours, theirs = summary.get("applec", {}), summary.get("coremltools", {})
    if "seconds" in ours and "seconds" in theirs:
        summary["ratio"] = round(ours["seconds"] / theirs["seconds"], 3)
    return summary


def _median(runs: list[dict], key: str) -> float:
    return round(statistics.median(run[key] for run in runs), 3)


def markdown(figures: dict, runs: int) -> str:
    header = ("| model | applec s | coremltools s | applec / coremltools | applec peak RSS MB "
              "| coremltools peak RSS MB | applec stages (s) |")
    rows = [header, "|---|---|---|---|---|---|---|"]
    traces, imports, verdicts = [], [], []
    for name, model in figures.items():
        ours, theirs = model["summary"]["applec"], model["summary"]["coremltools"]
        ratio = model["summary"].get("ratio")
        stages = " · ".join(f"{k} {v:.2f}" for k, v in ours.get("stages", {}).items())
        rows.append(f"| {name} | {_cell(ours, 'seconds', '.2f')} | {_cell(theirs, 'seconds', '.2f')}"
                    f" | {f'{ratio:.2f}x' if ratio else '—'} | {_cell(ours, 'peak_rss_mb', '.0f')}"
                    f" | {_cell(theirs, 'peak_rss_mb', '.0f')} | {stages or '—'} |")
        if "trace_seconds" in theirs:
            traces.append(f"{name} {theirs['trace_seconds']:.2f} s")
        if "import_seconds" in ours and "import_seconds" in theirs:
            imports.append(f"{name} {ours['import_seconds']:.2f} s / "
                           f"{theirs['import_seconds']:.2f} s")
        if ratio:
            verdicts.append(f"{name} {'met' if ratio <= GOAL_RATIO else 'missed'} ({ratio:.2f}x)")
    notes = [f"Medians of {runs} run(s), each in a fresh process."]
    if traces:
        notes.append(f"coremltools s excludes torch.jit.trace: {', '.join(traces)}.")
    if imports:
        notes.append(f"Imports, untimed above (applec / coremltools): {', '.join(imports)}.")
    if verdicts:
        notes.append(f"Goal applec <= {GOAL_RATIO}x coremltools: {', '.join(verdicts)}.")
    return "\n".join(rows + ["", " ".join(notes)])


def _cell(entry: dict, key: str, spec: str) -> str:
    if "error" in entry:  # the time column carries the error line, the others a dash
        return f"FAILED: {entry['error']}".replace("|", "\\|") if key == "seconds" else "—"
    return format(entry[key], spec)


def environment() -> dict:
    # Versions from package metadata: importing coremltools here would only add noise.
    from importlib.metadata import version

    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": os.cpu_count(), "applec": version("applec"),
            "coremltools": version("coremltools"), "torch": version("torch"),
            "target": TARGET, "precision": "fp16"}


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(HERE))
    from _models import DEFAULT_CACHE, MODELS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="repetitions per tool (median shown)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="ONNX export cache")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")

    start = time.perf_counter()
    figures = benchmark(args.models, args.runs, args.cache)
    total = time.perf_counter() - start
    print(markdown(figures, args.runs))
    print(f"\nEnd to end: {total:.0f} s.")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "runs": args.runs,
                                         "total_seconds": round(total, 1),
                                         "models": figures}, indent=2))


if __name__ == "__main__":
    # The hidden child mode runs before anything imports torch, so applec's RSS excludes it.
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        main()
