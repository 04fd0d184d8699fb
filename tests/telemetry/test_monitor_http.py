"""The monitor's HTTP side: an operator sees the drifted device in alarm, Prometheus scrapes the figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from edge_runtime.mqtt import parse_broker_url
from telemetry.http import start_http
from telemetry.monitor import FleetMonitor
from telemetry.synthetic import make_window, reference_manifest, status_doc

FLEET = "plant"


def stream(device, manifest, X, n_windows, rng, shift=None, latency=2.0, size=100):
    """Windows of rows drawn from X; the model is emulated by the reference class priors."""
    priors = manifest["reference_profile"]["class_priors"]["priors"]
    out = []
    for i in range(n_windows):
        rows = X[rng.integers(0, len(X), size)].astype(np.float64)
        if shift is not None:
            rows = shift(rows)
        out.append(make_window(rows, manifest, device, i, fleet=FLEET, start=1000.0 + 10 * i,
                               predictions=rng.choice(len(priors), size=size, p=priors),
                               latencies_ms=rng.gamma(9.0, latency / 9.0, size)))
    return out


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from convert.reference import load_reference_data

    d = load_reference_data("breast_cancer")
    manifest = reference_manifest(d.X_train, d.y_train, "bc-model", feature_names=d.feature_names)
    db = tmp_path_factory.mktemp("http") / "monitor.db"
    # no broker needed: windows go in through ingest(), exactly as the MQTT thread hands them over
    monitor = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{db}", bundles=[manifest])
    rng = np.random.default_rng(3)
    # clean rows come from the reference data itself: resampling the 171 test rows into 1000-sample windows
    # would test that small set's own sampling noise against the reference
    clean = stream("dev-clean", manifest, d.X_train, 10, rng)
    spread = d.X_train.std(axis=0)
    drifted = stream("dev-drift", manifest, d.X_test, 10, rng, shift=lambda r: r + 1.0 * spread, latency=4.0)
    batch = [(f"edgeops/{FLEET}/{w['device_id']}/telemetry", json.dumps(w).encode(), 0, 0) for w in clean + drifted]
    batch.append(("edgeops/plant/dev-clean/telemetry", b"{broken", 0, 0))
    batch.append(("edgeops/plant/dev-off/status", json.dumps(
        status_doc("dev-off", FLEET, False, 1000.0, {"name": "bc-model", "version": "1.0.0"})).encode(), 0, 0))
    monitor.ingest(batch)
    monitor.ingest(batch[:3])                          # a redelivery
    monitor.evaluate_pending()
    server = start_http(monitor, "127.0.0.1", 0)
    yield monitor, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers.get("Content-Type"), resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type"), err.read().decode()


def test_prometheus_sees_latency_drift_totals_and_rejections(served):
    monitor, base = served
    status, ctype, text = get(base + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    lines = text.splitlines()

    def value(prefix):
        hits = [float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix)]
        assert hits, f"no metric line starts with {prefix}"
        return hits[0]

    assert value("edgeops_monitor_windows_stored_total ") == 20
    assert value("edgeops_monitor_duplicates_total ") == 3
    assert value('edgeops_monitor_rejected_total{reason="malformed_json"}') == 1
    assert value('edgeops_device_inferences_total{device="dev-drift",fleet="plant"}') == 1000
    assert value('edgeops_device_errors_total{device="dev-clean",fleet="plant"}') == 0
    p50 = value('edgeops_device_latency_ms{device="dev-drift",fleet="plant",quantile="0.5"}')
    p99 = value('edgeops_device_latency_ms{device="dev-drift",fleet="plant",quantile="0.99"}')
    assert 2.0 < p50 < p99
    drift_psi = value('edgeops_device_drift_psi{device="dev-drift",feature="mean radius",fleet="plant"}')
    clean_psi = value('edgeops_device_drift_psi{device="dev-clean",feature="mean radius",fleet="plant"}')
    assert drift_psi > 0.2 > clean_psi
    assert value('edgeops_device_online{device="dev-off",fleet="plant"}') == 0
    assert value('edgeops_device_online{device="dev-clean",fleet="plant"}') == 1
    # last seen is when the monitor received the device's latest message, whatever the device's clock says
    last_seen = value('edgeops_device_last_seen_timestamp_seconds{device="dev-clean",fleet="plant"}')
    assert abs(last_seen - time.time()) < 600
    assert value('edgeops_device_open_alerts{device="dev-drift",fleet="plant"}') >= 1


def test_the_json_api_lists_devices_and_open_alerts(served):
    _, base = served
    status, ctype, text = get(base + "/api/devices")
    assert status == 200 and ctype == "application/json"
    devices = {d["device_id"]: d for d in json.loads(text)["devices"]}
    assert set(devices) == {"dev-clean", "dev-drift", "dev-off"}
    assert "feature_drift" in devices["dev-drift"]["open_alerts"] and devices["dev-drift"]["worst_drift"]["psi"] > 0.2
    assert devices["dev-clean"]["open_alerts"] == [] and devices["dev-clean"]["status"] == "online"
    assert devices["dev-off"]["status"] == "offline"
    assert devices["dev-drift"]["p95_ms"] > devices["dev-clean"]["p95_ms"]
    alerts = json.loads(get(base + "/api/alerts")[2])["alerts"]
    assert {(a["device_id"], a["detector"]) for a in alerts} >= {("dev-drift", "feature_drift")}
    assert not any(a["device_id"] == "dev-clean" for a in alerts)


def test_unknown_pages_are_json_404s_and_the_device_page_draws_its_series(served):
    _, base = served
    for path in ("/nope", "/device/plant/ghost", "/device/only-one-part", "/api/devices/extra"):
        status, ctype, text = get(base + path)
        assert status == 404 and ctype == "application/json", path
        assert json.loads(text)["error"] == "not_found" and "Traceback" not in text
    status, ctype, page = get(base + "/device/plant/dev-drift")
    assert status == 200 and ctype.startswith("text/html")
    assert page.count("<polyline") == 2                      # p95 latency and inference count per window
    assert "class='bar alarm'" in page and "mean radius" in page
    assert "ALERT" in page and "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_the_dashboard_shows_the_drifted_device_in_alarm_in_a_real_browser(served, tmp_path):
    _, base = served
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed")
        pytest.skip("chromium is not installed")
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}",
           "--dump-dom", base + "/"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    rows = dict((dev, cls) for cls, dev in re.findall(r'<tr class="(\w+)" data-device="([^"]+)"', dom))
    assert rows.get("dev-drift") == "alarm", dom[:2000]
    assert rows.get("dev-clean") == "ok"
    drift_row = re.search(r'<tr class="alarm" data-device="dev-drift">(.*?)</tr>', dom, re.S).group(1)
    assert "ALERT" in drift_row and "feature_drift" in drift_row
    assert "offline" in re.search(r'data-device="dev-off">(.*?)</tr>', dom, re.S).group(1)
