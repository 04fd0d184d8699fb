"""Typed views of the wire messages: telemetry windows, status, bench results, commands, results, alerts.

Small frozen dataclasses over the canonical dicts of :mod:`edge_runtime.wire` (what validation
returns, or what a device builds before encoding). ``from_canonical`` reads a dict, ``to_canonical``
gives it back: the wire format does not change, and a field a class does not name (an optional
block another version adds) travels in ``extra`` untouched, so the round trip is exact. The nested
statistics blocks (``latency_ms``, ``features``, ``predictions``) stay dicts: edge_runtime.stats
merges them as they are.

>>> doc = {"schema_version": 1, "type": "telemetry", "device_id": "d", "fleet": "f", "seq": 3, "start": 1.0,
...        "end": 2.0, "model": {"name": "m", "version": "1", "variant": None}, "count": 4, "errors": 0,
...        "rejected": 0, "latency_ms": {}, "features": {}, "predictions": {"counts": [4]}, "labels": {"n": 1}}
>>> w = TelemetryWindow.from_canonical(doc)
>>> (w.device_id, w.seq, w.model.name, w.extra)
('d', 3, 'm', {'labels': {'n': 1}})
>>> w.to_canonical() == doc
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_runtime.wire import CMD, SCHEMA_VERSION

_ENVELOPE = ("schema_version", "type", "device_id", "fleet")


def _rest(doc: dict, known) -> dict:
    return {k: v for k, v in doc.items() if k not in known}


@dataclass(frozen=True)
class ModelRef:
    """A message's ``model`` block: which bundle and artifact (and A/B or shadow variant). ``present``
    names the optional fields the block had (a null ``variant`` and no ``variant`` differ on the wire)."""

    name: str | None
    version: str | None
    artifact: str | None = None
    sha256: str | None = None
    variant: str | None = None
    present: tuple[str, ...] = ()
    extra: dict = field(default_factory=dict)

    _OPTIONAL = ("artifact", "sha256", "variant")

    @classmethod
    def from_canonical(cls, m: dict) -> "ModelRef":
        return cls(m.get("name"), m.get("version"), m.get("artifact"), m.get("sha256"), m.get("variant"),
                   tuple(k for k in cls._OPTIONAL if k in m), _rest(m, ("name", "version") + cls._OPTIONAL))

    def to_canonical(self) -> dict:
        out = {"name": self.name, "version": self.version}
        out.update({k: getattr(self, k) for k in self.present})
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class TelemetryWindow:
    """One telemetry window (docs/telemetry.md); ``seq`` and ``dropped_windows`` are None until spooled."""

    fleet: str
    device_id: str
    seq: int | None
    start: float
    end: float
    model: ModelRef
    count: int
    errors: int
    rejected: int
    latency_ms: dict
    features: dict
    predictions: dict
    dropped_windows: int | None = None
    extra: dict = field(default_factory=dict)

    _KEYS = _ENVELOPE + ("seq", "start", "end", "model", "count", "errors", "rejected", "latency_ms", "features",
                         "predictions", "dropped_windows")

    @classmethod
    def from_canonical(cls, doc: dict) -> "TelemetryWindow":
        """A validated window (``wire.check_telemetry``'s dict)."""
        if doc.get("type") != "telemetry":
            raise ValueError(f"not a telemetry window: type {doc.get('type')!r}")
        return cls(doc["fleet"], doc["device_id"], doc.get("seq"), doc["start"], doc["end"],
                   ModelRef.from_canonical(doc["model"]), doc["count"], doc["errors"], doc.get("rejected", 0),
                   doc["latency_ms"], doc["features"], doc["predictions"], doc.get("dropped_windows"),
                   _rest(doc, cls._KEYS))

    @classmethod
    def from_window(cls, fleet: str, device_id: str, window: dict) -> "TelemetryWindow":
        """A window as ``WindowRecorder`` closes it (no envelope, seq or dropped_windows yet)."""
        return cls.from_canonical({"schema_version": SCHEMA_VERSION, "type": "telemetry", "device_id": device_id,
                                   "fleet": fleet, **window})

    def to_canonical(self) -> dict:
        out = {"schema_version": SCHEMA_VERSION, "type": "telemetry", "device_id": self.device_id, "fleet": self.fleet}
        if self.seq is not None:
            out["seq"] = self.seq
        out.update(start=self.start, end=self.end, model=self.model.to_canonical(), count=self.count,
                   errors=self.errors, rejected=self.rejected, latency_ms=self.latency_ms, features=self.features,
                   predictions=self.predictions)
        if self.dropped_windows is not None:
            out["dropped_windows"] = self.dropped_windows
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Status:
    """A device's retained status: online or not, when, and whatever else it reported (``extra``, which also
    holds the ``model`` block when there is one; ``model`` is a copy for reading)."""

    fleet: str
    device_id: str
    online: bool
    ts: float
    model: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_canonical(cls, doc: dict) -> "Status":
        return cls(doc["fleet"], doc["device_id"], doc["online"], doc["ts"], doc.get("model"),
                   _rest(doc, _ENVELOPE + ("online", "ts")))

    def to_canonical(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "type": "status", "device_id": self.device_id, "fleet": self.fleet,
                "online": self.online, "ts": self.ts, **self.extra}


@dataclass(frozen=True)
class Bench:
    """An ``edgeops bench --publish`` result as the monitor keeps it."""

    results: list
    machine: dict | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_canonical(cls, doc: dict) -> "Bench":
        return cls(doc["results"], doc.get("machine"), _rest(doc, ("type", "results", "machine")))

    def to_canonical(self) -> dict:
        out = {"type": "bench", "results": self.results}
        if self.machine is not None:
            out["machine"] = self.machine
        out.update(self.extra)
        return out


@dataclass(frozen=True)
class Command:
    """An operator's command on ``.../cmd`` (flash_begin, flash_chunk, flash_url, rollback; edge_runtime.commands)."""

    type: str
    id: str
    extra: dict = field(default_factory=dict)

    topic_kind = CMD

    @classmethod
    def from_canonical(cls, doc: dict) -> "Command":
        return cls(doc["type"], str(doc.get("id", "")), _rest(doc, ("type", "id")))

    def to_canonical(self) -> dict:
        return {"type": self.type, "id": self.id, **self.extra}


@dataclass(frozen=True)
class CommandResult:
    """A device's answer on ``.../cmd/result``: did the command work, at which stage it stopped."""

    id: str | None
    type: str
    ok: bool
    stage: str | None = None
    message: str | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_canonical(cls, doc: dict) -> "CommandResult":
        return cls(doc.get("id"), doc["type"], doc["ok"], doc.get("stage"), doc.get("message"),
                   _rest(doc, ("id", "type", "ok", "stage", "message")))

    def to_canonical(self) -> dict:
        return {"id": self.id, "type": self.type, "ok": self.ok, "stage": self.stage, "message": self.message,
                **self.extra}


@dataclass(frozen=True)
class Alert:
    """One open alert of a fleet, as the monitor publishes it retained on ``<prefix>/<fleet>/alerts``."""

    device_id: str
    model_name: str
    model_version: str
    detector: str
    features: object = None
    statistic: float | None = None
    opened_at: float | None = None

    _KEYS = ("device_id", "model_name", "model_version", "detector", "features", "statistic", "opened_at")

    @classmethod
    def from_canonical(cls, doc: dict) -> "Alert":
        return cls(*(doc.get(k) for k in cls._KEYS))

    def to_canonical(self) -> dict:
        return {k: getattr(self, k) for k in self._KEYS}


@dataclass(frozen=True)
class FleetAlerts:
    """A fleet's open alerts at ``ts``."""

    fleet: str
    ts: float
    open: tuple[Alert, ...] = ()

    @classmethod
    def from_canonical(cls, doc: dict) -> "FleetAlerts":
        return cls(doc["fleet"], doc["ts"], tuple(Alert.from_canonical(a) for a in doc.get("open", ())))

    def to_canonical(self) -> dict:
        return {"fleet": self.fleet, "ts": self.ts, "open": [a.to_canonical() for a in self.open]}
