"""Bad input to `edgeops convert`: a clear one-line error and a meaningful exit code, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import joblib
import numpy as np
import pytest

from convert.reference import load_reference_data, train_random_forest


def convert(*args, cwd=None):
    res = subprocess.run([sys.executable, "-m", "edgeops", "convert", *map(str, args)],
                         capture_output=True, text=True, timeout=300, cwd=cwd)
    return res


def assert_one_line_error(res, code: int, *fragments: str):
    assert res.returncode == code, res.stderr
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("edgeops: error:")]
    assert len(errors) == 1, res.stderr
    for f in fragments:
        assert f in errors[0], errors[0]


@pytest.fixture(scope="module")
def forest_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("forest")
    data = load_reference_data("wine")
    path = d / "forest.joblib"
    joblib.dump(train_random_forest(data, n_estimators=10), path)
    np.savez(d / "holdout.npz", X=data.X_test, y=data.y_test)
    np.save(d / "narrow.npy", data.X_train[:, :5])
    return path, d / "holdout.npz", d / "narrow.npy"


def test_missing_model_file(tmp_path):
    assert_one_line_error(convert(tmp_path / "nope.keras", "--out", tmp_path / "b"), 3, "nope.keras", "no such file")


@pytest.mark.parametrize("name", ["broken.keras", "broken.onnx", "broken.tflite"])
def test_corrupt_model_file(tmp_path, name):
    bad = tmp_path / name
    bad.write_bytes(b"\x00garbage" * 100)
    res = convert(bad, "--out", tmp_path / "b", "--holdout", bad)
    assert res.returncode == 3 and "Traceback" not in res.stderr
    assert name in res.stderr and "edgeops: error:" in res.stderr


def test_pickle_without_trust(forest_file, tmp_path):
    path, holdout, _ = forest_file
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--holdout", holdout), 3, "--trust-pickle")


def test_unsupported_estimator(tmp_path):
    from sklearn.cluster import KMeans

    path = tmp_path / "kmeans.joblib"
    joblib.dump(KMeans(n_clusters=2, n_init=1).fit(np.random.rand(20, 3)), path)
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--trust-pickle"), 3,
                          "KMeans", "neither a classifier nor a regressor")


def test_transformer_only_pipeline_is_refused(tmp_path):
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    path = tmp_path / "scaler.joblib"
    joblib.dump(Pipeline([("scale", StandardScaler())]).fit(np.random.rand(20, 3)), path)
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--trust-pickle"), 3,
                          "Pipeline(StandardScaler)", "classifiers and regressors")


def test_corrupt_pickle_with_trust(tmp_path):
    path = tmp_path / "model.joblib"
    path.write_bytes(b"not a pickle at all")
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--trust-pickle"), 3, "model.joblib",
                          "not a readable pickle")


def test_skops_file_with_foreign_types_needs_trust(tmp_path):
    import operator

    import skops.io as sio
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    X, y = np.random.rand(40, 3), np.arange(40) % 2
    pipe = Pipeline([("f", FunctionTransformer(operator.neg)), ("clf", LogisticRegression())]).fit(X, y)
    path = tmp_path / "custom.skops"
    sio.dump(pipe, path)
    np.savez(tmp_path / "holdout.npz", X=X.astype(np.float32), y=y)
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--holdout", tmp_path / "holdout.npz"), 3,
                          "custom.skops", "_operator.neg", "--trust-pickle")


def test_calibration_of_the_wrong_width(forest_file, tmp_path):
    path, holdout, narrow = forest_file
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--trust-pickle", "--holdout", holdout,
                                  "--calibration", narrow), 3, "calibration data", "5 values per row", "takes 13")


def test_output_dir_that_exists(forest_file, tmp_path):
    path, holdout, _ = forest_file
    (tmp_path / "b").mkdir()
    assert_one_line_error(convert(path, "--out", tmp_path / "b", "--trust-pickle", "--holdout", holdout), 3,
                          "exists", "--force")
    ok = convert(path, "--out", tmp_path / "b", "--trust-pickle", "--holdout", holdout, "--force", "--json")
    assert ok.returncode == 0, ok.stderr
    assert '"label_agreement": 1.0' in ok.stdout
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(convert(path, "--out", tmp_path / "a-file", "--trust-pickle", "--holdout", holdout,
                                  "--force"), 3, "a-file", "not a directory")


def test_unknown_quantization_is_a_usage_error(forest_file, tmp_path):
    path, holdout, _ = forest_file
    res = convert(path, "--out", tmp_path / "b", "--quantize", "int4")
    assert res.returncode == 2 and "int4" in res.stderr and "Traceback" not in res.stderr


def test_keys_new_makes_a_pair_and_refuses_to_overwrite(tmp_path):
    import json as _json

    res = subprocess.run([sys.executable, "-m", "edgeops", "keys", "new", "--out", str(tmp_path), "--json"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = _json.loads(res.stdout)
    assert len(doc["key_id"]) == 16 and (tmp_path / "edgeops.key").stat().st_mode & 0o777 == 0o600
    again = subprocess.run([sys.executable, "-m", "edgeops", "keys", "new", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 3 and "refusing to overwrite" in again.stderr
