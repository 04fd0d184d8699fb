"""Evaluate recent telemetry of a device (or a fleet) against the bundle's reference profile.

Everything here is computed from stored, mergeable window statistics, so any
monitor process, reading the same database, reaches the same conclusions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edge_runtime.stats import FeatureStats, LatencyHistogram, merge_many_feature_dicts
from telemetry.drift.batch import feature_tests
from telemetry.drift.meanshift import MeanShiftDetector
from telemetry.drift.missing import MissingRateDetector
from telemetry.drift.multiple_testing import benjamini_hochberg, bonferroni
from telemetry.drift.prediction import PredictionDriftDetector


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of every detector (all configurable from the command line)."""

    recent_windows: int = 10          # the sliding window: this many most recent windows
    min_samples: int = 200            # no drift verdict before this many inferences in it
    alpha: float = 0.01               # per-feature chi-square, after correction
    correction: str = "bh"            # bh (Benjamini-Hochberg) or bonferroni
    psi_threshold: float = 0.2        # a feature drifts when significant AND psi >= this ...
    ks_alpha: float | None = 0.01     # ... or when the binned KS test, Bonferroni-corrected, is below this ...
    mean_shift: float = 0.75          # ... or its mean moved this many reference std
    std_ratio: float = 2.5            # ... or its spread changed by this factor
    degenerate_share: float = 0.97    # no mean/std verdict on a feature with this share of its reference in one bin
    missing_increase: float = 0.05    # NaN rate above reference by this much
    prediction_alpha: float = 0.001
    prediction_min_tvd: float = 0.1
    baseline_windows: int = 5         # latency baseline: a device's first windows of a model version
    latency_factor: float = 1.5       # p95 above baseline x factor is a regression ...
    latency_min_increase_ms: float = 1.0  # ... and above it by at least this much (sub-ms jitter is not one)
    latency_sustain: int = 3          # ... in each of the device's last N windows (a burst of load is not one)
    latency_slo_ms: float | None = None
    error_rate: float = 0.05
    silence_periods: float = 3.0      # no window for this many window periods
    close_after: int = 3              # clean evaluations before an alert closes (hysteresis)


@dataclass
class Verdict:
    """One detector's conclusion."""

    detector: str
    firing: bool
    statistic: float
    features: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)


@dataclass
class Evaluation:
    samples: int
    verdicts: list[Verdict]
    feature_scores: dict[str, float]          # PSI per feature, for metrics and the dashboard
    latency_p95: float | None
    error_rate: float


def merge_windows(windows: list[dict], edges: list[list[float]]) -> tuple[FeatureStats, LatencyHistogram, np.ndarray | None, int, int]:
    fs = merge_many_feature_dicts([w["features"] for w in windows], edges)
    lat = None
    classes = None
    count = errors = 0
    for w in windows:
        h = LatencyHistogram.from_dict(w["latency_ms"])
        lat = h if lat is None else lat.merge(h)
        c = w["predictions"].get("counts")
        if c is not None:
            classes = np.asarray(c, dtype=np.int64) if classes is None else classes + np.asarray(c, dtype=np.int64)
        count += w["count"]
        errors += w["errors"]
    return fs, lat or LatencyHistogram(), classes, count, errors


def evaluate(windows: list[dict], manifest: dict | None, config: MonitorConfig,
             baseline_p95: float | None = None, baseline_source: str = "first_windows") -> Evaluation:
    """Run every detector on the merged recent windows of one device (or a fleet) and one model version."""
    profile = (manifest or {}).get("reference_profile") or {}
    ref = profile.get("features") or []
    edges = [f["bin_edges"] for f in ref] if ref else [[] for _ in (windows[0]["features"]["count"] if windows else [])]
    fs, lat, classes, count, errors = merge_windows(windows, edges)
    verdicts: list[Verdict] = []
    scores: dict[str, float] = {}
    p95 = lat.quantile(0.95)
    err_rate = errors / count if count else 0.0

    if ref and count >= config.min_samples:
        hists = fs.histograms()
        names = [f["name"] for f in ref]
        psi_a, chi2_a, ks_a = feature_tests([f["hist"] for f in ref], hists)
        psis, pvals, ks_p = psi_a.tolist(), chi2_a.tolist(), ks_a.tolist() if config.ks_alpha else [1.0] * len(ref)
        correct = benjamini_hochberg if config.correction == "bh" else bonferroni
        significant = correct(pvals, config.alpha)
        drifted, shifted, missing = [], [], []
        ms = MeanShiftDetector(config.mean_shift, config.std_ratio, min_count=config.min_samples // 2)
        md = MissingRateDetector(config.missing_increase, min_count=config.min_samples // 2)
        for i, f in enumerate(ref):
            scores[names[i]] = round(psis[i], 4)
            # significant and practically large (chi-square + PSI), or a systematic move the binned KS test
            # sees (Bonferroni across features): a sensor's gain off by a few percent
            if (significant[i] and psis[i] >= config.psi_threshold) or (
                    config.ks_alpha and ks_p[i] * len(ks_p) < config.ks_alpha):
                drifted.append(names[i])
            mean = float(fs.mean[i]) if fs.count[i] else None
            # moments of a feature that is almost constant in the reference (e.g. a corner pixel that is
            # 0 in 99.8% of images) swing on a handful of rare values: there, only the binned tests judge
            h_ref = f.get("hist") or [1]
            degenerate = max(h_ref) >= config.degenerate_share * max(1, sum(h_ref))
            if not degenerate and ms.update(f["mean"], f["std"], int(fs.count[i]), mean, float(fs.m2[i])).drift_detected:
                shifted.append(names[i])
            if md.update(f.get("nan_rate", 0.0), int(fs.count[i]), int(fs.nan[i])).drift_detected:
                missing.append(names[i])
        flagged = sorted(set(drifted) | set(shifted), key=names.index)
        verdicts.append(Verdict("feature_drift", bool(flagged), max(psis) if psis else 0.0, flagged,
                                {"psi": {n: scores[n] for n in flagged}, "chi2_significant": drifted,
                                 "mean_or_std_shift": shifted, "min_p_value": float(min(pvals)) if pvals else 1.0}))
        verdicts.append(Verdict("missing_values", bool(missing), float(max(
            (fs.nan[i] / max(1, fs.nan[i] + fs.count[i]) for i in range(len(ref))), default=0.0)), missing))
        priors = (profile.get("class_priors") or {}).get("priors")
        if priors and classes is not None:
            pd = PredictionDriftDetector(config.prediction_alpha, config.prediction_min_tvd, config.min_samples)
            pd.update(priors, classes, ref_n=profile.get("n_samples"))
            verdicts.append(Verdict("prediction_drift", pd.drift_detected, pd.tvd, [],
                                    {"p_value": pd.p_value, "counts": classes.tolist(), "priors": priors}))

    if p95 is not None and count:
        reasons = {}
        # a regression is sustained: every one of the last `latency_sustain` windows is slower than the
        # baseline by the factor and the margin; one busy second (a cron job, a neighbour loading a model)
        # lifts the merged p95 of the recent windows but not the p95 of three windows in a row
        n = max(1, config.latency_sustain)
        last = sorted((w for w in windows if w.get("count")), key=lambda w: w.get("seq", 0))[-n:]
        floor = min(w["latency_ms"].get("p95") or 0.0 for w in last) if len(last) == n else 0.0
        if baseline_p95 and floor > config.latency_factor * baseline_p95 \
                and floor - baseline_p95 >= config.latency_min_increase_ms:
            reasons["baseline_p95_ms"] = baseline_p95
            reasons["baseline_source"] = baseline_source
            reasons["sustained_p95_ms"] = floor
        if config.latency_slo_ms is not None and p95 > config.latency_slo_ms:
            reasons["slo_ms"] = config.latency_slo_ms
        verdicts.append(Verdict("latency", bool(reasons), p95, [], {"p95_ms": p95, **reasons}))
    if count:
        verdicts.append(Verdict("error_rate", err_rate > config.error_rate, err_rate, [], {"errors": errors, "count": count}))
    return Evaluation(count, verdicts, scores, p95, err_rate)
