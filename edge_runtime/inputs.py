"""Input streams for the agent: a file replayed, JSON lines on stdin, a folder of images.

Each source yields either a sample (numpy array) or a :class:`BadSample`
saying why a line could not be read, so one bad line is counted and logged,
and the stream goes on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from edge_runtime.errors import InvalidInputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm")


@dataclass(frozen=True)
class BadSample:
    """A line or file that is not a usable sample."""

    where: str
    reason: str


def read_rows(path: str | Path, n_values: int | None = None) -> np.ndarray:
    """Samples from .npy, .npz (array X) or .csv (numbers; a header line is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"input {p}: no such file")
    try:
        if p.suffix == ".npy":
            X = np.load(p, allow_pickle=False)
        elif p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                if "X" not in z.files:
                    raise InvalidInputError(f"input {p}: .npz needs an array named X")
                X = z["X"]
        elif p.suffix == ".csv":
            with open(p) as fh:
                first = fh.readline()
            try:
                [float(v) for v in first.strip().split(",")]
                skip = 0
            except ValueError:
                skip = 1
            X = np.loadtxt(p, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float32)
        else:
            raise InvalidInputError(f"input {p}: use .csv, .npy or .npz (or a folder of images, or - for stdin)")
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"input {p}: not readable ({str(exc)[:120]})") from None
    X = np.asarray(X, dtype=np.float32)
    if X.ndim == 1:
        X = X[:, None]
    if n_values is not None and X.ndim == 2 and X.shape[1] == n_values + 1:
        X = X[:, :n_values]  # a trailing label column
    if len(X) == 0:
        raise InvalidInputError(f"input {p}: no samples")
    return X


def replay(X: np.ndarray, loop: bool = False) -> Iterator[np.ndarray]:
    while True:
        yield from X
        if not loop:
            return


def json_lines(stream: IO[str] | None = None) -> Iterator[np.ndarray | BadSample]:
    """Samples from JSON lines: ``[1.0, 2.0, ...]`` or ``{"x": [...]}`` (also "inputs"/"features")."""
    stream = stream or sys.stdin
    for n, line in enumerate(stream, 1):
        line = line.strip()
        if not line:
            continue
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            yield BadSample(f"line {n}", f"not JSON ({exc.msg})")
            continue
        if isinstance(doc, dict):
            doc = next((doc[k] for k in ("x", "inputs", "features") if k in doc), None)
        if not isinstance(doc, list):
            yield BadSample(f"line {n}", "expected a list of numbers or an object with key 'x'")
            continue
        try:
            yield np.asarray(doc, dtype=np.float32)
        except (ValueError, TypeError):
            yield BadSample(f"line {n}", "values are not all numbers")


def image_files(folder: str | Path, loop: bool = False) -> Iterator[Path]:
    d = Path(folder)
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"input {d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    while True:
        yield from files
        if not loop:
            return
