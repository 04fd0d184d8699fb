"""The bundle: the unit of deployment, read and verified.

A bundle is a directory (or a ``.tar.gz`` of one) holding model files, a
``manifest.json`` that pins each of them by sha256, and optionally a detached
Ed25519 signature ``manifest.sig`` over the manifest's exact bytes. The
layout and every manifest field are documented in ``docs/bundle.md``; the
JSON Schema is ``edge_runtime/schemas/manifest.schema.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from edge_runtime.errors import BundleError, VerificationError

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


@lru_cache(maxsize=1)
def manifest_schema() -> dict:
    """The manifest's JSON Schema (schema_version 1)."""
    return json.loads(SCHEMA_PATH.read_text())


def validate_manifest(doc: Any, where: str = "manifest.json") -> None:
    """Raise BundleError unless ``doc`` is a valid manifest.

    Uses ``jsonschema`` when installed (always on the conversion and monitor
    side); a device without it still gets the structural checks that loading
    depends on.
    """
    if not isinstance(doc, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(doc).__name__}")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema_version {version!r} is not supported (this runtime reads {SCHEMA_VERSION})"
        )
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:
        validator = jsonschema.Draft202012Validator(manifest_schema())
        error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
        if error is not None:
            path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise BundleError(f"{where}: at {path}: {error.message}")
        return
    for key in ("name", "version", "task", "input_schema", "artifacts"):
        if key not in doc:
            raise BundleError(f"{where}: missing required field {key!r}")
    if not isinstance(doc["artifacts"], list) or not doc["artifacts"]:
        raise BundleError(f"{where}: 'artifacts' must be a non-empty list")
    for i, art in enumerate(doc["artifacts"]):
        for key in ("file", "format", "sha256", "inputs", "outputs"):
            if not isinstance(art, dict) or key not in art:
                raise BundleError(f"{where}: artifacts/{i}: missing required field {key!r}")
        name = art["file"]
        if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
            raise BundleError(f"{where}: artifacts/{i}/file: {name!r} must be a plain file name")


def manifest_bytes(doc: dict) -> bytes:
    """The canonical serialisation written to manifest.json (and signed)."""
    return (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk.

    Attributes:
        root: the bundle directory (extracted when it came as a .tar.gz).
        manifest: the parsed manifest.
        signed: whether a signature was present and verified against a trusted key.
    """

    root: Path
    manifest: dict = field(repr=False)
    signed: bool = False

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def artifacts(self) -> list[dict]:
        return self.manifest["artifacts"]

    def artifact(self, file: str | None = None) -> dict:
        """The manifest entry of artifact ``file`` (or the default one)."""
        if file is None:
            file = self.manifest.get("default_artifact") or self.artifacts[0]["file"]
        for art in self.artifacts:
            if art["file"] == file:
                return art
        names = ", ".join(a["file"] for a in self.artifacts)
        raise BundleError(f"{self.root}: no artifact {file!r} in this bundle (it has: {names})")

    def path_of(self, file: str) -> Path:
        return self.root / self.artifact(file)["file"]


def _extract_tarball(path: Path, dest: Path) -> Path:
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if not str(target).startswith(str(dest.resolve())) or m.issym() or m.islnk() or m.isdev():
                    raise BundleError(f"{path}: unsafe entry {m.name!r} in the archive; refusing it")
            tar.extractall(dest, members=members, filter="data") if hasattr(tarfile, "data_filter") \
                else tar.extractall(dest, members=members)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BundleError(f"{path}: not a readable .tar.gz bundle ({exc})") from None
    candidates = [dest] + [p for p in dest.iterdir() if p.is_dir()]
    for c in candidates:
        if (c / MANIFEST_FILE).is_file():
            return c
    raise BundleError(f"{path}: the archive holds no {MANIFEST_FILE}")


def open_bundle(
    path: str | Path,
    public_key: Any = None,
    require_signature: bool = False,
    extract_to: str | Path | None = None,
) -> Bundle:
    """Open a bundle directory or ``.tar.gz`` and verify it.

    Every artifact's sha256 and size must match the manifest; when
    ``public_key`` (an Ed25519 public key, or a path to its PEM file) is given,
    ``manifest.sig`` must exist and verify against it.

    Args:
        path: bundle directory or .tar.gz.
        public_key: trusted key; None skips signature checking unless required.
        require_signature: refuse a bundle without a verified signature.
        extract_to: where to unpack a .tar.gz (a new temporary folder by default).

    Returns:
        The verified Bundle.

    Raises:
        BundleError: the bundle is missing or malformed.
        VerificationError: a hash, size or the signature does not match.
    """
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such bundle (expected a directory or .tar.gz)")
    if p.is_file():
        if not (p.name.endswith(".tar.gz") or p.name.endswith(".tgz")):
            raise BundleError(f"{p}: not a bundle (expected a directory or .tar.gz)")
        dest = Path(extract_to) if extract_to else Path(tempfile.mkdtemp(prefix="edgeops-bundle-"))
        dest.mkdir(parents=True, exist_ok=True)
        p = _extract_tarball(p, dest)
    manifest_path = p / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{p}: not a bundle: {MANIFEST_FILE} is missing")
    raw = manifest_path.read_bytes()
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: {len(raw)} bytes is too large for a manifest")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    validate_manifest(doc, where=str(manifest_path))

    signed = False
    sig_path = p / SIGNATURE_FILE
    if public_key is not None:
        from edge_runtime import signing

        key = public_key if not isinstance(public_key, (str, os.PathLike, bytes)) else signing.load_public_key(public_key)
        if not sig_path.is_file():
            raise VerificationError(f"{p}: unsigned bundle, but a trusted key is configured; refusing it")
        signing.verify(raw, sig_path.read_bytes(), key, where=str(p))
        signed = True
    elif require_signature:
        raise VerificationError(f"{p}: a signature is required but no trusted public key was given")

    for art in doc["artifacts"]:
        fpath = p / art["file"]
        if not fpath.is_file():
            raise VerificationError(f"{p}: artifact {art['file']} is listed in the manifest but missing")
        size = fpath.stat().st_size
        if "size_bytes" in art and size != art["size_bytes"]:
            raise VerificationError(
                f"{fpath}: size {size} bytes does not match the manifest's {art['size_bytes']} (tampered or truncated)"
            )
        digest = sha256_file(fpath)
        if digest != art["sha256"]:
            raise VerificationError(
                f"{fpath}: sha256 {digest[:12]}... does not match the manifest's {art['sha256'][:12]}... (tampered or corrupt)"
            )
    return Bundle(root=p, manifest=doc, signed=signed)


def write_manifest(bundle_dir: str | Path, doc: dict, sign_key: Any = None) -> Path:
    """Validate and write ``manifest.json`` (and ``manifest.sig`` when a private key is given).

    ``sign_key`` is an Ed25519 private key or a path to its PEM file.
    """
    d = Path(bundle_dir)
    validate_manifest(doc, where=str(d / MANIFEST_FILE))
    data = manifest_bytes(doc)
    (d / MANIFEST_FILE).write_bytes(data)
    if sign_key is not None:
        from edge_runtime import signing

        key = sign_key if not isinstance(sign_key, (str, os.PathLike)) else signing.load_private_key(sign_key)
        (d / SIGNATURE_FILE).write_text(json.dumps(signing.sign(data, key), indent=2) + "\n")
    return d / MANIFEST_FILE


def pack(bundle_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write a ``.tar.gz`` of a bundle directory (files at the archive's top level)."""
    d = Path(bundle_dir)
    out = Path(out_file) if out_file else d.with_name(d.name + ".tar.gz")
    with tarfile.open(out, "w:gz") as tar:
        for f in sorted(d.iterdir()):
            if f.is_file():
                tar.add(f, arcname=f.name)
    return out
