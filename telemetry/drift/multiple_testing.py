"""Corrections for testing many features at once: Bonferroni and Benjamini-Hochberg.

Testing 30 features at alpha = 0.01 each raises a false alarm on a clean stream
about 26% of the time. Bonferroni divides alpha by the number of tests and so
bounds the chance of any false alarm (family-wise error rate); it is strict
when features are many. Benjamini-Hochberg sorts the p-values and rejects the
k smallest, where k is the largest rank with p_(k) <= k / m * alpha; it bounds
the expected share of false discoveries among the flagged features (false
discovery rate), which keeps more power when several features drift together.

Reference: Benjamini, Y. and Hochberg, Y. (1995). Controlling the false
discovery rate. JRSS B 57(1), 289-300.

>>> benjamini_hochberg([0.001, 0.008, 0.039, 0.041, 0.042, 0.06, 0.074, 0.205], alpha=0.05)
[True, True, False, False, False, False, False, False]
>>> bonferroni([0.001, 0.008, 0.02], alpha=0.05)
[True, True, False]
"""

from __future__ import annotations

import numpy as np


def bonferroni(p_values, alpha: float = 0.05) -> list[bool]:
    p = np.asarray(p_values, dtype=np.float64)
    return (p <= alpha / max(1, p.size)).tolist()


def benjamini_hochberg(p_values, alpha: float = 0.05) -> list[bool]:
    p = np.asarray(p_values, dtype=np.float64)
    m = p.size
    if m == 0:
        return []
    order = np.argsort(p)
    passed = p[order] <= alpha * np.arange(1, m + 1) / m
    k = int(np.nonzero(passed)[0].max()) + 1 if passed.any() else 0
    rejected = np.zeros(m, dtype=bool)
    rejected[order[:k]] = True
    return rejected.tolist()
