"""What a caller passes to a bundle: the input schema and the optional feature standardisation."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from convert.sources import SourceModel
from edge_runtime.errors import InvalidInputError


def columns_of(data: Any) -> list[str] | None:
    """Column names of a pandas DataFrame (the feature names a user already has), else None."""
    columns = getattr(data, "columns", None)
    return [str(c) for c in columns] if columns is not None and getattr(data, "ndim", 0) == 2 else None


def normalizer(normalization: dict | None, src: SourceModel) -> Callable[[np.ndarray], np.ndarray]:
    """The function taking the caller's raw rows to the model's input: ``(x - mean) / std``, or identity."""
    if normalization is None:
        return lambda X: X
    if len(src.input_shape) != 1:
        raise InvalidInputError("normalization applies to tabular inputs; image models describe theirs with image=")
    mean, std = _mean_and_std(normalization, src.input_shape[0])
    return lambda X: ((X - mean) / std).astype(np.float32)


def _mean_and_std(normalization: dict, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalization's mean and std as float32 arrays of ``n`` values, std finite and positive."""
    try:
        mean = np.asarray(normalization.get("mean"), dtype=np.float32)
        std = np.asarray(normalization.get("std"), dtype=np.float32)
    except (TypeError, ValueError, AttributeError):
        raise InvalidInputError("normalization needs numeric 'mean' and 'std' lists") from None
    if mean.shape != (n,) or std.shape != (n,):
        raise InvalidInputError(f"normalization mean and std need {n} values each (one per feature)")
    if not (np.isfinite(std).all() and (std > 0).all()):
        raise InvalidInputError("normalization std must be finite and positive")
    return mean, std


def _image_facts(shape: list[int], image: dict | None) -> dict:
    """The schema's ``image`` entry: the defaults for an (H, W, C) input, updated with and checking ``image``."""
    h, w, c = shape
    img = {"height": h, "width": w, "channels": c, "layout": "NHWC", "scale": 1.0,
           "mean": [0.0] * c, "std": [1.0] * c}
    img.update(image or {})
    _check_image_facts(img, c)
    return img


def _check_image_facts(img: dict, c: int) -> None:
    """One mean and std per channel, and a finite number as scale."""
    for key in ("mean", "std"):
        if len(img[key]) != c:
            raise InvalidInputError(f"image {key} needs {c} values (one per channel), got {len(img[key])}")
    for key in ("scale",):
        if not isinstance(img[key], (int, float)) or not math.isfinite(img[key]):
            raise InvalidInputError(f"image {key} must be a number")


def input_schema(src: SourceModel, names: list[str] | None, image: dict | None,
                  normalization: dict | None = None) -> dict:
    """The manifest's ``input_schema``: image facts for (H, W, C) inputs, feature names for tabular ones."""
    shape = list(src.input_shape)
    if len(shape) == 3:
        return {"kind": "image", "shape": shape, "dtype": "float32", "features": None,
                "image": _image_facts(shape, image)}
    kind = "tabular" if len(shape) == 1 else "tensor"
    schema = {"kind": kind, "shape": shape, "dtype": "float32", "features": names, "image": None}
    if normalization is not None:
        schema["normalization"] = {"mean": [float(v) for v in normalization["mean"]],
                                   "std": [float(v) for v in normalization["std"]]}
    return schema
