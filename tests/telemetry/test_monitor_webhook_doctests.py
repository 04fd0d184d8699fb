"""Every drift detector's doctest runs; an opened alert is POSTed to the webhook with what it names."""

from __future__ import annotations

import doctest
import importlib
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest

from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry.evaluate import MonitorConfig
from telemetry.monitor import FleetMonitor
from telemetry.synthetic import make_window, reference_manifest

DETECTORS = ["psi", "chi2", "ks_binned", "batch", "multiple_testing", "meanshift", "missing", "prediction"]


@pytest.mark.parametrize("name", DETECTORS)
def test_each_drift_detector_has_a_passing_doctest(name):
    module = importlib.import_module(f"telemetry.drift.{name}")
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0, result


def test_an_opened_alert_is_posted_to_the_webhook(tmp_path):
    received = []

    class Hook(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rng = np.random.default_rng(0)
        X = rng.normal(size=(2000, 6))
        manifest = reference_manifest(X, None, "m", feature_names=[f"f{i}" for i in range(6)])
        mon = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                           config=MonitorConfig(min_samples=200),
                           webhook=f"http://127.0.0.1:{server.server_address[1]}/alerts")
        shifted = X[rng.integers(0, 2000, (4, 100))].copy()
        shifted[:, :, 2] += 3.0                                           # feature f2 moves 3 sd
        mon.ingest([("edgeops/f1/dev-9/telemetry", json.dumps(make_window(rows, manifest, "dev-9", i)).encode(), 0, 0)
                    for i, rows in enumerate(shifted)])
        events = mon.evaluate_pending()
        assert ("opened", "feature_drift") in {(e[0], e[1]["detector"]) for e in events}
        eventually(lambda: len(received) >= 2, 10)                       # the device and the fleet
    finally:
        server.shutdown()
    (hook,) = [r for r in received if r["detector"] == "feature_drift" and r["device_id"] == "dev-9"]
    assert hook["event"] == "opened" and hook["features"] == ["f2"]
    assert any(r["device_id"] == "*" for r in received)               # the fleet as a whole drifted too
    assert hook["model"] == {"name": "m", "version": "1.0.0"} and hook["statistic"] > 0.2


def test_the_batched_feature_tests_equal_the_per_feature_ones():
    from telemetry.drift.batch import feature_tests
    from telemetry.drift.chi2 import chi2_homogeneity
    from telemetry.drift.ks_binned import ks_binned
    from telemetry.drift.psi import psi

    rng = np.random.default_rng(5)
    ref, cur = [], []
    for k in [10, 10, 4, 1, 7, 10, 2, 10]:                 # bins per feature differ, one has a single bin
        r = rng.integers(0, 60, k)
        c = rng.integers(0, 120, k)
        if k == 7:
            r[2] = c[2] = 0                                   # a bin empty on both sides
        if k == 2:
            c[:] = 0                                          # nothing seen for this feature
        ref.append(r.tolist())
        cur.append(c.tolist())
    cur[-1] = (np.array(ref[-1]) * 3).tolist()               # the same shape: no drift at all
    psis, chi2_p, ks_p = feature_tests(ref, cur)
    for i, (r, c) in enumerate(zip(ref, cur, strict=True)):
        assert psis[i] == pytest.approx(psi(r, c), abs=1e-12), i
        assert chi2_p[i] == pytest.approx(chi2_homogeneity(r, c)[1], rel=1e-9, abs=1e-300), i
        assert ks_p[i] == pytest.approx(ks_binned(r, c)[1], rel=1e-9, abs=1e-300), i
    assert chi2_p[-1] == pytest.approx(1.0) and ks_p[-1] == 1.0
