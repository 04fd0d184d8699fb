"""Two-sample Kolmogorov-Smirnov test on binned data: the CDFs compared at the bin edges.

The device does not send raw values, only counts on the reference profile's bin edges, so the
empirical CDFs of the reference and of the current window are known exactly at those edges and
nowhere else. D is the largest gap between the two there; the p-value is the asymptotic
Kolmogorov distribution at D * sqrt(n m / (n + m)). Since D on the edges is never larger than D on
the raw values, the test is conservative (it never alarms more often than raw-sample KS would).

It sees what the chi-square test on the same bins can miss: a small systematic move of many
values in one direction (a gain off by a few percent) shifts every CDF point a little the same
way, while each bin's count changes only a little.

Parameters: ``alpha`` for :class:`BinnedKSDetector` (before any multiple-testing correction).

>>> d, p = ks_binned([25, 25, 25, 25], [25, 25, 25, 25])
>>> d, p
(0.0, 1.0)
>>> d, p = ks_binned([250, 250, 250, 250], [100, 200, 300, 400])
>>> round(d, 2), p < 1e-6
(0.2, True)
>>> BinnedKSDetector(alpha=0.01).update([250, 250, 250, 250], [240, 255, 250, 255]).drift_detected
False
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import kolmogorov

from telemetry.drift import PValueDetector


def ks_binned(reference, current) -> tuple[float, float]:
    """(D, p-value) of the two-sample KS test on histograms over the same bins (counts)."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"histograms have {r.size} and {c.size} bins")
    n, m = r.sum(), c.sum()
    if n <= 0 or m <= 0 or r.size < 2:
        return 0.0, 1.0
    d = float(np.max(np.abs(np.cumsum(r)[:-1] / n - np.cumsum(c)[:-1] / m)))
    if d == 0.0:
        return 0.0, 1.0
    return d, float(min(1.0, kolmogorov(d * math.sqrt(n * m / (n + m)))))


class BinnedKSDetector(PValueDetector):
    """Flags drift when the binned KS test's p-value falls below ``alpha``."""

    test = staticmethod(ks_binned)
