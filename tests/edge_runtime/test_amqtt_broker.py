"""Without Mosquitto: the pure-Python amqtt broker (MQTT 3.1.1) carries agents, monitor and flashing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from devtools.brokers import check_broker, free_port
from edge_runtime.errors import InvalidInputError
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually, stop_agent
from helpers.bundle_variants import variant


def test_the_broker_url_names_the_protocol():
    assert parse_broker_url("mqtt://127.0.0.1:1883").protocol == "5"
    a = parse_broker_url("mqtt://127.0.0.1:1884?protocol=3.1.1")
    assert (a.protocol, a.port, a.v5) == ("3.1.1", 1884, False)
    assert parse_broker_url(a.url) == a                          # the URL round-trips, protocol included
    assert parse_broker_url("mqtt://h?protocol=311").protocol == "3.1.1"
    with pytest.raises(InvalidInputError, match="protocol must be 5 or 3.1.1"):
        parse_broker_url("mqtt://h?protocol=4")
    with pytest.raises(InvalidInputError, match="unknown parameter 'qos'"):
        parse_broker_url("mqtt://h?qos=1")


def test_the_paho_check_passes_on_amqtt_and_mosquitto_and_says_what_fails(amqtt, session_mosquitto):
    assert check_broker(amqtt.url) is None
    assert check_broker(session_mosquitto.url) is None
    assert "cannot connect" in check_broker(f"mqtt://127.0.0.1:{free_port()}", timeout=2)


def test_a_monitor_cannot_share_a_subscription_on_an_mqtt_311_broker(amqtt, tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgeops", "monitor", "--broker", amqtt.url, "--share", "g",
                          "--db", f"sqlite:///{tmp_path / 'm.db'}", "--duration", "1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "--share needs MQTT 5" in res.stderr


@pytest.mark.slow
def test_agent_monitor_and_flash_work_over_amqtt(amqtt, bc_mlp_bundle, reference_data, tmp_path):
    data = reference_data["breast_cancer"]
    drifted = tmp_path / "drifted.npy"
    np.save(drifted, data.X_train * 1.6)
    v2 = variant(bc_mlp_bundle, tmp_path / "v2", "1.1.0")
    db = tmp_path / "monitor.db"
    monitor = subprocess.Popen([sys.executable, "-m", "edgeops", "monitor", "--broker", amqtt.url, "--db",
                                f"sqlite:///{db}", "--bundle", str(bc_mlp_bundle), "--bundle", str(v2),
                                "--client-id", "amqtt-monitor"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "d1",
                              "--fleet", "f", "--broker", amqtt.url, "--input", str(drifted), "--loop", "--rate",
                              "400", "--window-size", "40", "--state-dir", str(tmp_path / "d1"), "--duration", "120",
                              "--allow-unsigned"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    engine = create_engine(f"sqlite:///{db}")

    def query(sql):
        try:
            with engine.connect() as conn:
                return conn.execute(text(sql)).fetchall()
        except Exception:  # noqa: BLE001 - the monitor has not created its tables yet
            return []

    try:
        # windows arrive, are stored once each, and the drifted inputs open a drift alert
        assert eventually(lambda: len(query("select seq from edgeops_windows where device_id = 'd1'")) >= 8, 60, 0.3)
        seqs = [r[0] for r in query("select seq from edgeops_windows where device_id = 'd1' order by seq")]
        assert len(seqs) == len(set(seqs))          # no duplicate
        assert eventually(lambda: query("select 1 from edgeops_alerts where device_id = 'd1' and open "
                                        "and detector = 'feature_drift'"), 30, 0.3)
        # flashing goes over the same broker: chunks, result, and the new version's windows
        res = subprocess.run([sys.executable, "-m", "edgeops", "flash", str(v2), "--device", "d1", "--fleet", "f",
                              "--broker", amqtt.url, "--json", "--timeout", "60"],
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["version"] == "1.1.0"
        assert eventually(lambda: query("select 1 from edgeops_windows where device_id = 'd1' "
                                        "and model_version = '1.1.0'"), 30, 0.3)
    finally:
        out = stop_agent(agent)
        monitor.terminate()
        _, err = monitor.communicate(timeout=30)
    assert "rejected none" in err, err[-2000:]
    # end-to-end delivery over MQTT 3.1.1: windows published before the monitor subscribed (this broker
    # keeps no session for it) were resent, and the monitor's confirmations emptied the agent's spool
    assert " 0 windows left in the spool" in out, out[-2000:]
    n = int(out.split(" inferences, ")[0].rsplit(" ", 1)[1]) // 40
    stored = [r[0] for r in query("select seq from edgeops_windows where device_id = 'd1' order by seq")]
    assert stored[:n] == list(range(n))


def test_an_emulated_outage_on_311_fires_the_last_will_and_the_link_comes_back(amqtt):
    import threading

    from edge_runtime.mqtt import MqttLink

    seen, got, subscribed = [], threading.Event(), threading.Event()

    def on_message(topic, payload):
        seen.append((topic, payload))
        got.set()

    address = parse_broker_url(amqtt.url)
    watcher = MqttLink(address, "watcher", on_message=on_message, session_expiry=0,
                       on_connect=lambda: watcher.subscribe("edgeops/f/d1/status"))
    device = MqttLink(address, "d1", will=("edgeops/f/d1/status", b"offline"))
    watcher.client.on_subscribe = lambda *suback: subscribed.set()
    watcher.start()
    device.start()
    try:
        assert watcher.wait_connected(10) and device.wait_connected(10)
        assert subscribed.wait(10)                       # the watcher's SUBACK: its subscription is in place
        device.pause()                                   # no DISCONNECT packet: the broker sends the will
        assert got.wait(10) and seen[-1] == ("edgeops/f/d1/status", b"offline")
        device.resume()
        assert device.wait_connected(10)
        assert device.publish("edgeops/f/d1/status", b"online", qos=1) is not None
        assert eventually(lambda: seen[-1] == ("edgeops/f/d1/status", b"online"), 10), seen[-1]
    finally:
        device.stop()
        watcher.stop()
