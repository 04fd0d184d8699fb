"""A device acts on what its model says: the agent's predictions go to stdout, a file, MQTT, a webhook, a callback."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

import edge_runtime
from edge_runtime import wire
from edge_runtime.agent import DeviceAgent
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.outputs import HttpSink
from edge_runtime.wire import parse
from helpers import eventually
from helpers.mqtt_collector import Collector


def make_agent(broker, bundle, tmp_path, device="out-1", **kw) -> DeviceAgent:
    return DeviceAgent(edge_runtime.load(bundle), device, "outs", parse_broker_url(broker.url),
                       state_dir=tmp_path / device, window_size=100, confirm="broker", **kw)


def run_agent(agent: DeviceAgent, X, connected: bool = False) -> None:
    """Start the agent, run it on X, stop it; ``connected``: first wait for its MQTT link (an mqtt output
    drops what it cannot publish while the link is down, and counts it as failed)."""
    agent.start()
    try:
        if connected:
            assert agent.link.connected.wait(20), "the agent did not connect to the broker"
        agent.run(X)
    finally:
        agent.stop()


class Webhook:
    """A real local HTTP server that answers 503 to its first ``failures`` requests, then 200."""

    def __init__(self, failures: int = 0):
        self.failures, self.requests, self.bodies = failures, 0, []
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.requests += 1
                ok = hook.requests > hook.failures
                if ok:
                    hook.bodies.append(json.loads(body))
                self.send_response(200 if ok else 503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def predictions(self) -> list[dict]:
        return [p for b in self.bodies for p in b["predictions"]]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_stdout_prints_one_json_line_per_input_with_the_models_prediction(session_mosquitto, bc_mlp_bundle,
                                                                          reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:40].astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "out-cli",
                          "--fleet", "outs", "--broker", session_mosquitto.url, "--input", str(tmp_path / "x.npy"),
                          "--no-flash", "--confirm", "broker", "--state-dir", str(tmp_path / "state"),
                          "--output", "stdout"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    model = edge_runtime.load(bc_mlp_bundle)
    want = model.predict_proba(X)
    assert [p["id"] for p in lines] == list(range(40))
    assert [p["label"] for p in lines] == list(model.predict_labels(X))
    np.testing.assert_allclose([p["probabilities"] for p in lines], want, atol=1e-5)
    assert {(p["model"]["name"], p["model"]["version"], p["model"]["variant"]) for p in lines} == \
        {(model.manifest["name"], model.manifest["version"], None)}
    assert all(p["latency_ms"] > 0 and p["ts"] > 1e9 for p in lines)


def test_a_jsonl_file_rotates_when_it_reaches_its_size(session_mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:120].astype(np.float32)
    out = tmp_path / "predictions.jsonl"
    agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, outputs=[f"jsonl:{out}?max_mb=0.004&backups=2"])
    run_agent(agent, X)
    files = [out, out.with_name("predictions.jsonl.1"), out.with_name("predictions.jsonl.2")]
    assert all(f.is_file() and f.stat().st_size <= 4000 for f in files)
    assert not out.with_name("predictions.jsonl.3").exists()            # two backups kept, older ones gone
    ids = [json.loads(line)["id"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert ids == list(range(120 - len(ids), 120))                      # the newest, in order, none torn
    assert agent.output_counts[f"jsonl:{out}"] == {"delivered": 120, "dropped": 0, "failed": 0}


def test_the_mqtt_output_publishes_predictions_in_batches(session_mosquitto, bc_mlp_bundle, reference_data,
                                                          tmp_path):
    X = reference_data["breast_cancer"].X_test[:100].astype(np.float32)
    col = Collector(session_mosquitto.port, topic="edgeops/outs/out-mqtt/predictions", client_id="pred-watch")
    try:
        agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device="out-mqtt",
                           outputs=["mqtt?qos=1&batch=25&seconds=10"])
        run_agent(agent, X, connected=True)
        assert col.wait_for(lambda: sum(len(m["predictions"]) for _, m in col.messages) >= 100, 20)
    finally:
        col.close()
    topics = {t for t, _ in col.messages}
    assert topics == {wire.topic("edgeops", "outs", "out-mqtt", wire.PREDICTIONS)}
    batches = [m for _, m in col.messages]
    assert [len(m["predictions"]) for m in batches] == [25, 25, 25, 25]
    assert all(m["type"] == "predictions" and m["device_id"] == "out-mqtt" and m["fleet"] == "outs" for m in batches)
    assert [p["id"] for m in batches for p in m["predictions"]] == list(range(100))
    labels = edge_runtime.load(bc_mlp_bundle).predict_labels(X)
    assert [p["label"] for m in batches for p in m["predictions"]] == list(labels)


def test_the_webhook_retries_until_the_server_takes_the_predictions(session_mosquitto, bc_mlp_bundle, reference_data,
                                                                    tmp_path):
    hook = Webhook(failures=2)
    try:
        agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, outputs=[f"http:{hook.url}"])
        run_agent(agent, reference_data["breast_cancer"].X_test[:30].astype(np.float32))
        assert eventually(lambda: len(hook.predictions()) == 30, 10)
    finally:
        hook.close()
    assert sorted(p["id"] for p in hook.predictions()) == list(range(30))   # each once, after two 503s
    assert hook.requests >= 3
    (counts,) = agent.output_counts.values()
    assert counts == {"delivered": 30, "dropped": 0, "failed": 0}


@pytest.mark.slow   # the agent's stop gives the hung webhook its 5 s to deliver
def test_a_webhook_that_never_answers_does_not_hold_inference_back(session_mosquitto, bc_mlp_bundle, reference_data,
                                                                   tmp_path):
    # a listening socket nobody accepts from: connections open, requests hang until the sink's timeout
    black_hole = socket.socket()
    black_hole.bind(("127.0.0.1", 0))
    black_hole.listen(1)
    X = np.tile(reference_data["breast_cancer"].X_test.astype(np.float32), (5, 1))[:500]
    sink = HttpSink(f"http://127.0.0.1:{black_hole.getsockname()[1]}/hook", lambda records: b"[]", timeout=3.0,
                    retries=0, max_queue=20, batch_size=10)
    agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device="out-hole", outputs=[sink])
    col = Collector(session_mosquitto.port, topic="edgeops/outs/out-hole/telemetry", client_id="hole-watch")
    try:
        agent.start()
        t0 = time.monotonic()
        agent.run(X)
        took = time.monotonic() - t0
        agent.stop()
        assert col.wait_for(lambda: sum(w["count"] for w in col.telemetry()) == 500, 20)
    finally:
        col.close()
        black_hole.close()
    assert agent.inferences == 500
    assert took < 3.0        # inference never waited for the hung request (one takes 3 s to time out)
    c = sink.counts
    assert c.delivered == 0 and c.dropped >= 500 - 20 - 10 and c.dropped + c.failed == 500
    windows = [parse("edgeops/outs/out-hole/telemetry", json.dumps(w).encode()).doc for w in col.telemetry()]
    # the monitor sees the losses (those at stop, after the last window closed, only the agent's log line tells)
    assert 500 - 20 - 10 <= sum(w["outputs"]["dropped"] + w["outputs"]["failed"] for w in windows) <= 500


@pytest.mark.parametrize("variants", ["primary", "all"])
def test_the_callback_gets_every_prediction_the_device_acts_on(session_mosquitto, bc_mlp_bundle, bc_rf_bundle,
                                                               reference_data, tmp_path, variants):
    X = reference_data["breast_cancer"].X_test[:60].astype(np.float32)
    got = []
    agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device=f"cb-{variants}",
                       second=edge_runtime.load(bc_rf_bundle), mode="shadow", on_prediction=got.append,
                       output_variants=variants)
    run_agent(agent, X)
    primary = [p for p in got if p.model["variant"] == "A"]
    assert [p.id for p in primary] == list(range(60))
    np.testing.assert_allclose(np.stack([p.output for p in primary]), edge_runtime.load(bc_mlp_bundle).predict(X),
                               atol=1e-6)
    shadow = [p for p in got if p.model["variant"] == "shadow"]
    assert len(shadow) == (60 if variants == "all" else 0)
    assert {p.model["name"] for p in shadow} <= {"breast-cancer-rf"}


def test_ab_sends_one_prediction_per_input_labelled_with_the_variant_that_served_it(
        session_mosquitto, bc_mlp_bundle, bc_rf_bundle, reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:80].astype(np.float32)
    got = []
    agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device="cb-ab",
                       second=edge_runtime.load(bc_rf_bundle), mode="ab", split=0.5, seed=3, on_prediction=got.append)
    run_agent(agent, X)
    assert [p.id for p in got] == list(range(80))
    assert {p.model["variant"] for p in got} == {"A", "B"}


def test_a_callback_that_raises_is_counted_and_inference_goes_on(session_mosquitto, bc_mlp_bundle, reference_data,
                                                                 tmp_path):
    def flaky(p):
        if p.id % 10 == 0:
            raise RuntimeError("the actuator is unplugged")

    agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device="cb-raise", on_prediction=flaky)
    run_agent(agent, reference_data["breast_cancer"].X_test[:50].astype(np.float32))
    assert agent.inferences == 50
    assert agent.output_counts["flaky"] == {"delivered": 45, "dropped": 0, "failed": 5}


def test_the_mqtt_output_keeps_to_its_rate_limit(session_mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    col = Collector(session_mosquitto.port, topic="edgeops/outs/out-rate/predictions", client_id="rate-watch")
    try:
        agent = make_agent(session_mosquitto, bc_mlp_bundle, tmp_path, device="out-rate",
                           outputs=["mqtt?qos=1&batch=5&seconds=0&rate=20"])
        run_agent(agent, reference_data["breast_cancer"].X_test[:40].astype(np.float32), connected=True)
        assert col.wait_for(lambda: sum(len(m["predictions"]) for _, m in col.messages) >= 40, 20), \
            (agent.sinks[0].counts, [len(m["predictions"]) for _, m in col.messages])
    finally:
        col.close()
    stamps = [m["ts"] for _, m in col.messages]
    assert len(stamps) == 8                                   # 40 predictions in batches of 5
    assert all(b - a >= 0.045 for a, b in zip(stamps, stamps[1:], strict=False))   # 20 a second at most
