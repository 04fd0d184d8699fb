"""`edgeops run` and `edgeops bench` on the emulated aarch64 device, talking to a broker on the host."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from helpers.mqtt_collector import Collector

pytestmark = pytest.mark.arm64


def test_an_agent_inside_publishes_windows_to_a_broker_on_the_host(arm_device, mosquitto, bc_rf_bundle,
                                                                     reference_data, tmp_path):
    schema = json.loads((arm_device.repo / "edge_runtime" / "schemas" / "telemetry.schema.json").read_text())
    inputs = tmp_path / "bc.npy"
    np.save(inputs, reference_data["breast_cancer"].X_test[:120])
    sub = Collector(mosquitto.port, client_id="arm64-collector")
    try:
        proc = arm_device.edgeops(
            ["run", str(bc_rf_bundle), "--device-id", "pi-emu-1", "--fleet", "arm",
             "--broker", mosquitto.url, "--input", str(inputs), "--window-size", "50",
             "--state-dir", str(tmp_path / "state")],
            timeout=180)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert sub.wait_for(lambda: len(sub.telemetry("pi-emu-1")) == 3, timeout=30), sub.messages
        windows = sorted(sub.telemetry("pi-emu-1"), key=lambda m: m["seq"])
        for window in windows:
            jsonschema.validate(window, schema)
        assert [w["seq"] for w in windows] == [0, 1, 2]
        assert [w["count"] for w in windows] == [50, 50, 20]
        assert sum(w["errors"] if isinstance(w.get("errors"), int) else 0 for w in windows) == 0

        statuses = [m for t, m in sub.messages if t == "edgeops/arm/pi-emu-1/status"]
        assert statuses, "no status message"
        for status in statuses:
            jsonschema.validate(status, schema)
        assert statuses[0]["online"] is True and statuses[-1]["online"] is False
        assert statuses[0]["platform"]["machine"] == "aarch64"
    finally:
        sub.close()


def test_bench_inside_reports_an_aarch64_machine(arm_device, arm_binfmt, digits_cnn_bundle, tmp_path):
    # Each artifact is measured in a child process: an aarch64 child, through binfmt_misc.
    out = tmp_path / "bench.json"
    proc = arm_device.edgeops(
        ["bench", str(digits_cnn_bundle), "--artifact", "model.int8.tflite", "--runs", "5", "--warmup", "1",
         "--json", str(out)],
        timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["arch"] == "aarch64"
    assert machine["cpu"] == "Cortex-A72"
    assert "emulated" in (machine["board"] or "")
    assert machine["python"].startswith("3.11.")
    (row,) = result["results"]
    assert row["artifact"].endswith("model.int8.tflite")
    assert row["backend"] == "litert"
    assert row["latency_ms"]
