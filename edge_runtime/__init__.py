"""edge_runtime: run an edgeops bundle on a device and measure it.

Imports nothing from the rest of edgeops and never loads TensorFlow, Keras or
scikit-learn: a device installs this package alone.

    >>> import edge_runtime                                   # doctest: +SKIP
    >>> model = edge_runtime.load("digits-cnn/")              # doctest: +SKIP
    >>> model.predict_labels(image_8x8)                       # doctest: +SKIP
"""

from __future__ import annotations

from edge_runtime.errors import (
    AcceleratorError,
    BackendUnavailableError,
    BundleError,
    EdgeOpsError,
    InvalidInputError,
    ModelFormatError,
    QualityCheckError,
    VerificationError,
)

__version__ = "0.1.0"


def load(path, artifact=None, threads=None, public_key=None, nan_policy="reject", prefer=None,  # noqa: PLR0913
         isolate=False, verify_vectors=True, accel=None):
    """Load a bundle directory, bundle .tar.gz or bare .tflite/.onnx file; see :func:`edge_runtime.model.load`."""
    from edge_runtime.model import load as _load

    return _load(path, artifact=artifact, threads=threads, public_key=public_key, nan_policy=nan_policy,
                 prefer=prefer, isolate=isolate, verify_vectors=verify_vectors, accel=accel)


__all__ = [
    "load",
    "EdgeOpsError",
    "InvalidInputError",
    "ModelFormatError",
    "BundleError",
    "VerificationError",
    "QualityCheckError",
    "BackendUnavailableError",
    "AcceleratorError",
    "__version__",
]
