"""The design effect at its upper bound: a stream's first windows say little about how alike its rows are.

Two findings of the drift benchmark (``python -m benchmarks.drift``) that no single ``--floor-z`` met at
once with the design effects at their estimates: a device looping the Digits rows of the last writers
fired at its first evaluations (200 consecutive rows of two or three writers, estimated from one pair
of windows as nearly independent), while Gaussian noise on Breast Cancer (one feature moved by PSI
about 0.18) was confirmed on fewer streams than raw-sample KS finds it. With the features' design
effects at their 90% upper bound (``MonitorConfig.deff_confidence``) and the floor at 84% one-sided
confidence (``floor_z`` 1.0), both are met; the streams are the benchmark's own.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import drift
from telemetry.drift.effective_size import design_effect_bounds, design_effects, upper_factor
from telemetry.evaluate import MonitorConfig


def streams(name: str, scenario: str, n: int, config: MonitorConfig) -> dict:
    ds = drift._Streams(name, 15, 0, "population")
    acc = {"mon": {"streams": 0, "detected": 0, "delays": [], "evals": 0, "fired": 0},
           "ks": {"streams": 0, "detected": 0, "delays": [], "evals": 0, "fired": 0},
           "by_detector": dict.fromkeys(drift.DRIFT_DETECTORS, 0)}
    for dev in range(n):
        drift._run_stream(ds, scenario, dev, 0, config, acc)
    return acc


def test_one_pair_of_windows_bounds_the_design_effect_at_about_twice_its_estimate():
    rng = np.random.default_rng(0)
    edges = np.linspace(-2, 2, 9)
    windows = [[np.bincount(np.searchsorted(edges, c), minlength=10).tolist() for c in rng.normal(size=(100, 6)).T]
               for _ in range(2)]
    estimate, upper = design_effect_bounds(windows, None, 0.9)
    assert np.allclose(estimate, design_effects(windows))
    # one pair, 9 degrees of freedom per feature (10 bins): the bound is about 2.2x the estimate (a
    # column is at least 1 and at least the median over columns, of the estimates or of the bounds)
    assert np.all(upper >= estimate) and 2.0 <= upper.max() / estimate.max() <= 2.3
    # the last column (the predicted classes, say) left at its own estimate: only the first 5 bounded
    _, partly = design_effect_bounds(windows, None, 0.9, bounded=5)
    assert np.allclose(partly[:5], upper[:5]) and partly[5] <= upper[5]
    assert upper_factor(np.array([10_000]), 0.9)[0] < 1.02        # many pairs: the bound meets the estimate


def test_looping_the_last_writers_of_digits_raises_no_alarm_at_the_first_windows():
    bounded = streams("digits", "looped", 20, MonitorConfig())["mon"]
    assert bounded["fired"] / bounded["evals"] <= 0.05, bounded
    # the same streams with the design effects at their estimates: the first evaluations fire
    estimated = streams("digits", "looped", 20, MonitorConfig(deff_confidence=0))["mon"]
    assert estimated["fired"] / estimated["evals"] > 0.05 and min(estimated["delays"]) <= 2, estimated


@pytest.mark.parametrize("scenario", ["noise", "prior"])
def test_moderate_shifts_on_breast_cancer_are_found_at_least_as_often_as_raw_sample_ks_finds_them(scenario):
    acc = streams("breast_cancer", scenario, 20, MonitorConfig())
    assert acc["mon"]["detected"] >= acc["ks"]["detected"], acc
    if scenario == "prior":                        # a clear shift: still seen at the earliest evaluation
        assert np.median(acc["mon"]["delays"]) <= 2
