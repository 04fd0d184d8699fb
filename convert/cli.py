"""`edgeops convert` and `edgeops keys`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edge_runtime.errors import InvalidInputError


def _split(value: str, allowed: tuple[str, ...], what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise click.BadParameter(f"{', '.join(bad) or '(empty)'}: choose from {', '.join(allowed)}", param_hint=what)
    return items


def _lines(path: str | None, what: str) -> list[str] | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"{what} {p}: no such file")
    text = p.read_text().strip()
    if p.suffix == ".json":
        return _json_list(text, f"{what} {p}")
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


def _json_list(text: str, where: str) -> list[str]:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(doc, list):
        raise InvalidInputError(f"{where}: expected a JSON list")
    return [str(v) for v in doc]


def _normalization(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise InvalidInputError(f"normalization {p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(f"normalization {p}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or "mean" not in doc or "std" not in doc:
        raise InvalidInputError(f"normalization {p}: expected a JSON object with 'mean' and 'std' lists")
    return {"mean": doc["mean"], "std": doc["std"]}


def _numbers(value: str, option: str) -> list[float]:
    try:
        return [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected comma-separated numbers", param_hint=option) from None


def _image(scale: float | None, rng: str | None, mean: str | None, std: str | None) -> dict | None:
    """The image preprocessing facts given on the command line (None when none were)."""
    given = {
        "scale": scale,
        "source_range": None if rng is None else _image_range(rng),
        "mean": None if mean is None else _numbers(mean, "--image-mean"),
        "std": None if std is None else _image_std(std),
    }
    image = {key: value for key, value in given.items() if value is not None}
    return image or None


def _image_range(rng: str) -> list[float]:
    bounds = _numbers(rng, "--image-range")
    if len(bounds) != 2 or not bounds[0] < bounds[1]:
        raise click.BadParameter(f"{rng!r}: expected LO,HI with LO < HI", param_hint="--image-range")
    return bounds


def _image_std(std: str) -> list[float]:
    values = _numbers(std, "--image-std")
    if any(v <= 0 for v in values):
        raise click.BadParameter("std values must be positive", param_hint="--image-std")
    return values


@click.command("convert")
@click.argument("source", type=click.Path())
@click.option("--out", "out_dir", required=True, type=click.Path(), help="Bundle directory to create.")
@click.option("--name", help="Bundle name (default: the source file's name).")
@click.option("--version", "version", default="1.0.0", show_default=True, help="Semantic version X.Y.Z.")
@click.option("--format", "formats", default="tflite,onnx", show_default=True, help="Comma-separated: tflite, onnx.")
@click.option("--quantize", default="none,float16,dynamic,int8", show_default=True,
              help="Comma-separated: none, float16, dynamic, int8, int16x8 (ONNX: none, dynamic, int8 = static QDQ).")
@click.option("--calibration", type=click.Path(),
              help="Representative inputs (.npy/.npz/.csv) for int8 calibration and the reference profile.")
@click.option("--holdout", type=click.Path(),
              help="Labelled data (.npz with X,y or .csv with the label last) to check every artifact on.")
@click.option("--sign-key", type=click.Path(), help="Ed25519 private key (PEM) to sign the manifest with.")
@click.option("--max-accuracy-drop", default=2.0, show_default=True, type=float,
              help="Fail when an artifact loses more accuracy points than this.")
@click.option("--task", type=click.Choice(["classification", "regression"]), help="Override the detected task.")
@click.option("--feature-names", type=click.Path(),
              help="File with feature names (one a line, comma-separated, or a JSON list).")
@click.option("--labels", "labels_file", type=click.Path(), help="File with class labels (one a line, or a JSON list).")
@click.option("--normalization", "normalization_file", type=click.Path(),
              help="JSON file {\"mean\": [..], \"std\": [..]}: the model takes standardised features; the runtime "
                   "applies it.")
@click.option("--keep-normalization", is_flag=True,
              help="Keep a Keras model's leading Normalization layer inside the artifacts (default: the runtime "
                   "applies it).")
@click.option("--image-scale", type=float,
              help="Image models: model input = pixel * scale (e.g. 0.0039 for 0..255 pixels).")
@click.option("--image-range",
              help="Image models: the pixel range LO,HI the scale applies to (default 0,255; Digits: 0,16).")
@click.option("--image-mean", help="Image models: per-channel mean subtracted after scaling, comma-separated.")
@click.option("--image-std", help="Image models: per-channel std divided by after the mean, comma-separated.")
@click.option("--trust-pickle", is_flag=True, help="Allow .joblib/.pkl sources (loading a pickle runs its code).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--register", "register", is_flag=False, flag_value="", default=None, metavar="[NAME]",
              help="Log the bundle to MLflow (MLFLOW_TRACKING_URI) and register it as a new version of NAME-edge "
                   "(default NAME: the bundle's name).")
@click.option("--trainable", is_flag=True,
              help="Keras classifiers: also write model.trainable.tflite, whose last Dense layer a device "
                   "fine-tunes (edgeops serve: POST /train; docs/training.md).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert_cmd(source, out_dir, name, version, formats, quantize, calibration, holdout, sign_key,
                max_accuracy_drop, task, feature_names, labels_file, normalization_file, keep_normalization,
                image_scale, image_range, image_mean, image_std, trust_pickle, force, register, trainable, as_json):
    """Convert SOURCE (.keras, SavedModel dir, .skops, .joblib/.pkl, .onnx, .tflite, or an MLflow model URI
    models:/NAME/VERSION, models:/NAME@ALIAS, runs:/RUN_ID/PATH) into a checked bundle."""
    from convert.api import FORMATS, QUANTIZATIONS

    fmt_list = _split(formats, FORMATS, "--format")
    q_list = _split(quantize, QUANTIZATIONS, "--quantize")
    status = None
    if as_json:
        progress = None
    elif sys.stderr.isatty():
        from rich.console import Console

        status = Console(stderr=True).status("converting")
        status.start()
        progress = status.update
    else:
        def progress(msg: str) -> None:
            click.echo(f"  {msg}", err=True)

    try:
        result = _convert(source, out_dir, name, version, fmt_list, q_list, calibration, holdout, sign_key,
                          max_accuracy_drop, trust_pickle, force, feature_names, labels_file, task,
                          _image(image_scale, image_range, image_mean, image_std), normalization_file,
                          keep_normalization, progress, trainable)
    finally:
        if status is not None:
            status.stop()
    registered = _register(result.path, register) if register is not None else None
    _print_result(result, sign_key, as_json, registered)


def _register(bundle_dir, name: str):
    from convert.mlflow_io import register_bundle

    return register_bundle(bundle_dir, name or None)


def _convert(source, out_dir, name, version, fmt_list, q_list, calibration, holdout, sign_key, max_accuracy_drop,
             trust_pickle, force, feature_names, labels_file, task, image, normalization_file, keep_normalization,
             progress, trainable=False):
    from convert.api import to_bundle
    from convert.mlflow_io import default_name, is_mlflow_uri

    if name is None and is_mlflow_uri(source):
        name = default_name(source)
    return to_bundle(
        source, out_dir, name=name, version=version, formats=fmt_list, quantize=q_list,
        calibration=calibration, holdout=holdout, sign_key=sign_key, max_accuracy_drop=max_accuracy_drop,
        trust_pickle=trust_pickle, force=force, feature_names=_lines(feature_names, "feature names"),
        labels=_lines(labels_file, "labels"), task=task,
        image=image,
        normalization=_normalization(normalization_file), keep_normalization=keep_normalization,
        progress=progress, trainable=trainable,
    )


def _print_result(result, sign_key, as_json: bool, registered=None) -> None:
    m = result.manifest
    if as_json:
        click.echo(json.dumps(_result_json(result, sign_key, registered), indent=2))
        return
    click.echo(f"bundle {m['name']} {m['version']} written to {result.path}" + (" (signed)" if sign_key else ""))
    header = (f"{'artifact':<24}{'size':>10}{'ratio':>7}{'source':>9}{'artifact':>10}{'drop':>7}{'agree':>8}"
              f"{'max|dp|':>10}")
    click.echo(header)
    for a in m["artifacts"]:
        click.echo(_artifact_row(a))
    for note in result.notes:
        click.echo(f"note: {note}")
    if registered is not None:
        click.echo(f"registered in MLflow as {registered.model_uri} (run {registered.run_id})")


def _result_json(result, sign_key, registered) -> dict:
    """What ``--json`` prints: the bundle, its notes, its MLflow registration and each artifact's parity."""
    m = result.manifest
    return {
        "bundle": str(result.path), "name": m["name"], "version": m["version"], "notes": result.notes,
        "signed": sign_key is not None,
        "registered": None if registered is None else {
            "name": registered.name, "version": registered.version, "run_id": registered.run_id,
            "model_uri": registered.model_uri},
        "artifacts": [{k: a[k] for k in ("file", "format", "quantization", "size_bytes", "size_ratio", "parity")}
                      for a in m["artifacts"]],
    }


def _fmt(v, spec: str) -> str:
    return format(v, spec) if v is not None else "-"


def _artifact_row(a: dict) -> str:
    """One line of the result table: size, ratio and parity of an artifact."""
    p = a["parity"]
    # regressions report the mean absolute error where classifiers report the largest probability change
    max_diff = p.get("max_abs_prob_diff") if p.get("max_abs_prob_diff") is not None else p.get("mae")
    return (f"{a['file']:<24}{a['size_bytes']:>10}{_fmt(a['size_ratio'], '.2f'):>7}"
            f"{_fmt(p.get('source_metric'), '.4f'):>9}{_fmt(p.get('artifact_metric'), '.4f'):>10}"
            f"{_fmt(p.get('metric_drop_points'), '.2f'):>7}{_fmt(p.get('label_agreement'), '.3f'):>8}"
            f"{_fmt(max_diff, '.2e'):>10}")


@click.group("keys")
def keys_group():
    """Make and show Ed25519 keys for signing bundles."""


@keys_group.command("new")
@click.option("--out", "out_dir", default=".", show_default=True, type=click.Path(),
              help="Folder for NAME.key and NAME.pub.")
@click.option("--name", default="edgeops", show_default=True, help="File stem.")
@click.option("--json", "as_json", is_flag=True, help="Print the paths and key id as JSON.")
def keys_new(out_dir, name, as_json):
    """Make a new Ed25519 key pair (private key written with mode 0600)."""
    from edge_runtime import signing

    private, public = signing.generate_key_pair(out_dir, name)
    kid = signing.key_id(signing.load_public_key(public))
    if as_json:
        click.echo(json.dumps({"private_key": str(private), "public_key": str(public), "key_id": kid}))
    else:
        click.echo(f"private key: {private}  (keep it secret; sign with --sign-key)")
        click.echo(f"public key:  {public}  (give it to devices; key id {kid})")


@keys_group.command("show")
@click.argument("public_key", type=click.Path())
def keys_show(public_key):
    """Print a public key's id."""
    from edge_runtime import signing

    click.echo(signing.key_id(signing.load_public_key(public_key)))
