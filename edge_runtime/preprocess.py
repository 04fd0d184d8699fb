"""Image preprocessing from the manifest: resize, channels, scale, mean/std (Pillow, an extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.errors import InvalidInputError


def is_image_like(x: Any) -> bool:
    if isinstance(x, (str, Path)):
        return True
    return type(x).__module__.startswith("PIL.")


def image_to_array(x: Any, image: dict) -> np.ndarray:
    """An image file path or PIL image as the model's (H, W, C) float32 input.

    The pixel values in their source range (0..255 for 8-bit images, unless the
    manifest's ``source_range`` says otherwise) are mapped by
    ``(pixel * scale - mean) / std``; when the manifest's scale was set for
    another range (e.g. Digits' 0..16), values are first rescaled to it.
    """
    try:
        from PIL import Image
    except ImportError:
        raise InvalidInputError("image inputs need Pillow: pip install 'edgeops[image]'") from None
    img = _open_image(Image, x) if isinstance(x, (str, Path)) else x
    h, w, c = int(image["height"]), int(image["width"]), int(image["channels"])
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32)
    if c == 1:
        arr = arr[:, :, None]
    return _normalised(arr, image, c)


def _open_image(Image, path: str | Path):  # noqa: N803 - the PIL module passed in
    """The image file, decoded; InvalidInputError when it cannot be read."""
    try:
        img = Image.open(path)
        img.load()
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"image {path}: not readable ({exc})") from None
    return img


def _normalised(arr: np.ndarray, image: dict, c: int) -> np.ndarray:
    """Pixels (0..255) mapped to the source range, then by (pixel * scale - mean) / std."""
    lo, hi = image.get("source_range") or (0.0, 255.0)
    arr = lo + arr / 255.0 * (hi - lo)
    scale = float(image.get("scale", 1.0))
    mean = np.asarray(image.get("mean") or [0.0] * c, dtype=np.float32)
    std = np.asarray(image.get("std") or [1.0] * c, dtype=np.float32)
    return ((arr * scale - mean) / std).astype(np.float32)
