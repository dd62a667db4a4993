"""The bundle: a directory holding a manifest, a report and one artifact per partition.

    bundle/
      manifest.json        format, compiler, target, model I/O, partitions, sha256 of files
      report.json          where every ONNX node went and why; what each pass did
      partitions/p0.mlpackage/...

Writing is atomic: everything goes to a staging directory beside the destination, which is
renamed into place only when complete; a failed or interrupted compile removes the staging
directory and leaves an existing bundle untouched. Nothing time- or machine-dependent is
written, so the same model and options give byte-identical bundles.

Reading verifies before anything runs: the manifest's format, that every path stays inside
the bundle, that every file's sha256 matches, and that artifact folders hold no unlisted
file. See docs/bundle-format.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from .errors import BundleError

FORMAT = "applec-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
REPORT = "report.json"


def dump_json(data) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the manifest, keyed by POSIX relative path."""
    return {p.relative_to(root).as_posix(): sha256_file(p)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p != root / MANIFEST}


def is_bundle(path: Path) -> bool:
    try:
        return json.loads((path / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def staged_directory(dest: Path):
    """Yield an empty staging directory; on success it replaces `dest` atomically."""
    dest = Path(dest)
    if dest.exists() and not (dest.is_dir() and (is_bundle(dest) or not any(dest.iterdir()))):
        raise BundleError(f"{dest}: exists and is not an applec bundle; refusing to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.staging-", dir=dest.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rename(dest, old / "bundle")
            os.rename(staging, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def finish(root: Path, manifest: dict, report: dict) -> dict:
    """Write report.json, then the manifest with the sha256 of every other file."""
    (root / REPORT).write_text(dump_json(report))
    manifest = dict(manifest, files=file_hashes(root))
    (root / MANIFEST).write_text(dump_json(manifest))
    return manifest


# -- reading -------------------------------------------------------------------------------
def safe_path(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, refusing anything that could leave the bundle."""
    posix = PurePosixPath(relative)
    if not relative or posix.is_absolute() or ".." in posix.parts or "\\" in relative:
        raise BundleError(f"{root}: {what} path '{relative}' points outside the bundle")
    path = root / Path(*posix.parts)
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise BundleError(f"{root}: {what} path '{relative}' points outside the bundle")
    return path


def read_manifest(root: Path, verify: bool = True) -> dict:
    """Load and verify a bundle's manifest; every problem is a one-line BundleError."""
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"{root}: no such bundle directory")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        raise BundleError(f"{root}: not an applec bundle (no {MANIFEST})") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root}: {MANIFEST} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{root}: not an applec bundle (format is not '{FORMAT}')")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"{root}: bundle format version {manifest.get('format_version')} "
                          f"is not supported (this applec reads {FORMAT_VERSION})")
    for key in ("model", "partitions", "files", "target"):
        if key not in manifest:
            raise BundleError(f"{root}: {MANIFEST} has no '{key}'")
    if verify:
        verify_files(root, manifest)
    return manifest


def verify_files(root: Path, manifest: dict) -> None:
    files: dict[str, str] = manifest["files"]
    for relative, expected in files.items():
        path = safe_path(root, relative, "file")
        if not path.is_file():
            raise BundleError(f"{root}: file '{relative}' listed in the manifest is missing")
        if sha256_file(path) != expected:
            raise BundleError(f"{root}: file '{relative}' does not match its sha256 in the "
                              "manifest (the bundle was modified or corrupted)")
    for part in manifest["partitions"]:
        artifact = safe_path(root, part.get("artifact", ""), "artifact")
        if not artifact.exists():
            raise BundleError(f"{root}: artifact '{part['artifact']}' is missing")
        listed = [p for p in artifact.rglob("*") if p.is_file()] if artifact.is_dir() \
            else [artifact]
        for path in listed:
            relative = path.relative_to(root).as_posix()
            if relative not in files:
                raise BundleError(f"{root}: file '{relative}' is not listed in the manifest")
