"""The bundle: the unit of deployment, read and verified.

A bundle is a directory (or a ``.tar.gz`` of one) holding model files, a
``manifest.json`` that pins each of them by sha256, and optionally a detached
Ed25519 signature ``manifest.sig`` over the manifest's exact bytes. The
layout and every manifest field are documented in ``docs/bundle.md``; the
JSON Schema is ``edge_runtime/schemas/manifest.schema.json``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from edge_runtime.errors import BundleError, VerificationError

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).parent / "schemas" / "manifest.schema.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_SIGNATURE_BYTES = 64 * 1024
#: Prefix of the temporary folders .tar.gz bundles are unpacked into.
TEMP_PREFIX = "edgeops-bundle-"


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
        _check_structure(doc, where)
    else:
        _check_schema(jsonschema, doc, where)
    _check_file_list(doc, where)


def _check_schema(jsonschema, doc: dict, where: str) -> None:
    """BundleError naming the most relevant place where doc does not follow the manifest's JSON Schema."""
    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(doc))
    if error is not None:
        path = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise BundleError(f"{where}: at {path}: {error.message}")


def _check_structure(doc: dict, where: str) -> None:
    for key in ("name", "version", "task", "input_schema", "artifacts"):
        if key not in doc:
            raise BundleError(f"{where}: missing required field {key!r}")
    if not isinstance(doc["artifacts"], list) or not doc["artifacts"]:
        raise BundleError(f"{where}: 'artifacts' must be a non-empty list")
    for i, art in enumerate(doc["artifacts"]):
        _check_artifact_entry(art, f"{where}: artifacts/{i}")


def _is_plain_name(name: Any) -> bool:
    """A string naming a file in the bundle's own folder (no separator, not hidden)."""
    return isinstance(name, str) and "/" not in name and "\\" not in name and not name.startswith(".")


def _check_artifact_entry(art: Any, where: str) -> None:
    """The fields loading needs of one artifact entry: a plain file name, a positive size."""
    for key in ("file", "format", "sha256", "inputs", "outputs"):
        if not isinstance(art, dict) or key not in art:
            raise BundleError(f"{where}: missing required field {key!r}")
    if not _is_plain_name(art["file"]):
        raise BundleError(f"{where}/file: {art['file']!r} must be a plain file name")
    size = art.get("size_bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise BundleError(f"{where}/size_bytes: {size!r} must be a positive integer")


def _check_file_list(doc: dict, where: str) -> None:
    """Artifact files are distinct and are not the manifest's own files."""
    seen: set[str] = set()
    for i, art in enumerate(doc["artifacts"]):
        name = art["file"]
        if name in (MANIFEST_FILE, SIGNATURE_FILE) or name in seen:
            raise BundleError(f"{where}: artifacts/{i}/file: {name!r} is listed twice or names the manifest")
        seen.add(name)


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
        scratch: the temporary folder a .tar.gz was unpacked into, when :func:`open_bundle` made one;
            :meth:`cleanup` (or :func:`opened_bundle`) removes it.
    """

    root: Path
    manifest: dict = field(repr=False)
    signed: bool = False
    scratch: Path | None = None

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

    def cleanup(self) -> None:
        """Remove the temporary folder this bundle was unpacked into (nothing for a bundle directory)."""
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


# -- archives -----------------------------------------------------------------------------------

def _unsafe(name: str) -> bool:
    """An absolute path, a backslash, a ``..`` or an empty path component."""
    parts = name.split("/")
    return name.startswith("/") or "\\" in name or ".." in parts or "" in parts[:-1]


def _entry_name(member: tarfile.TarInfo, where: Path) -> str:
    """The member's path inside the archive, normalised; BundleError for absolute or ``..`` paths."""
    name = member.name
    while name.startswith("./"):
        name = name[2:]
    if _unsafe(name):
        raise BundleError(f"{where}: unsafe entry {member.name!r} (absolute or .. path) in the archive; refusing it")
    return name.rstrip("/")


def _entry_kind(member: tarfile.TarInfo) -> str:
    for kind, test in (("symlink", member.issym), ("hard link", member.islnk), ("FIFO", member.isfifo),
                       ("device", member.isdev), ("sparse file", member.issparse)):
        if test():
            return kind
    return "file" if member.isreg() else "directory" if member.isdir() else f"entry of type {member.type!r}"


def _read_small(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int, where: str) -> bytes:
    if member.size > limit:
        raise BundleError(f"{where}: {member.size} bytes is too large (at most {limit})")
    fh = tar.extractfile(member)
    data = fh.read(member.size) if fh is not None else b""
    if len(data) != member.size:
        raise BundleError(f"{where}: truncated in the archive")
    return data


def _copy_artifact(src: BinaryIO, target: Path, art: dict, where: str) -> None:
    """Write exactly the listed number of bytes, hashing them on the way; refuse a wrong digest."""
    remaining, digest = art["size_bytes"], hashlib.sha256()
    with open(target, "xb") as out:
        while remaining:
            block = src.read(min(1 << 20, remaining))
            if not block:
                raise BundleError(f"{where}: truncated in the archive")
            digest.update(block)
            out.write(block)
            remaining -= len(block)
    if digest.hexdigest() != art["sha256"]:
        raise VerificationError(f"{where}: sha256 {digest.hexdigest()[:12]}... does not match the manifest's "
                                f"{art['sha256'][:12]}... (tampered or corrupt)")


#: Decompressed bytes an archive may hold besides its files' contents: tar headers (pax or GNU
#: long-name records included), block padding and tarfile's read-ahead.
_HEADER_ALLOWANCE = 1 << 20


class _BoundedStream:
    """A decompressed archive stream that refuses to yield more than ``limit`` bytes in total.

    Tar headers are read whole into memory (a pax record or a GNU long name can claim any size),
    so the bound applies to everything decompressed, not only to what is written.
    """

    def __init__(self, fileobj: BinaryIO, limit: int, where: Path):
        self.fileobj, self.limit, self.where = fileobj, limit, where
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        allowed = self.limit - self.read_bytes
        want = allowed + 1 if size is None or size < 0 else min(size, allowed + 1)
        data = self.fileobj.read(want)
        self.read_bytes += len(data)
        if self.read_bytes > self.limit:
            raise BundleError(f"{self.where}: the archive holds more than its manifest lists "
                              f"(over {self.limit} bytes unpacked); refusing the bundle")
        return data


class _ArchiveReader:
    """Unpacks a bundle .tar.gz in one pass, the manifest first, writing only what the manifest lists.

    The archive is read as a stream: ``manifest.json`` (and ``manifest.sig``) must come before any
    artifact, so the manifest is parsed and its signature checked before a byte of anything else is
    written; every later entry must be a listed artifact of exactly its listed size, so the bytes
    written never exceed the manifest's sizes, whatever the archive holds.
    """

    def __init__(self, path: Path, dest: Path, public_key: Any, require_signature: bool):
        self.path, self.dest = path, dest
        self.public_key, self.require_signature = public_key, require_signature
        self.prefix: str | None = None
        self.raw: bytes | None = None
        self.sig: bytes | None = None
        self.listed: dict[str, dict] = {}
        self.written: set[str] = set()
        self.trusted = False
        self.stream: _BoundedStream   # set by read()

    def read(self) -> Path:
        try:
            with open(self.path, "rb") as raw, gzip.GzipFile(fileobj=raw) as unzipped:
                self.stream = _BoundedStream(unzipped, _HEADER_ALLOWANCE + MAX_MANIFEST_BYTES + MAX_SIGNATURE_BYTES,
                                             self.path)
                with tarfile.open(fileobj=self.stream, mode="r|") as tar:
                    for member in tar:
                        self._entry(tar, member)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise BundleError(f"{self.path}: not a readable .tar.gz bundle ({exc})") from None
        except OSError as exc:
            raise BundleError(f"{self.path}: cannot unpack the bundle ({exc})") from None
        if self.raw is None:
            raise BundleError(f"{self.path}: the archive holds no {MANIFEST_FILE}")
        self._trust()
        return self.root

    @property
    def root(self) -> Path:
        return self.dest / self.prefix if self.prefix else self.dest

    def _entry(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = _entry_name(member, self.path)
        kind = _entry_kind(member)
        if kind == "directory":
            self._folder(name, member)
            return
        if kind != "file":
            raise BundleError(f"{self.path}: {member.name!r} is a {kind}; a bundle holds regular files only")
        if self._is_first_manifest_in_folder(name):
            self._folder(name.split("/")[0], member)
        rel = self._relative(name, member)
        where = f"{self.path}: {rel}"
        if rel == MANIFEST_FILE:
            self._manifest(tar, member, where)
        elif rel == SIGNATURE_FILE:
            self._signature(tar, member, where)
        else:
            self._artifact(tar, member, rel, where)

    def _is_first_manifest_in_folder(self, name: str) -> bool:
        """Whether name is the manifest (or signature) in a top-level folder, before any folder was seen."""
        return self.raw is None and self.prefix is None and name.count("/") == 1 and \
            name.split("/")[1] in (MANIFEST_FILE, SIGNATURE_FILE)

    def _manifest(self, tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> None:
        """Read and validate the manifest; from then on the stream may hold only the artifacts it lists."""
        if self.raw is not None:
            raise BundleError(f"{self.path}: {MANIFEST_FILE} appears twice in the archive")
        self.raw = _read_small(tar, member, MAX_MANIFEST_BYTES, where)
        self.listed = {a["file"]: a for a in parse_manifest(self.raw, where)["artifacts"]}
        # from here on the archive may hold the listed artifacts and their headers, nothing more
        self.stream.limit = self.stream.read_bytes + _HEADER_ALLOWANCE + MAX_SIGNATURE_BYTES + sum(
            a["size_bytes"] + tarfile.BLOCKSIZE for a in self.listed.values())
        (self.root / MANIFEST_FILE).write_bytes(self.raw)

    def _signature(self, tar: tarfile.TarFile, member: tarfile.TarInfo, where: str) -> None:
        if self.sig is not None or self.trusted:
            raise BundleError(f"{self.path}: {SIGNATURE_FILE} must appear once, before the artifacts")
        self.sig = _read_small(tar, member, MAX_SIGNATURE_BYTES, where)

    def _artifact(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, where: str) -> None:
        """Write a listed artifact, once, after the manifest and its signature were checked."""
        if self.raw is None:
            raise BundleError(f"{self.path}: {rel!r} comes before {MANIFEST_FILE}; a bundle archive starts with "
                              f"its manifest (edge_runtime.bundle.pack writes it first)")
        self._trust()
        art = self._listed_artifact(rel, member)
        src = tar.extractfile(member)
        assert src is not None  # a regular file
        self.written.add(rel)
        _copy_artifact(src, self.root / rel, art, where)

    def _listed_artifact(self, rel: str, member: tarfile.TarInfo) -> dict:
        """The manifest entry of an archive member not written yet, of exactly its listed size."""
        art = self.listed.get(rel)
        if art is None:
            raise BundleError(f"{self.path}: {rel!r} ({member.size} bytes) is not listed in the manifest; "
                              "refusing the bundle")
        if rel in self.written:
            raise BundleError(f"{self.path}: {rel!r} appears twice in the archive")
        if member.size != art["size_bytes"]:
            raise VerificationError(f"{self.path}: {rel}: {member.size} bytes in the archive, the manifest lists "
                                    f"{art['size_bytes']} (tampered or truncated)")
        return art

    def _folder(self, name: str, member: tarfile.TarInfo) -> None:
        if name in ("", ".") or (self.prefix is not None and name == self.prefix):
            return
        if self.prefix is None and self.raw is None and "/" not in name:
            self.prefix = name
            (self.dest / name).mkdir()
            return
        raise BundleError(f"{self.path}: folder {member.name!r} in the archive; a bundle holds files at its top level "
                          "(or in one top-level folder)")

    def _relative(self, name: str, member: tarfile.TarInfo) -> str:
        if self.prefix is not None:
            if not name.startswith(self.prefix + "/"):
                raise BundleError(f"{self.path}: {member.name!r} is outside the bundle's folder {self.prefix!r}")
            name = name[len(self.prefix) + 1:]
        if "/" in name:
            raise BundleError(f"{self.path}: {member.name!r} is in a sub-folder; a bundle holds files only")
        return name

    def _trust(self) -> None:
        """Check the signature once, before the first artifact is written."""
        if self.trusted:
            return
        assert self.raw is not None
        if self.sig is not None:
            (self.root / SIGNATURE_FILE).write_bytes(self.sig)
        check_signature(self.raw, self.sig, self.public_key, self.require_signature, str(self.path))
        self.trusted = True


def parse_manifest(raw: bytes, where: str) -> dict:
    """Parse and validate manifest bytes; BundleError when they are not a valid manifest."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where}: {len(raw)} bytes is too large for a manifest")
    try:
        doc = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc})") from None
    validate_manifest(doc, where=where)
    return doc


def check_signature(raw: bytes, sig: bytes | None, public_key: Any, require_signature: bool, where: str) -> bool:
    """Verify ``sig`` over manifest bytes ``raw`` when a key is given; True when it verified.

    Raises:
        VerificationError: a key is given and the signature is missing or does not verify, or a
            signature is required and no key is given.
    """
    if public_key is None:
        if require_signature:
            raise VerificationError(f"{where}: a signature is required but no trusted public key was given")
        return False
    from edge_runtime import signing

    key = public_key if not isinstance(public_key, (str, os.PathLike, bytes)) else signing.load_public_key(public_key)
    if sig is None:
        raise VerificationError(f"{where}: unsigned bundle, but a trusted key is configured; refusing it")
    signing.verify(raw, sig, key, where=where)
    return True


# -- opening ------------------------------------------------------------------------------------

def open_bundle(
    path: str | Path,
    public_key: Any = None,
    require_signature: bool = False,
    extract_to: str | Path | None = None,
) -> Bundle:
    """Open a bundle directory or ``.tar.gz`` and verify it.

    A bundle is closed: it holds ``manifest.json``, optionally ``manifest.sig``, and exactly the
    artifacts the manifest lists, each of its listed size and sha256. When ``public_key`` (an
    Ed25519 public key, or a path to its PEM file) is given, ``manifest.sig`` must exist and
    verify against it. A ``.tar.gz`` is unpacked manifest first (see :class:`_ArchiveReader`):
    anything unlisted, oversized, a link, device or FIFO, or an absolute or ``..`` path is refused
    before it is written.

    Args:
        path: bundle directory or .tar.gz.
        public_key: trusted key; None skips signature checking unless required.
        require_signature: refuse a bundle without a verified signature.
        extract_to: where to unpack a .tar.gz. By default a new temporary folder, which the returned
            bundle's :meth:`Bundle.cleanup` removes (:func:`opened_bundle` does it for you); it is
            removed right away when the bundle is refused.

    Returns:
        The verified Bundle.

    Raises:
        BundleError: the bundle is missing, malformed, or holds files its manifest does not list.
        VerificationError: a hash, size or the signature does not match.
    """
    p = Path(path)
    if not p.exists():
        raise BundleError(f"{p}: no such bundle (expected a directory or .tar.gz)")
    if not p.is_file():
        return _open_dir(p, public_key, require_signature)
    if not (p.name.endswith(".tar.gz") or p.name.endswith(".tgz")):
        raise BundleError(f"{p}: not a bundle (expected a directory or .tar.gz)")
    return _open_archive(p, public_key, require_signature, extract_to)


def _open_archive(p: Path, public_key: Any, require_signature: bool, extract_to: str | Path | None) -> Bundle:
    """Unpack a .tar.gz bundle (into a new temporary folder unless extract_to is given) and open it."""
    scratch = None if extract_to else Path(tempfile.mkdtemp(prefix=TEMP_PREFIX))
    dest = Path(extract_to) if extract_to else scratch
    assert dest is not None
    try:
        dest.mkdir(parents=True, exist_ok=True)
        root = _ArchiveReader(p, dest, public_key, require_signature).read()
        bundle = _open_dir(root, public_key, require_signature)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return replace(bundle, scratch=scratch)


@contextmanager
def opened_bundle(path: str | Path, public_key: Any = None, require_signature: bool = False) -> Iterator[Bundle]:
    """:func:`open_bundle` as a context manager: a .tar.gz's temporary folder is removed on exit."""
    bundle = open_bundle(path, public_key=public_key, require_signature=require_signature)
    try:
        yield bundle
    finally:
        bundle.cleanup()


def _open_dir(p: Path, public_key: Any, require_signature: bool) -> Bundle:
    manifest_path = p / MANIFEST_FILE
    if not manifest_path.is_file():
        raise BundleError(f"{p}: not a bundle: {MANIFEST_FILE} is missing")
    if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: {manifest_path.stat().st_size} bytes is too large for a manifest")
    raw = manifest_path.read_bytes()
    doc = parse_manifest(raw, str(manifest_path))
    _check_closed(p, doc)
    signed = check_signature(raw, _read_signature(p), public_key, require_signature, str(p))
    for art in doc["artifacts"]:
        _verify_artifact(p, art)
    return Bundle(root=p, manifest=doc, signed=signed)


def _read_signature(p: Path) -> bytes | None:
    """The bundle directory's signature bytes, None when it has none."""
    sig_path = p / SIGNATURE_FILE
    sig = sig_path.read_bytes()[:MAX_SIGNATURE_BYTES + 1] if sig_path.is_file() else None
    if sig is not None and len(sig) > MAX_SIGNATURE_BYTES:
        raise BundleError(f"{sig_path}: too large for a signature (at most {MAX_SIGNATURE_BYTES} bytes)")
    return sig


def _verify_artifact(p: Path, art: dict) -> None:
    """The artifact file exists with the manifest's size and sha256; VerificationError otherwise."""
    fpath = p / art["file"]
    if not fpath.is_file():
        raise VerificationError(f"{p}: artifact {art['file']} is listed in the manifest but missing")
    size = fpath.stat().st_size
    if size != art["size_bytes"]:
        raise VerificationError(
            f"{fpath}: size {size} bytes does not match the manifest's {art['size_bytes']} (tampered or truncated)"
        )
    digest = sha256_file(fpath)
    if digest != art["sha256"]:
        raise VerificationError(
            f"{fpath}: sha256 {digest[:12]}... does not match the manifest's {art['sha256'][:12]}... "
            "(tampered or corrupt)"
        )


def _check_closed(p: Path, doc: dict) -> None:
    """Refuse a bundle directory holding anything but its manifest, signature and listed artifacts."""
    allowed = {MANIFEST_FILE, SIGNATURE_FILE} | {a["file"] for a in doc["artifacts"]}
    for entry in sorted(os.scandir(p), key=lambda e: e.name):
        if entry.name not in allowed:
            raise BundleError(f"{p}: {entry.name!r} is not listed in the manifest; a bundle holds only its "
                              "manifest, signature and listed artifacts")
        if entry.is_symlink() or not entry.is_file(follow_symlinks=False):
            raise BundleError(f"{p}: {entry.name!r} is not a regular file (links and folders are refused)")


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


def _archive_order(f: Path) -> tuple:
    """Sort key of a bundle's files in its archive: the manifest, the signature, then the rest by name."""
    first = [MANIFEST_FILE, SIGNATURE_FILE]
    return (f.name not in first, first.index(f.name) if f.name in first else 0, f.name)


def pack(bundle_dir: str | Path, out_file: str | Path | None = None) -> Path:
    """Write a ``.tar.gz`` of a bundle directory: files at the top level, the manifest and signature first."""
    d = Path(bundle_dir)
    out = Path(out_file) if out_file else d.with_name(d.name + ".tar.gz")
    files = sorted((f for f in d.iterdir() if f.is_file()), key=_archive_order)
    with tarfile.open(out, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=f.name)
    return out
