"""``--encoding cbor-ref`` end to end: a real agent codes its windows' moments against its bundle's reference
profile, and a monitor that learns of the bundle after it started (registered by another process, as
``edgeops convert --register`` does) reads the registry again on the first such window and stores them all."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime import compact, wire
from helpers import eventually
from helpers.mqtt_collector import Collector


@pytest.mark.slow
def test_an_agent_publishing_cbor_ref_windows_is_stored_by_a_monitor_that_learns_the_bundle_late(
        mosquitto, bc_rf_bundle, reference_data, tmp_path):
    from edge_runtime.mqtt import parse_broker_url
    from telemetry import store
    from telemetry.monitor import FleetMonitor

    # the codec's registry is per process: this one plays the monitor, so it starts knowing no bundle
    compact._BUNDLES.clear()
    compact._BY_MODEL.clear()
    inputs = tmp_path / "bc.npy"
    np.save(inputs, reference_data["breast_cancer"].X_test)
    mon = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/ref.db", fleet="lab").start()
    sub = Collector(mosquitto.port, "edgeops/lab/+/telemetry", client_id="cbor-ref-collector")
    try:
        assert mon.connected.wait(10)
        store.store_bundle(mon.engine, json.loads((bc_rf_bundle / "manifest.json").read_text()))
        run = subprocess.run(
            [sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", "dev-ref", "--fleet", "lab",
             "--broker", mosquitto.url, "--input", str(inputs), "--state-dir", str(tmp_path / "dev-ref"),
             "--window-size", "40", "--encoding", "cbor-ref"], capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert " 0 windows left in the spool" in run.stderr     # every window confirmed by the monitor
        assert eventually(lambda: mon.stats.stored == 5, 30), dict(mon.stats.rejected)   # 171 inputs
        assert not mon.stats.rejected
    finally:
        mon.stop()
        sub.close()
    payloads = [m["raw"] for _, m in sub.messages]
    assert len(payloads) >= 5
    for p in payloads:
        doc = compact.decode(p)
        # fewer bytes than the half-precision form of the same window, which carries the moments itself
        assert len(p) < len(wire.encode(doc, encoding="cbor"))
