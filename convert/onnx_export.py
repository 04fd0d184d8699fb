"""To ONNX: scikit-learn through skl2onnx, Keras through tf2onnx, and ONNX quantization.

scikit-learn classifiers export their probabilities as a plain tensor (no
ZipMap), and only that output is kept, so every ONNX artifact has one output.
Keras 3 models go through a ``tf.function`` with an input signature, because
``tf2onnx.convert.from_keras`` fails on Keras 3.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from edge_runtime.errors import EdgeOpsError, InvalidInputError

ONNX_QUANTIZATIONS = ("none", "dynamic", "static")
FILE_NAMES = {"none": "model.onnx", "dynamic": "model.dynamic.onnx", "static": "model.int8.onnx"}
OPSET = 17


def _keep_single_output(model, wanted: str):
    """Drop every graph output but ``wanted`` (e.g. the label next to the probabilities)."""
    keep = [o for o in model.graph.output if o.name == wanted]
    if not keep:
        names = ", ".join(o.name for o in model.graph.output)
        raise EdgeOpsError(f"ONNX export: output {wanted!r} not found (outputs: {names})")
    del model.graph.output[:]
    model.graph.output.extend(keep)
    return model


def sklearn_to_onnx(source) -> bytes:
    """A fitted scikit-learn estimator or Pipeline as ONNX bytes (input 'input', float32, dynamic batch)."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    est = source.obj
    options = _skl2onnx_options(est, source.task)
    try:
        model = convert_sklearn(
            est,
            initial_types=[("input", FloatTensorType([None, int(source.input_shape[0])]))],
            options=options or None,
            target_opset={"": OPSET, "ai.onnx.ml": 3},
        )
    except Exception as exc:  # noqa: BLE001 - skl2onnx raises RuntimeError/NotImplementedError/...
        raise InvalidInputError(
            f"scikit-learn model {source.model_type} cannot be exported to ONNX by skl2onnx: {str(exc)[:200]}"
        ) from None
    names = [o.name for o in model.graph.output]
    wanted = "probabilities" if source.task == "classification" and "probabilities" in names else names[-1]
    return _keep_single_output(model, wanted).SerializeToString()


def _skl2onnx_options(est, task: str) -> dict:
    """skl2onnx options: plain probabilities (no ZipMap) for a classifier, exact scaling for StandardScaler."""
    final = est.steps[-1][1] if hasattr(est, "steps") else est
    options: dict = {id(final): {"zipmap": False}} if task == "classification" else {}
    # ONNX's Scaler multiplies by 1/std where scikit-learn subtracts and divides in float32; the
    # one-ulp differences flip tree splits on discrete features. 'div' emits Sub and Div, which match.
    for step in (s for _, s in getattr(est, "steps", [])):
        if type(step).__name__ == "StandardScaler":
            options[id(step)] = {"div": "div"}
    return options


def keras_to_onnx(source) -> bytes:
    """A Keras 3 model (or SavedModel) as ONNX bytes through tf2onnx."""
    import tf2onnx
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    from convert.tflite import quiet_native_stderr

    fn = _traced_function(source)
    with quiet_native_stderr() as log:
        try:
            # Freezing first turns captured variables and tensors (a Normalization layer's mean and
            # variance) into constants; otherwise they surface as extra graph inputs.
            frozen = convert_variables_to_constants_v2(fn.get_concrete_function())
            proto, _ = tf2onnx.convert.from_graph_def(
                frozen.graph.as_graph_def(),
                input_names=[t.name for t in frozen.inputs],
                output_names=[t.name for t in frozen.outputs],
                opset=OPSET,
            )
        except Exception as exc:  # noqa: BLE001
            detail = next((line for line in reversed(log) if "error" in line.lower()), str(exc))
            raise EdgeOpsError(f"ONNX export through tf2onnx failed: {detail[:300]}") from None
    _rename_io(proto, proto.graph.input[0].name, "input")
    _rename_io(proto, proto.graph.output[0].name, "output")
    return proto.SerializeToString()


def _traced_function(source):
    """The model (or the SavedModel's serving signature) as a tf.function taking one float batch "input"."""
    import tensorflow as tf

    spec = (tf.TensorSpec((None,) + tuple(source.input_shape), tf.float32, name="input"),)
    if source.framework == "tensorflow":
        sig = source.obj.signatures["serving_default"]
        in_name = next(iter(sig.structured_input_signature[1]))
        out_name = next(iter(sig.structured_outputs))
        return tf.function(lambda x: sig(**{in_name: x})[out_name], input_signature=spec)
    model = source.obj
    return tf.function(lambda x: model(x, training=False), input_signature=spec)


def quantize_onnx(data: bytes, mode: str, calibration: np.ndarray | None, input_name: str = "input",
                  max_calibration: int = 300) -> bytes:
    """ONNX Runtime quantization: ``dynamic`` (weights int8) or ``static`` (QDQ, calibrated)."""
    import logging

    import onnxruntime as ort

    root = logging.getLogger()
    saved_level = root.level
    root.setLevel(max(saved_level, logging.ERROR))  # the quantizer logs advice lines on the root logger
    ort.set_default_logger_severity(3)  # its calibration sessions warn about initializers they prune
    try:
        return _quantize(data, mode, calibration, input_name, max_calibration)
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - the quantizer raises whatever its graph passes hit
        raise EdgeOpsError(f"ONNX {mode} quantization failed: {type(exc).__name__}: {str(exc)[:200]}") from None
    finally:
        root.setLevel(saved_level)


def _quantize(data: bytes, mode: str, calibration: np.ndarray | None, input_name: str, max_calibration: int) -> bytes:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="edgeops-onnxq-") as tmp:
        src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
        elif mode == "static":
            _quantize_static(src, dst, calibration, input_name, max_calibration)
        else:
            raise InvalidInputError(f"unknown ONNX quantization {mode!r}")
        return dst.read_bytes()


def _quantize_static(src: Path, dst: Path, calibration: np.ndarray | None, input_name: str,
                     max_calibration: int) -> None:
    """QDQ int8 quantization calibrated on up to ``max_calibration`` rows."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if calibration is None or len(calibration) == 0:
        raise InvalidInputError("static ONNX quantization needs calibration data")
    rows = np.asarray(calibration, dtype=np.float32)[:max_calibration]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(rows)

        def get_next(self):
            row = next(self._it, None)
            return None if row is None else {input_name: row[None, ...]}

    quantize_static(
        str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=False,
    )


QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
                 "QLinearMatMul", "QLinearConv", "DynamicQuantizeMatMul"}


def is_quantized(data: bytes) -> bool:
    """Whether the quantizer changed anything: models made of ai.onnx.ml operators (LinearClassifier,
    TreeEnsemble, Scaler) have nothing ONNX Runtime can quantize and come back as float models."""
    import onnx

    model = onnx.load_from_string(data)
    return any(n.op_type in QUANTIZED_OPS for n in model.graph.node)


def is_tree_model(data: bytes) -> bool:
    """Tree ensembles (ai.onnx.ml TreeEnsemble*) have no weights int8 quantization could shrink."""
    import onnx

    model = onnx.load_from_string(data)
    return any(n.op_type.startswith("TreeEnsemble") for n in model.graph.node)


def _rename_io(model, old: str, new: str) -> None:
    """Give a graph input/output a plain name (tf2onnx keeps TensorFlow's ':0' suffixes)."""
    if old == new:
        return
    for value in list(model.graph.input) + list(model.graph.output):
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        _rename_in(node.input, old, new)
        _rename_in(node.output, old, new)


def _rename_in(names, old: str, new: str) -> None:
    """Replace ``old`` by ``new`` in a node's list of input (or output) names."""
    for i, name in enumerate(names):
        if name == old:
            names[i] = new
