"""The reference models: what the project converts, tests and demonstrates on.

Breast Cancer and Wine get a Keras MLP on standardised features (the bundle
records the standardisation and the runtime applies it, so callers pass raw
features and int8 quantizes well-scaled values), Digits gets a small Keras CNN on 8x8x1
images (pixels / 16), and each data set gets a scikit-learn
Pipeline(StandardScaler, RandomForestClassifier). Splits and seeds are fixed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

DATASETS = ("breast_cancer", "wine", "digits")
SEED = 7
TEST_SIZE = 0.3


@dataclass(frozen=True)
class ReferenceData:
    """A data set split for training, calibration and holdout checks."""

    name: str
    X_train: np.ndarray
    X_test: np.ndarray
    y_train: np.ndarray
    y_test: np.ndarray
    feature_names: list[str]
    labels: list[str]

    def __iter__(self):
        """Unpacks as (X_train, X_test, y_train, y_test, feature_names, labels)."""
        return iter((self.X_train, self.X_test, self.y_train, self.y_test, self.feature_names, self.labels))

    def __getitem__(self, i: int):
        return tuple(self)[i]

    def __len__(self) -> int:
        return 6


def load_reference_data(name: str) -> ReferenceData:
    """One of scikit-learn's bundled data sets, split 70/30 stratified with a fixed seed."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    loaders = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine, "digits": datasets.load_digits}
    if name not in loaders:
        raise ValueError(f"unknown data set {name!r}; choose from {', '.join(DATASETS)}")
    ds = loaders[name]()
    X = ds.data.astype(np.float32)
    y = ds.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=TEST_SIZE, random_state=SEED, stratify=y)
    names = [str(n) for n in ds.feature_names]
    labels = [str(n) for n in ds.target_names]
    return ReferenceData(name, X_tr, X_te, y_tr, y_te, names, labels)


def digits_images(X: np.ndarray) -> np.ndarray:
    """Digits rows (64 pixels, 0..16) as the CNN's (n, 8, 8, 1) inputs in 0..1."""
    return (X / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)


def _seed() -> None:
    import keras

    os.environ.setdefault("TF_DETERMINISTIC_OPS", "1")
    keras.utils.set_random_seed(SEED)


def standardisation(data: ReferenceData) -> dict:
    """Per-feature mean and std of the training data: the bundle's input normalization."""
    std = data.X_train.std(axis=0)
    return {"mean": data.X_train.mean(axis=0).tolist(), "std": np.where(std > 0, std, 1.0).tolist()}


def train_keras_mlp(data: ReferenceData, hidden: int = 384, epochs: int = 40):
    """A Keras MLP on standardised features (see :func:`standardisation`)."""
    import keras

    _seed()
    norm = standardisation(data)
    Xs = (data.X_train - np.asarray(norm["mean"], np.float32)) / np.asarray(norm["std"], np.float32)
    model = keras.Sequential([
        keras.Input((data.X_train.shape[1],), name="features"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(hidden, activation="relu"),
        keras.layers.Dense(len(data.labels), activation="softmax"),
    ], name=f"{data.name}_mlp")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(Xs, data.y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def train_keras_cnn(data: ReferenceData, epochs: int = 25):
    """A small Keras CNN on the 8x8x1 Digits images."""
    import keras

    _seed()
    model = keras.Sequential([
        keras.Input((8, 8, 1), name="image"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(2),
        keras.layers.Flatten(),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(len(data.labels), activation="softmax"),
    ], name="digits_cnn")
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(digits_images(data.X_train), data.y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def train_random_forest(data: ReferenceData, n_estimators: int = 60):
    """Pipeline(StandardScaler, RandomForestClassifier), single-threaded so timings are honest."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = Pipeline([
        ("scale", StandardScaler()),
        ("forest", RandomForestClassifier(n_estimators=n_estimators, max_depth=12, random_state=SEED, n_jobs=1)),
    ])
    pipe.fit(data.X_train, data.y_train)
    return pipe


def convert_reference(kind: str, dataset: str, out_dir, quantize=None, formats=("tflite", "onnx"), **kwargs):
    """Train one reference model and convert it into a bundle at ``out_dir``.

    Args:
        kind: "mlp" (Keras, breast_cancer/wine/digits), "cnn" (Keras, digits) or "rf" (scikit-learn).
        dataset: one of DATASETS.
        out_dir: bundle directory.
        quantize: quantizations (default: none, float16, dynamic, int8).
        formats: artifact formats.
        kwargs: passed on to convert.to_bundle (version, sign_key, force, ...).

    Returns:
        (ConversionResult, ReferenceData)
    """
    from convert.api import to_bundle

    data = load_reference_data(dataset)
    quantize = quantize or ("none", "float16", "dynamic", "int8")
    name = kwargs.pop("name", f"{dataset.replace('_', '-')}-{kind}")
    if kind == "cnn":
        if dataset != "digits":
            raise ValueError("the CNN reference model is for digits")
        model = train_keras_cnn(data)
        X_tr, X_te = digits_images(data.X_train), digits_images(data.X_test)
        result = to_bundle(model, out_dir, name=name, formats=formats, quantize=quantize, calibration=X_tr,
                           holdout=(X_te, data.y_test), labels=data.labels,
                           image={"scale": 1.0 / 16.0, "source_range": [0.0, 16.0]}, **kwargs)
    elif kind == "mlp":
        model = train_keras_mlp(data)
        result = to_bundle(model, out_dir, name=name, formats=formats, quantize=quantize, calibration=data.X_train,
                           holdout=(data.X_test, data.y_test), labels=data.labels, feature_names=data.feature_names,
                           normalization=standardisation(data), **kwargs)
    elif kind == "rf":
        model = train_random_forest(data)
        result = to_bundle(model, out_dir, name=name, formats=("onnx",), quantize=quantize, calibration=data.X_train,
                           holdout=(data.X_test, data.y_test), labels=data.labels, feature_names=data.feature_names,
                           **kwargs)
    else:
        raise ValueError(f"unknown reference model kind {kind!r}: mlp, cnn or rf")
    return result, data
