"""EdgeModel: a bundle or model file, loaded and ready to predict on floats."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends import Backend, TensorInfo, open_backend
from edge_runtime.bundle import Bundle, open_bundle
from edge_runtime.errors import BackendUnavailableError, BundleError, InvalidInputError
from edge_runtime.input_check import NAN_POLICIES, InputSpec, as_batch
from edge_runtime.window import WindowRecorder

log = logging.getLogger("edgeops.runtime")

_perf = time.perf_counter


def _check_model_args(backend: Backend, path: Path, nan_policy: str) -> None:
    """ValueError for an unknown NaN policy, InvalidInputError for a model with more than one input."""
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}")
    if len(backend.inputs) != 1:
        raise InvalidInputError(
            f"{path}: the model has {len(backend.inputs)} inputs; EdgeModel runs single-input models "
            "(edgeops bench runs any model)"
        )


def _is_image_list(x: Any, is_image_like) -> bool:
    """A non-empty list or tuple whose first item is an image (a path or a PIL image)."""
    return isinstance(x, (list, tuple)) and bool(x) and is_image_like(x[0])


def _quantization(tensor: TensorInfo) -> tuple | None:
    """The (scale, zero point) of an integer tensor, None for a float one."""
    return tensor.quantization if tensor.dtype in ("int8", "uint8", "int16") else None


def _input_spec(inp: TensorInfo, schema: dict) -> InputSpec:
    """What a caller's input must look like: the manifest's input schema, else the model's input tensor."""
    shape = tuple(schema.get("shape") or [d for d in inp.shape[1:]])
    norm = schema.get("normalization")
    mean = std = None
    if norm:
        mean = np.asarray(norm["mean"], dtype=np.float32)
        # a constant training column has std 0: leave it unscaled rather than divide by zero
        std = np.asarray(norm["std"], dtype=np.float32)
        std = np.where(std > 0, std, np.float32(1.0))
    return InputSpec(
        name=inp.name,
        shape=tuple(int(d) for d in shape),
        features=tuple(schema["features"]) if schema.get("features") else None,
        mean=mean,
        std=std,
    )


class EdgeModel:
    """A loaded model. Callers pass floats and get floats; int8 quantization is hidden.

    Attributes:
        backend: the inference backend (name, version, threads, raw tensors).
        manifest: the bundle's manifest (None for a bare model file).
        artifact: the manifest entry of the artifact in use (None for a bare file).
        path: the artifact's file.
        task: "classification", "regression" or None (bare file: unknown).
        labels: class labels, when known.
    """

    def __init__(self, backend: Backend, path: Path, bundle: Bundle | None = None,
                 artifact: dict | None = None, nan_policy: str = "reject"):
        _check_model_args(backend, path, nan_policy)
        self.backend = backend
        self.path = path
        self.bundle = bundle
        self.manifest = bundle.manifest if bundle else None
        self.artifact = artifact
        self.nan_policy = nan_policy
        self.task = self.manifest["task"] if self.manifest else None
        self.labels = self.manifest.get("labels") if self.manifest else None
        inp = backend.inputs[0]
        schema = (self.manifest or {}).get("input_schema") or {}
        self.input_spec = _input_spec(inp, schema)
        self._in_q = _quantization(inp)
        self._in_dtype = np.dtype(inp.dtype)
        self._affine = None
        if self._in_q is not None:
            self._set_input_quantization()
        self._out_q = _quantization(backend.outputs[0])
        self._run = backend.run
        self._image = schema.get("image") if schema.get("kind") == "image" else None
        self.recorder: WindowRecorder | None = None

    def _set_input_quantization(self) -> None:
        """The integer input's range, and standardisation and quantization folded into one multiply-add."""
        info = np.iinfo(self._in_dtype)
        self._in_lo, self._in_hi = float(info.min), float(info.max)
        if self.input_spec.mean is not None:
            scale, zp = self._in_q
            a = (1.0 / (self.input_spec.std.astype(np.float64) * scale))
            b = zp - self.input_spec.mean.astype(np.float64) * a
            self._affine = (a.astype(np.float32), b.astype(np.float32))

    def _images_to_array(self, x: Any) -> Any:
        from edge_runtime.preprocess import image_to_array, is_image_like

        if is_image_like(x):
            return image_to_array(x, self._image)
        if _is_image_list(x, is_image_like):
            return np.stack([image_to_array(i, self._image) for i in x])
        return x

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.backend.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.backend.outputs

    def _to_model(self, batch: np.ndarray) -> np.ndarray:
        """Caller floats to the model's input tensor: standardise, then quantize or cast.

        The same float32 operations as :func:`validation.quantize` (so results match the
        conversion's parity figures bit for bit), done in place to save allocations.
        """
        spec = self.input_spec
        q = self._in_q
        if self._affine is not None:
            # standardise and quantize in one multiply-add (inputs are continuous features here)
            x = batch * self._affine[0]
            x += self._affine[1]
            q = (1.0, 0)
        elif spec.mean is not None:
            x = batch - spec.mean
            x /= spec.std
        elif q is not None:
            x = batch / q[0]
            q = (1.0, q[1])
        else:
            return batch if batch.dtype == self._in_dtype else batch.astype(self._in_dtype)
        if q is None:
            return x if x.dtype == self._in_dtype else x.astype(self._in_dtype)
        if q[0] != 1.0:
            x /= q[0]
        if q[1]:
            x += q[1]
        np.rint(x, out=x)
        np.maximum(x, self._in_lo, out=x)
        np.minimum(x, self._in_hi, out=x)
        return x.astype(self._in_dtype)

    def predict(self, x: Any) -> np.ndarray:
        """Outputs for one sample (returns one row) or a batch: probabilities or values, float32.

        Raises:
            InvalidInputError: the input does not fit the model (message names what was expected).
        """
        t0 = _perf()
        rec = self.recorder
        if not isinstance(x, np.ndarray) and self._image is not None:
            x = self._images_to_array(x)
        batch, single = self._checked_batch(x, rec)
        out = self._to_floats(self._infer(batch, rec), len(batch))
        if rec is not None:
            rec.record(batch, (_perf() - t0) * 1000.0, out)
        return out[0] if single else out

    def _checked_batch(self, x: Any, rec: WindowRecorder | None) -> tuple[np.ndarray, bool]:
        """The input as a float32 batch; a rejected input is counted in telemetry before the error goes up."""
        try:
            return as_batch(x, self.input_spec, self.nan_policy)
        except InvalidInputError as exc:
            if rec is not None:
                rec.record_error(rejected=True, reason=exc.reason)
            raise

    def _infer(self, batch: np.ndarray, rec: WindowRecorder | None) -> np.ndarray:
        """The model's raw first output for the batch; a failed inference is counted and reported as bad input."""
        try:
            return self._run([self._to_model(batch)])[0]
        except Exception as exc:
            if rec is not None:
                rec.record_error(len(batch))
            raise InvalidInputError(f"input {self.input_spec.name!r}: inference failed ({str(exc)[:200]})") from None

    def _to_floats(self, raw: np.ndarray, n: int) -> np.ndarray:
        """The model's output tensor as float32 rows, one per sample: dequantized when the output is integer."""
        if self._out_q is not None:
            out = raw.astype(np.float32)
            out -= self._out_q[1]
            out *= self._out_q[0]
        else:
            out = raw if raw.dtype == np.float32 else raw.astype(np.float32)
        return out.reshape(n, -1) if out.ndim != 2 else out

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities (a single sigmoid column becomes two columns)."""
        if self.task == "regression":
            raise InvalidInputError(f"{self.path}: a regression model has no class probabilities")
        out = self.predict(x)
        two_d = out.reshape(-1, out.shape[-1])
        if two_d.shape[1] == 1:
            two_d = np.hstack([1.0 - two_d, two_d])
        return two_d[0] if out.ndim == 1 else two_d

    def predict_labels(self, x: Any) -> np.ndarray:
        """Predicted class labels (strings from the manifest, or class indices as strings)."""
        proba = self.predict_proba(x)
        idx = proba.reshape(-1, proba.shape[-1]).argmax(axis=1)
        labels = self.labels or [str(i) for i in range(proba.shape[-1])]
        result = np.array([labels[i] for i in idx])
        return result[0] if proba.ndim == 1 else result

    def self_test(self) -> float:
        """Run the manifest's test vectors for this artifact; returns the largest difference.

        This is the health check a device runs before it switches to a new bundle.

        Raises:
            QualityCheckError: an output differs from the expected one by more than the vector's atol.
        """
        from edge_runtime.errors import QualityCheckError

        worst = self.check_test_vectors()
        if worst is None:
            raise QualityCheckError(f"{self.path.name}: the manifest has no test vectors for this artifact")
        return worst

    def check_test_vectors(self) -> float | None:
        """Run the manifest's test vectors for this artifact, if it has any; the largest difference or None.

        Samples run one at a time, the shape a device runs, so no extra interpreter is allocated.

        Raises:
            QualityCheckError: an output is not finite or differs by more than the vector's atol.
        """
        from edge_runtime.errors import QualityCheckError

        vectors = self._own_test_vectors()
        if not vectors:
            return None
        worst = 0.0
        saved, self.recorder = self.recorder, None
        try:
            for v in vectors:
                worst = max(worst, self._check_vector(v))
        except (ValueError, TypeError, KeyError) as exc:
            raise QualityCheckError(f"{self.path.name}: the manifest's test vectors do not fit the model ({exc})") \
                from None
        finally:
            self.recorder = saved
        return worst

    def _own_test_vectors(self) -> list[dict]:
        """The manifest's test vectors of the artifact in use."""
        return [v for v in (self.manifest or {}).get("test_vectors", []) if v.get("artifact") == self.path.name]

    def _check_vector(self, v: dict) -> float:
        """Run one test vector a sample at a time; its largest difference (inf for non-finite outputs).

        Raises:
            QualityCheckError: the difference is over the vector's atol.
        """
        from edge_runtime.errors import QualityCheckError

        inputs = np.asarray(v["inputs"], dtype=np.float32)
        got = np.stack([self.predict(row[None]) for row in inputs]).reshape(len(inputs), -1)
        want = np.asarray(v["expected"], dtype=np.float32).reshape(got.shape)
        atol = float(v.get("atol", 1e-4))
        diff = float(np.abs(got - want).max()) if np.isfinite(got).all() else float("inf")
        if not diff <= atol:
            what = "non-finite outputs" if diff == float("inf") else f"output differs by {diff:.3g}"
            raise QualityCheckError(
                f"{self.path.name}: test vector {what} (allowed {atol:.3g}): the artifact does not compute "
                "what was converted (verify_vectors=False / --skip-test-vectors loads it anyway)"
            )
        return diff

    def start_recording(self, window_seconds: float | None = 10.0, window_size: int | None = None,
                        variant: str | None = None) -> WindowRecorder:
        """From now on every predict feeds telemetry windows; returns the recorder."""
        profile = (self.manifest or {}).get("reference_profile") or {}
        feats = profile.get("features")
        edges, monitored = self._monitored_inputs(profile)
        out_stats = profile.get("output_stats") or {}
        ranges = [(f.get("min"), f.get("max")) for f in feats] if feats else None
        self.recorder = WindowRecorder(self._window_model_info(variant), edges, monitored, self._n_classes(),
                                       out_stats.get("bin_edges"), window_seconds=window_seconds,
                                       window_size=window_size, ranges=ranges)
        return self.recorder

    def _window_model_info(self, variant: str | None) -> dict:
        """The ``model`` block of each telemetry window: name, version, artifact, sha256, variant."""
        m = self.manifest or {}
        return {
            "name": m.get("name", self.path.stem),
            "version": m.get("version", "0.0.0"),
            "artifact": self.path.name,
            "sha256": (self.artifact or {}).get("sha256"),
            "variant": variant,
        }

    def _monitored_inputs(self, profile: dict) -> tuple[list, str]:
        """(bin edges per monitored input, what they are): the reference profile's features, else the
        image channels, else the input values (none past 1024 of them)."""
        feats = profile.get("features")
        if feats:
            return [f["bin_edges"] for f in feats], profile.get("monitored", "features")
        if len(self.input_spec.shape) == 3:
            return [[] for _ in range(self.input_spec.shape[-1])], "channels"
        n = self.input_spec.n_values
        return ([[] for _ in range(n)] if n <= 1024 else []), "features"

    def _n_classes(self) -> int | None:
        """The number of classes telemetry counts, None for a regression (or a single-output bare file)."""
        if self.task == "classification" or (self.task is None and self.outputs[0].shape[-1] > 1):
            return len(self.labels) if self.labels else max(2, int(self.outputs[0].shape[-1]))
        return None

    def stop_recording(self) -> None:
        self.recorder = None

    def __repr__(self) -> str:
        name = f"{self.manifest['name']} {self.manifest['version']}" if self.manifest else self.path.name
        return f"EdgeModel({name}, {self.path.name} on {self.backend.name})"


def artifact_order(bundle: Bundle, formats_available: set[str] | None = None) -> list[dict]:
    """Artifacts in the order a device should try them.

    The manifest's default first, then int8 TFLite, float32 TFLite, ONNX, then
    the rest; artifacts whose format no installed backend runs are left out.
    """
    arts = [a for a in bundle.artifacts if formats_available is None or a["format"] in formats_available]
    arts = [a for a in arts if a.get("role") != "trainable"]   # trained by edge_runtime.training, never picked
    default = bundle.manifest.get("default_artifact")
    rank = {("tflite", "int8"): 1, ("tflite", "none"): 2, ("onnx", "none"): 3}

    def key(a: dict) -> int:
        return 0 if a["file"] == default else rank.get((a["format"], a["quantization"]), 4)

    return sorted(arts, key=key)


def choose_artifact(bundle: Bundle, artifact: str | None = None, formats_available: set[str] | None = None) -> dict:
    """The artifact to run: the named one, else the first of :func:`artifact_order`."""
    if artifact:
        return bundle.artifact(artifact)
    usable = artifact_order(bundle, formats_available)
    if not usable:
        have = ", ".join(sorted({a["format"] for a in bundle.artifacts}))
        raise BackendUnavailableError(f"{bundle.root}: no backend installed for its artifacts ({have})")
    return usable[0]


def _formats_available() -> set[str]:
    """Formats an installed backend runs, found without importing the backends (they cost memory)."""
    import importlib.util
    import sys

    def has(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            return False

    fmts = set()
    if has("ai_edge_litert") or has("tflite_runtime") or "tensorflow" in sys.modules:
        fmts.add("tflite")
    if has("onnxruntime"):
        fmts.add("onnx")
    return fmts


def load(  # noqa: PLR0913 - the loader's options, all keywords with defaults
    path: str | Path,
    artifact: str | None = None,
    threads: int | None = None,
    public_key: Any = None,
    nan_policy: str = "reject",
    prefer: str | None = None,
    isolate: bool = False,
    verify_vectors: bool = True,
    accel=None,
) -> EdgeModel:
    """Load a bundle directory, a bundle .tar.gz, or a bare .tflite/.onnx file.

    Args:
        path: what to load.
        artifact: a bundle artifact's file name (default: the manifest's default, else int8 TFLite,
            float TFLite, ONNX, among the formats an installed backend runs).
        threads: inference threads.
        public_key: trusted Ed25519 public key (or its PEM path): the bundle's signature must verify.
        nan_policy: "reject" NaN/inf inputs with an error, or "count" them in telemetry and pass them on.
        prefer: backend to try first ("litert", "tflite_runtime", "tensorflow.lite").
        isolate: load the model in a child process first, so a crafted file cannot crash this one.
        verify_vectors: run the manifest's test vectors for the chosen artifact (when it has some), so an
            artifact altered together with its sha256 pin is refused even in an unsigned bundle.
        accel: an ``edge_runtime.accel.Acceleration``: LiteRT delegate, ONNX Runtime providers, XNNPACK on/off
            (``model.backend.accel`` reports what runs).

    A .tar.gz is unpacked into a temporary folder that is removed before this returns (the model
    keeps its bytes in memory).

    Raises:
        BundleError, VerificationError, ModelFormatError, BackendUnavailableError, InvalidInputError,
        QualityCheckError (a test vector's output differs from the one measured at conversion).
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".tflite", ".onnx"):
        if public_key is not None:
            raise BundleError(f"{p}: a bare model file carries no signature; sign a bundle to use a trusted key")
        return _load_model_file(p, threads, nan_policy, prefer, isolate, accel)
    bundle = open_bundle(p, public_key=public_key)
    try:
        model = _load_bundle(bundle, artifact, threads, nan_policy, prefer, isolate, accel)
        if verify_vectors:
            model.check_test_vectors()
        return model
    finally:
        bundle.cleanup()


def _load_model_file(p: Path, threads: int | None, nan_policy: str, prefer: str | None,  # noqa: PLR0913
                     isolate: bool, accel) -> EdgeModel:
    """A bare .tflite/.onnx file, loaded in a child process first when isolated."""
    if isolate:
        from edge_runtime.modelcheck import probe_in_child

        probe_in_child(p, p.suffix.lower()[1:])
    return EdgeModel(open_backend(p, threads=threads, prefer=prefer, accel=accel), p, nan_policy=nan_policy)


def _load_bundle(bundle: Bundle, artifact: str | None, threads: int | None, nan_policy: str,  # noqa: PLR0913
                 prefer: str | None, isolate: bool, accel=None) -> EdgeModel:
    candidates = _candidates(bundle, artifact)
    for n, chosen in enumerate(candidates):
        art_path = bundle.root / chosen["file"]
        if isolate:
            from edge_runtime.modelcheck import probe_in_child

            probe_in_child(art_path, chosen["format"])
        try:
            backend = open_backend(art_path, format=chosen["format"], threads=threads, prefer=prefer, accel=accel)
        except BackendUnavailableError as exc:
            if n + 1 == len(candidates):
                raise
            # e.g. LiteRT present but not loadable on this board: the ONNX artifact may still run
            log.warning("%s: %s; falling back to %s", chosen["file"], exc, candidates[n + 1]["file"])
            continue
        log.info("loaded %s %s: %s on %s %s", bundle.name, bundle.version, chosen["file"], backend.name,
                 backend.version)
        return EdgeModel(backend, art_path, bundle, chosen, nan_policy)
    raise AssertionError("unreachable")  # the loop returns or raises


def _candidates(bundle: Bundle, artifact: str | None) -> list[dict]:
    """The artifacts to try in turn: the named one, else those an installed backend runs, best first."""
    if artifact:
        return [bundle.artifact(artifact)]
    candidates = artifact_order(bundle, _formats_available())
    if not candidates:
        have = ", ".join(sorted({a["format"] for a in bundle.artifacts}))
        raise BackendUnavailableError(f"{bundle.root}: no backend installed for its artifacts ({have})")
    return candidates
