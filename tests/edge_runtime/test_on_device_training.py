"""On-device fine-tuning: the trainable artifact, the Trainer (checkpoints, probation) and POST /train.

Real models throughout: a Keras MLP trained on Digits classes 0-6 (first half of the rows),
converted with ``trainable=True``, run by LiteRT.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers.serve_helpers import call, served

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def trainable_bundle(bundle_cache) -> Path:
    import fcntl

    from benchmarks.on_device_training import make_bundle

    with open(bundle_cache / ".digits-trainable.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_bundle(bundle_cache / "digits-trainable")


@pytest.fixture(scope="session")
def digits():
    from benchmarks.on_device_training import digits_split

    return digits_split()


@pytest.fixture
def state_home(tmp_path, monkeypatch) -> Path:
    """serve keeps checkpoints under $XDG_STATE_HOME: a folder of this test's own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    return tmp_path / "state-home"


def _trainer(bundle, state, **kw):
    from edge_runtime.training import Trainer

    return Trainer(bundle, state, **kw)


# ---- the artifact ------------------------------------------------------------------------------

def test_trainable_artifact_is_in_the_manifest_and_never_chosen_for_inference(trainable_bundle):
    import edge_runtime
    from edge_runtime.bundle import open_bundle
    from edge_runtime.training import trainable_artifact

    bundle = open_bundle(trainable_bundle)        # hashes verify, the schema takes role/training
    art = trainable_artifact(bundle.manifest)
    assert art is not None and art["file"] == "model.trainable.tflite" and art["format"] == "tflite"
    assert art["training"]["trainable_layers"] and art["training"]["weights"]["w"] == [32, 10]
    assert art["parity"]["label_agreement"] == 1.0
    assert bundle.manifest["default_artifact"] == "model.int8.tflite"
    model = edge_runtime.load(trainable_bundle)
    assert model.path.name == "model.int8.tflite"
    from edge_runtime.model import artifact_order

    assert "model.trainable.tflite" not in [a["file"] for a in artifact_order(bundle)]


def test_trainable_artifact_loads_and_trains_without_tensorflow(trainable_bundle, tmp_path):
    code = f"""
import sys, numpy as np
from edge_runtime.training import Trainer
t = Trainer({str(trainable_bundle)!r}, {str(tmp_path / 'state')!r})
x = np.random.default_rng(0).uniform(0, 16, (8, 64)).astype(np.float32)
r = t.train(x, [7, 8, 9, 7, 8, 9, 7, 8])
assert r.loss is not None and t.infer(x).shape == (8, 10)
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras', 'sklearn', 'tf_keras'))
print('LOADED', bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout


@pytest.mark.slow      # importing the converter (TensorFlow) alone takes ~18 s here
def test_convert_refuses_trainable_for_a_non_keras_source(tmp_path):
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from convert.api import to_bundle
    from edge_runtime.errors import InvalidInputError

    X, y = load_iris(return_X_y=True)
    clf = LogisticRegression(max_iter=500).fit(X, y)
    with pytest.raises(InvalidInputError, match="--trainable: needs a Keras model"):
        to_bundle(clf, tmp_path / "b", holdout=(X, y), trainable=True)
    assert not (tmp_path / "b").exists()


# ---- the Trainer -------------------------------------------------------------------------------

def test_training_steps_reduce_loss_and_raise_accuracy_on_the_unseen_classes(trainable_bundle, digits, tmp_path):
    X, y, stream, test = digits["X"], digits["y"], digits["stream"], digits["test"]
    t = _trainer(trainable_bundle, tmp_path / "state", holdout_every=0)
    new = test[y[test] >= 7]
    acc0 = t.accuracy(X[new], y[new])
    batch = stream[:64]
    first = t.train(X[batch], y[batch].tolist()).loss
    for _ in range(15):
        last = t.train(X[batch], y[batch].tolist()).loss
    assert last < 0.5 * first
    for i in range(64, len(stream), 64):
        t.train(X[stream[i:i + 64]], y[stream[i:i + 64]].tolist())
    assert t.accuracy(X[new], y[new]) > acc0 + 0.3
    assert t.accuracy(X[test], y[test]) > 0.85


def test_checkpoint_survives_a_restart(trainable_bundle, digits, tmp_path):
    X, y, stream, test = digits["X"], digits["y"], digits["stream"], digits["test"]
    state = tmp_path / "state"
    t = _trainer(trainable_bundle, state)
    assert not t.restored
    for i in range(0, 320, 32):
        t.train(X[stream[i:i + 32]], y[stream[i:i + 32]].tolist())
    t.judge()
    trained = t.infer(X[test])
    assert t.updates > 0 and (state / "checkpoint.npz").exists()
    assert not [p for p in state.iterdir() if p.name.endswith(".tmp")]     # renamed into place
    again = _trainer(trainable_bundle, state)
    assert again.restored and again.updates == t.updates and len(again.held_y) == len(t.held_y)
    np.testing.assert_allclose(again.infer(X[test]), trained, atol=1e-6)
    fresh = _trainer(trainable_bundle, tmp_path / "other")
    assert not fresh.restored and np.abs(fresh.infer(X[test]) - trained).max() > 1e-3


def test_a_torn_checkpoint_is_ignored(trainable_bundle, digits, tmp_path):
    X = digits["X"]
    state = tmp_path / "state"
    state.mkdir()
    (state / "checkpoint.npz").write_bytes(b"PK\x03\x04 torn")
    t = _trainer(trainable_bundle, state)
    assert not t.restored
    np.testing.assert_allclose(t.infer(X[:5]), _trainer(trainable_bundle, tmp_path / "x").infer(X[:5]), atol=1e-6)


def test_probation_reverts_a_round_trained_on_wrong_labels(trainable_bundle, digits, tmp_path):
    X, y, stream = digits["X"], digits["y"], digits["stream"]
    t = _trainer(trainable_bundle, tmp_path / "state", holdout_every=3)
    for i in range(0, 480, 48):
        t.train(X[stream[i:i + 48]], y[stream[i:i + 48]].tolist())
    t.judge()
    kept = t.net.weights()
    updates, undone = t.updates, t.reverted
    wrong_rows = stream[480:480 + 96]
    wrong = ((y[wrong_rows] + 1) % 10).tolist()
    t.learning_rate = 0.5
    done = t.train(X[wrong_rows], wrong)
    assert done.judged and done.reverted and done.accuracy_after < done.accuracy_before - t.tolerance
    assert t.updates == updates and t.reverted == undone + 1
    for k, v in t.net.weights().items():
        np.testing.assert_array_equal(v, kept[k])
    # and what the checkpoint holds is the kept weights
    again = _trainer(trainable_bundle, tmp_path / "state")
    for k, v in again.net.weights().items():
        np.testing.assert_array_equal(v, kept[k])


def test_labels_must_be_classes_of_the_model(trainable_bundle, digits, tmp_path):
    from edge_runtime.errors import InvalidInputError

    X = digits["X"]
    t = _trainer(trainable_bundle, tmp_path / "state")
    with pytest.raises(InvalidInputError, match="out of range 0..9"):
        t.train(X[:2], [1, 10])
    with pytest.raises(InvalidInputError, match="2 labels for 3 samples"):
        t.train(X[:3], [1, 2])
    with pytest.raises(InvalidInputError, match="not a class"):
        t.train(X[:2], ["cat", "1"])
    assert t.train(X[:2], ["3", 4]).trained >= 1     # names of the manifest and indices both work


# ---- POST /train -------------------------------------------------------------------------------

def test_post_train_updates_what_predict_answers(trainable_bundle, digits, state_home):
    X, y, stream, test = digits["X"], digits["y"], digits["stream"], digits["test"]
    new = test[y[test] >= 7][:60]
    with served(trainable_bundle) as url:
        status, before = call(url + "/predict", {"inputs": X[new].tolist()})
        assert status == 200 and before["model"]["artifact"] == "model.int8.tflite"
        acc_before = np.mean([int(v) == t for v, t in zip(before["labels"], y[new], strict=True)])
        for i in range(0, 640, 64):
            rows = stream[i:i + 64]
            status, body = call(url + "/train", {"inputs": X[rows].tolist(), "labels": y[rows].tolist()})
            assert status == 200, body
            assert set(body) >= {"loss", "trained", "held_back", "reverted", "updates", "judged"}
        i = 640
        while not body["judged"]:       # end on a judged (checkpointed) round
            rows = stream[i:i + 64]
            i += 64
            status, body = call(url + "/train", {"inputs": X[rows].tolist(), "labels": y[rows].tolist()})
        status, after = call(url + "/predict", {"inputs": X[new].tolist()})
        assert status == 200 and after["model"]["artifact"] == "model.trainable.tflite"
        acc_after = np.mean([int(v) == t for v, t in zip(after["labels"], y[new], strict=True)])
        assert acc_after > acc_before + 0.3
    assert (state_home / "edgeops" / "serve-digits-trainable" / "training" / "checkpoint.npz").exists()
    # a restarted server answers with the trained weights at once
    with served(trainable_bundle) as url:
        status, again = call(url + "/predict", {"inputs": X[new].tolist()})
        assert again["model"]["artifact"] == "model.trainable.tflite" and again["labels"] == after["labels"]


def test_post_train_refuses_bad_bodies(trainable_bundle, digits, state_home):
    X = digits["X"]
    good = {"inputs": X[:4].tolist(), "labels": [0, 1, 2, 3]}
    with served(trainable_bundle, max_batch=16, max_body_bytes=64 * 1024) as url:
        status, body = call(url + "/train", good)
        assert status == 200, body
        cases = [
            (b'{"inputs": [[1, 2', "application/json", 400, "malformed JSON"),
            (b"", "application/json", 400, "empty body"),
            ({"inputs": X[:2].tolist()}, "application/json", 400, "exactly 'inputs'"),
            ({"inputs": X[:2].tolist(), "labels": [1]}, "application/json", 400, "one label per sample"),
            ({"inputs": X[:2].tolist(), "labels": [1, 12]}, "application/json", 400, "out of range 0..9"),
            ({"inputs": X[:2].tolist(), "labels": [1, -1]}, "application/json", 400, "out of range"),
            ({"inputs": X[:2].tolist(), "labels": [1, True]}, "application/json", 400, "not a class name"),
            ({"inputs": [[1.0] * 63, [1.0] * 64], "labels": [1, 2]}, "application/json", 400, "'inputs'"),
            ({"inputs": [[1.0] * 63 + ["a"]], "labels": [1]}, "application/json", 400, "'inputs'"),
            ({"inputs": X[:17].tolist(), "labels": list(range(10)) + [0] * 7}, "application/json", 413, "--max-batch"),
            (json.dumps({"inputs": X[:200].tolist(), "labels": [0] * 200}).encode(), "application/json", 413, None),
            (json.dumps(good).encode("utf-16"), "application/json", 415, "UTF-8"),
            (b'{"inputs": [[1]], "labels": ["\xff\xfe"]}', "application/json", 415, "not UTF-8"),
            (json.dumps(good).encode(), "text/plain", 415, None),
            (json.dumps(good).encode(), "application/json; charset=latin-1", 415, None),
        ]
        for body, ctype, want, says in cases:
            status, answer = call(url + "/train", body, ctype=ctype)
            assert status == want, (body if isinstance(body, dict) else body[:60], status, answer)
            assert isinstance(answer, dict) and "detail" in answer
            if says:
                assert says in answer["detail"], answer
        # nothing of that trained: one kept round so far
        status, health = call(url + "/healthz", method="GET", ctype=None)
        assert status == 200


def test_post_train_without_a_trainable_artifact_is_409(digits_cnn_bundle, state_home):
    with served(digits_cnn_bundle) as url:
        status, body = call(url + "/train", {"inputs": [[0.0] * 64], "labels": [1]})
    assert status == 409 and body["error"] == "no_trainable_artifact"
    assert "--trainable" in body["detail"]


# ---- --learn: late labels joined to predictions feed the Trainer --------------------------------

def test_learner_trains_on_labels_joined_to_remembered_inputs(trainable_bundle, digits, tmp_path):
    labels_mod = pytest.importorskip("edge_runtime.labels")
    from edge_runtime.training import Learner

    X, y, stream, test = digits["X"], digits["y"], digits["stream"], digits["test"]
    learner = Learner(_trainer(trainable_bundle, tmp_path / "state"), batch=32)
    joiner = labels_mod.LabelJoiner([str(i) for i in range(10)], 10)
    joiner.subscribe(learner.on_joined)
    acc0 = learner.trainer.accuracy(X[test], y[test])
    rounds = 0
    for n, i in enumerate(stream):
        out = learner.trainer.infer(X[i])
        joiner.predicted(f"in-{n}", int(out.argmax()))
        learner.remember(f"in-{n}", X[i])
        joiner.label(f"in-{n}", str(y[i]))            # the label arrives (here at once) and is joined
        rounds += learner.step() is not None
    joiner.label("in-unknown", "3")                   # no such prediction: the joiner counts it, nothing trains
    assert rounds == len(stream) // 32 and learner.unmatched == 0
    learner.trainer.judge()
    assert learner.trainer.updates > 0
    assert learner.trainer.accuracy(X[test], y[test]) > acc0 + 0.1


def test_run_learn_fine_tunes_on_the_label_column(mosquitto, trainable_bundle, digits, tmp_path):
    from edge_runtime.agent import DeviceAgent

    if not hasattr(DeviceAgent, "take_labels"):
        pytest.skip("this agent joins no labels yet (edge_runtime/labels.py)")
    from edge_runtime.training import Trainer

    X, y, stream, test = digits["X"], digits["y"], digits["stream"], digits["test"]
    path = tmp_path / "labelled.npz"
    np.savez(path, X=X[stream], y=y[stream])
    state = tmp_path / "s"
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(trainable_bundle), "--learn", "--device-id",
                          "dev-l", "--fleet", "lab", "--broker", mosquitto.url, "--input", str(path),
                          "--window-size", "100", "--state-dir", str(state), "--confirm", "broker"],
                         capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    checkpoint = state / "training" / "checkpoint.npz"
    assert checkpoint.exists()
    fresh = Trainer(trainable_bundle, tmp_path / "fresh")
    learned = Trainer(trainable_bundle, state / "training")
    assert learned.restored and learned.updates > 0
    assert learned.accuracy(X[test], y[test]) > fresh.accuracy(X[test], y[test]) + 0.1


def test_run_learn_refuses_a_bundle_without_a_trainable_artifact(mosquitto, digits_cnn_bundle, tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(digits_cnn_bundle), "--learn", "--device-id",
                          "dev-n", "--broker", mosquitto.url, "--input", "-", "--state-dir", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, input="")
    assert res.returncode != 0
    assert "no trainable artifact" in res.stderr
