"""A test subscriber that collects edgeops messages, with a persistent session."""

from __future__ import annotations

import json
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


class Collector:
    def __init__(self, port: int, topic: str = "edgeops/#", client_id: str = "test-collector"):
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.topic = topic
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client, userdata, msg):
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"raw": msg.payload}
        with self.lock:
            self.messages.append((msg.topic, doc))

    def telemetry(self, device: str | None = None) -> list[dict]:
        with self.lock:
            return [m for t, m in self.messages if t.endswith("/telemetry") and (device is None or m.get("device_id") == device)]

    def seqs(self, device: str | None = None) -> set[int]:
        return {m["seq"] for m in self.telemetry(device)}

    def wait_for(self, predicate, timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
