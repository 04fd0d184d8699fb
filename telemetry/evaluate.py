"""Evaluate recent telemetry of a device (or a fleet) against the bundle's reference profile.

Everything here is computed from stored, mergeable window statistics, so any
monitor process, reading the same database, reaches the same conclusions.

A drift verdict needs two things at once: a change the tests find significant (corrected for
testing many features, on the effective sample size of the stream, see
drift/effective_size.py) and an effect at least as large as the floor an operator acts on (PSI,
see drift/floors.py). An open alert is held while the change is still there at a looser level
(``hold_alpha``, ``close_ratio`` x the floor): a verdict says whether the change is gone
(``clear``), which is what closes an alert (alerts.py), not merely that it no longer fires.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from edge_runtime import distinct
from edge_runtime.stats import FeatureStats, LatencyHistogram, merge_many_feature_dicts
from telemetry.drift.accuracy import AccuracyDropDetector, holdout_accuracy
from telemetry.drift.batch import feature_tests
from telemetry.drift.confidence import ConfidenceDriftDetector
from telemetry.drift.effective_size import design_effect_bounds, effective_samples
from telemetry.drift.error_rate import ErrorRateDetector
from telemetry.drift.floors import floors as effect_floors
from telemetry.drift.floors import psi_bar
from telemetry.drift.latency import LatencyDetector
from telemetry.drift.meanshift import MeanShiftDetector
from telemetry.drift.missing import MissingRateDetector
from telemetry.drift.multiple_testing import benjamini_hochberg, bonferroni
from telemetry.drift.prediction import PredictionDriftDetector
from telemetry.drift.rejected import RejectedInputsDetector

REPEATS_BELOW = 0.75      # distinct rows below this share of the inferences: the tests see only those


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds of every detector (all configurable from the command line)."""

    recent_windows: int = 10          # the sliding window: this many most recent windows
    min_samples: int = 200            # no drift verdict before this many inferences in it
    horizon: int = 1000               # the tests treat the recent windows as at most this many inferences ...
    design_effect: bool = True        # ... divided by the design effect the windows show (repeated samples)
    deff_confidence: float = 0.9      # ... its upper bound at this confidence, for the features (0: the estimate)
    distinct_cap: bool = True         # ... and at most the distinct rows the windows saw (window.distinct)
    alpha: float = 0.01               # per-feature chi-square, after correction ...
    correction: str = "bh"            # bh (Benjamini-Hochberg) or bonferroni
    ks_alpha: float | None = 0.01     # ... or the binned KS test, Bonferroni-corrected: significant ...
    psi_threshold: float = 0.1        # ... AND psi >= this floor (per bundle/feature: drift_thresholds) ...
    floor_z: float = 1.0              # ... with 84% one-sided confidence (0: at the sample's mean PSI)
    mean_shift: float = 0.75          # reported: its mean moved this many reference std ...
    std_ratio: float = 2.5            # ... or its spread changed by this factor
    degenerate_share: float = 0.97    # no mean/std report on a feature with this share of its reference in one bin
    missing_increase: float = 0.05    # NaN rate above reference by this much
    prediction_alpha: float = 0.001
    prediction_min_tvd: float = 0.1
    rejected_rate: float = 0.05       # refused inputs / attempted inferences above this ...
    rejected_min_attempts: int = 100  # ... once this many were attempted
    confidence_alpha: float = 0.001   # top-class probabilities unlike the holdout's (chi-square) ...
    confidence_min_psi: float = 0.1   # ... and by at least this PSI
    out_of_range_rate: float = 0.25   # a feature with this share of its values outside the calibration range
    accuracy_drop: float = 0.05       # labelled accuracy this far (absolute) below the holdout's ...
    accuracy_min_labelled: int = 100  # ... on at least this many labelled inferences ...
    accuracy_alpha: float = 0.01      # ... and surely so (one-sided binomial test at this level)
    hold_alpha: float = 0.05          # an open drift alert holds while the change is significant at this level ...
    close_ratio: float = 0.5          # ... and its effect at least this share of the opening threshold
    min_open_seconds: float = 60.0    # an alert stays open at least this long
    baseline_windows: int = 5         # latency baseline: a device's first windows of a model version
    latency_factor: float = 1.5       # p95 above baseline x factor is a regression ...
    latency_min_increase_ms: float = 1.0  # ... and above it by at least this much (sub-ms jitter is not one)
    latency_sustain: int = 3          # ... in each of the device's last N windows (a burst of load is not one)
    latency_slo_ms: float | None = None
    error_rate: float = 0.05
    silence_periods: float = 3.0      # no window for this many window periods
    close_after: int = 3              # clear evaluations before an alert closes (hysteresis)


@dataclass
class Verdict:
    """One detector's conclusion.

    ``firing`` opens an alert; ``clear`` (None: the same as not firing) says the change is gone, which
    an open alert needs ``close_after`` times in a row, and ``hold_s`` seconds after it opened, to close.
    """

    detector: str
    firing: bool
    statistic: float
    features: list[str] = field(default_factory=list)
    detail: dict = field(default_factory=dict)
    clear: bool | None = None
    hold_s: float = 0.0

    @property
    def is_clear(self) -> bool:
        return not self.firing and (self.clear is None or self.clear)


@dataclass
class Evaluation:
    samples: int
    verdicts: list[Verdict]
    feature_scores: dict[str, float]          # PSI per feature, for metrics and the dashboard
    latency_p95: float | None
    error_rate: float


def merge_windows(
    windows: list[dict], edges: list[list[float]]
) -> tuple[FeatureStats, LatencyHistogram, np.ndarray | None, int, int]:
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


def dependence(windows: list[dict], n_features: int, config: MonitorConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Design effects from the recent windows (1 when turned off): per feature at its upper bound (what an
    alert opens on: few pairs say little about dependence) and at its estimate (what an open alert holds
    on), and of the predicted classes from its own estimate, at least the features' median bound (with one
    degree of freedom per pair for two classes, its own bound would blind the prediction test for the
    first windows; that test has its own floor)."""
    usable = sorted((w for w in windows if len(w["features"].get("hist") or []) == n_features),
                    key=lambda w: (str(w.get("device_id", "")), w.get("seq") or 0))
    classes = [w for w in usable if w.get("predictions", {}).get("counts") is not None]
    with_classes = len(classes) == len(usable)
    if not config.design_effect or not usable:
        return np.ones(n_features), np.ones(n_features), 1.0
    columns = [w["features"]["hist"] + ([w["predictions"]["counts"]] if with_classes else []) for w in usable]
    estimate, upper = design_effect_bounds(columns, [str(w.get("device_id", "")) for w in usable],
                                           config.deff_confidence or None, bounded=n_features)
    deff_classes = float(upper[n_features]) if with_classes else float(np.median(upper))
    return upper[:n_features], estimate[:n_features], deff_classes


def _effective_scale(fs: FeatureStats, deff: np.ndarray, config: MonitorConfig) -> np.ndarray:
    """Per feature, the factor taking its counts to its effective sample size (capped at the horizon)."""
    m = fs.count.astype(np.float64)
    return np.where(m > 0, np.minimum(m / np.maximum(deff, 1.0), config.horizon) / np.maximum(m, 1.0), 0.0)


def _significant(chi2_p: np.ndarray, ks_p: np.ndarray, level: float, config: MonitorConfig) -> np.ndarray:
    """Features whose chi-square (or, when turned on, binned KS) test rejects at `level` after correction."""
    correct = benjamini_hochberg if config.correction == "bh" else bonferroni
    sig = np.asarray(correct(chi2_p.tolist(), level), dtype=bool)
    if config.ks_alpha:
        sig |= ks_p * len(ks_p) < (level / config.alpha if config.alpha > 0 else 1.0) * config.ks_alpha
    return sig


def _psi_bars(ref: list[dict], current: list[list[float]], n_current: np.ndarray, floor: np.ndarray,
              z: float) -> np.ndarray:
    """Per feature, the PSI its sample must show for an effect at least ``floor`` (drift/floors.py)."""
    n_ref = np.array([max(1.0, float(sum(f["hist"]))) for f in ref])
    bins = np.array([sum(1 for a, b in zip(f["hist"], c, strict=True) if a or b)
                     for f, c in zip(ref, current, strict=True)])
    return psi_bar(floor, np.maximum(bins - 1, 0), n_ref, n_current, z)


def _missing_values(ref: list[dict], fs: FeatureStats, config: MonitorConfig) -> Verdict:
    """The missing_values verdict: features whose NaN rate rose by ``missing_increase`` or more."""
    md = MissingRateDetector(config.missing_increase, min_count=config.min_samples // 2)
    missing, excess = [], []
    for i, f in enumerate(ref):
        md.update(f.get("nan_rate", 0.0), int(fs.count[i]), int(fs.nan[i]))
        excess.append(md.rate - md.ref_rate if md.seen >= md.min_count else 0.0)
        if md.drift_detected:
            missing.append(f["name"])
    worst = float(max((fs.nan[i] / max(1, fs.nan[i] + fs.count[i]) for i in range(len(ref))), default=0.0))
    return Verdict("missing_values", bool(missing), worst, missing, clear=max(excess, default=0.0) <
                   config.close_ratio * config.missing_increase, hold_s=config.min_open_seconds)


def feature_drift(
    profile: dict, fs: FeatureStats, deff: np.ndarray, config: MonitorConfig, deff_hold: np.ndarray | None = None
) -> tuple[Verdict, Verdict, dict]:
    """The feature_drift and missing_values verdicts, and PSI per feature. ``deff``: the design effects a
    verdict opens on; ``deff_hold`` (default ``deff``): those an open alert holds on (see dependence)."""
    ref = profile["features"]
    names = [f["name"] for f in ref]
    floor, problems = effect_floors(profile.get("drift_thresholds"), names, config.psi_threshold)
    floor_a = np.asarray(floor)
    m = fs.count.astype(np.float64)
    # the tests see each feature's counts scaled to its effective sample size; shares, hence PSI, stay
    scale = _effective_scale(fs, deff, config)
    current = [(np.asarray(h, dtype=np.float64) * s).tolist() for h, s in zip(fs.histograms(), scale, strict=True)]
    psi, chi2_p, ks_p = feature_tests([f["hist"] for f in ref], current)
    significant = _significant(chi2_p, ks_p, config.alpha, config)
    # the floor applies to the effect, not to the sample's PSI: sampling noise (more of it on a small
    # reference, and more around a small real effect) must not carry a change over it
    flagged = significant & (psi >= _psi_bars(ref, current, m * scale, floor_a, config.floor_z))
    hold_p = (chi2_p, ks_p)
    if deff_hold is not None and not np.array_equal(deff_hold, deff):
        held = _effective_scale(fs, deff_hold, config)
        hold_p = feature_tests([f["hist"] for f in ref], [(np.asarray(h, dtype=np.float64) * s).tolist()
                                                          for h, s in zip(fs.histograms(), held, strict=True)])[1:]
    holding = _significant(*hold_p, config.hold_alpha, config) & (psi >= config.close_ratio * floor_a)
    scores = {n: round(float(p), 4) for n, p in zip(names, psi, strict=True)}
    chosen = [n for n, f in zip(names, flagged, strict=True) if f]
    detail = {"psi": {n: scores[n] for n in chosen}, "floors": {n: floor[names.index(n)] for n in chosen},
              "significant": [n for n, s in zip(names, significant, strict=True) if s],
              "min_p_value": float(min(chi2_p.min(), ks_p.min())) if len(names) else 1.0,
              "design_effect": round(float(np.median(deff)), 3) if len(deff) else 1.0,
              "design_effect_max": round(float(deff.max()), 3) if len(deff) else 1.0,
              "effective_samples": round(float((m * scale).max()), 1) if len(m) else 0.0,
              "moments": moments(ref, fs, chosen, config), "threshold_problems": problems}
    drift = Verdict("feature_drift", bool(chosen), float(psi.max()) if len(names) else 0.0, chosen, detail,
                    clear=not holding.any(), hold_s=config.min_open_seconds)
    return drift, _missing_values(ref, fs, config), scores


def moments(ref: list[dict], fs: FeatureStats, flagged: list[str], config: MonitorConfig) -> dict:
    """How the mean and spread moved, in reference terms: for the flagged features and any whose mean moved
    ``mean_shift`` std or whose spread changed x``std_ratio`` (reported, not alerted on alone: rare outliers
    move both without changing what most inputs look like)."""
    out = {}
    ms = MeanShiftDetector(config.mean_shift, config.std_ratio, min_count=config.min_samples // 2)
    for i, f in enumerate(ref):
        h_ref = f.get("hist") or [1]
        if max(h_ref) >= config.degenerate_share * max(1, sum(h_ref)) or not fs.count[i]:
            continue      # a feature almost constant in the reference: its moments swing on a few rare values
        ms.update(f["mean"], f["std"], int(fs.count[i]), float(fs.mean[i]), float(fs.m2[i]))
        if ms.drift_detected or f["name"] in flagged:
            out[f["name"]] = {"mean_shift_sd": round(ms.mean_shift, 3), "std_ratio": round(ms.std_ratio, 3)}
    return out


def prediction_drift(profile: dict, classes: np.ndarray, n_eff: float, config: MonitorConfig) -> Verdict | None:
    priors = (profile.get("class_priors") or {}).get("priors")
    if not priors or classes is None or classes.sum() == 0:
        return None
    counts = classes * (n_eff / classes.sum())           # the test weighs them as n_eff predictions
    pd = PredictionDriftDetector(config.prediction_alpha, config.prediction_min_tvd, min_count=1)
    pd.update(priors, counts, ref_n=profile.get("n_samples"))
    holding = pd.p_value < config.hold_alpha and pd.tvd >= config.close_ratio * config.prediction_min_tvd
    return Verdict("prediction_drift", pd.drift_detected, pd.tvd, [],
                   {"p_value": pd.p_value, "counts": classes.tolist(), "priors": priors,
                    "effective_samples": round(n_eff, 1)}, clear=not holding, hold_s=config.min_open_seconds)


def labelled_confusion(windows: list[dict]) -> np.ndarray | None:
    """The summed ``labels.confusion`` of the windows (rows: true class, columns: predicted), None without."""
    mats = [np.asarray(w["labels"]["confusion"], dtype=np.int64) for w in windows
            if isinstance(w.get("labels"), dict) and w["labels"].get("confusion")]
    mats = [m for m in mats if m.ndim == 2 and m.shape == mats[0].shape]
    return np.sum(mats, axis=0) if mats else None


def accuracy(windows: list[dict], manifest: dict | None, config: MonitorConfig) -> Verdict | None:
    """The labelled accuracy of the windows against the artifact's holdout accuracy (drift/accuracy.py)."""
    confusion = labelled_confusion(windows)
    artifact = next(((w.get("model") or {}).get("artifact") for w in windows if (w.get("model") or {}).get("artifact")),
                    None)
    ref = holdout_accuracy(manifest, artifact)
    if confusion is None or ref is None:
        return None
    n, correct = int(confusion.sum()), int(np.trace(confusion))
    d = AccuracyDropDetector(config.accuracy_drop, config.accuracy_min_labelled, config.accuracy_alpha,
                             config.close_ratio)
    d.update(ref[0], correct, n)
    unmatched = sum(int(w["labels"].get("unmatched") or 0) for w in windows if isinstance(w.get("labels"), dict))
    return Verdict("accuracy", d.drift_detected, round(d.accuracy, 4), [],
                   {"accuracy": round(d.accuracy, 4), "holdout_accuracy": round(d.holdout, 4),
                    "drop": round(d.drop, 4), "labelled": n, "correct": correct, "p_value": d.p_value,
                    "unmatched": unmatched, "artifact": ref[1], "confusion": confusion.tolist()},
                   clear=d.clear, hold_s=config.min_open_seconds)


def rejected_inputs(windows: list[dict], config: MonitorConfig) -> Verdict:
    attempts = sum(int(w.get("count") or 0) for w in windows)
    refused = sum(int(w.get("rejected") or 0) for w in windows)
    d = RejectedInputsDetector(config.rejected_rate, config.rejected_min_attempts, config.close_ratio)
    d.update(attempts, refused)
    return Verdict("rejected_inputs", d.drift_detected, d.rate, [],
                   {"rejected": d.rejected, "attempts": d.attempts, "rate": round(d.rate, 4)},
                   clear=d.clear, hold_s=config.min_open_seconds)


def latency(windows: list[dict], p95: float, config: MonitorConfig, baseline_p95: float | None,
            baseline_source: str) -> Verdict:
    """The latency verdict (drift/latency.py): a regression sustained over the last windows, or the SLO."""
    last = sorted((w for w in windows if w.get("count")), key=lambda w: w.get("seq", 0))
    d = LatencyDetector(config.latency_factor, config.latency_min_increase_ms, config.latency_sustain,
                        config.latency_slo_ms)
    d.update([w["latency_ms"].get("p95") or 0.0 for w in last], p95, baseline_p95)
    reasons = dict(d.reasons)
    if "baseline_p95_ms" in reasons:
        reasons["baseline_source"] = baseline_source
    return Verdict("latency", d.drift_detected, p95, [], {"p95_ms": p95, **reasons}, hold_s=config.min_open_seconds)


def error_rate(errors: int, count: int, config: MonitorConfig) -> Verdict:
    """The error_rate verdict (drift/error_rate.py)."""
    d = ErrorRateDetector(config.error_rate).update(errors, count)
    return Verdict("error_rate", d.drift_detected, d.rate, [], {"errors": errors, "count": count},
                   hold_s=config.min_open_seconds)


def distinct_rows(windows: list[dict]) -> float | None:
    """How many distinct inputs the windows hold: their merged ``distinct`` sketches (distinct.py),
    plus every row of a window without one (an agent that does not sketch); None when none has a sketch."""
    def sketched(w: dict) -> bool:
        return len(w.get("distinct") or ()) == distinct.REGISTERS

    sketches = [w["distinct"] for w in windows if sketched(w)]
    if not sketches:
        return None
    unsketched = sum(max(w["features"].get("count") or [0]) for w in windows if not sketched(w))
    return distinct.estimate(distinct.merge(sketches)) + float(unsketched)


def _drift_verdicts(profile: dict, windows: list[dict], fs: FeatureStats, classes: np.ndarray | None,
                    config: MonitorConfig, dependence_from: list[dict] | None) -> tuple[list[Verdict], dict]:
    """The verdicts on what the inputs and predictions look like (feature, missing values, prediction and
    confidence drift), and PSI per feature.

    Repeated inputs (a device looping over recorded rows) carry no news: the tests believe at most as many
    samples as the windows hold distinct rows (the horizon shrinks to that)."""
    rows = distinct_rows(windows) if config.distinct_cap else None
    # the sketch is within about 13%: fewer than 3/4 of the rows distinct is repetition, not its error
    if rows is not None and rows < min(config.horizon, REPEATS_BELOW * sum(w.get("count") or 0 for w in windows)):
        config = replace(config, horizon=max(1, int(round(rows))))
    deff, deff_hold, deff_classes = dependence(windows if dependence_from is None else dependence_from,
                                               len(profile["features"]), config)
    drift, nan, scores = feature_drift(profile, fs, deff, config, deff_hold)
    n_eff = effective_samples(float(classes.sum()), deff_classes, config.horizon) if classes is not None else 0.0
    pred = prediction_drift(profile, classes, n_eff, config)
    conf = confidence_drift(profile, windows, deff_classes, config)
    return [drift, nan] + [v for v in (pred, conf) if v is not None], scores


def evaluate(windows: list[dict], manifest: dict | None, config: MonitorConfig,
             baseline_p95: float | None = None, baseline_source: str = "first_windows",
             dependence_from: list[dict] | None = None) -> Evaluation:
    """Run every detector on the merged recent windows of one device (or a fleet) and one model version.

    ``dependence_from``: the windows the dependence between consecutive windows is estimated from, when
    ``windows`` are already merged (a fleet's pooled statistics); by default ``windows`` themselves.
    """
    profile = (manifest or {}).get("reference_profile") or {}
    ref = profile.get("features") or []
    edges = [f["bin_edges"] for f in ref] if ref else [[] for _ in (windows[0]["features"]["count"] if windows else [])]
    fs, lat, classes, count, errors = merge_windows(windows, edges)
    verdicts: list[Verdict] = []
    scores: dict[str, float] = {}
    p95 = lat.quantile(0.95)
    err_rate = errors / count if count else 0.0

    if ref and count >= config.min_samples:
        verdicts, scores = _drift_verdicts(profile, windows, fs, classes, config, dependence_from)
    if ref and windows:
        rng = out_of_range(profile, windows, config)
        if rng is not None:
            verdicts.append(rng)
    if windows:
        verdicts.append(rejected_inputs(windows, config))
        labelled = accuracy(windows, manifest, config)
        if labelled is not None:
            verdicts.append(labelled)
    if p95 is not None and count:
        verdicts.append(latency(windows, p95, config, baseline_p95, baseline_source))
    if count:
        verdicts.append(error_rate(errors, count, config))
    return Evaluation(count, verdicts, scores, p95, err_rate)


def confidence_drift(profile: dict, windows: list[dict], deff_classes, config: MonitorConfig) -> Verdict | None:
    """The model's top-class probabilities against those on its holdout data (``reference_profile.confidence``)."""
    ref = (profile.get("confidence") or {}).get("hist")
    hists = [w["predictions"]["confidence"] for w in windows
             if isinstance(w.get("predictions"), dict) and w["predictions"].get("confidence")]
    if not ref or not hists or any(len(h) != len(ref) for h in hists):
        return None
    current = np.sum(np.asarray(hists, dtype=np.float64), axis=0)
    n_eff = effective_samples(float(current.sum()), deff_classes, config.horizon)
    d = ConfidenceDriftDetector(config.confidence_alpha, config.confidence_min_psi, config.min_samples)
    d.update(ref, current, n_eff=n_eff)
    clear = d.psi < config.close_ratio * config.confidence_min_psi or d.mean_drop <= 0.0
    return Verdict("confidence_drift", d.drift_detected, d.psi, [],
                   {"psi": round(d.psi, 4), "p_value": d.p_value, "mean_confidence_drop": round(d.mean_drop, 4),
                    "counts": current.astype(int).tolist(), "effective_samples": round(n_eff, 1)},
                   clear=clear, hold_s=config.min_open_seconds)


def out_of_range(profile: dict, windows: list[dict], config: MonitorConfig) -> Verdict | None:
    """Inputs outside the range of the data the model was calibrated on (``features.out_of_range``): a
    feature with at least ``out_of_range_rate`` of its values there (inputs on another scale, a sensor
    stuck at a rail) flags it."""
    ref = profile.get("features") or []
    rows = [w["features"] for w in windows if len((w["features"].get("out_of_range") or [])) == len(ref)]
    if not rows:
        return None
    outside = np.sum([f["out_of_range"] for f in rows], axis=0).astype(np.float64)
    counts = np.sum([f["count"] for f in rows], axis=0).astype(np.float64)
    rates = np.where(counts > 0, outside / np.maximum(counts, 1.0), 0.0)
    enough = counts >= config.min_samples
    flagged = [ref[i]["name"] for i in np.flatnonzero(enough & (rates >= config.out_of_range_rate))]
    worst = float(rates.max()) if rates.size else 0.0
    return Verdict("out_of_range", bool(flagged), worst, flagged,
                   {"rates": {ref[i]["name"]: round(float(rates[i]), 4) for i in np.argsort(-rates)[:5]},
                    "threshold": config.out_of_range_rate},
                   clear=worst < config.close_ratio * config.out_of_range_rate, hold_s=config.min_open_seconds)
