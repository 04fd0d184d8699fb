"""TFLite through LiteRT, tflite_runtime or an already-loaded tensorflow.lite."""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import numpy as np

from edge_runtime.backends import TensorInfo
from edge_runtime.errors import BackendUnavailableError, ModelFormatError


def _litert():
    try:
        import ai_edge_litert
        from ai_edge_litert.interpreter import Interpreter
    except ImportError as exc:
        raise BackendUnavailableError(f"LiteRT is not installed (pip install ai-edge-litert): {exc}") from None
    return Interpreter, "litert", getattr(ai_edge_litert, "__version__", "unknown")


def _tflite_runtime():
    if int(np.__version__.split(".")[0]) >= 2:
        # Its last wheels (2.14) were built against NumPy 1.x and fail to import under NumPy 2.
        raise BackendUnavailableError(
            f"tflite_runtime does not work with NumPy {np.__version__}; install ai-edge-litert instead "
            "(or NumPy<2 for tflite-runtime)"
        )
    try:
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
    except (ImportError, AttributeError) as exc:
        raise BackendUnavailableError(f"tflite_runtime is not usable: {exc}") from None
    return Interpreter, "tflite_runtime", getattr(tflite_runtime, "__version__", "unknown")


def _tensorflow_lite():
    # Importing TensorFlow costs seconds and hundreds of MB: use it only if the process already has.
    tf = sys.modules.get("tensorflow")
    if tf is None or not hasattr(tf, "lite"):
        raise BackendUnavailableError("tensorflow.lite is used only when TensorFlow is already imported")
    return tf.lite.Interpreter, "tensorflow.lite", tf.__version__


def tflite_candidates() -> list[tuple[str, Callable]]:
    return [("litert", _litert), ("tflite_runtime", _tflite_runtime), ("tensorflow.lite", _tensorflow_lite)]


def tflite_interpreter_class(prefer: str | None = None):
    """(Interpreter class, backend name, version) of the first usable TFLite interpreter."""
    candidates = tflite_candidates()
    if prefer:
        candidates.sort(key=lambda c: c[0] != prefer)
    reasons = []
    for _name, loader in candidates:
        try:
            return loader()
        except BackendUnavailableError as exc:
            reasons.append(str(exc))
    raise BackendUnavailableError("no TFLite interpreter is available: " + "; ".join(reasons))


def _reason(exc: Exception) -> str:
    """One line about an interpreter's exception, its type included (UnicodeDecodeError says little alone)."""
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# Interpreters kept per input shape: a device that alternates single samples with batches
# keeps both allocations instead of re-allocating the arena on every switch.
MAX_SHAPES = 4


class TFLiteBackend:
    """A TFLite interpreter with pre-computed tensor indices and one allocation per input shape.

    Resizing an interpreter re-plans its whole arena, so each distinct input
    shape gets its own interpreter (sharing the model bytes), up to
    ``MAX_SHAPES``; beyond that the least recently used one is resized.
    """

    def __init__(self, data: bytes, where: str, threads: int | None, cls, name: str, version: str,
                 interpreter_kwargs: Callable[[], dict] | None = None):
        self.name, self.version, self.threads = name, version, threads
        self._data = data  # the interpreters read from this buffer: keep it alive
        self._cls, self._where = cls, where
        # more Interpreter arguments per interpreter (delegates, op resolver: edge_runtime.accel)
        self._interpreter_kwargs = interpreter_kwargs
        self._it = self._new_interpreter()
        try:
            # a crafted file reaches these too: names that are not UTF-8, odd dtypes or quantization
            details_in = self._it.get_input_details()
            details_out = self._it.get_output_details()
            self.inputs = [self._info(d) for d in details_in]
            self.outputs = [self._info(d) for d in details_out]
        except Exception as exc:  # noqa: BLE001 - the interpreter raises whatever its bindings raise
            raise ModelFormatError(f"{where}: {name} cannot read its tensors ({_reason(exc)})") from None
        # tensor indices do not change when an input is resized
        self._in_idx = [d["index"] for d in details_in]
        self._out_idx = [d["index"] for d in details_out]
        self._shapes = tuple(tuple(int(x) for x in d["shape"]) for d in details_in)
        self._by_shape: dict[tuple, object] = {self._shapes: self._it}

    def _new_interpreter(self):
        try:
            it = self._cls(**self._kwargs())
            it.allocate_tensors()
        except Exception as exc:  # noqa: BLE001 - ValueError, RuntimeError, UnicodeDecodeError, ... from native code
            raise ModelFormatError(f"{self._where}: {self.name} cannot load it ({_reason(exc)})") from None
        return it

    def _kwargs(self) -> dict:
        """The Interpreter's arguments: the model, the threads, and what edge_runtime.accel adds."""
        kwargs = {"model_content": self._data}
        if self.threads:
            kwargs["num_threads"] = self.threads
        if self._interpreter_kwargs is not None:
            kwargs.update(self._interpreter_kwargs())
        return kwargs

    def _refresh(self) -> None:
        """Re-read the current interpreter's input shapes (after resizing it from outside)."""
        self._shapes = tuple(tuple(int(x) for x in d["shape"]) for d in self._it.get_input_details())
        self._by_shape = {k: v for k, v in self._by_shape.items() if v is not self._it}
        self._by_shape[self._shapes] = self._it

    @staticmethod
    def _info(d: dict) -> TensorInfo:
        sig = d.get("shape_signature")
        shape = tuple(int(x) for x in (sig if sig is not None and len(sig) else d["shape"]))
        dtype = np.dtype(d["dtype"]).name
        scale, zp = d["quantization"]
        quant = (float(scale), int(zp)) if scale and dtype in ("int8", "uint8", "int16") else None
        return TensorInfo(d["name"], dtype, shape, quant)

    def _switch(self, shapes: tuple) -> None:
        it = self._by_shape.pop(shapes, None)
        if it is None:
            it = self._spare_interpreter()
            for idx, shape in zip(self._in_idx, shapes, strict=True):
                it.resize_tensor_input(idx, list(shape))
            it.allocate_tensors()
        self._by_shape[shapes] = it  # most recently used last
        self._it, self._shapes = it, shapes

    def _spare_interpreter(self):
        """An interpreter for another shape: a new one, or past MAX_SHAPES the least recently used."""
        if len(self._by_shape) >= MAX_SHAPES:
            return self._by_shape.pop(next(iter(self._by_shape)))
        return self._new_interpreter()

    def prepared(self, feeds: Sequence[np.ndarray]) -> Callable[[], list[np.ndarray]]:
        """``run(feeds)`` as a call holding nothing but set_tensor, invoke and get_tensor (what a benchmark times)."""
        self.run(feeds)  # checks the feeds and allocates the interpreter for their shapes
        set_tensor, invoke, get_tensor = self._it.set_tensor, self._it.invoke, self._it.get_tensor
        pairs, outs = list(zip(self._in_idx, feeds, strict=True)), list(self._out_idx)

        def step() -> list[np.ndarray]:
            for idx, x in pairs:
                set_tensor(idx, x)
            invoke()
            return [get_tensor(idx) for idx in outs]

        return step

    def run(self, feeds: Sequence[np.ndarray]) -> list[np.ndarray]:
        if len(feeds) != len(self._in_idx):
            raise ValueError(f"expected {len(self._in_idx)} inputs, got {len(feeds)}")
        if len(feeds) == 1:
            shapes = (feeds[0].shape,)
        else:
            shapes = tuple(x.shape for x in feeds)
        if shapes != self._shapes:
            self._switch(shapes)
        it = self._it
        for idx, x in zip(self._in_idx, feeds, strict=True):
            it.set_tensor(idx, x)
        it.invoke()
        return [it.get_tensor(idx) for idx in self._out_idx]
