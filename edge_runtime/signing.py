"""Ed25519 signatures over a bundle's manifest.

The manifest pins every artifact by sha256, so one detached signature over
the manifest's exact bytes covers the whole bundle. The signature file
(`manifest.sig`) is JSON: ``{"algorithm": "ed25519", "key_id": ..., "signature": <base64>}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_runtime.errors import InvalidInputError, VerificationError

ALGORITHM = "ed25519"


def generate_key_pair(out_dir: str | Path, name: str = "edgeops") -> tuple[Path, Path]:
    """Write a new Ed25519 key pair as PEM files.

    Args:
        out_dir: folder to write ``NAME.key`` (private, mode 0600) and ``NAME.pub``.
        name: file stem.

    Returns:
        (private key path, public key path).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (private_path, public_path):
        if p.exists():
            raise InvalidInputError(f"{p} exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private_path.touch(mode=0o600)
    private_path.write_bytes(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """Read an Ed25519 private key from a PEM file (clear error if it is not one)."""
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise InvalidInputError(f"signing key {path}: no such file") from None
    except (ValueError, TypeError) as exc:
        raise InvalidInputError(f"signing key {path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidInputError(f"signing key {path}: not an Ed25519 key")
    return key


def load_public_key(path_or_pem: str | Path | bytes) -> Ed25519PublicKey:
    """Read an Ed25519 public key from a PEM file or PEM bytes."""
    if isinstance(path_or_pem, bytes):
        data, where = path_or_pem, "public key"
    else:
        where = f"public key {path_or_pem}"
        try:
            data = Path(path_or_pem).read_bytes()
        except FileNotFoundError:
            raise InvalidInputError(f"{where}: no such file") from None
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise InvalidInputError(f"{where}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidInputError(f"{where}: not an Ed25519 key")
    return key


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short, stable id of a public key: the first 16 hex digits of sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(data: bytes, private_key: Ed25519PrivateKey) -> dict:
    """Return the signature document for ``data``."""
    return {
        "algorithm": ALGORITHM,
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode("ascii"),
    }


def _parsed_signature(signature_doc: bytes | dict, where: str) -> tuple[dict, bytes]:
    """(the signature document, the signature bytes); VerificationError when malformed or of another algorithm."""
    try:
        doc = json.loads(signature_doc) if isinstance(signature_doc, bytes) else signature_doc
        if doc.get("algorithm") != ALGORITHM:
            raise VerificationError(f"{where}: signature algorithm {doc.get('algorithm')!r} is not {ALGORITHM}")
        return doc, base64.b64decode(doc["signature"], validate=True)
    except VerificationError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise VerificationError(f"{where}: signature file is malformed") from None


def verify(data: bytes, signature_doc: bytes | dict, public_key: Ed25519PublicKey, where: str = "bundle") -> None:
    """Raise VerificationError unless ``signature_doc`` is a valid signature of ``data``."""
    doc, sig = _parsed_signature(signature_doc, where)
    expected_id = key_id(public_key)
    if doc.get("key_id") not in (None, expected_id):
        raise VerificationError(
            f"{where}: signed by key {doc.get('key_id')}, but the trusted key is {expected_id}"
        )
    try:
        public_key.verify(sig, data)
    except InvalidSignature:
        raise VerificationError(f"{where}: signature does not verify (manifest changed or wrong key)") from None
