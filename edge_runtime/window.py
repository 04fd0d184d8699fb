"""Telemetry windows: what a device measured over N seconds or M inferences.

A :class:`WindowRecorder` is fed by every ``predict`` call. Rows are copied
into a small buffer and folded into the mergeable statistics a buffer at a
time, so the per-call cost stays at a few microseconds. Closed windows come
out of :meth:`WindowRecorder.poll` as wire-format dicts (see
docs/telemetry.md) without the device identity and sequence number, which
the agent adds.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Callable

import numpy as np

from edge_runtime import distinct
from edge_runtime.stats import FeatureStats, LatencyHistogram

BUFFER_ROWS = 512
# Bin edges of a classifier's top-class probability (its confidence), fixed so that every window and
# the reference profile of every bundle share them. A shift the input statistics miss (a rotated
# camera, one class's rows swapped for another's) shows as a drop in confidence (black-box shift
# detection; Rabanser, Guennemann and Lipton, "Failing Loudly", NeurIPS 2019).
CONFIDENCE_EDGES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


def top_probability(outputs: np.ndarray) -> np.ndarray | None:
    """Per row, the probability of the predicted class; None when the outputs are not probabilities.

    >>> top_probability(np.array([[0.1, 0.7, 0.2], [0.5, 0.25, 0.25]])).tolist()
    [0.7, 0.5]
    >>> top_probability(np.array([[0.9], [0.2]])).round(3).tolist()    # one sigmoid output
    [0.9, 0.8]
    >>> top_probability(np.array([[3.2, -1.0]])) is None               # logits
    True
    """
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2 or out.size == 0 or out.min() < 0.0 or out.max() > 1.0:
        return None
    if out.shape[1] == 1:
        return np.maximum(out[:, 0], 1.0 - out[:, 0])
    if np.abs(out.sum(axis=1) - 1.0).max() > 0.02:
        return None
    return out.max(axis=1)


def confidence_histogram(outputs: np.ndarray) -> list[int] | None:
    """Counts of the top-class probabilities on :data:`CONFIDENCE_EDGES` (None for non-probabilities)."""
    top = top_probability(outputs)
    if top is None:
        return None
    return np.bincount(np.searchsorted(CONFIDENCE_EDGES, top, side="right"),
                       minlength=len(CONFIDENCE_EDGES) + 1).tolist()
# Per-channel drift needs a few pixels from many images, not every pixel of one: 64 keeps
# the cost of an image window to microseconds however large the image is.
MAX_PIXELS_PER_SAMPLE = 64


def _range_arrays(ranges: list[tuple[float | None, float | None]] | None,
                  n_features: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(minima, maxima) of the calibration data, or (None, None) unless every monitored feature has both."""
    if ranges and len(ranges) == n_features and _all_bounded(ranges):
        return (np.array([lo for lo, _ in ranges], dtype=np.float64),
                np.array([hi for _, hi in ranges], dtype=np.float64))
    return None, None


def _all_bounded(ranges: list[tuple[float | None, float | None]]) -> bool:
    """Every range has both its minimum and its maximum."""
    return all(lo is not None and hi is not None for lo, hi in ranges)


class WindowRecorder:
    """Accumulates one window at a time and queues the closed ones.

    Args:
        model_info: the ``model`` block of each window (name, version, artifact, sha256, variant).
        bin_edges: per monitored feature, the reference bin edges (empty lists when unknown).
        monitored: "features" (tabular rows, flattened) or "channels" (image pixels per channel).
        n_classes: number of classes for the prediction histogram (None for regression).
        output_edges: regression: bin edges of the predicted value.
        window_seconds: close a window after this many seconds (None: never by time).
        window_size: close a window after this many inferences (None: never by count).
        clock: time source (seconds since the epoch).
        ranges: per monitored feature, the (min, max) of the calibration data; values outside are
            counted per feature in ``features.out_of_range`` (inputs on another scale show there).
    """

    def __init__(  # noqa: PLR0913 - the recorder's configuration, from the manifest
        self,
        model_info: dict,
        bin_edges: list[list[float]],
        monitored: str = "features",
        n_classes: int | None = None,
        output_edges: list[float] | None = None,
        window_seconds: float | None = 10.0,
        window_size: int | None = None,
        clock: Callable[[], float] = time.time,
        ranges: list[tuple[float | None, float | None]] | None = None,
    ):
        if window_seconds is None and window_size is None:
            raise ValueError("a window needs window_seconds or window_size")
        self.model_info = dict(model_info)
        self.bin_edges = bin_edges
        self.monitored = monitored
        self.n_classes = n_classes
        self.output_edges = output_edges
        self.window_seconds = window_seconds
        self.window_size = window_size
        self.clock = clock
        self._lock = threading.Lock()
        # called with each window as it closes (under the recorder's lock), to add what else belongs to it
        # (the agent: labels joined during the window)
        self.on_close: Callable[[dict], None] | None = None
        self.hold = False       # a full window waits for release() (the agent joins an input's label first)
        self._closed: deque[dict] = deque()
        self._n_features = len(bin_edges)
        self._lo, self._hi = _range_arrays(ranges, self._n_features)
        self._buf = np.empty((BUFFER_ROWS, max(self._n_features, 1)), dtype=np.float64)
        # tabular rows are sketched for the number of distinct inputs (repeats carry no news: distinct.py)
        self._hashes_rows = monitored == "features" and self._n_features > 0
        self._reset(clock())

    def _reset(self, now: float) -> None:
        self.start = now
        self.count = 0
        self.errors = 0
        self.rejected = 0
        self.rejected_by: dict[str, int] = {}
        self.out_of_range = np.zeros(self._n_features if self._lo is not None else 0, dtype=np.int64)
        self.latency = LatencyHistogram()
        self.features = FeatureStats(self.bin_edges)
        self._rows = 0
        self._classes = np.zeros(self.n_classes or 0, dtype=np.int64)
        self._confidence = np.zeros(len(CONFIDENCE_EDGES) + 1, dtype=np.int64)
        self._confidence_ok = True
        self._outputs = FeatureStats([self.output_edges or []]) if self.n_classes is None else None
        self._distinct = distinct.new_registers() if self._hashes_rows else None

    # -- hot path ------------------------------------------------------------------------------

    def record(self, batch: np.ndarray, latency_ms: float, outputs: np.ndarray) -> None:
        """Add one predict call: its inputs (caller space), latency and outputs."""
        rows = self._rows_of(batch)
        n = batch.shape[0]
        with self._lock:
            self.count += n
            self.latency.add(latency_ms)
            if rows is not None:
                self._add_rows(rows)
            if self.n_classes:
                self._add_classes(outputs, n)
            elif self._outputs is not None:
                self._outputs.update(outputs[:, :1])
            self._close_if_full()

    def _close_if_full(self) -> None:
        """Close the window once it holds window_size inferences (unless it is held)."""
        if self.window_size is not None and self.count >= self.window_size and not self.hold:
            self._close(self.clock())

    def _add_rows(self, rows: np.ndarray) -> None:
        """Buffer monitored rows (folded into the statistics when the buffer fills; a huge batch directly)."""
        m = rows.shape[0]
        if self._rows + m > BUFFER_ROWS:
            self._fold()
        if m > BUFFER_ROWS:
            self.features.update(rows)
            self._sketch(rows)
        else:
            self._buf[self._rows:self._rows + m] = rows
            self._rows += m

    def _add_classes(self, outputs: np.ndarray, n: int) -> None:
        """Count the predicted classes (one sigmoid column: above 0.5 is class 1) and their confidence."""
        if outputs.shape[1] == 1:
            idx = (outputs[:, 0] > 0.5).astype(np.int64)
        else:
            idx = outputs.argmax(axis=1)
        if n == 1:
            self._classes[idx[0]] += 1
        else:
            self._classes += np.bincount(idx, minlength=self.n_classes)[: self.n_classes]
        if self._confidence_ok:
            self._add_confidence(outputs)

    def _add_confidence(self, outputs: np.ndarray) -> None:
        top = top_probability(outputs)
        if top is None:             # logits or scores: no confidence histogram in this window
            self._confidence_ok = False
            return
        if top.shape[0] == 1:
            self._confidence[int(np.searchsorted(CONFIDENCE_EDGES, top[0], side="right"))] += 1
        else:
            self._confidence += np.bincount(np.searchsorted(CONFIDENCE_EDGES, top, side="right"),
                                            minlength=len(self._confidence))

    def _rows_of(self, batch: np.ndarray) -> np.ndarray | None:
        if self._n_features == 0:
            return None
        if self.monitored == "channels":
            # (n, H, W, C): a strided subsample of pixels, one row per pixel
            h, w = batch.shape[1], batch.shape[2]
            stride = max(1, math.ceil(math.sqrt(h * w / MAX_PIXELS_PER_SAMPLE)))
            sub = batch[:, ::stride, ::stride, :]
            return sub.reshape(-1, batch.shape[-1])
        return batch.reshape(batch.shape[0], -1)

    def _fold(self) -> None:
        if self._rows:
            rows = self._buf[: self._rows]
            self.features.update(rows)
            if self._lo is not None:
                self.out_of_range += ((rows < self._lo) | (rows > self._hi)).sum(axis=0)
            self._sketch(rows)
            self._rows = 0

    def _sketch(self, rows: np.ndarray) -> None:
        if self._distinct is not None:
            distinct.add_rows(self._distinct, rows)

    # -- errors --------------------------------------------------------------------------------

    def record_error(self, n: int = 1, rejected: bool = False, reason: str = "invalid") -> None:
        """Count a failed inference (or an input refused by validation when ``rejected``, by ``reason``)."""
        with self._lock:
            self.count += n
            if rejected:
                self.rejected += n
                self.rejected_by[reason] = self.rejected_by.get(reason, 0) + n
            else:
                self.errors += n
            self._close_if_full()

    # -- closing -------------------------------------------------------------------------------

    def _close(self, now: float) -> None:
        self._fold()
        window = {
            "start": round(self.start, 3),
            "end": round(now, 3),
            "model": self.model_info,
            "count": self.count,
            "errors": self.errors,
            "rejected": self.rejected,
            "latency_ms": self.latency.to_dict(),
            "features": self.features.to_dict(),
            "predictions": self._predictions(),
        }
        if self.on_close is not None:
            self.on_close(window)
        self._add_optional_counts(window)
        self._closed.append(window)
        self._reset(now)

    def _add_optional_counts(self, window: dict) -> None:
        """Rejections by reason, out-of-range counts and the distinct-inputs sketch, when the window has them."""
        if self.rejected_by:
            window["rejected_by"] = dict(self.rejected_by)
        if self._lo is not None:
            window["features"]["out_of_range"] = self.out_of_range.tolist()
        if self._distinct is not None and self._distinct.any():
            window["distinct"] = distinct.to_text(self._distinct)

    def _predictions(self) -> dict:
        if self.n_classes:
            out = {"counts": self._classes.tolist()}
            if self._confidence_ok and self._confidence.any():
                out["confidence"] = self._confidence.tolist()
            return out
        d = self._outputs.to_dict()
        return {"count": d["count"][0], "mean": d["mean"][0], "m2": d["m2"][0], "min": d["min"][0],
                "max": d["max"][0], "hist": d["hist"][0]}

    def release(self) -> None:
        """End a ``hold``: close the window now if it filled meanwhile."""
        with self._lock:
            self.hold = False
            if self.window_size is not None and self.count >= self.window_size:
                self._close(self.clock())

    def poll(self) -> list[dict]:
        """Windows closed so far (closing the current one first when its time is up)."""
        with self._lock:
            now = self.clock()
            if self.window_seconds is not None and now - self.start >= self.window_seconds:
                self._close(now)
            out = list(self._closed)
            self._closed.clear()
        return out

    def flush(self, empty: bool = False) -> dict | None:
        """Close the current window now; returns it (None when it saw nothing, unless ``empty``: a window that
        carries something else, such as labels joined since the last one) plus nothing else."""
        with self._lock:
            if self.count == 0 and not empty:
                return None
            self._close(self.clock())
            return self._closed.pop()
