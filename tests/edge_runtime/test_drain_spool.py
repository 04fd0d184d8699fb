"""The drain at a stop sends the spool, not only what is in flight: a backlog that no monitor saw is sent
again and confirmed within the drain timeout once a monitor is there; without one, the stop stays quick."""

from __future__ import annotations

import json
import sqlite3
import threading
import time

import numpy as np
import pytest

import edge_runtime
from edge_runtime.agent import STOP_BOUND_S, DeviceAgent
from edge_runtime.delivery import WindowDelivery
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.spool import WindowSpool
from helpers import eventually


@pytest.fixture
def rows(reference_data):
    return reference_data["breast_cancer"].X_test.astype(np.float32)[:165]      # 16 windows of 10, and 5


def make_agent(broker, bundle, tmp_path) -> DeviceAgent:
    return DeviceAgent(edge_runtime.load(bundle), "dev-d", "drain", parse_broker_url(broker.url),
                       state_dir=tmp_path / "dev-d", window_size=10, window_seconds=None)


def stored(db) -> list[int]:
    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return [r[0] for r in conn.execute(
                "select seq from edgeops_windows where device_id = 'dev-d' order by seq")]
    except sqlite3.OperationalError:      # no table yet
        return []


def published_without_a_monitor(agent: DeviceAgent, rows) -> None:
    """The agent runs while no monitor is there: every window is published, acknowledged by the broker
    (which has no subscriber to give it to) and stays spooled, due again only after --resend-after (30 s);
    the last five inferences are in the window the stop closes."""
    agent.start()
    assert agent.link.wait_connected(30)
    agent.run(rows)
    assert eventually(lambda: agent.delivery.inflight == 0 and agent.delivery._last_new == 15, 30)
    assert len(agent.spool) == 16


def test_a_backlog_no_monitor_saw_is_sent_and_confirmed_by_the_drain(mosquitto, bc_mlp_bundle, rows, tmp_path):
    """The monitor comes after the windows were published and the agent stops at once: the window the stop
    closes is confirmed, and the drain sends the 16 the monitor never saw again and waits for them."""
    from telemetry.monitor import FleetMonitor

    agent = make_agent(mosquitto, bc_mlp_bundle, tmp_path)
    monitor = None
    try:
        published_without_a_monitor(agent, rows)
        db = tmp_path / "m.db"
        monitor = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{db}", fleet="drain").start()
        assert monitor.connected.wait(30)         # connected and subscribed
        t0 = time.monotonic()
        left = agent.stop(drain_timeout=10.0)
        took = time.monotonic() - t0
        assert left == 0, f"{left} of 17 windows still spooled after the drain"
        assert agent.delivery.resent >= 16
        assert took < 10.0 + STOP_BOUND_S
        assert eventually(lambda: stored(db) == list(range(17)), 10), stored(db)
    finally:
        if monitor is not None:
            monitor.stop()


def test_without_a_monitor_the_stop_ends_soon_after_the_broker_acknowledged(mosquitto, bc_mlp_bundle, rows,
                                                                             tmp_path):
    """No monitor confirms: the drain does not wait its timeout, only the confirmation grace after the
    PUBACK of the window the stop closed; nothing is published twice, the windows stay spooled for the
    next run."""
    agent = make_agent(mosquitto, bc_mlp_bundle, tmp_path)
    published_without_a_monitor(agent, rows)
    t0 = time.monotonic()
    left = agent.stop(drain_timeout=10.0)
    took = time.monotonic() - t0
    assert left == 17
    assert agent.delivery.resent == 0
    assert WindowDelivery.CONFIRM_GRACE <= took < WindowDelivery.CONFIRM_GRACE + 3.0, took


def test_the_drain_waits_for_a_short_runs_backlog(mosquitto, bc_mlp_bundle, rows, tmp_path):
    """A run of one inference with the spool of an earlier run that had no monitor: the stop ends once the
    monitor confirmed the whole spool, not at the broker's PUBACKs."""
    from telemetry.monitor import FleetMonitor

    first = make_agent(mosquitto, bc_mlp_bundle, tmp_path)
    published_without_a_monitor(first, rows)
    assert first.stop(drain_timeout=0.5) == 17
    db = tmp_path / "m.db"
    monitor = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{db}", fleet="drain").start()
    try:
        assert monitor.connected.wait(30)         # connected and subscribed
        again = make_agent(mosquitto, bc_mlp_bundle, tmp_path)
        again.start()
        again.run(rows[:1])
        left = again.stop(drain_timeout=10.0)
        assert left == 0, f"{left} of 18 windows still spooled after the drain"
        assert eventually(lambda: stored(db) == list(range(18)), 10), stored(db)
    finally:
        monitor.stop()


class FakeLink:
    """A link that is connected and numbers its publishes (what WindowDelivery needs of MqttLink)."""

    def __init__(self):
        self.connected = threading.Event()
        self.connected.set()
        self.sent: list[int] = []        # seq of every publish, in order

    def publish(self, topic, payload, qos=1):
        self.sent.append(json.loads(payload)["seq"])
        return len(self.sent)


def delivery_with_acknowledged_windows(tmp_path, n: int) -> tuple[WindowDelivery, FakeLink]:
    spool, link = WindowSpool(tmp_path / "spool.sqlite"), FakeLink()
    for _ in range(n):
        spool.append({"kind": "test"})
    delivery = WindowDelivery(spool, link, "t/telemetry", max_inflight=4)
    while len(link.sent) < n or delivery.inflight:
        delivery.step()
        for mid in range(1, len(link.sent) + 1):
            delivery.pubacks.put((mid, True))
    delivery.step()
    return delivery, link


def test_the_drain_resends_what_a_monitor_missed_at_its_first_confirmation(tmp_path):
    """Ten windows acknowledged by the broker, none confirmed; at the stop a new window is confirmed: the ten,
    sent before it, go out again at once (four in flight at a time), not after resend_after (30 s)."""
    delivery, link = delivery_with_acknowledged_windows(tmp_path, 10)
    delivery.drain()
    assert delivery.settled(now=time.monotonic()) is False     # a first confirmation may still come
    delivery.spool.append({"kind": "test"})                     # the window the stop closed
    delivery.step()
    assert link.sent[-1] == 10
    delivery.confirmations.put([(10, 10)])
    for _ in range(10):
        delivery.step()
        for mid in range(1, len(link.sent) + 1):
            delivery.pubacks.put((mid, True))
    assert sorted(link.sent[11:]) == list(range(10))          # each resent once
    assert delivery.resent == 10 and not delivery.settled()      # a monitor is in sight: wait for the ten
    delivery.confirmations.put([(0, 9)])
    delivery.step()
    assert delivery.settled()
    delivery.spool.close()


def test_without_a_confirmation_the_drain_resends_nothing_and_settles_after_the_grace(tmp_path):
    delivery, link = delivery_with_acknowledged_windows(tmp_path, 10)
    delivery.drain()
    for _ in range(5):
        delivery.step()
    assert link.sent == list(range(10))
    last_ack = delivery._last_puback
    assert not delivery.settled(now=last_ack + WindowDelivery.CONFIRM_GRACE / 2)
    assert delivery.settled(now=last_ack + WindowDelivery.CONFIRM_GRACE)
    delivery.spool.close()
