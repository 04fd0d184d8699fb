"""Input validation and preprocessing: what a caller passes, checked against the manifest.

Errors name the input and what was expected, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import InvalidInputError

NAN_POLICIES = ("reject", "count")


@dataclass(frozen=True)
class InputSpec:
    """What one sample looks like to a caller.

    Attributes:
        name: the input's name (used in error messages).
        shape: one sample's shape (batch excluded); -1 where any size is accepted.
        features: tabular feature names, if known.
        mean/std: tabular standardisation applied before the model, if the manifest has one.
    """

    name: str
    shape: tuple[int, ...]
    features: tuple[str, ...] | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    @property
    def n_values(self) -> int:
        return int(np.prod([d for d in self.shape if d > 0])) if self.shape else 1


def _describe(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join("any" if d < 0 else str(d) for d in shape) + ")"


def _as_float32(x, spec: InputSpec) -> np.ndarray:
    """x as a float32 array; InvalidInputError when it holds something else than numbers."""
    if isinstance(x, np.ndarray) and x.dtype == np.float32:
        return x
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"input {spec.name!r}: not an array of numbers ({exc})", "not_numeric") from None
    if arr.dtype.kind not in "fiub":
        got = arr.dtype.name if arr.dtype.kind != "O" else "mixed objects"
        raise InvalidInputError(f"input {spec.name!r}: expected numbers (float32), got {got}", "not_numeric")
    return arr.astype(np.float32)


def _shape_error(arr: np.ndarray, spec: InputSpec) -> InvalidInputError:
    """The error for an array that is neither one sample nor a batch of samples of the spec's shape."""
    shape, ndim = spec.shape, len(spec.shape)
    got = arr.shape[-1] if arr.ndim else 0
    if ndim == 1 and arr.ndim in (1, 2):
        names = f" ({', '.join(spec.features[:3])}, ...)" if spec.features else ""
        return InvalidInputError(
            f"input {spec.name!r}: expected {shape[0]} features{names} per sample, got {got}", "shape")
    return InvalidInputError(
        f"input {spec.name!r}: expected shape {_describe(shape)} per sample or a batch of them, "
        f"got {tuple(arr.shape)}", "shape")


def _batched(arr: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, bool]:
    """(batch, was_single_sample): one sample gets a leading batch dimension, a batch stays as it is."""
    shape, ndim = spec.shape, len(spec.shape)
    if arr.shape == shape:  # the common case: one sample of a fixed shape
        return arr[None, ...], True
    if arr.ndim == ndim and _fits(arr.shape, shape):
        return arr[None, ...], True
    if arr.ndim == ndim + 1 and _fits(arr.shape[1:], shape):
        return arr, False
    raise _shape_error(arr, spec)


def _check_finite(arr: np.ndarray, spec: InputSpec) -> None:
    """InvalidInputError naming the first NaN or infinite value, if any."""
    if np.isfinite(arr).all():
        return
    bad = np.argwhere(~np.isfinite(arr))[0]
    where = f"sample {bad[0]}, " + (f"feature {spec.features[bad[1]]!r}" if spec.features and len(bad) == 2
                                     else f"position {tuple(int(i) for i in bad[1:])}")
    raise InvalidInputError(f"input {spec.name!r}: NaN or infinite value at {where}", "nan")


def as_batch(x, spec: InputSpec, nan_policy: str = "reject") -> tuple[np.ndarray, bool]:
    """Check ``x`` (one sample or a batch) and return (float32 batch, was_single_sample).

    Raises:
        InvalidInputError: wrong dtype, shape, number of features, or NaN/inf under the reject policy.
    """
    arr, single = _batched(_as_float32(x, spec), spec)
    if arr.shape[0] == 0:
        raise InvalidInputError(f"input {spec.name!r}: empty batch", "empty")
    if nan_policy == "reject":
        _check_finite(arr, spec)
    return arr, single


def _fits(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    return len(got) == len(want) and all(w < 0 or g == w for g, w in zip(got, want, strict=True))


def standardise(batch: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Apply the manifest's tabular standardisation, if any."""
    if spec.mean is None:
        return batch
    return (batch - spec.mean) / spec.std


def quantize(batch: np.ndarray, scale: float, zero_point: int, dtype: np.dtype) -> np.ndarray:
    """Float to int8/uint8/int16 with the tensor's scale and zero point (saturating)."""
    info = np.iinfo(dtype)
    q = np.rint(batch / scale + zero_point)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)
