"""ONNX models through ONNX Runtime on the CPU."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from edge_runtime.backends import TensorInfo
from edge_runtime.errors import BackendUnavailableError, ModelFormatError

ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(int16)": "int16", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool", "tensor(string)": "string",
}


def _session_options(ort, threads: int | None):
    """Session options: errors only in the log; with threads, that many intra-op threads and one inter-op."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


class OnnxRuntimeBackend:
    """An ONNX Runtime session (CPUExecutionProvider, or the providers edge_runtime.accel chose)."""

    name = "onnxruntime"

    def __init__(self, data: bytes, where: str, threads: int | None, providers: list | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(f"ONNX Runtime is not installed (pip install onnxruntime): {exc}") from None
        self.version = ort.__version__
        self.threads = threads
        opts = _session_options(ort, threads)
        try:
            self._sess = ort.InferenceSession(data, opts, providers=providers or ["CPUExecutionProvider"])
            self.providers = self._sess.get_providers()
            self.inputs = [self._info(i) for i in self._sess.get_inputs()]
            self.outputs = [self._info(o) for o in self._sess.get_outputs()]
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph/... types
            text = " ".join(str(exc).split())[:200]
            raise ModelFormatError(f"{where}: ONNX Runtime cannot load it ({type(exc).__name__}: {text})") from None
        self._in_names = [i.name for i in self.inputs]
        self._out_names = [o.name for o in self.outputs]

    @staticmethod
    def _info(arg) -> TensorInfo:
        shape = tuple(int(d) if isinstance(d, int) else -1 for d in (arg.shape or []))
        return TensorInfo(arg.name, ORT_TYPES.get(arg.type, arg.type), shape, None)

    def prepared(self, feeds: Sequence[np.ndarray]) -> Callable[[], list[np.ndarray]]:
        """``run(feeds)`` as a call holding nothing but the session's run (what a benchmark times)."""
        self.run(feeds)
        run, names, feed = self._sess.run, self._out_names, dict(zip(self._in_names, feeds, strict=True))
        return lambda: run(names, feed)

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(feeds) != len(self._in_names):
            raise ValueError(f"expected {len(self._in_names)} inputs, got {len(feeds)}")
        return self._sess.run(self._out_names, dict(zip(self._in_names, feeds, strict=True)))
