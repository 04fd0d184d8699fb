"""MLflow in and out, as a user runs it: a model registered in MLflow converts into a bundle, the bundle goes back
into the registry as an `edgeops` model that MLflow loads without TensorFlow, and the monitor takes its URI.

The tracking store is a local SQLite file and the artifact root a folder, both in a temporary folder: no server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from convert.reference import load_reference_data

EXPERIMENT = "edgeops-tests"


def edgeops(capsys, *args) -> tuple[int, str, str]:
    """Run the `edgeops` command line in this process; (exit code, stdout, stderr)."""
    from edgeops.cli import main

    with pytest.raises(SystemExit) as stopped:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return stopped.value.code, out.out, out.err


def json_report(stdout: str) -> dict:
    """The --json report (TensorFlow's converter prints its own lines to stdout before it)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[lines.index("{"):]))


def error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("edgeops: error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A local MLflow tracking store (sqlite:///) with its artifact root in the same temporary folder."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    env = pytest.MonkeyPatch()
    env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'store.db'}")
    env.setenv("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
    env.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import mlflow

    mlflow.create_experiment(EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    yield root
    env.undo()


@pytest.fixture(scope="session")
def registered_sklearn(mlflow_store):
    """A Wine classifier (StandardScaler + LogisticRegression) registered as wine-logreg version 1."""
    import mlflow
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = load_reference_data("wine")
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(data.X_train, data.y_train)
    with mlflow.start_run(run_name="train wine") as run:
        # pip_requirements given: MLflow would otherwise start a child process to infer them
        mlflow.sklearn.log_model(model, name="model", registered_model_name="wine-logreg",
                                 pip_requirements=["scikit-learn"])
    holdout = mlflow_store / "wine-holdout.npz"
    np.savez(holdout, X=data.X_test, y=data.y_test)
    return SimpleNamespace(run_id=run.info.run_id, holdout=holdout, data=data)


@pytest.fixture(scope="session")
def registered_keras(mlflow_store):
    """A small Keras MLP on Breast Cancer, registered as bc-mlp version 1 with the alias 'champion'."""
    import keras
    import mlflow

    data = load_reference_data("breast_cancer")
    keras.utils.set_random_seed(7)
    norm = keras.layers.Normalization()
    norm.adapt(data.X_train)
    model = keras.Sequential([keras.Input((data.X_train.shape[1],)), norm,
                              keras.layers.Dense(16, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(data.X_train, data.y_train, epochs=15, batch_size=32, verbose=0)
    with mlflow.start_run(run_name="train bc") as run:
        mlflow.keras.log_model(model, name="model", registered_model_name="bc-mlp", pip_requirements=["keras"])
    mlflow.MlflowClient().set_registered_model_alias("bc-mlp", "champion", "1")
    holdout = mlflow_store / "bc-holdout.npz"
    np.savez(holdout, X=data.X_test, y=data.y_test)
    return SimpleNamespace(run_id=run.info.run_id, holdout=holdout, data=data)


@pytest.fixture(scope="session")
def wine_edge(mlflow_store, registered_sklearn, tmp_path_factory):
    """wine-logreg version 1 converted by `edgeops convert models:/wine-logreg/1 --register`, run as a user does."""
    out = tmp_path_factory.mktemp("wine-edge") / "bundle"
    res = subprocess.run([sys.executable, "-m", "edgeops", "convert", "models:/wine-logreg/1", "--out", str(out),
                          "--holdout", str(registered_sklearn.holdout), "--register", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return SimpleNamespace(bundle=out, report=json_report(res.stdout))


def _pyfunc_predictions(model_uri: str, X: np.ndarray) -> np.ndarray:
    import mlflow.pyfunc

    return np.asarray(mlflow.pyfunc.load_model(model_uri).predict(X))


@pytest.mark.slow
def test_a_registered_sklearn_model_becomes_a_registered_edge_model_that_predicts_like_its_bundle(
        wine_edge, registered_sklearn):
    import mlflow

    import edge_runtime

    manifest = json.loads((wine_edge.bundle / "manifest.json").read_text())
    assert manifest["name"] == "wine-logreg"
    assert manifest["source"]["uri"] == "models:/wine-logreg/1"
    assert manifest["source"]["run_id"] == registered_sklearn.run_id
    assert manifest["source"]["registered_model"] == "wine-logreg"
    assert manifest["source"]["model_version"] == "1"

    registered = wine_edge.report["registered"]
    assert registered["name"] == "wine-logreg-edge" and registered["model_uri"] == "models:/wine-logreg-edge/1"
    X = registered_sklearn.data.X_test
    expected = edge_runtime.load(wine_edge.bundle).predict(X)
    np.testing.assert_array_equal(_pyfunc_predictions(registered["model_uri"], X), expected)

    # the conversion report travels with the registered model
    client = mlflow.MlflowClient()
    run = client.get_run(registered["run_id"])
    assert run.data.metrics["model.onnx.accuracy_drop_points"] <= 2.0
    assert run.data.metrics["model.onnx.size_bytes"] == manifest["artifacts"][0]["size_bytes"]
    assert run.data.tags["edgeops.source_uri"] == "models:/wine-logreg/1"
    version = client.get_model_version("wine-logreg-edge", "1")
    assert version.tags["edgeops.bundle_version"] == "1.0.0"


@pytest.mark.slow
def test_a_keras_model_by_its_alias_round_trips_through_tflite(registered_keras, tmp_path, capsys):
    import edge_runtime

    out = tmp_path / "bc-edge"
    code, stdout, err = edgeops(capsys, "convert", "models:/bc-mlp@champion", "--out", out, "--format", "tflite",
                                "--quantize", "none,int8", "--holdout", registered_keras.holdout,
                                "--register", "bc", "--json")
    assert code == 0, err
    report = json_report(stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["framework"] == "keras"
    assert manifest["source"]["uri"] == "models:/bc-mlp@champion"
    assert manifest["source"]["model_version"] == "1" and manifest["source"]["run_id"] == registered_keras.run_id
    assert report["registered"]["model_uri"] == "models:/bc-edge/1"

    X = registered_keras.data.X_test
    np.testing.assert_array_equal(_pyfunc_predictions("models:/bc-edge/1", X), edge_runtime.load(out).predict(X))


@pytest.mark.slow
def test_a_model_logged_in_a_run_converts_from_its_runs_uri_and_leaves_no_download(registered_sklearn, tmp_path,
                                                                                  capsys, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    uri = f"runs:/{registered_sklearn.run_id}/model"
    code, _, err = edgeops(capsys, "convert", uri, "--out", tmp_path / "b", "--holdout", registered_sklearn.holdout)
    assert code == 0, err
    assert list(scratch.iterdir()) == []
    source = json.loads((tmp_path / "b" / "manifest.json").read_text())["source"]
    assert source["uri"] == uri and source["run_id"] == registered_sklearn.run_id
    assert source["model_version"] is None


@pytest.mark.slow
def test_the_monitor_reads_a_registered_edge_models_reference_profile_from_its_uri(wine_edge, tmp_path,
                                                                                   monkeypatch):
    import tempfile

    from telemetry.cli import _bundles

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what the download leaves behind lands here
    manifests = _bundles((wine_edge.report["registered"]["model_uri"],), None)
    assert [m["name"] for m in manifests] == ["wine-logreg"]
    assert manifests[0]["reference_profile"] == json.loads((wine_edge.bundle / "manifest.json").read_text())[
        "reference_profile"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_loading_the_edge_model_through_mlflow_never_imports_tensorflow(wine_edge, registered_sklearn, tmp_path):
    np.save(tmp_path / "x.npy", registered_sklearn.data.X_test[:5])
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import mlflow.pyfunc
        model = mlflow.pyfunc.load_model({wine_edge.report["registered"]["model_uri"]!r})
        out = model.predict(np.load({str(tmp_path / "x.npy")!r}))
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "sklearn"))
        print(json.dumps({{"shape": list(out.shape), "heavy": heavy}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen == {"shape": [5, 3], "heavy": []}


@pytest.mark.slow
def test_unknown_models_foreign_flavors_and_unusable_stores_are_bad_input(wine_edge, tmp_path, capsys,
                                                                          monkeypatch):
    from convert.mlflow_io import resolve_bundle
    from edge_runtime.errors import InvalidInputError

    code, _, err = edgeops(capsys, "convert", "models:/no-such-model/1", "--out", tmp_path / "a")
    assert code == 3 and "models:/no-such-model/1: no such model in the MLflow tracking store" in error_line(err)

    code, _, err = edgeops(capsys, "convert", "models:/wine-logreg-edge/1", "--out", tmp_path / "b")
    assert code == 3
    assert "MLflow flavor(s) edgeops; edgeops converts the keras and sklearn flavors" in error_line(err)

    with pytest.raises(InvalidInputError, match="not an edgeops bundle"):
        resolve_bundle("models:/wine-logreg/1")
    # flash resolves its BUNDLE before it talks to any broker or device
    code, _, err = edgeops(capsys, "flash", "models:/wine-logreg/1", "--device", "pi-1", "--fleet", "lab",
                           "--broker", "mqtt://127.0.0.1:9")
    assert code == 3 and "models:/wine-logreg/1: not an edgeops bundle (MLflow flavors: python_function, sklearn)" \
        in error_line(err)

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'store.db'}")
    code, _, err = edgeops(capsys, "convert", "models:/wine-logreg/1", "--out", tmp_path / "c")
    assert code == 3 and "the MLflow tracking store sqlite:///" in error_line(err)
    assert "cannot be used" in error_line(err)


@pytest.mark.parametrize("uri", ["models:/", "runs:/only-a-run-id", "models:/a/b/c"])
def test_a_malformed_mlflow_uri_is_refused_before_any_store_is_opened(uri, tmp_path, capsys):
    code, _, err = edgeops(capsys, "convert", uri, "--out", tmp_path / "b")
    assert code == 3
    assert f"{uri}: not an MLflow model URI; expected models:/NAME/VERSION" in error_line(err)


@pytest.mark.parametrize("uri, name", [("models:/wine-rf/3", "wine-rf"), ("models:/wine-rf@champion", "wine-rf"),
                                       ("runs:/5c0f1e/models/forest", "forest")])
def test_a_bundle_from_an_mlflow_uri_is_named_after_its_registered_model_or_logged_path(uri, name):
    from convert.mlflow_io import default_name

    assert default_name(uri) == name


def test_the_conversion_report_becomes_mlflow_metrics_per_artifact():
    from convert.mlflow_io import report_metrics

    manifest = {"artifacts": [{"file": "model.int8.tflite", "size_bytes": 4096, "size_ratio": 0.26,
                               "parity": {"metric_drop_points": 0.5, "label_agreement": 0.99, "mae": None}}]}
    assert report_metrics(manifest) == {"model.int8.tflite.size_bytes": 4096.0, "model.int8.tflite.size_ratio": 0.26,
                                        "model.int8.tflite.accuracy_drop_points": 0.5,
                                        "model.int8.tflite.label_agreement": 0.99}
