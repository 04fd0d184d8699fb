"""Effective sample size of a telemetry stream: the design effect estimated from its windows.

The tests of this package treat the inferences behind a histogram as independent draws. They are
not when a device loops over a small set of rows, watches a still scene, or samples a sensor
faster than it changes: 1,000 inferences may then carry what 100 independent ones would, and every
p-value comes out far too small. The design effect (Kish) is the factor by which dependence
inflates the variance of a count or a mean: the tests should see ``n / deff`` samples.

It is estimated from what the monitor has, each window's histogram of each feature. For two
consecutive windows of one device, the chi-square homogeneity statistic of a feature's two
histograms, divided by its degrees of freedom, is about 1 when the inferences are independent
and about ``deff`` when they come in correlated clusters (each bin count varies ``deff`` times
as much). Per feature the ratios of the consecutive pairs are averaged, leaving out the largest
quarter (at least one of two or more): a drift that starts inside the horizon makes one large
pair, not dependence. The bins of a feature are not alike: a slowly wandering source stays in the
tails of its range far longer than it stays in any middle bin (an AR(1) walk with rho 0.9 gives
bin design effects from 2 in the middle to 9 in the outer bins), and the chi-square's tail follows
the large ones. So the mean is multiplied by 1 + a^2, a^2 the squared coefficient of variation of
the bins' own design effects (each from its 1-df "in this bin or not" ratios over the same pairs,
less the 2/k their estimation from k pairs alone adds), as in Rao and Scott's second-order
correction; at most 1 + MAX_SPREAD. Calibrated by its median under independence (a fixed-seed simulation), that
is the feature's design effect, at least 1 and at least the median over features: a source that
wanders along one direction (an AR(1) walk) makes the features loaded on it dependent and leaves
the others nearly independent. The predicted classes are one more column. Windows of different
devices are never paired.

Few pairs say little: one pair of a 10-bin feature is a chi-square on 9 degrees of freedom, and a
device whose first two windows came from two writers alike by chance looks independent. The monitor
therefore uses the upper one-sided bound of each feature's design effect (``confidence`` 0.9, see
:func:`upper_factor`): at 2 windows about twice the estimate, at 10 windows a quarter more.

Then ``n_eff = min(n / deff, horizon)``: the horizon caps what the tests believe, also for a
fleet, whose merged count grows with its size, and for what the windows cannot reveal (a device
that loops over a set of rows longer than a window looks independent from one window to the next).

Parameters: ``horizon`` (the largest sample size the tests use), ``max_deff``.

References: Kish, L. (1965). Survey Sampling, section 8.2 (design effect); Rao, J. N. K. and
Scott, A. J. (1981). The analysis of categorical data from complex sample surveys: chi-squared
tests for goodness of fit and independence in two-way tables. JASA 76(374), 221-230 (chi-square
statistics divided by a design effect).

>>> rng = np.random.default_rng(0)
>>> edges = [-1.0, -0.5, 0.0, 0.5, 1.0]
>>> def window(x):       # the histograms of a window of rows of 20 features
...     return {"hist": [np.bincount(np.searchsorted(edges, c), minlength=6).tolist() for c in x.T]}
>>> independent = [window(rng.normal(size=(100, 20))) for _ in range(10)]
>>> repeated = [window(np.repeat(rng.normal(size=(20, 20)), 5, axis=0)) for _ in range(10)]   # each row 5 times
>>> round(design_effect(independent), 1), round(design_effect(repeated))
(1.0, 5)
>>> effective_samples(1000, design_effect(repeated), horizon=1000) < 250
True
>>> effective_samples(20_000, 1.0, horizon=1000)
1000.0
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np

MAX_SPREAD = 2.0       # a^2, the bins' design effects' squared coefficient of variation, at most this


@lru_cache(maxsize=1024)
def _calibration(k: int, keep: int, df: int) -> float:
    """Median, under independence, of the mean of the ``keep`` smallest of ``k`` chi-square(df) / df values.

    Up to 64 pairs: a fixed-seed simulation (within about 2%); beyond, the statistic sits at its
    large-sample limit, the mean of chi-square(df) below its quantile q: E[X; X < q] = df F_{df+2}(q).
    """
    if k > 64:
        from scipy.stats import chi2

        share = keep / k
        return float(chi2.cdf(chi2.ppf(share, df), df + 2) / share)
    draws = np.random.default_rng([k, df]).chisquare(df, size=(2_000, k)) / df
    return float(np.median(np.sort(draws, axis=1)[:, :keep].mean(axis=1)))


def _pair_ratios(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pair and feature: chi-square / df of the two windows' histograms (P, F, B), and df (0: no test)."""
    na, nb = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    col = a + b
    used = col > 0
    df = used.sum(axis=-1) - 1
    total = np.maximum(na + nb, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ea, eb = na * col / total, nb * col / total
        stat = np.where(used, (a - ea) ** 2 / ea + (b - eb) ** 2 / eb, 0.0).sum(axis=-1)
    ok = (na[..., 0] >= 2) & (nb[..., 0] >= 2) & (df >= 1)
    return np.where(ok, stat / np.maximum(df, 1), np.nan), np.where(ok, df, 0)


def _bin_ratios(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair, column and bin: the 1-df chi-square of "this bin or not" between the two windows (P, F, B);
    NaN where the bin is empty in both or the pair has no test."""
    na, nb = a.sum(axis=-1, keepdims=True), b.sum(axis=-1, keepdims=True)
    pooled = (a + b) / np.maximum(na + nb, 1)
    var = pooled * (1 - pooled) * (1 / np.maximum(na, 1) + 1 / np.maximum(nb, 1))
    ok = (na >= 2) & (nb >= 2) & (var > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ok, (a / np.maximum(na, 1) - b / np.maximum(nb, 1)) ** 2 / np.where(ok, var, 1.0), np.nan)


def _spread(R: np.ndarray) -> np.ndarray:
    """Per column, a^2: the squared coefficient of variation of its bins' design effects, less what the few
    pairs alone would give (a bin's mean of k 1-df ratios varies by 2/k of its square), capped at 2."""
    k = np.isfinite(R).sum(axis=0)                                        # (F, B) pairs per bin
    has = k >= 2
    per_bin = np.where(has, np.where(np.isfinite(R), R, 0.0).sum(axis=0) / np.maximum(k, 1), 0.0)
    bins = has.sum(axis=1)
    mean = per_bin.sum(axis=1) / np.maximum(bins, 1)
    var = np.where(has, (per_bin - mean[:, None]) ** 2, 0.0).sum(axis=1) / np.maximum(bins, 1)
    pairs = np.where(has, k, 0).sum(axis=1) / np.maximum(bins, 1)
    usable = (bins >= 3) & (mean > 0)
    cv2 = np.where(usable, var / np.where(usable, mean, 1.0) ** 2 - 2.0 / np.maximum(pairs, 2), 0.0)
    return np.clip(cv2, 0.0, MAX_SPREAD)


def design_effects(windows: Sequence[Sequence[Sequence[float]]], devices: Sequence[str] | None = None,
                   max_deff: float = 100.0) -> np.ndarray:
    """Per column (a feature, or the predicted classes), the design effect of consecutive windows' histograms.

    ``windows`` are in time order, each a list of histograms (one per column); ``devices`` (one id per
    window) keeps windows of different devices from being paired. A column's design effect is its own
    estimate or the median over columns, whichever is larger (a source that wanders along a few
    directions makes the features loaded on them dependent, not the others); without a usable pair
    it is 1.0.
    """
    return design_effect_bounds(windows, devices, None, max_deff=max_deff)[0]


def design_effect_bounds(windows: Sequence[Sequence[Sequence[float]]], devices: Sequence[str] | None,  # noqa: PLR0913
                         confidence: float | None, bounded: int | None = None,
                         max_deff: float = 100.0) -> tuple[np.ndarray, np.ndarray]:
    """(estimates, upper bounds) of :func:`design_effects`: in the bounds, each of the first ``bounded``
    columns (all when None) has its own estimate taken to its upper one-sided bound at ``confidence``
    (:func:`upper_factor`) before the median over columns is taken; without ``confidence`` the bounds
    are the estimates."""
    cols = len(windows[0]) if windows else 0
    own, dof = _own_estimates(windows, devices, cols)
    if own is None:
        return np.ones(cols), np.ones(cols)

    def settle(x: np.ndarray) -> np.ndarray:
        return np.clip(np.fmax(x, np.nanmedian(x)), 1.0, max_deff)

    estimate = settle(own)
    if not confidence:
        return estimate, estimate
    limit = cols if bounded is None else min(bounded, cols)
    upper = own.copy()
    upper[:limit] = own[:limit] * upper_factor(dof[:limit], confidence)
    return estimate, settle(upper)


def _own_estimates(windows, devices, cols: int) -> tuple[np.ndarray | None, np.ndarray]:
    """Per column, its own design effect estimate (NaN: no usable pair) and its degrees of freedom (the
    pairs kept x its bins - 1); None when no column has an estimate."""
    if len(windows) < 2 or cols == 0:
        return None, np.zeros(cols)
    width = max((len(h) for w in windows for h in w), default=0)
    hists = np.array([[list(h) + [0] * (width - len(h)) for h in w] for w in windows], dtype=np.float64)
    paired = np.ones(len(windows) - 1, dtype=bool) if devices is None else \
        np.array([a == b for a, b in zip(devices, devices[1:], strict=False)])
    if not paired.any():
        return None, np.zeros(cols)
    R, D = _pair_ratios(hists[:-1][paired], hists[1:][paired])           # (pairs, columns)
    finite = np.isfinite(R)
    k = finite.sum(axis=0)
    keep = np.where(k >= 2, k - 1, 1)                                     # the largest pair left out
    ordered = np.sort(np.where(finite, R, np.inf), axis=0)
    sums = np.cumsum(np.where(np.isfinite(ordered), ordered, 0.0), axis=0)
    dfs = np.max(np.where(finite, D, 0), axis=0)        # a feature's bins: the same in almost every pair
    own = np.full(cols, np.nan)
    for j in np.flatnonzero(k > 0):
        own[j] = sums[keep[j] - 1, j] / keep[j] / _calibration(int(k[j]), int(keep[j]), int(dfs[j]))
    if np.isnan(own).all():
        return None, np.zeros(cols)
    # bins differ: the tails of a slowly wandering source stay put far longer than its middle, and the
    # chi-square's tail follows the largest bin effects, not their mean (Rao and Scott's second-order
    # correction: the mean design effect times 1 + a^2)
    own = own * (1.0 + _spread(_bin_ratios(hists[:-1][paired], hists[1:][paired])))
    return own, np.where(k > 0, keep * dfs, 0)


def upper_factor(dof, confidence: float) -> np.ndarray:
    """The factor taking a design effect estimated on ``dof`` degrees of freedom (pairs kept x the
    feature's bins - 1) to its upper one-sided bound at ``confidence``: ``dof / chi2.ppf(1 - confidence, dof)``.

    Each pair's ratio is about ``deff`` times a chi-square over its degrees of freedom, so their sum is
    ``deff`` times a chi-square on all of them (approximately: the largest pair is left out). One pair
    of a 10-bin feature (9 degrees of freedom) bounds the design effect at 2.2x its estimate at 90%;
    nine pairs (81) at 1.24x; a fleet's hundreds of pairs at a few percent.

    >>> [round(float(f), 2) for f in upper_factor(np.array([9, 81, 900]), 0.9)]
    [2.16, 1.24, 1.06]
    """
    dof = np.maximum(np.asarray(dof, dtype=np.int64), 1)
    return np.array([_upper_factor(int(d), float(confidence)) for d in dof.ravel()]).reshape(dof.shape)


@lru_cache(maxsize=4096)
def _upper_factor(dof: int, confidence: float) -> float:
    from scipy.stats import chi2

    return float(dof / chi2.ppf(1.0 - confidence, dof))


def design_effect(windows: Sequence[dict], devices: Sequence[str] | None = None, max_deff: float = 100.0) -> float:
    """The median over features of :func:`design_effects`, from windows' feature blocks (wire form: ``hist``)."""
    if not windows:
        return 1.0
    return float(np.median(design_effects([w["hist"] for w in windows], devices, max_deff)))


def effective_samples(count: float, deff: float, horizon: float) -> float:
    """What the tests should treat ``count`` dependent inferences as: ``min(count / deff, horizon)``."""
    return float(min(count / max(deff, 1.0), horizon))
