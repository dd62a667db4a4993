"""The one family of errors meant for users.

Every mistake a user can make (a bad file, a bad argument, an op we do not support,
a tampered bundle) raises a subclass of `ApplecError`. The CLI prints its message as a
single line and exits with `exit_code`; anything else that escapes is a bug in applec.
"""


class ApplecError(Exception):
    """A user-facing error: one line, no traceback, exit code 2."""

    exit_code = 2


class ModelError(ApplecError):
    """The ONNX file cannot be read, or a node in it cannot be compiled."""


class UnsupportedOpError(ModelError):
    """An op type (or an attribute value of it) that applec has no rule for."""


class LoweringError(ModelError):
    """A lowering rule produced something the target's builder refused (an applec bug,
    reported as one line naming the node rather than a traceback)."""


class ShapeError(ModelError):
    """A shape that is unknown, dynamic without an override, or inconsistent."""


class BundleError(ApplecError):
    """A bundle that is missing, corrupt, tampered with, or of an unknown format."""


class InputError(ApplecError):
    """Run-time inputs that do not match what the bundle declares."""


class TargetError(ApplecError):
    """An unknown chip, or an option the chip's OS cannot honour."""


class ValidationMismatch(ApplecError):
    """Bundle outputs differ from the reference beyond the stated tolerance."""

    exit_code = 1
