"""`to_bundle`: from a trained model to a verified, quantized, optionally signed bundle.

Standardised inputs: with ``normalization`` ({"mean": [..], "std": [..]} per tabular feature) the model
takes standardised features, but callers (and the device runtime) pass raw ones and the runtime applies
(x - mean) / std in float before the model. Keeping standardisation outside the model is what lets
full-integer int8 quantize raw features of very different ranges. For the same reason a Keras model's
leading Normalization layer is moved into ``input_schema.normalization`` (same predictions) unless
``keep_normalization`` keeps it inside the artifacts.

Fine-tuning on the device: ``trainable`` also writes a LiteRT artifact (``role: "trainable"``) whose
last Dense layer's weights its ``train`` signature trains (Keras classifiers only; docs/training.md).

The conversion runs in steps: validate the request, load the source, plan the (format, quantization)
pairs that apply, make and verify each artifact against the source, profile the reference data, and
write the manifest (signed with ``sign_key``) and artifacts in place of ``out_dir`` at once.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from convert import onnx_export, tflite
from convert.data import load_array, load_labeled
from convert.input_schema import columns_of, input_schema, normalizer
from convert.profile import confidence_profile, reference_profile
from convert.sources import SourceModel, load_source
from convert.verify import ArtifactRunner, parity
from edge_runtime.bundle import write_manifest
from edge_runtime.errors import InvalidInputError, QualityCheckError

SEMVER = re.compile(r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
FORMATS = ("tflite", "onnx")
QUANTIZATIONS = ("none", "float16", "dynamic", "int8", "int16x8")
N_TEST_VECTORS = 5


@dataclass(frozen=True)
class ConversionResult:
    """What `to_bundle` made.

    Attributes:
        path: the bundle directory.
        manifest: its manifest.
        notes: what was skipped and why (e.g. no int8 for a tree ensemble).
    """

    path: Path
    manifest: dict
    notes: list[str] = field(default_factory=list)


def _as_inputs(data: Any, where: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    if data is None:
        return None, None
    if isinstance(data, (str, Path)):
        return _inputs_from_file(data, where)
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0], dtype=np.float32), np.asarray(data[1])
    return np.asarray(data, dtype=np.float32), None


def _inputs_from_file(path: str | Path, where: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Holdout files carry labels; calibration and reference files hold inputs only."""
    return load_labeled(path, where) if where == "holdout" else (load_array(path, where), None)


def _fit_to_model(X: np.ndarray | None, source: SourceModel, where: str) -> np.ndarray | None:
    if X is None:
        return None
    _check_row_width(X, source, where)
    if not np.isfinite(X).all():
        raise InvalidInputError(f"{where} data holds NaN or infinite values; clean it before converting")
    return X.reshape((len(X),) + tuple(source.input_shape)).astype(np.float32)


def _check_row_width(X: np.ndarray, source: SourceModel, where: str) -> None:
    """Reject data whose rows do not hold as many values as the model's input."""
    want = int(np.prod(source.input_shape))
    got = int(np.prod(X.shape[1:])) if X.ndim > 1 else 1
    if X.ndim < 2 or got != want:
        shape = "x".join(str(d) for d in X.shape)
        raise InvalidInputError(
            f"{where} data has shape {shape} ({got} values per row), but the model takes {want} "
            f"(input shape {list(source.input_shape)})"
        )


def _output_kind(source: SourceModel, outputs: np.ndarray) -> str:
    if source.task == "regression":
        return "value"
    if outputs.shape[1] == 1:
        return "probabilities"
    sums = outputs.sum(axis=1)
    return "probabilities" if (outputs >= -1e-6).all() and np.allclose(sums, 1.0, atol=1e-3) else "logits"


def _plan_tflite(source: SourceModel, quantize: Sequence[str], notes: list[str]) -> list[tuple[str, str]]:
    if source.framework in ("keras", "tensorflow"):
        return [("tflite", q) for q in quantize]
    if source.framework == "tflite":
        if any(q != "none" for q in quantize):
            notes.append("an existing .tflite file is packaged as is (TFLite cannot re-quantize a flatbuffer)")
        return [("tflite", "passthrough")]
    notes.append(f"TFLite: not available for {source.framework} models (ONNX is their device format)")
    return []


ONNX_QUANTIZATIONS = {"none": "none", "dynamic": "dynamic", "int8": "static"}


def _plan_onnx(source: SourceModel, quantize: Sequence[str], notes: list[str]) -> list[tuple[str, str]]:
    if source.framework == "tflite":
        notes.append("ONNX: not made from a .tflite file")
        return []
    mapped = _onnx_quantizations(quantize, notes)
    return [("onnx", "passthrough" if source.framework == "onnx" and q == "none" else q) for q in mapped]


def _onnx_quantizations(quantize: Sequence[str], notes: list[str]) -> list[str]:
    """The ONNX names of the requested quantizations; TFLite-only ones are skipped with a note."""
    mapped = []
    for q in quantize:
        if q in ONNX_QUANTIZATIONS:
            mapped.append(ONNX_QUANTIZATIONS[q])
        else:
            notes.append(f"ONNX: {q} is a TFLite quantization; skipped for ONNX")
    return mapped


def _plan(
    source: SourceModel, formats: Sequence[str], quantize: Sequence[str], notes: list[str]
) -> list[tuple[str, str]]:
    """(format, quantization) pairs that apply to this source."""
    plan: list[tuple[str, str]] = []
    for fmt in formats:
        if fmt == "tflite":
            plan += _plan_tflite(source, quantize, notes)
        elif fmt == "onnx":
            plan += _plan_onnx(source, quantize, notes)
    return plan


def _validate_destination(out: Path, *, force: bool) -> None:
    """Reject an ``out`` that is a file, or an existing directory without ``force``."""
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise InvalidInputError(f"{out} exists; choose another --out or pass --force to replace it")


def _validate_choices(what: str, given: Sequence[str], allowed: Sequence[str]) -> None:
    """Reject an empty selection or one naming an unknown format/quantization."""
    bad = [g for g in given if g not in allowed]
    if bad or not given:
        raise InvalidInputError(
            f"unknown {what}(s) {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
        )


def _validate_request(
    out: Path, version: str, formats: Sequence[str], quantize: Sequence[str], *, force: bool
) -> None:
    """Reject a bad destination, version, format or quantization before any model is loaded."""
    _validate_destination(out, force=force)
    if not SEMVER.match(version):
        raise InvalidInputError(f"version {version!r} is not a semantic version X.Y.Z")
    _validate_choices("format", formats, FORMATS)
    _validate_choices("quantization", quantize, QUANTIZATIONS)


@dataclass(frozen=True)
class _CheckData:
    """The rows artifacts are checked on, calibrated with and profiled from (caller's raw features)."""

    X_check: np.ndarray
    y_check: np.ndarray | None
    X_cal: np.ndarray
    X_ref: np.ndarray


def _fitted_inputs(
    source: SourceModel, holdout: Any, calibration: Any, reference: Any
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Holdout rows and labels, calibration rows and reference rows, each shaped for the model."""
    X_h, y_h = _as_inputs(holdout, "holdout")
    X_c, _ = _as_inputs(calibration, "calibration")
    X_r, _ = _as_inputs(reference, "reference")
    X_h = _fit_to_model(X_h, source, "holdout")
    X_c = _fit_to_model(X_c, source, "calibration")
    X_r = _fit_to_model(X_r, source, "reference")
    return X_h, y_h, X_c, X_r


def _check_data(
    X_h: np.ndarray | None, y_h: np.ndarray | None, X_c: np.ndarray | None, X_r: np.ndarray | None
) -> _CheckData:
    """Holdout checks when given (else calibration); calibration falls back on holdout, reference on both."""
    if X_h is None and X_c is None:
        raise InvalidInputError(
            "no data to check the conversion on: give holdout data (--holdout) or calibration data"
        )
    X_cal = _first_given(X_c, X_h)
    return _CheckData(
        X_check=_first_given(X_h, X_c),
        y_check=y_h if X_h is not None else None,
        X_cal=X_cal,
        X_ref=_first_given(X_r, X_cal),
    )


def _first_given(preferred: np.ndarray | None, fallback: np.ndarray | None) -> np.ndarray | None:
    return preferred if preferred is not None else fallback


def _class_labels(source: SourceModel, source_out: np.ndarray, labels: Sequence[str] | None) -> list[str] | None:
    """The manifest's labels: given, the model's classes or class indices; None for regression."""
    if source.task != "classification":
        return None
    n_out = 2 if source_out.shape[1] == 1 else source_out.shape[1]
    labels = list(labels) if labels is not None else _default_labels(source, n_out)
    if len(labels) != n_out:
        raise InvalidInputError(f"{len(labels)} labels given, but the model has {n_out} classes")
    return labels


def _default_labels(source: SourceModel, n_out: int) -> list[str]:
    """The model's own class names, else the class indices."""
    return source.classes or [str(i) for i in range(n_out)]


def _feature_names(source: SourceModel, feature_names: Sequence[str] | None) -> list[str] | None:
    names = list(feature_names) if feature_names is not None else source.feature_names
    if names is not None and len(source.input_shape) == 1 and len(names) != source.input_shape[0]:
        raise InvalidInputError(
            f"{len(names)} feature names given, but the model takes {source.input_shape[0]} features"
        )
    return names


def _first_notes(hoisted: dict | None, y_check: np.ndarray | None) -> list[str]:
    notes: list[str] = []
    if hoisted is not None:
        notes.append("the model's leading Normalization layer is applied by the runtime "
                     "(input_schema.normalization), so int8 quantizes standardised inputs")
    if y_check is None:
        notes.append("no holdout labels: artifacts were compared with the source model only; "
                     "the accuracy gate (--max-accuracy-drop) did not run")
    return notes


def _onnx_from_source(source: SourceModel) -> bytes:
    return onnx_export.sklearn_to_onnx(source) if source.framework == "sklearn" else onnx_export.keras_to_onnx(source)


@dataclass
class _Conversion:
    """One source model being converted: what each artifact is made from and checked against."""

    src: SourceModel
    to_model: Callable[[np.ndarray], np.ndarray]
    data: _CheckData
    source_out: np.ndarray
    notes: list[str]
    say: Callable[[str], None]
    onnx_float: bytes | None = None  # the float ONNX graph, once made, is what ONNX quantization starts from

    def make(self, fmt: str, q: str) -> tuple[bytes, str] | None:
        """(artifact bytes, file name), or None when this quantization does not apply (with a note)."""
        return self._tflite(q) if fmt == "tflite" else self._onnx(q)

    def _tflite(self, q: str) -> tuple[bytes, str]:
        if q == "passthrough":
            return self.src.obj, "model.tflite"
        return tflite.to_tflite(self.src, q, self.to_model(self.data.X_cal)), tflite.FILE_NAMES[q]

    def _onnx(self, q: str) -> tuple[bytes, str] | None:
        if q == "passthrough":
            made = self.src.obj, "model.onnx"
        elif q == "none":
            made = _onnx_from_source(self.src), onnx_export.FILE_NAMES["none"]
        else:
            return self._onnx_quantized(q)
        self.onnx_float = made[0]
        return made

    def _onnx_quantized(self, q: str) -> tuple[bytes, str] | None:
        base = self.onnx_float
        if base is None:
            base = self.src.obj if self.src.framework == "onnx" else _onnx_from_source(self.src)
        if onnx_export.is_tree_model(base):
            self.notes.append(f"ONNX {q}: skipped, tree ensembles have no weights that int8 would shrink")
            return None
        in_name = ArtifactRunner(base, "onnx").inputs[0].name
        data = onnx_export.quantize_onnx(base, q, self.to_model(self.data.X_cal), in_name)
        if not onnx_export.is_quantized(data):
            self.notes.append(f"ONNX {q}: skipped, the graph has no operators ONNX Runtime quantizes "
                              "(ai.onnx.ml operators such as LinearClassifier stay float)")
            return None
        return data, onnx_export.FILE_NAMES[q]

    def verify(self, data: bytes, fmt: str, q: str, file_name: str) -> tuple[dict, dict]:
        """Run the artifact on the check rows: its manifest entry (with parity) and its test vectors."""
        X_check = self.data.X_check
        self.say(f"checking {file_name} against the source on {len(X_check)} samples")
        runner = ArtifactRunner(data, fmt, where=file_name)
        art_out = runner.run(self.to_model(X_check))
        par = parity(self.source_out, art_out, self.data.y_check, self.src.task, self.src.classes)
        quant_name = {"passthrough": _detect_quantization(runner), "static": "static"}.get(q, q)
        n_vec = min(N_TEST_VECTORS, len(X_check))
        artifact = {
            "file": file_name,
            "format": fmt,
            "quantization": quant_name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "size_bytes": len(data),
            "size_ratio": None,
            "output_kind": _output_kind(self.src, self.source_out),
            "inputs": [t.to_dict() for t in runner.inputs],
            "outputs": [t.to_dict() for t in runner.outputs[:1]],
            "parity": par,
        }
        vector = {
            "artifact": file_name,
            "inputs": X_check[:n_vec].tolist(),
            "expected": art_out[:n_vec].tolist(),
            "atol": _atol(quant_name, runner),
        }
        return artifact, vector


def _accuracy_failure(artifact: dict, max_accuracy_drop: float) -> str | None:
    """Why this artifact fails the accuracy gate, or None when it passes."""
    par = artifact["parity"]
    drop = par.get("metric_drop_points")
    if drop is None or drop <= max_accuracy_drop:
        return None
    hint = ""
    if artifact["quantization"] == "int8":
        hint = "; int8 collapses this model's accuracy: try --quantize int16x8 or float16"
    elif artifact["quantization"] == "static":
        hint = "; try ONNX dynamic quantization or none"
    return (
        f"{artifact['file']}: {par['metric']} {par['artifact_metric']:.4f} vs source {par['source_metric']:.4f} "
        f"(drop {drop:.2f} points > {max_accuracy_drop:g} allowed){hint}"
    )


def _convert_all(
    conversion: _Conversion, plan: list[tuple[str, str]], work: Path, max_accuracy_drop: float
) -> tuple[list[dict], list[dict]]:
    """Make, verify and write each planned artifact into `work`: manifest entries and test vectors."""
    artifacts, vectors = [], []
    float_sizes: dict[str, int] = {}
    for fmt, q in plan:
        made = _convert_one(conversion, fmt, q, work)
        if made is None:
            continue
        if q in ("none", "passthrough"):
            float_sizes[fmt] = made[0]["size_bytes"]
        artifacts.append(made[0])
        vectors.append(made[1])
    _check_accuracy(artifacts, max_accuracy_drop)
    _set_size_ratios(artifacts, float_sizes)
    return artifacts, vectors


def _check_accuracy(artifacts: list[dict], max_accuracy_drop: float) -> None:
    """Fail the conversion when any artifact lost more accuracy than allowed, naming each that did."""
    failures = [f for f in (_accuracy_failure(a, max_accuracy_drop) for a in artifacts) if f is not None]
    if failures:
        raise QualityCheckError("accuracy check failed: " + " | ".join(failures))


def _convert_one(conversion: _Conversion, fmt: str, q: str, work: Path) -> tuple[dict, dict] | None:
    """Make one artifact, verify it and write it into `work`; None when it does not apply."""
    conversion.say(f"converting to {fmt} {q}")
    made = conversion.make(fmt, q)
    if made is None:
        return None
    data, file_name = made
    artifact, vector = conversion.verify(data, fmt, q, file_name)
    (work / file_name).write_bytes(data)
    return artifact, vector


def _set_size_ratios(artifacts: list[dict], float_sizes: dict[str, int]) -> None:
    """Each artifact's size relative to the float (or passed-through) artifact of its format."""
    for art in artifacts:
        base = float_sizes.get(art["format"])
        art["size_ratio"] = round(art["size_bytes"] / base, 4) if base else None


def _profile(conversion: _Conversion, names: list[str] | None, labels: list[str] | None) -> dict:
    """The reference profile drift is measured against."""
    src = conversion.src
    X_ref = conversion.data.X_ref
    ref_out = src.predict(conversion.to_model(X_ref))
    monitored = "channels" if len(src.input_shape) == 3 else "features"
    profile = reference_profile(
        X_ref,
        feature_names=names if monitored == "features" else None,
        monitored=monitored,
        predictions=_as_class(ref_out) if src.task == "classification" else None,
        labels=labels,
        regression_outputs=ref_out.ravel() if src.task == "regression" else None,
    )
    if src.task == "classification":
        _add_confidence(profile, conversion.source_out)
    return profile


def _add_confidence(profile: dict, source_out: np.ndarray) -> None:
    """Add the top-class confidence profile, measured on held-out data (on training data it would be
    inflated): confidence drift compares a window's top-class probabilities with it."""
    confidence = confidence_profile(source_out)
    if confidence is not None:
        profile["confidence"] = confidence


def _manifest_head(name: str | None, version: str, description: str | None, src: SourceModel) -> dict:
    """The manifest's first keys: what the bundle is and where it came from."""
    return {
        "schema_version": 1,
        "name": _bundle_name(name, src),
        "version": version,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "task": src.task,
        "description": description or f"{src.model_type} converted by edgeops",
        "source": {
            "framework": src.framework,
            "framework_version": src.framework_version,
            "model_type": src.model_type,
            "file": src.file.name if src.file else None,
            "sha256": _sha_of_source(src),
            **src.extra.get("source", {}),
        },
    }


def _install(work: Path, out: Path, manifest: dict, sign_key: Any, say: Callable[[str], None]) -> None:
    """Write the manifest (and signature) into `work`, then put `work` in place of `out`."""
    say("writing the manifest" + (" and its signature" if sign_key is not None else ""))
    write_manifest(work, manifest, sign_key=sign_key)
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(work), str(out))  # a rename when on one file system


def to_bundle(  # noqa: PLR0913 - the keyword arguments are the public conversion API, called by keyword
    source: Any, out_dir: str | Path, *, name: str | None = None, version: str = "1.0.0",
    formats: Sequence[str] = FORMATS, quantize: Sequence[str] = ("none", "float16", "dynamic", "int8"),
    calibration: Any = None, holdout: Any = None, reference: Any = None, sign_key: Any = None,
    max_accuracy_drop: float = 2.0, trust_pickle: bool = False, force: bool = False,
    feature_names: Sequence[str] | None = None, labels: Sequence[str] | None = None, task: str | None = None,
    image: dict | None = None, normalization: dict | None = None, description: str | None = None,
    keep_normalization: bool = False, progress: Callable[[str], None] | None = None, trainable: bool = False,
) -> ConversionResult:
    """Convert a model into a bundle, checking every artifact against the source (a ConversionResult: the
    bundle's path, manifest and notes).

    Args:
        source: a Keras model, a fitted scikit-learn estimator/Pipeline, or a path to a .keras/.h5 file,
            SavedModel directory, .joblib/.pkl (with trust_pickle), .skops, .onnx or .tflite file.
        out_dir: the bundle directory to create.
        name: bundle name (default: the source file's stem or model type).
        version: semantic version X.Y.Z.
        formats: any of "tflite", "onnx".
        quantize: any of "none", "float16", "dynamic", "int8", "int16x8" (ONNX: none, dynamic, int8 = static QDQ).
        calibration: representative inputs for int8/int16x8/static quantization: array or .npy/.npz/.csv path.
        holdout: labelled data (X, y) or a .npz/.csv path; artifacts are checked on it.
        reference: data for the reference profile (default: calibration, else holdout).
        sign_key: Ed25519 private key (path to PEM) to sign the manifest.
        max_accuracy_drop: fail when an artifact loses more than this many accuracy (or R²) points.
        trust_pickle: allow .joblib/.pkl sources, whose loading runs code.
        force: replace an existing out_dir.
        feature_names: names of the tabular columns.
        labels: class labels (default: the model's classes or their indices).
        task: "classification" or "regression" (default: from the model).
        image: for image inputs (H, W, C): {"scale": .., "mean": [..], "std": [..]} preprocessing facts.
        normalization: {"mean": [..], "std": [..]} per feature of a model taking standardised inputs (module doc).
        description: free text for the manifest.
        keep_normalization: keep a Keras model's leading Normalization layer inside the artifacts.
        progress: called with a line of text at each step.
        trainable: also write a LiteRT artifact a device fine-tunes (see the module's docstring).

    Raises InvalidInputError for a bad source, data or arguments, QualityCheckError when an artifact's accuracy
    dropped more than allowed (nothing is written then).
    """
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    _validate_request(out, version, formats, quantize, force=force)
    say("loading the source model")
    src = _load(source, trust_pickle=trust_pickle, task=task, trainable=trainable,
                hoist_normalization=normalization is None and not keep_normalization)
    hoisted = src.extra.get("normalization")
    normalization = hoisted if hoisted is not None else normalization
    to_model = normalizer(normalization, src)
    data = _check_data(*_fitted_inputs(src, holdout, calibration, reference))
    source_out = src.predict(to_model(data.X_check))
    labels = _class_labels(src, source_out, labels)
    names = _feature_names(src, _given_or_data_columns(feature_names, holdout, calibration))
    notes = _first_notes(hoisted, data.y_check)
    plan = _plan_or_fail(src, formats, quantize, notes)
    conversion = _Conversion(src, to_model, data, source_out, notes, say)
    head = {**_manifest_head(name, version, description, src),
            "input_schema": input_schema(src, names, image, normalization), "labels": labels}
    manifest = _write_bundle(conversion, plan, out, head, names, max_accuracy_drop, trainable, sign_key)
    return ConversionResult(path=out, manifest=manifest, notes=notes)


def _load(source: Any, *, trust_pickle: bool, task: str | None, trainable: bool,
          hoist_normalization: bool) -> SourceModel:
    """The source model, checked to be fine-tunable on the device when ``trainable`` is asked for."""
    src = load_source(source, trust_pickle=trust_pickle, task=task, hoist_normalization=hoist_normalization)
    if trainable:
        from convert.trainable import check_source

        check_source(src)
    return src


def _given_or_data_columns(feature_names: Sequence[str] | None, holdout: Any, calibration: Any):
    """The feature names given, else the column names of the holdout (or calibration) data frame."""
    if feature_names is not None:
        return feature_names
    return columns_of(holdout[0] if isinstance(holdout, tuple) else holdout) or columns_of(calibration)


def _plan_or_fail(src: SourceModel, formats: Sequence[str], quantize: Sequence[str], notes: list[str]) -> list:
    plan = _plan(src, formats, quantize, notes)
    if not plan:
        raise InvalidInputError(
            "nothing to convert: no requested format applies to this model (" + "; ".join(notes) + ")"
        )
    return plan


def _write_bundle(conversion: _Conversion, plan, out: Path, head: dict, names: list[str],  # noqa: PLR0913
                  max_accuracy_drop: float, trainable: bool, sign_key: Any) -> dict:
    """Convert and check every planned artifact in a work folder, profile the reference data, and install
    the bundle at ``out`` in one step (nothing is left behind when any step fails); returns the manifest."""
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        artifacts, vectors = _convert_all(conversion, plan, work, max_accuracy_drop)
        if trainable:
            from convert.trainable import add_trainable

            made = add_trainable(conversion, work)
            artifacts.append(made[0])
            vectors.append(made[1])
        conversion.say("profiling the reference data")
        manifest = {
            **head,
            "artifacts": artifacts,
            "default_artifact": _default_artifact(artifacts),
            "reference_profile": _profile(conversion, names, head["labels"]),
            "test_vectors": vectors,
            "conversion_notes": conversion.notes,
        }
        _install(work, out, manifest, sign_key, conversion.say)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return manifest


def _as_class(out: np.ndarray) -> np.ndarray:
    return (out.ravel() > 0.5).astype(np.int64) if out.shape[1] == 1 else out.argmax(axis=1)


def _atol(quantization: str, runner: ArtifactRunner) -> float:
    q = runner.outputs[0].quantization
    if q:
        return float(2 * q["scale"] + 1e-6)
    return {"none": 1e-4, "float16": 5e-3}.get(quantization, 2e-2)


def _detect_quantization(runner: ArtifactRunner) -> str:
    dtype = runner.inputs[0].dtype
    return {"int8": "int8", "uint8": "int8", "int16": "int16x8"}.get(dtype, "none")


def _default_artifact(artifacts: list[dict]) -> str:
    by = {(a["format"], a["quantization"]): a["file"] for a in artifacts if a.get("role") != "trainable"}
    for key in (("tflite", "int8"), ("tflite", "none"), ("onnx", "none")):
        if key in by:
            return by[key]
    return artifacts[0]["file"]


def _bundle_name(name: str | None, src: SourceModel) -> str:
    raw = name or (src.file.stem if src.file else (src.model_type or "model"))
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._") or "model"
    if name is not None and clean != name:
        raise InvalidInputError(f"name {name!r}: use letters, digits, '.', '_' and '-' only")
    return clean[:128]


def _sha_of_source(src: SourceModel) -> str | None:
    if src.file is not None and src.file.is_file():
        return hashlib.sha256(src.file.read_bytes()).hexdigest()
    return None
