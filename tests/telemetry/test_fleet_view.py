"""The fleet view: pooled statistics kept up to date one device at a time equal a full re-merge."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edge_runtime.stats import merge_many_feature_dicts
from telemetry.fleet_view import FleetView
from telemetry.synthetic import make_window, reference_manifest


@pytest.fixture(scope="module")
def fleet():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(500, 4))
    manifest = reference_manifest(X, (X[:, 0] > 0).astype(int), "m")
    windows = {f"d{i}": [make_window(X[rng.integers(0, 500, 40)] * (1 + 0.1 * i), manifest, f"d{i}", s,
                                     start=time.time() - 100 + s, predictions=rng.integers(0, 2, 40))
                         for s in range(5)] for i in range(12)}
    return manifest, windows


def test_the_pooled_view_equals_a_full_merge_after_any_sequence_of_updates(fleet):
    manifest, windows = fleet
    edges = [f["bin_edges"] for f in manifest["reference_profile"]["features"]]
    view = FleetView(rebuild_every=10_000)
    for dev, ws in windows.items():             # each device first reports 3 windows, then all 5
        view.update("f", "m", "1.0.0", dev, ws[:3])
    for dev, ws in windows.items():
        view.update("f", "m", "1.0.0", dev, ws)
    merged = view.merged("f", "m", "1.0.0")
    full = merge_many_feature_dicts([w["features"] for ws in windows.values() for w in ws], edges)
    assert merged["features"]["count"] == full.count.tolist()
    assert merged["features"]["hist"] == full.to_dict()["hist"]
    np.testing.assert_allclose(merged["features"]["mean"], full.mean, rtol=1e-9)
    np.testing.assert_allclose(merged["features"]["m2"], full.m2, rtol=1e-6)
    np.testing.assert_allclose(merged["features"]["min"], full.min)
    assert merged["predictions"]["counts"] == np.sum([w["predictions"]["counts"] for ws in windows.values()
                                                      for w in ws], axis=0).tolist()
    assert merged["count"] == sum(w["count"] for ws in windows.values() for w in ws)


def test_a_device_gone_quiet_leaves_the_fleet_and_another_layout_is_kept_out(fleet):
    manifest, windows = fleet
    view = FleetView()
    for dev, ws in windows.items():
        view.update("f", "m", "1.0.0", dev, ws)
    odd = [{**w, "features": {k: v[:2] for k, v in w["features"].items()}} for w in windows["d0"]]
    view.update("f", "m", "1.0.0", "d-odd", odd)            # two features under the same version: left out
    assert view.devices("f", "m", "1.0.0") == 12
    assert view.expire("f", "m", "1.0.0", max_age_s=0.0) == 12
    assert view.merged("f", "m", "1.0.0") is None
