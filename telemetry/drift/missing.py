"""Missing-value rate of a feature against its reference.

A sensor that starts returning NaN, or an upstream join that loses a column,
shows as NaN counts in the telemetry (with the device's NaN policy set to
count). The detector compares the current NaN rate, nan / (nan + count), with
the reference profile's ``nan_rate`` and flags an increase of more than
``max_increase`` once ``min_count`` values were seen.

Parameters: ``max_increase`` (default 0.05, i.e. 5 points), ``min_count``.

Reference: the data-quality checks of TFX Data Validation (Breck et al., 2019,
"Data Validation for Machine Learning", SysML).

>>> d = MissingRateDetector(max_increase=0.05)
>>> d.update(ref_rate=0.0, count=95, nan=5).drift_detected
False
>>> d.update(ref_rate=0.0, count=80, nan=20).drift_detected
True
>>> d.rate
0.2
"""

from __future__ import annotations


class MissingRateDetector:
    def __init__(self, max_increase: float = 0.05, min_count: int = 30):
        self.max_increase = max_increase
        self.min_count = min_count
        self.rate = 0.0
        self.ref_rate = 0.0
        self.seen = 0

    def update(self, ref_rate: float, count: int, nan: int) -> "MissingRateDetector":
        self.seen = count + nan
        self.ref_rate = ref_rate or 0.0
        self.rate = nan / self.seen if self.seen else 0.0
        return self

    @property
    def drift_detected(self) -> bool:
        return self.seen >= self.min_count and self.rate - self.ref_rate > self.max_increase
