"""The `applec` command line: compile, run, validate, inspect, targets.

Exit codes: 0 ok, 1 validation mismatch, 2 user error (bad file, bad argument, unsupported
op). User errors print one red line on stderr, never a traceback. `--json` prints one JSON
document on stdout and nothing else there.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

logging.getLogger("coremltools").setLevel(logging.ERROR)  # "Failed to load ..." off macOS

from . import __version__  # noqa: E402
from .errors import ApplecError, InputError, ValidationMismatch  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="applec: compile ONNX models into bundles for Apple Silicon.")
out = Console()
err = Console(stderr=True)


def emit_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(type(value).__name__)


def parse_inputs(items: list[str]) -> dict[str, np.ndarray] | list[np.ndarray]:
    """NAME=FILE.npy pairs (a dict), or one bare FILE.npy (a one-element list)."""
    named, bare = {}, []
    for item in items:
        name, sep, file = item.partition("=")
        if not sep:
            name, file = None, item
        path = Path(file)
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise InputError(f"--input {item}: no such file") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"--input {item}: not a .npy array ({exc})") from None
        if not isinstance(array, np.ndarray):
            raise InputError(f"--input {item}: expected a .npy array, got an .npz archive")
        if name is None:
            bare.append(array)
        else:
            named[name] = array
    if bare and (named or len(bare) > 1):
        raise InputError("--input FILE.npy without a name works only for one input; use "
                         "NAME=FILE.npy")
    return bare if bare else named


def resolve_feeds(loaded, items: list[str]) -> dict[str, np.ndarray]:
    parsed = parse_inputs(items)
    if isinstance(parsed, list):
        if len(loaded.inputs) != 1:
            names = ", ".join(s["name"] for s in loaded.inputs)
            raise InputError(f"the model has {len(loaded.inputs)} inputs ({names}); pass "
                             "--input NAME=FILE.npy for each")
        return {loaded.inputs[0]["name"]: parsed[0]}
    return parsed


# -- compile -------------------------------------------------------------------------------
@app.command()
def compile(
    model: Path = typer.Argument(..., help="ONNX model file"),
    output: Path = typer.Option(..., "--output", "-o", help="bundle directory to write"),
    target: str = typer.Option("m2", "--target", "-t", help="chip profile (applec targets)"),
    precision: str = typer.Option("fp16", help="fp16 (Neural Engine) or fp32"),
    shape: list[str] = typer.Option([], "--shape", help="NAME=DxDx... for dynamic inputs"),
    report: bool = typer.Option(False, "--report", help="print what every pass changed"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
    deployment_target: str | None = typer.Option(
        None, "--deployment-target", help="CoreML target (macOS14...); default: the chip's"),
    quantize: str | None = typer.Option(
        None, "--quantize", help="compress weights: int8 | int4 | palette4"),
    block_size: int | None = typer.Option(
        None, "--block-size", help="int4: input channels per scale (default 32)"),
    quantize_min_size: int | None = typer.Option(
        None, "--quantize-min-size", help="smallest weight quantized, in elements (2048)"),
    quantize_embeddings: str | None = typer.Option(
        None, "--quantize-embeddings",
        help="embedding tables: int8 | int4 | palette4 | float (default: int8 under int4, "
             "else the --quantize mode)"),
    disable_pass: list[str] = typer.Option(
        [], "--disable-pass",
        help="skip a pass (repeatable; 'fusions' skips every fuse_* pass)"),
    calibration: Path | None = typer.Option(
        None, "--calibration",
        help="FEEDS.npz of samples per input: GPTQ rounding, and fp16 safety"),
    fp16_check: bool = typer.Option(
        True, "--fp16-check/--no-fp16-check",
        help="fp16 without --calibration: check activation ranges on a random input and "
             "keep what fp16 cannot hold in fp32"),
):
    """Compile MODEL.onnx into a bundle."""
    from .compiler import compile_model
    from .onnx_import import parse_shape_override

    shapes = dict(parse_shape_override(s) for s in shape)
    options = {"deployment_target": deployment_target, "quantize": quantize,
               "block_size": block_size, "quantize_min_size": quantize_min_size,
               "quantize_embeddings": quantize_embeddings, "disable_passes": disable_pass,
               "calibration": calibration, "fp16_check": fp16_check}
    stages_done = []

    def on_stage(stage: str, detail: str) -> None:
        stages_done.append(stage)
        if not as_json:
            err.print(f"[green]✓[/] {stage:<10} {detail}")

    if as_json:
        result = compile_model(model, output=output, target=target, precision=precision,
                               shapes=shapes, on_stage=on_stage, **options)
        summary = dict(result.summary(), passes=result.report["passes"])
        if "quantization" in result.report:
            summary["quantization"] = quantization_summary(result.report["quantization"])
        if "fp16_safety" in result.report:
            safety = result.report["fp16_safety"]
            summary["fp16_safety"] = {"values": safety["values"],
                                      "fp32_nodes": len(safety["fp32_nodes"])}
        emit_json(summary)
        return
    with err.status(f"compiling {model} for {target} ({precision})"):
        result = compile_model(model, output=output, target=target, precision=precision,
                               shapes=shapes, on_stage=on_stage, **options)
    summary = result.summary()
    table = Table(title=f"{model.name} -> {output}", title_justify="left")
    table.add_column("partition")
    table.add_column("backend")
    table.add_column("ops", justify="right")
    for part in summary["partitions"]:
        table.add_row(part["id"], part["backend"], str(part["mil_ops"]))
    out.print(table)
    statuses = ", ".join(f"{n} {s}" for s, n in sorted(summary["node_status"].items()))
    out.print(f"ONNX nodes: {summary['onnx_nodes']} ({statuses}); bundle "
              f"{summary['bundle_bytes'] / 1e6:.2f} MB; {sum(result.seconds.values()):.2f} s")
    if report:
        for record in result.report["passes"]:
            out.print(f"  {record['pass']}: {record['rewrites']} rewrites")
    for note in result.report["notes"]:
        err.print(f"[yellow]note:[/] {note}")
    if "quantization" in result.report:
        print_quantization(result.report["quantization"])
    if "fp16_safety" in result.report:
        print_fp16_safety(result.report["fp16_safety"])


def quantization_summary(q: dict) -> dict:
    keys = ("mode", "block_size", "method", "inputs", "weights", "outputs", "warnings")
    return dict({k: q[k] for k in keys}, skipped=len(q["skipped"]))


def print_fp16_safety(safety: dict) -> None:
    values, kept = safety["values"], safety["fp32_nodes"]
    if not values:
        if safety["source"] == "calibration":
            out.print(f"fp16 safety: every activation fits fp16 on {safety['samples']} "
                      "calibration sample(s)")
        return
    shown = ", ".join(f"{name} ({v['kind']} {v['peak']:g})"
                      for name, v in list(values.items())[:4])
    more = f" and {len(values) - 4} more" if len(values) > 4 else ""
    on = {"calibration": f" on {safety['samples']} calibration sample(s)",
          "random": f" on {safety['samples']} random sample(s); --calibration checks real "
                    "data"}.get(safety["source"], "")
    out.print(f"fp16 safety: {len(values)} activation(s) fp16 cannot hold{on}: {shown}{more}; "
              f"{len(kept)} op(s) kept in fp32 (report.json: fp16_safety)")


def print_quantization(q: dict) -> None:
    w = q["weights"]
    out.print(f"quantized {q['mode']} ({q['method']}): {w['layers']} weights, "
              f"{w['float_bytes'] / 1e6:.2f} MB -> {w['quantized_bytes'] / 1e6:.2f} MB "
              f"(x{w['ratio'] or 0:.2f})")
    table = Table(title=f"vs unquantized, {q['inputs']}", title_justify="left")
    for column in ("output", "cosine", "SNR dB"):
        table.add_column(column)
    for name, o in q["outputs"].items():
        if "cosine" in o:
            table.add_row(name, f"{o['cosine']:.5f}", f"{o['snr_db']:.1f}")
        else:
            table.add_row(name, f"{1 - o['mismatch']:.4f} equal", "-")
    out.print(table)
    if q["skipped"]:
        out.print(f"kept float: {len(q['skipped'])} weight(s) (report.json: quantization.skipped)")
    for warning in q["warnings"]:
        err.print(f"[yellow]warning:[/] {warning}")


# -- run -------------------------------------------------------------------------------------
@app.command()
def run(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    input: list[str] = typer.Option([], "--input", "-i", help="NAME=FILE.npy, or FILE.npy"),
    output: Path | None = typer.Option(None, "--output", "-o", help="write outputs (.npz)"),
    backend: str = typer.Option("auto", help="auto | reference | native"),
    compute_units: str = typer.Option("all", help="native CoreML: all | cpu | cpu_gpu | cpu_ne"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON summary"),
):
    """Run a bundle on inputs given as .npy files."""
    from .runtime import load

    loaded = load(bundle, backend=backend, compute_units=compute_units)
    if not input:
        raise InputError("no --input given; the model takes: " + ", ".join(
            f"{s['name']} {s['dtype']}{s['shape']}" for s in loaded.inputs))
    feeds = resolve_feeds(loaded, input)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = loaded.run(feeds)
    if output is not None:
        with open(output, "wb") as f:
            np.savez(f, **outputs)
    summary = {name: {"dtype": a.dtype.name, "shape": list(a.shape),
                      "min": _stat(a, np.min), "max": _stat(a, np.max),
                      "mean": _stat(a, np.mean),
                      "argmax": int(np.argmax(a)) if a.size else None}
               for name, a in outputs.items()}
    if as_json:
        emit_json({"bundle": str(bundle), "outputs": summary,
                   "written": str(output) if output else None})
        return
    for warning in caught:
        err.print(f"[yellow]warning:[/] {warning.message}")
    table = Table(title=f"outputs of {bundle}", title_justify="left")
    for column in ("output", "dtype", "shape", "min", "max", "mean", "argmax"):
        table.add_column(column)
    for name, s in summary.items():
        table.add_row(name, s["dtype"], "x".join(map(str, s["shape"])), _fmt(s["min"]),
                      _fmt(s["max"]), _fmt(s["mean"]), str(s["argmax"]))
    out.print(table)
    if output is not None:
        out.print(f"wrote {output}")


def _stat(array: np.ndarray, fn) -> float | None:
    return float(fn(array.astype(np.float64))) if array.size else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.6g}"


# -- validate --------------------------------------------------------------------------------
@app.command()
def validate(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    onnx: Path = typer.Option(..., "--onnx", help="the original ONNX model"),
    input: list[str] = typer.Option([], "--input", "-i", help="NAME=FILE.npy, or FILE.npy"),
    backend: str = typer.Option("auto", help="auto | reference | native"),
    seed: int = typer.Option(0, help="seed of the random inputs used when none are given"),
    as_json: bool = typer.Option(False, "--json", help="print a JSON report"),
):
    """Compare a bundle's outputs with onnxruntime on the original model."""
    from .runtime import load
    from .validate import TOLERANCE, validate_bundle

    loaded = load(bundle, backend=backend)  # verified once, for the inputs and the run
    feeds = resolve_feeds(loaded, input) if input else None
    report = validate_bundle(loaded, onnx, inputs=feeds, seed=seed)
    if as_json:
        emit_json(report.to_json())
    else:
        table = Table(title=f"{bundle} vs onnxruntime ({report.precision}, tolerance "
                            f"{TOLERANCE[report.precision]})", title_justify="left")
        for column in ("output", "max abs", "max rel", "cosine", "ok"):
            table.add_column(column)
        for c in report.checks:
            table.add_row(c.name, f"{c.max_abs:.3g}", f"{c.max_rel:.3g}", f"{c.cosine:.6f}",
                          "[green]yes[/]" if c.ok else "[red]NO[/]")
        out.print(table)
    if not report.ok:
        bad = ", ".join(c.name for c in report.checks if not c.ok)
        raise ValidationMismatch(f"{bundle}: outputs over tolerance: {bad}")


# -- inspect -------------------------------------------------------------------------------
@app.command()
def inspect(
    bundle: Path = typer.Argument(..., help="bundle directory"),
    as_json: bool = typer.Option(False, "--json", help="print manifest and report as JSON"),
):
    """Show what went where in a bundle, and why."""
    from . import bundle as bundle_format

    manifest = bundle_format.read_manifest(bundle)
    try:
        report = json.loads((bundle / bundle_format.REPORT).read_text())
    except (OSError, ValueError):
        report = {"nodes": {}, "passes": [], "notes": []}
    if as_json:
        emit_json({"manifest": manifest, "report": report})
        return
    t = manifest["target"]
    out.print(f"[bold]{bundle}[/]: {manifest['model']['source']} for {t['chip']} "
              f"({t['deployment_target']}, {t['precision']}), applec "
              f"{manifest['compiler']['version']}")
    io = Table(title="model I/O", title_justify="left")
    for column in ("", "name", "dtype", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for spec in manifest["model"][kind]:
            io.add_row(kind[:-1], spec["name"], spec["dtype"], "x".join(map(str, spec["shape"])))
    out.print(io)
    parts = Table(title="partitions", title_justify="left")
    for column in ("id", "backend", "artifact", "ops", "inputs", "outputs"):
        parts.add_column(column)
    for p in manifest["partitions"]:
        parts.add_row(p["id"], p["backend"], p["artifact"], str(p.get("op_count", "")),
                      ", ".join(x["tensor"] for x in p["inputs"]),
                      ", ".join(x["tensor"] for x in p["outputs"]))
    out.print(parts)
    counts: dict[str, int] = {}
    for entry in report["nodes"].values():
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    nodes = Table(title="ONNX nodes, in graph order: " + ", ".join(
        f"{n} {s}" for s, n in sorted(counts.items())), title_justify="left")
    for column in ("node", "op", "status", "where", "why / MIL ops"):
        nodes.add_column(column)
    ordered = sorted(report["nodes"].items(), key=lambda item: item[1].get("index", 0))
    for name, entry in ordered:
        why = " ".join(entry.get("mil_ops", [])) or entry.get("reason", "")
        nodes.add_row(name, entry["op_type"], entry["status"], entry.get("partition", "-"), why)
    out.print(nodes)
    for note in report.get("notes", []):
        out.print(f"[yellow]note:[/] {note}")


# -- targets -------------------------------------------------------------------------------
@app.command()
def targets(as_json: bool = typer.Option(False, "--json", help="print the profiles as JSON")):
    """List the chip profiles applec compiles for."""
    from applec.targets.profiles import list_profiles

    from .targets_table import profiles_json, profiles_table

    profiles = list_profiles()
    if as_json:
        emit_json(profiles_json(profiles))
    else:
        out.print(profiles_table(profiles))


@app.command(hidden=True)
def version():
    """Print applec's version."""
    out.print(f"applec {__version__}")


# -- entry point -----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (the console script passes it to sys.exit)."""
    command = typer.main.get_command(app)
    try:
        # standalone mode: usage errors print their message and exit 2, as typer does
        command.main(args=argv, prog_name="applec", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except ApplecError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return exc.exit_code
    except KeyboardInterrupt:
        err.print("[red]error:[/] interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
