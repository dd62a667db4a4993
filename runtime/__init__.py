"""The runtime: load a bundle, verify it, check inputs, run its partitions in order.

    bundle = load("bundle/")            # checksums and paths verified here, once
    outputs = bundle.run({"x": x})      # by output name, in the ONNX model's dtypes

Each partition runs on an executor chosen by its backend kind and `backend=`:
- `native`: the platform's own engine (CoreML on macOS);
- `reference`: numpy executors that read the artifact from disk and run anywhere;
- `auto`: native where available, else reference.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np

from applec import bundle as bundle_format
from applec.errors import ApplecError, BundleError, InputError

BACKENDS = ("auto", "reference", "native")
INT32 = np.iinfo(np.int32)


def native_available() -> bool:
    if sys.platform != "darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


def make_executor(root: Path, partition: dict, backend: str, compute_units: str):
    kind = partition["backend"]
    path = bundle_format.safe_path(root, partition["artifact"], "artifact")
    if kind != "coreml":
        raise BundleError(f"{root}: partition '{partition['id']}' has backend '{kind}', "
                          "which this applec cannot run")
    use_native = backend == "native" or (backend == "auto" and native_available())
    if use_native:
        if not native_available():
            raise ApplecError("--backend native needs macOS with CoreML; use --backend "
                              "reference (or auto) on this machine")
        from .coreml_native import NativeProgram

        return NativeProgram(path, compute_units)
    from .coreml_reference import ReferenceProgram

    return ReferenceProgram(path)


class LoadedBundle:
    """A verified bundle, ready to run many times."""

    def __init__(self, root: str | Path, backend: str = "auto", compute_units: str = "all"):
        if backend not in BACKENDS:
            raise ApplecError(f"--backend must be one of {', '.join(BACKENDS)}, not "
                              f"'{backend}'")
        self.root = Path(root)
        self.manifest = bundle_format.read_manifest(self.root)
        self.inputs = self.manifest["model"]["inputs"]
        self.outputs = self.manifest["model"]["outputs"]
        self.backend = backend
        self.executors = [make_executor(self.root, part, backend, compute_units)
                          for part in self.manifest["partitions"]]

    @property
    def precision(self) -> str:
        return self.manifest["target"]["precision"]

    def check_inputs(self, feeds: dict[str, np.ndarray]) -> None:
        declared = {spec["name"]: spec for spec in self.inputs}
        unknown = sorted(set(feeds) - set(declared))
        if unknown:
            raise InputError(f"unknown input '{unknown[0]}'; the model's inputs are: "
                             f"{', '.join(declared)}")
        for name, spec in declared.items():
            if name not in feeds:
                raise InputError(f"missing input '{name}' ({spec['dtype']}{spec['shape']})")
            array = feeds[name]
            if not isinstance(array, np.ndarray):
                raise InputError(f"input '{name}' must be a numpy array, not "
                                 f"{type(array).__name__}")
            if array.dtype.name != spec["dtype"]:
                raise InputError(f"input '{name}' has dtype {array.dtype.name}, expected "
                                 f"{spec['dtype']}")
            if list(array.shape) != spec["shape"]:
                raise InputError(f"input '{name}' has shape {list(array.shape)}, expected "
                                 f"{spec['shape']}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.check_inputs(feeds)
        env = dict(feeds)
        for part, executor in zip(self.manifest["partitions"], self.executors):
            args = {port["feature"]: to_boundary(env[port["tensor"]], port)
                    for port in part["inputs"]}
            results = executor.run(args)
            for port in part["outputs"]:
                env[port["tensor"]] = results[port["feature"]]
        return {spec["name"]: np.asarray(env[spec["name"]]).astype(spec["dtype"], copy=False)
                .reshape(spec["shape"]) for spec in self.outputs}


def to_boundary(array: np.ndarray, port: dict) -> np.ndarray:
    """Convert a tensor to the dtype a partition takes (int64 -> int32 saturating)."""
    dtype = {"fp32": np.float32, "fp16": np.float16, "int32": np.int32}[port["dtype"]]
    if array.dtype.kind in "iu" and dtype == np.int32 and array.dtype != np.int32 \
            and array.size:
        if array.min() < INT32.min or array.max() > INT32.max:
            warnings.warn(f"'{port['tensor']}': values beyond the int32 range saturated "
                          "(CoreML has no int64)", stacklevel=3)
            array = np.clip(array, INT32.min, INT32.max)
    return np.ascontiguousarray(array, dtype=dtype).reshape(port["shape"])


def load(root: str | Path, backend: str = "auto", compute_units: str = "all") -> LoadedBundle:
    return LoadedBundle(root, backend, compute_units)
