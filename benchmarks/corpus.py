"""Compile and check every corpus model: does applec compile it, how fast, how close.

For each model fetched by `fetch_corpus.py` (see `corpus.json` in the cache) and each
precision (fp32, fp16), two fresh child processes:

1. compile: `applec.compile(onnx, target="m2", precision=P, shapes=recipe shapes)`. Timed
   from the call to the finished bundle; peak RSS is the child's high-water mark (VmHWM on
   Linux, ru_maxrss elsewhere; imports included). A failure is recorded with its first
   error line and, for an exception that is not an `ApplecError` (a bug, not a user
   error), the innermost applec frame.
2. run: the bundle on the reference executor next to onnxruntime on the ONNX file, on the
   same seeded inputs, at the same thread count (OMP/MKL/OpenBLAS threads and onnxruntime's
   intra-op threads all set to `--threads`, default 1). One untimed warm-up each (its
   outputs are the ones compared), then `--runs` timed runs alternating reference and
   onnxruntime; medians. A model whose warm-up took longer than `--slow` seconds gets one
   timed run. Per output: max relative error (max |got - want| / max |want|) and cosine
   against onnxruntime; the table shows the worst output.

Inputs come from `RECIPES`, one row per model: shapes for the dynamic dims and value ranges
that the model accepts (token ids inside the vocabulary, audio in [-1, 1], byte values,
silero's sample rate). A model without a row gets its declared shape with dynamic dims = 1
and N(0, 1) / [0, 10) values.

    python benchmarks/corpus.py                          # everything, fp32 and fp16
    python benchmarks/corpus.py --models silero_vad,magika_standard_v3_3 --precisions fp32
    python benchmarks/corpus.py --json corpus.json --threads 2 --runs 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TARGET = "m2"
PRECISIONS = ("fp32", "fp16")
MATCH = {"fp32": ("max_rel", 1e-3), "fp16": ("cosine", 0.999)}  # this report's bar
SEED = 0
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


# -- input recipes -------------------------------------------------------------------------

@dataclass(frozen=True)
class Feed:
    """One input: its shape (dynamic dims filled in) and how its values are drawn."""

    shape: tuple[int, ...]
    values: str  # normal | audio | state | ids:HIGH | padded_mask | fill:VALUE
    dtype: str | None = None  # None: the dtype the model declares


def _image(h: int = 224, w: int = 224) -> Feed:
    return Feed((1, 3, h, w), "normal")  # normalised pixels are about N(0, 1)


_SILERO_CHUNK = Feed((1, 576), "audio")  # 512 samples at 16 kHz + 64 of context (v5+)
_SILERO_STATE = Feed((2, 1, 128), "state")
_SILERO_SR = Feed((), "fill:16000", "int64")
_TOKENS_128 = {"input_ids": Feed((1, 128), "ids:30522"),
               "attention_mask": Feed((1, 128), "padded_mask")}
_LIGHT = {"data_0": _image(), "gpu_0/data_0": _image()}

RECIPES: dict[str, dict[str, Feed]] = {
    "magika_standard_v3_3": {"bytes": Feed((1, 2048), "ids:256")},  # file bytes 0..255
    # OCR det takes any multiple of 32; 640x640 is heavy for the numpy executor.
    "ppocrv6_det_small": {"x": _image(320, 320)},
    "ppocrv6_rec_small": {"x": Feed((1, 3, 48, 320), "normal")},  # text line, height 48
    "ppocr_mobile_v2_cls": {"x": Feed((1, 3, 48, 192), "normal")},  # rapidocr's cls size
    "silero_vad": {"input": _SILERO_CHUNK, "state": _SILERO_STATE, "sr": _SILERO_SR},
    "silero_vad_16k_op15": {"input": _SILERO_CHUNK, "state": _SILERO_STATE,
                            "sr": _SILERO_SR},
    "silero_vad_half": {"input": _SILERO_CHUNK, "state": _SILERO_STATE},
    "silero_vad_op18_ifless": {"input": _SILERO_CHUNK, "state": _SILERO_STATE,
                               "sr": _SILERO_SR},
    "silero_vad_16k_sequence": {"input": Feed((4, 576), "audio"),  # 4 chunks in sequence
                                "h": Feed((1, 1, 128), "state"),
                                "c": Feed((1, 1, 128), "state")},
    "silero_vad_openvino_16k": {"input": _SILERO_CHUNK, "state": _SILERO_STATE},
    **{f"onnx_light_{net}": _LIGHT for net in (
        "bvlc_alexnet", "densenet121", "inception_v1", "inception_v2", "resnet50",
        "shufflenet", "squeezenet", "vgg19", "zfnet512")},
    "minilm_l6_ts": _TOKENS_128,
    "minilm_l6_dynamo": _TOKENS_128,
    "hf_bert_base": _TOKENS_128,
    "hf_gpt2": {"input_ids": Feed((1, 64), "ids:50257"),
                "attention_mask": Feed((1, 64), "padded_mask")},
    "hf_vit_b16": {"pixel_values": _image()},
    "hf_resnet50": {"pixel_values": _image()},
    "hf_mobilenet_v2": {"pixel_values": _image()},
    "hf_whisper_tiny_encoder": {"input_features": Feed((1, 80, 3000), "normal")},  # log-mel
}


def make_feeds(model_inputs: list[dict], recipe: dict[str, Feed], seed: int = SEED) -> dict:
    """Seeded arrays for `model_inputs` ([{name, dtype, shape}], dynamic dims as None)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in model_inputs:
        feed = recipe.get(spec["name"]) or Feed(tuple(d or 1 for d in spec["shape"]), "default")
        dtype = np.dtype(feed.dtype or spec["dtype"])
        kind, _, arg = feed.values.partition(":")
        if kind == "fill":
            array = np.full(feed.shape, float(arg))
        elif kind == "ids":
            array = rng.integers(0, int(arg), size=feed.shape)
        elif kind == "padded_mask":  # the last quarter of the sequence is padding
            array = np.ones(feed.shape)
            array[..., feed.shape[-1] * 3 // 4:] = 0
        elif kind == "audio":
            array = rng.uniform(-1.0, 1.0, feed.shape)
        elif kind == "state":
            array = rng.uniform(-0.5, 0.5, feed.shape)
        elif dtype.kind == "f":  # normal, default
            array = rng.standard_normal(feed.shape)
        elif dtype.kind == "b":
            array = rng.random(feed.shape) < 0.5
        else:
            array = rng.integers(0, 10, size=feed.shape)
        feeds[spec["name"]] = np.asarray(array).astype(dtype)
    return feeds


def onnx_inputs(path: str) -> list[dict]:
    """The graph inputs that are not initializers: name, numpy dtype, dims (None if dynamic)."""
    import onnx
    from onnx import helper

    model = onnx.load(path, load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                for d in tensor.shape.dim]
        specs.append({"name": value.name, "shape": dims,
                      "dtype": helper.tensor_dtype_to_np_dtype(tensor.elem_type).name})
    return specs


# -- child side: one compile, or one run, per process --------------------------------------

def _peak_rss_mb() -> float:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _measure import peak_rss_mb

    return peak_rss_mb()


def _child_compile(job: dict) -> dict:
    import coremltools  # noqa: F401 - applec imports it lazily while lowering; keep it untimed

    import applec

    shapes = {name: tuple(shape) for name, shape in job["shapes"].items()}
    rss_before = _peak_rss_mb()
    start = time.perf_counter()
    result = applec.compile(job["onnx"], output=job["bundle"], target=TARGET,
                            precision=job["precision"], shapes=shapes)
    seconds = time.perf_counter() - start
    summary = result.summary()
    return {"seconds": seconds, "stages": result.seconds, "rss_before_mb": rss_before,
            "bundle_bytes": summary["bundle_bytes"], "mil_ops": summary["partitions"][0]["mil_ops"],
            "onnx_nodes": summary["onnx_nodes"]}


def _child_run(job: dict) -> dict:
    import numpy as np
    import onnxruntime as ort

    import applec
    from applec.validate import compare

    feeds = {name: np.load(path) for name, path in job["feeds"].items()}
    threads = job["threads"]
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(job["onnx"], options, providers=["CPUExecutionProvider"])
    ort_names = [o.name for o in session.get_outputs()]
    start = time.perf_counter()
    model = applec.load(job["bundle"], backend="reference")
    load_seconds = time.perf_counter() - start

    def reference():
        return model.run(feeds)

    def onnxruntime():
        return dict(zip(ort_names, session.run(ort_names, feeds)))

    warm = {}
    for side, call in (("reference", reference), ("onnxruntime", onnxruntime)):
        start = time.perf_counter()
        warm[side] = (call(), time.perf_counter() - start)
    slow = max(seconds for _, seconds in warm.values()) > job["slow"]
    runs = 1 if slow else job["runs"]
    times = {"reference": [], "onnxruntime": []}
    for _ in range(runs):  # alternating, so machine noise falls on both
        for side, call in (("reference", reference), ("onnxruntime", onnxruntime)):
            start = time.perf_counter()
            call()
            times[side].append(time.perf_counter() - start)
    got, want = warm["reference"][0], warm["onnxruntime"][0]
    checks = []
    for spec in model.outputs:
        check = compare(spec["name"], got[spec["name"]], want[spec["name"]], job["precision"])
        checks.append({key: (None if value is None else
                             value if isinstance(value, (str, bool)) else float(value))
                       for key, value in check.to_json().items()})
    return {"runs": runs, "load_seconds": load_seconds, "times": times,
            "warmup": {side: seconds for side, (_, seconds) in warm.items()},
            "reference_seconds": statistics.median(times["reference"]),
            "onnxruntime_seconds": statistics.median(times["onnxruntime"]),
            "outputs": checks}


CHILDREN = {"compile": _child_compile, "run": _child_run}


def child_main(job_json: str) -> None:
    # Neither side needs torch; coremltools would import it just because it is installed.
    sys.modules["torch"] = None
    job = json.loads(job_json)
    try:
        result = CHILDREN[job["kind"]](job)
    except Exception as error:  # noqa: BLE001 - the table records the failure and goes on
        result = {"error": f"{type(error).__name__}: {_first_line(str(error))}",
                  "user_error": _is_user_error(error), "where": _innermost_applec(error)}
    result["peak_rss_mb"] = _peak_rss_mb()
    Path(job["result"]).write_text(json.dumps(result))


def _is_user_error(error: Exception) -> bool:
    try:
        from applec.errors import ApplecError
    except ImportError:
        return False
    return isinstance(error, ApplecError)


def _innermost_applec(error: Exception) -> str | None:
    """'file.py:LINE in function' of the deepest frame inside applec, for bug reports."""
    root = HERE.parent
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f.filename.startswith(str(root)) and "/benchmarks/" not in f.filename]
    if not frames:
        return None
    frame = frames[-1]
    return f"{Path(frame.filename).relative_to(root)}:{frame.lineno} in {frame.name}"


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


# -- parent side ---------------------------------------------------------------------------

def run_child(job: dict, timeout: float, threads: int) -> dict:
    """One child process for `job`; returns what it reported, or the reason it did not."""
    env = dict(os.environ, **{name: str(threads) for name in THREAD_VARIABLES})
    result_file = Path(job["result"])
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "timeout": True}
    if result_file.exists():
        return json.loads(result_file.read_text())
    tail = done.stderr.strip().splitlines()[-1:] or ["(no stderr)"]
    return {"error": f"child exited with code {done.returncode}: {tail[0]}"}


def measure(name: str, entry: dict, precision: str, args) -> dict:
    """Compile and run one model at one precision; a dict for the JSON and the table."""
    import numpy as np

    specs = onnx_inputs(entry["path"])
    recipe = RECIPES.get(name, {})
    feeds = make_feeds(specs, recipe)
    shapes = {key: list(array.shape) for key, array in feeds.items()}
    record = {"model": name, "precision": precision, "shapes": shapes,
              "recipe": {key: feed.values for key, feed in recipe.items()} or "default"}
    with tempfile.TemporaryDirectory(prefix="applec-corpus-") as scratch:
        scratch = Path(scratch)
        bundle = scratch / "bundle"
        job = {"kind": "compile", "onnx": entry["path"], "bundle": str(bundle),
               "precision": precision, "shapes": shapes, "result": str(scratch / "c.json")}
        record["compile"] = run_child(job, args.timeout, args.threads)
        if "error" in record["compile"]:
            return record
        paths = {}
        for key, array in feeds.items():
            paths[key] = str(scratch / f"feed{len(paths)}.npy")
            np.save(paths[key], array)
        job = {"kind": "run", "onnx": entry["path"], "bundle": str(bundle),
               "precision": precision, "feeds": paths, "threads": args.threads,
               "runs": args.runs, "slow": args.slow, "result": str(scratch / "r.json")}
        record["run"] = run_child(job, args.timeout, args.threads)
    return record


def worst_output(record: dict) -> dict | None:
    outputs = record.get("run", {}).get("outputs")
    if not outputs:
        return None
    if record["precision"] == "fp16":
        return min(outputs, key=lambda o: (o["cosine"], -o["max_rel"]))
    return max(outputs, key=lambda o: (o["max_rel"], -o["cosine"]))


def matches(record: dict) -> bool | None:
    outputs = record.get("run", {}).get("outputs")
    if not outputs:
        return None
    key, limit = MATCH[record["precision"]]
    ok = []
    for out in outputs:
        if out["mismatch"] is not None:  # integer output: the repo's rule
            ok.append(out["ok"])
        elif key == "max_rel":
            ok.append(out["max_rel"] <= limit)
        else:
            ok.append(out["cosine"] >= limit)
    return all(ok)


def markdown(records: list[dict]) -> str:
    header = ("| model | prec | compiles | compile s | peak RSS MB | bundle MB | ref ms | ort ms "
              "| ref / ort | worst output | max rel err | cosine | match |")
    rows = [header, "|" + "---|" * 13]
    for r in records:
        comp, run = r["compile"], r.get("run", {})
        cells = [r["model"], r["precision"]]
        if "error" in comp:
            cells += [f"FAILED: {comp['error']}"] + ["—"] * 10
        else:
            cells += ["yes", f"{comp['seconds']:.2f}", f"{comp['peak_rss_mb']:.0f}",
                      f"{comp['bundle_bytes'] / 1e6:.1f}"]
            if "error" in run:
                cells += [f"RUN FAILED: {run['error']}"] + ["—"] * 6
            else:
                worst = worst_output(r)
                ref, ort = run["reference_seconds"], run["onnxruntime_seconds"]
                cells += [f"{ref * 1e3:.1f}", f"{ort * 1e3:.2f}", f"{ref / ort:.1f}x",
                          worst["name"], f"{worst['max_rel']:.2e}", f"{worst['cosine']:.6f}",
                          "yes" if matches(r) else "**no**"]
        rows.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)


def summary(records: list[dict]) -> str:
    lines = []
    for precision in PRECISIONS:
        mine = [r for r in records if r["precision"] == precision]
        if not mine:
            continue
        compiled = [r for r in mine if "error" not in r["compile"]]
        ran = [r for r in compiled if "error" not in r.get("run", {"error": 1})]
        good = [r for r in ran if matches(r)]
        ratios = [r["run"]["reference_seconds"] / r["run"]["onnxruntime_seconds"] for r in ran]
        key, limit = MATCH[precision]
        median = f"{statistics.median(ratios):.1f}x" if ratios else "—"
        lines.append(f"{precision}: {len(compiled)} of {len(mine)} compile, {len(ran)} run, "
                     f"{len(good)} match ({key} {'<=' if key == 'max_rel' else '>='} {limit}); "
                     f"median reference / onnxruntime time {median}.")
    lines.append("Failures by cause:")
    for cause, where in failure_causes(records).items():
        lines.append(f"- {cause}: " + ", ".join(where))
    return "\n".join(lines)


def failure_causes(records: list[dict]) -> dict[str, list[str]]:
    """Error lines with names and opsets blanked, most common first -> ['model (prec)']."""
    causes: dict[str, list[str]] = {}
    for r in records:
        for stage in ("compile", "run"):
            error = r.get(stage, {}).get("error")
            if error:
                cause = f"{stage}: " + re.sub(r"'[^']*'", "'…'", error)
                cause = re.sub(r"at opset [0-9]+", "at opset N", cause)
                where = r[stage].get("where")
                if where and not r[stage].get("user_error"):
                    cause += f" [at {re.sub(r':[0-9]+ ', ' ', where)}]"
                causes.setdefault(cause, []).append(f"{r['model']} ({r['precision']})")
                break
        else:
            if matches(r) is False:
                worst = worst_output(r)
                key, limit = MATCH[r["precision"]]
                causes.setdefault(f"numbers: {r['precision']} {key} beyond {limit}", []).append(
                    f"{r['model']} ({r['precision']}: '{worst['name']}' max rel "
                    f"{worst['max_rel']:.2e}, cosine {worst['cosine']:.4f})")
    return dict(sorted(causes.items(), key=lambda item: -len(item[1])))


def _git_state() -> str:
    """The commit measured, '+dirty' when the working tree has changes (it often does)."""
    def git(*command):
        return subprocess.run(["git", *command], cwd=HERE, capture_output=True, text=True,
                              check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def environment(threads: int) -> dict:
    from importlib.metadata import version

    packages = ("applec", "onnx", "onnxruntime", "coremltools", "numpy")
    return {"git": _git_state(), "python": platform.python_version(),
            "platform": platform.platform(), "cpus": os.cpu_count(),
            **{package: version(package) for package in packages},
            "target": TARGET, "threads": threads}


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(HERE))
    from fetch_corpus import DEFAULT_CACHE, load_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="the corpus cache that fetch_corpus.py filled")
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for numpy (OMP/MKL/OpenBLAS) and onnxruntime alike")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side (median)")
    parser.add_argument("--slow", type=float, default=5.0,
                        help="a warm-up longer than this many seconds means one timed run")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds per child process (compile, run)")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)

    manifest = load_manifest(args.cache.expanduser())
    if not manifest:
        parser.error(f"no corpus in {args.cache}; run benchmarks/fetch_corpus.py first")
    models = [m.strip() for m in args.models.split(",")] if args.models else list(manifest)
    unknown = [m for m in models if m not in manifest]
    if unknown:
        parser.error(f"not in the corpus: {', '.join(unknown)} (have: {', '.join(manifest)})")
    precisions = [p.strip() for p in args.precisions.split(",")]

    start = time.perf_counter()
    records = []
    for name in models:
        for precision in precisions:
            began = time.perf_counter()
            record = measure(name, manifest[name], precision, args)
            record["wall_seconds"] = round(time.perf_counter() - began, 1)
            records.append(record)
            state = record["compile"].get("error") or record.get("run", {}).get("error") or \
                f"ok, match={matches(record)}"
            print(f"[{name} {precision}] {record['wall_seconds']:.0f} s: {state}",
                  file=sys.stderr, flush=True)
            if args.json:  # written as we go, so an interrupted run keeps what it measured
                _write_json(args.json, records, args, time.perf_counter() - start)
    total = time.perf_counter() - start
    print(markdown(records))
    print()
    print(summary(records))
    print(f"\nThreads {args.threads}; medians of {args.runs} timed runs (1 when the warm-up "
          f"took > {args.slow:.0f} s). End to end: {total:.0f} s.")
    if args.json:
        _write_json(args.json, records, args, total)


def _write_json(path: Path, records: list[dict], args, total: float) -> None:
    path.write_text(json.dumps({"environment": environment(args.threads), "runs": args.runs,
                                "slow": args.slow, "timeout": args.timeout,
                                "total_seconds": round(total, 1), "records": records},
                               indent=2))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child_main(sys.argv[2])
    else:
        main()
