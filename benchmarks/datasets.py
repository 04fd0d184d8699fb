"""Labelled data for accuracy next to speed: a file, or one of scikit-learn's bundled data sets."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge_runtime.errors import InvalidInputError

DATASETS = ("digits", "wine", "breast_cancer")


def load_labelled(data: str | None = None, dataset: str | None = None) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, y, description) from ``--data FILE`` (.npz with X and y, or .csv with the label last) or ``--dataset``.

    ``--dataset`` uses the held-out 30% of the project's fixed split (the same one the reference
    models were trained without), so accuracy here matches the conversion report.
    """
    if data:
        return _labelled_file(Path(data))
    if dataset not in DATASETS:
        raise InvalidInputError(f"--dataset {dataset!r}: choose from {', '.join(DATASETS)}")
    try:
        from convert.reference import load_reference_data
    except ImportError:
        raise InvalidInputError("--dataset needs scikit-learn: pip install 'edgeops[convert]', or use --data") from None
    d = load_reference_data(dataset)
    return d.X_test, d.y_test, f"{dataset} (held-out 30%, {len(d.y_test)} samples)"


def _labelled_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(p, allow_pickle=False) as z:
        if "X" not in z.files or "y" not in z.files:
            raise InvalidInputError(f"--data {p}: .npz needs arrays X and y (has {', '.join(z.files)})")
        return z["X"].astype(np.float32), z["y"]


def _labelled_csv(p: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        arr = np.loadtxt(p, delimiter=",", ndmin=2, skiprows=_header_lines(p))
    except ValueError as exc:
        raise InvalidInputError(f"--data {p}: not numeric CSV ({exc})") from None
    return arr[:, :-1].astype(np.float32), arr[:, -1].astype(np.int64)


_LABELLED_READERS = {".npz": _labelled_npz, ".csv": _labelled_csv}


def _labelled_file(p: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(X, y, the path) of a .npz (arrays X and y) or a .csv (the label last)."""
    if not p.is_file():
        raise InvalidInputError(f"--data {p}: no such file")
    read = _LABELLED_READERS.get(p.suffix)
    if read is None:
        raise InvalidInputError(f"--data {p}: use .npz (X, y) or .csv (label in the last column)")
    X, y = read(p)
    return X, y, str(p)


def _header_lines(p: Path) -> int:
    first = p.open().readline()
    try:
        [float(v) for v in first.strip().split(",")]
        return 0
    except ValueError:
        return 1


def to_model_inputs(X: np.ndarray, manifest: dict | None, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Reshape (and for image bundles, scale) flat rows into what the model takes."""
    schema = (manifest or {}).get("input_schema") or {}
    n = int(np.prod(sample_shape))
    if X.shape[1:] == tuple(sample_shape):
        return X
    if X.reshape(len(X), -1).shape[1] != n:
        raise InvalidInputError(f"labelled data has {X.reshape(len(X), -1).shape[1]} values per sample; "
                                f"the model takes {n} {list(sample_shape)}")
    X = X.reshape((len(X),) + tuple(sample_shape))
    image = schema.get("image") if schema.get("kind") == "image" else None
    if image:
        X = _scaled_image(X, image)
    return X.astype(np.float32)


def _scaled_image(X: np.ndarray, image: dict) -> np.ndarray:
    """Pixels by the manifest's image preprocessing: (pixel * scale - mean) / std."""
    mean = np.asarray(image.get("mean") or 0.0, dtype=np.float32)
    std = np.asarray(image.get("std") or 1.0, dtype=np.float32)
    return (X * float(image.get("scale", 1.0)) - mean) / std
