"""Effect-size floors: the PSI a feature's change must reach before it may alert.

Significance alone says a change is real, not that it matters: with enough samples every feature
of every device differs from a reference of a few hundred rows. The floor is the effect an
operator would act on, read on PSI's usual scale (below 0.1 stable, 0.1-0.25 moderate, above 0.25
major; see psi.py). The monitor's floor (``--psi-threshold``, 0.1) applies unless the bundle says
otherwise in an optional ``drift_thresholds`` entry of its reference profile::

    "drift_thresholds": {"psi": 0.15, "features": {"worst area": 0.3, "mean radius": 0.08}}

``psi`` replaces the monitor's floor for the bundle, ``features`` sets single features. The
entry is read as hostile input (a manifest is signed, not necessarily sane): every value must be
a finite number in (0, 10] and every feature a name of the profile. A bad entry is skipped and
named in the returned problems (the monitor's floor stands there); it never stops an evaluation.

>>> floors(None, ["a", "b"], 0.1)
([0.1, 0.1], [])
>>> floors({"psi": 0.2, "features": {"b": 0.05}}, ["a", "b"], 0.1)
([0.2, 0.05], [])
>>> fl, problems = floors({"psi": "high", "features": {"zz": 0.3}}, ["a"], 0.1)
>>> fl
[0.1]
>>> for p in problems: print(p)
drift_thresholds.psi: 'high' is not a number in (0, 10]
drift_thresholds.features.zz: no feature of that name in the profile

A sample's PSI is not the effect itself: two finite samples of one distribution show a PSI of about
``(1/n_ref + 1/n)`` times a chi-square with ``bins - 1`` degrees of freedom, and a small real effect
(two sources of one population: other writers, another season) varies far more from sample to
sample than no effect does (the chi-square is then non-central). :func:`psi_bar` is the PSI a sample
must show to say, with one-sided confidence ``z``, that the effect is at least the floor: the upper
``z`` quantile of the PSI a change *exactly at the floor* would show, ``c (df + lam) + z c sqrt(2 (df +
2 lam))`` with ``c = 1/n_ref + 1/n`` and ``lam = floor / c`` (the normal approximation of the
non-central chi-square). At ``z = 0`` it is the floor plus the noise's mean.

>>> round(float(psi_bar(0.1, 6, 1257, 200, 0.0)), 3)      # floor + 6 (1/1257 + 1/200)
0.135
>>> round(float(psi_bar(0.1, 6, 1257, 200, 1.645)), 3)    # a change at the floor shows up to this
0.221
>>> round(float(psi_bar(0.1, 6, 1257, 100_000, 1.645)), 3)  # a large sample: the reference's noise stays
0.135
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

MAX_FLOOR = 10.0


def _valid(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and 0 < value <= MAX_FLOOR


def _show(value: Any) -> str:
    return repr(value)[:40]


def floors(entry: Any, names: Sequence[str], default: float) -> tuple[list[float], list[str]]:
    """Per feature, the PSI floor; and the problems found in ``entry`` (the profile's ``drift_thresholds``)."""
    out = [float(default)] * len(names)
    if entry is None:
        return out, []
    if not isinstance(entry, dict):
        return out, [f"drift_thresholds: expected an object, got {type(entry).__name__}"]
    problems = [f"drift_thresholds.{str(k)[:40]}: unknown entry (expected psi, features)"
                for k in entry if k not in ("psi", "features")]
    if "psi" in entry:
        if _valid(entry["psi"]):
            out = [float(entry["psi"])] * len(names)
        else:
            problems.append(f"drift_thresholds.psi: {_show(entry['psi'])} is not a number in (0, {MAX_FLOOR:g}]")
    per_feature = entry.get("features", {})
    if not isinstance(per_feature, dict):
        problems.append(f"drift_thresholds.features: expected an object, got {type(per_feature).__name__}")
        per_feature = {}
    index = {n: i for i, n in enumerate(names)}
    for name, value in list(per_feature.items())[:10_000]:
        where = f"drift_thresholds.features.{str(name)[:60]}"
        if name not in index:
            problems.append(f"{where}: no feature of that name in the profile")
        elif not _valid(value):
            problems.append(f"{where}: {_show(value)} is not a number in (0, {MAX_FLOOR:g}]")
        else:
            out[index[name]] = float(value)
    return out, problems


def psi_bar(floor: float | np.ndarray, df: float | np.ndarray, n_ref: float | np.ndarray,
            n: float | np.ndarray, z: float) -> np.ndarray:
    """The PSI a sample of ``n`` (against a reference of ``n_ref``, on ``df + 1`` bins) must reach for its
    change to be at least ``floor`` with one-sided confidence ``z`` (in standard deviations); a floor of
    0 or less asks for no effect at all (-inf: any PSI will do).

    >>> psi_bar(np.array([0.0, -1.0]), 6, 1257, 200, 1.645).tolist()
    [-inf, -inf]
    """
    c = 1.0 / np.maximum(n_ref, 1.0) + 1.0 / np.maximum(n, 1.0)
    df = np.asarray(df, dtype=np.float64)
    floor = np.asarray(floor, dtype=np.float64)
    lam = np.maximum(floor, 0.0) / c
    return np.where(floor > 0, c * (df + lam) + z * c * np.sqrt(2.0 * (df + 2.0 * lam)), -np.inf)
