"""Chi-square test of homogeneity between a reference histogram and a current one.

The two histograms are treated as a 2 x k contingency table: under the null
hypothesis that both samples come from the same distribution, each cell's
expected count is its row total times its column's share of the grand total,
and the sum of (observed - expected)^2 / expected follows a chi-square
distribution with k - 1 degrees of freedom (bins empty in both are dropped).
It is the binned counterpart of the two-sample Kolmogorov-Smirnov test: it
needs only the counts a device sends, never the raw inputs.

With large samples, tiny and harmless shifts become significant; pair the
p-value with an effect size such as PSI, and correct for testing many features
at once (see multiple_testing.py).

Parameters: ``alpha`` (default 0.01) for :class:`Chi2Detector`.

Reference: Pearson, K. (1900); Agresti, A. (2013). Categorical Data Analysis,
3rd ed., section 3.2.

>>> stat, p = chi2_homogeneity([100, 100, 100], [30, 30, 30])
>>> round(stat, 6), round(p, 6)
(0.0, 1.0)
>>> chi2_homogeneity([100, 100, 100], [10, 20, 60])[1] < 1e-6
True
"""

from __future__ import annotations

import numpy as np
from scipy.special import chdtrc  # the chi-square survival function, without rv_continuous overhead

from telemetry.drift import PValueDetector


def chi2_homogeneity(reference, current) -> tuple[float, float]:
    """(statistic, p-value) of the chi-square test that two histograms share one distribution."""
    table = np.vstack([np.asarray(reference, dtype=np.float64), np.asarray(current, dtype=np.float64)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    expected = table.sum(axis=1, keepdims=True) * table.sum(axis=0, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    return stat, float(chdtrc(table.shape[1] - 1, stat))


class Chi2Detector(PValueDetector):
    """Flags drift when the homogeneity test's p-value falls below ``alpha``."""

    test = staticmethod(chi2_homogeneity)
