"""Late ground truth on the device: labels joined to predictions by input id (a file's label column, the device's
MQTT labels topic, POST /feedback on serve), carried per window as a confusion matrix the wire format bounds."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import threading
import time

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edge_runtime
from edge_runtime import wire
from edge_runtime.labels import LabelJoiner
from helpers import eventually
from helpers.mqtt_collector import Collector
from helpers.serve_helpers import call, served
from telemetry.synthetic import make_window, reference_manifest

SCHEMA = json.loads(open("edge_runtime/schemas/telemetry.schema.json").read())


def _confusion(windows: list[dict], k: int) -> np.ndarray:
    total = np.zeros((k, k), dtype=int)
    for w in windows:
        if "labels" in w:
            total += np.asarray(w["labels"]["confusion"])
    return total


def _expected_confusion(model, X, y_idx) -> np.ndarray:
    out = np.asarray(model.predict(X))
    pred = out.argmax(axis=1) if out.shape[1] > 1 else (out[:, 0] > 0.5).astype(int)
    k = max(2, out.shape[1])
    m = np.zeros((k, k), dtype=int)
    for t, p in zip(y_idx, pred, strict=True):
        m[t, p] += 1
    return m


def test_the_agent_joins_labels_from_a_csv_label_column(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    data = reference_data["breast_cancer"]
    model = edge_runtime.load(bc_mlp_bundle)
    names = model.labels
    X = data.X_test[:120].astype(np.float32)
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, len(X))              # labels the test chooses: the join must report exactly these
    path = tmp_path / "labelled.csv"
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(X.shape[1])] + ["diagnosis"])
        for row, t in zip(X, truth, strict=True):
            w.writerow([repr(float(v)) for v in row] + [names[t]])
    sub = Collector(mosquitto.port)
    try:
        res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "dev-c",
                              "--fleet", "lab", "--broker", mosquitto.url, "--input", str(path), "--label-column",
                              "diagnosis", "--window-size", "40", "--state-dir", str(tmp_path / "s"),
                              "--confirm", "broker"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert sub.wait_for(lambda: len(sub.telemetry("dev-c")) == 3)
        windows = sub.telemetry("dev-c")
        # labels joined since the previous window was spooled (a fast replay may close several windows at once)
        assert sum(w.get("labels", {}).get("n", 0) for w in windows) == 120
        for w in windows:
            assert w.get("labels", {}).get("unmatched", 0) == 0
            jsonschema.validate(w, SCHEMA)
            assert wire.parse("edgeops/lab/dev-c/telemetry", wire.encode(w)).doc.get("labels") == w.get("labels")
        got = _confusion(windows, 2)
        want = _expected_confusion(model, X, truth)
        assert got.tolist() == want.tolist()
        assert got.sum() == 120
    finally:
        sub.close()


def test_an_unknown_label_column_is_a_clear_input_error(bc_mlp_bundle, tmp_path, mosquitto):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "dev-x",
                          "--broker", mosquitto.url, "--input", str(path), "--label-column", "truth",
                          "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 3, res.stderr[-1000:]
    assert "no column 'truth'" in res.stderr


class _Publisher:
    def __init__(self, port: int):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="labels-test-pub",
                                  protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes | str) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_late_labels_on_the_mqtt_labels_topic_join_and_hostile_ones_are_counted(mosquitto, bc_mlp_bundle,
                                                                               reference_data, tmp_path):
    from edge_runtime.agent import DeviceAgent, samples_from
    from edge_runtime.mqtt import parse_broker_url

    broker = parse_broker_url(mosquitto.url)
    model = edge_runtime.load(bc_mlp_bundle)
    X = reference_data["breast_cancer"].X_test[:60].astype(np.float32)
    out = np.asarray(model.predict(X))
    pred = out.argmax(axis=1)
    sub = Collector(mosquitto.port, topic="edgeops/lab/dev-m/telemetry")    # not the hostile labels
    pub = _Publisher(mosquitto.port)
    agent = DeviceAgent(model, "dev-m", "lab", broker, state_dir=tmp_path / "s", window_seconds=0.5,
                        confirm="broker").start()
    source = samples_from("mqtt:sensors/dev-m", model, broker=broker, client_id="dev-m-input")
    runner = threading.Thread(target=agent.run, args=(source,), daemon=True)
    runner.start()
    labels_topic = "edgeops/lab/dev-m/labels"
    try:
        assert source.subscribed.wait(10) and agent.link.connected.wait(10)
        for i, row in enumerate(X):
            pub.send("sensors/dev-m", json.dumps({"id": f"s-{i}", "x": row.tolist()}))
        assert eventually(lambda: agent.inferences == len(X), 30), agent.inferences
        # the agent subscribes to its labels topic when it connects: a probe for an id it never saw tells when
        assert eventually(lambda: (pub.send(labels_topic, b'{"labels": [{"id": "probe", "label": 0}]}'),
                                   agent.labels.unmatched_total)[1] >= 1, 20)
        hostile = [b'{"labels": [', "{\"labels\": []}".encode("utf-16"), b"{" + b" " * (300 * 1024) + b"}",
                   b'{"labels": [{"id": true, "label": 1}]}', b'{"labels": {"id": 1}}', b"[1, 2]",
                   b'{"labels": [{"id": "a\\u0000b", "label": 1}]}', b"[" * 100_000]
        for payload in hostile:
            pub.send(labels_topic, payload)
        # in order after the probes: once the hostile ones are counted, every probe has been taken
        assert eventually(lambda: sum(agent.labels_refused.values()) == len(hostile), 20), agent.labels_refused
        unmatched = agent.labels.unmatched_total
        # labels for the first 40 inputs: 30 true, 10 the other class, by class name; two unknown ids and one
        # label that names no class of the model
        truth = pred.copy()
        truth[:10] = 1 - truth[:10]
        labels = [{"id": "s-999", "label": 0}, {"id": "nope", "label": 1}]
        labels += [{"id": f"s-{i}", "label": model.labels[int(truth[i])]} for i in range(40)]
        labels += [{"id": "s-45", "label": "goat"}]
        pub.send(labels_topic, json.dumps({"labels": labels}))
        assert eventually(lambda: agent.labels.invalid_total == len(hostile) + 1, 20), agent.labels.invalid_total
        assert agent.labels.joined_total == 40 and agent.labels.unmatched_total == unmatched + 2
        # the agent goes on: later inputs are predicted and their labels join too
        pub.send("sensors/dev-m", json.dumps({"id": "late", "x": X[0].tolist()}))
        assert eventually(lambda: agent.inferences == len(X) + 1, 20)
        pub.send(labels_topic, json.dumps({"labels": [{"id": "late", "label": int(pred[0])}]}))
        assert eventually(lambda: agent.labels.joined_total == 41, 20)
        assert sum(agent.labels_refused.values()) == len(hostile)
        assert agent.labels_refused["malformed_json"] >= 2 and agent.labels_refused["oversized"] == 1
        assert agent.labels_refused["too_deep"] == 1 and agent.labels_refused["bad_value"] >= 2
    finally:
        source.close()
        runner.join(20)
        agent.stop()
        pub.close()
    try:
        assert sub.wait_for(lambda: sum(w.get("labels", {}).get("n", 0) for w in sub.telemetry("dev-m")) == 41)
        windows = sub.telemetry("dev-m")
        got = _confusion(windows, 2)
        want = np.zeros((2, 2), dtype=int)
        for i in range(40):
            want[truth[i], pred[i]] += 1
        want[pred[0], pred[0]] += 1
        assert got.tolist() == want.tolist()
        assert sum(w.get("labels", {}).get("unmatched", 0) for w in windows) == agent.labels.unmatched_total
        # the hostile messages and the label naming no class are counted as rejected
        assert sum(w.get("labels", {}).get("rejected", 0) for w in windows) == len(hostile) + 1
        for w in windows:
            jsonschema.validate(w, SCHEMA)
            wire.parse("edgeops/lab/dev-m/telemetry", wire.encode(w))
    finally:
        sub.close()


def test_feedback_on_serve_joins_labels_by_the_id_predict_answered(bc_mlp_bundle, reference_data):
    model = edge_runtime.load(bc_mlp_bundle)
    X = reference_data["breast_cancer"].X_test[:6]
    with served(model) as url:
        status, one = call(url + "/predict", {"inputs": X[0].tolist()})
        assert status == 200 and isinstance(one["id"], str)
        status, batch = call(url + "/predict", {"inputs": X[1:6].tolist()})
        assert status == 200 and len(batch["ids"]) == 5 and len(set(batch["ids"])) == 5
        wrong = "benign" if one["labels"] == "malignant" else "malignant"
        body = {"labels": [{"id": one["id"], "label": wrong}] +
                          [{"id": i, "label": lab} for i, lab in zip(batch["ids"], batch["labels"], strict=True)] +
                          [{"id": "never-predicted", "label": 0}, {"id": batch["ids"][0], "label": 1}]}
        status, answer = call(url + "/feedback", body)
        assert status == 200, answer
        assert answer == {"joined": 6, "unmatched": 2, "invalid": 0}
        # hostile bodies: each refused with its status, the server goes on
        assert call(url + "/feedback", b'{"labels": [')[0] == 400
        assert call(url + "/feedback", b"{" + b" " * (300 * 1024) + b"}")[0] == 413
        assert call(url + "/feedback", "{\"labels\": []}".encode("utf-16"))[0] == 400
        assert call(url + "/feedback", b'{"labels": [{"id": 1.5, "label": 0}]}')[0] == 422
        assert call(url + "/feedback", b'{"labels": []}', ctype="text/plain")[0] == 415
        assert call(url + "/feedback", b'{"labels": []}', headers={"Content-Encoding": "gzip"})[0] == 415
        status, answer = call(url + "/feedback", {"labels": [{"id": batch["ids"][1], "label": "goat"}]})
        assert status == 200 and answer == {"joined": 0, "unmatched": 0, "invalid": 1}
        assert call(url + "/predict", {"inputs": X[0].tolist()})[0] == 200


def test_serve_with_an_agent_reports_feedback_in_its_windows(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.mqtt import parse_broker_url

    model = edge_runtime.load(bc_mlp_bundle)
    sub = Collector(mosquitto.port)
    agent = DeviceAgent(model, "srv-l", "lab", parse_broker_url(mosquitto.url), state_dir=tmp_path / "s",
                        window_seconds=0.5, confirm="broker").start()
    try:
        with served(model, agent=agent) as url:
            status, batch = call(url + "/predict", {"inputs": reference_data["breast_cancer"].X_test[:8].tolist()})
            assert status == 200
            body = {"labels": [{"id": i, "label": lab} for i, lab in zip(batch["ids"], batch["labels"], strict=True)]}
            assert call(url + "/feedback", body) == (200, {"joined": 8, "unmatched": 0, "invalid": 0})
            assert sub.wait_for(lambda: sum(w.get("labels", {}).get("n", 0) for w in sub.telemetry("srv-l")) == 8)
            assert np.trace(_confusion(sub.telemetry("srv-l"), 2)) == 8
    finally:
        agent.stop()
        sub.close()


# -- the wire format's bounds on the labels block ----------------------------------------------------------------

MANIFEST = reference_manifest(np.random.default_rng(0).random((200, 4)), np.arange(200) % 2, "labels-model")


def _window(labels) -> dict:
    w = make_window(np.random.default_rng(1).random((50, 4)), MANIFEST, "dev-w", 3, fleet="lab",
                    start=time.time() - 60, predictions=np.arange(50) % 2)
    if labels is not None:
        w["labels"] = labels
    return w


def test_a_labels_block_is_validated_and_canonical():
    good = _window({"n": 7, "confusion": [[3, 1], [0, 3]], "unmatched": 2, "rejected": 1, "extra": "dropped"})
    doc = wire.parse("edgeops/lab/dev-w/telemetry", wire.encode(good)).doc
    assert doc["labels"] == {"n": 7, "confusion": [[3, 1], [0, 3]], "unmatched": 2, "rejected": 1}
    jsonschema.validate(doc, SCHEMA)
    assert "labels" not in wire.parse("edgeops/lab/dev-w/telemetry", wire.encode(_window(None))).doc


@pytest.mark.parametrize("labels", [
    {"n": -1, "confusion": [[0, 0], [0, 0]]},
    {"n": 2, "confusion": [[1, 1], [0, -0.0]]},
    {"n": 2, "confusion": [[1.0, 1], [0, 0]]},
    {"n": 2, "confusion": [[True, 1], [0, 0]]},
    {"n": 2**63, "confusion": [[2**63, 0], [0, 0]]},
    {"n": 3, "confusion": [[1, 1], [0, 0]]},                              # does not sum to n
    {"n": 2, "confusion": [[1, 1, 0], [0, 0, 0], [0, 0, 0]]},              # 3 classes, the window has 2
    {"n": 2, "confusion": [[1, 1], [0]]},                                  # not square
    {"n": 2, "confusion": [[1, 1]]},
    {"n": 0, "confusion": []},
    {"n": 2, "confusion": {"0": [1, 1]}},
    {"n": 2, "confusion": [[1, 1], [0, 0]], "unmatched": -5},
    {"n": 2, "confusion": [[1, 1], [0, 0]], "rejected": "many"},
    {"n": 2, "confusion": "[[1, 1], [0, 0]]"},
    {"confusion": [[1, 1], [0, 0]]},
    [[1, 1], [0, 0]],
    {"n": 0, "confusion": [[0] * 70_000, [0] * 70_000]},
    {"n": 1, "confusion": [[1, 0], [0, float("nan")]]},
])
def test_hostile_labels_blocks_are_refused_by_name(labels):
    payload = json.dumps(_window(labels)).encode()
    with pytest.raises(wire.Rejected) as exc:
        wire.parse("edgeops/lab/dev-w/telemetry", payload)
    assert exc.value.reason in ("bad_value", "oversized")     # 2 x 70,000 counts is also over 256 KiB


def test_a_regression_window_cannot_carry_labels():
    w = _window({"n": 1, "confusion": [[1, 0], [0, 0]]})
    w["predictions"] = {"count": 50, "mean": 1.0, "m2": 2.0, "min": 0.0, "max": 2.0, "hist": [50]}
    with pytest.raises(wire.Rejected):
        wire.parse("edgeops/lab/dev-w/telemetry", wire.encode(w))


def test_the_label_joiner_is_bounded_and_forgets_old_predictions():
    now = [0.0]
    j = LabelJoiner(["a", "b", "c"], max_ids=100, max_age_s=60, clock=lambda: now[0])
    seen = []
    j.subscribe(seen.append)
    for i in range(250):
        j.predicted(i, i % 3)
    assert j.waiting == 100
    assert j.label(0, "a") is None                  # pushed out by newer ones
    assert j.label("249", 0).predicted == 0         # ids: integers and their decimal strings are one id
    now[0] = 61.0
    assert j.label(248, 2) is None                  # too old
    assert j.label(247, "zebra") is None and j.invalid_total == 1
    assert [s.id for s in seen] == ["249"]
    block = j.take_window()
    assert block == {"n": 1, "confusion": [[1, 0, 0], [0, 0, 0], [0, 0, 0]], "unmatched": 2, "rejected": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["n", "confusion", "unmatched",
                                                                                   "rejected", "x"]), inner,
                                                                  max_size=4),
    max_leaves=24)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_any_labels_block_is_parsed_or_refused_by_name(value):
    window = _window(None)
    window["labels"] = value
    payload = json.dumps(window, allow_nan=True).encode()
    try:
        doc = wire.parse("edgeops/lab/dev-w/telemetry", payload).doc
    except wire.Rejected as rej:
        assert rej.reason in wire.REASONS
        return
    labels = doc["labels"]
    assert labels["n"] == sum(map(sum, labels["confusion"])) and len(labels["confusion"]) == 2
    jsonschema.validate(doc, SCHEMA)


@settings(max_examples=300, deadline=None)
@given(value=json_values)
def test_any_labels_message_is_parsed_or_refused_by_name(value):
    try:
        pairs = wire.parse_labels(json.dumps({"labels": value}, allow_nan=True).encode())
    except wire.Rejected as rej:
        assert rej.reason in wire.REASONS
        return
    assert all(type(v) in (str, int) for pair in pairs for v in pair)


def test_labels_joined_after_the_last_window_go_out_at_stop(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.inputs import Sample
    from edge_runtime.mqtt import parse_broker_url

    model = edge_runtime.load(bc_mlp_bundle)
    X = reference_data["breast_cancer"].X_test[:5].astype(np.float32)
    sub = Collector(mosquitto.port, topic="edgeops/lab/dev-s/telemetry")
    agent = DeviceAgent(model, "dev-s", "lab", parse_broker_url(mosquitto.url), state_dir=tmp_path / "s",
                        window_seconds=None, window_size=5, confirm="broker").start()
    try:
        agent.run([Sample(f"r-{i}", x) for i, x in enumerate(X)])
        joined, missed = agent.take_labels(wire.encode(wire.labels_message([(f"r-{i}", 0) for i in range(5)])))
        assert (joined, missed) == (5, 0)
    finally:
        agent.stop()
    try:
        assert sub.wait_for(lambda: len(sub.telemetry("dev-s")) == 2)
        first, last = sorted(sub.telemetry("dev-s"), key=lambda w: w["seq"])
        assert first["count"] == 5 and "labels" not in first
        assert last["count"] == 0 and last["labels"]["n"] == 5 and sum(last["labels"]["confusion"][0]) == 5
        wire.parse("edgeops/lab/dev-s/telemetry", wire.encode(last))
    finally:
        sub.close()
