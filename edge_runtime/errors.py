"""Errors a caller of edgeops must be able to tell apart.

Every error carries an exit code for the CLI; its message names what is wrong
and where (file, input name, field), in one line.
"""

from __future__ import annotations


class EdgeOpsError(Exception):
    """Base of every error edgeops raises on purpose."""

    exit_code = 1


class InvalidInputError(EdgeOpsError, ValueError):
    """A file, array, message or request that is not what was expected.

    ``reason`` is a short name for the kind of problem (``shape``, ``nan``, ``not_numeric``, ``empty``,
    ...), which telemetry windows count rejected inputs by.
    """

    exit_code = 3

    def __init__(self, message: str = "", reason: str = "invalid"):
        super().__init__(message)
        self.reason = reason


class ModelFormatError(InvalidInputError):
    """A model file that is not a valid TFLite flatbuffer or ONNX model."""


class BundleError(InvalidInputError):
    """A bundle whose layout or manifest is not valid."""


class VerificationError(EdgeOpsError):
    """A bundle whose sha256 pins or signature do not verify."""

    exit_code = 4


class QualityCheckError(EdgeOpsError):
    """A conversion or health check whose measured quality is below its threshold."""

    exit_code = 5


class BackendUnavailableError(EdgeOpsError):
    """No installed inference backend can run the artifact."""

    exit_code = 1


class AcceleratorError(EdgeOpsError):
    """A delegate or execution provider that was required (``--require-delegate``) did not load."""

    exit_code = 6
