"""Error rate: the share of a device's inferences that failed in the runtime.

A window counts every attempted inference in ``count`` and those the backend failed on in
``errors`` (an exception from LiteRT or ONNX Runtime: a corrupt artifact, a delegate that gave up,
memory). The rate over the recent windows is ``errors / count``; the detector fires above
``max_rate``. Inputs the runtime refused before inference are not errors: they are the
``rejected_inputs`` detector's (rejected.py).

Parameters: ``max_rate`` (0.05, the monitor's ``--error-rate``).

>>> ErrorRateDetector(0.01).update(errors=3, count=100).drift_detected
True
>>> ErrorRateDetector(0.01).update(errors=1, count=100).drift_detected
False
>>> ErrorRateDetector(0.01).update(errors=0, count=0).rate
0.0
"""

from __future__ import annotations


class ErrorRateDetector:
    def __init__(self, max_rate: float = 0.05):
        self.max_rate = max_rate
        self.errors = 0
        self.count = 0
        self.rate = 0.0

    def update(self, errors: int, count: int) -> "ErrorRateDetector":
        self.errors, self.count = int(errors), int(count)
        self.rate = self.errors / self.count if self.count else 0.0
        return self

    @property
    def drift_detected(self) -> bool:
        return self.rate > self.max_rate
