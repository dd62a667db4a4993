"""CoreML lowering: IR -> MIL program (coremltools' Builder) -> .mlpackage on disk."""

from .lower import lower_to_program, write_mlpackage  # noqa: F401
