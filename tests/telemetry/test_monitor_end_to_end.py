"""Device to monitor: `edgeops run` agents publish, `edgeops monitor` stores, evaluates and alerts."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from helpers import eventually
from helpers.mqtt_collector import Collector

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
    engine = create_engine(f"sqlite:///{db}")

    def connected():     # the monitor records its session when it connects, just before it subscribes
        try:
            with engine.connect() as conn:
                return conn.execute(text("select count(*) from edgeops_monitor_sessions")).scalar()
        except Exception:  # noqa: BLE001 - tables not created yet
            return 0

    try:
        assert eventually(connected, 60), "the monitor did not connect"
        agents = [subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", dev,
                                  "--fleet", "ward", "--broker", mosquitto.url, "--input", str(inputs), "--loop",
                                  "--max-inferences", "1200", "--window-size", "100",
                                  "--state-dir", str(tmp_path / dev), *extra], capture_output=True, text=True,
                                 timeout=120)
                  # bed-2 sends its windows zlib-compressed: the monitor takes both encodings
                  for dev, inputs, extra in (("bed-1", clean, []), ("bed-2", drifted, ["--compress"]))]
        assert all(a.returncode == 0 for a in agents), [a.stderr[-500:] for a in agents]
        def stored():
            with engine.connect() as conn:
                return conn.execute(text("select count(*) from edgeops_windows")).scalar()

        assert eventually(lambda: stored() >= 24, 30) and stored() == 24
        eventually(lambda: any(any(a["device_id"] == "bed-2" for a in m.get("open", []))
                               for _, m in alerts.messages), 20)
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
