"""Closing the loop: an alert that opens runs the configured command (the incident as JSON on its stdin) or
POSTs the incident, without holding up the monitor; `edgeops export --alert` writes what the store holds."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np

import edge_runtime
from edge_runtime import wire
from edge_runtime.labels import LabelJoiner, predicted_class
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry import store
from telemetry.evaluate import MonitorConfig
from telemetry.monitor import FleetMonitor
from telemetry.retrain import AlertTrigger

HOOK = """import json, os, sys
doc = json.load(sys.stdin)
out = sys.argv[1] + "." + doc["device_id"].replace("*", "fleet")     # the device's and the fleet's alerts
open(out + ".tmp", "w").write(json.dumps(doc))
os.replace(out + ".tmp", out)
"""


def labelled_windows(model, X, truth, device: str, size: int = 50) -> list[dict]:
    """The telemetry windows a device running ``model`` sends for these rows when every label comes back."""
    rec = model.start_recording(window_seconds=None, window_size=size)
    joiner = LabelJoiner(model.labels, rec.n_classes)
    out = []
    try:
        for i, (x, y) in enumerate(zip(X, truth, strict=True)):
            joiner.predicted(i, predicted_class(model.predict(x)))
            joiner.label(i, int(y))
            for w in rec.poll():
                w["labels"] = joiner.take_window()
                doc = wire.telemetry_message("ward", device, w)
                doc.update(seq=len(out), dropped_windows=0)
                out.append(doc)
    finally:
        model.stop_recording()
    return out


def _monitor_with_an_accuracy_alert(tmp_path, bundle, data, trigger) -> tuple[FleetMonitor, list[dict]]:
    model = edge_runtime.load(bundle)
    X = np.concatenate([data.X_train, data.X_train])[:600].astype(np.float32)     # 398 rows, looped
    truth = np.concatenate([data.y_train, data.y_train])[:600].astype(int)
    flip = np.random.default_rng(2).random(len(truth)) < 0.3
    truth[flip] = 1 - truth[flip]
    windows = labelled_windows(model, X, truth, "bed-9")
    monitor = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db",
                           config=MonitorConfig(min_open_seconds=0), bundles=[model.manifest], trigger=trigger)
    monitor.ingest([("edgeops/ward/bed-9/telemetry", wire.encode(w), 0, 0) for w in windows])
    return monitor, windows


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_alert_command_and_webhook_receive_the_incident(tmp_path, bc_mlp_bundle, reference_data):
    hook = tmp_path / "hook.py"
    hook.write_text(HOOK)
    got = tmp_path / "incident.json"
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    trigger = AlertTrigger(f"{sys.executable} {hook} {got}", f"http://127.0.0.1:{server.server_address[1]}/retrain",
                           timeout=60)
    try:
        monitor, windows = _monitor_with_an_accuracy_alert(tmp_path, bc_mlp_bundle, reference_data["breast_cancer"],
                                                           trigger)
        events = monitor.evaluate_pending()
        opened = [e for change, e in events if change == "opened"]
        assert [e["detector"] for e in opened if e["device_id"] == "bed-9"].count("accuracy") == 1
        mine = Path(f"{got}.bed-9")
        assert eventually(mine.exists, 30), "the command did not write the incident"
        doc = json.loads(mine.read_text())
        assert eventually(lambda: [r for r in _Hook.received if r["alert_id"] == doc["alert_id"]], 10)
        assert next(r for r in _Hook.received if r["alert_id"] == doc["alert_id"]) == doc
        alert = next(a for a in store.open_alerts(monitor.engine) if a["detector"] == "accuracy"
                     and a["device_id"] == "bed-9")
        assert doc["type"] == "incident" and doc["alert_id"] == alert["id"] and doc["detector"] == "accuracy"
        assert doc["device_id"] == "bed-9" and doc["devices"] == ["bed-9"] and doc["fleet"] == "ward"
        assert doc["bundle"] == {"name": windows[0]["model"]["name"], "version": windows[0]["model"]["version"]}
        rng = doc["window_range"]
        assert rng["windows"] == 10 and rng["devices"]["bed-9"] == {"first_seq": 2, "last_seq": 11}
        assert rng["start"] == windows[2]["start"] and rng["end"] == windows[11]["end"]
        assert doc["detail"]["labelled"] == 500 and doc["detail"]["accuracy"] < 0.8
        assert trigger.started >= 1 and trigger.failed == 0
        # an alert that stays open does not run the command again
        assert not [e for change, e in monitor.evaluate_pending() if change == "opened"]
    finally:
        server.shutdown()


def test_a_slow_alert_command_is_killed_and_never_holds_up_the_monitor(tmp_path, bc_mlp_bundle, reference_data):
    trigger = AlertTrigger(f"{sys.executable} -c 'import time; time.sleep(60)'", timeout=1.0)
    monitor, _ = _monitor_with_an_accuracy_alert(tmp_path, bc_mlp_bundle, reference_data["breast_cancer"], trigger)
    started = time.monotonic()
    events = monitor.evaluate_pending()
    assert time.monotonic() - started < 10
    assert any(e["detector"] == "accuracy" for change, e in events if change == "opened")
    assert trigger.started >= 1
    assert eventually(lambda: trigger.failed == trigger.started, 30), (trigger.started, trigger.failed)


def test_a_failing_alert_command_is_logged(tmp_path, bc_mlp_bundle, reference_data, caplog):
    trigger = AlertTrigger(f"{sys.executable} -c 'import sys; sys.exit(7)'", timeout=30)
    monitor, _ = _monitor_with_an_accuracy_alert(tmp_path, bc_mlp_bundle, reference_data["breast_cancer"], trigger)
    monitor.evaluate_pending()
    assert eventually(lambda: trigger.failed >= 1, 30)
    assert eventually(lambda: "exited 7" in caplog.text, 10)


def test_export_writes_what_the_store_holds_about_an_alert(tmp_path, bc_mlp_bundle, reference_data):
    monitor, windows = _monitor_with_an_accuracy_alert(tmp_path, bc_mlp_bundle, reference_data["breast_cancer"],
                                                       None)
    monitor.evaluate_pending()
    alert = next(a for a in store.open_alerts(monitor.engine) if a["detector"] == "accuracy"
                 and a["device_id"] == "bed-9")
    out = tmp_path / "export"
    db = f"sqlite:///{tmp_path}/m.db"
    res = subprocess.run([sys.executable, "-m", "edgeops", "export", "--alert", str(alert["id"]), "--db", db,
                          "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["alert.json", "labels.json", "merged.json", "reference.json",
                                                    "windows.jsonl"]
    exported = [json.loads(line) for line in (out / "windows.jsonl").read_text().splitlines()]
    assert [w["seq"] for w in exported] == list(range(len(windows)))
    assert exported[3]["labels"] == windows[3]["labels"]
    labels = json.loads((out / "labels.json").read_text())
    total = np.sum([w["labels"]["confusion"] for w in windows], axis=0)
    assert labels["confusion"] == total.tolist() and labels["labelled"] == 600
    assert labels["accuracy"] == round(float(np.trace(total)) / 600, 6) and labels["holdout_accuracy"] > 0.95
    merged = json.loads((out / "merged.json").read_text())
    assert merged["count"] == 600 and len(merged["features"]["count"]) == 30
    assert sum(merged["predictions"]["counts"]) == 600
    ref = json.loads((out / "reference.json").read_text())
    assert len(ref["features"]) == 30 and ref["bundle"]["name"] == windows[0]["model"]["name"]
    head = json.loads((out / "alert.json").read_text())
    assert head["alert"]["id"] == alert["id"] and head["incident"]["detector"] == "accuracy"
    unknown = subprocess.run([sys.executable, "-m", "edgeops", "export", "--alert", "99999", "--db", db, "--out",
                              str(tmp_path / "none")], capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "no alert 99999" in unknown.stderr
    assert not (tmp_path / "none").exists()
