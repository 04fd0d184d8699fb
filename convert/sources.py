"""Source models: load a Keras, TensorFlow, scikit-learn, ONNX or TFLite model and run it.

A :class:`SourceModel` gives the converter one way to ask any source for its
outputs on holdout data (probabilities for classifiers, values for
regressors), so every artifact can be checked against what it came from.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge_runtime.errors import InvalidInputError, ModelFormatError

PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


@dataclass
class SourceModel:
    """A loaded source model.

    Attributes:
        framework: keras | tensorflow | sklearn | onnx | tflite.
        obj: the framework object (keras.Model, sklearn estimator, bytes of a model file...).
        predict: outputs on a float32 batch (probabilities for classifiers, values for regressors).
        task: classification | regression.
        input_shape: one sample's shape (batch dimension excluded).
        framework_version: version of the framework that made it.
        model_type: a readable description (e.g. Pipeline(StandardScaler,RandomForestClassifier)).
        file: the file it came from, if any.
        classes: class labels known to the model (scikit-learn classes_).
        feature_names: column names known to the model (feature_names_in_).
    """

    framework: str
    obj: Any
    predict: Callable[[np.ndarray], np.ndarray]
    task: str
    input_shape: tuple[int, ...]
    framework_version: str | None = None
    model_type: str | None = None
    file: Path | None = None
    classes: list[str] | None = None
    feature_names: list[str] | None = None
    extra: dict = field(default_factory=dict)


def describe_sklearn(est: Any) -> str:
    steps = getattr(est, "steps", None)
    if steps:
        return "Pipeline(" + ",".join(type(s).__name__ for _, s in steps) + ")"
    return type(est).__name__


def from_sklearn(est: Any, file: Path | None = None, task: str | None = None) -> SourceModel:
    """Wrap a fitted scikit-learn estimator or Pipeline (classifier or regressor)."""
    import sklearn

    where = file or "source"
    detected = _sklearn_task(est, where)
    _check_fitted(est, where)
    n_features = getattr(est, "n_features_in_", None)
    if n_features is None:
        raise InvalidInputError(f"{where}: cannot tell the number of input features (no n_features_in_)")
    classes = [str(c) for c in est.classes_] if detected == "classification" else None
    return SourceModel(
        framework="sklearn",
        obj=est,
        predict=_sklearn_predict(est, detected),
        task=task or detected,
        input_shape=(int(n_features),),
        framework_version=sklearn.__version__,
        model_type=describe_sklearn(est),
        file=file,
        classes=classes,
        feature_names=_sklearn_feature_names(est),
    )


def _sklearn_feature_names(est: Any) -> list[str] | None:
    """The column names the estimator was fitted on (a DataFrame's), else None."""
    names = getattr(est, "feature_names_in_", None)
    return [str(n) for n in names] if names is not None else None


def _sklearn_task(est: Any, where: Any) -> str:
    """"classification" or "regression"; anything else (no predict(), a transformer...) is rejected."""
    from sklearn.base import is_classifier, is_regressor

    if not hasattr(est, "predict"):
        raise InvalidInputError(
            f"{where}: {describe_sklearn(est)} has no predict(); only classifiers and regressors convert"
        )
    if is_classifier(est):
        return "classification"
    if is_regressor(est):
        return "regression"
    raise InvalidInputError(
        f"{where}: {describe_sklearn(est)} is neither a classifier nor a regressor; "
        "edgeops converts classifiers and regressors"
    )


def _check_fitted(est: Any, where: Any) -> None:
    try:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(est)
    except Exception as exc:  # noqa: BLE001 - NotFittedError and friends
        raise InvalidInputError(f"{where}: {describe_sklearn(est)} is not fitted ({exc})") from None


def _sklearn_predict(est: Any, task: str) -> Callable[[np.ndarray], np.ndarray]:
    """Rows in, float64 outputs out: class probabilities for a classifier, a column for a regressor."""
    def predict(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32).reshape(len(X), -1)
        if task == "classification":
            return np.asarray(est.predict_proba(X), dtype=np.float64)
        return np.asarray(est.predict(X), dtype=np.float64).reshape(len(X), -1)

    return predict


def _keras_task(model: Any) -> str:
    out_shape = tuple(model.outputs[0].shape)
    if len(out_shape) == 2 and (out_shape[-1] or 1) > 1:
        return "classification"
    last = model.layers[-1] if model.layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    return "classification" if activation == "sigmoid" else "regression"


def split_normalization(model: Any) -> tuple[Any, dict] | None:
    """A Sequential model that starts with an adapted Normalization layer, as (rest of the model, {mean, std}).

    Full-integer int8 quantizes the model input with one scale for all
    features; with the standardisation inside the graph, raw features of very
    different ranges (Wine: 0.1 to 1680) lose the small ones. Moved out, the
    runtime standardises in float and int8 sees well-scaled inputs. Returns
    None when the model does not have that shape.
    """
    import keras

    layers = list(getattr(model, "layers", []))
    if not isinstance(model, keras.Sequential) or len(layers) < 2:
        return None
    first = layers[0]
    if not isinstance(first, keras.layers.Normalization) or getattr(first, "invert", False):
        return None
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 1 or shape[0] is None:
        return None
    stats = _adapted_mean_and_variance(first, shape[0])
    if stats is None:
        return None
    mean, var = stats
    std = np.maximum(np.sqrt(var), keras.backend.epsilon())  # what the layer divides by
    rest = keras.Sequential([keras.Input(shape)] + layers[1:], name=model.name)
    return rest, {"mean": mean.tolist(), "std": std.tolist()}


def _adapted_mean_and_variance(layer: Any, n: int) -> tuple[np.ndarray, np.ndarray] | None:
    """An adapted Normalization layer's mean and variance for ``n`` features; None when it is not adapted,
    or normalises along another axis."""
    try:
        mean = np.broadcast_to(np.asarray(layer.mean, dtype=np.float64).reshape(-1), (n,))
        var = np.broadcast_to(np.asarray(layer.variance, dtype=np.float64).reshape(-1), (n,))
    except (ValueError, TypeError, AttributeError):
        return None
    return mean, var


def from_keras(model: Any, file: Path | None = None, task: str | None = None,
               hoist_normalization: bool = False) -> SourceModel:
    """Wrap a Keras 3 model (single input, single output).

    With ``hoist_normalization``, a leading Normalization layer is taken out of
    the model (see :func:`split_normalization`) and reported in
    ``extra["normalization"]``; ``predict`` then takes standardised inputs.
    """
    import keras

    extra: dict = {}
    split = split_normalization(model) if hoist_normalization else None
    if split is not None:
        model, extra["normalization"] = split

    shape = _keras_input_shape(model, file or "source")
    return SourceModel(
        framework="keras",
        obj=model,
        predict=_keras_predict(model, shape),
        task=task or _keras_task(model),
        input_shape=shape,
        framework_version=keras.__version__,
        model_type=type(model).__name__,
        file=file,
        extra=extra,
    )


def _keras_input_shape(model: Any, where: Any) -> tuple[int, ...]:
    """The model's input shape without the batch; rejects several inputs/outputs and dynamic dimensions."""
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise InvalidInputError(
            f"{where}: the model has {len(model.inputs)} inputs and {len(model.outputs)} outputs; "
            "edgeops converts single-input, single-output Keras models"
        )
    shape = tuple(int(d) if d is not None else -1 for d in model.inputs[0].shape[1:])
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"{where}: input shape {shape} has a dynamic dimension besides the batch")
    return shape


def _keras_predict(model: Any, shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    def predict(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32).reshape((len(X),) + shape)
        out = np.asarray(model.predict(X, verbose=0, batch_size=256), dtype=np.float64)
        return out.reshape(len(X), -1)

    return predict


def from_saved_model(path: Path, task: str | None = None) -> SourceModel:
    """Wrap a TensorFlow SavedModel directory through its serving signature."""
    import tensorflow as tf

    loaded, sig = _serving_signature(path)
    inputs = sig.structured_input_signature[1]
    in_name, spec = next(iter(inputs.items()))
    shape = tuple(int(d) if d is not None else -1 for d in spec.shape[1:])
    predict = _signature_predict(sig, in_name, next(iter(sig.structured_outputs)), shape)
    probe = predict(np.zeros((1,) + shape, dtype=np.float32))
    detected = "classification" if probe.shape[-1] > 1 else "regression"
    return SourceModel(
        framework="tensorflow",
        obj=loaded,
        predict=predict,
        task=task or detected,
        input_shape=shape,
        framework_version=tf.__version__,
        model_type="SavedModel",
        file=path,
        extra={"saved_model_dir": path},
    )


def _serving_signature(path: Path) -> tuple[Any, Any]:
    """The loaded SavedModel and its single-input, single-output ``serving_default`` signature."""
    import tensorflow as tf

    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as exc:  # noqa: BLE001 - TF raises many types for a bad directory
        raise ModelFormatError(f"{path}: not a loadable SavedModel ({type(exc).__name__})") from None
    sig = loaded.signatures.get("serving_default")
    if sig is None:
        raise ModelFormatError(f"{path}: SavedModel has no 'serving_default' signature")
    if len(sig.structured_input_signature[1]) != 1 or len(sig.structured_outputs) != 1:
        raise InvalidInputError(f"{path}: edgeops converts single-input, single-output SavedModels")
    return loaded, sig


def _signature_predict(sig: Any, in_name: str, out_name: str,
                       shape: tuple[int, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """Run the signature on rows, 256 at a time."""
    import tensorflow as tf

    def predict(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32).reshape((len(X),) + shape)
        outs = []
        for i in range(0, len(X), 256):
            outs.append(sig(**{in_name: tf.constant(X[i:i + 256])})[out_name].numpy())
        return np.concatenate(outs).astype(np.float64).reshape(len(X), -1)

    return predict


def from_model_file(path: Path, fmt: str, task: str | None = None) -> SourceModel:
    """Wrap an existing .onnx or .tflite file, run by ONNX Runtime or LiteRT."""
    from convert.verify import ArtifactRunner

    runner = ArtifactRunner(path.read_bytes(), fmt, where=str(path))
    shape = tuple(runner.input_shape[1:])
    if any(d < 0 for d in shape):
        raise InvalidInputError(f"{path}: input shape {runner.input_shape} has a dynamic dimension besides the batch")
    probe = runner.run(np.zeros((1,) + shape, dtype=np.float32))
    detected = "classification" if probe.shape[-1] > 1 else "regression"
    return SourceModel(
        framework=fmt,
        obj=path.read_bytes(),
        predict=lambda X: runner.run(np.asarray(X, dtype=np.float32).reshape((len(X),) + shape)),
        task=task or detected,
        input_shape=shape,
        model_type=f"{fmt} file",
        file=path,
    )


def _from_object(source: Any, task: str | None, hoist_normalization: bool) -> SourceModel:
    module = type(source).__module__
    if module.startswith("keras") or hasattr(source, "layers") and hasattr(source, "inputs"):
        return from_keras(source, task=task, hoist_normalization=hoist_normalization)
    if module.startswith("sklearn") or hasattr(source, "get_params"):
        return from_sklearn(source, task=task)
    raise InvalidInputError(f"source: unsupported model object of type {type(source).__name__}")


def _from_keras_file(path: Path, task: str | None, hoist_normalization: bool) -> SourceModel:
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # noqa: BLE001 - Keras raises many types for a corrupt file
        raise ModelFormatError(
            f"{path}: not a loadable Keras model ({type(exc).__name__}: {str(exc)[:120]})"
        ) from None
    return from_keras(model, file=path, task=task, hoist_normalization=hoist_normalization)


def _from_pickle(path: Path, task: str | None, trust_pickle: bool) -> SourceModel:
    if not trust_pickle:
        raise InvalidInputError(
            f"{path}: loading a pickle runs arbitrary code; pass --trust-pickle if you trust this file, "
            "or save the model with skops"
        )
    import joblib

    try:
        est = joblib.load(path)
    except Exception as exc:  # noqa: BLE001 - unpickling raises anything
        raise ModelFormatError(f"{path}: not a readable pickle ({type(exc).__name__}: {str(exc)[:120]})") from None
    return from_sklearn(est, file=path, task=task)


def _from_skops(path: Path, task: str | None, trust_pickle: bool) -> SourceModel:
    import skops.io as sio

    try:
        untrusted = sio.get_untrusted_types(file=path)
    except Exception as exc:  # noqa: BLE001
        raise ModelFormatError(f"{path}: not a readable skops file ({type(exc).__name__})") from None
    # scikit-learn's and NumPy's own types are what an estimator is made of; anything else
    # (a custom transformer, an arbitrary callable) needs the user's explicit trust.
    foreign = [t for t in untrusted if not t.startswith(("sklearn.", "numpy."))]
    if foreign and not trust_pickle:
        raise InvalidInputError(
            f"{path}: the skops file holds types outside scikit-learn and NumPy ({', '.join(foreign[:5])}); "
            "pass --trust-pickle to load them"
        )
    return from_sklearn(sio.load(path, trusted=untrusted), file=path, task=task)


def _from_path(path: Path, trust_pickle: bool, task: str | None, hoist_normalization: bool) -> SourceModel:
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "saved_model.pb").exists():
            return from_saved_model(path, task)
        raise InvalidInputError(f"{path}: a directory, but not a TensorFlow SavedModel (no saved_model.pb)")
    return _from_file(path, trust_pickle, task, hoist_normalization)


def _from_file(path: Path, trust_pickle: bool, task: str | None, hoist_normalization: bool) -> SourceModel:
    """Load a model file with the loader its suffix names."""
    suffix = path.suffix.lower()
    loaders: dict[str, Callable[[], SourceModel]] = {
        ".keras": lambda: _from_keras_file(path, task, hoist_normalization),
        ".h5": lambda: _from_keras_file(path, task, hoist_normalization),
        ".skops": lambda: _from_skops(path, task, trust_pickle),
        ".onnx": lambda: from_model_file(path, "onnx", task),
        ".tflite": lambda: from_model_file(path, "tflite", task),
        **{s: (lambda: _from_pickle(path, task, trust_pickle)) for s in PICKLE_SUFFIXES},
    }
    if suffix in loaders:
        return loaders[suffix]()
    raise InvalidInputError(
        f"{path}: unsupported model file type {suffix or '(none)'}; expected .keras, .h5, a SavedModel directory, "
        ".joblib/.pkl (with --trust-pickle), .skops, .onnx or .tflite"
    )


def load_source(source: Any, trust_pickle: bool = False, task: str | None = None,
                hoist_normalization: bool = False) -> SourceModel:
    """Load SOURCE: a model object, a path to a .keras/.h5, SavedModel dir, .joblib/.pkl, .skops, .onnx or
    .tflite, or an MLflow model URI (models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) of the keras
    or sklearn flavor."""
    from convert.mlflow_io import is_mlflow_uri

    if is_mlflow_uri(source):
        from convert.mlflow_io import load_mlflow_source

        return load_mlflow_source(
            source, trust_pickle=trust_pickle, task=task, hoist_normalization=hoist_normalization
        )
    if not isinstance(source, (str, os.PathLike)):
        return _from_object(source, task, hoist_normalization)
    return _from_path(Path(source), trust_pickle, task, hoist_normalization)
