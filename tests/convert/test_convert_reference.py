"""The reference models convert to every format that applies, within the project's targets."""

from __future__ import annotations

import pytest

from edge_runtime.bundle import open_bundle

pytestmark = pytest.mark.slow

KERAS = ["digits_cnn_bundle", "bc_mlp_bundle", "wine_mlp_bundle"]
FORESTS = ["bc_rf_bundle", "wine_rf_bundle", "digits_rf_bundle"]


@pytest.mark.parametrize("fixture", KERAS)
def test_keras_models_convert_to_every_tflite_quantization_and_onnx(fixture, request):
    bundle = open_bundle(request.getfixturevalue(fixture))
    by = {(a["format"], a["quantization"]): a for a in bundle.artifacts}
    assert set(by) >= {("tflite", q) for q in ("none", "float16", "dynamic", "int8")} | {
        ("onnx", "none"), ("onnx", "dynamic"), ("onnx", "static")}
    assert by[("onnx", "none")]["parity"]["max_abs_prob_diff"] < 1e-4  # tf2onnx is exact up to float rounding
    for q in ("dynamic", "static"):  # ONNX Runtime quantization, checked like the TFLite artifacts
        assert by[("onnx", q)]["parity"]["metric_drop_points"] <= 2.0 and by[("onnx", q)]["size_ratio"] < 0.5
    int8 = by[("tflite", "int8")]
    # full integer: int8 in and out, with the scale and zero point recorded for the runtime
    assert int8["inputs"][0]["dtype"] == "int8" and int8["outputs"][0]["dtype"] == "int8"
    assert int8["inputs"][0]["quantization"]["scale"] > 0
    assert int8["size_ratio"] <= 0.30
    for q in ("int8", "float16"):
        assert by[("tflite", q)]["parity"]["metric_drop_points"] <= 1.0
    assert bundle.manifest["default_artifact"] == "model.int8.tflite"


@pytest.mark.parametrize("fixture", FORESTS)
def test_random_forest_pipeline_onnx_matches_scikit_learn(fixture, request):
    bundle = open_bundle(request.getfixturevalue(fixture))
    (art,) = bundle.artifacts
    assert art["format"] == "onnx" and art["quantization"] == "none"
    assert art["parity"]["label_agreement"] == 1.0
    assert art["parity"]["max_abs_prob_diff"] <= 1e-5
    assert art["outputs"][0]["name"] == "probabilities"  # a plain tensor, not a ZipMap
    assert any("tree ensembles" in n for n in bundle.manifest["conversion_notes"])


def test_manifest_carries_profile_schema_labels_and_test_vectors(bc_mlp_bundle, reference_data):
    m = open_bundle(bc_mlp_bundle).manifest
    data = reference_data["breast_cancer"]
    assert m["input_schema"]["features"] == data.feature_names
    assert m["labels"] == data.labels
    assert len(m["input_schema"]["normalization"]["mean"]) == 30
    prof = m["reference_profile"]
    assert prof["n_samples"] == len(data.X_train) and len(prof["features"]) == 30
    f0 = prof["features"][0]
    assert len(f0["hist"]) == len(f0["bin_edges"]) + 1 and sum(f0["hist"]) == len(data.X_train)
    assert abs(f0["mean"] - float(data.X_train[:, 0].mean())) < 1e-3
    assert abs(sum(prof["class_priors"]["priors"]) - 1.0) < 1e-9
    files = {a["file"] for a in m["artifacts"]}
    assert {v["artifact"] for v in m["test_vectors"]} == files
    assert all(len(v["inputs"]) == 5 and len(v["expected"]) == 5 for v in m["test_vectors"])


def test_image_model_records_its_image_schema(digits_cnn_bundle):
    m = open_bundle(digits_cnn_bundle).manifest
    schema = m["input_schema"]
    assert schema["kind"] == "image" and schema["shape"] == [8, 8, 1]
    assert schema["image"]["scale"] == pytest.approx(1 / 16)
    assert m["reference_profile"]["monitored"] == "channels"
    assert [f["name"] for f in m["reference_profile"]["features"]] == ["channel_0"]
