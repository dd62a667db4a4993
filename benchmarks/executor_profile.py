"""Where does the CoreML reference executor spend its time? A profiler for corpus models.

Compiles each corpus model once per precision (the recipes of `corpus.py`) into a bundle
cache, then, in this process:

- `time`: reference executor and onnxruntime on the same feeds at the same thread count,
  one warm-up each, then `--runs` alternating timed runs; medians and their ratio.
- `ops`: time per MIL op type (the op's numpy reference, inputs and casts excluded) and
  what is left, i.e. the executor's own per-op overhead; top `--top` rows.
- `cprofile`: cProfile of `--runs` runs, sorted by internal time; top `--top` rows.

    python benchmarks/executor_profile.py time --models hf_gpt2,ppocr_mobile_v2_cls
    python benchmarks/executor_profile.py ops --models hf_gpt2 --precisions fp16
    python benchmarks/executor_profile.py cprofile --models ppocr_mobile_v2_cls

Thread variables are set from `--threads` before numpy is imported (default 1, as in
`corpus.py`). Bundles live in `--bundles` (default ~/.cache/applec/executor-profile);
delete one to recompile it after a compiler change.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLES = Path("~/.cache/applec/executor-profile")


def bundle_for(name: str, entry: dict, precision: str, cache: Path):
    """(bundle directory, feeds) for one corpus model, compiling it if it is not cached."""
    from corpus import RECIPES, TARGET, make_feeds, onnx_inputs

    feeds = make_feeds(onnx_inputs(entry["path"]), RECIPES.get(name, {}))
    bundle = cache / f"{name}-{precision}"
    if not (bundle / "manifest.json").exists():
        import applec

        shapes = {key: tuple(array.shape) for key, array in feeds.items()}
        applec.compile(entry["path"], output=str(bundle), target=TARGET, precision=precision,
                       shapes=shapes)
    return bundle, feeds


def ort_session(path: str, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: session.run(names, feeds)


def time_model(model, onnx_path: str, feeds: dict, args) -> str:
    ort = ort_session(onnx_path, args.threads)
    sides = {"reference": lambda: model.run(feeds), "onnxruntime": lambda: ort(feeds)}
    for call in sides.values():
        call()  # warm-up
    times = {side: [] for side in sides}
    for _ in range(args.runs):  # alternating, so machine noise falls on both
        for side, call in sides.items():
            start = time.perf_counter()
            call()
            times[side].append(time.perf_counter() - start)
    ref, ort_s = statistics.median(times["reference"]), statistics.median(times["onnxruntime"])
    return f"ref {ref * 1e3:8.1f} ms  ort {ort_s * 1e3:8.1f} ms  ratio {ref / ort_s:5.2f}x"


def ops_model(model, feeds: dict, args) -> str:
    """Wrap every MIL_OPS entry with a timer; the rest of each run is executor overhead."""
    from applec.runtime import mil_ops

    spent: dict[str, list[float]] = {}
    real = dict(mil_ops.MIL_OPS)

    def timed(op_type, fn):
        def call(a, outs):
            start = time.perf_counter()
            try:
                return fn(a, outs)
            finally:
                entry = spent.setdefault(op_type, [0.0, 0])
                entry[0] += time.perf_counter() - start
                entry[1] += 1
        return call

    model.run(feeds)  # warm-up
    mil_ops.MIL_OPS.update({k: timed(k, fn) for k, fn in real.items()})
    try:
        start = time.perf_counter()
        for _ in range(args.runs):
            model.run(feeds)
        total = (time.perf_counter() - start) / args.runs
    finally:
        mil_ops.MIL_OPS.update(real)
    rows = sorted(((s / args.runs, n // args.runs, k) for k, (s, n) in spent.items()),
                  reverse=True)
    in_ops = sum(s for s, _, _ in rows)
    lines = [(f"total {total * 1e3:.1f} ms per run; in ops {in_ops * 1e3:.1f} ms; "
              f"executor overhead {(total - in_ops) * 1e3:.1f} ms over "
              f"{sum(n for _, n, _ in rows)} op calls")]
    lines += [f"  {k:32s} {n:6d} calls {s * 1e3:9.2f} ms" for s, n, k in rows[:args.top]]
    return "\n".join(lines)


def cprofile_model(model, feeds: dict, args) -> str:
    import cProfile
    import io
    import pstats

    model.run(feeds)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(args.runs):
        model.run(feeds)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("time", "ops", "cprofile"))
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    parser.add_argument("--precisions", default="fp32,fp16")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--bundles", type=Path, default=DEFAULT_BUNDLES)
    parser.add_argument("--cache", type=Path, default=None, help="corpus cache (fetch_corpus)")
    args = parser.parse_args(argv)
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[variable] = str(args.threads)  # before numpy loads its BLAS
    sys.modules.setdefault("torch", None)  # coremltools would import it just because it can
    sys.path.insert(0, str(HERE))
    from fetch_corpus import DEFAULT_CACHE, load_manifest

    import applec

    manifest = load_manifest((args.cache or DEFAULT_CACHE).expanduser())
    models = args.models.split(",") if args.models else list(manifest)
    cache = args.bundles.expanduser()
    for name in models:
        for precision in args.precisions.split(","):
            try:
                bundle, feeds = bundle_for(name, manifest[name], precision, cache)
            except Exception as error:  # noqa: BLE001 - report and go on
                print(f"{name} {precision}: cannot compile: {error}", flush=True)
                continue
            model = applec.load(str(bundle), backend="reference")
            if args.mode == "time":
                text = time_model(model, manifest[name]["path"], feeds, args)
            elif args.mode == "ops":
                text = "\n" + ops_model(model, feeds, args)
            else:
                text = "\n" + cprofile_model(model, feeds, args)
            print(f"{name:28s} {precision} {text}", flush=True)


if __name__ == "__main__":
    main()
