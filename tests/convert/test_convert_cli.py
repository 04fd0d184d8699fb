"""`edgeops convert` and `edgeops keys` as a user runs them: files in, a checked (and signed) bundle out."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from convert.reference import load_reference_data, train_random_forest
from edge_runtime.bundle import open_bundle
from edge_runtime.errors import VerificationError


def edgeops(*args):
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def one_error_line(res) -> str:
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.startswith("edgeops: error:")]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def wine_files(tmp_path_factory):
    """A skops forest, holdout and calibration files and feature names, as a user would have them."""
    import skops.io as sio

    d = tmp_path_factory.mktemp("wine-files")
    data = load_reference_data("wine")
    sio.dump(train_random_forest(data, n_estimators=15), d / "forest.skops")
    np.savez(d / "holdout.npz", X=data.X_test, y=data.y_test)
    np.save(d / "calibration.npy", data.X_train)
    (d / "features.txt").write_text("\n".join(data.feature_names) + "\n")
    return d, data


def test_keys_new_then_show_and_never_overwrite(tmp_path):
    made = edgeops("keys", "new", "--out", tmp_path, "--name", "release", "--json")
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert (tmp_path / "release.key").stat().st_mode & 0o077 == 0  # private key readable by its owner only
    shown = edgeops("keys", "show", info["public_key"])
    assert shown.stdout.strip() == info["key_id"]
    again = edgeops("keys", "new", "--out", tmp_path, "--name", "release")
    assert again.returncode == 3 and "refusing to overwrite" in one_error_line(again)


@pytest.mark.slow
def test_convert_a_skops_forest_signed_from_the_command_line(tmp_path, wine_files):
    d, data = wine_files
    keys = json.loads(edgeops("keys", "new", "--out", tmp_path / "keys", "--json").stdout)
    res = edgeops("convert", d / "forest.skops", "--out", tmp_path / "bundle", "--name", "wine-forest",
                  "--version", "2.1.0", "--holdout", d / "holdout.npz", "--calibration", d / "calibration.npy",
                  "--feature-names", d / "features.txt", "--quantize", "none,int8",
                  "--sign-key", keys["private_key"], "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["signed"] and out["name"] == "wine-forest" and out["version"] == "2.1.0"
    assert [a["file"] for a in out["artifacts"]] == ["model.onnx"]
    assert any("tree ensembles" in n for n in out["notes"])  # int8 skipped with a note, not an error

    bundle = open_bundle(tmp_path / "bundle", public_key=keys["public_key"])
    assert bundle.signed
    m = bundle.manifest
    assert m["input_schema"]["features"] == data.feature_names
    assert m["reference_profile"]["n_samples"] == len(data.X_train)  # profiled on the calibration data
    assert m["source"]["file"] == "forest.skops"

    # someone edits the manifest (e.g. to point at another model): the signature no longer verifies
    doc = json.loads((bundle.root / "manifest.json").read_text())
    doc["labels"] = ["a", "b", "c"]
    (bundle.root / "manifest.json").write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    with pytest.raises(VerificationError):
        open_bundle(bundle.root, public_key=keys["public_key"])


@pytest.mark.slow
def test_convert_a_keras_file_prints_the_parity_table(tmp_path):
    import keras

    data = load_reference_data("digits")
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Rescaling(1 / 16),
                              keras.layers.Dense(64, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data.X_train, data.y_train, epochs=15, verbose=0)
    model.save(tmp_path / "digits.keras")
    np.savez(tmp_path / "holdout.npz", X=data.X_test, y=data.y_test)
    np.save(tmp_path / "calibration.npy", data.X_train)
    res = edgeops("convert", tmp_path / "digits.keras", "--out", tmp_path / "b", "--holdout", tmp_path / "holdout.npz",
                  "--calibration", tmp_path / "calibration.npy", "--format", "tflite", "--quantize", "none,int8")
    assert res.returncode == 0, res.stderr
    assert "bundle digits 1.0.0 written to" in res.stdout
    rows = {line.split()[0]: line.split() for line in res.stdout.splitlines() if line.startswith("model.")}
    assert set(rows) == {"model.tflite", "model.int8.tflite"}
    assert float(rows["model.int8.tflite"][2]) <= 0.5  # size ratio column
    assert open_bundle(tmp_path / "b").manifest["default_artifact"] == "model.int8.tflite"


@pytest.mark.slow
def test_an_int8_collapse_exits_5_and_suggests_int16x8(tmp_path):
    import keras

    data = load_reference_data("wine")
    # Standardisation inside the model: raw Wine features (0.1 .. 1680) share one int8 input scale.
    keras.utils.set_random_seed(3)
    norm = keras.layers.Normalization()
    norm.adapt(data.X_train)
    model = keras.Sequential([keras.Input((13,)), norm, keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(data.X_train, data.y_train, epochs=40, verbose=0)
    model.save(tmp_path / "wine.keras")
    np.savez(tmp_path / "holdout.npz", X=data.X_test, y=data.y_test)
    res = edgeops("convert", tmp_path / "wine.keras", "--out", tmp_path / "b", "--holdout", tmp_path / "holdout.npz",
                  "--format", "tflite", "--quantize", "none,int8", "--keep-normalization")
    assert res.returncode == 5
    line = one_error_line(res)
    assert "model.int8.tflite" in line and "int16x8" in line and "float16" in line
    assert not (tmp_path / "b").exists()
    # by default the Normalization layer moves to the runtime, and int8 passes the same check
    res = edgeops("convert", tmp_path / "wine.keras", "--out", tmp_path / "b", "--holdout", tmp_path / "holdout.npz",
                  "--format", "tflite", "--quantize", "none,int8")
    assert res.returncode == 0, res.stderr
    assert "note: the model's leading Normalization layer" in res.stdout


def test_bad_option_values_are_usage_errors(tmp_path, wine_files):
    d, _ = wine_files
    res = edgeops("convert", d / "forest.skops", "--out", tmp_path / "b", "--format", "coreml")
    assert res.returncode == 2 and "coreml" in res.stderr and "Traceback" not in res.stderr
    res = edgeops("convert", d / "forest.skops", "--out", tmp_path / "b", "--holdout", d / "holdout.npz",
                  "--version", "one")
    assert res.returncode == 3 and "semantic version" in one_error_line(res)
    res = edgeops("convert", d / "forest.skops", "--out", tmp_path / "b", "--normalization", d / "missing.json")
    assert res.returncode == 3 and "missing.json" in one_error_line(res)
    (tmp_path / "names.json").write_text("{not json")
    res = edgeops("convert", d / "forest.skops", "--out", tmp_path / "b", "--feature-names", tmp_path / "names.json")
    assert res.returncode == 3 and "not valid JSON" in one_error_line(res)


@pytest.mark.slow
def test_an_image_model_records_how_pixels_become_inputs(tmp_path):
    import keras

    data = load_reference_data("digits")
    keras.utils.set_random_seed(2)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(8, 3, activation="relu"),
                              keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit((data.X_train / 16).reshape(-1, 8, 8, 1), data.y_train, epochs=3, verbose=0)
    model.save(tmp_path / "cnn.keras")
    # rows of 64 model-input values: reshaped to the model's (8, 8, 1)
    np.savez(tmp_path / "holdout.npz", X=data.X_test / 16, y=data.y_test)
    res = edgeops("convert", tmp_path / "cnn.keras", "--out", tmp_path / "b", "--holdout", tmp_path / "holdout.npz",
                  "--format", "tflite", "--quantize", "none", "--image-scale", "0.0625", "--image-range", "0,16")
    assert res.returncode == 0, res.stderr
    m = open_bundle(tmp_path / "b").manifest
    assert m["input_schema"]["image"] == {"height": 8, "width": 8, "channels": 1, "layout": "NHWC", "scale": 0.0625,
                                         "mean": [0.0], "std": [1.0], "source_range": [0.0, 16.0]}
    assert m["reference_profile"]["monitored"] == "channels"
    bad = edgeops("convert", tmp_path / "cnn.keras", "--out", tmp_path / "c", "--holdout", tmp_path / "holdout.npz",
                  "--image-mean", "0.5,0.5,0.5")
    assert bad.returncode == 3 and "one per channel" in one_error_line(bad)
