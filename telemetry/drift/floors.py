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
"""

from __future__ import annotations

import math
from typing import Any, Sequence

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
