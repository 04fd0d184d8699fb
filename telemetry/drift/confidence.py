"""Confidence drift: the model's top-class probabilities against those on held-out data.

Per-channel image statistics cannot see a shift that only rearranges pixels: a
camera mounted upside down, or digits rotated 90 degrees, keep every channel's
value distribution, yet the classifier now sees shapes it was not trained on,
and its confidence falls. Black-box shift detection (Rabanser et al.) tests the
model's own outputs for such shifts. Here each window carries the histogram of
its top-class probability on fixed edges, and the bundle's reference profile
holds the same histogram from the holdout data.

The test is a chi-square test of homogeneity of the two samples (the holdout
is a sample too: its size counts), and, as everywhere in the monitor, a
significant change must also be large: the PSI between the two histograms must
reach ``min_psi``. It is one-sided: the mean confidence (bin midpoints) must
have fallen by at least ``min_drop``. A model that is surer of itself than on
its holdout (replayed training data, an easy stretch of inputs) is no alarm;
``mean_drop`` is what an operator reads.

Parameters: ``alpha`` (default 0.001), ``min_psi`` (default 0.1), ``min_drop`` (default 0.02),
``min_count`` (default 200).

Reference: Rabanser, S., Guennemann, S. and Lipton, Z. (2019). Failing Loudly:
An Empirical Study of Methods for Detecting Dataset Shift. NeurIPS.

>>> ref = [0, 0, 0, 0, 2, 2, 3, 5, 8, 30, 150]          # a confident model on its holdout
>>> d = ConfidenceDriftDetector()
>>> d.update(ref, [0, 0, 0, 0, 1, 2, 3, 4, 8, 32, 150]).drift_detected
False
>>> d.update(ref, [2, 10, 20, 25, 30, 25, 20, 20, 18, 15, 15]).drift_detected
True
>>> round(d.mean_drop, 2) > 0.2
True
>>> d.update([0, 0, 0, 5, 10, 10, 20, 30, 30, 40, 55], ref).drift_detected    # surer than on the holdout
False
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

from telemetry.drift.psi import psi

MIDPOINTS = np.array([0.15, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 0.925, 0.97, 0.995])


class ConfidenceDriftDetector:
    def __init__(self, alpha: float = 0.001, min_psi: float = 0.1, min_count: int = 200, min_drop: float = 0.02):
        self.alpha, self.min_psi, self.min_count, self.min_drop = alpha, min_psi, min_count, min_drop
        self.p_value, self.psi, self.mean_drop, self.count = 1.0, 0.0, 0.0, 0

    def update(self, reference, current, n_eff: float | None = None) -> "ConfidenceDriftDetector":
        """Compare the ``current`` confidence histogram with the ``reference`` one (same bins); with
        ``n_eff``, the current counts weigh as that many independent samples (repeated inputs)."""
        r = np.asarray(reference, dtype=np.float64)
        c = np.asarray(current, dtype=np.float64)
        self.count = int(c.sum())
        if r.shape != c.shape or r.sum() <= 0 or self.count == 0:
            self.p_value, self.psi, self.mean_drop = 1.0, 0.0, 0.0
            return self
        if n_eff is not None and 0 < n_eff < c.sum():
            c = c * (n_eff / c.sum())
        self.psi = psi(r, c)
        mids = MIDPOINTS if r.size == MIDPOINTS.size else np.linspace(0, 1, r.size)
        self.mean_drop = float((r / r.sum()) @ mids - (c / c.sum()) @ mids)
        table = np.vstack([r, c])
        table = table[:, table.sum(axis=0) > 0]
        expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
        stat = float(((table - expected) ** 2 / expected).sum())
        self.p_value = float(chi2.sf(stat, max(1, table.shape[1] - 1)))
        return self

    @property
    def drift_detected(self) -> bool:
        return (self.count >= self.min_count and self.p_value < self.alpha and self.psi >= self.min_psi
                and self.mean_drop >= self.min_drop)
