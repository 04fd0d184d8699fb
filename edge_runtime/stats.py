"""Mergeable statistics: what a device measures and the monitor adds up.

Every statistic here merges exactly: two windows' statistics merged equal the
statistics of their inputs taken together (up to float rounding), so windows
can be combined per device, per fleet, or across monitor processes.

- :class:`LatencyHistogram`: log-spaced buckets (relative error about
  ``(gamma - 1) / 2``), quantiles from the buckets.
- :class:`FeatureStats`: per column count, NaN count, mean and M2 (Chan et
  al.'s parallel update), min, max, and counts on the reference bin edges.
- :class:`ClassCounts`: predicted-class histogram.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

DEFAULT_GAMMA = 1.05
_MIN_MS = 1e-6


def round6(x: float | None) -> float | None:
    """A float rounded to 6 significant digits (None and non-finite values become None)."""
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


class LatencyHistogram:
    """Log-bucket latency histogram in milliseconds.

    Bucket k holds gamma**(k-1) < ms <= gamma**k.

    >>> h = LatencyHistogram()
    >>> for ms in (1.0, 2.0, 3.0, 100.0):
    ...     h.add(ms)
    >>> round(h.quantile(0.5), 1), h.count
    (2.0, 4)
    """

    __slots__ = ("gamma", "_log_gamma", "counts", "count", "total", "min", "max")

    def __init__(self, gamma: float = DEFAULT_GAMMA):
        if gamma <= 1.0:
            raise ValueError("gamma must be > 1")
        self.gamma = gamma
        self._log_gamma = math.log(gamma)
        self.counts: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def bucket(self, ms: float) -> int:
        return math.ceil(math.log(max(ms, _MIN_MS)) / self._log_gamma - 1e-9)

    def add(self, ms: float, n: int = 1) -> None:
        k = math.ceil(math.log(ms if ms > _MIN_MS else _MIN_MS) / self._log_gamma - 1e-9)
        counts = self.counts
        counts[k] = counts.get(k, 0) + n
        self.count += n
        self.total += ms * n
        if ms < self.min:
            self.min = ms
        if ms > self.max:
            self.max = ms

    def merge(self, other: "LatencyHistogram") -> "LatencyHistogram":
        if abs(other.gamma - self.gamma) > 1e-12:
            raise ValueError(f"cannot merge histograms with gamma {self.gamma} and {other.gamma}")
        for k, c in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + c
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        return self

    def quantile(self, q: float) -> float | None:
        """The q-quantile (0..1): the geometric middle of its bucket, clamped to [min, max]."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for k in sorted(self.counts):
            seen += self.counts[k]
            if seen >= rank:
                value = self.gamma ** (k - 0.5)
                return min(max(value, self.min), self.max)
        return self.max

    def to_dict(self) -> dict:
        """The wire form: offset and dense counts from the lowest to the highest bucket."""
        if not self.counts:
            return {"gamma": self.gamma, "offset": 0, "counts": [], "min": None, "max": None, "sum": 0.0,
                    "p50": None, "p95": None, "p99": None}
        lo, hi = min(self.counts), max(self.counts)
        dense = [self.counts.get(k, 0) for k in range(lo, hi + 1)]
        return {
            "gamma": self.gamma, "offset": lo, "counts": dense,
            "min": round6(self.min), "max": round6(self.max), "sum": round6(self.total),
            "p50": round6(self.quantile(0.5)), "p95": round6(self.quantile(0.95)), "p99": round6(self.quantile(0.99)),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LatencyHistogram":
        h = cls(float(d["gamma"]))
        offset = int(d["offset"])
        h.counts.update({offset + i: int(c) for i, c in enumerate(d["counts"]) if c})
        h.count = sum(h.counts.values())
        h.total = float(d.get("sum") or 0.0)
        h.min = _float_or(d.get("min"), math.inf)
        h.max = _float_or(d.get("max"), 0.0)
        return h


def _float_or(value, default: float) -> float:
    return float(value) if value is not None else default


def edge_matrix(bin_edges: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    """Pad per-feature bin edges into one (features, K) matrix (+inf padding) and their lengths."""
    lengths = np.array([len(e) for e in bin_edges], dtype=np.int64)
    k = int(lengths.max()) if len(lengths) else 0
    mat = np.full((len(bin_edges), max(k, 1)), np.inf)
    for i, e in enumerate(bin_edges):
        mat[i, : len(e)] = e
    return mat, lengths


class FeatureStats:
    """Column-wise statistics of a stream of rows, on fixed reference bin edges.

    Args:
        bin_edges: per feature, the reference profile's interior cut points.

    >>> fs = FeatureStats([[0.5], [10.0]])
    >>> fs.update(np.array([[0.0, 5.0], [1.0, 20.0], [np.nan, 30.0]]))
    >>> d = fs.to_dict()
    >>> d["count"], d["nan"], d["mean"], d["hist"]
    ([2, 3], [1, 0], [0.5, 18.3333], [[1, 1], [1, 2]])
    """

    def __init__(self, bin_edges: Sequence[Sequence[float]]):
        self.n_features = len(bin_edges)
        self.bin_edges = [np.asarray(e, dtype=np.float64) for e in bin_edges]
        self._edges, self._lengths = edge_matrix(self.bin_edges)
        self._width = self._edges.shape[1] + 1
        self._offsets = np.arange(self.n_features, dtype=np.int64) * self._width
        f = self.n_features
        self.count = np.zeros(f, dtype=np.int64)
        self.nan = np.zeros(f, dtype=np.int64)
        self.mean = np.zeros(f)
        self.m2 = np.zeros(f)
        self.min = np.full(f, np.inf)
        self.max = np.full(f, -np.inf)
        self.hist = np.zeros(f * self._width, dtype=np.int64)

    def update(self, rows: np.ndarray) -> None:
        """Add a batch of rows (n, features)."""
        X = np.asarray(rows, dtype=np.float64)
        if X.ndim == 1:
            X = X[None, :]
        if X.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got {X.shape[1]}")
        if X.shape[0] == 0:
            return
        finite = np.isfinite(X)
        all_finite = bool(finite.all())
        if all_finite:
            n_b = np.full(self.n_features, X.shape[0], dtype=np.int64)
            mean_b = X.mean(axis=0)
            m2_b = ((X - mean_b) ** 2).sum(axis=0)
            self.min = np.minimum(self.min, X.min(axis=0))
            self.max = np.maximum(self.max, X.max(axis=0))
        else:
            n_b = finite.sum(axis=0)
            self.nan += X.shape[0] - n_b
            Xz = np.where(finite, X, 0.0)
            safe_n = np.maximum(n_b, 1)
            mean_b = Xz.sum(axis=0) / safe_n
            m2_b = (np.where(finite, X - mean_b, 0.0) ** 2).sum(axis=0)
            self.min = np.minimum(self.min, np.where(finite, X, np.inf).min(axis=0))
            self.max = np.maximum(self.max, np.where(finite, X, -np.inf).max(axis=0))
        self._merge_moments(n_b, mean_b, m2_b)
        flat = self._bins(X) + self._offsets
        if all_finite:
            self.hist += np.bincount(flat.ravel(), minlength=self.hist.size)
        else:
            self.hist += np.bincount(flat[finite], minlength=self.hist.size)

    def _bins(self, X: np.ndarray) -> np.ndarray:
        """Bin index per value: how many edges lie below it (edges[i-1] < x <= edges[i]).

        Equal to np.searchsorted(edges, x, side="left") column by column; one vectorised
        comparison per edge position is several times faster than searchsorted per column
        or a 3-D broadcast. NaN lands in bin 0 and is masked out by the caller.
        """
        k = self._edges.shape[1]
        bins = np.zeros(X.shape, dtype=np.uint8 if k < 255 else np.int64)
        above = np.empty(X.shape, dtype=bool)
        for j in range(int(self._lengths.max()) if self.n_features else 0):
            np.greater(X, self._edges[:, j], out=above)
            bins += above
        return bins

    def _merge_moments(self, n_b: np.ndarray, mean_b: np.ndarray, m2_b: np.ndarray) -> None:
        n_a = self.count
        n = n_a + n_b
        safe = np.maximum(n, 1)
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / safe)
        self.m2 = self.m2 + m2_b + delta**2 * (n_a * n_b / safe)
        self.count = n

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.n_features != self.n_features or other._width != self._width:
            raise ValueError("cannot merge statistics on different features or bin edges")
        self._merge_moments(other.count, other.mean, other.m2)
        self.nan += other.nan
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)
        self.hist += other.hist
        return self

    def histograms(self) -> list[list[int]]:
        h = self.hist.reshape(self.n_features, self._width)
        return [h[i, : self._lengths[i] + 1].tolist() for i in range(self.n_features)]

    def to_dict(self) -> dict:
        """The wire form (column-wise lists)."""
        has = self.count > 0
        return {
            "count": self.count.tolist(),
            "nan": self.nan.tolist(),
            "mean": _rounded_where(self.mean, has),
            "m2": _rounded_where(self.m2, has),
            "min": _rounded_where(self.min, has),
            "max": _rounded_where(self.max, has),
            "hist": self.histograms(),
        }

    @classmethod
    def from_dict(cls, d: dict, bin_edges: Sequence[Sequence[float]]) -> "FeatureStats":
        fs = cls(bin_edges)
        fs.count = np.asarray(d["count"], dtype=np.int64)
        fs.nan = np.asarray(d["nan"], dtype=np.int64)
        fs.mean = _filled(d["mean"], 0.0)
        fs.m2 = _filled(d["m2"], 0.0)
        fs.min = _filled(d["min"], np.inf)
        fs.max = _filled(d["max"], -np.inf)
        fs._set_histograms(d["hist"])
        return fs

    def _set_histograms(self, hists: Sequence[Sequence[int]]) -> None:
        """Take per-feature histogram counts (one more than the feature's bin edges)."""
        h = self.hist.reshape(self.n_features, self._width)
        for i, counts in enumerate(hists):
            if len(counts) != self._lengths[i] + 1:
                raise ValueError(f"feature {i}: {len(counts)} histogram counts for {self._lengths[i]} bin edges")
            h[i, : len(counts)] = counts


def _rounded_where(values: np.ndarray, has: np.ndarray) -> list:
    """Values rounded to 6 significant digits where has is true, None elsewhere."""
    return [round6(float(v)) if h else None for v, h in zip(values, has, strict=True)]


def _filled(values: Sequence, fill: float) -> np.ndarray:
    """A float64 array of values with None replaced by fill."""
    return np.array([v if v is not None else fill for v in values], dtype=np.float64)


def merge_many_feature_dicts(blocks: Sequence[dict], bin_edges: Sequence[Sequence[float]]) -> FeatureStats:
    """Merge many wire-form feature blocks at once (what the monitor does for every evaluation).

    The same result as folding :meth:`FeatureStats.merge` over them, computed column-wise in one
    pass: total counts, the pooled mean, and M2 = sum of M2 + sum n_w (mean_w - mean)^2.
    """
    fs = FeatureStats(bin_edges)
    if not blocks:
        return fs
    f = fs.n_features
    for d in blocks:
        if len(d["count"]) != f or len(d["hist"]) != f:
            raise ValueError(f"a window has {len(d['count'])} features, the profile {f}")
    _merge_moments(fs, blocks)
    lengths = fs._lengths + 1
    flat_idx = np.concatenate([i * fs._width + np.arange(k) for i, k in enumerate(lengths)]) if f else np.zeros(0, int)
    np.add.at(fs.hist, flat_idx, _summed_histograms(blocks, lengths))
    return fs


def _merge_moments(fs: FeatureStats, blocks: Sequence[dict]) -> None:
    """Counts, NaNs, the pooled mean and M2, minima and maxima of the blocks, column-wise."""
    def col(key, fill):
        return np.array([[fill if v is None else v for v in d[key]] for d in blocks], dtype=np.float64)

    n = np.array([d["count"] for d in blocks], dtype=np.int64)              # (W, F)
    fs.nan = np.array([d["nan"] for d in blocks], dtype=np.int64).sum(axis=0)
    fs.count = n.sum(axis=0)
    means, m2s = col("mean", 0.0), col("m2", 0.0)
    safe = np.maximum(fs.count, 1)
    fs.mean = (n * means).sum(axis=0) / safe
    fs.m2 = m2s.sum(axis=0) + (n * (means - fs.mean) ** 2).sum(axis=0)
    fs.min = col("min", np.inf).min(axis=0)
    fs.max = col("max", -np.inf).max(axis=0)


def _summed_histograms(blocks: Sequence[dict], lengths: np.ndarray) -> np.ndarray:
    """The windows' histograms, each flattened feature after feature, summed; ValueError on a length mismatch."""
    total = int(lengths.sum())
    rows = []
    for d in blocks:
        flat = [c for h in d["hist"] for c in h]
        if len(flat) != total or any(len(h) != k for h, k in zip(d["hist"], lengths, strict=True)):
            raise ValueError("a window's histogram lengths do not match the bin edges")
        rows.append(flat)
    return np.asarray(rows, dtype=np.int64).sum(axis=0)


def merge_feature_dicts(a: dict, b: dict, bin_edges: Sequence[Sequence[float]]) -> dict:
    """Merge two wire-form feature blocks."""
    return FeatureStats.from_dict(a, bin_edges).merge(FeatureStats.from_dict(b, bin_edges)).to_dict()


class ClassCounts:
    """How often each class was predicted (the wire ``predictions`` block of a classifier).

    >>> a, b = ClassCounts(3), ClassCounts(3)
    >>> a.update(np.array([0, 2, 2])); b.update(np.array([1]))
    >>> a.merge(b).to_dict()
    {'counts': [1, 1, 2]}
    """

    def __init__(self, n_classes: int):
        self.counts = np.zeros(n_classes, dtype=np.int64)

    def update(self, class_indices: np.ndarray) -> None:
        n = len(self.counts)
        self.counts += np.bincount(np.asarray(class_indices, dtype=np.int64), minlength=n)[:n]

    def merge(self, other: "ClassCounts") -> "ClassCounts":
        if len(other.counts) != len(self.counts):
            raise ValueError(f"cannot merge counts of {len(self.counts)} and {len(other.counts)} classes")
        self.counts += other.counts
        return self

    def to_dict(self) -> dict:
        return {"counts": self.counts.tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassCounts":
        cc = cls(len(d["counts"]))
        cc.counts[:] = d["counts"]
        return cc


def merge_latency_dicts(a: dict, b: dict) -> dict:
    """Merge two wire-form ``latency_ms`` blocks (quantiles are recomputed from the merged buckets)."""
    return LatencyHistogram.from_dict(a).merge(LatencyHistogram.from_dict(b)).to_dict()


def merge_class_dicts(a: dict, b: dict) -> dict:
    """Merge two wire-form classifier ``predictions`` blocks."""
    return ClassCounts.from_dict(a).merge(ClassCounts.from_dict(b)).to_dict()
