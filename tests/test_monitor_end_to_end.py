"""Device to monitor: `edgeops run` agents publish, `edgeops monitor` stores, evaluates and alerts."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from mqtt_collector import Collector

pytestmark = pytest.mark.slow


def test_agents_report_to_the_monitor_which_flags_only_the_drifted_device(mosquitto, bc_mlp_bundle, reference_data,
                                                                            tmp_path):
    data = reference_data["breast_cancer"]
    clean, drifted = tmp_path / "clean.npy", tmp_path / "drifted.npy"
    np.save(clean, data.X_train)
    np.save(drifted, data.X_train * 1.6)
    db = tmp_path / "monitor.db"
    monitor = subprocess.Popen([sys.executable, "-m", "edgeops", "monitor", "--broker", mosquitto.url, "--db",
                                f"sqlite:///{db}", "--bundle", str(bc_mlp_bundle), "--client-id", "e2e-monitor"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    alerts = Collector(mosquitto.port, topic="edgeops/+/alerts", client_id="alerts-watcher")
    try:
        time.sleep(2.0)
        agents = [subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", dev,
                                  "--fleet", "ward", "--broker", mosquitto.url, "--input", str(inputs), "--loop",
                                  "--max-inferences", "1200", "--window-size", "100",
                                  "--state-dir", str(tmp_path / dev), *extra], capture_output=True, text=True,
                                 timeout=120)
                  # bed-2 sends its windows zlib-compressed: the monitor takes both encodings
                  for dev, inputs, extra in (("bed-1", clean, []), ("bed-2", drifted, ["--compress"]))]
        assert all(a.returncode == 0 for a in agents), [a.stderr[-500:] for a in agents]
        engine = create_engine(f"sqlite:///{db}")

        def stored():
            with engine.connect() as conn:
                return conn.execute(text("select count(*) from edgeops_windows")).scalar()

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and stored() < 24:
            time.sleep(0.2)
        assert stored() == 24
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(
                any(a["device_id"] == "bed-2" for a in m.get("open", [])) for _, m in alerts.messages):
            time.sleep(0.2)
        latest = alerts.messages[-1][1]
        flagged = {(a["device_id"], a["detector"]) for a in latest["open"]}
        assert ("bed-2", "feature_drift") in flagged
        # both agents have stopped, so both are silent (offline status); only bed-2 drifted
        assert [f for f in flagged if f[0] == "bed-1"] in ([], [("bed-1", "silence")])
    finally:
        alerts.close()
        monitor.send_signal(signal.SIGTERM)
        out, err = monitor.communicate(timeout=30)
    assert monitor.returncode == 0, err[-1000:]
    assert "rejected none" in err and "24 windows stored" in err
