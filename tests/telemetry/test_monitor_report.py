"""`edgeops report`: the one-page fleet picture from a monitor database."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.mqtt import parse_broker_url
from telemetry.monitor import FleetMonitor
from telemetry.report import write_report
from telemetry.synthetic import make_window, reference_manifest, status_doc

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def monitor_db(tmp_path_factory):
    """A database as a monitor leaves it: two bundles with parity figures, a clean, a drifted, a slow and an
    offline device, and the alerts their evaluation opened."""
    from convert.reference import load_reference_data

    d = load_reference_data("breast_cancer")
    manifest = reference_manifest(d.X_train, d.y_train, "bc-model", feature_names=d.feature_names)
    manifest["artifacts"] = [
        {"file": f, "format": fmt, "quantization": q, "size_bytes": size,
         "parity": {"n_samples": 171, "metric": "accuracy", "source_metric": 0.971, "artifact_metric": acc,
                    "metric_drop_points": round((0.971 - acc) * 100, 2)}}
        for f, fmt, q, size, acc in (("model.tflite", "tflite", "none", 60000, 0.971),
                                     ("model.int8.tflite", "tflite", "int8", 17000, 0.965),
                                     ("model.onnx", "onnx", "none", 61000, 0.971))]
    db = tmp_path_factory.mktemp("report") / "monitor.db"
    url = f"sqlite:///{db}"
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), url, fleet="+", bundles=[manifest])
    rng = np.random.default_rng(5)
    priors = manifest["reference_profile"]["class_priors"]["priors"]
    spread = d.X_train.std(axis=0)
    for seq in range(25):
        batch = []
        for dev, shift, lat in (("dev-clean", 0.0, 2.0), ("dev-drift", 1.0 if seq >= 12 else 0.0, 2.5),
                                ("dev-slow", 0.0, 2.0 if seq < 15 else 6.0)):
            rows = d.X_train[rng.integers(0, len(d.X_train), 100)] + shift * spread
            w = make_window(rows, manifest, dev, seq, fleet="plant", start=1000.0 + 10 * seq,
                            predictions=rng.choice(2, size=100, p=priors), latencies_ms=rng.gamma(9.0, lat / 9, 100))
            batch.append((f"edgeops/plant/{dev}/telemetry", json.dumps(w).encode(), 0, 0))
        m.ingest(batch)
        m.evaluate_pending()
    m.ingest([("edgeops/plant/dev-off/status", json.dumps(
        status_doc("dev-off", "plant", False, 1200.0, {"name": "bc-model", "version": "1.0.0"})).encode(), 0, 0)])
    m.check_silence(now=1260.0)
    m.engine.dispose()
    return url


def test_the_png_report_is_a_picture_of_the_fleet(monitor_db, tmp_path):
    out = write_report(monitor_db, tmp_path / "report.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 30_000


def test_the_html_report_embeds_the_picture_and_lists_alerts_devices_and_parity(monitor_db, tmp_path):
    page = write_report(monitor_db, tmp_path / "report.html").read_text()
    assert "http://" not in page and "https://" not in page        # self-contained
    b64 = page.split("data:image/png;base64,", 1)[1].split("'", 1)[0]
    assert base64.b64decode(b64).startswith(PNG_MAGIC)
    alerts = page.split("<h2>Open alerts</h2>", 1)[1].split("<h2>", 1)[0]
    assert "dev-drift" in alerts and "feature_drift" in alerts
    assert "dev-slow" in alerts and "latency" in alerts
    assert "dev-clean" not in alerts
    assert "dev-off" in alerts and "silence" in alerts
    assert "model.int8.tflite" in page and "0.965" in page


@pytest.mark.slow
def test_edgeops_report_from_the_command_line(monitor_db, tmp_path):
    out = tmp_path / "fleet.png"
    run = subprocess.run([sys.executable, "-m", "edgeops", "report", "--db", monitor_db, "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes().startswith(PNG_MAGIC) and str(out) in run.stdout
    bad = subprocess.run([sys.executable, "-m", "edgeops", "report", "--db", monitor_db, "--out",
                          str(tmp_path / "fleet.pdf")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 3 and bad.stderr.startswith("edgeops: error:") and "Traceback" not in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "edgeops", "report", "--db", f"sqlite:///{tmp_path}/none.db",
                              "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 3 and "no database file" in missing.stderr
