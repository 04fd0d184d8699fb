"""Where the agent's predictions go: stdout, a rotating JSON-lines file, MQTT, a webhook, a callback.

Every sink has the same narrow interface: :meth:`PredictionSink.offer` takes a
:class:`Prediction` without ever blocking (it only appends to the sink's
bounded queue), a worker thread of the sink delivers batches, and
:meth:`PredictionSink.close` flushes what is queued, waiting a bounded time.
A sink that cannot keep up or whose target is down never slows inference: what
does not fit its queue is dropped, and drops and failed deliveries are counted
(``sink.counts``) and logged once per sink.

>>> import numpy as np
>>> p = Prediction(id=7, ts=1.5, output=np.array([0.25, 0.75], np.float32), latency_ms=0.1234,
...                model={"name": "bc", "version": "1.0.0", "variant": None}, labels=("malignant", "benign"),
...                task="classification")
>>> p.record()["label"], p.record()["probabilities"]
('benign', [0.25, 0.75])
>>> open_sink("jsonl:/tmp/p.jsonl?max_mb=5&backups=2").max_bytes
5000000
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, NamedTuple
from urllib.parse import parse_qsl

import numpy as np

from edge_runtime.errors import InvalidInputError

log = logging.getLogger("edgeops.outputs")

VARIANTS = ("primary", "all")
POLL_S = 0.005          # an idle sink looks at its queue this often (offering then needs no signalling)


class Prediction(NamedTuple):
    """One inference's result, as the sinks see it (a named tuple: cheap to make on the inference thread).

    Attributes:
        id: the input's id (given by the source, else its position in the stream).
        ts: wall-clock time of the inference (seconds since the epoch).
        output: what ``EdgeModel.predict`` returned for the input (float32 row).
        latency_ms: the inference's time, preprocessing included.
        model: name, version and variant ("A", "B", "shadow" or None) of the model that answered.
        labels: class labels (None: class indices).
        task: "classification", "regression" or None (unknown: the output is reported as values).
    """

    id: object
    ts: float
    output: np.ndarray
    latency_ms: float
    model: dict
    labels: tuple | None = None
    task: str | None = None

    def record(self) -> dict:
        """The JSON-ready record the sinks write (made by the sink's thread, not the inference thread)."""
        vals = np.asarray(self.output, np.float32).ravel().tolist()
        if self.task == "classification" and len(vals) == 1:   # one sigmoid column: P(second class)
            vals = [1.0 - vals[0], vals[0]]
        out, idx = _rounded_with_argmax(vals)
        doc: dict = {"id": self.id, "ts": round(self.ts, 3)}
        if self.task == "classification" and out:
            doc["label"] = self._label(idx)
            doc["probabilities"] = out
        else:
            doc["values"] = out
        doc["latency_ms"] = round(self.latency_ms, 4)
        doc["model"] = self.model
        return doc

    def _label(self, idx: int) -> str:
        """The class label of index idx (the index itself when there is no label for it)."""
        return self.labels[idx] if self.labels and idx < len(self.labels) else str(idx)


def _rounded_with_argmax(vals: list[float]) -> tuple[list, int]:
    """(values rounded to 6 decimals, non-finite ones as None; the index of the largest)."""
    if all(map(math.isfinite, vals)):
        out = [round(v, 6) for v in vals]
        return out, (out.index(max(out)) if out else 0)
    out = [round(v, 6) if math.isfinite(v) else None for v in vals]
    return out, max(range(len(out)), key=lambda i: -1.0 if out[i] is None else out[i])


@dataclass
class SinkCounts:
    """What became of the predictions offered to a sink."""

    delivered: int = 0
    dropped: int = 0       # did not fit the queue (the sink was behind or its target down)
    failed: int = 0        # lost in a delivery that failed for good

    def as_dict(self) -> dict:
        return {"delivered": self.delivered, "dropped": self.dropped, "failed": self.failed}


class PredictionSink:
    """A bounded queue and a worker thread that delivers batches; subclasses implement :meth:`deliver`.

    Args:
        name: the sink's name in logs and counts.
        max_queue: predictions waiting at most; more are dropped (and counted).
        batch_size: at most this many predictions per delivery.
        batch_seconds: wait up to this long for a batch to fill (0: deliver what is there).
    """

    def __init__(self, name: str, max_queue: int = 1000, batch_size: int = 64, batch_seconds: float = 0.0):
        self.name = name
        self.batch_size, self.batch_seconds = max(1, batch_size), max(0.0, batch_seconds)
        self.counts = SinkCounts()
        self.max_queue = max(1, max_queue)
        self._queue: collections.deque[Prediction] = collections.deque()
        self._closing = threading.Event()
        self._abandoned = False
        self._in_flight = 0
        self._logged: set[str] = set()
        self._worker: threading.Thread | None = None

    def start(self) -> "PredictionSink":
        self._worker = threading.Thread(target=self._run, name=f"edgeops-output-{self.name}", daemon=True)
        self._worker.start()
        return self

    def offer(self, p: Prediction) -> None:
        """Queue a prediction; never blocks (a full queue drops it and counts the drop)."""
        if len(self._queue) < self.max_queue:
            self._queue.append(p)
        else:
            self.counts.dropped += 1
            self._warn_once("dropped", "its queue is full (target slow or down); predictions are dropped and counted")

    @property
    def pending(self) -> int:
        """Predictions queued or being delivered."""
        return len(self._queue) + self._in_flight

    def deliver(self, batch: list[Prediction]) -> int | None:
        """Write a batch; raise when it is lost (counted as failed), or return how many of it were lost."""
        raise NotImplementedError

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within ``timeout`` seconds) and stop the worker."""
        self._closing.set()
        if self._worker is not None:
            self._worker.join(timeout)
            self._abandoned = self._worker.is_alive()   # a hung target: give up on what is queued
        left = len(self._queue) + (self._in_flight if self._abandoned else 0)
        if left:
            self.counts.dropped += left
            self._warn_once("closed", f"{left} predictions were still queued at stop")

    def _run(self) -> None:
        while not self._abandoned:
            batch = self._next_batch()
            if batch:
                lost = self._deliver_counted(batch)
                if self._abandoned:
                    return            # close() counted this batch as dropped
                self._in_flight = 0
                self.counts.delivered += len(batch) - lost
                self.counts.failed += lost
            elif self._closing.is_set() and not self._queue:
                return

    def _deliver_counted(self, batch: list[Prediction]) -> int:
        """Deliver a batch; how many of it were lost (all of it when the delivery raised)."""
        self._in_flight = len(batch)
        try:
            return self.deliver(batch) or 0
        except Exception as exc:  # noqa: BLE001 - a sink failure must never stop the agent
            self._warn_once(type(exc).__name__, f"delivery failed ({str(exc)[:200]})")
            return len(batch)

    def _next_batch(self) -> list[Prediction]:
        q, batch = self._queue, []
        deadline = time.monotonic() + self.batch_seconds
        while len(batch) < self.batch_size:
            try:
                batch.append(q.popleft())
            except IndexError:
                if (batch and time.monotonic() >= deadline) or self._closing.is_set():
                    break
                self._closing.wait(POLL_S)
                if not batch:
                    break
        return batch

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("output %s: %s (further ones are counted, not logged)", self.name, message)


class StdoutSink(PredictionSink):
    """JSON lines on standard output (or another text stream), one per prediction."""

    def __init__(self, stream: IO[str] | None = None, **kw):
        super().__init__("stdout", **kw)
        self.stream = stream

    def deliver(self, batch: list[Prediction]) -> None:
        stream = self.stream or sys.stdout
        stream.write("".join(json.dumps(p.record(), separators=(",", ":")) + "\n" for p in batch))
        stream.flush()


class JsonlFileSink(PredictionSink):
    """JSON lines appended to ``path``; past ``max_bytes`` it rotates to ``path.1`` ... ``path.<backups>``."""

    def __init__(self, path: str | Path, max_bytes: int = 10_000_000, backups: int = 3, **kw):
        super().__init__(f"jsonl:{path}", **kw)
        self.path, self.max_bytes, self.backups = Path(path), max(1, max_bytes), max(0, backups)
        self._fh: IO[str] | None = None
        self._size = 0

    def deliver(self, batch: list[Prediction]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a", encoding="ascii")
            self._size = self.path.stat().st_size
        for p in batch:
            line = json.dumps(p.record(), separators=(",", ":")) + "\n"   # ASCII: characters are bytes
            if self._size and self._size + len(line) > self.max_bytes:
                self._rotate()
            self._fh.write(line)
            self._size += len(line)
        self._fh.flush()

    def _rotate(self) -> None:
        self._fh.close()
        if self.backups:
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._fh = open(self.path, "w", encoding="ascii")
        self._size = 0

    def close(self, timeout: float = 5.0) -> None:
        super().close(timeout)
        if self._fh is not None:
            self._fh.close()


class MqttSink(PredictionSink):
    """Batches of predictions on the device's ``predictions`` topic, at most ``max_rate`` messages a second.

    Args:
        publish: ``(topic, payload, qos) -> message id or None`` (None: not connected; the batch fails).
        topic: ``<prefix>/<fleet>/<device>/predictions``.
        envelope: builds the message around a batch of records (``wire.predictions_message``).
        qos: 0 or 1.
        max_rate: messages per second at most; a faster stream makes bigger batches, then drops.
    """

    def __init__(self, publish: Callable[[str, bytes, int], int | None], topic: str,
                 envelope: Callable[[list[dict]], bytes], qos: int = 0, max_rate: float = 10.0,
                 batch_size: int = 100, batch_seconds: float = 1.0, **kw):
        if qos not in (0, 1):
            raise InvalidInputError(f"output mqtt: qos must be 0 or 1, not {qos}")
        super().__init__("mqtt", batch_size=batch_size, batch_seconds=batch_seconds, **kw)
        self.publish, self.topic, self.envelope, self.qos = publish, topic, envelope, qos
        self.min_interval = 1.0 / max_rate if max_rate > 0 else 0.0
        self._last = 0.0
        self.messages = 0

    def deliver(self, batch: list[Prediction]) -> None:
        wait = self._last + self.min_interval - time.monotonic()
        if wait > 0:
            time.sleep(wait)   # the worker waits, not inference; the queue absorbs the burst
        self._last = time.monotonic()
        if self.publish(self.topic, self.envelope([p.record() for p in batch]), self.qos) is None:
            raise ConnectionError("not connected to the broker")
        self.messages += 1


class HttpSink(PredictionSink):
    """A webhook: each batch is POSTed as JSON, retried with exponential backoff.

    Args:
        url: http:// or https:// address.
        envelope: builds the body around a batch of records (``wire.predictions_message``).
        retries: attempts after the first one before the batch counts as failed.
        backoff: seconds before the first retry, doubling (at most 30 s).
        timeout: seconds per request.
    """

    def __init__(self, url: str, envelope: Callable[[list[dict]], bytes], retries: int = 4, backoff: float = 0.2,
                 timeout: float = 5.0, batch_size: int = 100, batch_seconds: float = 1.0, **kw):
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError(f"output http: {url!r} is not an http:// or https:// URL")
        super().__init__(f"http:{url}", batch_size=batch_size, batch_seconds=batch_seconds, **kw)
        self.url, self.envelope = url, envelope
        self.retries, self.backoff, self.timeout = max(0, retries), max(0.0, backoff), timeout
        self.attempts = 0

    def deliver(self, batch: list[Prediction]) -> None:
        body = self.envelope([p.record() for p in batch])
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.attempts += 1
            try:
                self._post(body)
                return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                if attempt == self.retries:
                    raise ConnectionError(f"{self.url}: {exc} after {attempt + 1} attempts") from None
            if self._closing.wait(delay):
                delay = 0.0    # stopping: try the remaining attempts at once rather than sleep through stop
            delay = min(delay * 2, 30.0)


    def _post(self, body: bytes) -> None:
        req = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:
            resp.read(1024)


class CallbackSink(PredictionSink):
    """Calls ``fn(prediction)`` for every prediction, in order, from the sink's own thread."""

    def __init__(self, fn: Callable[[Prediction], object], **kw):
        super().__init__(getattr(fn, "__name__", "callback"), **kw)
        self.fn = fn

    def deliver(self, batch: list[Prediction]) -> int:
        failed = 0
        for p in batch:
            try:
                self.fn(p)
            except Exception as exc:  # noqa: BLE001 - the user's code must not stop the agent
                failed += 1
                self._warn_once("raised", f"the callback raised {type(exc).__name__}: {str(exc)[:200]}")
        return failed


@dataclass(frozen=True)
class OutputSpec:
    """``--output`` parsed: the kind, its target and its options."""

    kind: str
    target: str | None = None
    options: dict = field(default_factory=dict)


def parse_output(spec: str) -> OutputSpec:
    """``stdout``, ``jsonl:PATH[?max_mb=10&backups=3]``, ``mqtt[?qos=1&batch=100&seconds=1&rate=10]``,
    ``http:URL`` (or the URL itself); raises InvalidInputError."""
    s = spec.strip()
    if s.startswith(("http://", "https://")):
        return OutputSpec("http", s)
    kind, _, rest = s.partition(":")
    if kind == "http":
        return OutputSpec("http", rest)
    kind, target, opts = _split_options(kind, rest)
    _check_output_options(spec, kind, target, opts)
    try:
        typed = {k: (float(v) if k in ("max_mb", "seconds", "rate") else int(v)) for k, v in opts.items()}
    except ValueError:
        raise InvalidInputError(f"--output {spec!r}: option values must be numbers") from None
    return OutputSpec(kind, target or None, typed)


_OUTPUT_OPTIONS = {"stdout": set(), "jsonl": {"max_mb", "backups"}, "mqtt": {"qos", "batch", "seconds", "rate"}}


def _split_options(kind: str, rest: str) -> tuple[str, str, dict]:
    """(kind, target, options) of ``KIND[:TARGET][?OPTIONS]`` split at its first colon into kind and rest."""
    if "?" in kind:
        kind, _, query = kind.partition("?")
        rest = "?" + query
    target, _, query = rest.partition("?")
    return kind, target, dict(parse_qsl(query, keep_blank_values=True))


def _check_output_options(spec: str, kind: str, target: str, opts: dict) -> None:
    """InvalidInputError for an unknown kind or option, or a jsonl output without a path."""
    if kind not in _OUTPUT_OPTIONS:
        raise InvalidInputError(f"--output {spec!r}: use stdout, jsonl:PATH, mqtt or http:URL")
    allowed = _OUTPUT_OPTIONS[kind]
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise InvalidInputError(f"--output {spec!r}: unknown option {unknown[0]!r} "
                                f"(known: {', '.join(sorted(allowed)) or 'none'})")
    if kind == "jsonl" and not target:
        raise InvalidInputError(f"--output {spec!r}: jsonl needs a path (jsonl:PATH)")


def open_sink(spec: str | OutputSpec, publish: Callable[[str, bytes, int], int | None] | None = None,
              topic: str | None = None, envelope: Callable[[list[dict]], bytes] | None = None) -> PredictionSink:
    """A sink (not started) for an ``--output`` value; ``mqtt`` and ``http`` need the agent's publish, topic
    and envelope."""
    s = parse_output(spec) if isinstance(spec, str) else spec
    o = s.options
    if s.kind == "stdout":
        return StdoutSink()
    if s.kind == "jsonl":
        return JsonlFileSink(s.target, max_bytes=int(o.get("max_mb", 10) * 1_000_000), backups=o.get("backups", 3))
    envelope = envelope or _json_envelope
    if s.kind == "mqtt":
        return _mqtt_sink(o, publish, topic, envelope)
    return HttpSink(s.target, envelope)


def _json_envelope(records: list[dict]) -> bytes:
    """``{"predictions": [...]}``, compact JSON."""
    return json.dumps({"predictions": records}, separators=(",", ":")).encode()


def _mqtt_sink(o: dict, publish: Callable[[str, bytes, int], int | None] | None, topic: str | None,
               envelope: Callable[[list[dict]], bytes]) -> MqttSink:
    if publish is None or topic is None:
        raise InvalidInputError("output mqtt: needs the agent's MQTT link")
    return MqttSink(publish, topic, envelope, qos=o.get("qos", 0), max_rate=o.get("rate", 10.0),
                    batch_size=o.get("batch", 100), batch_seconds=o.get("seconds", 1.0))
