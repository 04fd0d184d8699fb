"""Flashing on the device: stage a new bundle, check it, switch atomically, keep the old one.

Layout under the agent's state folder::

    bundles/<name>-<version>-<sha12>/   unpacked, verified bundles
    active  -> bundles/...              symlink: what the agent runs
    previous -> bundles/...             symlink: what a rollback returns to
    staging/                            transfers in progress

The switch is one ``rename`` of a symlink over another (atomic on POSIX), done
only after the new bundle verified (sha256 pins, signature when a trusted key
is configured), fits the inputs of the bundle it replaces (kind, shape, dtype,
feature names; unless forced) and passed its health check (the manifest's test vectors, run
in a child process under a time limit). A crash or power cut at any moment
leaves ``active`` pointing at a complete bundle: the old one or the new one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edge_runtime.bundle import open_bundle
from edge_runtime.errors import BundleError, EdgeOpsError, QualityCheckError, VerificationError

HEALTH_CHECK = """
import json, sys
import edge_runtime
m = edge_runtime.load(sys.argv[1], public_key=sys.argv[2] or None, verify_vectors=False)
worst = m.self_test()
print(json.dumps({"artifact": m.path.name, "max_diff": worst}))
"""


#: Test hook: ``EDGEOPS_FLASH_FAULT=<step>`` kills the process (SIGKILL, like a power cut) right after
#: that step of :meth:`BundleSlots.flash`: staged, health_checked, previous, switched.
FAULT_ENV = "EDGEOPS_FLASH_FAULT"

#: Why a device without a trusted key refuses flashes (it would run anything anyone may publish).
NO_TRUSTED_KEY = "no trusted key: start the agent with --public-key or --allow-unsigned"


class InputSchemaMismatch(VerificationError):
    """A bundle whose inputs do not fit the bundle the device runs (refused unless forced)."""


def input_schema(manifest: dict) -> dict:
    """What a bundle's inputs look like, as far as fitting a device goes (also a status's ``input``).

    Returns:
        ``{"kind", "shape", "dtype", "features", "feature_names_sha256"}``: ``features`` is the
        number of values per sample, the digest (16 hex) is of the tabular feature names in order
        (None when the manifest names none).
    """
    s = manifest.get("input_schema") or {}
    shape = [int(d) for d in s.get("shape") or []]
    names = s.get("features") or None
    return {"kind": s.get("kind"), "shape": shape, "dtype": s.get("dtype"),
            "features": len(names) if names else math.prod(d for d in shape if d > 0),
            "feature_names_sha256": _names_digest(names)}


def _names_digest(names: list[str] | None) -> str | None:
    """16 hex digits of the sha256 of the feature names in order; None without names."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16] if names else None


def describe_input(schema: dict) -> str:
    """``image 8x8x1 float32 (64 values)``: one line for messages."""
    shape = "x".join("any" if d < 0 else str(d) for d in schema.get("shape") or []) or "?"
    return f"{schema.get('kind') or '?'} {shape} {schema.get('dtype') or '?'} ({schema.get('features')} values)"


def input_differences(current: dict, new: dict, current_names=None, new_names=None) -> list[str]:
    """How ``new`` does not fit ``current`` (both from :func:`input_schema`); empty when it fits.

    Feature names are compared when both sides know them: by name with the lists, else by digest.
    """
    out = [label for key, label in _SCHEMA_FIELDS if _known_and_different(current.get(key), new.get(key))]
    if out:
        return out
    if current_names and new_names:
        return _name_difference(current_names, new_names)
    if current.get("feature_names_sha256") and new.get("feature_names_sha256") \
            and current["feature_names_sha256"] != new["feature_names_sha256"]:
        return ["feature names"]
    return []


# the fields of an input schema that must match, and how a difference is named
_SCHEMA_FIELDS = (("kind", "image vs tabular"), ("shape", "shape"), ("dtype", "dtype"),
                  ("features", "values per sample"))


def _known_and_different(a, b) -> bool:
    return a is not None and b is not None and a != b


def _name_difference(current_names, new_names) -> list[str]:
    """The first column whose feature name differs, as a one-item list; empty when none does."""
    # same count here (compared before), so zip stops at neither's end early
    diff = next((i for i, (a, b) in enumerate(zip(current_names, new_names, strict=False)) if a != b), None)
    if diff is None:
        return []
    return [f"feature names (column {diff}: {current_names[diff]!r} now, {new_names[diff]!r} in the new one)"]


def check_fit(current: dict, new: dict, current_label: str, new_label: str, current_names=None,
              new_names=None) -> None:
    """Raise :class:`InputSchemaMismatch` naming both schemas when ``new`` does not fit ``current``."""
    diffs = input_differences(current, new, current_names, new_names)
    if diffs:
        raise InputSchemaMismatch(
            f"input schema mismatch: {new_label} takes {describe_input(new)}, but {current_label} takes "
            f"{describe_input(current)} ({', '.join(diffs)} differ); flash with --force-schema to override")


def _remove(p: Path) -> None:
    """Remove a file, a link or a whole folder."""
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def _fault(step: str) -> None:
    if os.environ.get(FAULT_ENV) == step:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class FlashResult:
    ok: bool
    stage: str            # received | verified | health_checked | switched | rolled_back | failed
    message: str
    bundle: str | None = None
    version: str | None = None


class BundleSlots:
    """The active and previous bundles of a device, switched atomically.

    Args:
        state_dir: the device's state folder.
        public_key: trusted Ed25519 key (PEM path): every bundle must be signed by it.
        allow_unsigned: take flashes of unsigned bundles when no key is given. Without a key and
            without this, :meth:`flash` refuses everything (:data:`NO_TRUSTED_KEY`): a device
            must not run whatever anyone who may publish on its cmd topic sends. Bundles given
            locally (:meth:`install_initial`, :meth:`adopt`) are the operator's own and are taken.
    """

    def __init__(self, state_dir: str | Path, public_key: str | None = None, allow_unsigned: bool = False):
        if public_key is not None and allow_unsigned:
            raise ValueError("a trusted public key and allow_unsigned exclude each other: choose one")
        self.root = Path(state_dir)
        self.bundles = self.root / "bundles"
        self.staging = self.root / "staging"
        self.bundles.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key
        self.allow_unsigned = allow_unsigned
        self.clean_staging()

    def flash_refusal(self) -> str | None:
        """Why this device refuses every flash (no trusted key and unsigned not allowed), else None."""
        return NO_TRUSTED_KEY if self.public_key is None and not self.allow_unsigned else None

    def clean_staging(self) -> None:
        """Remove what an interrupted transfer or staging left behind (never a bundle in use)."""
        for p in self.staging.iterdir():
            _remove(p)
        for name in (".active.tmp", ".previous.tmp"):
            tmp = self.root / name
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()

    # -- slots -------------------------------------------------------------------------------

    def _link(self, name: str) -> Path | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = (self.root / os.readlink(link)).resolve()
        return target if (target / "manifest.json").is_file() else None

    @property
    def active(self) -> Path | None:
        return self._link("active")

    @property
    def previous(self) -> Path | None:
        return self._link("previous")

    def _point(self, name: str, target: Path) -> None:
        tmp = self.root / f".{name}.tmp"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(os.path.relpath(target, self.root), tmp)
        os.replace(tmp, self.root / name)   # the atomic step
        _fsync_dir(self.root)

    def install_initial(self, bundle_path: str | Path) -> Path:
        """Make ``bundle_path`` the active bundle when the device has none yet."""
        if self.active is not None:
            return self.active
        placed = self._place(Path(bundle_path))
        self._point("active", placed)
        return placed

    def adopt(self, bundle_path: str | Path) -> Path:
        """Make a bundle given locally (e.g. a new one on the command line) active; the old one becomes previous."""
        placed = self._place(Path(bundle_path))
        current = self.active
        if current is not None and current != placed:
            self._point("previous", current)
        self._point("active", placed)
        return placed

    # -- staging -----------------------------------------------------------------------------

    def _place(self, source: Path, check=None) -> Path:
        """Verify a bundle (dir or .tar.gz) and copy it under bundles/ (complete before it is visible).

        ``check``, when given, is called with the verified manifest before anything is copied (it raises
        to refuse the bundle)."""
        with tempfile.TemporaryDirectory(dir=self.staging) as tmp:
            bundle = open_bundle(source, public_key=self.public_key, extract_to=Path(tmp) / "x")
            if check is not None:
                check(bundle.manifest)
            sha = hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()[:12]
            final = self.bundles / f"{bundle.name}-{bundle.version}-{sha}"
            if final.exists():
                return final
            work = Path(tmp) / "copy"
            shutil.copytree(bundle.root, work)
            for f in work.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            os.replace(work, final)
            _fsync_dir(self.bundles)
        open_bundle(final, public_key=self.public_key)  # what is on disk verifies too
        return final

    def health_check(self, bundle_dir: Path, timeout: float = 60.0) -> dict:
        """Load the bundle in a child process and run its test vectors there."""
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            res = subprocess.run([sys.executable, "-c", HEALTH_CHECK, str(bundle_dir), self.public_key or ""],
                                 capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            raise QualityCheckError(f"{bundle_dir.name}: health check did not finish within {timeout:g}s") from None
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            raise QualityCheckError(f"{bundle_dir.name}: health check failed: {last[-300:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    def fits(self, manifest: dict) -> None:
        """Raise :class:`InputSchemaMismatch` when a bundle's inputs do not fit the active bundle's."""
        current = self.active
        if current is None:
            return
        cur = json.loads((current / "manifest.json").read_text())
        check_fit(input_schema(cur), input_schema(manifest),
                  f"the running bundle {cur.get('name')} {cur.get('version')}",
                  f"{manifest.get('name')} {manifest.get('version')}",
                  (cur.get("input_schema") or {}).get("features"), (manifest.get("input_schema") or {}).get("features"))

    def flash(self, source: str | Path, health_timeout: float = 60.0, force_schema: bool = False) -> FlashResult:
        """Stage, verify, check the fit, health-check and switch to ``source``; the old active bundle
        becomes previous. A bundle whose inputs do not fit the active one's is refused unless
        ``force_schema``."""
        refusal = self.flash_refusal()
        if refusal is not None:
            return FlashResult(False, "failed", f"refused: {refusal}")
        try:
            placed = self._place(Path(source), check=None if force_schema else self.fits)
        except (VerificationError, BundleError) as exc:
            return FlashResult(False, "failed", f"refused: {exc}")
        _fault("staged")
        manifest = json.loads((placed / "manifest.json").read_text())
        try:
            self.health_check(placed, health_timeout)
        except QualityCheckError as exc:
            return FlashResult(False, "failed", str(exc), manifest["name"], manifest["version"])
        _fault("health_checked")
        return self._switch(placed, manifest)

    def _switch(self, placed: Path, manifest: dict) -> FlashResult:
        """Make a placed, checked bundle the active one; the active one becomes previous."""
        current = self.active
        if current == placed:
            return FlashResult(True, "switched", "already active", manifest["name"], manifest["version"])
        if current is not None:
            self._point("previous", current)
        _fault("previous")
        self._point("active", placed)
        _fault("switched")
        return FlashResult(True, "switched", f"now running {manifest['name']} {manifest['version']}",
                           manifest["name"], manifest["version"])

    def rollback(self) -> FlashResult:
        """Switch back to the previous bundle (and keep the current one as previous)."""
        prev, cur = self.previous, self.active
        if prev is None:
            return FlashResult(False, "failed", "no previous bundle to roll back to")
        self._point("active", prev)
        if cur is not None:
            self._point("previous", cur)
        m = json.loads((prev / "manifest.json").read_text())
        return FlashResult(True, "rolled_back", f"rolled back to {m['name']} {m['version']}", m["name"], m["version"])


class ChunkAssembler:
    """Reassembles a bundle archive sent in chunks, each with its own sha256, and the whole with one too."""

    def __init__(self, staging: Path, transfer_id: str, total: int, sha256: str, size: int, max_size: int = 512 << 20):
        if not transfer_id.isalnum() or len(transfer_id) > 64:
            raise BundleError(f"transfer id {transfer_id!r} must be 1-64 letters or digits")
        if size > max_size:
            raise BundleError(f"bundle of {size} bytes is over the {max_size}-byte limit")
        self.path = staging / f"{transfer_id}.tar.gz.part"
        self.total, self.sha256, self.size = total, sha256, size
        self.received: set[int] = set()
        self.path.write_bytes(b"")
        self._chunks: dict[int, bytes] = {}

    def add(self, index: int, data_b64: str, chunk_sha256: str) -> bool:
        """Add one chunk; returns True when all have arrived. Raises BundleError on a bad chunk."""
        if not 0 <= index < self.total:
            raise BundleError(f"chunk {index} out of range 0..{self.total - 1}")
        try:
            data = base64.b64decode(data_b64, validate=True)
        except ValueError:
            raise BundleError(f"chunk {index} is not valid base64") from None
        if hashlib.sha256(data).hexdigest() != chunk_sha256:
            raise VerificationError(f"chunk {index}: sha256 does not match (corrupted in transit)")
        self._chunks[index] = data
        self.received.add(index)
        return len(self.received) == self.total

    def discard(self) -> None:
        """Forget an aborted transfer: its chunks and its partial file."""
        self._chunks.clear()
        self.path.unlink(missing_ok=True)

    def assemble(self) -> Path:
        data = b"".join(self._chunks[i] for i in range(self.total))
        if len(data) != self.size or hashlib.sha256(data).hexdigest() != self.sha256:
            self.discard()
            raise VerificationError("the reassembled bundle's sha256 or size does not match the sender's")
        final = self.path.with_suffix("")  # .tar.gz
        with open(self.path, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(self.path, final)
        return final


__all__ = ["BundleSlots", "ChunkAssembler", "EdgeOpsError", "FlashResult", "InputSchemaMismatch", "check_fit",
           "input_schema"]
