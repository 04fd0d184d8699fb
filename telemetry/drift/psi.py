"""Population Stability Index (PSI) between a reference and a current histogram.

PSI sums, over the bins, (p_cur - p_ref) * ln(p_cur / p_ref), where p are the
bin shares. It is zero for identical distributions and grows with any shift of
mass between bins, in either direction. The rule of thumb of credit scoring,
where it comes from, reads below 0.1 as stable, 0.1-0.25 as a moderate shift and
above 0.25 as a major one. Empty bins are floored at ``eps`` so the logarithm
stays finite.

Because the device counts its inputs on the reference profile's quantile edges,
each reference bin holds about the same share and PSI weighs shifts anywhere in
the range, including values beyond the reference extremes (the first and last
bins are open-ended).

Parameters: ``threshold`` (default 0.2) for :class:`PSIDetector`, ``eps``.

Reference: Yurdakul, B. (2018). Statistical properties of population stability
index. Western Michigan University dissertation.

>>> round(psi([50, 50], [50, 50]), 6)
0.0
>>> round(psi([50, 50], [90, 10]), 3)
0.879
>>> d = PSIDetector(threshold=0.2)
>>> d.update([25, 25, 25, 25], [10, 10, 10, 70]).drift_detected
True
"""

from __future__ import annotations

import numpy as np


def psi(reference: list[int] | np.ndarray, current: list[int] | np.ndarray, eps: float = 1e-4) -> float:
    """PSI between two histograms on the same bins (counts, not shares)."""
    r = np.asarray(reference, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    if r.shape != c.shape:
        raise ValueError(f"histograms have {r.size} and {c.size} bins")
    if r.sum() <= 0 or c.sum() <= 0:
        return 0.0
    p = np.maximum(r / r.sum(), eps)
    q = np.maximum(c / c.sum(), eps)
    return float(((q - p) * np.log(q / p)).sum())


class PSIDetector:
    """Flags drift when PSI reaches ``threshold``."""

    def __init__(self, threshold: float = 0.2, eps: float = 1e-4):
        self.threshold = threshold
        self.eps = eps
        self.value = 0.0

    def update(self, reference, current) -> "PSIDetector":
        self.value = psi(reference, current, self.eps)
        return self

    @property
    def drift_detected(self) -> bool:
        return self.value >= self.threshold
