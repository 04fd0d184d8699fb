"""Every conversion path end to end: files on disk, regressors, passthrough, signing."""

from __future__ import annotations

import json

import joblib
import numpy as np
import pytest

from convert import to_bundle
from convert.reference import load_reference_data, train_random_forest
from edge_runtime import signing
from edge_runtime.bundle import open_bundle
from edge_runtime.errors import QualityCheckError, VerificationError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wine():
    return load_reference_data("wine")


@pytest.fixture(scope="module")
def wine_forest(wine):
    return train_random_forest(wine, n_estimators=20)


@pytest.fixture(scope="module")
def small_keras(wine):
    import keras

    keras.utils.set_random_seed(1)
    mean, std = wine.X_train.mean(0), wine.X_train.std(0)
    model = keras.Sequential([keras.Input((13,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit((wine.X_train - mean) / std, wine.y_train, epochs=30, verbose=0)
    return model, {"mean": mean.tolist(), "std": std.tolist()}


def test_keras_file_and_savedmodel_dir_convert(tmp_path, wine, small_keras):
    model, norm = small_keras
    path = tmp_path / "wine.keras"
    model.save(path)
    res = to_bundle(path, tmp_path / "b1", quantize=["none", "dynamic"], holdout=(wine.X_test, wine.y_test),
                    calibration=wine.X_train, normalization=norm)
    assert res.manifest["source"]["framework"] == "keras" and res.manifest["name"] == "wine"
    # tflite + onnx, none + dynamic
    assert res.manifest["source"]["sha256"] and len(open_bundle(res.path).artifacts) == 4

    saved = tmp_path / "saved"
    model.export(saved, verbose=False)
    res2 = to_bundle(saved, tmp_path / "b2", quantize=["none", "int8"], holdout=(wine.X_test, wine.y_test),
                     calibration=wine.X_train, normalization=norm)
    assert res2.manifest["source"]["framework"] == "tensorflow"
    by = {a["file"]: a for a in res2.manifest["artifacts"]}
    assert by["model.int8.tflite"]["parity"]["label_agreement"] > 0.9
    assert by["model.onnx"]["parity"]["max_abs_prob_diff"] < 1e-5


def test_sklearn_regressor_converts_with_r2_parity(tmp_path):
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import GradientBoostingRegressor

    X, y = load_diabetes(return_X_y=True)
    X = X.astype(np.float32)
    reg = GradientBoostingRegressor(n_estimators=30, random_state=0).fit(X[:300], y[:300])
    res = to_bundle(reg, tmp_path / "reg", holdout=(X[300:], y[300:]), name="diabetes-gbr")
    (art,) = res.manifest["artifacts"]
    assert res.manifest["task"] == "regression" and res.manifest["labels"] is None
    assert art["output_kind"] == "value" and art["parity"]["metric"] == "r2"
    assert abs(art["parity"]["metric_drop_points"]) < 0.1 and art["parity"]["mae"] < 1e-2
    assert res.manifest["reference_profile"]["output_stats"]["name"] == "prediction"


def test_sklearn_regressor_pipeline_converts(tmp_path):
    from sklearn.datasets import load_diabetes
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    ds = load_diabetes()
    X, y = ds.data.astype(np.float32), ds.target
    pipe = Pipeline([("scale", StandardScaler()),
                     ("forest", RandomForestRegressor(n_estimators=20, max_depth=8, random_state=0))])
    pipe.fit(X[:300], y[:300])
    res = to_bundle(pipe, tmp_path / "reg", holdout=(X[300:], y[300:]), feature_names=ds.feature_names)
    (art,) = res.manifest["artifacts"]
    assert art["format"] == "onnx" and art["outputs"][0]["shape"] == [-1, 1]
    assert art["parity"]["mae"] < 1e-3 and abs(art["parity"]["metric_drop_points"]) < 0.01
    assert res.manifest["input_schema"]["features"] == ds.feature_names


def test_pickle_needs_trust_and_skops_loads(tmp_path, wine, wine_forest):
    pkl = tmp_path / "forest.joblib"
    joblib.dump(wine_forest, pkl)
    from edge_runtime.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="--trust-pickle"):
        to_bundle(pkl, tmp_path / "p", holdout=(wine.X_test, wine.y_test))
    res = to_bundle(pkl, tmp_path / "p", holdout=(wine.X_test, wine.y_test), trust_pickle=True)
    assert res.manifest["source"]["model_type"] == "Pipeline(StandardScaler,RandomForestClassifier)"

    import skops.io as sio

    sk = tmp_path / "forest.skops"
    sio.dump(wine_forest, sk)
    res = to_bundle(sk, tmp_path / "s", holdout=(wine.X_test, wine.y_test))
    assert res.manifest["artifacts"][0]["parity"]["label_agreement"] == 1.0


def test_existing_onnx_and_tflite_files_are_packaged(tmp_path, wine, wine_forest, small_keras):
    first = to_bundle(wine_forest, tmp_path / "a", holdout=(wine.X_test, wine.y_test))
    onnx_file = tmp_path / "forest.onnx"
    onnx_file.write_bytes((first.path / "model.onnx").read_bytes())
    res = to_bundle(onnx_file, tmp_path / "b", holdout=(wine.X_test, wine.y_test))
    assert res.manifest["source"]["framework"] == "onnx"
    assert res.manifest["artifacts"][0]["sha256"] == first.manifest["artifacts"][0]["sha256"]

    model, norm = small_keras
    k = to_bundle(model, tmp_path / "k", formats=["tflite"], quantize=["int8"], calibration=wine.X_train,
                  holdout=(wine.X_test, wine.y_test), normalization=norm)
    tfl = tmp_path / "small.int8.tflite"
    tfl.write_bytes((k.path / "model.int8.tflite").read_bytes())
    res = to_bundle(tfl, tmp_path / "t", holdout=(wine.X_test, wine.y_test), normalization=norm)
    (art,) = res.manifest["artifacts"]
    assert art["quantization"] == "int8" and art["inputs"][0]["quantization"] is not None


def test_signed_bundle_verifies_and_tampering_is_detected(tmp_path, wine, wine_forest):
    key, pub = signing.generate_key_pair(tmp_path / "keys")
    res = to_bundle(wine_forest, tmp_path / "signed", holdout=(wine.X_test, wine.y_test), sign_key=key)
    assert open_bundle(res.path, public_key=pub).signed
    art = res.path / "model.onnx"
    data = bytearray(art.read_bytes())
    data[-1] ^= 1
    art.write_bytes(bytes(data))
    with pytest.raises(VerificationError):
        open_bundle(res.path, public_key=pub)


def test_int8_collapse_fails_with_a_hint_and_writes_nothing(tmp_path, wine):
    import keras

    # Raw wine features span 0.1 to 1680: one int8 scale for all inputs loses the small ones.
    keras.utils.set_random_seed(3)
    norm = keras.layers.Normalization()
    norm.adapt(wine.X_train)
    model = keras.Sequential([keras.Input((13,)), norm, keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(wine.X_train, wine.y_train, epochs=40, verbose=0)
    with pytest.raises(QualityCheckError, match="model.int8.tflite.*try --quantize int16x8 or float16"):
        to_bundle(model, tmp_path / "collapse", formats=["tflite"], quantize=["none", "int8"],
                  calibration=wine.X_train, holdout=(wine.X_test, wine.y_test), keep_normalization=True)
    assert not (tmp_path / "collapse").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".collapse")]
    res = to_bundle(model, tmp_path / "rescued", formats=["tflite"], quantize=["none", "int16x8", "float16"],
                    calibration=wine.X_train, holdout=(wine.X_test, wine.y_test), keep_normalization=True)
    drops = [a["parity"]["metric_drop_points"] for a in res.manifest["artifacts"]]
    assert max(drops) <= 2.0


def test_a_leading_normalization_layer_moves_to_the_runtime_and_int8_holds(tmp_path, wine):
    import keras

    import edge_runtime

    keras.utils.set_random_seed(3)
    norm = keras.layers.Normalization()
    norm.adapt(wine.X_train)
    model = keras.Sequential([keras.Input((13,)), norm, keras.layers.Dense(64, activation="relu"),
                              keras.layers.Dense(3, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(wine.X_train, wine.y_train, epochs=40, verbose=0)
    res = to_bundle(model, tmp_path / "b", formats=["tflite"], quantize=["none", "int8"],
                    calibration=wine.X_train, holdout=(wine.X_test, wine.y_test))
    schema = res.manifest["input_schema"]
    np.testing.assert_allclose(schema["normalization"]["mean"], wine.X_train.mean(0), rtol=1e-4)
    assert any("Normalization layer" in n for n in res.manifest["conversion_notes"])
    int8 = next(a for a in res.manifest["artifacts"] if a["quantization"] == "int8")
    assert int8["parity"]["metric_drop_points"] <= 2.0
    # callers still pass raw features: the runtime standardises, and agrees with the Keras model
    edge = edge_runtime.load(res.path, artifact="model.tflite").predict(wine.X_test)
    np.testing.assert_allclose(edge, model.predict(wine.X_test, verbose=0), atol=1e-4)


def test_manifest_on_disk_is_canonical_json(tmp_path, wine, wine_forest):
    res = to_bundle(wine_forest, tmp_path / "c", holdout=(wine.X_test, wine.y_test))
    doc = json.loads((res.path / "manifest.json").read_text())
    assert doc == res.manifest
