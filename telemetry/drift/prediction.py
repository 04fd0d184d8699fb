"""Prediction drift: the predicted-class histogram against the reference class priors.

The priors come from the model's own predictions on its reference data, so a
significant difference means the model now sees inputs it classifies
differently, even when no single input feature moved much.

The priors are themselves a sample: the Wine reference holds 124 rows, and its
class shares are known to a few points only. Given the reference size
``ref_n``, the test is a chi-square test of homogeneity of two samples (the
reference counts prior x ref_n against the current counts), which carries
the uncertainty of both; without it, a goodness-of-fit test against priors
taken as exact. As with every test on large counts, an effect size guards
against flagging trivial changes: the total variation distance between the
current shares and the priors must reach ``min_tvd``.

Parameters: ``alpha`` (default 0.001), ``min_tvd`` (default 0.1), ``min_count``.

Reference: Rabanser, S., Guennemann, S. and Lipton, Z. (2019). Failing
Loudly: An Empirical Study of Methods for Detecting Dataset Shift. NeurIPS
(black-box shift detection on predictions).

>>> d = PredictionDriftDetector()
>>> d.update([0.5, 0.5], [52, 48]).drift_detected
False
>>> d.update([0.5, 0.5], [90, 10]).drift_detected
True

A 12-point move of the shares over 2,000 predictions is certain against exact
priors, but within what 124 reference rows can tell:

>>> d.update([0.33, 0.40, 0.27], [900, 560, 540]).drift_detected
True
>>> d.update([0.33, 0.40, 0.27], [900, 560, 540], ref_n=124).drift_detected
False
>>> d.update([0.33, 0.40, 0.27], [1400, 300, 300], ref_n=124).drift_detected
True
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2


class PredictionDriftDetector:
    def __init__(self, alpha: float = 0.001, min_tvd: float = 0.1, min_count: int = 30):
        self.alpha = alpha
        self.min_tvd = min_tvd
        self.min_count = min_count
        self.p_value = 1.0
        self.tvd = 0.0
        self.count = 0

    def update(self, priors, counts, ref_n: int | None = None) -> "PredictionDriftDetector":
        """Compare current class ``counts`` with ``priors`` (from ``ref_n`` reference predictions, if known)."""
        c = np.asarray(counts, dtype=np.float64)
        p = np.asarray(priors, dtype=np.float64)
        self.count = int(c.sum())
        if self.count == 0 or p.size != c.size:
            self.p_value, self.tvd = 1.0, 0.0
            return self
        self.tvd = float(0.5 * np.abs(c / self.count - p / p.sum()).sum())
        if ref_n:
            ref = p / p.sum() * float(ref_n)
            table = np.vstack([ref, c])
            table = table[:, table.sum(axis=0) > 0]             # a class neither sample has tells nothing
            expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
            stat = float(((table - expected) ** 2 / expected).sum())
            dof = max(1, table.shape[1] - 1)
        else:
            q = np.maximum(p, 1e-6)
            q = q / q.sum()
            expected = q * self.count
            stat = float(((c - expected) ** 2 / expected).sum())
            dof = max(1, c.size - 1)
        self.p_value = float(chi2.sf(stat, dof))
        return self

    @property
    def drift_detected(self) -> bool:
        return self.count >= self.min_count and self.p_value < self.alpha and self.tvd >= self.min_tvd
