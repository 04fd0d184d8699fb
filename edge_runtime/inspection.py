"""`edgeops inspect`: what is in a bundle or a model file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from edge_runtime.errors import EdgeOpsError, ModelFormatError, VerificationError


def describe(path: str | Path, public_key: str | None = None) -> dict:
    """A JSON-able description of a bundle (dir or .tar.gz) or a bare .tflite/.onnx file.

    A .tar.gz is unpacked into a temporary folder that is gone when this returns.

    Raises:
        ModelFormatError: a bare model file its interpreter cannot read (whatever the interpreter raised).
        BundleError, VerificationError: the bundle is malformed or its pins do not verify.
    """
    from edge_runtime.bundle import opened_bundle

    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".tflite", ".onnx"):
        return _describe_model(p)
    with opened_bundle(p) as bundle:
        signature = _signature_state(bundle, public_key)
        m = bundle.manifest
        root = str(bundle.root) if bundle.scratch is None else str(p)
    return {
        "kind": "bundle", "path": root, "name": m["name"], "version": m["version"],
        "created_at": m["created_at"], "task": m["task"], "source": m["source"],
        "input_schema": m["input_schema"], "labels": m.get("labels"), "signature": signature,
        "hashes": "verified", "default_artifact": m.get("default_artifact"),
        "artifacts": [
            {k: a.get(k) for k in ("file", "format", "quantization", "size_bytes", "size_ratio", "sha256",
                                    "inputs", "outputs", "parity")}
            for a in m["artifacts"]
        ],
        "reference_profile": {
            "n_samples": (m.get("reference_profile") or {}).get("n_samples"),
            "features": len((m.get("reference_profile") or {}).get("features", [])),
        },
        "test_vectors": len(m.get("test_vectors", [])),
    }


def _describe_model(p: Path) -> dict:
    from edge_runtime.backends import open_backend

    try:
        b = open_backend(p)
        inputs, outputs = [t.to_dict() for t in b.inputs], [t.to_dict() for t in b.outputs]
    except EdgeOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - an interpreter's own error types: the file is not a usable model
        raise ModelFormatError(f"{p}: cannot read the model ({type(exc).__name__}: {str(exc)[:200]})") from None
    return {
        "kind": "model", "path": str(p), "format": p.suffix[1:].lower(), "size_bytes": p.stat().st_size,
        "backend": b.name, "backend_version": b.version, "inputs": inputs, "outputs": outputs,
    }


def _signature_state(bundle, public_key: str | None) -> str:
    from edge_runtime.bundle import MANIFEST_FILE, SIGNATURE_FILE, check_signature

    sig_path = bundle.root / SIGNATURE_FILE
    if not sig_path.exists():
        return "INVALID: unsigned bundle, but a public key was given" if public_key else "unsigned"
    if not public_key:
        return "present (no public key given to verify it)"
    try:
        check_signature((bundle.root / MANIFEST_FILE).read_bytes(), sig_path.read_bytes(), public_key, True,
                        str(bundle.root))
    except VerificationError as exc:
        return f"INVALID: {exc}"
    return "verified"


def _tensor(t: dict) -> str:
    q = t.get("quantization")
    qs = f" q(scale={q['scale']:.4g}, zp={q['zero_point']})" if q else ""
    return f"{t['name']} {t['dtype']}{list(t['shape'])}{qs}"


def _num(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _artifact_rows(info: dict) -> list[list[str]]:
    rows = []
    for a in info["artifacts"]:
        p = a.get("parity") or {}
        star = "*" if a["file"] == info["default_artifact"] else " "
        rows.append([star + a["file"], a["format"], a["quantization"], str(a["size_bytes"]),
                     _num(a["size_ratio"], ".2f"), _num(p.get("artifact_metric"), ".4f"),
                     _num(p.get("metric_drop_points"), ".2f"), _num(p.get("label_agreement"), ".3f"),
                     _tensor(a["inputs"][0]) + " -> " + _tensor(a["outputs"][0])])
    return rows


_HEADERS = ["artifact", "format", "quant", "bytes", "ratio", "metric", "drop", "agree", "input -> output"]


def _print_plain_table(rows: list[list[str]]) -> None:
    """The artifact table as aligned plain text (without rich)."""
    widths = [max(len(r[i]) for r in rows + [_HEADERS]) for i in range(len(_HEADERS))]
    for r in [_HEADERS] + rows:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _print_artifacts(info: dict) -> None:
    """The artifact table: rich when installed, aligned plain text otherwise."""
    rows = _artifact_rows(info)
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        _print_plain_table(rows)
        return
    table = Table(show_edge=False, pad_edge=False, box=None, header_style="bold")
    for i, h in enumerate(_HEADERS):
        table.add_column(h, justify="right" if 3 <= i <= 7 else "left", no_wrap=True)
    for r in rows:
        table.add_row(*[Text(c) for c in r])
    # piped output keeps whole lines: no wrapping at 80 columns when stdout is not a terminal
    console = Console(width=None if click.get_text_stream("stdout").isatty() else 240, highlight=False)
    with console.capture() as captured:
        console.print(table)
    for line in captured.get().splitlines():
        click.echo(line.rstrip())


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--public-key", type=click.Path(), help="Ed25519 public key (PEM) to verify the signature with.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect_cmd(path, public_key, as_json):
    """Show PATH's inputs, outputs, dtypes, quantization, sizes, parity and signature.

    PATH is a bundle directory, a bundle .tar.gz, or a bare .tflite/.onnx file.
    Exits with 4 when --public-key is given and the signature does not verify.
    """
    info = describe(path, public_key)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    elif info["kind"] == "model":
        _print_model(info)
    else:
        _print_bundle(info)
    if str(info.get("signature", "")).startswith("INVALID"):
        raise VerificationError(f"{path}: signature {info['signature']}")


def _print_model(info: dict) -> None:
    """A bare model file: its format, size, backend and tensors."""
    click.echo(f"{info['path']}: {info['format']} model, {info['size_bytes']} bytes, "
               f"runs on {info['backend']} {info['backend_version']}")
    for t in info["inputs"]:
        click.echo(f"  input   {_tensor(t)}")
    for t in info["outputs"]:
        click.echo(f"  output  {_tensor(t)}")


def _print_bundle(info: dict) -> None:
    """A bundle: its origin, hashes and signature, input, labels, profile and artifact table."""
    click.echo(f"{info['name']} {info['version']}  ({info['task']}, from {info['source']['framework']} "
               f"{info['source'].get('model_type') or ''}, created {info['created_at']})")
    click.echo(f"  path:      {info['path']}")
    click.echo(f"  hashes:    {info['hashes']}; signature: {info['signature']}")
    schema = info["input_schema"]
    click.echo(f"  input:     {schema['kind']} {schema['shape']}"
               + (f", {len(schema['features'])} named features" if schema.get("features") else ""))
    if info.get("labels"):
        click.echo(f"  labels:    {', '.join(info['labels'][:12])}")
    click.echo(f"  profile:   {info['reference_profile']['features']} features on "
               f"{info['reference_profile']['n_samples']} samples; {info['test_vectors']} test vector sets")
    click.echo("  artifacts (* = default; metric/drop/agree: parity measured at conversion):")
    _print_artifacts(info)

