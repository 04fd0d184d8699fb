"""Input health on the device: rejections counted by reason, values outside the calibration range counted per
feature, and a warning when the inputs look like another scale than the data the model was calibrated on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from edge_runtime import wire
from helpers.mqtt_collector import Collector


def run_agent(bundle, broker, inputs, state, *extra):
    return subprocess.run([sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", "dev-h", "--fleet",
                           "lab", "--broker", broker.url, "--input", str(inputs), "--state-dir", str(state),
                           "--confirm", "broker", *map(str, extra)], capture_output=True, text=True, timeout=120)


def test_raw_digits_pixels_on_a_model_calibrated_on_0_to_1_are_flagged(mosquitto, digits_cnn_bundle, reference_data,
                                                                       tmp_path):
    X = reference_data["digits"].X_test[:100]
    np.save(tmp_path / "raw.npy", X)                 # 0..16, as the data set ships
    np.save(tmp_path / "scaled.npy", X / 16.0)       # what the model was calibrated on
    sub = Collector(mosquitto.port)
    try:
        raw = run_agent(digits_cnn_bundle, mosquitto, tmp_path / "raw.npy", tmp_path / "s1", "--window-size", 50)
        assert raw.returncode == 0, raw.stderr[-2000:]
        assert "another scale" in raw.stderr and "calibration 0..1)" in raw.stderr
        assert raw.stderr.count("another scale") == 1                    # once, not per window
        scaled = run_agent(digits_cnn_bundle, mosquitto, tmp_path / "scaled.npy", tmp_path / "s2",
                           "--window-size", 50)
        assert scaled.returncode == 0 and "another scale" not in scaled.stderr
        assert sub.wait_for(lambda: len(sub.telemetry()) >= 4)
        for w in sub.telemetry():
            oor = w["features"]["out_of_range"]
            assert len(oor) == len(w["features"]["count"]) == 1          # one channel
            assert wire.parse("edgeops/lab/dev-h/telemetry", wire.encode(w)).doc["features"]["out_of_range"] == oor
        shares = sorted(w["features"]["out_of_range"][0] / w["features"]["count"][0] for w in sub.telemetry())
        assert shares[0] == 0.0 and shares[-1] > 0.3                    # scaled windows in range, raw ones not
    finally:
        sub.close()


def test_rejected_inputs_are_counted_by_reason(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:50].copy()
    X[:, 3] = np.nan                                  # every row carries a NaN: rejected by default
    np.save(tmp_path / "nan.npy", X)
    sub = Collector(mosquitto.port)
    try:
        res = run_agent(bc_mlp_bundle, mosquitto, tmp_path / "nan.npy", tmp_path / "s", "--window-size", 50)
        assert res.returncode == 0, res.stderr[-2000:]
        assert sub.wait_for(lambda: len(sub.telemetry()) == 1)
        (w,) = sub.telemetry()
        assert w["count"] == 50 and w["rejected"] == 50 and w["rejected_by"] == {"nan": 50}
        assert wire.parse("edgeops/lab/dev-h/telemetry", wire.encode(w)).doc["rejected_by"] == {"nan": 50}
    finally:
        sub.close()


def test_drifted_but_same_scale_inputs_raise_no_scale_warning(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    np.save(tmp_path / "drift.npy", reference_data["breast_cancer"].X_test * 1.6)   # drift, for the monitor to see
    res = run_agent(bc_mlp_bundle, mosquitto, tmp_path / "drift.npy", tmp_path / "s", "--window-size", 50)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "another scale" not in res.stderr
