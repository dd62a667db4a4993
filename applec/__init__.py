"""applec: an ahead-of-time ONNX compiler for Apple Silicon.

Python API (mirrors the CLI):

    import applec
    result = applec.compile("model.onnx", target="m2", output="bundle/")
    model = applec.load("bundle/")          # verify once ...
    outputs = model.run({"x": array})       # ... run many times
    report = applec.validate("bundle/", "model.onnx")
"""

__version__ = "0.1.0"

from .errors import ApplecError  # noqa: E402


def compile(model, *, output, target="m2", precision="fp16", shapes=None, on_stage=None,
            deployment_target=None, quantize=None, block_size=None, quantize_min_size=None,
            quantize_embeddings=None, calibration=None, disable_passes=None,
            fp16_check=True):
    """Compile an ONNX file to a bundle; returns a `CompileResult`. `quantize`: int8, int4
    or palette4 weights (docs/quantization.md)."""
    from .compiler import compile_model

    return compile_model(model, output=output, target=target, precision=precision,
                         shapes=shapes, on_stage=on_stage, deployment_target=deployment_target,
                         quantize=quantize, block_size=block_size,
                         quantize_min_size=quantize_min_size,
                         quantize_embeddings=quantize_embeddings, calibration=calibration,
                         disable_passes=disable_passes, fp16_check=fp16_check)


def load(bundle, *, backend="auto", compute_units="all"):
    """Load and verify a bundle; returns a `LoadedBundle` whose `.run(feeds)` executes it."""
    from applec.runtime import load as _load

    return _load(bundle, backend=backend, compute_units=compute_units)


def validate(bundle, onnx_model, *, inputs=None, backend="auto", seed=0):
    """Compare a bundle's outputs with onnxruntime on the original model."""
    from .validate import validate_bundle

    return validate_bundle(bundle, onnx_model, inputs=inputs, backend=backend, seed=seed)


__all__ = ["ApplecError", "compile", "load", "validate", "__version__"]
