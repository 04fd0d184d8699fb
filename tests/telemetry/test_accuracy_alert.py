"""Accuracy on late labels: agents report labelled confusion counts, the monitor compares the labelled accuracy
with the bundle's holdout accuracy and alerts on a drop, per device and per fleet."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np

import edge_runtime
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry import store
from telemetry.evaluate import MonitorConfig
from telemetry.monitor import FleetMonitor


def _labelled_csv(path, X, labels):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(X.shape[1])] + ["truth"])
        for row, y in zip(X, labels, strict=True):
            w.writerow([repr(float(v)) for v in row] + [y])


def test_accuracy_alert_on_a_device_whose_labels_are_30_percent_wrong_not_on_a_clean_one(
        mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    data = reference_data["breast_cancer"]
    model = edge_runtime.load(bc_mlp_bundle)
    X = data.X_train.astype(np.float32)
    pred = np.asarray(model.predict(X)).argmax(axis=1)
    truth = np.asarray(data.y_train, dtype=int)
    assert (pred == truth).mean() > 0.95                     # the model is right on these rows
    wrong = truth.copy()
    flip = np.random.default_rng(5).random(len(wrong)) < 0.3     # 30% of the labels name the other class
    wrong[flip] = 1 - wrong[flip]
    names = np.asarray(model.labels)
    _labelled_csv(tmp_path / "clean.csv", X, names[truth])
    _labelled_csv(tmp_path / "wrong.csv", X, names[wrong])

    db = f"sqlite:///{tmp_path}/monitor.db"
    monitor = FleetMonitor(parse_broker_url(mosquitto.url), db, fleet="ward", client_id="acc-monitor",
                           config=MonitorConfig(min_open_seconds=0), bundles=[model.manifest]).start()
    try:
        assert monitor.connected.wait(20)
        for dev, inputs in (("bed-clean", "clean.csv"), ("bed-wrong", "wrong.csv")):
            res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", dev,
                                  "--fleet", "ward", "--broker", mosquitto.url, "--input", str(tmp_path / inputs),
                                  "--label-column", "truth", "--loop", "--max-inferences", "600", "--window-size",
                                  "50", "--state-dir", str(tmp_path / dev)], capture_output=True, text=True,
                                 timeout=120)
            assert res.returncode == 0, res.stderr[-2000:]

        def accuracy_alerts():
            return {a["device_id"]: a for a in store.open_alerts(monitor.engine, "ward") if a["detector"] == "accuracy"}

        assert eventually(lambda: {"bed-wrong", "*"} <= set(accuracy_alerts()), 60), accuracy_alerts()
        assert eventually(lambda: monitor.stats.stored >= 24, 30)
        monitor.evaluate_pending()
        alerts = accuracy_alerts()
        assert "bed-clean" not in alerts
        detail = alerts["bed-wrong"]["detail"]
        holdout = next(a["parity"]["artifact_metric"] for a in model.manifest["artifacts"]
                       if a["file"] == detail["artifact"])
        assert detail["holdout_accuracy"] == round(holdout, 4)
        assert detail["labelled"] >= 100 and detail["p_value"] < 0.01
        assert 0.55 < detail["accuracy"] < 0.8 and detail["drop"] > 0.05
        # the stored windows of the clean device carry labels whose accuracy is near the holdout's
        clean = store.recent_windows(monitor.engine, "ward", "bed-clean", model.manifest["name"],
                                     model.manifest["version"], 10)
        confusion = np.sum([w["labels"]["confusion"] for w in clean if "labels" in w], axis=0)
        assert confusion.sum() >= 100 and np.trace(confusion) / confusion.sum() > 0.95
        # /metrics: the labelled accuracy per device, beside the holdout's
        from telemetry.http import FleetCollector

        families = {f.name: f for f in FleetCollector(monitor).collect()}
        got = {s.labels["device"]: s.value for s in families["edgeops_device_labelled_accuracy"].samples}
        assert got["bed-wrong"] == detail["accuracy"] and got["bed-clean"] > 0.95
        assert {s.labels["device"] for s in families["edgeops_device_holdout_accuracy"].samples} >= {"bed-wrong",
                                                                                                     "bed-clean"}
    finally:
        monitor.stop()
