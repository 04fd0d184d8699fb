"""convert: Keras and scikit-learn models in, verified and quantized bundles out.

The heavy frameworks (TensorFlow, scikit-learn, skl2onnx, tf2onnx) are
imported only when a conversion needs them.
"""

from __future__ import annotations

from typing import Any


def to_bundle(*args: Any, **kwargs: Any):
    """Convert a model into a bundle; see :func:`convert.api.to_bundle`."""
    from convert.api import to_bundle as _to_bundle

    return _to_bundle(*args, **kwargs)


__all__ = ["to_bundle"]
