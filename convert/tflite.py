"""Keras / SavedModel to TFLite: float32, float16, dynamic-range, full int8 and int16x8.

Full-integer int8 takes int8 inputs and outputs and is calibrated on a
representative sample; int16x8 (16-bit activations, 8-bit weights) is LiteRT's
documented rescue for models whose accuracy collapses under int8.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from typing import Iterator

import numpy as np

from edge_runtime.errors import EdgeOpsError, InvalidInputError

TFLITE_QUANTIZATIONS = ("none", "float16", "dynamic", "int8", "int16x8")
FILE_NAMES = {
    "none": "model.tflite",
    "float16": "model.float16.tflite",
    "dynamic": "model.dynamic.tflite",
    "int8": "model.int8.tflite",
    "int16x8": "model.int16x8.tflite",
}


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[list[str]]:
    """Swallow what TensorFlow and its converters print (fd 1 and 2); keep it for error messages."""
    captured: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            captured.extend(tmp.read().decode("utf-8", "replace").splitlines())


def _converter(source):
    import tensorflow as tf

    if source.framework == "tensorflow":
        return tf.lite.TFLiteConverter.from_saved_model(str(source.extra["saved_model_dir"]))
    return tf.lite.TFLiteConverter.from_keras_model(source.obj)


def to_tflite(source, quantization: str, calibration: np.ndarray | None, max_calibration: int = 300) -> bytes:
    """Convert a Keras or SavedModel source to TFLite bytes with the given quantization."""
    import tensorflow as tf

    if quantization not in TFLITE_QUANTIZATIONS:
        raise InvalidInputError(f"unknown TFLite quantization {quantization!r}; "
                                f"choose from {', '.join(TFLITE_QUANTIZATIONS)}")
    conv = _converter(source)
    if quantization == "float16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif quantization == "dynamic":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    elif quantization in ("int8", "int16x8"):
        _set_full_integer(conv, quantization, source, calibration, max_calibration)
    return _run_converter(conv, quantization)


def _set_full_integer(conv, quantization: str, source, calibration: np.ndarray | None, max_calibration: int) -> None:
    """Set up int8 or int16x8 quantization, calibrated on up to ``max_calibration`` rows."""
    import tensorflow as tf

    if calibration is None or len(calibration) == 0:
        raise InvalidInputError(
            f"{quantization} quantization needs calibration data (--calibration FILE, or holdout/training data)"
        )
    sample = np.asarray(calibration, dtype=np.float32)[:max_calibration]
    shape = (1,) + tuple(source.input_shape)

    def representative():
        for row in sample:
            yield [row.reshape(shape)]

    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    if quantization == "int8":
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    else:
        conv.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]


def _run_converter(conv, quantization: str) -> bytes:
    """The converted flatbuffer; a conversion error names the converter's own error line."""
    with quiet_native_stderr() as log, warnings.catch_warnings():
        # int8 conversion warns that input statistics were not given: calibration provides them.
        warnings.simplefilter("ignore", UserWarning)
        try:
            return conv.convert()
        except Exception as exc:  # noqa: BLE001 - the converter raises ConverterError and many others
            detail = next((line for line in reversed(log) if "error" in line.lower()), str(exc))
            raise EdgeOpsError(f"TFLite {quantization} conversion failed: {detail[:300]}") from None
