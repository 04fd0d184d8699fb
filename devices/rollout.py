"""Flashing from the operator's side: one device, a rollback, or a fleet rollout with a canary.

Everything goes over MQTT (see docs/flashing.md):

- commands to ``<prefix>/<fleet>/<device>/cmd`` (QoS 1; a device that is offline gets them from its
  persistent session when it comes back): ``flash_begin``, then ``flash_chunk`` messages, each with
  the sha256 of its bytes, the whole archive with its own sha256; ``rollback``;
- results from ``.../cmd/result``: ``received``, then ``switched`` or ``failed``; later a
  ``probation`` (confirmed) or an ``auto_rollback`` when the device judged the new bundle bad;
- the inventory from the retained ``.../status`` of every device, and the monitor's open alerts
  from the retained ``<prefix>/<fleet>/alerts``.

Before anything is sent, the new bundle's input schema is checked against what each device says it
runs (the ``input`` block of its status); the device checks again before it switches.

A rollout (``--canary``) flashes a canary set, waits until each canary has sent ``clean_windows``
telemetry windows from the new version, passed its own probation, and has ``canary_samples``
inferences of it in windows the monitor acknowledged as stored (and a few seconds more for the
monitor to evaluate them), then the other devices in waves, each gated the same way. An alert on
any device flashed so far (of any wave), a failed flash or an automatic rollback stops it and rolls
back every device it flashed. Its state is a JSON file written after every step, so a restarted
orchestrator resumes it.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edge_runtime import wire
from edge_runtime.bundle import opened_bundle, pack
from edge_runtime.errors import EdgeOpsError
from edge_runtime.mqtt import DEFAULT_PREFIX, BrokerAddress, MqttLink
from edge_runtime.slots import check_fit, input_schema

log = logging.getLogger("edgeops.flash")

CHUNK_SIZE = 256 * 1024
FINAL_STAGES = ("switched", "failed", "rolled_back")


class FlashError(EdgeOpsError):
    """A flash or rollout could not be carried out (the message says where it stopped)."""


@dataclass
class BundleImage:
    """A bundle archive ready to send: its bytes, digest, name and version."""

    data: bytes
    sha256: str
    name: str
    version: str
    manifest_sha256: str | None = None
    input: dict | None = None          # edge_runtime.slots.input_schema of its manifest

    @classmethod
    def from_path(cls, path: str | Path, public_key: str | None = None) -> "BundleImage":
        """Verify a bundle (folder or .tar.gz) here first, so a broken one never leaves this machine."""
        p = Path(path)
        with opened_bundle(p, public_key=public_key) as b:   # a .tar.gz's unpacked copy goes away after
            manifest_sha256 = hashlib.sha256((b.root / "manifest.json").read_bytes()).hexdigest()
            inputs = input_schema(b.manifest)
        if p.is_dir():
            with tempfile.TemporaryDirectory(prefix="edgeops-pack-") as tmp:
                data = pack(p, Path(tmp) / "bundle.tar.gz").read_bytes()
        else:
            data = p.read_bytes()
        return cls(data, hashlib.sha256(data).hexdigest(), b.name, b.version, manifest_sha256, inputs)


def check_device_fit(image: BundleImage, device: str, status: dict | None) -> str | None:
    """Refuse (:class:`edge_runtime.slots.InputSchemaMismatch`, exit 4) a bundle whose inputs do not fit
    what ``device`` runs, as its retained status says. Returns a note when the status does not say."""
    inputs = (status or {}).get("input")
    if not isinstance(inputs, dict) or image.input is None:
        return f"{device}: its status does not say which inputs it takes; the device checks the fit itself"
    model = (status or {}).get("model") or {}
    check_fit(inputs, image.input, f"{device} runs {model.get('name')} {model.get('version')}, which",
              f"{image.name} {image.version}")
    return None


class FleetLink:
    """The operator's MQTT client: sends commands, collects results, statuses, telemetry and alerts."""

    def __init__(self, address: BrokerAddress, fleet: str, prefix: str = DEFAULT_PREFIX,
                 client_id: str | None = None, watch_telemetry: bool = False):
        self.fleet, self.prefix = fleet, prefix
        self._cond = threading.Condition()
        self.results: list[dict] = []
        self.statuses: dict[str, dict] = {}
        self.alerts: dict | None = None
        self.windows: dict[str, list[dict]] = collections.defaultdict(list)   # device -> its windows seen:
        # (model version, seq, count, received, acked), so a wave's checks read its own devices' windows only
        self._acked: dict[str, collections.deque] = {}   # device -> recent [first, last] seqs the monitor stored
        self._watch_telemetry = watch_telemetry
        self.refused = 0                       # commands the broker refused (e.g. not authorised by its ACL)
        self.link = MqttLink(address, client_id or f"edgeops-flasher-{uuid.uuid4().hex[:8]}",
                             on_connect=self._on_connect, on_message=self._on_message, session_expiry=0,
                             on_ack=self._on_ack)
        # a device answers a refused command at once: listen for results before sending anything
        self._subscribed = threading.Event()
        self._topics: list[str] = []
        self.refused_topics: list[str] = []   # subscriptions the broker refused (its ACL, say)
        self.link.client.on_subscribe = self._on_subscribe

    def _on_ack(self, mid: int, ok: bool) -> None:
        if not ok:
            with self._cond:
                self.refused += 1
                self._cond.notify_all()

    def _on_connect(self) -> None:
        base = f"{self.prefix}/{self.fleet}"
        topics = [(f"{base}/+/cmd/result", 1), (f"{base}/+/status", 1), (f"{base}/alerts", 1)]
        if self._watch_telemetry:
            topics += [(f"{base}/+/telemetry", 1), (f"{base}/+/{wire.ACK}", 1)]
        self._topics = [t for t, _ in topics]   # before the call: its SUBACK is read by the network thread
        self.link.client.subscribe(topics)   # one SUBACK for all

    def _on_subscribe(self, client, userdata, mid, codes, properties) -> None:
        self.refused_topics = [f"{t} ({c})" for t, c in zip(self._topics, codes, strict=False)
                               if getattr(c, "is_failure", False) or (isinstance(c, int) and c >= 0x80)]
        self._subscribed.set()

    def _on_message(self, topic_name: str, payload: bytes) -> None:
        parts = topic_name.split("/")
        if parts[-1] == wire.ACK and len(parts) >= 4:
            self._on_ack_message(parts[-2], payload)
            return
        doc = _json_object(payload)
        if doc is None:
            return
        with self._cond:
            self._file(topic_name, parts, doc)
            self._cond.notify_all()

    def _file(self, topic_name: str, parts: list[str], doc: dict) -> None:
        """Keep a message by its topic: a command result, a device status, the fleet's alerts or a window."""
        if topic_name.endswith("/cmd/result"):
            self.results.append(doc)
        elif parts[-1] == "status" and len(parts) >= 4:
            self.statuses[parts[-2]] = doc
        elif parts[-1] == "alerts":
            self.alerts = doc
        elif parts[-1] == "telemetry":
            self._record_window(parts[-2], doc)

    def _record_window(self, device: str, doc: dict) -> None:
        """Note a telemetry window of ``device``: its model version, seq, count and whether it is stored."""
        model = doc.get("model") or {}
        w = {"version": model.get("version"), "seq": doc.get("seq"),
             "count": doc.get("count") if type(doc.get("count")) is int else 0, "received": time.time()}
        w["acked"] = self._stored(device, w["seq"])
        self.windows[device].append(w)

    def _stored(self, device: str, seq) -> bool:
        return _in_ranges(seq, self._acked.get(device, ()))

    def _on_ack_message(self, device: str, payload: bytes) -> None:
        """The monitor's confirmation to a device: these windows are committed (quarantined ones excepted)."""
        try:
            ranges = wire.parse_ack(payload)
            refused = json.loads(payload).get("rejected")
        except (wire.Rejected, ValueError, AttributeError):
            return
        refused = refused if isinstance(refused, dict) else {}
        with self._cond:
            self._acked.setdefault(device, collections.deque(maxlen=10_000)).extend(ranges)
            self._mark_stored(device, ranges, refused)
            self._cond.notify_all()

    def _mark_stored(self, device: str, ranges, refused: dict) -> None:
        """Mark the device's windows in the acknowledged ranges as stored, but those the monitor refused."""
        for w in self.windows.get(device, ()):
            if not w["acked"] and _in_ranges(w["seq"], ranges) and str(w["seq"]) not in refused:
                w["acked"] = True

    def stored_samples(self, device: str, version: str, since: float) -> int:
        """Inferences of ``version`` from ``device``, received since ``since``, in windows the monitor stored
        (call under the lock)."""
        return sum(w["count"] for w in self.windows.get(device, ()) if w["version"] == version
                   and w["acked"] and w["received"] >= since)

    def __enter__(self) -> "FleetLink":
        self.link.start()
        if not self.link.wait_connected(10):
            self.link.stop()
            raise FlashError(f"cannot reach the broker {self.link.address.url}"
                             + (f": {self.link.refused}" if self.link.refused else ""))
        if not self._subscribed.wait(10):
            self.link.stop()
            raise FlashError(f"the broker {self.link.address.url} did not confirm the subscription to results")
        if self.refused_topics:
            # without results and statuses a command would only ever time out: say why now
            self.link.stop()
            raise FlashError(f"the broker {self.link.address.url} refused this identity the subscription to "
                             f"{', '.join(self.refused_topics)}; flashing needs to read them (the flasher's "
                             f"credentials, on the services listener, may)")
        time.sleep(0.3)   # retained statuses and alerts arrive right after the subscription
        return self

    def __exit__(self, *exc: object) -> None:
        self.link.stop()

    def wait(self, predicate: Callable[[], object], timeout: float) -> object:
        """Wait until ``predicate()`` (called under the lock) is truthy; returns its value or None."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(min(left, 0.5))

    def send(self, device: str, doc: dict) -> None:
        t = f"{self.prefix}/{self.fleet}/{device}/cmd"
        mid = self.link.publish(t, json.dumps(doc, separators=(",", ":")).encode(), qos=1)
        if mid is None:
            raise FlashError(f"lost the broker while sending to {device}")

    # -- commands ------------------------------------------------------------------------------

    def start_flash(self, device: str, image: BundleImage, chunk_size: int = CHUNK_SIZE,
                    force_schema: bool = False) -> str:
        """Send a bundle to one device; returns the transfer id (results carry it). ``force_schema`` tells
        the device to take it even when its inputs do not fit the bundle it runs."""
        tid = uuid.uuid4().hex[:16]
        total = max(1, math.ceil(len(image.data) / chunk_size))
        self.send(device, {"type": "flash_begin", "id": tid, "total": total, "size": len(image.data),
                           "sha256": image.sha256, "bundle": image.name, "version": image.version,
                           **({"force_schema": True} if force_schema else {})})
        for i in range(total):
            part = image.data[i * chunk_size:(i + 1) * chunk_size]
            self.send(device, {"type": "flash_chunk", "id": tid, "index": i,
                               "sha256": hashlib.sha256(part).hexdigest(),
                               "data": base64.b64encode(part).decode()})
        return tid

    def start_flash_url(self, device: str, image: BundleImage, url: str, force_schema: bool = False) -> str:
        """Ask one device to fetch the bundle archive from ``url`` (the same bytes as ``image``)."""
        tid = uuid.uuid4().hex[:16]
        self.send(device, {"type": "flash_url", "id": tid, "url": url, "size": len(image.data), "sha256": image.sha256,
                           "bundle": image.name, "version": image.version,
                           **({"force_schema": True} if force_schema else {})})
        return tid

    def start_rollback(self, device: str) -> str:
        tid = uuid.uuid4().hex[:16]
        self.send(device, {"type": "rollback", "id": tid})
        return tid

    def final_result(self, tid: str, timeout: float) -> dict | None:
        def done():
            if self.refused:
                raise FlashError(f"the broker {self.link.address.url} refused the command: is this identity "
                                 "allowed to write the device's cmd topic (see deploy/mosquitto/acl)?")
            for r in self.results:
                if r.get("id") == tid and r.get("stage") in FINAL_STAGES:
                    return r
            return None
        return self.wait(done, timeout)

    def later_results(self, device: str, after: float) -> list[dict]:
        with self._cond:
            return [r for r in self.results if r.get("device_id") == device and (r.get("ts") or 0) >= after
                    and r.get("type") in ("probation", "auto_rollback")]


def _json_object(payload: bytes) -> dict | None:
    """A message's JSON object (a window from an agent with --compress is zlib-compressed), else None."""
    try:
        if payload[:1] == b"\x78":
            payload = zlib.decompress(payload)
        doc = json.loads(payload)
    except (ValueError, zlib.error):
        return None
    return doc if isinstance(doc, dict) else None


def _in_ranges(seq: object, ranges) -> bool:
    """Whether ``seq`` is an int inside one of the [first, last] ranges."""
    return type(seq) is int and any(lo <= seq <= hi for lo, hi in ranges)


@dataclass(frozen=True)
class FlashOptions:
    """How one device is flashed.

    Attributes:
        timeout: seconds to wait for the device's result.
        public_key: check the bundle's signature with this key before sending it.
        chunk_size: bytes per chunk when the bundle is sent over MQTT.
        wait_probation: after a successful flash, seconds to wait for the device's verdict on its first windows.
        url: the device fetches the archive from this http(s) URL instead.
        force_schema: send a bundle whose inputs do not fit what the device runs (the device honours it too).
    """

    timeout: float = 120.0
    public_key: str | None = None
    chunk_size: int = CHUNK_SIZE
    wait_probation: float = 0.0
    url: str | None = None
    force_schema: bool = False


def flash_device(address: BrokerAddress, fleet: str, device: str, bundle: str | Path, *, prefix: str = DEFAULT_PREFIX,
                 options: FlashOptions = FlashOptions()) -> dict:
    """Flash one device and wait for its answer. Returns the final result document.

    With ``options.url``, the device fetches the archive from there; ``bundle`` must then be that same
    .tar.gz file (its sha256 and size go in the command). A bundle whose inputs do not fit what the
    device runs (its retained status says) is refused here, before it is sent, unless
    ``options.force_schema`` (which the device then honours too).
    """
    timeout, url, force_schema = options.timeout, options.url, options.force_schema
    if url and not str(bundle).endswith((".tar.gz", ".tgz")):
        raise FlashError("with --url, BUNDLE must be the .tar.gz file served at that URL (its sha256 is sent)")
    image = BundleImage.from_path(bundle, options.public_key)
    with FleetLink(address, fleet, prefix) as fl:
        if not force_schema:
            _warn_misfit(fl, image, device)
        started = time.time()
        tid = (fl.start_flash_url(device, image, url, force_schema) if url
               else fl.start_flash(device, image, options.chunk_size, force_schema))
        res = fl.final_result(tid, timeout)
        if res is None:
            raise FlashError(f"{device}: no result within {timeout:g}s (is the agent running with --flash, "
                             f"on fleet {fleet!r}?); a device with a session at the broker still gets the command "
                             "when it reconnects")
        res = dict(res)
        if res.get("ok") and options.wait_probation > 0:
            _add_probation_verdict(fl, device, res, started, options.wait_probation)
        return res


def _warn_misfit(fl: FleetLink, image: BundleImage, device: str) -> None:
    """Log what the device's status says about the bundle's fit (refused outright when it does not fit)."""
    note = check_device_fit(image, device, fl.wait(lambda: fl.statuses.get(device), 2.0))
    if note:
        log.warning("%s", note)


def _add_probation_verdict(fl: FleetLink, device: str, res: dict, started: float, wait: float) -> None:
    """Wait up to ``wait`` seconds for the device's probation (or auto-rollback) result: ``res["after"]``."""
    later = fl.wait(lambda: fl.later_results(device, started), wait)
    if later:
        res["after"] = later[-1]


def rollback_device(address: BrokerAddress, fleet: str, device: str, *, prefix: str = DEFAULT_PREFIX,
                    timeout: float = 60.0) -> dict:
    with FleetLink(address, fleet, prefix) as fl:
        tid = fl.start_rollback(device)
        res = fl.final_result(tid, timeout)
        if res is None:
            raise FlashError(f"{device}: no answer to the rollback within {timeout:g}s")
        return res


def inventory(address: BrokerAddress, fleet: str, prefix: str = DEFAULT_PREFIX, wait: float = 1.0) -> tuple[
        dict[str, dict], dict | None]:
    """Every device's retained status in a fleet ('+' for all fleets), and the open alerts."""
    with FleetLink(address, fleet, prefix) as fl:
        time.sleep(wait)
        with fl._cond:
            return dict(fl.statuses), fl.alerts


# -- rollouts --------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A fleet rollout's state, saved as JSON after every step."""

    id: str
    fleet: str
    bundle: str
    name: str
    version: str
    sha256: str                             # of the bundle's manifest (which pins every file)
    groups: list[list[str]]                 # groups[0] is the canary set, then the waves
    clean_windows: int = 3
    devices: dict[str, dict] = field(default_factory=dict)   # device -> {state, group, ts, message}
    canary_samples: int = 200               # inferences of the new version the monitor stored, per device
    force_schema: bool = False              # flash even where the inputs do not fit
    group_index: int = 0
    phase: str = "running"                  # running | done | stopped
    reason: str | None = None
    log: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "Rollout":
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as exc:
            raise FlashError(f"{path}: not a rollout state file ({exc})") from None

    def note(self, msg: str) -> None:
        self.log.append(f"{time.strftime('%H:%M:%S')} {msg}")
        log.info("%s", msg)


def plan_groups(devices: list[str], canary: float, waves: int) -> list[list[str]]:
    """Canary set (at least one device) then ``waves`` waves of the rest, in a stable order."""
    devices = sorted(devices)
    n_canary = min(len(devices), max(1, math.ceil(len(devices) * canary)))
    rest = devices[n_canary:]
    waves = max(1, min(waves, len(rest))) if rest else 0
    groups = [devices[:n_canary]]
    for i in range(waves):
        groups.append(rest[i * len(rest) // waves:(i + 1) * len(rest) // waves])
    return [g for g in groups if g]


def parse_fraction(text: str) -> float:
    t = text.strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise FlashError(f"--canary {text!r}: give a percentage like 10% or a fraction like 0.1") from None
    if not 0 < v <= 1:
        raise FlashError(f"--canary {text!r}: must be above 0 and at most 100%")
    return v


class RolloutRunner:
    """Carries a :class:`Rollout` forward; every step is saved to ``state_path`` first."""

    def __init__(  # noqa: PLR0913 - configuration constructor: the keyword arguments are the runner's settings
                 self, address: BrokerAddress, rollout: Rollout, state_path: Path, prefix: str = DEFAULT_PREFIX,
                 flash_timeout: float = 180.0, window_timeout: float = 300.0, public_key: str | None = None,
                 progress: Callable[[str], None] | None = None, evaluation_wait: float = 5.0):
        self.address, self.r, self.path, self.prefix = address, rollout, state_path, prefix
        self.flash_timeout, self.window_timeout = flash_timeout, window_timeout
        # the monitor evaluates the devices with new windows once a second (FleetMonitor's eval_interval): once
        # enough are stored, a group is judged clear only after this many more seconds without an alert
        self.evaluation_wait = evaluation_wait
        self.public_key = public_key
        self.progress = progress or (lambda msg: None)
        self.started = time.time()

    def _say(self, msg: str) -> None:
        self.r.note(msg)
        self.r.save(self.path)
        self.progress(msg)

    def run(self) -> Rollout:
        r = self.r
        if r.phase != "running":
            return r
        image = self._unchanged_image()
        with FleetLink(self.address, r.fleet, self.prefix, watch_telemetry=True) as fl:
            if not self._fits(fl, image):
                return self._stop(fl)
            while r.group_index < len(r.groups):
                if not self._roll_out_group(fl, image):
                    return self._stop(fl)
            r.phase = "done"
            self._say(f"rollout {r.id} finished: {len(r.devices)} devices run {r.name} {r.version}")
        return r

    def _unchanged_image(self) -> BundleImage:
        """The rollout's bundle, refused when it changed after devices were sent it."""
        r = self.r
        image = BundleImage.from_path(r.bundle, self.public_key)
        if image.manifest_sha256 != r.sha256 and any(d["state"] != "pending" for d in r.devices.values()):
            raise FlashError(f"{r.bundle} changed since the rollout started; start a new rollout")
        return image

    def _roll_out_group(self, fl: FleetLink, image: BundleImage) -> bool:
        """Flash the current group (canary or wave) and watch it; False when the rollout must stop."""
        r = self.r
        group = r.groups[r.group_index]
        label = "canary" if r.group_index == 0 else f"wave {r.group_index}"
        trouble = self._trouble(fl)
        if trouble:
            r.reason = trouble
            return False
        if not self._flash_group(fl, image, group, label) or not self._watch(fl, group, label):
            return False
        r.group_index += 1
        self._say(f"{label} done: {', '.join(group)} run {r.version}")
        return True

    def _flash_group(self, fl: FleetLink, image: BundleImage, group: list[str], label: str) -> bool:
        r = self.r
        todo = [d for d in group if r.devices[d]["state"] in ("pending", "sent")]
        self._say(f"{label}: flashing {r.name} {r.version} to {', '.join(todo) or 'nobody (already done)'}")
        tids = self._send_flashes(fl, image, todo)
        ok = True
        for d, tid in tids.items():
            ok = self._record_flash(d, fl.final_result(tid, self.flash_timeout)) and ok
        if not ok:
            r.reason = f"{label}: a flash failed"
        return ok

    def _send_flashes(self, fl: FleetLink, image: BundleImage, todo: list[str]) -> dict[str, str]:
        """Send the bundle to each device and save them as "sent"; device -> transfer id."""
        r = self.r
        tids = {}
        for d in todo:
            tids[d] = fl.start_flash(d, image, force_schema=r.force_schema)
            r.devices[d].update(state="sent", ts=time.time(), transfer=tids[d])
        r.save(self.path)
        return tids

    def _record_flash(self, d: str, res: dict | None) -> bool:
        """Record a device's flash result (None: no answer in time) in the rollout; True when it flashed."""
        st = self.r.devices[d]
        if res is None:
            st.update(state="failed", message=f"no result within {self.flash_timeout:g}s")
        elif res.get("ok"):
            st.update(state="flashed", ts=time.time(), message=res.get("message"),
                      probation=int(res.get("probation_windows") or 0))
        else:
            st.update(state="failed", message=res.get("message"))
        self._say(f"{d}: {st['state']} ({st.get('message')})")
        return st["state"] == "flashed"

    def _alerts_for(self, fl: FleetLink, group: list[str]) -> list[dict]:
        """The open alerts that stop the rollout: on the new version, any but silence; on the version it
        replaced, those opened since the flash, except latency: that judges the old bundle's speed,
        measured while the device was receiving and health-checking the new one."""
        alerts = (fl.alerts or {}).get("open", [])
        since = {d: self.r.devices[d].get("ts") or 0 for d in group}
        return [a for a in alerts if a.get("device_id") in since and self._stops(a, since[a["device_id"]])]

    def _stops(self, alert: dict, flashed_at: float) -> bool:
        """Whether an open alert on a device flashed at ``flashed_at`` stops the rollout (see `_alerts_for`)."""
        if alert.get("detector") == "silence":
            return False
        if alert.get("model_version") == self.r.version:
            return True
        return alert.get("detector") != "latency" and (alert.get("opened_at") or 0) >= flashed_at

    def _fits(self, fl: FleetLink, image: BundleImage) -> bool:
        """Every device still to flash takes the inputs the new bundle takes (as its status says)."""
        r = self.r
        if r.force_schema:
            return True
        with fl._cond:
            statuses = dict(fl.statuses)
        misfits, unknown = _pending_fit(image, r.devices, statuses)
        if unknown:
            self._say(f"{len(unknown)} device(s) do not report their inputs ({', '.join(unknown[:5])}): "
                      "they check the fit themselves")
        if misfits:
            r.reason = f"{len(misfits)} device(s) refused before sending: {misfits[0]}"
            return False
        return True

    def _flashed(self) -> list[str]:
        return [d for d, st in self.r.devices.items() if st["state"] in ("flashed", "sent")]

    def _trouble(self, fl: FleetLink) -> str | None:
        """Why the rollout must stop now: an alert on any device flashed so far (of any wave), or one that
        rolled back by itself; None when there is nothing."""
        flashed = self._flashed()
        with fl._cond:
            alerts = self._alerts_for(fl, flashed)
            rolled = [x for d in flashed for x in self._auto_rollbacks(fl, d)]
        return _stop_reason(alerts, rolled)

    def _auto_rollbacks(self, fl: FleetLink, d: str) -> list[dict]:
        """The device's auto_rollback results since it was flashed (5 s of clock slack)."""
        since = (self.r.devices[d].get("ts") or 0) - 5
        return [x for x in fl.later_results(d, since) if x.get("type") == "auto_rollback"]

    def _watch(self, fl: FleetLink, group: list[str], label: str) -> bool:
        """Wait until every device of the group has sent clean windows of the new version, passed its own
        probation and has enough inferences of it stored (and evaluated) by the monitor; False on trouble
        anywhere in what the rollout flashed so far."""
        r = self.r
        self._say(f"{label}: waiting for {self._awaited()} from each device")
        since = time.time()
        deadline = time.monotonic() + self.window_timeout
        cleared_at = None
        stored: dict[str, int] = {}
        while time.monotonic() < deadline:
            trouble = self._trouble(fl)
            if trouble:
                r.reason = trouble
                return False
            cleared, stored = self._group_cleared(fl, group, since)
            if cleared:
                if cleared_at is None:
                    cleared_at = time.monotonic()
                    self._say_stored(label, stored)
                if time.monotonic() - cleared_at >= self._evaluation_delay():
                    return True
            time.sleep(0.2)
        r.reason = self._watch_timeout_reason(label, group, stored)
        return False

    def _awaited(self) -> str:
        """What the watch of a group waits for from each device, in words."""
        r = self.r
        what = [f"{r.clean_windows} clean windows of {r.version}"] if r.clean_windows > 0 else []
        what += [f"{r.canary_samples} of its inferences stored by the monitor"] if r.canary_samples > 0 else []
        return " and ".join(what) or f"the probation of {r.version}"

    def _evaluation_delay(self) -> float:
        """Seconds a cleared group must stay without an alert: the monitor's evaluation, when it judges."""
        return self.evaluation_wait if self.r.canary_samples > 0 else 0

    def _say_stored(self, label: str, stored: dict[str, int]) -> None:
        if self.r.canary_samples > 0:
            self._say(f"{label}: the monitor stored {min(stored.values())}+ inferences of {self.r.version} "
                      f"from each device; {self.evaluation_wait:g}s for its evaluation")

    def _group_cleared(self, fl: FleetLink, group: list[str], since: float) -> tuple[bool, dict[str, int]]:
        """Whether every device of the group sent enough windows of the new version (since ``since``),
        passed its own probation and has enough inferences stored by the monitor; and those stored counts."""
        r = self.r
        with fl._cond:
            counts = {d: self._new_windows(fl, d, since) for d in group}
            stored = {d: fl.stored_samples(d, r.version, (r.devices[d].get("ts") or since) - 5) for d in group}
            confirmed = {d: self._probation_passed(fl, d, since) for d in group}
        return self._enough(counts, stored) and all(confirmed.values()), stored

    def _enough(self, counts: dict[str, int], stored: dict[str, int]) -> bool:
        """Every device sent enough windows of the new version and has enough inferences of it stored."""
        r = self.r
        return all(c >= r.clean_windows for c in counts.values()) \
            and all(n >= r.canary_samples for n in stored.values())

    def _new_windows(self, fl: FleetLink, device: str, since: float) -> int:
        """Distinct windows of the new version the device sent since ``since`` (call under the lock)."""
        return len({w["seq"] for w in fl.windows.get(device, ())
                    if w["version"] == self.r.version and w["received"] >= since})

    def _probation_passed(self, fl: FleetLink, device: str, since: float) -> bool:
        """A device that judges a new bundle on its first windows must have said it passed (devices
        flashed before a restart of this orchestrator: their verdict went by unseen)."""
        st = self.r.devices[device]
        if not st.get("probation") or (st.get("ts") or 0) < self.started:
            return True
        later = fl.later_results(device, (st.get("ts") or since) - 5)
        return any(x.get("type") == "probation" and x.get("ok") for x in later)

    def _watch_timeout_reason(self, label: str, group: list[str], stored: dict[str, int]) -> str:
        """Why a group's watch timed out: windows (or probation) missing, or inferences the monitor did not store."""
        r = self.r
        short = sorted(d for d in group if stored.get(d, 0) < r.canary_samples)
        if not short:
            return (f"{label}: not every device sent {r.clean_windows} windows of {r.version} (and passed its own "
                    f"probation) within {self.window_timeout:g}s")
        return (f"{label}: the monitor did not store {r.canary_samples} inferences of {r.version} from "
                f"{', '.join(short)} within {self.window_timeout:g}s (is `edgeops monitor` running for fleet "
                f"{r.fleet}? with --canary-samples 0 the rollout goes on without its verdict)")

    def _stop(self, fl: FleetLink) -> Rollout:
        r = self.r
        r.phase = "stopped"
        self._say(f"rollout stopped: {r.reason}; rolling back the devices it flashed")
        for d, st in r.devices.items():
            if st["state"] in ("flashed", "sent"):
                self._roll_back(fl, d, st)
        r.save(self.path)
        return r

    def _roll_back(self, fl: FleetLink, d: str, st: dict) -> None:
        """Return one flashed device to the bundle it ran before, unless it already went back by itself."""
        with fl._cond:
            itself = [x for x in self._auto_rollbacks(fl, d) if x.get("ok")]
        if itself:
            # already back on the bundle it ran before: a rollback now would return it to the new one
            st["state"], st["message"] = "rolled_back", f"by itself: {itself[-1].get('message')}"
            self._say(f"{d}: rolled back by itself earlier; not sent a rollback")
            return
        _record_rollback(st, fl.final_result(fl.start_rollback(d), self.flash_timeout))
        self._say(f"{d}: {st['state']} ({st['message']})")


def _pending_fit(image: BundleImage, devices: dict[str, dict], statuses: dict[str, dict]) -> tuple[list, list]:
    """For the devices still pending: why those that do not fit the bundle refuse it, and those whose status
    does not report their inputs."""
    misfits, unknown = [], []
    for d, st in sorted(devices.items()):
        if st["state"] != "pending":
            continue
        try:
            if check_device_fit(image, d, statuses.get(d)):
                unknown.append(d)
        except EdgeOpsError as exc:
            misfits.append(str(exc))
    return misfits, unknown


def _stop_reason(alerts: list[dict], rolled: list[dict]) -> str | None:
    """The alerts that stop the rollout, else the devices that rolled back by themselves; None for neither."""
    if alerts:
        return "alert " + ", ".join(_alert_words(a) for a in alerts)
    if rolled:
        return "; ".join(f"{x['device_id']} rolled back by itself: {x.get('message')}" for x in rolled)
    return None


def _record_rollback(st: dict, res: dict | None) -> None:
    """A device's rollback result (None: no answer in time) in its rollout state."""
    st["state"] = "rolled_back" if res and res.get("ok") else "rollback_failed"
    st["message"] = (res or {}).get("message", "no answer to the rollback")


def _alert_words(alert: dict) -> str:
    """An alert in a stop reason: its detector, device and (up to five) features."""
    features = f" ({', '.join(alert['features'][:5])})" if alert.get("features") else ""
    return f"{alert['detector']} on {alert['device_id']}{features}"


def new_rollout(bundle: str | Path, fleet: str, devices: list[str], canary: float,  # noqa: PLR0913 - a rollout's settings
                waves: int, clean_windows: int,
                public_key: str | None = None, canary_samples: int = 200, force_schema: bool = False) -> Rollout:
    image = BundleImage.from_path(bundle, public_key)
    if not devices:
        raise FlashError(f"fleet {fleet!r} has no devices online to flash")
    groups = plan_groups(devices, canary, waves)
    r = Rollout(id=time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6], fleet=fleet,
                bundle=str(Path(bundle).resolve()), name=image.name, version=image.version,
                sha256=image.manifest_sha256, groups=groups, clean_windows=clean_windows,
                canary_samples=canary_samples, force_schema=force_schema,
                devices={d: {"state": "pending", "group": i} for i, g in enumerate(groups) for d in g})
    return r


def default_rollout_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edgeops" / "rollouts"
