"""Rejected inputs: the share of a device's attempted inferences that its runtime refused.

With the default ``nan_policy=reject`` a device refuses an input that carries a NaN or an
infinity, and one of the wrong shape or type; nothing of it reaches the feature statistics, so no
drift test can see it, while the model stops serving. Each window counts those inputs in
``rejected``; its ``count`` counts every attempt, served, failed or refused (see
``edge_runtime/window.py``: a refusal adds to both). The rate over the recent windows is
``rejected / count``. The detector fires when it exceeds ``max_rate`` once ``min_attempts``
attempts were seen, and calls the change gone (``clear``) only below ``close_ratio`` x
``max_rate``, so a rate hovering at the threshold keeps one alert open instead of flapping.

Parameters: ``max_rate`` (default 0.05), ``min_attempts`` (default 100), ``close_ratio`` (0.5).

Reference: the data-quality checks of TFX Data Validation (Breck et al., 2019, "Data Validation
for Machine Learning", SysML): the share of examples failing the schema, monitored in serving.

>>> d = RejectedInputsDetector()
>>> d.update(attempts=500, rejected=500).drift_detected, d.rate
(True, 1.0)
>>> d.update(attempts=1020, rejected=20).drift_detected
False
>>> d.update(attempts=40, rejected=30).drift_detected      # too few attempts to judge
False
>>> d.update(attempts=1000, rejected=40).clear             # under 5%, but not yet under 2.5%
False
"""

from __future__ import annotations


class RejectedInputsDetector:
    def __init__(self, max_rate: float = 0.05, min_attempts: int = 100, close_ratio: float = 0.5):
        self.max_rate = max_rate
        self.min_attempts = min_attempts
        self.close_ratio = close_ratio
        self.attempts = 0
        self.rejected = 0
        self.rate = 0.0

    def update(self, attempts: int, rejected: int) -> "RejectedInputsDetector":
        """``attempts``: the windows' summed ``count``; ``rejected``: their summed ``rejected``."""
        self.attempts, self.rejected = int(attempts), int(rejected)
        self.rate = min(1.0, self.rejected / self.attempts) if self.attempts > 0 else 0.0
        return self

    @property
    def drift_detected(self) -> bool:
        return self.attempts >= self.min_attempts and self.rate > self.max_rate

    @property
    def clear(self) -> bool:
        """The refusals are gone: too few attempts to say otherwise, or a rate under close_ratio x max_rate."""
        return self.attempts < self.min_attempts or self.rate < self.close_ratio * self.max_rate
