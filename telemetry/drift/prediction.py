"""Prediction drift: the predicted-class histogram against the reference class priors.

A chi-square goodness-of-fit test compares the class counts of recent windows
with the counts the reference priors predict (prior x total). Since the priors
come from the model's own predictions on its reference data, a significant
difference means the model now sees inputs it classifies differently, even
when no single input feature moved much. As with every test on large counts,
an effect size guards against flagging trivial changes: the total variation
distance between the current shares and the priors must reach ``min_tvd``.

Parameters: ``alpha`` (default 0.001), ``min_tvd`` (default 0.1), ``min_count``.

Reference: Rabanser, S., Guennemann, S. and Lipton, Z. (2019). Failing
Loudly: An Empirical Study of Methods for Detecting Dataset Shift. NeurIPS
(black-box shift detection on predictions).

>>> d = PredictionDriftDetector()
>>> d.update([0.5, 0.5], [52, 48]).drift_detected
False
>>> d.update([0.5, 0.5], [90, 10]).drift_detected
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

    def update(self, priors, counts) -> "PredictionDriftDetector":
        c = np.asarray(counts, dtype=np.float64)
        p = np.asarray(priors, dtype=np.float64)
        self.count = int(c.sum())
        if self.count == 0 or p.size != c.size:
            self.p_value, self.tvd = 1.0, 0.0
            return self
        p = np.maximum(p, 1e-6)
        p = p / p.sum()
        expected = p * self.count
        stat = float(((c - expected) ** 2 / expected).sum())
        self.p_value = float(chi2.sf(stat, max(1, c.size - 1)))
        self.tvd = float(0.5 * np.abs(c / self.count - p).sum())
        return self

    @property
    def drift_detected(self) -> bool:
        return self.count >= self.min_count and self.p_value < self.alpha and self.tvd >= self.min_tvd
