"""CoreML on macOS: run a partition's .mlpackage with coremltools' MLModel.predict.

Only importable where CoreML is (macOS); the runtime picks it for `--backend native` or
`auto`. Not executed on Linux CI: its tests skip off macOS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COMPUTE_UNITS = {"all": "ALL", "cpu": "CPU_ONLY", "cpu_gpu": "CPU_AND_GPU",
                 "cpu_ne": "CPU_AND_NE"}


class NativeProgram:
    """A loaded CoreML model; `run` takes and returns numpy arrays by feature name."""

    def __init__(self, path: Path, compute_units: str = "all"):
        import coremltools as ct

        from applec.errors import ApplecError

        if compute_units not in COMPUTE_UNITS:
            raise ApplecError(f"--compute-units must be one of {', '.join(COMPUTE_UNITS)}")
        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
        self.model = ct.models.MLModel(str(path), compute_units=units)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model.predict(feeds)
        return {name: np.asarray(value) for name, value in outputs.items()}
