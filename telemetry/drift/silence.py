"""Silence: a device that stopped sending windows, or said it went offline.

A device's period is the median gap between the ends of its last windows (10 s until it sent two),
so a device reporting every minute is not called silent after 30 s, nor one reporting every second
left alone for minutes. It is silent when its retained status says ``online: false`` (its last will,
published by the broker when the connection died) or when nothing came for more than ``periods``
periods (at least 1 s each), measured by the monitor's receive time, not the device's clock.

Parameters: ``periods`` (3).

>>> typical_period([0.0, 10.0, 20.0, 31.0, 40.0])
10.0
>>> typical_period([5.0])
10.0
>>> d = SilenceDetector(periods=3)
>>> d.update(online=True, quiet_s=25.0, period_s=10.0).drift_detected
False
>>> d.update(online=True, quiet_s=31.0, period_s=10.0).drift_detected
True
>>> d.update(online=False, quiet_s=0.0, period_s=10.0).drift_detected        # its last will
True
"""

from __future__ import annotations

from typing import Sequence

DEFAULT_PERIOD_S = 10.0


def typical_period(ends: Sequence[float]) -> float:
    """The median gap between consecutive window ends (oldest first); 10 s without two windows."""
    gaps = sorted(b - a for a, b in zip(ends, ends[1:], strict=False) if b > a)
    return gaps[len(gaps) // 2] if gaps else DEFAULT_PERIOD_S


class SilenceDetector:
    def __init__(self, periods: float = 3.0):
        self.periods = periods
        self.silent = False

    def update(self, online: bool | None, quiet_s: float, period_s: float) -> "SilenceDetector":
        self.silent = online is False or quiet_s > self.periods * max(period_s, 1.0)
        return self

    @property
    def drift_detected(self) -> bool:
        return self.silent
