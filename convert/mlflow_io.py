"""MLflow in and out: convert a registered Keras or scikit-learn model, register a bundle back.

In: ``models:/NAME/VERSION``, ``models:/NAME@alias`` and ``runs:/RUN_ID/PATH``
are downloaded with MLflow's own API into a temporary folder (removed once the
model is in memory), loaded with the flavor's loader and converted like any
other source; the manifest's ``source`` block records the URI, run id and
model version.

Out: :func:`register_bundle` logs a bundle as an MLflow model with an
``edgeops`` flavor whose ``python_function`` loader is
:mod:`edge_runtime.mlflow_flavor` (no TensorFlow at load time), logs the
conversion report as metrics and tags, and registers it as a new version of
``NAME-edge``. :func:`resolve_bundle` turns such a model's URI back into a
bundle folder for ``edgeops flash`` and ``edgeops monitor``.

MLflow reads ``MLFLOW_TRACKING_URI`` (a local ``sqlite:///file.db`` store
needs no server) and ``MLFLOW_EXPERIMENT_NAME``; this module imports MLflow
only when a function needs it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edge_runtime.errors import InvalidInputError
from edge_runtime.mlflow_flavor import FLAVOR_NAME

URI_SCHEMES = ("models:/", "runs:/")
# where the exceptions of a tracking store that is missing, unreachable or refuses come from
STORE_ERROR_MODULES = ("mlflow", "sqlalchemy", "sqlite3", "alembic", "requests", "urllib3")
BUNDLE_DATA = "bundle"
LOADER_MODULE = "edge_runtime.mlflow_flavor"
CONVERTIBLE_FLAVORS = ("keras", "sklearn")
SAFE_SKLEARN_FORMATS = ("skops",)
_MODELS_NAME_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>[^/]+)$")
_MODELS_NAME_ALIAS = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/]+)$")
_RUNS = re.compile(r"^runs:/(?P<run>[^/]+)/(?P<path>.+)$")


def is_mlflow_uri(value: Any) -> bool:
    """True for a ``models:/`` or ``runs:/`` URI (a plain path is not one)."""
    return isinstance(value, str) and value.startswith(URI_SCHEMES)


@dataclass(frozen=True)
class MlflowOrigin:
    """Where a converted model came from in MLflow: what the manifest's ``source`` block records."""

    uri: str
    run_id: str | None
    registered_model: str | None = None
    model_version: str | None = None

    def manifest_fields(self) -> dict:
        return {"uri": self.uri, "run_id": self.run_id, "registered_model": self.registered_model,
                "model_version": self.model_version}


@dataclass(frozen=True)
class RegisteredBundle:
    """A bundle logged and registered by :func:`register_bundle`."""

    name: str
    version: str
    run_id: str
    model_uri: str


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError:
        raise InvalidInputError("MLflow is not installed; pip install 'edgeops[mlflow]'") from None
    return mlflow


def tracking_uri() -> str:
    """The tracking store MLflow will use (``MLFLOW_TRACKING_URI`` or MLflow's default)."""
    return str(_mlflow().get_tracking_uri())


def default_name(uri: str) -> str:
    """A bundle name for an MLflow URI: the registered model's name, else the run's artifact path's last part."""
    m = _MODELS_NAME_VERSION.match(uri) or _MODELS_NAME_ALIAS.match(uri)
    if m:
        raw = m["name"]
    elif r := _RUNS.match(uri):
        raw = r["path"].rstrip("/").rsplit("/", 1)[-1]
    else:
        raw = uri.split(":/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-._")[:128] or "model"


def _check_uri(uri: str) -> None:
    if not (_MODELS_NAME_VERSION.match(uri) or _MODELS_NAME_ALIAS.match(uri) or _RUNS.match(uri)
            or re.match(r"^models:/[^/@]+$", uri)):
        raise InvalidInputError(
            f"{uri}: not an MLflow model URI; expected models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH"
        )


@contextlib.contextmanager
def store_errors(uri: str) -> Iterator[None]:
    """Turn MLflow's failures into one-line InvalidInputErrors that name the URI and the tracking store."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests raise many types
        if type(exc).__module__.split(".")[0] not in STORE_ERROR_MODULES and not isinstance(exc, OSError):
            raise
        first = _first_line(exc)
        where = tracking_uri()
        if _not_found(exc, first):
            raise InvalidInputError(f"{uri}: no such model in the MLflow tracking store {where} ({first})") from None
        raise InvalidInputError(f"{uri}: the MLflow tracking store {where} cannot be used "
                                f"({type(exc).__name__}: {first})") from None


def _first_line(exc: Exception) -> str:
    """The first line of an MLflow error's message (at most 200 characters; its type when it has none)."""
    return (str(getattr(exc, "message", "") or exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _not_found(exc: Exception, first: str) -> bool:
    """Whether the store's error says the model (or run, or version) does not exist."""
    code = getattr(exc, "error_code", "")
    return code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE") or "not found" in first.lower()


def _read_mlmodel(local: Path, uri: str) -> dict:
    import yaml

    path = local / "MLmodel"
    if not path.is_file():
        raise InvalidInputError(f"{uri}: not an MLflow model (no MLmodel file in what was downloaded)")
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict) or not isinstance(doc.get("flavors"), dict):
        raise InvalidInputError(f"{uri}: its MLmodel file has no flavors")
    return doc


def _registered_version(uri: str) -> Any:
    """The registry's model version a models:/ URI names (by alias, number, stage or "latest"), or None."""
    client = _mlflow().MlflowClient()
    a = _MODELS_NAME_ALIAS.match(uri)
    if a:
        return client.get_model_version_by_alias(a["name"], a["alias"])
    m = _MODELS_NAME_VERSION.match(uri)
    if m is None:
        return None
    if m["version"].isdigit():
        return client.get_model_version(m["name"], m["version"])
    # a stage such as Production, or "latest"
    stages = None if m["version"].lower() == "latest" else [m["version"]]
    found = client.get_latest_versions(m["name"], stages=stages)
    return max(found, key=lambda v: int(v.version)) if found else None


def _origin(uri: str, mlmodel: dict) -> MlflowOrigin:
    mv = _registered_version(uri)
    if mv is None:
        return MlflowOrigin(uri=uri, run_id=_run_id(uri, None, mlmodel), registered_model=None, model_version=None)
    return MlflowOrigin(uri=uri, run_id=_run_id(uri, mv.run_id, mlmodel), registered_model=mv.name,
                        model_version=str(mv.version))


def _run_id(uri: str, version_run: str | None, mlmodel: dict) -> str | None:
    """The run that logged the model: the registered version's, the MLmodel file's, or a runs:/ URI's."""
    run_id = version_run or mlmodel.get("run_id")
    if run_id is None and (r := _RUNS.match(uri)):
        run_id = r["run"]
    return run_id


def download(uri: str, dest: str | Path) -> Path:
    """Download the MLflow model at ``uri`` into ``dest`` with MLflow's own API; returns its local folder."""
    _check_uri(uri)
    mlflow = _mlflow()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with store_errors(uri):
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))


def _load_flavor(uri: str, local: Path, flavors: dict, trust_pickle: bool) -> tuple[str, Any]:
    mlflow = _mlflow()
    if "keras" in flavors:
        import mlflow.keras

        with store_errors(uri):
            return "keras", mlflow.keras.load_model(str(local))
    if "sklearn" in flavors:
        _check_sklearn_format(uri, flavors["sklearn"], trust_pickle)
        import mlflow.sklearn

        with store_errors(uri):
            return "sklearn", mlflow.sklearn.load_model(str(local))
    named = ", ".join(sorted(f for f in flavors if f != "python_function")) or "python_function only"
    raise InvalidInputError(f"{uri}: MLflow flavor(s) {named}; edgeops converts the keras and sklearn flavors")


def _check_sklearn_format(uri: str, flavor: dict, trust_pickle: bool) -> None:
    """Refuse a pickled scikit-learn model (loading it runs code) unless ``trust_pickle``."""
    fmt = flavor.get("serialization_format", "cloudpickle")
    if fmt not in SAFE_SKLEARN_FORMATS and not trust_pickle:
        raise InvalidInputError(
            f"{uri}: the scikit-learn model is stored as {fmt}, and loading a pickle runs arbitrary code; "
            "pass --trust-pickle if you trust this model, or log it with serialization_format='skops'"
        )


def load_mlflow_source(uri: str, trust_pickle: bool = False, task: str | None = None,
                       hoist_normalization: bool = False) -> Any:
    """Load a Keras or scikit-learn MLflow model as a :class:`convert.sources.SourceModel`.

    The download goes to a temporary folder that is removed before this returns. The source's
    ``extra["source"]`` holds the :class:`MlflowOrigin` fields the manifest records.

    Raises:
        InvalidInputError: a malformed or unknown URI, a flavor other than keras/sklearn, a pickled model
            without ``trust_pickle``, or a tracking store that cannot be used.
    """
    from convert.sources import from_keras, from_sklearn

    with tempfile.TemporaryDirectory(prefix="edgeops-mlflow-") as tmp:
        local = download(uri, tmp)
        mlmodel = _read_mlmodel(local, uri)
        framework, model = _load_flavor(uri, local, mlmodel["flavors"], trust_pickle)
        with store_errors(uri):
            origin = _origin(uri, mlmodel)
    if framework == "keras":
        src = from_keras(model, task=task, hoist_normalization=hoist_normalization)
    else:
        src = from_sklearn(model, task=task)
    src.extra["source"] = origin.manifest_fields()
    return src


# --- out: a bundle as an MLflow model -------------------------------------------------------------------------

def report_metrics(manifest: dict) -> dict[str, float]:
    """The conversion report as MLflow metrics: per artifact its size, accuracy drop and parity."""
    metrics: dict[str, float] = {}
    for art in manifest.get("artifacts", []):
        f = art["file"]
        par = art.get("parity") or {}
        values = {
            "size_bytes": art.get("size_bytes"), "size_ratio": art.get("size_ratio"),
            "accuracy_drop_points": par.get("metric_drop_points"), "source_metric": par.get("source_metric"),
            "artifact_metric": par.get("artifact_metric"), "label_agreement": par.get("label_agreement"),
            "max_abs_prob_diff": par.get("max_abs_prob_diff"), "mae": par.get("mae"),
        }
        metrics.update({f"{f}.{k}": float(v) for k, v in values.items() if v is not None})
    return metrics


def report_tags(manifest: dict) -> dict[str, str]:
    """The bundle's identity and notes as MLflow tags."""
    src = manifest.get("source") or {}
    tags = {
        "edgeops.bundle": manifest["name"], "edgeops.bundle_version": manifest["version"],
        "edgeops.task": manifest.get("task", ""), "edgeops.default_artifact": manifest.get("default_artifact") or "",
        "edgeops.artifacts": ",".join(a["file"] for a in manifest.get("artifacts", [])),
        "edgeops.source_framework": src.get("framework") or "",
        "edgeops.conversion_notes": " | ".join(manifest.get("conversion_notes") or [])[:5000],
    }
    return {**tags, **_source_tags(src)}


def _source_tags(src: dict) -> dict[str, str]:
    """The MLflow model the bundle was converted from (its URI and run), when it came from one."""
    names = {"uri": "edgeops.source_uri", "run_id": "edgeops.source_run_id"}
    return {tag: src[key] for key, tag in names.items() if src.get(key)}


def save_model(path: str, mlflow_model: Any, bundle_dir: str | Path, manifest: dict) -> None:
    """Write an MLflow model folder holding the bundle (called by MLflow's ``Model.log``)."""
    import mlflow.pyfunc

    import edge_runtime

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle_dir, out / BUNDLE_DATA)
    mlflow.pyfunc.add_to_model(mlflow_model, loader_module=LOADER_MODULE, data=BUNDLE_DATA)
    mlflow_model.add_flavor(FLAVOR_NAME, bundle=BUNDLE_DATA, bundle_name=manifest["name"],
                            bundle_version=manifest["version"],
                            task=manifest.get("task"), default_artifact=manifest.get("default_artifact"),
                            edge_runtime_version=edge_runtime.__version__)
    mlflow_model.save(str(out / "MLmodel"))
    # what a machine needs to load it: the device runtime alone
    (out / "requirements.txt").write_text(f"edgeops=={edge_runtime.__version__}\n")


def register_bundle(bundle_dir: str | Path, name: str | None = None) -> RegisteredBundle:
    """Log the bundle at ``bundle_dir`` as an ``edgeops`` MLflow model and register it as ``NAME-edge``.

    Args:
        bundle_dir: a bundle folder or .tar.gz written by ``convert`` (it is verified first).
        name: registered model name without the ``-edge`` suffix (default: the bundle's name).

    Returns:
        the registered model's name, new version, run id and ``models:/NAME-edge/VERSION`` URI.
    """
    from edge_runtime.bundle import opened_bundle

    mlflow = _mlflow()
    from mlflow.models import Model

    with opened_bundle(bundle_dir) as bundle:
        manifest = bundle.manifest
        registered = f"{name or manifest['name']}-edge"
        where = f"registering {bundle_dir} as {registered}"
        title = f"edgeops convert {manifest['name']} {manifest['version']}"
        with store_errors(where), mlflow.start_run(run_name=title) as run:
            mlflow.log_metrics(report_metrics(manifest))
            mlflow.set_tags(report_tags(manifest))
            info = Model.log(artifact_path=None, name=FLAVOR_NAME, flavor=sys.modules[__name__],
                             flavor_name=FLAVOR_NAME, registered_model_name=registered, bundle_dir=bundle.root,
                             manifest=manifest)
    with store_errors(where):
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        client.update_model_version(registered, version, description=manifest.get("description") or "")
        for key, value in report_tags(manifest).items():
            client.set_model_version_tag(registered, version, key, value)
    return RegisteredBundle(name=registered, version=version, run_id=run.info.run_id,
                            model_uri=f"models:/{registered}/{version}")


# --- back: a registered bundle's URI to a bundle folder ------------------------------------------------------

def resolve_bundle(uri_or_path: str | Path, dest: str | Path | None = None) -> Path:
    """A bundle folder for a path or for the URI of a registered ``edgeops`` model.

    A path comes back unchanged. A ``models:/``/``runs:/`` URI is downloaded into ``dest`` (default: a new
    temporary folder, which the caller removes; :func:`resolved_bundle` does it) and the bundle folder inside
    it is returned.

    Raises:
        InvalidInputError: the URI is malformed, unknown, not an edgeops model, or the store cannot be used.
    """
    if not is_mlflow_uri(str(uri_or_path)):
        return Path(uri_or_path)
    uri = str(uri_or_path)
    target = Path(dest) if dest is not None else Path(tempfile.mkdtemp(prefix="edgeops-mlflow-bundle-"))
    try:
        return _bundle_folder(uri, download(uri, target))
    except BaseException:
        if dest is None:
            shutil.rmtree(target, ignore_errors=True)
        raise


def _bundle_folder(uri: str, local: Path) -> Path:
    """The bundle folder inside a downloaded edgeops MLflow model."""
    flavors = _read_mlmodel(local, uri)["flavors"]
    if FLAVOR_NAME not in flavors:
        named = ", ".join(sorted(flavors))
        raise InvalidInputError(f"{uri}: not an edgeops bundle (MLflow flavors: {named}); "
                                "register one with edgeops convert ... --register")
    folder = local / str(flavors[FLAVOR_NAME].get("bundle", BUNDLE_DATA))
    if not (folder / "manifest.json").is_file():
        raise InvalidInputError(f"{uri}: the edgeops model holds no bundle folder with a manifest.json")
    return folder


@contextlib.contextmanager
def resolved_bundle(uri_or_path: str | Path) -> Iterator[Path]:
    """:func:`resolve_bundle` as a context manager that removes the downloaded folder on exit."""
    if not is_mlflow_uri(str(uri_or_path)):
        yield Path(uri_or_path)
        return
    with tempfile.TemporaryDirectory(prefix="edgeops-mlflow-bundle-") as tmp:
        yield resolve_bundle(uri_or_path, dest=tmp)

