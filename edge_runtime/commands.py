"""Commands a device takes on ``<prefix>/<fleet>/<device>/cmd``: flash a bundle, roll back.

Results go to ``.../cmd/result``. Messages (JSON):

- ``{"type": "flash_begin", "id", "total", "size", "sha256", "bundle", "version"}``, then
  ``{"type": "flash_chunk", "id", "index", "sha256", "data": <base64>}`` for each chunk;
  once all chunks are in, the device verifies the whole, stages, health-checks and switches.
- ``{"type": "flash_url", "id", "url", "size", "sha256", "bundle", "version"}``: the device fetches the
  archive itself (http or https, at most ``size`` bytes, checked against ``sha256``), then the same.
- ``{"type": "rollback", "id"}``: back to the previous bundle.

A flash of a bundle whose inputs do not fit the running bundle's (kind, shape, dtype, feature
names) is refused (``refused: input schema mismatch: ...``) unless its ``flash_begin`` or
``flash_url`` carries ``"force_schema": true``.

Result: ``{"id", "type", "ok", "stage", "message", "bundle", "version", "ts", "device_id"}``.
A bad command gets a failed result and changes nothing; the agent keeps running. A device whose
slots have no trusted key and do not allow unsigned bundles answers every ``flash_begin`` and
``flash_url`` with ``refused: no trusted key: ...`` at once, without receiving the transfer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Callable

from edge_runtime.errors import BundleError, EdgeOpsError, VerificationError
from edge_runtime.slots import BundleSlots, ChunkAssembler, FlashResult

log = logging.getLogger("edgeops.commands")


def fetch(url: str, staging: Path, transfer_id: str, size: int, sha256: str, timeout: float = 60.0,
          max_size: int = 512 << 20) -> Path:
    """Download a bundle archive into ``staging``; refuse a wrong scheme, size or digest."""
    import urllib.error

    _check_fetch(url, transfer_id, size, max_size)
    part = staging / f"{transfer_id}.tar.gz.part"
    try:
        got, digest = _download(url, part, size, timeout)
    except (urllib.error.URLError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise BundleError(f"{url}: download failed ({getattr(exc, 'reason', exc)})") from None
    except EdgeOpsError:
        part.unlink(missing_ok=True)
        raise
    if got != size or digest != sha256:
        part.unlink(missing_ok=True)
        raise VerificationError(f"{url}: the downloaded bundle's sha256 or size does not match the command's")
    final = part.with_suffix("")
    os.replace(part, final)
    return final


def _check_fetch(url: str, transfer_id: str, size: int, max_size: int) -> None:
    """BundleError for a transfer id that is no plain name, a URL that is not http(s), or an oversized bundle."""
    if not transfer_id.isalnum() or len(transfer_id) > 64:
        raise BundleError(f"transfer id {transfer_id!r} must be 1-64 letters or digits")
    if not url.startswith(("http://", "https://")):
        raise BundleError(f"{url}: only http:// and https:// URLs are fetched")
    if size > max_size:
        raise BundleError(f"bundle of {size} bytes is over the {max_size}-byte limit")


def _download(url: str, part: Path, size: int, timeout: float) -> tuple[int, str]:
    """Write what url serves to part (synced to disk); (bytes, hex sha256). Stops past size bytes."""
    import urllib.request

    digest = hashlib.sha256()
    got = 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as fh:
        while True:
            chunk = resp.read(1 << 16)
            if not chunk:
                break
            got += len(chunk)
            if got > size:
                raise VerificationError(f"{url}: more than the announced {size} bytes")
            digest.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return got, digest.hexdigest()


class _RecentIds:
    """The last few refused transfer ids, so their remaining chunks are dropped quietly (bounded)."""

    def __init__(self, keep: int = 64):
        self._ids: dict[str, None] = {}
        self._keep = keep

    def add(self, tid: str) -> None:
        self._ids[tid] = None
        while len(self._ids) > self._keep:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, tid: object) -> bool:
        return tid in self._ids


class CommandHandler:
    """Runs commands on a worker thread (a health check takes seconds; the network thread must not wait).

    Args:
        slots: the device's bundle slots.
        publish_result: sends a result document.
        on_switch: called with the new active bundle path after a flash or rollback switched it.
    """

    def __init__(self, slots: BundleSlots, publish_result: Callable[[dict], None],
                 on_switch: Callable[[str, FlashResult], None], device_id: str):
        self.slots = slots
        self.publish_result = publish_result
        self.on_switch = on_switch
        self.device_id = device_id
        self._queue: queue.Queue = queue.Queue()
        self._transfers: dict[str, ChunkAssembler] = {}
        self._meta: dict[str, dict] = {}
        self._refused = _RecentIds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, name="edgeops-commands", daemon=True)
        self._thread.start()

    def submit(self, payload: bytes) -> None:
        self._queue.put(payload)

    def stop(self) -> None:
        self._stop.set()
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _result(self, cmd_id: str | None, kind: str, res: FlashResult) -> None:
        self.publish_result({"id": cmd_id, "type": kind, "ok": res.ok, "stage": res.stage, "message": res.message,
                             "bundle": res.bundle, "version": res.version, "ts": round(time.time(), 3),
                             "device_id": self.device_id})

    def _work(self) -> None:
        while not self._stop.is_set():
            payload = self._queue.get()
            if payload is None:
                return
            try:
                self._handle(payload)
            except Exception as exc:  # noqa: BLE001 - a bad command must never stop the device
                log.exception("command failed")
                self._result(None, "error", FlashResult(False, "failed", f"command failed: {exc}"))

    def _handle(self, payload: bytes) -> None:
        try:
            cmd = json.loads(payload)
            kind, cmd_id = cmd["type"], str(cmd.get("id", ""))
        except (ValueError, KeyError, TypeError):
            self._result(None, "error", FlashResult(False, "failed", "malformed command: expected JSON with a 'type'"))
            return
        if kind in ("flash_begin", "flash_url") and self._refuse_flash(cmd_id, cmd):
            return
        handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is None:
            self._result(cmd_id, kind, FlashResult(False, "failed", f"unknown command type {kind!r}"))
            return
        handler(self, cmd_id, cmd)

    def _refuse_flash(self, cmd_id: str, cmd: dict) -> bool:
        """Answer a flash this device refuses at once (no trusted key, a bad force_schema); whether it did."""
        refusal = self.slots.flash_refusal()
        if refusal:
            message = f"refused: {refusal}"
        elif not isinstance(cmd.get("force_schema", False), bool):
            message = "refused: force_schema must be true or false"
        else:
            return False
        self._refused.add(cmd_id)
        self._result(cmd_id, "flash", FlashResult(False, "failed", message))
        return True

    def _flash_begin(self, cmd_id: str, cmd: dict) -> None:
        try:
            self._transfers[cmd_id] = ChunkAssembler(self.slots.staging, cmd_id, int(cmd["total"]),
                                                     str(cmd["sha256"]), int(cmd["size"]))
            self._meta[cmd_id] = cmd
        except (EdgeOpsError, KeyError, ValueError) as exc:
            self._result(cmd_id, "flash_begin", FlashResult(False, "failed", f"refused: {exc}"))

    def _flash_chunk(self, cmd_id: str, cmd: dict) -> None:
        asm = self._transfers.get(cmd_id)
        if asm is None and cmd_id in self._refused:
            return   # the transfer was refused at flash_begin; its sender has that answer
        if asm is None:
            self._result(cmd_id, "flash_chunk", FlashResult(False, "failed", "chunk for an unknown transfer"))
            return
        try:
            done = asm.add(int(cmd["index"]), cmd["data"], cmd["sha256"])
        except (EdgeOpsError, KeyError, ValueError) as exc:
            self._transfers.pop(cmd_id, None)
            asm.discard()
            self._refused.add(cmd_id)
            self._result(cmd_id, "flash", FlashResult(False, "failed", f"transfer aborted: {exc}"))
            return
        if done:
            self._transfers.pop(cmd_id, None)
            self._flash(cmd_id, asm)

    def _flash_url(self, cmd_id: str, cmd: dict) -> None:
        try:
            archive = fetch(str(cmd["url"]), self.slots.staging, cmd_id, int(cmd["size"]), str(cmd["sha256"]))
        except (EdgeOpsError, KeyError, ValueError) as exc:
            self._result(cmd_id, "flash", FlashResult(False, "failed", f"refused: {exc}"))
            return
        self._install(cmd_id, archive, f"{cmd['size']} bytes fetched and verified", cmd.get("force_schema", False))

    def _rollback(self, cmd_id: str, cmd: dict) -> None:
        res = self.slots.rollback()
        if res.ok:
            self.on_switch("rollback", res)
        self._result(cmd_id, "rollback", res)

    _HANDLERS: dict[str, Callable[["CommandHandler", str, dict], None]] = {
        "flash_begin": _flash_begin, "flash_chunk": _flash_chunk, "flash_url": _flash_url, "rollback": _rollback,
    }

    def _flash(self, cmd_id: str, asm: ChunkAssembler) -> None:
        try:
            archive = asm.assemble()
        except EdgeOpsError as exc:
            self._result(cmd_id, "flash", FlashResult(False, "failed", f"refused: {exc}"))
            return
        force = self._meta.pop(cmd_id, {}).get("force_schema", False)
        self._install(cmd_id, archive, f"{asm.size} bytes received and verified", force)

    def _install(self, cmd_id: str, archive: Path, received: str, force_schema: bool = False) -> None:
        """Say the archive arrived intact, then stage, check (its fit too, unless forced) and switch to it."""
        self._result(cmd_id, "flash", FlashResult(True, "received", received))
        try:
            res = self.slots.flash(archive, force_schema=force_schema)
        finally:
            archive.unlink(missing_ok=True)
        if res.ok:
            self.on_switch("flash", res)
        self._result(cmd_id, "flash", res)
