"""The probation of a freshly flashed bundle: its first windows decide whether it stays.

:class:`ProbationJudge` watches the device's primary telemetry windows. It keeps the p95 latency of the
last few windows (the baseline a new bundle is compared with), and once a flash switched the bundle, it
counts the new bundle's first ``RollbackPolicy.windows`` windows and returns a :class:`Verdict`: passed,
or the reason to roll back (too many refused inputs, too many errors, or a latency regression). Carrying
the rollback out (the bundle slots, loading the previous bundle) is the agent's part.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field

from edge_runtime.stats import LatencyHistogram


@dataclass(frozen=True)
class RollbackPolicy:
    """When a freshly flashed bundle rolls itself back: judged on its first ``windows`` windows.

    It rolls back when their error rate is above ``max_error_rate``, when the share of their inputs
    it refused (wrong shape, NaN, ...) is above ``max_rejected_rate`` (a bundle that does not fit
    what the device is fed refuses everything), or their p95 latency (the median of their windows'
    p95, so one window slowed by something else on the device does not decide) is above
    ``latency_factor`` x the same figure of the bundle before, and higher by at least
    ``min_increase_ms``.
    """

    windows: int = 3
    latency_factor: float = 2.0
    min_increase_ms: float = 1.0
    max_error_rate: float = 0.05
    max_rejected_rate: float = 0.2


def window_p95(w: dict) -> float | None:
    """The p95 latency of a telemetry window (None when it served nothing)."""
    return LatencyHistogram.from_dict(w["latency_ms"]).quantile(0.95) if w["count"] else None


def median(values) -> float | None:
    """The upper median (the middle of the sorted values; None for none)."""
    s = sorted(values)
    return s[len(s) // 2] if s else None


@dataclass
class Probation:
    """What the first windows of a flashed bundle added up to."""

    version: str | None
    baseline_p95: float | None
    windows: int = 0
    count: int = 0
    errors: int = 0
    rejected: int = 0
    p95s: list[float] = field(default_factory=list)

    def add(self, w: dict) -> None:
        self.windows += 1
        self.count += w["count"]          # every attempt: served, failed or refused
        self.errors += w["errors"]
        self.rejected += int(w.get("rejected") or 0)
        q = window_p95(w)
        if q is not None:
            self.p95s.append(q)

    def rate(self, n: int) -> float:
        return n / self.count if self.count else 0.0


@dataclass(frozen=True)
class Verdict:
    """The end of a probation: ``reason`` is None when the bundle passed, else why it rolls back."""

    version: str | None
    reason: str | None
    p95_ms: float | None
    baseline_p95_ms: float | None
    error_rate: float
    rejected_rate: float
    windows: int

    @property
    def passed(self) -> bool:
        return self.reason is None

    def figures(self, device_id: str) -> dict:
        """The fields every probation or rollback result carries."""
        return {"id": None, "ts": round(time.time(), 3), "device_id": device_id, "p95_ms": self.p95_ms,
                "baseline_p95_ms": self.baseline_p95_ms, "error_rate": self.error_rate,
                "rejected_rate": self.rejected_rate}


def decide(p: Probation, pol: RollbackPolicy) -> Verdict:
    """The verdict on a completed probation."""
    p95 = median(p.p95s)
    err, refused = p.rate(p.errors), p.rate(p.rejected)
    return Verdict(p.version, _reason(p, pol, p95, err, refused), p95, p.baseline_p95, err, refused, pol.windows)


def _reason(p: Probation, pol: RollbackPolicy, p95: float | None, err: float, refused: float) -> str | None:
    base = p.baseline_p95
    if refused > pol.max_rejected_rate:
        return (f"rejected inputs: {p.rejected} of {p.count} ({refused:.1%}) refused in its first "
                f"{pol.windows} windows, over {pol.max_rejected_rate:.1%}")
    if err > pol.max_error_rate:
        return f"error rate {err:.1%} over {pol.max_error_rate:.1%} in its first {pol.windows} windows"
    if base and p95 is not None and p95 > pol.latency_factor * base and p95 - base >= pol.min_increase_ms:
        return (f"latency regression: p95 {p95:.3f} ms in its first {pol.windows} windows vs {base:.3f} ms "
                f"before the flash (limit x{pol.latency_factor:g})")
    return None


class ProbationJudge:
    """Judges a newly flashed bundle on its first windows (``policy`` None: never by itself).

    Feed it every primary window with :meth:`observe`; call :meth:`baseline` before a switch of bundle and
    :meth:`begin` after it.
    """

    RECENT = 5      # windows whose median p95 is the baseline of the next flash

    def __init__(self, policy: RollbackPolicy | None = RollbackPolicy()):
        self.policy = policy
        self.current: Probation | None = None
        self._recent_p95: collections.deque[float] = collections.deque(maxlen=self.RECENT)

    @property
    def windows(self) -> int:
        """Windows a flashed bundle is judged on (0: none)."""
        return self.policy.windows if self.policy is not None else 0

    @property
    def on_probation(self) -> bool:
        return self.current is not None

    def baseline(self) -> float | None:
        """The median p95 of the last windows (what a new bundle is compared with)."""
        return median(self._recent_p95)

    def begin(self, kind: str, version: str | None, baseline: float | None) -> None:
        """A new bundle runs (``kind``: flash, rollback, auto_rollback, ...); only a flash is judged."""
        self._recent_p95.clear()
        self.current = None
        if kind == "flash" and self.windows > 0:
            self.current = Probation(version, baseline)

    def observe(self, w: dict) -> Verdict | None:
        """Take a primary window; the verdict when it completes a probation."""
        p95 = window_p95(w)
        if p95 is not None:
            self._recent_p95.append(p95)
        p = self.current
        if p is None:
            return None
        p.add(w)
        if p.windows < self.policy.windows:
            return None
        self.current = None
        return decide(p, self.policy)
