"""`to_bundle`: from a trained model to a verified, quantized, optionally signed bundle."""

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
from convert.inputs import columns_of, input_schema, normalizer
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
        return load_labeled(data, where) if where == "holdout" else (load_array(data, where), None)
    if isinstance(data, tuple) and len(data) == 2:
        return np.asarray(data[0], dtype=np.float32), np.asarray(data[1])
    return np.asarray(data, dtype=np.float32), None


def _fit_to_model(X: np.ndarray | None, source: SourceModel, where: str) -> np.ndarray | None:
    if X is None:
        return None
    want = int(np.prod(source.input_shape))
    got = int(np.prod(X.shape[1:])) if X.ndim > 1 else 1
    if X.ndim < 2 or got != want:
        shape = "x".join(str(d) for d in X.shape)
        raise InvalidInputError(
            f"{where} data has shape {shape} ({got} values per row), but the model takes {want} "
            f"(input shape {list(source.input_shape)})"
        )
    if not np.isfinite(X).all():
        raise InvalidInputError(f"{where} data holds NaN or infinite values; clean it before converting")
    return X.reshape((len(X),) + tuple(source.input_shape)).astype(np.float32)


def _output_kind(source: SourceModel, outputs: np.ndarray) -> str:
    if source.task == "regression":
        return "value"
    if outputs.shape[1] == 1:
        return "probabilities"
    sums = outputs.sum(axis=1)
    return "probabilities" if (outputs >= -1e-6).all() and np.allclose(sums, 1.0, atol=1e-3) else "logits"


def _plan(source: SourceModel, formats: Sequence[str], quantize: Sequence[str], notes: list[str]) -> list[tuple[str, str]]:
    """(format, quantization) pairs that apply to this source."""
    plan: list[tuple[str, str]] = []
    for fmt in formats:
        if fmt == "tflite":
            if source.framework in ("keras", "tensorflow"):
                plan += [("tflite", q) for q in quantize]
            elif source.framework == "tflite":
                plan.append(("tflite", "passthrough"))
                if any(q != "none" for q in quantize):
                    notes.append("an existing .tflite file is packaged as is (TFLite cannot re-quantize a flatbuffer)")
            else:
                notes.append(f"TFLite: not available for {source.framework} models (ONNX is their device format)")
        elif fmt == "onnx":
            if source.framework == "tflite":
                notes.append("ONNX: not made from a .tflite file")
                continue
            mapped = []
            for q in quantize:
                if q == "none":
                    mapped.append("none")
                elif q == "dynamic":
                    mapped.append("dynamic")
                elif q == "int8":
                    mapped.append("static")
                else:
                    notes.append(f"ONNX: {q} is a TFLite quantization; skipped for ONNX")
            plan += [("onnx", "passthrough" if source.framework == "onnx" and q == "none" else q) for q in mapped]
    return plan


def to_bundle(
    source: Any,
    out_dir: str | Path,
    *,
    name: str | None = None,
    version: str = "1.0.0",
    formats: Sequence[str] = FORMATS,
    quantize: Sequence[str] = ("none", "float16", "dynamic", "int8"),
    calibration: Any = None,
    holdout: Any = None,
    reference: Any = None,
    sign_key: Any = None,
    max_accuracy_drop: float = 2.0,
    trust_pickle: bool = False,
    force: bool = False,
    feature_names: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    task: str | None = None,
    image: dict | None = None,
    normalization: dict | None = None,
    description: str | None = None,
    keep_normalization: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ConversionResult:
    """Convert a model into a bundle and check every artifact against the source.

    Args:
        source: a Keras model, a fitted scikit-learn estimator/Pipeline, or a path to a .keras/.h5 file,
            SavedModel directory, .joblib/.pkl (with trust_pickle), .skops, .onnx or .tflite file.
        out_dir: the bundle directory to create.
        name: bundle name (default: the source file's stem or model type).
        version: semantic version X.Y.Z.
        formats: any of "tflite", "onnx".
        quantize: any of "none", "float16", "dynamic", "int8", "int16x8" (ONNX takes none, dynamic and
            int8 = static QDQ).
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
        normalization: {"mean": [..], "std": [..]} per tabular feature when the model takes standardised
            inputs: callers (and the device runtime) pass raw features and the runtime applies
            (x - mean) / std in float before the model. Keeping standardisation outside the model is
            what lets full-integer int8 quantize raw features of very different ranges.
        description: free text for the manifest.
        keep_normalization: keep a Keras model's leading Normalization layer inside the artifacts. By
            default it is moved into ``input_schema.normalization`` (same predictions; int8 keeps
            features of very different ranges apart).
        progress: called with a line of text at each step.

    Returns:
        ConversionResult with the bundle path, manifest and notes.

    Raises:
        InvalidInputError: bad source, data or arguments.
        QualityCheckError: an artifact's accuracy dropped more than allowed (nothing is written).
    """
    say = progress or (lambda _msg: None)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InvalidInputError(f"{out} exists and is not a directory; choose another --out")
    if out.exists() and not force:
        raise InvalidInputError(f"{out} exists; choose another --out or pass --force to replace it")
    if not SEMVER.match(version):
        raise InvalidInputError(f"version {version!r} is not a semantic version X.Y.Z")
    bad_formats = [f for f in formats if f not in FORMATS]
    if bad_formats or not formats:
        raise InvalidInputError(f"unknown format(s) {', '.join(bad_formats) or '(none)'}; choose from {', '.join(FORMATS)}")
    bad_q = [q for q in quantize if q not in QUANTIZATIONS]
    if bad_q or not quantize:
        raise InvalidInputError(f"unknown quantization(s) {', '.join(bad_q) or '(none)'}; choose from {', '.join(QUANTIZATIONS)}")

    say("loading the source model")
    src = load_source(source, trust_pickle=trust_pickle, task=task,
                      hoist_normalization=normalization is None and not keep_normalization)
    hoisted = src.extra.get("normalization")
    if hoisted is not None:
        normalization = hoisted
    if feature_names is None:
        feature_names = columns_of(holdout[0] if isinstance(holdout, tuple) else holdout) or columns_of(calibration)
    X_h, y_h = _as_inputs(holdout, "holdout")
    X_c, _ = _as_inputs(calibration, "calibration")
    X_r, _ = _as_inputs(reference, "reference")
    X_h = _fit_to_model(X_h, src, "holdout")
    X_c = _fit_to_model(X_c, src, "calibration")
    X_r = _fit_to_model(X_r, src, "reference")
    to_model = normalizer(normalization, src)
    if X_h is None and X_c is None:
        raise InvalidInputError("no data to check the conversion on: give holdout data (--holdout) or calibration data")
    X_check = X_h if X_h is not None else X_c
    y_check = y_h if X_h is not None else None
    X_cal = X_c if X_c is not None else X_h
    X_ref = X_r if X_r is not None else X_cal

    source_out = src.predict(to_model(X_check))
    if src.task == "classification":
        n_out = 2 if source_out.shape[1] == 1 else source_out.shape[1]
        labels = list(labels) if labels is not None else (src.classes or [str(i) for i in range(n_out)])
        if len(labels) != n_out:
            raise InvalidInputError(f"{len(labels)} labels given, but the model has {n_out} classes")
    else:
        labels = None
    names = list(feature_names) if feature_names is not None else src.feature_names
    if names is not None and len(src.input_shape) == 1 and len(names) != src.input_shape[0]:
        raise InvalidInputError(f"{len(names)} feature names given, but the model takes {src.input_shape[0]} features")

    notes: list[str] = []
    if hoisted is not None:
        notes.append("the model's leading Normalization layer is applied by the runtime "
                     "(input_schema.normalization), so int8 quantizes standardised inputs")
    if y_check is None:
        notes.append("no holdout labels: artifacts were compared with the source model only; "
                     "the accuracy gate (--max-accuracy-drop) did not run")
    plan = _plan(src, formats, quantize, notes)
    if not plan:
        raise InvalidInputError("nothing to convert: no requested format applies to this model (" + "; ".join(notes) + ")")

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent if out.parent.exists() else None))
    try:
        artifacts, vectors, failures = [], [], []
        float_sizes: dict[str, int] = {}
        onnx_float: bytes | None = None
        n_vec = min(N_TEST_VECTORS, len(X_check))
        for fmt, q in plan:
            label = f"{fmt} {q}"
            say(f"converting to {label}")
            if fmt == "tflite":
                if q == "passthrough":
                    data, file_name = src.obj, "model.tflite"
                else:
                    data, file_name = tflite.to_tflite(src, q, to_model(X_cal)), tflite.FILE_NAMES[q]
            else:
                if q == "passthrough":
                    data, file_name = src.obj, "model.onnx"
                elif q == "none":
                    data = onnx_export.sklearn_to_onnx(src) if src.framework == "sklearn" else onnx_export.keras_to_onnx(src)
                    file_name = onnx_export.FILE_NAMES["none"]
                else:
                    base = onnx_float if onnx_float is not None else (
                        src.obj if src.framework == "onnx" else
                        onnx_export.sklearn_to_onnx(src) if src.framework == "sklearn" else onnx_export.keras_to_onnx(src))
                    if onnx_export.is_tree_model(base):
                        notes.append(f"ONNX {q}: skipped, tree ensembles have no weights that int8 would shrink")
                        continue
                    in_name = ArtifactRunner(base, "onnx").inputs[0].name
                    data, file_name = onnx_export.quantize_onnx(base, q, to_model(X_cal), in_name), onnx_export.FILE_NAMES[q]
                    if not onnx_export.is_quantized(data):
                        notes.append(f"ONNX {q}: skipped, the graph has no operators ONNX Runtime quantizes "
                                     "(ai.onnx.ml operators such as LinearClassifier stay float)")
                        continue
                if q in ("none", "passthrough"):
                    onnx_float = data
            say(f"checking {file_name} against the source on {len(X_check)} samples")
            runner = ArtifactRunner(data, fmt, where=file_name)
            art_out = runner.run(to_model(X_check))
            par = parity(source_out, art_out, y_check, src.task, src.classes)
            (work / file_name).write_bytes(data)
            if q in ("none", "passthrough"):
                float_sizes[fmt] = len(data)
            quant_name = {"passthrough": _detect_quantization(runner), "static": "static"}.get(q, q)
            artifacts.append({
                "file": file_name,
                "format": fmt,
                "quantization": quant_name,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_bytes": len(data),
                "size_ratio": None,
                "output_kind": _output_kind(src, source_out),
                "inputs": [t.to_dict() for t in runner.inputs],
                "outputs": [t.to_dict() for t in runner.outputs[:1]],
                "parity": par,
            })
            vectors.append({
                "artifact": file_name,
                "inputs": X_check[:n_vec].tolist(),
                "expected": art_out[:n_vec].tolist(),
                "atol": _atol(quant_name, runner),
            })
            drop = par.get("metric_drop_points")
            if drop is not None and drop > max_accuracy_drop:
                hint = ""
                if quant_name == "int8":
                    hint = "; int8 collapses this model's accuracy: try --quantize int16x8 or float16"
                elif quant_name == "static":
                    hint = "; try ONNX dynamic quantization or none"
                failures.append(
                    f"{file_name}: {par['metric']} {par['artifact_metric']:.4f} vs source {par['source_metric']:.4f} "
                    f"(drop {drop:.2f} points > {max_accuracy_drop:g} allowed){hint}"
                )
        if failures:
            raise QualityCheckError("accuracy check failed: " + " | ".join(failures))
        for art in artifacts:
            base = float_sizes.get(art["format"])
            art["size_ratio"] = round(art["size_bytes"] / base, 4) if base else None

        say("profiling the reference data")
        ref_out = src.predict(to_model(X_ref))
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
            # confidence drift compares a window's top-class probabilities with those on held-out data
            # (on training data they would be inflated)
            confidence = confidence_profile(source_out)
            if confidence is not None:
                profile["confidence"] = confidence
        manifest = {
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
            "input_schema": input_schema(src, names, image, normalization),
            "labels": labels,
            "artifacts": artifacts,
            "default_artifact": _default_artifact(artifacts),
            "reference_profile": profile,
            "test_vectors": vectors,
            "conversion_notes": notes,
        }
        say("writing the manifest" + (" and its signature" if sign_key is not None else ""))
        write_manifest(work, manifest, sign_key=sign_key)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work), str(out))  # a rename when on one file system
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return ConversionResult(path=out, manifest=manifest, notes=notes)


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
    by = {(a["format"], a["quantization"]): a["file"] for a in artifacts}
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
