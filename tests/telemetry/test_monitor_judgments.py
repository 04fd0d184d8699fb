"""Drift judgments a fleet operator can act on: no alarm on realistic clean data, one alert per incident,
rejected inputs seen."""

from __future__ import annotations

import math

import numpy as np
import pytest

from telemetry import alerts, store
from telemetry.evaluate import MonitorConfig, Verdict, evaluate
from telemetry.synthetic import make_window, reference_manifest


def verdict(ev, detector: str) -> Verdict | None:
    return next((v for v in ev.verdicts if v.detector == detector), None)


def firing(ev) -> set[str]:
    return {v.detector for v in ev.verdicts if v.firing}


def stream(rows: np.ndarray, manifest: dict, device: str, per_window: int, n_windows: int,
           predictions: np.ndarray | None = None, t0: float = 0.0) -> list[dict]:
    """Windows of ``per_window`` consecutive rows (a device sending one window every 10 s)."""
    out = []
    for w in range(n_windows):
        idx = np.arange(w * per_window, (w + 1) * per_window) % len(rows)
        out.append(make_window(rows[idx], manifest, device, w, start=t0 + 10.0 * w,
                               predictions=None if predictions is None else predictions[idx]))
    return out


@pytest.fixture(scope="module")
def digits_block():
    """Digits split by block order (as collected, not shuffled): a bundle profiled on the first 70%, and the
    last 30% as the data a device meets."""
    from sklearn import datasets

    ds = datasets.load_digits()
    X, y = ds.data.astype(np.float64), ds.target
    cut = int(0.7 * len(X))
    return reference_manifest(X[:cut], y[:cut], "digits-block"), X[cut:], y[cut:]


@pytest.fixture(scope="module")
def wine():
    from convert.reference import load_reference_data

    d = load_reference_data("wine")
    manifest = reference_manifest(d.X_train, d.y_train, "wine-m", feature_names=d.feature_names)
    X = np.concatenate([d.X_train, d.X_test]).astype(np.float64)
    y = np.concatenate([d.y_train, d.y_test])
    return manifest, X, y


# -- finding 1: clean data from the same source ------------------------------------------------


@pytest.mark.parametrize("per_window", [100, 1000], ids=["10-inferences-per-s", "100-inferences-per-s"])
def test_a_device_looping_a_held_out_block_of_digits_raises_no_drift_alarm(digits_block, per_window):
    manifest, X_held, y_held = digits_block
    windows = stream(X_held, manifest, "pi-1", per_window, 10, predictions=y_held)
    ev = evaluate(windows, manifest, MonitorConfig())
    assert not firing(ev) & {"feature_drift", "prediction_drift", "missing_values"}, verdict(ev, "feature_drift")
    assert max(ev.feature_scores.values()) < 0.1        # what an operator would read: PSI below any action level


def test_a_fleet_looping_the_held_out_block_raises_no_fleet_level_drift_alarm(digits_block):
    manifest, X_held, y_held = digits_block
    fleet = []
    for k in range(20):                                   # 20 devices, each at its own point of the loop
        rows, preds = np.roll(X_held, 27 * k, axis=0), np.roll(y_held, 27 * k)
        fleet += stream(rows, manifest, f"pi-{k}", 100, 10, predictions=preds)
    ev = evaluate(fleet, manifest, MonitorConfig())
    assert not firing(ev) & {"feature_drift", "prediction_drift"}, verdict(ev, "feature_drift")
    assert verdict(ev, "feature_drift").detail["effective_samples"] <= MonitorConfig().horizon


def repeated(X, rng, n, k):
    """A sensor read k times per change: each row k times in a row."""
    return np.repeat(X[rng.integers(0, len(X), math.ceil(n / k))], k, axis=0)[:n]


def ar1_walk(X, rng, n, rho):
    """A slowly wandering source: rows picked along their first principal axis by an AR(1) walk."""
    from scipy.stats import norm

    Z = (X - X.mean(axis=0)) / (X.std(axis=0) + 1e-9)
    order = np.argsort(Z @ np.linalg.svd(Z, full_matrices=False)[2][0])
    a = np.zeros(n)
    e = rng.normal(size=n)
    for t in range(1, n):
        a[t] = rho * a[t - 1] + math.sqrt(1 - rho * rho) * e[t]
    return X[order[np.minimum((norm.cdf(a) * len(X)).astype(int), len(X) - 1)]]


@pytest.mark.parametrize("kind", ["each-row-10-times", "ar1-walk"])
def test_a_stream_whose_samples_repeat_is_not_taken_for_a_large_sample(wine, kind):
    manifest, X, _ = wine
    rng = np.random.default_rng(11)
    rows = repeated(X, rng, 1000, 10) if kind == "each-row-10-times" else ar1_walk(X, rng, 1000, 0.98)
    windows = stream(rows, manifest, "pi-2", 100, 10)
    ev = evaluate(windows, manifest, MonitorConfig())
    fd = verdict(ev, "feature_drift")
    assert not fd.firing, fd.detail
    assert fd.detail["design_effect_max"] > 2             # the stream says its samples are not independent


def test_a_moderate_shift_is_still_seen_within_two_windows(wine):
    manifest, X, y = wine
    rng = np.random.default_rng(5)
    rows = X[rng.integers(0, len(X), 200)] + 0.5 * X.std(axis=0)          # every feature +0.5 sd
    ev = evaluate(stream(rows, manifest, "pi-3", 100, 2), manifest, MonitorConfig())
    assert verdict(ev, "feature_drift").firing


# -- every path to feature_drift needs significance and an effect above the floor -------------------


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(5000, 4))
    return reference_manifest(X, None, "g", feature_names=["a", "b", "c", "d"]), rng


def test_a_tiny_systematic_move_is_significant_but_below_the_floor_so_no_alert(gaussian):
    manifest, rng = gaussian
    rows = rng.normal(size=(20_000, 4))
    rows[:, 1] += 0.12                                   # the binned KS test sees this at 20,000 samples
    ev = evaluate(stream(rows, manifest, "d", 2000, 10), manifest, MonitorConfig(horizon=20_000))
    fd = verdict(ev, "feature_drift")
    assert ev.feature_scores["b"] < 0.1 and not fd.firing, fd.detail


def test_rare_outliers_that_move_mean_and_spread_do_not_alert_alone(gaussian):
    manifest, rng = gaussian
    rows = rng.normal(size=(1000, 4))
    rows[::50, 2] = 40.0                                 # 2% of the values at 40 sd: mean +0.8 sd, std x5.7
    ev = evaluate(stream(rows, manifest, "d", 100, 10), manifest, MonitorConfig())
    fd = verdict(ev, "feature_drift")
    assert not fd.firing, fd.detail
    assert fd.detail["moments"]["c"]["mean_shift_sd"] > 0.75     # still reported, for the operator to read


def test_a_large_change_seen_in_too_few_samples_is_not_significant_yet(gaussian):
    manifest, rng = gaussian
    rows = rng.normal(size=(200, 4))
    rows[:, 0] += 0.5
    ev = evaluate(stream(rows, manifest, "d", 100, 2), manifest, MonitorConfig(horizon=20))
    fd = verdict(ev, "feature_drift")
    assert ev.feature_scores["a"] >= 0.1 and not fd.firing, fd.detail


def test_floors_come_from_the_bundle_profile_per_feature_and_bad_entries_are_named(gaussian):
    manifest, rng = gaussian
    rows = rng.normal(size=(1000, 4))
    rows[:, :2] += 0.6                                   # a and b move alike (PSI about 0.35)
    windows = stream(rows, manifest, "d", 100, 10)
    assert set(verdict(evaluate(windows, manifest, MonitorConfig()), "feature_drift").features) == {"a", "b"}
    profile = dict(manifest["reference_profile"], drift_thresholds={"psi": 1.0, "features": {"b": 0.2}})
    bundle = dict(manifest, reference_profile=profile)
    fd = verdict(evaluate(windows, bundle, MonitorConfig()), "feature_drift")
    assert fd.features == ["b"] and fd.detail["floors"] == {"b": 0.2}

    hostile = {"psi": "high", "features": {"a": -1, "zz": 0.3, "b": float("nan")}, "extra": 1}
    profile = dict(manifest["reference_profile"], drift_thresholds=hostile)
    fd = verdict(evaluate(windows, dict(manifest, reference_profile=profile), MonitorConfig()), "feature_drift")
    assert set(fd.features) == {"a", "b"}                # the monitor's own floor stands where the entry is bad
    problems = " | ".join(fd.detail["threshold_problems"])
    for where in ("drift_thresholds.psi", "drift_thresholds.features.a", "drift_thresholds.features.zz",
                  "drift_thresholds.features.b", "drift_thresholds.extra"):
        assert where in problems, problems

    not_an_object = dict(manifest["reference_profile"], drift_thresholds=[0.2])
    fd = verdict(evaluate(windows, dict(manifest, reference_profile=not_an_object), MonitorConfig()), "feature_drift")
    assert fd.firing and "expected an object" in fd.detail["threshold_problems"][0]


# -- finding 2: alerts that hold -------------------------------------------------------------------


def transitions(engine, windows_seq, manifest, config, detector, t0=1_000_000.0):
    """Evaluate the device's 10 most recent windows after each new one, as the monitor does, and fold
    the verdict into the alert store; the (window index, change) list."""
    out = []
    for i in range(len(windows_seq)):
        ev = evaluate(windows_seq[max(0, i - 9):i + 1], manifest, config)
        v = verdict(ev, detector)
        if v is None:
            continue
        change = alerts.apply(engine, "f1", "pi-4", manifest["name"], manifest["version"], v, config.close_after,
                              now=t0 + 10.0 * i)
        if change:
            out.append((i, change))
    return out


def borderline_then_clean(manifest, X, y, seed=3, incident=60, after=40):
    """A prediction shift that hovers at the detector's threshold for ten minutes, then clean data."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(incident + after):
        share = 0.26 if i < incident else 0.0           # the share of rows from class 0 beyond its prior
        idx = np.where(rng.random(100) < share, rng.choice(np.flatnonzero(y == 0), 100), rng.integers(0, len(X), 100))
        out.append(make_window(X[idx], manifest, "pi-4", i, start=10.0 * i, predictions=y[idx]))
    return out


def test_a_borderline_prediction_shift_opens_one_alert_that_closes_once_after_the_incident(tmp_path, wine):
    manifest, X, y = wine
    windows = borderline_then_clean(manifest, X, y)
    engine = store.connect(f"sqlite:///{tmp_path}/alerts.db")
    got = transitions(engine, windows, manifest, MonitorConfig(), "prediction_drift")
    assert [c for _, c in got] == ["opened", "closed"], got
    assert got[1][0] >= 60                               # closed only once the shift is over


def test_an_alert_stays_open_for_the_minimum_dwell_time(tmp_path):
    engine = store.connect(f"sqlite:///{tmp_path}/alerts.db")
    fire, clear = Verdict("feature_drift", True, 0.3, hold_s=120.0), Verdict("feature_drift", False, 0.01, hold_s=120.0)
    got = [alerts.apply(engine, "f", "d", "m", "1", v, close_after=2, now=t)
           for v, t in [(fire, 0.0), (clear, 10.0), (clear, 20.0), (clear, 30.0), (clear, 130.0)]]
    assert got == ["opened", None, None, None, "closed"]


def test_an_open_alert_is_held_while_the_change_is_still_there_below_the_opening_level(tmp_path):
    engine = store.connect(f"sqlite:///{tmp_path}/alerts.db")
    fire = Verdict("prediction_drift", True, 0.12)
    holding = Verdict("prediction_drift", False, 0.08, clear=False)     # below the opening level, not gone
    gone = Verdict("prediction_drift", False, 0.01)
    seq = [fire, holding, holding, holding, holding, gone, holding, gone, gone, gone]
    got = [alerts.apply(engine, "f", "d", "m", "1", v, close_after=3, now=10.0 * i) for i, v in enumerate(seq)]
    assert got == ["opened"] + [None] * 8 + ["closed"]


# -- finding 3: rejected inputs ----------------------------------------------------------------------


def test_a_device_whose_inputs_all_carry_a_nan_opens_a_rejected_inputs_alert(tmp_path, bc_mlp_bundle):
    import edge_runtime
    from edge_runtime.errors import InvalidInputError

    model = edge_runtime.load(bc_mlp_bundle)                  # the default nan_policy: reject
    recorder = model.start_recording(window_seconds=None, window_size=50)
    means = [f["mean"] for f in model.manifest["reference_profile"]["features"]]
    rows = np.tile(np.asarray(means, dtype=np.float32), (500, 1))           # ordinary rows ...
    rows[:, 3] = np.nan                                                     # ... with one sensor reading NaN
    refused = 0
    for row in rows:
        try:
            model.predict(row)
        except InvalidInputError:
            refused += 1
    windows = [dict(w, device_id="pi-5", fleet="f1", seq=i) for i, w in enumerate(recorder.poll())]
    assert refused == 500 and len(windows) == 10 and all(w["rejected"] == w["count"] == 50 for w in windows)

    ev = evaluate(windows, model.manifest, MonitorConfig())
    v = verdict(ev, "rejected_inputs")
    assert v.firing and v.statistic == 1.0 and v.detail == {"rejected": 500, "attempts": 500, "rate": 1.0}
    engine = store.connect(f"sqlite:///{tmp_path}/alerts.db")
    assert alerts.apply(engine, "f1", "pi-5", model.manifest["name"], model.manifest["version"], v, 3) == "opened"
    assert [a["detector"] for a in store.open_alerts(engine)] == ["rejected_inputs"]


def test_a_few_rejected_inputs_raise_no_alert(wine):
    manifest, X, _ = wine
    windows = stream(X, manifest, "pi-6", 100, 10)
    for w in windows:
        w["count"] += 2                                     # 2 refused inputs per 102 attempts: under 5%
        w["rejected"] = 2
    assert not verdict(evaluate(windows, manifest, MonitorConfig()), "rejected_inputs").firing
    few = [dict(windows[0], count=40, rejected=30)]         # 75%, but 40 attempts are too few to judge
    assert not verdict(evaluate(few, manifest, MonitorConfig()), "rejected_inputs").firing


@pytest.mark.parametrize("name", ["effective_size", "floors", "rejected"])
def test_each_new_judgment_module_has_a_passing_doctest(name):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"telemetry.drift.{name}"))
    assert result.attempted > 0 and result.failed == 0, result
