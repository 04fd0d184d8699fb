"""``edgeops monitor --ack-qos 0``: confirmations without a PUBACK to track still empty a real agent's spool,
over either of the monitor's MQTT connections (``--mqtt-client stream`` or ``paho``)."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest

from helpers import eventually


@pytest.mark.slow
@pytest.mark.parametrize("mqtt_client", ["stream", "paho"])
@pytest.mark.parametrize("ack_qos", [0, 1])
def test_an_agent_is_confirmed_at_either_ack_qos(ack_qos, mqtt_client, mosquitto, bc_rf_bundle, reference_data,
                                                 tmp_path):
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    inputs = tmp_path / "bc.npy"
    np.save(inputs, reference_data["breast_cancer"].X_test)           # 171 rows: 5 windows of 40
    mon = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/m.db", fleet="lab",
                       ack_qos=ack_qos, mqtt_client=mqtt_client).start()
    seen, lock, subscribed = [], threading.Lock(), threading.Event()
    watch = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ack-watch-{ack_qos}-{mqtt_client}")

    def on_message(client, userdata, msg):
        with lock:
            seen.append(msg.qos)

    watch.on_message = on_message
    watch.on_subscribe = lambda *a: subscribed.set()
    watch.connect("127.0.0.1", mosquitto.port)
    watch.loop_start()
    watch.subscribe("edgeops/lab/+/ack", 1)       # delivered at the lower of this and the monitor's QoS
    try:
        assert mon.connected.wait(10) and subscribed.wait(10)
        run = subprocess.run(
            [sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", "dev-q", "--fleet", "lab",
             "--broker", mosquitto.url, "--input", str(inputs), "--state-dir", str(tmp_path / "dev-q"),
             "--window-size", "40"], capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert " 0 windows left in the spool" in run.stderr     # every window confirmed by the monitor
        assert eventually(lambda: mon.stats.stored == 5, 30), dict(mon.stats.rejected)
        with lock:
            assert seen and set(seen) == {ack_qos}, seen
    finally:
        watch.loop_stop()
        watch.disconnect()
        mon.stop()


def test_an_ack_qos_other_than_0_or_1_is_refused():
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    with pytest.raises(ValueError, match="--ack-qos 2"):
        FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), "sqlite://", ack_qos=2)


def test_an_unknown_mqtt_client_is_refused(tmp_path):
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    with pytest.raises(ValueError, match="--mqtt-client gmqtt"):
        FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), "sqlite://", mqtt_client="gmqtt")
    run = subprocess.run([sys.executable, "-m", "edgeops", "monitor", "--broker", "mqtt://127.0.0.1:1",
                          "--db", f"sqlite:///{tmp_path}/m.db", "--mqtt-client", "gmqtt", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "gmqtt" in run.stderr, run.stderr      # a usage error


def test_alerts_broker_without_a_nats_broker_is_a_clear_error(tmp_path):
    """--alerts-broker names the NATS servers' MQTT side; with an MQTT --broker the alerts are retained on
    that broker already, so the flag is refused before anything starts (exit 3: an invalid input)."""
    run = subprocess.run([sys.executable, "-m", "edgeops", "monitor", "--broker", "mqtt://127.0.0.1:1",
                          "--db", f"sqlite:///{tmp_path}/m.db", "--alerts-broker", "mqtt://127.0.0.1:2",
                          "--duration", "1"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 3, (run.returncode, run.stderr)
    assert "--alerts-broker goes with a nats:// --broker" in run.stderr
    assert not (tmp_path / "m.db").exists()       # refused before the database was opened
