"""Run a converted artifact next to its source and measure how far apart they are.

Conversion is checked, not trusted: every artifact runs in the interpreter a
device will use (LiteRT for TFLite, ONNX Runtime for ONNX) on holdout data,
and the figures go into the manifest's ``parity`` block.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_runtime.errors import ModelFormatError

_DTYPES = {
    "float32": np.float32, "float16": np.float16, "float64": np.float64, "int8": np.int8, "uint8": np.uint8,
    "int16": np.int16, "int32": np.int32, "int64": np.int64, "bool": np.bool_,
}
_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool", "tensor(string)": "string",
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int]
    quantization: dict | None

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": self.shape, "quantization": self.quantization}


def check_model_bytes(data: bytes, fmt: str, where: str) -> None:
    """Refuse bytes that are not a TFLite flatbuffer / ONNX model before an interpreter sees them."""
    check = _BYTES_CHECKS.get(fmt)
    if check is None:
        raise ModelFormatError(f"{where}: unknown model format {fmt!r}")
    check(data, where)


def _check_tflite_bytes(data: bytes, where: str) -> None:
    if len(data) < 16 or data[4:8] != b"TFL3":
        raise ModelFormatError(f"{where}: not a TFLite model (no TFL3 flatbuffer identifier)")
    root = int.from_bytes(data[0:4], "little")
    if root >= len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer")


def _check_onnx_bytes(data: bytes, where: str) -> None:
    import onnx

    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # noqa: BLE001 - protobuf DecodeError and friends
        raise ModelFormatError(f"{where}: not an ONNX model ({type(exc).__name__})") from None
    if not model.graph.node:
        raise ModelFormatError(f"{where}: ONNX model has an empty graph")


_BYTES_CHECKS = {"tflite": _check_tflite_bytes, "onnx": _check_onnx_bytes}


class ArtifactRunner:
    """Runs one artifact (bytes) on float batches, hiding int8 quantization."""

    def __init__(self, data: bytes, fmt: str, where: str = "artifact", threads: int = 1):
        check_model_bytes(data, fmt, where)
        self.fmt = fmt
        self.where = where
        if fmt == "tflite":
            self._load_tflite(data, where, threads)
        else:
            self._load_onnx(data, where, threads)

    def _load_tflite(self, data: bytes, where: str, threads: int) -> None:
        """A LiteRT interpreter for the flatbuffer, with its tensors allocated."""
        from ai_edge_litert.interpreter import Interpreter

        try:
            self._it = Interpreter(model_content=data, num_threads=threads)
            self._it.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelFormatError(f"{where}: LiteRT cannot load it ({exc})") from None
        self._in = self._it.get_input_details()
        self._out = self._it.get_output_details()
        if len(self._in) != 1:
            raise ModelFormatError(f"{where}: {len(self._in)} inputs; the converter checks single-input models")
        self._batch = int(self._in[0]["shape"][0])
        self.inputs = [self._spec(d) for d in self._in]
        self.outputs = [self._spec(d) for d in self._out]

    def _load_onnx(self, data: bytes, where: str, threads: int) -> None:
        """An ONNX Runtime CPU session for the graph."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        try:
            self._sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph types
            raise ModelFormatError(f"{where}: ONNX Runtime cannot load it ({str(exc)[:200]})") from None
        ins, outs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(ins) != 1:
            raise ModelFormatError(f"{where}: {len(ins)} inputs; the converter checks single-input models")
        self.inputs = [TensorSpec(i.name, _ORT_TYPES.get(i.type, i.type), _dims(i.shape), None) for i in ins]
        self.outputs = [TensorSpec(o.name, _ORT_TYPES.get(o.type, o.type), _dims(o.shape), None) for o in outs]

    @staticmethod
    def _spec(d: dict) -> TensorSpec:
        sig = d.get("shape_signature")
        shape = [int(x) for x in (sig if sig is not None and len(sig) else d["shape"])]
        scale, zp = d["quantization"]
        dtype = np.dtype(d["dtype"]).name
        quantized = scale and dtype in ("int8", "uint8", "int16")
        quant = {"scale": float(scale), "zero_point": int(zp)} if quantized else None
        return TensorSpec(d["name"], dtype, shape, quant)

    @property
    def input_shape(self) -> list[int]:
        return self.inputs[0].shape

    def run(self, X: np.ndarray) -> np.ndarray:
        """Outputs of the first output tensor on the float batch X, dequantized, as float64 (n, k)."""
        X = np.asarray(X, dtype=np.float32)
        if self.fmt == "onnx":
            spec = self.inputs[0]
            feed = X.astype(_DTYPES.get(spec.dtype, np.float32))
            out = self._sess.run([self.outputs[0].name], {spec.name: feed})[0]
            return np.asarray(out, dtype=np.float64).reshape(len(X), -1)
        return self._run_tflite(X)

    def _run_tflite(self, X: np.ndarray) -> np.ndarray:
        it, din, dout = self._it, self._in[0], self._out[0]
        if int(din["shape"][0]) != len(X):
            it.resize_tensor_input(din["index"], [len(X)] + list(din["shape"][1:]))
            it.allocate_tensors()
            self._in, self._out = it.get_input_details(), it.get_output_details()
            din, dout = self._in[0], self._out[0]
        it.set_tensor(din["index"], _to_input(X, din))
        it.invoke()
        out = _from_output(it.get_tensor(dout["index"]), dout)
        return np.asarray(out, dtype=np.float64).reshape(len(X), -1)


def _is_quantized(detail: dict) -> bool:
    scale, _ = detail["quantization"]
    return bool(np.dtype(detail["dtype"]) in (np.int8, np.uint8, np.int16) and scale)


def _to_input(X: np.ndarray, din: dict) -> np.ndarray:
    """Float rows in the input tensor's dtype: quantized (rounded, clipped) for an integer input."""
    if not _is_quantized(din):
        return X.astype(din["dtype"])
    scale, zp = din["quantization"]
    info = np.iinfo(din["dtype"])
    return np.clip(np.round(X / scale + zp), info.min, info.max).astype(din["dtype"])


def _from_output(out: np.ndarray, dout: dict) -> np.ndarray:
    """The output tensor's values, dequantized for an integer output."""
    if not _is_quantized(dout):
        return out
    scale, zp = dout["quantization"]
    return (out.astype(np.float64) - zp) * scale


def _dims(shape: list) -> list[int]:
    return [int(d) if isinstance(d, int) else -1 for d in shape]


def _as_proba(out: np.ndarray) -> np.ndarray:
    """A single sigmoid column becomes two class columns."""
    if out.shape[1] == 1:
        return np.hstack([1.0 - out, out])
    return out


def parity(source_out: np.ndarray, artifact_out: np.ndarray, y: np.ndarray | None, task: str,
           classes: list | None = None) -> dict:
    """Agreement of an artifact with its source on the same inputs, and each one's quality on labels y."""
    n = int(len(source_out))
    if task == "classification":
        ps, pa = _as_proba(source_out), _as_proba(artifact_out)
        ls, la = ps.argmax(axis=1), pa.argmax(axis=1)
        result = {
            "n_samples": n,
            "metric": "accuracy",
            "label_agreement": float((ls == la).mean()),
            "max_abs_prob_diff": float(np.abs(ps - pa).max()),
            "source_metric": None,
            "artifact_metric": None,
            "metric_drop_points": None,
        }
        if y is not None:
            yi = _label_indices(y, classes)
            s_acc, a_acc = float((ls == yi).mean()), float((la == yi).mean())
            result.update(source_metric=s_acc, artifact_metric=a_acc,
                          metric_drop_points=round((s_acc - a_acc) * 100, 4) + 0.0)
        return result
    s, a = source_out.ravel(), artifact_out.ravel()
    result = {"n_samples": n, "metric": "r2", "mae": float(np.abs(s - a).mean()), "source_metric": None,
              "artifact_metric": None, "metric_drop_points": None, "label_agreement": None, "max_abs_prob_diff": None}
    if y is not None:
        yv = np.asarray(y, dtype=np.float64).ravel()
        s_r2, a_r2 = _r2(yv, s), _r2(yv, a)
        result.update(source_metric=s_r2, artifact_metric=a_r2, metric_drop_points=round((s_r2 - a_r2) * 100, 4) + 0.0)
    return result


def _r2(y: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((y - pred) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
    return 1.0 - ss_res / ss_tot


def _label_indices(y: np.ndarray, classes: list | None) -> np.ndarray:
    y = np.asarray(y)
    if classes is None:
        return y.astype(np.int64)
    lookup = {str(c): i for i, c in enumerate(classes)}
    if y.dtype.kind not in "iu":
        return np.array([lookup.get(str(v), -1) for v in y])
    if all(str(v) in lookup for v in np.unique(y)):
        return np.array([lookup[str(v)] for v in y])
    return y.astype(np.int64)
