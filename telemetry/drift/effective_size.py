"""Effective sample size of a telemetry stream: the design effect estimated from its windows.

The tests of this package treat the inferences behind a histogram as independent draws. They are
not when a device loops over a small set of rows, watches a still scene, or samples a sensor
faster than it changes: 1,000 inferences may then carry what 100 independent ones would, and every
p-value comes out far too small. The design effect (Kish) is the factor by which dependence
inflates the variance of a mean: the tests should see ``n / deff`` samples.

It is estimated from what the monitor has, the per-window counts, means and M2 of each feature.
For two consecutive windows a and b of one device, independence gives
``(mean_a - mean_b)^2 / (s^2 (1/n_a + 1/n_b))`` an expected value of 1 (s^2: the pooled variance
within the two windows); dependence inside windows lifts it by the design effect. Per feature the
ratio is averaged over the pairs, and the design effect is the median over features, at least 1.
Windows of different devices are never paired. A drift that starts inside the horizon adds one
large pair out of ``W - 1``; a median over features keeps a shift of a few features from moving it.
Then ``n_eff = min(n / deff, horizon)``: the horizon caps what the tests believe, also for a
fleet, whose merged count grows with its size, and for loops the windows cannot reveal.

Parameters: ``horizon`` (the largest sample size the tests use), ``max_deff``.

References: Kish, L. (1965). Survey Sampling, section 8.2 (design effect); von Neumann, J. (1941).
Distribution of the ratio of the mean square successive difference to the variance. Ann. Math.
Statist. 12(4), 367-395.

>>> rng = np.random.default_rng(0)
>>> def window(x):       # the wire form of 100 rows of 20 features
...     return {"count": [len(x)] * 20, "mean": x.mean(axis=0).tolist(), "m2": x.var(axis=0).__mul__(len(x)).tolist()}
>>> independent = [window(rng.normal(size=(100, 20))) for _ in range(10)]
>>> repeated = [window(np.repeat(rng.normal(size=(10, 20)), 10, axis=0)) for _ in range(10)]   # each row 10 times
>>> round(design_effect(independent), 1), round(design_effect(repeated))
(1.0, 9)
>>> effective_samples(1000, design_effect(repeated), horizon=1000) < 150
True
>>> effective_samples(20_000, 1.0, horizon=1000)
1000.0
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np


@lru_cache(maxsize=256)
def _trimmed_mean_chi2(k: int, keep: int) -> float:
    """E[mean of the ``keep`` smallest of ``k`` independent chi-square(1) values].

    Up to 64 values: a fixed-seed simulation (within about 1%); beyond, the large-sample limit, the
    chi-square(1) mean below its quantile q: E[X; X < q] = F_3(q) (x f_1(x) = f_3(x)).
    """
    if k > 64:
        from scipy.stats import chi2

        share = keep / k
        return float(chi2.cdf(chi2.ppf(share, 1), 3) / share)
    draws = np.random.default_rng(k).chisquare(1, size=(4_000, k))
    return float(np.sort(draws, axis=1)[:, :keep].mean())


def design_effect(windows: Sequence[dict], devices: Sequence[str] | None = None, max_deff: float = 100.0) -> float:
    """Design effect from consecutive windows' feature blocks (wire form: count, mean, m2 per feature).

    ``windows`` are in time order; ``devices`` (one id per window) keeps windows of different devices
    from being paired. Per feature, the largest quarter of the pair ratios (at least one of two or
    more) is left out, so a drift that starts inside the horizon (one large pair) does not pass for
    dependence; the mean of the rest is compared with its expectation under independence. Without a
    usable pair the result is 1.0 (nothing to estimate from).
    """
    if len(windows) < 2:
        return 1.0
    n = np.array([w["count"] for w in windows], dtype=np.float64)                      # (W, F)
    mean = np.array([[np.nan if v is None else v for v in w["mean"]] for w in windows], dtype=np.float64)
    m2 = np.array([[np.nan if v is None else v for v in w["m2"]] for w in windows], dtype=np.float64)
    same = np.ones(len(windows) - 1, dtype=bool) if devices is None else \
        np.array([a == b for a, b in zip(devices, devices[1:])])
    na, nb = n[:-1], n[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        s2 = (m2[:-1] + m2[1:]) / (na + nb - 2)
        ratio = (mean[:-1] - mean[1:]) ** 2 / (s2 * (1 / na + 1 / nb))
    usable = same[:, None] & (na >= 2) & (nb >= 2) & (s2 > 0) & np.isfinite(ratio)
    per_feature = []
    for j in range(ratio.shape[1]):
        r = np.sort(ratio[usable[:, j], j])
        k = r.size
        if k == 0:
            continue
        keep = k - (k // 4 + 1) if k >= 2 else 1
        per_feature.append(r[:keep].mean() / _trimmed_mean_chi2(k, keep))
    if not per_feature:
        return 1.0
    return float(min(max_deff, max(1.0, np.median(per_feature))))


def effective_samples(count: float, deff: float, horizon: float) -> float:
    """What the tests should treat ``count`` dependent inferences as: ``min(count / deff, horizon)``."""
    return float(min(count / max(deff, 1.0), horizon))
