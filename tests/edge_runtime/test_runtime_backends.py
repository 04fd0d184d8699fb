"""Backends, model checks, artifact choice, signed manifests and image inputs of edge_runtime."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge_runtime
from convert.reference import digits_images
from edge_runtime import signing
from edge_runtime.backends import available_backends, open_backend
from edge_runtime.backends.tflite import MAX_SHAPES, _tflite_runtime
from edge_runtime.bundle import open_bundle, write_manifest
from edge_runtime.errors import BackendUnavailableError, ModelFormatError, VerificationError
from edge_runtime.model import artifact_order
from edge_runtime.modelcheck import check_model_file


def test_check_model_file_names_the_format_of_real_models(digits_cnn_bundle, bc_rf_bundle):
    assert check_model_file(digits_cnn_bundle / "model.int8.tflite") == "tflite"
    assert check_model_file(bc_rf_bundle / "model.onnx") == "onnx"


@pytest.mark.parametrize("suffix", [".tflite", ".onnx"])
def test_a_text_file_renamed_to_a_model_is_refused_before_any_interpreter(tmp_path, suffix):
    bad = tmp_path / f"readme{suffix}"
    bad.write_text("# notes\nthis is not a model, only text that someone renamed\n" * 10)
    with pytest.raises(ModelFormatError, match=f"readme{suffix}: not a"):
        check_model_file(bad)
    with pytest.raises(ModelFormatError):
        open_backend(bad)


def test_a_tflite_header_on_random_bytes_is_refused(tmp_path):
    body = bytearray(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    body[4:8] = b"TFL3"
    bad = tmp_path / "forged.tflite"
    bad.write_bytes(bytes(body))
    with pytest.raises(ModelFormatError, match="forged.tflite"):
        edge_runtime.load(bad, isolate=True)


def test_tflite_runtime_under_numpy_2_says_why_it_cannot_be_used():
    if int(np.__version__.split(".")[0]) < 2:
        pytest.skip("NumPy 1.x: tflite_runtime may import")
    with pytest.raises(BackendUnavailableError, match="NumPy"):
        _tflite_runtime()
    found = available_backends()
    assert found["litert"] and found["onnxruntime"] and found["tflite_runtime"] is None


def test_alternating_batch_sizes_give_the_same_rows_as_single_samples(digits_cnn_bundle, reference_data):
    model = edge_runtime.load(digits_cnn_bundle, artifact="model.tflite", threads=1)
    X = digits_images(reference_data["digits"].X_test[:12])
    singles = np.stack([model.predict(x) for x in X])
    for n in (5, 1, 12, 3, 7, 2, 5, 1):  # more shapes than the cache holds
        np.testing.assert_allclose(model.predict(X[:n]), singles[:n], rtol=1e-5, atol=1e-6)
    assert len(model.backend._by_shape) <= MAX_SHAPES and model.backend.threads == 1


def test_onnx_backend_reports_tensors_and_runs_raw_feeds(bc_rf_bundle, reference_data):
    backend = open_backend(bc_rf_bundle / "model.onnx", threads=1)
    assert backend.name == "onnxruntime" and backend.inputs[0].shape[1:] == (30,)
    out = backend.run([reference_data["breast_cancer"].X_test[:4].astype(np.float32)])
    assert len(out) == len(backend.outputs)


def test_artifacts_are_tried_default_first_and_only_where_a_backend_runs_them(digits_cnn_bundle):
    bundle = open_bundle(digits_cnn_bundle)
    order = [a["file"] for a in artifact_order(bundle, {"tflite", "onnx"})]
    assert order[:3] == ["model.int8.tflite", "model.tflite", "model.onnx"]
    assert artifact_order(bundle, {"onnx"})[0]["file"] == "model.onnx"
    assert artifact_order(bundle, set()) == []


def test_a_signed_bundle_whose_manifest_was_edited_is_refused(tmp_path, bc_rf_bundle, reference_data):
    copy = tmp_path / "signed"
    shutil.copytree(bc_rf_bundle, copy)
    key, pub = signing.generate_key_pair(tmp_path / "k")
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()), sign_key=key)
    model = edge_runtime.load(copy, public_key=pub)
    assert model.predict(reference_data["breast_cancer"].X_test[:2]).shape == (2, 2)
    doc = json.loads((copy / "manifest.json").read_text())
    doc["labels"] = list(reversed(doc["labels"]))  # a quiet edit that would swap every answer
    (copy / "manifest.json").write_text(json.dumps(doc))
    with pytest.raises(VerificationError):
        edge_runtime.load(copy, public_key=pub)


def test_image_files_and_pil_images_are_preprocessed_from_the_manifest(tmp_path, digits_cnn_bundle, reference_data):
    Image = pytest.importorskip("PIL.Image")
    model = edge_runtime.load(digits_cnn_bundle)  # int8: pixels map to the same quantized values
    raw = reference_data["digits"].X_test[:3].reshape(-1, 8, 8)
    paths = []
    for i, digit in enumerate(raw):
        pixels = np.rint(digit / 16.0 * 255.0).astype(np.uint8)
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(pixels, mode="L").save(paths[-1])
    expected = model.predict(digits_images(reference_data["digits"].X_test[:3]))
    np.testing.assert_allclose(model.predict(paths), expected, atol=1e-6)
    np.testing.assert_allclose(model.predict(Image.open(paths[0])), expected[0], atol=1e-6)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(edge_runtime.InvalidInputError, match="broken.png: not readable"):
        model.predict(tmp_path / "broken.png")


def test_object_arrays_and_infinities_are_refused_with_the_input_named(bc_mlp_bundle):
    model = edge_runtime.load(bc_mlp_bundle)
    name = model.input_spec.name
    with pytest.raises(edge_runtime.InvalidInputError, match=f"input '{name}': expected numbers"):
        model.predict(np.array([1.0, "x", None] * 10, dtype=object))
    x = np.zeros((3, 30), np.float32)
    x[2, 29] = np.inf
    with pytest.raises(edge_runtime.InvalidInputError, match="sample 2, feature 'worst fractal dimension'"):
        model.predict(x)
    with pytest.raises(edge_runtime.InvalidInputError, match="expected 30 features"):
        model.predict(np.zeros((4, 31), np.float32))
