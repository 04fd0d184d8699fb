"""edge_runtime.load: bundles, archives and bare files, every artifact, every refusal."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

import edge_runtime
from convert.reference import digits_images
from edge_runtime.bundle import pack
from edge_runtime.errors import BundleError, InvalidInputError, ModelFormatError, VerificationError


def test_every_artifact_of_the_cnn_bundle_passes_its_test_vectors(digits_cnn_bundle, reference_data):
    X = digits_images(reference_data["digits"].X_test)
    y = reference_data["digits"].y_test
    manifest = json.loads((digits_cnn_bundle / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        model = edge_runtime.load(digits_cnn_bundle, artifact=art["file"])
        assert model.self_test() <= next(v["atol"] for v in manifest["test_vectors"] if v["artifact"] == art["file"])
        accuracy = float((model.predict(X).argmax(axis=1) == y).mean())
        assert accuracy == pytest.approx(art["parity"]["artifact_metric"], abs=1e-9)


def test_default_artifact_is_int8_tflite_and_floats_go_in_and_out(digits_cnn_bundle, reference_data):
    model = edge_runtime.load(digits_cnn_bundle)
    assert model.path.name == "model.int8.tflite" and model.backend.name == "litert"
    x = digits_images(reference_data["digits"].X_test[:1])[0]
    out = model.predict(x)
    assert out.dtype == np.float32 and out.shape == (10,) and abs(float(out.sum()) - 1.0) < 0.05
    assert model.predict_labels(x) == reference_data["digits"].labels[int(reference_data["digits"].y_test[0])]


def test_tabular_bundle_takes_raw_features_and_applies_its_standardisation(bc_mlp_bundle, reference_data):
    data = reference_data["breast_cancer"]
    for art in ("model.int8.tflite", "model.onnx"):
        model = edge_runtime.load(bc_mlp_bundle, artifact=art)
        acc = float((model.predict(data.X_test).argmax(1) == data.y_test).mean())
        assert acc > 0.93
    proba = model.predict_proba(data.X_test[:4])
    assert proba.shape == (4, 2)


def test_tar_gz_and_bare_files_load(tmp_path, bc_rf_bundle, digits_cnn_bundle, reference_data):
    data = reference_data["breast_cancer"]
    archive = pack(bc_rf_bundle, tmp_path / "rf.tar.gz")
    from_archive = edge_runtime.load(archive)
    from_dir = edge_runtime.load(bc_rf_bundle)
    np.testing.assert_array_equal(from_archive.predict(data.X_test), from_dir.predict(data.X_test))
    bare = edge_runtime.load(bc_rf_bundle / "model.onnx")
    assert bare.manifest is None and bare.task is None
    np.testing.assert_allclose(bare.predict(data.X_test), from_dir.predict(data.X_test))
    bare_tfl = edge_runtime.load(digits_cnn_bundle / "model.int8.tflite")
    assert bare_tfl.predict(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 10)


def test_a_tampered_artifact_is_refused(tmp_path, bc_rf_bundle):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bc_rf_bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x55
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.onnx: sha256"):
        edge_runtime.load(copy)


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_tflite_is_rejected_without_crashing(tmp_path, digits_cnn_bundle, cut):
    data = (digits_cnn_bundle / "model.int8.tflite").read_bytes()
    bad = tmp_path / "cut.tflite"
    bad.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(ModelFormatError, match="truncated"):
        edge_runtime.load(bad)


@pytest.mark.parametrize("name,content", [
    ("random.onnx", bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8))),
    ("text.onnx", b"this is a text file, not a model\n" * 20),
    ("random.tflite", bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8))),
    ("notes.txt", b"hello"),
])
def test_files_that_are_not_models_are_rejected(tmp_path, name, content):
    bad = tmp_path / name
    bad.write_bytes(content)
    with pytest.raises((ModelFormatError, BundleError)):
        edge_runtime.load(bad)


def test_truncated_onnx_is_rejected(tmp_path, bc_rf_bundle):
    data = (bc_rf_bundle / "model.onnx").read_bytes()
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFormatError):
        edge_runtime.load(bad)


def test_isolated_load_refuses_a_model_the_interpreter_rejects(tmp_path, digits_cnn_bundle):
    data = bytearray((digits_cnn_bundle / "model.tflite").read_bytes())
    data[40:48] = b"\xff" * 8  # plausible header, broken tables
    bad = tmp_path / "broken.tflite"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError):
        edge_runtime.load(bad, isolate=True)


def test_bad_inputs_get_errors_that_name_the_input(bc_mlp_bundle, digits_cnn_bundle):
    tab = edge_runtime.load(bc_mlp_bundle)
    with pytest.raises(InvalidInputError, match=r"expected 30 features \(mean radius, .*got 29"):
        tab.predict(np.zeros(29))
    with pytest.raises(InvalidInputError, match="expected numbers"):
        tab.predict(["a"] * 30)
    x = np.zeros(30)
    x[3] = np.nan
    with pytest.raises(InvalidInputError, match="NaN or infinite value at sample 0, feature 'mean area'"):
        tab.predict(x)
    img = edge_runtime.load(digits_cnn_bundle)
    with pytest.raises(InvalidInputError, match=r"expected shape \(8, 8, 1\)"):
        img.predict(np.zeros((8, 8)))


def test_nan_policy_count_passes_nan_on_and_counts_it(bc_mlp_bundle):
    model = edge_runtime.load(bc_mlp_bundle, nan_policy="count", artifact="model.onnx")
    rec = model.start_recording(window_size=2)
    x = np.ones(30, dtype=np.float32)
    model.predict(x)
    x[0] = np.nan
    model.predict(x)
    (window,) = rec.poll()
    assert window["features"]["nan"][0] == 1 and window["features"]["count"][0] == 1
    assert window["features"]["count"][1] == 2


def test_running_a_bundle_never_imports_tensorflow_keras_or_sklearn(digits_cnn_bundle, bc_rf_bundle):
    code = (
        "import sys, json, numpy as np\n"
        "import edge_runtime\n"
        f"m = edge_runtime.load({str(digits_cnn_bundle)!r})\n"
        "m.start_recording(window_size=5)\n"
        "[m.predict(np.zeros((8, 8, 1), np.float32)) for _ in range(10)]\n"
        f"r = edge_runtime.load({str(bc_rf_bundle)!r})\n"
        "r.predict(np.zeros(30, np.float32))\n"
        "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('tensorflow', 'keras', 'sklearn', 'onnx', "
        "'tf2onnx', 'skl2onnx', 'convert', 'telemetry', 'devices', 'benchmarks'))\n"
        "print(json.dumps(heavy))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
