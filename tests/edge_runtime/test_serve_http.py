"""`edgeops serve`: predictions over HTTP, and bad requests get a JSON 4xx, never a traceback."""

from __future__ import annotations

import base64
from io import BytesIO

import numpy as np
import pytest

from helpers.serve_helpers import call, served


@pytest.fixture
def server(bc_mlp_bundle):
    with served(bc_mlp_bundle) as url:
        yield url


def _digit_png(data, i: int) -> bytes:
    from PIL import Image

    pixels = (data.X_test[i].reshape(8, 8) / 16.0 * 255).round().astype(np.uint8)
    buf = BytesIO()
    Image.fromarray(pixels, mode="L").resize((32, 32), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def test_predict_one_sample_and_a_batch(server, reference_data):
    X = reference_data["breast_cancer"].X_test
    status, body = call(server + "/predict", {"inputs": X[0].tolist()})
    assert status == 200 and len(body["outputs"]) == 2 and body["labels"] in ("malignant", "benign")
    status, body = call(server + "/predict", {"inputs": X[:5].tolist()})
    assert status == 200 and np.asarray(body["outputs"]).shape == (5, 2) and len(body["labels"]) == 5
    assert body["model"] == {"name": "breast-cancer-mlp", "version": body["model"]["version"],
                             "artifact": "model.int8.tflite"}
    assert call(server + "/predict", X[:2].tolist())[0] == 200          # a bare list is the inputs


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
    assert "edgeops_requests_total 5" in text


def test_the_openapi_description_follows_the_model(server):
    status, doc = call(server + "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    body = doc["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert list(body) == ["application/json"]                              # no images for a tabular model
    one = body["application/json"]["schema"]["oneOf"][0]["properties"]["inputs"]["anyOf"][0]
    assert one["minItems"] == one["maxItems"] == 30
    assert {"400", "413", "415", "422"} <= set(doc["paths"]["/predict"]["post"]["responses"])


@pytest.mark.parametrize("body,ctype,status,kind,fragment", [
    (b"{oops", "application/json", 400, "bad_request", "malformed JSON"),
    ({"x": [1, 2]}, "application/json", 422, "invalid_input", "'inputs'"),
    ({"inputs": [1.0] * 29}, "application/json", 422, "invalid_input", "expected 30 features"),
    ({"inputs": ["a"] * 30}, "application/json", 422, "invalid_input", "expected numbers"),
    ({"inputs": [None] * 30}, "application/json", 422, "invalid_input", "null is not a number"),
    ({"inputs": [[0.0] * 30, [0.0] * 29]}, "application/json", 422, "invalid_input", "different lengths"),
    ({"inputs": 3}, "application/json", 422, "invalid_input", "must be a list"),
    ({"image": "aGVsbG8="}, "application/json", 422, "invalid_input", "does not take images"),
    (b"\x89PNG...", "image/png", 415, "unsupported_media_type", "does not take images"),
    (b"", "application/json", 400, "bad_request", "empty body"),
    (b"{}", "text/plain", 415, "unsupported_media_type", "text/plain is not taken"),
], ids=["malformed", "no-inputs", "29-features", "strings", "nulls", "ragged", "not-a-list", "image-field",
        "png-body", "empty", "text-plain"])
def test_bad_requests_get_a_json_4xx(server, body, ctype, status, kind, fragment):
    got_status, got = call(server + "/predict", body, method="POST", ctype=ctype)
    assert got_status == status and got["error"] == kind and fragment in got["detail"], got


def test_unknown_paths_and_methods(server):
    assert call(server + "/nope") == (404, {"error": "not_found", "detail": call(server + "/nope")[1]["detail"]})
    status, body = call(server + "/predict")
    assert status == 405 and body["error"] == "method_not_allowed" and "POST /predict" in body["detail"]


def test_an_image_is_taken_as_a_body_a_multipart_file_or_base64(digits_cnn_bundle, reference_data):
    import requests

    data = reference_data["digits"]
    png0, png1 = _digit_png(data, 0), _digit_png(data, 1)
    want = [data.labels[int(data.y_test[i])] for i in (0, 1)]
    with served(digits_cnn_bundle) as url:
        status, body = call(url + "/predict", png0, ctype="image/png")
        assert status == 200 and body["labels"] == want[0]
        status, body = call(url + "/predict", {"image": base64.b64encode(png0).decode()})
        assert status == 200 and body["labels"] == want[0]
        status, body = call(url + "/predict", {"images": [base64.b64encode(p).decode() for p in (png0, png1)]})
        assert status == 200 and body["labels"] == want
        resp = requests.post(url + "/predict", files=[("image", ("a.png", png0, "image/png")),
                                                      ("image", ("b.png", png1, "image/png"))], timeout=30)
        assert resp.status_code == 200 and resp.json()["labels"] == want
        status, body = call(url + "/predict", b"GIF89a not really", ctype="image/gif")
        assert status == 422 and "not a readable" in body["detail"]
        status, doc = call(url + "/openapi.json")
        assert {"image/*", "multipart/form-data"} <= set(doc["paths"]["/predict"]["post"]["requestBody"]["content"])


def test_serving_with_a_broker_reports_telemetry(mosquitto, bc_rf_bundle, tmp_path, reference_data):
    import edge_runtime
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.mqtt import parse_broker_url
    from helpers.mqtt_collector import Collector

    model = edge_runtime.load(bc_rf_bundle)
    sub = Collector(mosquitto.port)
    agent = DeviceAgent(model, "srv-1", "lab", parse_broker_url(mosquitto.url), state_dir=tmp_path / "s",
                        window_seconds=None, window_size=10).start()
    try:
        with served(model, agent=agent) as url:
            X = reference_data["breast_cancer"].X_test
            for i in range(4):
                assert call(url + "/predict", {"inputs": X[i * 5:(i + 1) * 5].tolist()})[0] == 200
            assert sub.wait_for(lambda: len(sub.telemetry("srv-1")) == 2)
            assert [w["count"] for w in sorted(sub.telemetry("srv-1"), key=lambda w: w["seq"])] == [10, 10]
    finally:
        agent.stop()
        sub.close()
