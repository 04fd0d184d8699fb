"""Mean and spread shift of a feature against its reference, as effect sizes.

From the merged window statistics (count, mean, M2) the current mean and
standard deviation are compared with the reference profile's: the mean shift
is measured in reference standard deviations, |mean_cur - mean_ref| / std_ref,
and the spread shift as the ratio std_cur / std_ref. Effect sizes, unlike
p-values, do not grow with the sample size, so a large fleet does not alarm on
shifts nobody cares about; a minimum count keeps small windows from deciding.

Parameters: ``max_mean_shift`` (default 0.5 reference std), ``max_std_ratio``
(default 2.0; a ratio below its inverse counts too), ``min_count``.

Reference: Cohen, J. (1988). Statistical Power Analysis for the Behavioral
Sciences, 2nd ed. (standardised mean difference).

>>> d = MeanShiftDetector(max_mean_shift=0.5)
>>> d.update(ref_mean=10.0, ref_std=2.0, count=100, mean=10.4, m2=100 * 4.0).drift_detected
False
>>> d.update(ref_mean=10.0, ref_std=2.0, count=100, mean=12.0, m2=100 * 4.0).drift_detected
True
>>> round(d.mean_shift, 2), round(d.std_ratio, 2)
(1.0, 1.0)
"""

from __future__ import annotations

import math


class MeanShiftDetector:
    def __init__(self, max_mean_shift: float = 0.5, max_std_ratio: float = 2.0, min_count: int = 30):
        self.max_mean_shift = max_mean_shift
        self.max_std_ratio = max_std_ratio
        self.min_count = min_count
        self.mean_shift = 0.0
        self.std_ratio = 1.0
        self.count = 0

    def update(self, ref_mean: float, ref_std: float, count: int, mean: float | None, m2: float | None):
        self.count = count
        if count < self.min_count or mean is None or m2 is None:
            self.mean_shift, self.std_ratio = 0.0, 1.0
            return self
        scale = ref_std if ref_std > 0 else 1.0
        std = math.sqrt(max(m2, 0.0) / count)
        self.mean_shift = abs(mean - ref_mean) / scale
        self.std_ratio = (std / ref_std) if ref_std > 0 else 1.0
        return self

    @property
    def drift_detected(self) -> bool:
        if self.count < self.min_count:
            return False
        r = self.std_ratio
        return self.mean_shift > self.max_mean_shift or r > self.max_std_ratio or (r > 0 and r < 1 / self.max_std_ratio)
