"""The inference backends inside the emulated aarch64 device compute what they compute on the host.

Tiny models are made on the host (ONNX with the onnx helper API, TFLite with
TensorFlow's converter), run by ONNX Runtime and LiteRT on both sides, and
compared: int8 outputs exactly, float outputs within 1e-5.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.arm64

HERE = Path(__file__).resolve().parent


def _host_guest():
    spec = importlib.util.spec_from_file_location("arm64_guest", HERE / "guest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _onnx_float(path: Path, rng: np.random.Generator) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w1 = numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.normal(size=(32,)).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.normal(size=(32, 4)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.normal(size=(4,)).astype(np.float32), "b2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Tanh", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["h4"]),
        helper.make_node("Softmax", ["h4"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_float",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [w1, b1, w2, b2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _onnx_int8(path: Path, rng: np.random.Generator) -> Path:
    """float in -> QuantizeLinear -> QLinearMatMul (int8 weights) -> int8 out."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(3, np.int8), "x_zp"),
        numpy_helper.from_array(rng.integers(-127, 128, size=(16, 8)).astype(np.int8), "w"),
        numpy_helper.from_array(np.array(0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        numpy_helper.from_array(np.array(0.2, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(-5, np.int8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("QLinearMatMul", ["xq", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp"],
                         ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])],
        [helper.make_tensor_value_info("y", TensorProto.INT8, ["n", 8])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _tflite_pair(folder: Path, rng: np.random.Generator) -> tuple[Path, Path]:
    """A small CNN with random weights: float32 TFLite and full-integer int8 TFLite (int8 in and out)."""
    import tensorflow as tf

    tf.keras.utils.set_random_seed(3)
    model = tf.keras.Sequential([
        tf.keras.Input((8, 8, 1)),
        tf.keras.layers.Conv2D(8, 3, activation="relu", padding="same"),
        tf.keras.layers.DepthwiseConv2D(3, activation="relu"),
        tf.keras.layers.AveragePooling2D(2),
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(16, activation="relu"),
        tf.keras.layers.Dense(10),
    ])
    calibration = rng.random((64, 8, 8, 1), dtype=np.float32)

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    float_path = folder / "tiny.float.tflite"
    float_path.write_bytes(converter.convert())

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    int8_path = folder / "tiny.int8.tflite"
    int8_path.write_bytes(converter.convert())
    return float_path, int8_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-models")
    rng = np.random.default_rng(11)
    tflite_float, tflite_int8 = _tflite_pair(folder, rng)
    return {
        "onnx_float": _onnx_float(folder / "tiny.float.onnx", rng),
        "onnx_int8": _onnx_int8(folder / "tiny.int8.onnx", rng),
        "tflite_float": tflite_float,
        "tflite_int8": tflite_int8,
        "x_vec": rng.normal(size=(200, 16)).astype(np.float32),
        "x_img": rng.random((200, 8, 8, 1), dtype=np.float32),
        "x_img_int8": rng.integers(-128, 128, size=(200, 8, 8, 1)).astype(np.int8),
    }


def _host(kind: str, model: Path, x: np.ndarray) -> np.ndarray:
    guest = _host_guest()
    return {"onnx": guest.run_onnx, "tflite": guest.run_tflite}[kind]({"model": str(model)}, x)


def test_onnx_runtime_inside_matches_the_host_float_and_int8(guest, tiny):
    report = guest([
        {"kind": "onnx", "model": tiny["onnx_float"], "x": tiny["x_vec"]},
        {"kind": "onnx", "model": tiny["onnx_int8"], "x": tiny["x_vec"]},
    ])
    assert report["machine"] == "aarch64"
    assert report["forbidden"] == []
    y_float, y_int8 = (r["y"] for r in report["results"])

    host_float = _host("onnx", tiny["onnx_float"], tiny["x_vec"])
    assert y_float.dtype == np.float32 and y_float.shape == host_float.shape == (200, 4)
    np.testing.assert_allclose(y_float, host_float, rtol=0, atol=1e-5)

    host_int8 = _host("onnx", tiny["onnx_int8"], tiny["x_vec"])
    assert y_int8.dtype == np.int8 and y_int8.shape == host_int8.shape == (200, 8)
    assert len(np.unique(host_int8)) > 20, "the int8 model should use much of its range"
    np.testing.assert_array_equal(y_int8, host_int8)


def test_litert_inside_matches_the_host_float_and_int8(guest, tiny):
    report = guest([
        {"kind": "tflite", "model": tiny["tflite_float"], "x": tiny["x_img"]},
        {"kind": "tflite", "model": tiny["tflite_int8"], "x": tiny["x_img_int8"]},
    ])
    assert report["machine"] == "aarch64"
    assert report["forbidden"] == []
    y_float, y_int8 = (r["y"] for r in report["results"])

    host_float = _host("tflite", tiny["tflite_float"], tiny["x_img"])
    assert y_float.shape == host_float.shape == (200, 10)
    np.testing.assert_allclose(y_float, host_float, rtol=0, atol=1e-5)

    host_int8 = _host("tflite", tiny["tflite_int8"], tiny["x_img_int8"])
    assert y_int8.dtype == np.int8 and y_int8.shape == host_int8.shape == (200, 10)
    assert len(np.unique(host_int8)) > 10, "the int8 model should use much of its range"
    np.testing.assert_array_equal(y_int8, host_int8)
