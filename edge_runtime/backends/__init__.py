"""Inference backends behind one narrow interface.

``open_backend(path)`` picks the interpreter for a model file: LiteRT
(``ai_edge_litert``) first for TFLite, then ``tflite_runtime`` (older Pis),
then ``tensorflow.lite`` only if TensorFlow is already loaded; ONNX Runtime
for ONNX. Every backend exposes the same small surface (:class:`Backend`):
tensor descriptions and ``run(feeds) -> outputs`` on raw tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from edge_runtime.errors import BackendUnavailableError, ModelFormatError
from edge_runtime.modelcheck import check_model_bytes


@dataclass(frozen=True)
class TensorInfo:
    """One input or output tensor.

    Attributes:
        name: tensor name.
        dtype: numpy dtype name (float32, int8, int64, ...).
        shape: dimensions, -1 where dynamic (the batch dimension usually is).
        quantization: (scale, zero_point) for quantized integer tensors, else None.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    quantization: tuple[float, int] | None = None

    def to_dict(self) -> dict:
        q = {"scale": self.quantization[0], "zero_point": self.quantization[1]} if self.quantization else None
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "quantization": q}


class Backend(Protocol):
    """What every backend offers."""

    name: str
    version: str
    threads: int | None
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Run on raw input tensors (model dtypes, in ``inputs`` order); returns raw outputs."""
        ...


def open_backend(
    model: str | Path | bytes,
    format: str | None = None,
    threads: int | None = None,
    prefer: str | None = None,
    accel=None,
) -> Backend:
    """Open a model file (or its bytes) with the best available backend.

    Args:
        model: path to a .tflite/.onnx file, or the model's bytes.
        format: "tflite" or "onnx" (default: from the file's suffix or contents).
        threads: intra-op threads (None: the backend's default).
        prefer: a backend name to use first ("litert", "tflite_runtime", "tensorflow.lite", "onnxruntime").
        accel: an ``edge_runtime.accel.Acceleration`` (delegate, providers, XNNPACK); the backend's
            ``accel`` attribute then reports what runs and why anything asked for does not.

    Raises:
        ModelFormatError: the file is not a valid model.
        BackendUnavailableError: no installed backend runs this format.
        AcceleratorError: with ``accel.require``, a delegate or provider that does not load.
    """
    data, where, hint = _model_bytes(model, format)
    fmt = check_model_bytes(data, where, hint=hint)
    if fmt == "onnx":
        return _open_onnx(data, where, threads, accel)
    from edge_runtime.backends.tflite import TFLiteBackend, tflite_interpreter_class

    cls, name, version = tflite_interpreter_class(prefer)
    if accel is not None:
        from edge_runtime.accel import open_tflite

        return open_tflite(data, where, threads, (cls, name, version), accel)
    return TFLiteBackend(data, where, threads, cls, name, version)


def _model_bytes(model: str | Path | bytes, format: str | None) -> tuple[bytes, str, str]:
    """(the model's bytes, what to call it in messages, the format hint: ".tflite", ".onnx" or "")."""
    if isinstance(model, (bytes, bytearray)):
        return bytes(model), "model bytes", f".{format}" if format else ""
    p = Path(model)
    if not p.is_file():
        raise ModelFormatError(f"{p}: no such model file")
    return p.read_bytes(), str(p), f".{format}" if format else p.suffix.lower()


def _open_onnx(data: bytes, where: str, threads: int | None, accel) -> Backend:
    from edge_runtime.backends.onnx import OnnxRuntimeBackend

    if accel is not None:
        from edge_runtime.accel import open_onnx

        return open_onnx(data, where, threads, accel)
    return OnnxRuntimeBackend(data, where, threads)


def available_backends() -> dict[str, str | None]:
    """Installed backends and their versions (None where not importable), without loading TensorFlow."""
    from edge_runtime.backends.tflite import tflite_candidates

    found: dict[str, str | None] = {}
    for name, loader in tflite_candidates():
        try:
            found[name] = loader()[2]
        except BackendUnavailableError:
            found[name] = None
    try:
        import onnxruntime

        found["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        found["onnxruntime"] = None
    return found


__all__ = ["Backend", "TensorInfo", "open_backend", "available_backends", "BackendUnavailableError"]
