"""`edgeops serve`: predictions over HTTP, and bad requests get a JSON 4xx, never a traceback."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

import edge_runtime
from edge_runtime.serve import make_server


@pytest.fixture
def server(bc_mlp_bundle):
    srv = make_server(edge_runtime.load(bc_mlp_bundle), port=0)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def call(url, body=None, method=None, ctype="application/json"):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, (json.loads(raw) if resp.headers.get("Content-Type", "").startswith("application/json") else raw.decode())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_predict_one_sample_and_a_batch(server, reference_data):
    X = reference_data["breast_cancer"].X_test
    status, body = call(server + "/predict", {"inputs": X[0].tolist()})
    assert status == 200 and len(body["outputs"]) == 2 and body["labels"] in ("malignant", "benign")
    status, body = call(server + "/predict", {"inputs": X[:5].tolist()})
    assert status == 200 and np.asarray(body["outputs"]).shape == (5, 2) and len(body["labels"]) == 5


def test_health_model_and_metrics(server):
    assert call(server + "/healthz") == (200, {"status": "ok", "model": "model.int8.tflite"})
    status, model = call(server + "/model")
    assert status == 200 and model["name"] == "breast-cancer-mlp" and model["task"] == "classification"
    call(server + "/predict", {"inputs": [[0.0] * 30] * 3})
    call(server + "/predict", b"{oops")
    status, text = call(server + "/metrics")
    assert status == 200
    assert "edgeops_inferences_total 3" in text
    assert 'edgeops_errors_total{kind="bad_request"} 1' in text
    assert 'edgeops_predict_latency_ms_bucket{le="+Inf"} 1' in text


@pytest.mark.parametrize("body,ctype,status,kind,fragment", [
    (b"{oops", "application/json", 400, "bad_request", "malformed JSON"),
    ({"x": [1, 2]}, "application/json", 400, "bad_request", "'inputs'"),
    ({"inputs": [1.0] * 29}, "application/json", 422, "invalid_input", "expected 30 features"),
    ({"inputs": ["a"] * 30}, "application/json", 422, "invalid_input", "expected numbers"),
    ({"inputs": [None] * 30}, "application/json", 422, "invalid_input", "input"),
    (b"\x89PNG...", "image/png", 400, "bad_request", "does not take images"),
    (b"", "application/json", 400, "bad_request", "empty body"),
])
def test_bad_requests_get_a_json_4xx(server, body, ctype, status, kind, fragment):
    got_status, got = call(server + "/predict", body, method="POST", ctype=ctype)
    assert got_status == status and got["error"] == kind and fragment in got["detail"]


def test_unknown_paths_and_methods(server):
    assert call(server + "/nope")[0] == 404
    assert call(server + "/predict")[0] == 405


def test_an_image_upload_is_preprocessed_from_the_manifest(digits_cnn_bundle, reference_data):
    from io import BytesIO

    from PIL import Image

    srv = make_server(edge_runtime.load(digits_cnn_bundle), port=0)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        data = reference_data["digits"]
        pixels = (data.X_test[0].reshape(8, 8) / 16.0 * 255).round().astype(np.uint8)
        buf = BytesIO()
        Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(buf, format="PNG")
        status, body = call(f"http://127.0.0.1:{srv.server_address[1]}/predict", buf.getvalue(), ctype="image/png")
        assert status == 200 and body["labels"] == data.labels[int(data.y_test[0])]
    finally:
        srv.shutdown()
        srv.server_close()


def test_serving_with_a_broker_reports_telemetry(mosquitto, bc_rf_bundle, tmp_path, reference_data):
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.mqtt import parse_broker_url
    from mqtt_collector import Collector

    model = edge_runtime.load(bc_rf_bundle)
    sub = Collector(mosquitto.port)
    agent = DeviceAgent(model, "srv-1", "lab", parse_broker_url(mosquitto.url), state_dir=tmp_path / "s",
                        window_seconds=None, window_size=10).start()
    srv = make_server(model, port=0, agent=agent)
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{srv.server_address[1]}/predict"
        X = reference_data["breast_cancer"].X_test
        for i in range(4):
            assert call(url, {"inputs": X[i * 5:(i + 1) * 5].tolist()})[0] == 200
        assert sub.wait_for(lambda: len(sub.telemetry("srv-1")) == 2)
        assert [w["count"] for w in sorted(sub.telemetry("srv-1"), key=lambda w: w["seq"])] == [10, 10]
    finally:
        srv.shutdown()
        srv.server_close()
        agent.stop()
        sub.close()
