"""Fuzzing the monitor's front door: the validator returns a message or a named rejection for any bytes,
and a monitor fed thousands of hostile messages beside a real agent stores every one of the agent's windows."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from edge_runtime import wire
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry import store
from telemetry.monitor import FleetMonitor
from telemetry.synthetic import hostile_messages, make_window, reference_manifest

MANIFEST = reference_manifest(np.random.default_rng(0).random((200, 4)), np.arange(200) % 2, "fuzz-model")
WINDOW = make_window(np.random.default_rng(1).random((50, 4)), MANIFEST, "dev-f", 3, start=time.time() - 60,
                     predictions=np.arange(50) % 2)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)


def _outcome(topic: str, payload: bytes) -> str:
    try:
        return wire.parse(topic, payload).kind
    except wire.Rejected as rej:
        assert rej.reason in wire.REASONS
        return rej.reason


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(WINDOW)), value=json_values, kind=st.sampled_from(wire.DEVICE_KINDS))
def test_any_value_in_any_field_is_parsed_or_rejected_by_name(field, value, kind):
    doc = {**WINDOW, field: value}
    payload = json.dumps(doc, allow_nan=True).encode("utf-8", "surrogatepass")
    _outcome(f"edgeops/f1/dev-f/{kind}", payload)


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=2048), kind=st.sampled_from(wire.DEVICE_KINDS))
def test_any_bytes_are_parsed_or_rejected_by_name(payload, kind):
    _outcome(f"edgeops/f1/dev-f/{kind}", payload)


def test_a_canonical_message_keeps_only_bounded_known_fields():
    doc = {**WINDOW, "extra": [[[[1]]]], "model": {**WINDOW["model"], "junk": {"deep": [1]}}}
    out = wire.parse("edgeops/f1/dev-f/telemetry", json.dumps(doc).encode()).doc
    assert "extra" not in out and "junk" not in out["model"]
    assert out["features"]["hist"] == WINDOW["features"]["hist"]


@pytest.mark.slow
def test_a_flood_of_hostile_messages_beside_a_real_agent_loses_none_of_its_windows(mosquitto, bc_mlp_bundle,
                                                                                   reference_data, tmp_path):
    inputs = tmp_path / "bc.npy"
    np.save(inputs, reference_data["breast_cancer"].X_test)
    monitor = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/m.db", fleet="lab").start()
    state = tmp_path / "agent"
    agent = subprocess.Popen(
        [str(a) for a in (sys.executable, "-m", "edgeops", "run", bc_mlp_bundle, "--device-id", "dev-1", "--fleet",
                          "lab", "--broker", mosquitto.url, "--input", inputs, "--state-dir", state, "--loop", "--rate",
                          300, "--window-size", 20, "--duration", 15)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="fuzzer", protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    try:
        assert monitor.connected.wait(10)
        sent = 0
        # on the real agent's own topics too; the payloads claim another device, so the monitor does not
        # confirm their sequence numbers to dev-1 (a device only publishes on its own topics: see the ACL)
        for i, (kind, payload) in enumerate(hostile_messages({**WINDOW, "fleet": "lab"}, 3000, seed=7)):
            device = ("dev-1", "dev-evil", "dev-2")[i % 3]
            pub.publish(f"edgeops/lab/{device}/{kind}", payload, qos=1).wait_for_publish(10)
            sent += 1
        _, err = agent.communicate(timeout=120)
        assert agent.returncode == 0, err.decode()[-2000:]
        with sqlite3.connect(state / "spool.sqlite") as conn:
            n = conn.execute("select value from meta where key = 'next_seq'").fetchone()[0]

        def agent_seqs():
            with monitor.engine.connect() as conn:
                return sorted(r.seq for r in conn.execute(
                    select(store.windows.c.seq).where(store.windows.c.device_id == "dev-1",
                                                      store.windows.c.fleet == "lab")))

        assert eventually(lambda: set(range(n)) <= set(agent_seqs()), 60), f"{n} windows sent"
        assert eventually(lambda: monitor.stats.received >= sent, 60)
        assert sum(monitor.stats.quarantined.values()) > 2000
        assert monitor._threads[0].is_alive()
    finally:
        agent.kill()
        pub.loop_stop()
        pub.disconnect()
        monitor.stop()


def test_the_json_schema_agrees_with_the_wire_module():
    import jsonschema

    schema = json.loads(open("edge_runtime/schemas/telemetry.schema.json").read())
    defs = schema["$defs"]
    assert defs["id"]["pattern"] == wire.ID.pattern
    for name in ("telemetry", "status", "ack"):
        assert defs[name]["properties"]["schema_version"]["const"] == wire.SCHEMA_VERSION
    assert defs["model"]["properties"]["name"]["maxLength"] == wire.MAX_NAME
    # what the wire module builds and what it accepts (canonical) are valid under the schema
    status = wire.status_message("f1", "dev-f", True, model=dict(WINDOW["model"]))
    bench = {"schema_version": 1, "type": "bench", "results": [{"bundle": "b", "bundle_version": "1.0.0",
                                                                "artifact": "m.tflite", "latency_ms": {"p95": 1.5}}]}
    for topic, doc in (("edgeops/f1/dev-f/telemetry", WINDOW), ("edgeops/f1/dev-f/status", status),
                       ("edgeops/f1/dev-f/bench", bench)):
        jsonschema.validate(doc, schema)
        jsonschema.validate(wire.parse(topic, wire.encode(doc)).doc, schema)
    jsonschema.validate(wire.ack_message([3, 4, 5, 9], {9: "clock_skew"}), schema)
    assert wire.parse_ack(wire.encode(wire.ack_message([3, 4, 5, 9]))) == [(3, 5), (9, 9)]
