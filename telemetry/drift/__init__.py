"""Drift detectors on binned, mergeable statistics: one test statistic per module."""


class PValueDetector:
    """Base of the two-histogram tests: flags drift when ``test(reference, current)``'s p-value is below ``alpha``."""

    test = None   # (reference counts, current counts) -> (statistic, p-value); set by each subclass

    def __init__(self, alpha: float = 0.01):
        self.alpha = alpha
        self.statistic, self.p_value = 0.0, 1.0

    def update(self, reference, current) -> "PValueDetector":
        self.statistic, self.p_value = type(self).test(reference, current)
        return self

    @property
    def drift_detected(self) -> bool:
        return self.p_value < self.alpha
