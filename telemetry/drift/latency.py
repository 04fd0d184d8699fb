"""Latency regression: a device's inference time against its own baseline, and against an SLO.

A regression is sustained: it fires when every one of the last ``sustain`` windows has a p95 above
``factor`` x the baseline p95 *and* at least ``min_increase_ms`` above it (a fast model that goes from
0.2 to 0.5 ms is 2.5x slower and still irrelevant). One busy second (a cron job, a neighbour loading
a model) lifts the merged p95 of the recent windows but not the p95 of three windows in a row. The
baseline is the bundle's benchmark on the device's board, or the device's own first windows of the
version (the monitor says which in ``baseline_source``). Independently, a p95 over the SLO
(``slo_ms``, none by default) fires at once.

Parameters: ``factor`` (1.5), ``min_increase_ms`` (1.0), ``sustain`` (3 windows), ``slo_ms`` (None).

Reference: the "sustained breach" rule of SLO-based alerting (Beyer et al., 2018, The Site
Reliability Workbook, chapter 5: alert on a burn that persists, not on one bad minute).

>>> d = LatencyDetector(factor=1.5, min_increase_ms=1.0, sustain=3)
>>> d.update([4.1, 4.3, 4.0], p95=4.3, baseline_p95=2.0).drift_detected      # 3 slow windows in a row
True
>>> d.reasons["sustained_p95_ms"]
4.0
>>> d.update([2.1, 9.0, 2.2], p95=9.0, baseline_p95=2.0).drift_detected      # one busy window
False
>>> d.update([0.5, 0.5, 0.5], p95=0.5, baseline_p95=0.2).drift_detected      # 2.5x, but 0.3 ms
False
>>> LatencyDetector(slo_ms=5.0).update([], p95=6.0, baseline_p95=None).reasons
{'slo_ms': 5.0}
"""

from __future__ import annotations

from typing import Sequence


class LatencyDetector:
    def __init__(self, factor: float = 1.5, min_increase_ms: float = 1.0, sustain: int = 3,
                 slo_ms: float | None = None):
        self.factor = factor
        self.min_increase_ms = min_increase_ms
        self.sustain = max(1, sustain)
        self.slo_ms = slo_ms
        self.reasons: dict[str, float] = {}

    def update(self, last_p95s: Sequence[float], p95: float, baseline_p95: float | None) -> "LatencyDetector":
        """``last_p95s``: the p95 of each of the most recent windows (oldest first); ``p95``: the merged p95."""
        self.reasons = {}
        last = list(last_p95s)[-self.sustain:]
        floor = min(last) if len(last) == self.sustain else 0.0
        if baseline_p95 and floor > self.factor * baseline_p95 and floor - baseline_p95 >= self.min_increase_ms:
            self.reasons["baseline_p95_ms"] = baseline_p95
            self.reasons["sustained_p95_ms"] = floor
        if self.slo_ms is not None and p95 > self.slo_ms:
            self.reasons["slo_ms"] = self.slo_ms
        return self

    @property
    def drift_detected(self) -> bool:
        return bool(self.reasons)
