"""The `edgeops` MLflow flavor's loader: a registered bundle as an MLflow `python_function` model.

`edgeops convert ... --register` logs a bundle with this module as its
pyfunc ``loader_module``, so ``mlflow.pyfunc.load_model("models:/NAME-edge/1")``
runs the bundle through :func:`edge_runtime.load`: LiteRT or ONNX Runtime,
never TensorFlow, Keras or scikit-learn. MLflow itself is never imported here;
MLflow imports this module and calls :func:`_load_pyfunc`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

import edge_runtime

FLAVOR_NAME = "edgeops"


class EdgeBundleModel:
    """What ``mlflow.pyfunc.load_model`` wraps: a loaded bundle with MLflow's ``predict(model_input, params)``.

    Attributes:
        model: the :class:`edge_runtime.model.EdgeModel` that runs the bundle.
    """

    def __init__(self, model: Any):
        self.model = model

    def predict(self, model_input: Any, params: dict | None = None) -> np.ndarray:
        """The bundle's outputs (probabilities or values, float32, one row per input row).

        Args:
            model_input: a pandas DataFrame (its columns in the bundle's feature order), a NumPy array or a
                list of rows.
            params: MLflow inference parameters (none are used).
        """
        x = model_input.to_numpy(dtype=np.float32) if hasattr(model_input, "to_numpy") else model_input
        x = np.asarray(x, dtype=np.float32)
        return self.model.predict(x.reshape(1, -1) if x.ndim == 1 else x)

    def get_raw_model(self) -> Any:
        """The underlying :class:`edge_runtime.model.EdgeModel` (MLflow's ``unwrap_python_model`` asks for it)."""
        return self.model


def _load_pyfunc(data_path: str, model_config: dict | None = None) -> EdgeBundleModel:
    """Called by ``mlflow.pyfunc.load_model`` with the local path of the logged bundle folder.

    ``model_config`` may name an ``artifact`` of the bundle, ``threads`` and a trusted ``public_key``.
    """
    config = model_config or {}
    return EdgeBundleModel(edge_runtime.load(
        Path(data_path), artifact=config.get("artifact"), threads=config.get("threads"),
        public_key=config.get("public_key"),
    ))
