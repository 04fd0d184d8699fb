"""Confidence drift catches a shift that per-channel image statistics cannot see: a camera knocked two pixels
sideways (the image wraps around) or mounted upside down keeps every pixel value, so the channel histogram
stays put, but the classifier's confidence falls."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edge_runtime
from edge_runtime import wire
from edge_runtime.window import CONFIDENCE_EDGES
from telemetry.drift.confidence import ConfidenceDriftDetector
from telemetry.drift.psi import psi


def windows_of(bundle, images, size=100):
    model = edge_runtime.load(bundle)
    rec = model.start_recording(window_seconds=None, window_size=size)
    for img in images:
        model.predict(img)
    return rec.poll()


@pytest.mark.parametrize("shift", ["moved_two_pixels", "upside_down"])
def test_a_moved_camera_is_caught_by_confidence_and_missed_by_channel_statistics(digits_cnn_bundle, reference_data,
                                                                                 shift):
    manifest = json.loads((digits_cnn_bundle / "manifest.json").read_text())
    profile = manifest["reference_profile"]
    assert profile["confidence"]["bin_edges"] == list(CONFIDENCE_EDGES)
    X = (reference_data["digits"].X_test / 16.0).reshape(-1, 8, 8, 1)
    clean = windows_of(digits_cnn_bundle, X[:300])
    moved = np.roll(X[:300], 2, axis=2) if shift == "moved_two_pixels" else np.rot90(X[:300], k=2, axes=(1, 2))
    rotated = windows_of(digits_cnn_bundle, moved)
    merge = lambda ws, key: np.sum([w[key[0]][key[1]] for w in ws], axis=0)   # noqa: E731
    # the channel histogram is the same multiset of pixel values either way
    ref_hist = profile["features"][0]["hist"]
    assert psi(ref_hist, merge(clean, ("features", "hist"))[0]) < 0.1
    assert psi(ref_hist, merge(rotated, ("features", "hist"))[0]) < 0.1
    # the confidence histogram tells them apart
    d = ConfidenceDriftDetector()
    assert not d.update(profile["confidence"]["hist"], merge(clean, ("predictions", "confidence"))).drift_detected
    assert d.update(profile["confidence"]["hist"], merge(rotated, ("predictions", "confidence"))).drift_detected
    assert d.mean_drop > 0.05              # the mean confidence fell
    # and the windows carrying it pass the monitor's validation
    w = {**wire.telemetry_message("lab", "cam-1", rotated[0]), "seq": 0}
    assert wire.parse("edgeops/lab/cam-1/telemetry", wire.encode(w)).doc["predictions"]["confidence"] == \
        rotated[0]["predictions"]["confidence"]


def _ingest(monitor, bundle, images, device, fleet="lab"):
    for i, w in enumerate(windows_of(bundle, images)):
        doc = {**wire.telemetry_message(fleet, device, w), "seq": i}
        monitor.ingest([(f"edgeops/{fleet}/{device}/telemetry", wire.encode(doc), 0, 0)])


def test_the_monitor_alerts_on_a_moved_camera_and_on_inputs_on_another_scale(digits_cnn_bundle, reference_data,
                                                                           tmp_path):
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.evaluate import MonitorConfig
    from telemetry.monitor import FleetMonitor

    manifest = json.loads((digits_cnn_bundle / "manifest.json").read_text())
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     config=MonitorConfig(recent_windows=3))
    X = (reference_data["digits"].X_test / 16.0).reshape(-1, 8, 8, 1)[:300]
    _ingest(m, digits_cnn_bundle, X, "cam-ok")
    _ingest(m, digits_cnn_bundle, np.roll(X, 2, axis=2), "cam-moved")
    _ingest(m, digits_cnn_bundle, X * 16.0, "cam-raw")            # pixels 0..16: another scale
    opened = {(e[1]["device_id"], e[1]["detector"]) for e in m.evaluate_pending() if e[0] == "opened"}
    assert ("cam-moved", "confidence_drift") in opened
    assert ("cam-raw", "out_of_range") in opened
    assert not {d for dev, d in opened if dev == "cam-ok"}
    assert ("cam-moved", "feature_drift") not in opened             # the channel statistics did not move
