"""The trainable LiteRT artifact: a Keras classifier whose last Dense layer a device fine-tunes.

Everything before the last Dense layer is frozen into constants (a feature extractor); the last
layer's kernel and bias are resource variables. Four signatures share them (see
edge_runtime/training.py): ``train(x, y, lr)`` takes one SGD step of softmax cross-entropy with
the gradient written out (dL/dlogits = (p - onehot) / n, dW = f^T dL, db = sum dL), so the model
needs LiteRT builtin operators only: the ``ai-edge-litert`` wheel carries no flex delegate, and a
model converted with SELECT_TF_OPS would not run there.
"""

from __future__ import annotations

import hashlib
import tempfile
import warnings
from pathlib import Path

import numpy as np

from convert.sources import SourceModel
from convert.tflite import quiet_native_stderr
from edge_runtime.errors import EdgeOpsError, InvalidInputError

FILE_NAME = "model.trainable.tflite"
LEARNING_RATE = 0.1


def _last_dense(model):
    import keras

    last = model.layers[-1] if model.layers else None
    if not isinstance(last, keras.layers.Dense):
        raise InvalidInputError(f"--trainable: the model's last layer is {type(last).__name__}, not Dense "
                                "(on-device training updates a final Dense classifier layer)")
    act = getattr(last.activation, "__name__", str(last.activation))
    if act not in ("softmax", "linear"):
        raise InvalidInputError(f"--trainable: the last Dense layer's activation is {act}; softmax (or linear "
                                "logits) over two or more classes is needed")
    if int(last.units) < 2:
        raise InvalidInputError("--trainable: the last Dense layer has one unit; it needs one per class")
    return last


def _frozen_features(model, last, input_shape: tuple[int, ...]):
    """The layers before ``last`` as a function whose weights are constants."""
    import keras
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    features = keras.Model(model.inputs, last.input)
    spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32)
    concrete = tf.function(lambda x: features(x, training=False)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(concrete)

    def call(x):
        out = frozen(x)
        return out[0] if isinstance(out, (list, tuple)) else out

    return call


def _module(features, kernel: np.ndarray, bias: np.ndarray, input_shape: tuple[int, ...]):
    import tensorflow as tf

    n_classes = int(kernel.shape[1])
    x_spec = tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name="x")

    class LastLayer(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(kernel, name="w")
            self.b = tf.Variable(bias, name="b")

        @tf.function(input_signature=[x_spec])
        def infer(self, x):
            return {"output": tf.nn.softmax(tf.matmul(features(x), self.w) + self.b)}

        # lr has shape [1], not []: a rank-0 signature input crashes LiteRT 2.3.0 on aarch64 (even lr + 1)
        @tf.function(input_signature=[x_spec, tf.TensorSpec([None], tf.int32, name="y"),
                                      tf.TensorSpec([1], tf.float32, name="lr")])
        def train(self, x, y, lr):
            f = features(x)
            p = tf.nn.softmax(tf.matmul(f, self.w) + self.b)
            onehot = tf.one_hot(y, n_classes, dtype=tf.float32)
            n = tf.cast(tf.shape(f)[0], tf.float32)
            loss = -tf.reduce_sum(onehot * tf.math.log(p + 1e-7)) / n
            grad = (p - onehot) / n
            self.w.assign_sub(lr * tf.matmul(f, grad, transpose_a=True))
            self.b.assign_sub(lr * tf.reduce_sum(grad, axis=0))
            return {"loss": loss}

        @tf.function(input_signature=[])
        def save(self):
            return {"w": tf.identity(self.w), "b": tf.identity(self.b)}

        @tf.function(input_signature=[tf.TensorSpec(kernel.shape, tf.float32, name="w"),
                                      tf.TensorSpec(bias.shape, tf.float32, name="b")])
        def restore(self, w, b):
            self.w.assign(w)
            self.b.assign(b)
            return {"w": tf.identity(self.w), "b": tf.identity(self.b)}

    return LastLayer()


def trainable_tflite(source: SourceModel) -> tuple[bytes, dict]:
    """(model bytes, the manifest's ``training`` facts) for a Keras classifier."""
    import tensorflow as tf

    check_source(source)
    model = source.obj
    last = _last_dense(model)
    kernel, bias = (np.asarray(v, dtype=np.float32) for v in last.get_weights())
    module = _module(_frozen_features(model, last, source.input_shape), kernel, bias, source.input_shape)
    with tempfile.TemporaryDirectory(prefix="edgeops-trainable-") as tmp, quiet_native_stderr() as log, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        saved = str(Path(tmp) / "saved")
        signatures = {"train": module.train.get_concrete_function(), "infer": module.infer.get_concrete_function(),
                      "save": module.save.get_concrete_function(), "restore": module.restore.get_concrete_function()}
        try:
            tf.saved_model.save(module, saved, signatures=signatures)
            conv = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=list(signatures))
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            conv.experimental_enable_resource_variables = True
            data = conv.convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises ConverterError and many others
            detail = next((line for line in reversed(log) if "error" in line.lower()), str(exc))
            raise EdgeOpsError(f"trainable TFLite conversion failed: {detail[:300]}") from None
    facts = {
        "signatures": {"train": ["x", "y", "lr"], "infer": ["x"], "save": [], "restore": ["w", "b"]},
        "trainable_layers": [last.name],
        "weights": {"w": list(kernel.shape), "b": list(bias.shape)},
        "loss": "softmax_cross_entropy",
        "optimizer": "sgd",
        "learning_rate": LEARNING_RATE,
        "label_dtype": "int32",
    }
    return data, facts


def check_trainable(data: bytes, X: np.ndarray, expected: np.ndarray, where: str = FILE_NAME) -> float:
    """Run the artifact as a device will (LiteRT): its ``infer`` must match the source, and a ``train``
    step followed by ``restore`` must give the same answers back. Returns the largest difference."""
    from edge_runtime.training import TrainableModel

    net = TrainableModel(data, where)
    got = net.infer(X.astype(np.float32))
    diff = float(np.abs(got - expected).max()) if len(X) else 0.0
    if not np.isfinite(got).all() or diff > 1e-3:
        raise EdgeOpsError(f"{where}: its infer signature differs from the source by {diff:.3g}")
    _check_train_and_restore(net, X, expected, got, where)
    return diff


def _check_train_and_restore(net, X: np.ndarray, expected: np.ndarray, got: np.ndarray, where: str) -> None:
    """A train step must change the weights, and restoring them must give the same answers back."""
    before = net.weights()
    net.train_step(X[:8].astype(np.float32), expected[:8].argmax(axis=1).astype(np.int32), LEARNING_RATE)
    if all(np.array_equal(before[k], v) for k, v in net.weights().items()):
        raise EdgeOpsError(f"{where}: a train step did not change the weights")
    net.set_weights(before)
    if np.abs(net.infer(X.astype(np.float32)) - got).max() > 1e-6:
        raise EdgeOpsError(f"{where}: restore did not bring the weights back")


def check_source(source: SourceModel) -> None:
    """Refuse, before anything is converted, a source that cannot get a trainable artifact."""
    if source.framework != "keras":
        raise InvalidInputError(f"--trainable: needs a Keras model; this source is {source.framework}")
    if source.task != "classification":
        raise InvalidInputError("--trainable: on-device training is for classifiers")
    _last_dense(source.obj)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def add_trainable(conversion, work: Path) -> tuple[dict, dict]:
    """Make, check and write the trainable artifact of a conversion (convert/api.py's ``_Conversion``):
    its manifest entry and test vectors (of its ``infer`` signature, checked when a Trainer loads it)."""
    from convert.verify import parity

    src, data_ = conversion.src, conversion.data
    conversion.say("converting the trainable artifact (last Dense layer, LiteRT builtin operators)")
    data, facts = trainable_tflite(src)
    X = conversion.to_model(data_.X_check).astype(np.float32)
    source_out = conversion.source_out
    logits = source_out.min() < -1e-6 or not np.allclose(source_out.sum(axis=1), 1.0, atol=1e-3)
    expected = _softmax(source_out) if logits else source_out
    check_trainable(data, X, expected)
    from edge_runtime.training import TrainableModel

    out = TrainableModel(data, FILE_NAME).infer(X)
    entry = artifact_entry(data, facts, src, parity(expected, out, data_.y_check, src.task, src.classes))
    (work / FILE_NAME).write_bytes(data)
    n_vec = min(5, len(X))
    vector = {"artifact": FILE_NAME, "inputs": data_.X_check[:n_vec].tolist(), "expected": out[:n_vec].tolist(),
              "atol": 1e-4}
    return entry, vector


def artifact_entry(data: bytes, facts: dict, source: SourceModel, parity: dict) -> dict:
    """The manifest entry (``role: "trainable"``) of the trainable artifact."""
    return {
        "file": FILE_NAME,
        "format": "tflite",
        "quantization": "none",
        "role": "trainable",
        "sha256": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "size_ratio": None,
        "output_kind": "probabilities",
        "inputs": [{"name": "x", "dtype": "float32", "shape": [-1] + [int(d) for d in source.input_shape]}],
        "outputs": [{"name": "output", "dtype": "float32", "shape": [-1, facts["weights"]["b"][0]]}],
        "parity": parity,
        "training": facts,
    }
