"""Calibration and holdout data files: .npy, .npz and .csv."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.errors import InvalidInputError


def load_array(path: str | Path, where: str = "data") -> np.ndarray:
    """Inputs from .npy, .npz (key X, or the only array) or .csv (numbers, optional header)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{where} {p}: no such file")
    reader = _ARRAY_READERS.get(p.suffix)
    if reader is None:
        raise InvalidInputError(f"{where} {p}: unsupported file type {p.suffix or '(none)'}; use .npy, .npz or .csv")
    try:
        return reader(p, where)
    except InvalidInputError:
        raise
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"{where} {p}: not readable as {p.suffix} ({str(exc)[:150]})") from None


def _read_npy(p: Path, where: str) -> np.ndarray:
    return np.load(p, allow_pickle=False).astype(np.float32)


def _read_npz(p: Path, where: str) -> np.ndarray:
    """The array named X, or the only array of the archive."""
    with np.load(p, allow_pickle=False) as z:
        key = "X" if "X" in z.files else (z.files[0] if len(z.files) == 1 else None)
        if key is None:
            raise InvalidInputError(f"{where} {p}: .npz needs an array named X (has: {', '.join(z.files)})")
        return z[key].astype(np.float32)


_ARRAY_READERS = {".npy": _read_npy, ".npz": _read_npz, ".csv": lambda p, where: _read_csv(p)}


def load_labeled(path: str | Path, where: str = "holdout") -> tuple[np.ndarray, np.ndarray | None]:
    """(X, y) from .npz (arrays X and y) or .csv (label in the last column); .npy gives X only."""
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        labeled = _labeled_npz(p, where)
        if labeled is not None:
            return labeled
    if p.suffix == ".csv" and p.is_file():
        return _labeled_csv(p, where)
    return load_array(p, where), None


def _labeled_npz(p: Path, where: str) -> tuple[np.ndarray, np.ndarray | None] | None:
    """Arrays X and y (y optional) of an .npz; None when it has no X (then it is read as inputs only)."""
    try:
        with np.load(p, allow_pickle=False) as z:
            if "X" in z.files:
                return z["X"].astype(np.float32), (z["y"] if "y" in z.files else None)
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"{where} {p}: not a readable .npz ({exc})") from None
    return None


def _labeled_csv(p: Path, where: str) -> tuple[np.ndarray, np.ndarray]:
    """The feature columns and the label (the last column) of a .csv."""
    data = _read_csv(p, dtype=np.float64)
    if data.shape[1] < 2:
        raise InvalidInputError(f"{where} {p}: needs feature columns and a label in the last column")
    return data[:, :-1].astype(np.float32), data[:, -1]


def _read_csv(p: Path, dtype=np.float32) -> np.ndarray:
    with open(p) as fh:
        first = fh.readline()
    skip = 0
    try:
        [float(v) for v in first.strip().split(",") if v.strip()]
    except ValueError:
        skip = 1  # a header line
    data = np.loadtxt(p, delimiter=",", skiprows=skip, dtype=dtype, ndmin=2)
    if data.size == 0:
        raise InvalidInputError(f"{p}: no data rows")
    return data
