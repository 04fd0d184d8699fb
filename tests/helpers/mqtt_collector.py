"""A test subscriber that collects edgeops messages, with a persistent session."""

from __future__ import annotations

import json
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from helpers import eventually


class Collector:
    """Subscribes to ``topic`` and keeps every message; the constructor returns once the broker's SUBACK is in.

    Args:
        port: the broker's port on 127.0.0.1.
        topic: what to subscribe to.
        client_id: the session's id (the session lives 10 minutes after a disconnect).
        timeout: seconds to wait for the CONNACK and the SUBACK.
    """

    def __init__(self, port: int, topic: str = "edgeops/#", client_id: str = "test-collector", timeout: float = 10.0):
        self.messages: list[tuple[str, dict]] = []
        self.lock = threading.Lock()
        self.topic = topic
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.topic, qos=1)
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(1, 2)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 600
        self.client.connect("127.0.0.1", port, clean_start=False, properties=props)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.close()
            raise TimeoutError(f"no SUBACK for {topic} from the broker on port {port} within {timeout:g}s")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        if all(not rc.is_failure for rc in reason_codes):
            self.subscribed.set()

    def _on_message(self, client, userdata, msg):
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            doc = {"raw": msg.payload}
        with self.lock:
            self.messages.append((msg.topic, doc))

    def telemetry(self, device: str | None = None) -> list[dict]:
        with self.lock:
            return [m for t, m in self.messages
                    if t.endswith("/telemetry") and (device is None or m.get("device_id") == device)]

    def seqs(self, device: str | None = None) -> set[int]:
        return {m["seq"] for m in self.telemetry(device)}

    def wait_for(self, predicate, timeout: float = 20.0):
        """:func:`helpers.eventually` with this collector's default timeout."""
        return eventually(predicate, timeout)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()
