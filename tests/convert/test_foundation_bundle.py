"""Bundle verification: sha256 pins, signatures, archives, schema errors that name the field."""

from __future__ import annotations

import json
import tarfile

import pytest

from edge_runtime import signing
from edge_runtime.bundle import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    open_bundle,
    pack,
    sha256_file,
    validate_manifest,
    write_manifest,
)
from edge_runtime.errors import BundleError, VerificationError


def make_manifest(art_path) -> dict:
    return {
        "schema_version": 1,
        "name": "toy",
        "version": "1.2.3",
        "created_at": "2026-11-25T00:00:00Z",
        "task": "classification",
        "source": {"framework": "onnx"},
        "input_schema": {"kind": "tabular", "shape": [2], "dtype": "float32", "features": ["a", "b"]},
        "labels": ["no", "yes"],
        "artifacts": [
            {
                "file": art_path.name,
                "format": "onnx",
                "quantization": "none",
                "sha256": sha256_file(art_path),
                "size_bytes": art_path.stat().st_size,
                "inputs": [{"name": "input", "dtype": "float32", "shape": [-1, 2]}],
                "outputs": [{"name": "probabilities", "dtype": "float32", "shape": [-1, 2]}],
            }
        ],
    }


@pytest.fixture
def toy_bundle(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    art = d / "model.onnx"
    art.write_bytes(b"not really a model, but the bundle layer only pins bytes" * 10)
    write_manifest(d, make_manifest(art))
    return d


def test_a_pinned_bundle_opens_and_a_changed_byte_is_refused(toy_bundle):
    bundle = open_bundle(toy_bundle)
    assert bundle.name == "toy" and bundle.version == "1.2.3" and not bundle.signed
    art = toy_bundle / "model.onnx"
    data = bytearray(art.read_bytes())
    data[10] ^= 0xFF
    art.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="sha256 .* does not match"):
        open_bundle(toy_bundle)


def test_a_truncated_artifact_is_refused_by_size(toy_bundle):
    art = toy_bundle / "model.onnx"
    art.write_bytes(art.read_bytes()[:-5])
    with pytest.raises(VerificationError, match="truncated"):
        open_bundle(toy_bundle)


def test_signed_bundle_verifies_and_edited_manifest_is_refused(tmp_path, toy_bundle):
    key_path, pub_path = signing.generate_key_pair(tmp_path / "keys")
    doc = json.loads((toy_bundle / MANIFEST_FILE).read_text())
    write_manifest(toy_bundle, doc, sign_key=key_path)
    assert open_bundle(toy_bundle, public_key=pub_path).signed

    doc["version"] = "9.9.9"
    (toy_bundle / MANIFEST_FILE).write_text(json.dumps(doc))
    with pytest.raises(VerificationError, match="signature does not verify"):
        open_bundle(toy_bundle, public_key=pub_path)


def test_unsigned_bundle_is_refused_when_a_key_is_configured(tmp_path, toy_bundle):
    _, pub_path = signing.generate_key_pair(tmp_path / "keys")
    with pytest.raises(VerificationError, match="unsigned bundle"):
        open_bundle(toy_bundle, public_key=pub_path)


def test_signature_by_another_key_is_refused(tmp_path, toy_bundle):
    key_a, _ = signing.generate_key_pair(tmp_path / "a")
    _, pub_b = signing.generate_key_pair(tmp_path / "b")
    write_manifest(toy_bundle, json.loads((toy_bundle / MANIFEST_FILE).read_text()), sign_key=key_a)
    with pytest.raises(VerificationError, match="signed by key"):
        open_bundle(toy_bundle, public_key=pub_b)
    assert (toy_bundle / SIGNATURE_FILE).exists()


def test_tar_gz_bundle_round_trip(tmp_path, toy_bundle):
    archive = pack(toy_bundle, tmp_path / "toy.tar.gz")
    bundle = open_bundle(archive, extract_to=tmp_path / "x")
    assert bundle.artifact()["file"] == "model.onnx"


def test_archive_with_path_traversal_is_refused(tmp_path, toy_bundle):
    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(toy_bundle / MANIFEST_FILE, arcname="../manifest.json")
    with pytest.raises(BundleError, match="unsafe entry"):
        open_bundle(evil, extract_to=tmp_path / "y")


def test_schema_error_names_the_field(toy_bundle):
    doc = json.loads((toy_bundle / MANIFEST_FILE).read_text())
    doc["artifacts"][0]["sha256"] = "xyz"
    with pytest.raises(BundleError, match="artifacts/0/sha256"):
        validate_manifest(doc)
    doc["schema_version"] = 7
    with pytest.raises(BundleError, match="schema_version 7 is not supported"):
        validate_manifest(doc)


def test_artifact_file_names_cannot_escape_the_bundle(toy_bundle):
    doc = json.loads((toy_bundle / MANIFEST_FILE).read_text())
    doc["artifacts"][0]["file"] = "../../etc/passwd"
    with pytest.raises(BundleError, match="artifacts/0/file"):
        validate_manifest(doc)


def test_missing_and_non_bundle_paths(tmp_path):
    with pytest.raises(BundleError, match="no such bundle"):
        open_bundle(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path / "empty")
    (tmp_path / "bad.tar.gz").write_bytes(b"garbage")
    with pytest.raises(BundleError, match="not a readable .tar.gz"):
        open_bundle(tmp_path / "bad.tar.gz")
