"""A device id with a '.' on a NATS server's MQTT port: the server closes the connection at the first publish
(nats-server 2.9 refuses such topics), and the link says so once instead of reconnecting in silence."""

from __future__ import annotations

import logging
import os

import pytest

from helpers import eventually


@pytest.fixture
def nats_node(tmp_path):
    from devtools.nats_cluster import NatsCluster, find_nats

    if find_nats() is None:
        assert not os.environ.get("CI"), "nats-server is not installed (.ci/run installs it)"
        pytest.skip("nats-server is not installed")
    cluster = NatsCluster(tmp_path / "nats").start()
    yield cluster
    cluster.stop()


def test_a_dotted_topic_closing_the_connection_is_explained_once(nats_node, caplog):
    from edge_runtime.mqtt import MqttLink, parse_broker_url

    caplog.set_level(logging.INFO, logger="edgeops")
    link = MqttLink(parse_broker_url(nats_node.url(0)), "pi.kitchen", min_backoff=0.5, max_backoff=1.0)
    link.start()
    try:
        assert link.wait_connected(15)
        assert link.publish("edgeops/f1/pi.kitchen/telemetry", b"{}") is not None
        explained = lambda: [r for r in caplog.records if "refuses MQTT topics with a '.'" in r.getMessage()]  # noqa: E731
        assert eventually(lambda: explained(), 15), [r.getMessage() for r in caplog.records]
        # the session resends the publish at each reconnect and the server closes each one: still one message
        assert eventually(lambda: sum("lost broker" in r.getMessage() for r in caplog.records) >= 2, 15)
        assert len(explained()) == 1 and "pi.kitchen" in explained()[0].getMessage()
    finally:
        link.stop(timeout=3)


def test_a_plain_topic_on_the_same_server_is_delivered(nats_node, caplog):
    from edge_runtime.mqtt import MqttLink, parse_broker_url

    acked = []
    link = MqttLink(parse_broker_url(nats_node.url(0)), "pi-kitchen", on_ack=lambda mid, ok: acked.append(ok))
    link.start()
    try:
        assert link.wait_connected(15)
        assert link.publish("edgeops/f1/pi-kitchen/telemetry", b"{}") is not None
        assert eventually(lambda: acked == [True], 15)
        assert not any("refuses MQTT topics" in r.getMessage() for r in caplog.records)
    finally:
        link.stop(timeout=3)
