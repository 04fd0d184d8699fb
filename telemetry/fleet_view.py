"""A fleet's merged recent statistics, kept up to date one device at a time.

A fleet-level verdict compares the pooled recent inputs of every device of the
fleet with the reference profile. Re-merging every device's recent windows for
each verdict costs devices x windows (1.4 s at 1,000 devices); here each device
keeps its own merge of its recent windows (recomputed when it reports, which
the device-level evaluation loads anyway), and the fleet keeps the sum of those,
adjusted by the difference whenever one device changes. The statistics are
mergeable by design: counts, NaN counts, histograms, class and confidence counts
add; means and M2 travel as sums and sums of squares; minima and maxima are one
vectorised reduction over the devices. A verdict therefore costs the same at
1,000 and at 10,000 devices (``python -m benchmarks.monitor_rounds``).

>>> import numpy as np
>>> view = FleetView()
>>> w = {"features": {"count": [2], "nan": [0], "mean": [1.0], "m2": [2.0], "min": [0.0], "max": [2.0],
...                   "hist": [[1, 1]]}, "predictions": {"counts": [2, 0]}, "count": 2, "errors": 0}
>>> view.update("f", "m", "1", "d1", [w]); view.update("f", "m", "1", "d2", [w])
>>> merged = view.merged("f", "m", "1")
>>> merged["features"]["count"], merged["features"]["hist"], merged["predictions"]["counts"]
([4], [[2, 2]], [4, 0])
>>> round(merged["features"]["m2"][0], 6)       # two identical samples {0, 2}: M2 = 4 x 1
4.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from edge_runtime import distinct
from edge_runtime.stats import LatencyHistogram

_ADDITIVE = ("count", "nan", "sum", "sumsq", "hist", "classes", "confidence", "inferences", "errors", "confusion")


@dataclass
class _DeviceStats:
    """One device's merge of its recent windows, in additive form."""

    count: np.ndarray
    nan: np.ndarray
    sum: np.ndarray
    sumsq: np.ndarray
    hist: np.ndarray          # every feature's bins, concatenated
    classes: np.ndarray
    confidence: np.ndarray
    inferences: np.ndarray
    errors: np.ndarray
    min: np.ndarray
    max: np.ndarray
    lengths: tuple[int, ...]  # bins per feature
    distinct: np.ndarray | None = None   # the merged distinct-rows sketch (None: a window without one)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros(0))   # labelled counts, classes x classes flat


def _stats(windows: list[dict]) -> _DeviceStats | None:
    blocks = [w["features"] for w in windows]
    if not blocks:
        return None
    lengths = tuple(len(h) for h in blocks[0]["hist"])
    if any(tuple(len(h) for h in b["hist"]) != lengths for b in blocks):
        return None
    n = _column(blocks, "count", 0.0)
    means, m2s = _column(blocks, "mean", 0.0), _column(blocks, "m2", 0.0)
    sums = n * means
    sumsq = m2s + n * means ** 2
    return _DeviceStats(count=n.sum(axis=0), nan=_column(blocks, "nan", 0.0).sum(axis=0), sum=sums.sum(axis=0),
                        sumsq=sumsq.sum(axis=0), hist=_summed_hist(blocks, lengths),
                        classes=_summed_predictions(windows, "counts"),
                        confidence=_summed_predictions(windows, "confidence"),
                        inferences=np.array([_total(windows, "count")]),
                        errors=np.array([_total(windows, "errors")]),
                        min=_column(blocks, "min", np.inf).min(axis=0), max=_column(blocks, "max", -np.inf).max(axis=0),
                        lengths=lengths, distinct=_distinct(windows), confusion=_confusion(windows))


def _column(blocks: list[dict], key: str, fill: float) -> np.ndarray:
    """The per-feature values under ``key`` of each window's features block (windows x features), None as fill."""
    return np.array([[fill if v is None else v for v in b[key]] for b in blocks], dtype=np.float64)


def _summed_hist(blocks: list[dict], lengths: tuple[int, ...]) -> np.ndarray:
    """Every feature's histogram, concatenated, summed over the windows."""
    if not lengths:
        return np.zeros(0)
    return np.array([np.concatenate([np.asarray(h, dtype=np.float64) for h in b["hist"]])
                     for b in blocks]).sum(axis=0)


def _summed_predictions(windows: list[dict], key: str) -> np.ndarray:
    """The windows' summed predictions[key] counts (empty when none have them or their lengths differ)."""
    rows = [w.get("predictions", {}).get(key) for w in windows]
    rows = [r for r in rows if r is not None]
    if not rows or any(len(r) != len(rows[0]) for r in rows):
        return np.zeros(0)
    return np.asarray(rows, dtype=np.float64).sum(axis=0)


def _total(windows: list[dict], key: str) -> float:
    return float(sum(w.get(key) or 0 for w in windows))


def _confusion(windows: list[dict]) -> np.ndarray:
    """The windows' summed labels.confusion, flattened (zeros of classes x classes without labels)."""
    k = max((len(w.get("predictions", {}).get("counts") or []) for w in windows), default=0)
    out = np.zeros(k * k)
    for w in windows:
        c = _window_confusion(w)
        if c and len(c) == k:
            out += np.asarray(c, dtype=np.float64).ravel()
    return out


def _window_confusion(w: dict) -> list | None:
    return (w.get("labels") or {}).get("confusion")


def _distinct(windows: list[dict]) -> np.ndarray | None:
    regs = [w.get("distinct") for w in windows]
    return None if any(r is None or len(r) != distinct.REGISTERS for r in regs) else distinct.merge(regs)


@dataclass
class _FleetStats:
    devices: dict[str, _DeviceStats] = field(default_factory=dict)
    total: dict[str, np.ndarray] = field(default_factory=dict)
    updates: int = 0
    windows: dict[str, list[dict]] = field(default_factory=dict)   # the latest devices' own windows
    seen: dict[str, float] = field(default_factory=dict)           # device -> when it was last updated


class FleetView:
    """Per (fleet, model name, version): each device's merged recent windows and their running sum.

    Args:
        rebuild_every: recompute the sums from the devices after this many updates (floating-point
            sums that are added to and subtracted from drift; a rebuild costs one pass over the devices).
    """

    def __init__(self, rebuild_every: int = 5_000, sample_devices: int = 16):
        self.rebuild_every = rebuild_every
        self.sample_devices = sample_devices
        self._fleets: dict[tuple[str, str, str], _FleetStats] = {}

    def update(self, fleet: str, name: str, version: str, device: str, recent: list[dict]) -> None:
        """A device's recent windows (those its own evaluation just loaded) replace its previous ones."""
        key = (fleet, name, version)
        fs = self._fleets.setdefault(key, _FleetStats())
        old = fs.devices.pop(device, None)
        new = _fitting(_stats(recent), fs.devices)
        if new is not None:
            self._keep(fs, device, new, recent)
        else:
            _forget(fs, device)
        fs.updates += 1
        if self._rebuild_due(fs, old) or not _add_difference(fs.total, new, old):
            self._rebuild(fs)

    def _rebuild_due(self, fs: _FleetStats, old: _DeviceStats | None) -> bool:
        """Every ``rebuild_every`` updates, with no sums yet, or when the last device left."""
        return fs.updates % self.rebuild_every == 0 or not fs.total or (old is not None and not fs.devices)

    def _keep(self, fs: _FleetStats, device: str, new: _DeviceStats, recent: list[dict]) -> None:
        """Store a device's new statistics and windows (the windows of the latest ``sample_devices`` only)."""
        fs.devices[device] = new
        fs.windows.pop(device, None)
        fs.windows[device] = recent
        while len(fs.windows) > self.sample_devices:
            fs.windows.pop(next(iter(fs.windows)))
        fs.seen[device] = time.monotonic()

    def _rebuild(self, fs: _FleetStats) -> None:
        devs = list(fs.devices.values())
        fs.total = {k: np.sum([getattr(d, k) for d in devs], axis=0) if devs else np.zeros(0) for k in _ADDITIVE}

    def expire(self, fleet: str, name: str, version: str, max_age_s: float) -> int:
        """Leave out devices not updated for ``max_age_s`` (a device that went quiet or moved to another
        version no longer speaks for the fleet); returns how many left."""
        fs = self._fleets.get((fleet, name, version))
        if not fs:
            return 0
        cutoff = time.monotonic() - max_age_s
        gone = [d for d, t in fs.seen.items() if t < cutoff]
        for d in gone:
            _forget(fs, d)
        if gone:
            self._rebuild(fs)
        return len(gone)

    def devices(self, fleet: str, name: str, version: str) -> int:
        fs = self._fleets.get((fleet, name, version))
        return len(fs.devices) if fs else 0

    def merged(self, fleet: str, name: str, version: str) -> dict | None:
        """One window-shaped dict holding the pooled recent statistics of every device of the fleet."""
        fs = self._fleets.get((fleet, name, version))
        if not fs or not fs.devices:
            return None
        t = fs.total
        return {
            "device_id": "*", "seq": 0,
            "count": int(round(float(t["inferences"][0]))), "errors": int(round(float(t["errors"][0]))),
            "latency_ms": LatencyHistogram().to_dict(),
            "features": _pooled_features(t, list(fs.devices.values())),
            "predictions": _pooled_predictions(t),
            **_labels(t["confusion"]),
            **_pooled_distinct([d.distinct for d in fs.devices.values()]),
        }

    def sample_windows(self, fleet: str, name: str, version: str) -> list[dict]:
        """The recent windows of the most recently updated devices (at most ``sample_devices``): what the
        dependence between consecutive windows is estimated from, at a cost that does not grow with the fleet."""
        fs = self._fleets.get((fleet, name, version))
        return [w for ws in fs.windows.values() for w in ws] if fs else []


def _forget(fs: _FleetStats, device: str) -> None:
    """Leave a device out of the fleet: its statistics, windows and last update."""
    fs.devices.pop(device, None)
    fs.windows.pop(device, None)
    fs.seen.pop(device, None)


def _add_difference(total: dict[str, np.ndarray], new: _DeviceStats | None, old: _DeviceStats | None) -> bool:
    """Add a device's new statistics minus its old ones to the fleet's running sums; False (sums partly
    updated: rebuild them) when a difference does not have the shape of its sum."""
    for k in _ADDITIVE:
        delta = _part(new, k) - _part(old, k)
        if np.ndim(delta) and total[k].shape != np.shape(delta):
            return False
        total[k] = total[k] + delta
    return True


def _pooled_features(t: dict[str, np.ndarray], devices: list[_DeviceStats]) -> dict:
    """The fleet's ``features`` block: pooled counts, mean, m2 and histograms; min and max over devices."""
    n = t["count"]
    mean = t["sum"] / np.maximum(n, 1.0)
    m2 = np.maximum(t["sumsq"] - n * mean ** 2, 0.0)
    mins = np.min([d.min for d in devices], axis=0)
    maxs = np.max([d.max for d in devices], axis=0)
    bounds = np.cumsum((0,) + devices[0].lengths)
    hist = [np.rint(t["hist"][a:b]).astype(int).tolist() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    seen = n > 0
    return {"count": np.rint(n).astype(int).tolist(), "nan": np.rint(t["nan"]).astype(int).tolist(),
            "mean": np.where(seen, mean, 0.0).tolist(), "m2": np.where(seen, m2, 0.0).tolist(),
            "min": _finite_or_none(mins), "max": _finite_or_none(maxs), "hist": hist}


def _finite_or_none(values: np.ndarray) -> list[float | None]:
    """Values as floats, None for a feature no device saw (an infinite bound)."""
    return [float(x) if np.isfinite(x) else None for x in values]


def _pooled_predictions(t: dict[str, np.ndarray]) -> dict:
    """The fleet's ``predictions`` block: pooled class counts and confidence histogram, when devices send them."""
    predictions = {}
    if t["classes"].size:
        predictions["counts"] = np.rint(t["classes"]).astype(int).tolist()
    if t["confidence"].size:
        predictions["confidence"] = np.rint(t["confidence"]).astype(int).tolist()
    return predictions


def _part(stats: _DeviceStats | None, k: str):
    """A device's share of the running sum ``k`` (0 for no device)."""
    return getattr(stats, k) if stats is not None else 0.0


def _pooled_distinct(sketches: list[np.ndarray | None]) -> dict:
    """The fleet's distinct-rows sketch: a max over devices x 64 bytes, like min and max (none unless every
    device has one)."""
    if any(r is None for r in sketches):
        return {}
    return {"distinct": np.max(sketches, axis=0).tolist()}


def _labels(flat: np.ndarray) -> dict:
    """The fleet's pooled ``labels`` block (none without labelled inferences)."""
    k = int(round(np.sqrt(flat.size)))
    if not k or k * k != flat.size or not flat.any():
        return {}
    confusion = np.rint(flat).astype(int).reshape(k, k)
    return {"labels": {"n": int(confusion.sum()), "confusion": confusion.tolist(), "unmatched": 0}}


def _fitting(new: _DeviceStats | None, devices: dict[str, _DeviceStats]) -> _DeviceStats | None:
    """``new``, unless its layout differs from the other devices' (another model's feature layout under
    this version: left out)."""
    if new is not None and devices and not _compatible(new, next(iter(devices.values()))):
        return None
    return new


def _compatible(a: _DeviceStats, b: _DeviceStats) -> bool:
    return a.lengths == b.lengths and a.classes.shape == b.classes.shape and a.confidence.shape == b.confidence.shape
