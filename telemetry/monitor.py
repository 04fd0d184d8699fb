"""The fleet monitor: consume telemetry over MQTT, validate, store, evaluate, alert.

One process, or several sharing the load through an MQTT v5 shared
subscription: windows are stored in one database, and every evaluation reads
the merged recent windows from there, so which process received a window
does not change any conclusion.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

from edge_runtime import compact
from edge_runtime.mqtt import BrokerAddress
from edge_runtime.wire import (
    ACK,
    ALERTS,
    MAX_CLOCK_SKEW,
    MAX_PAYLOAD,
    Message,
    Rejected,
    encode,
    encode_ack,
    fleet_topic,
    parse,
    parse_topic,
    seq_of,
    subscription,
)
from edge_runtime.wire import topic as wire_topic
from telemetry import alerts as alerting
from telemetry import store
from telemetry.drift.silence import SilenceDetector, typical_period
from telemetry.evaluate import Evaluation, MonitorConfig, Verdict, evaluate
from telemetry.fleet_view import FleetView
from telemetry.ingest import put_bounded, store_bisecting
from telemetry.mqtt_stream import CutPayload
from telemetry.profile_check import check_against_profile

FLEET_EVAL_SHARE = 4.0   # a fleet's merge: at most about 1 / (1 + 4) of evaluation time
FLEET_DEVICE_MAX_AGE = 3600.0   # a device silent this long no longer counts in its fleet's verdict
FLEET_RELOAD_S = 30.0           # shared workers reload their fleet view from the database this often
# a refused subscription is tried again after 1 s, then 2 s; at the third refusal the monitor reconnects
# instead (to the next node of a cluster), 4 s later
RESUBSCRIBE_S = (1.0, 30.0, 4.0)
MQTT_CLIENTS = ("stream", "paho")
INBOX_MAX = 20_000              # received messages waiting to be stored, at most (then the MQTT client waits)
# QoS 1 messages the broker may send the monitor before it acknowledges any (MQTT 5 Receive Maximum; the
# broker's own limit applies too: Mosquitto's max_inflight_messages). Acknowledged after their batch's commit,
# so it must cover the batch being validated, the one being committed and the reads waiting.
RECEIVE_MAX = 5000
INBOX_READS = 64                # the stream connection's reads (up to 256 KiB each) waiting, at most

log = logging.getLogger("edgeops.monitor")


class _Prepared(NamedTuple):
    """A validated batch, ready to commit: parsed messages (topic, payload, Message, the window's stored
    JSON or None), refused ones (topic, reason, detail, payload) and the devices' confirmations."""

    parsed: list
    refused: list
    acks: list


_NO_FEATURES = {"count": [], "nan": [], "mean": [], "m2": [], "min": [], "max": [], "hist": []}


def default_client_id(fleet: str, share: str | None = None) -> str:
    """``edgeops-monitor-<fleet>[-<share>]`` (``all`` for every fleet): monitors of different fleets never
    resume each other's broker session."""
    return f"edgeops-monitor-{'all' if fleet == '+' else fleet}" + (f"-{share}" if share else "")


def _transient(exc: BaseException) -> bool:
    """True for a database that is unreachable or busy (retry), False for one that refuses the data."""
    from sqlalchemy import exc as sa

    if isinstance(exc, sa.DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError)):
        return True
    # PostgreSQL's batches go through psycopg's own cursor (binary arrays), whose errors SQLAlchemy does not
    # wrap: a session the server ended, a lost connection, a server shutting down are psycopg's
    # OperationalError or InterfaceError, as SQLAlchemy would have classed them
    try:
        import psycopg
    except ImportError:  # pragma: no cover - psycopg comes with the monitor extra
        return False
    return isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError))


@dataclass
class MonitorStats:
    """What this process has seen (exposed on /metrics)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict = field(default_factory=lambda: defaultdict(int))
    quarantined: dict = field(default_factory=lambda: defaultdict(int))
    evaluation_errors: int = 0
    inferences: dict = field(default_factory=lambda: defaultdict(int))
    errors: dict = field(default_factory=lambda: defaultdict(int))
    latest: dict = field(default_factory=dict)          # (fleet, device) -> last window's latency block
    scores: dict = field(default_factory=dict)          # (fleet, device) -> {feature: psi}
    accuracy: dict = field(default_factory=dict)        # (fleet, device) -> (labelled accuracy, holdout's, labelled)
    broker_dropped: float | None = None


def drop_connection(client) -> None:
    """Close a paho client's connection as a network failure would: its loop reconnects (paho has no call to
    reconnect from another thread; ``disconnect`` would end the loop)."""
    import socket

    sock = client.socket()
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _items(item) -> list:
    """The inbox holds single messages (paho, JetStream) or lists of them (one read of the stream connection)."""
    return item if type(item) is list else [item]


class _Resubscriber:
    """Subscribes the monitor's topics and handles the broker's answer: a broker may refuse a subscription
    for a while (a cluster electing the leader of its session store, permissions being changed), and a
    monitor that goes on without it stores nothing. A refused topic is tried again after 1 s, then 2 s; at
    the third refusal the monitor reconnects (to the next node of a cluster), 4 s later."""

    def __init__(self, monitor: "FleetMonitor", subscribe, drop, is_connected):
        self.monitor = monitor
        self._subscribe, self._drop, self._is_connected = subscribe, drop, is_connected
        self.pending: dict[int, tuple[list[str], float]] = {}      # SUBSCRIBE packet id -> topics, next wait
        # The SUBACK is handled by the network thread, which can be quicker than the subscribing thread
        # noting the packet id: the lock makes the answer wait until the packet's topics are known.
        self._lock = threading.Lock()

    def subscribe(self, topics: list[str], wait: float) -> None:
        with self._lock:     # the clients only write the packet here, they never wait for the broker
            mid = self._subscribe(topics)
            if mid is not None:
                self.pending[mid] = (topics, wait)

    def answered(self, mid: int, codes: list[int]) -> None:
        """A SUBACK: ``codes`` are its return (reason) codes, one per topic; 0x80 and above refuse."""
        m = self.monitor
        with self._lock:
            found = self.pending.pop(mid, None)
        if found is None:
            log.warning("broker %s answered a subscription the monitor did not send (packet id %d)", m.broker.url,
                        mid)
            return
        topics, wait = found
        refused = [(t, c) for t, c in zip(topics, codes, strict=False) if c >= 0x80]
        own = [(t, c) for t, c in refused if t.startswith("$SYS/")]     # a broker's counters: not every one has them
        if own:
            log.info("broker %s does not offer %s", m.broker.url, ", ".join(t for t, _ in own))
        refused = [(t, c) for t, c in refused if not t.startswith("$SYS/")]
        if not refused:
            m.connected.set()        # connected and subscribed: messages flow (as over JetStream)
        if not refused or m._stop.is_set():
            return
        reconnect = wait >= RESUBSCRIBE_S[2]
        log.error("broker %s refused the monitor's subscription to %s (reason code 0x%02x); %s in %.0f s",
                  m.broker.url, ", ".join(t for t, _ in refused), refused[0][1],
                  "reconnecting" if reconnect else "subscribing again", wait)

        def again() -> None:
            if not self._is_connected() or m._stop.is_set():   # a reconnect subscribes anew
                return
            if reconnect:       # the refusal may belong to this connection (its permissions, its node)
                self._drop()
            else:
                self.subscribe([t for t, _ in refused], min(2 * wait, RESUBSCRIBE_S[1]))

        timer = threading.Timer(wait, again)
        timer.daemon = True
        timer.start()


class FleetMonitor:
    """Consumes ``<prefix>/<fleet>/+/telemetry|status|bench`` and keeps the fleet's verdicts current.

    Args:
        broker: the broker.
        db_url: SQLAlchemy URL (sqlite:///monitor.db or postgresql://...).
        fleet: fleet to watch, or "+" for all.
        share: MQTT v5 shared-subscription group for horizontal scale.
        client_id: stable client id (a restart resumes the broker session with it); the default is
            derived from the fleet and the share group, so monitors of other fleets never share a session.
        config: detector thresholds.
        max_skew: seconds a window may be dated ahead of this machine's clock (later ones are quarantined).
        quarantine_keep: how many refused messages the quarantine table keeps (the newest).
        confirm: acknowledge committed windows to their devices (end-to-end delivery).
        bundles: manifests whose reference profiles drift is measured against.
        webhook: URL to POST alert transitions to.
        trigger: runs a command and/or POSTs the incident when a drift or accuracy alert opens (retrain.py).
        ack_qos: QoS of the confirmations to the devices.
        mqtt_client: "stream" (telemetry.mqtt_stream: reads and acknowledges in batches) or "paho".
    """

    def __init__(self, broker: BrokerAddress, db_url: str = "sqlite:///monitor.db", fleet: str = "+",  # noqa: PLR0913
                 share: str | None = None, client_id: str | None = None, config: MonitorConfig | None = None,
                 bundles: list[dict] | None = None, webhook: str | None = None, prefix: str = "edgeops",
                 eval_interval: float = 1.0, session_expiry: int = 3600, max_payload: int = MAX_PAYLOAD,
                 max_skew: float = MAX_CLOCK_SKEW, quarantine_keep: int = 10_000, confirm: bool = True,
                 trigger=None, ack_qos: int = 1, mqtt_client: str = "stream"):
        if share and not broker.v5:
            raise ValueError(f"--share needs MQTT 5 shared subscriptions; {broker.url} speaks MQTT 3.1.1")
        self.broker = broker
        self.engine = store.connect(db_url)
        self.fleet = fleet
        self.share = share
        self.prefix = prefix
        self.config = config or MonitorConfig()
        self.webhook = webhook
        self.trigger = trigger
        self.eval_interval = eval_interval
        self.max_payload = max_payload
        self.max_skew = max_skew
        self.quarantine_keep = quarantine_keep
        self.confirm = confirm
        if ack_qos not in (0, 1):
            raise ValueError(f"--ack-qos {ack_qos}: must be 0 or 1")
        # QoS 1: the broker keeps a confirmation for a device that is away (its session); at QoS 0 a device
        # that missed one sends the window again, which is stored once and confirmed again (with paho, QoS 0
        # saves a third of the CPU per window: no PUBACK to track; with the stream connection, no difference)
        self.ack_qos = ack_qos
        if mqtt_client not in MQTT_CLIENTS:
            raise ValueError(f"--mqtt-client {mqtt_client}: one of {', '.join(MQTT_CLIENTS)}")
        # "stream": telemetry.mqtt_stream, which reads and acknowledges in batches; "paho": a paho-mqtt client
        self.mqtt_client = mqtt_client
        self.client_id = client_id or default_client_id(fleet, share)
        self.session_expiry = session_expiry
        for m in bundles or []:
            store.store_bundle(self.engine, m)
        self._bundles = self._load_bundles()
        self._bundles_reloaded = 0.0
        self.stats = MonitorStats()
        self._inbox: queue.Queue = queue.Queue(maxsize=INBOX_MAX)
        self._inbox_busy = 500          # evaluations wait while more items than this wait to be stored
        self._dirty: set[tuple[str, str, str, str]] = set()
        self._dirty_lock = threading.Lock()
        # a fleet-level evaluation merges the recent windows of every device of the fleet: it waits
        # FLEET_EVAL_SHARE x its last duration before the next one (a fleet whose windows came in
        # meanwhile stays pending), so a large fleet's merge takes a bounded share of evaluation time
        self._fleet_due: dict[tuple[str, str, str], float] = {}
        self._fleet_pending: set[tuple[str, str, str]] = set()
        self.fleet_view = FleetView()
        self._fleet_loaded: dict[tuple[str, str, str], float] = {}
        self._stop = threading.Event()
        self._logged: set[tuple[str, str]] = set()
        self._threads: list[threading.Thread] = []
        self.client = None
        self.connected = threading.Event()

    # -- MQTT ----------------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        shared = (lambda t: f"$share/{self.share}/{t}") if self.share else (lambda t: t)
        # retained status messages are not delivered to shared subscriptions: every process reads them
        return [shared(subscription(self.prefix, self.fleet, "telemetry")),
                shared(subscription(self.prefix, self.fleet, "bench")),
                subscription(self.prefix, self.fleet, "status"), "$SYS/broker/publish/messages/dropped"]

    def start(self) -> "FleetMonitor":
        import gc

        # everything loaded so far (numpy, scipy, SQLAlchemy, the bundles) lives as long as the process: kept
        # out of the cyclic collector's full passes, which a stream of parsed windows triggers often
        gc.freeze()
        self._connect()
        for target, name in ((self._ingest_loop, "ingest"), (self._evaluate_loop, "evaluate")):
            t = threading.Thread(target=target, name=f"edgeops-monitor-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    # The transport: what receives messages into the inbox, acknowledges them after their commit and
    # publishes the monitor's own messages. MQTT here; telemetry.jetstream overrides these four methods.

    def _connect(self) -> None:
        """Connect and subscribe; each received message goes to the inbox as (topic, payload, token, qos)."""
        if self.mqtt_client == "paho":
            self._connect_paho()
            return
        from telemetry.mqtt_stream import StreamConnection

        resubscribe = _Resubscriber(self, lambda topics: conn.subscribe(topics), lambda: conn.drop(),
                                    lambda: conn.is_connected())

        def on_connect(session_present: bool) -> None:
            self._log_session(session_present)
            resubscribe.subscribe(self._subscriptions(), RESUBSCRIBE_S[0])   # connected once the broker takes it

        def on_disconnect(reason: str) -> None:
            if not self._stop.is_set():
                log.warning("monitor lost broker %s:%d (%s); reconnecting", *conn.current, reason)
            self.connected.clear()

        def on_messages(messages: list) -> None:
            put_bounded(self._inbox, messages, self._stop)      # one read's messages, one item

        self._inbox = queue.Queue(maxsize=INBOX_READS)      # items are reads: lists of messages
        self._inbox_busy = 2
        conn = StreamConnection(self.broker, self.client_id, session_expiry=self.session_expiry,
                                receive_max=RECEIVE_MAX, max_packet=self.max_payload + 2 * 65_536,
                                on_connect=on_connect, on_subscribe=resubscribe.answered, on_messages=on_messages,
                                on_disconnect=on_disconnect,
                                on_refused=lambda why: log.error("broker %s refused the monitor: %s",
                                                                 self.broker.url, why))
        self.client = conn
        conn.start()

    def _connect_paho(self) -> None:
        """The same over a paho-mqtt client (``--mqtt-client paho``)."""
        from edge_runtime.mqtt import NodeRotation, connect_args, make_client

        # a persistent session (on an MQTT 3.1.1 broker: a non-clean one, and no shared subscription)
        c = make_client(self.broker, self.client_id, session_expiry=self.session_expiry, max_inflight=1000,
                        reconnect=(1, 30))
        c.manual_ack_set(True)  # acknowledge a window only once it is in the database

        def subscribe(topics: list[str]) -> int | None:
            result, mid = c.subscribe([(t, 1) for t in topics])
            return mid if result == 0 else None

        resubscribe = _Resubscriber(self, subscribe, lambda: drop_connection(c), c.is_connected)

        def on_connect(client, userdata, flags, rc, properties):
            if rc.is_failure:
                log.error("broker %s refused the monitor: %s", self.broker.url, rc)
                return
            nodes.connected()
            self._log_session(flags.session_present)
            resubscribe.subscribe(self._subscriptions(), RESUBSCRIBE_S[0])   # connected once the broker takes it

        nodes = NodeRotation(self.broker)

        def on_disconnect(client, userdata, flags, rc, properties):
            if not self._stop.is_set():
                log.warning("monitor lost broker %s:%d (%s); reconnecting", *nodes.current, rc)
                nodes.advance(client)     # a cluster: the next node (the session lives in the cluster)
            self.connected.clear()

        def on_message(client, userdata, msg):
            put_bounded(self._inbox, (msg.topic, msg.payload, msg.mid, msg.qos), self._stop)

        c.on_connect, c.on_disconnect, c.on_message = on_connect, on_disconnect, on_message
        c.on_subscribe = lambda client, userdata, mid, codes, properties: resubscribe.answered(
            mid, [rc.value for rc in codes])
        c.on_connect_fail = lambda client, userdata: nodes.advance(client)
        self.client = c
        c.connect_async(**connect_args(self.broker, self.session_expiry))
        c.loop_start()

    def _acknowledge(self, batch: list) -> None:
        """Acknowledge a committed batch's messages to the broker (which then forgets them)."""
        if self.client is None:
            return
        if self.mqtt_client == "paho":
            for _, _, mid, qos in batch:
                if qos:
                    self.client.ack(mid, qos)
            return
        self.client.ack([mid for _, _, mid, qos in batch if qos])

    def _disconnect(self) -> None:
        if self.client is None:
            return
        if self.mqtt_client == "paho":
            self.client.disconnect()
            self.client.loop_stop()
        else:
            self.client.stop()

    @property
    def _shared(self) -> bool:
        """Whether other processes may receive part of this fleet's messages (they share the stream)."""
        return bool(self.share)

    def _log_session(self, resumed: bool) -> None:
        """Say which broker session this is; a resumed one names its age and the fleet it was made for."""
        try:
            last = store.note_session(self.engine, self.client_id, self.fleet)
        except Exception as exc:  # noqa: BLE001 - only a log line depends on it
            log.debug("could not record the session: %s", exc)
            last = None
        if not resumed:
            log.info("monitor connected to %s as %s (new session, fleet %s)", self.broker.url, self.client_id,
                     self.fleet)
            return
        if last is None:
            log.info("monitor connected to %s as %s: resumed a broker session this database has no record of",
                     self.broker.url, self.client_id)
            return
        age, fleet = time.time() - last[0], last[1]
        log_at = log.warning if fleet != self.fleet else log.info
        log_at("monitor connected to %s as %s: resumed its broker session (last connected %.0f s ago, for fleet "
               "%s%s); messages queued meanwhile come first", self.broker.url, self.client_id, age, fleet,
               "" if fleet == self.fleet else f", now {self.fleet}")

    def stop(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 15.0     # all threads together, not 10 s each
        for t in self._threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        self._disconnect()

    # -- ingestion -----------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        """Validate batches from the inbox here while a second thread commits and acknowledges the previous
        one: the database's round trips overlap the next batch's parsing, and batches stay in order."""
        ready: queue.Queue = queue.Queue(maxsize=1)      # at most one validated batch waits for its commit
        committer = threading.Thread(target=self._commit_loop, args=(ready,), name="edgeops-monitor-commit",
                                     daemon=True)
        committer.start()
        try:
            while not self._stop.is_set() or not self._inbox.empty():
                try:
                    batch = _items(self._inbox.get(timeout=0.05))
                except queue.Empty:
                    continue
                while len(batch) < 1000:
                    try:
                        batch += _items(self._inbox.get_nowait())
                    except queue.Empty:
                        break
                ready.put((batch, self._prepare(batch)))
        finally:
            ready.put(None)
            committer.join()

    def _commit_loop(self, ready: queue.Queue) -> None:
        while (item := ready.get()) is not None:
            batch, prepared = item
            if self._commit_until_done(prepared, len(batch)):
                self._acknowledge(batch)

    def _commit_until_done(self, prepared: _Prepared, size: int) -> bool:
        """Commit a validated batch; while the database is unreachable, retry with backoff (nothing is
        acknowledged meanwhile, so nothing is lost). Any other failure is contained by :meth:`_commit`
        itself. False when stopping before the batch could be stored (it is then not acknowledged)."""
        delay = 0.2
        while True:
            try:
                self._commit(prepared)
                return True
            except Exception as exc:  # noqa: BLE001 - transient database failures only reach here
                if self._stop.is_set():
                    log.warning("stopping with %d messages not stored; the broker redelivers them", size)
                    return False
                log.warning("the database failed for a batch of %d messages (%s); retrying in %.1f s",
                            size, str(exc).splitlines()[0][:200], delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 10.0)

    def ingest(self, batch: list[tuple[str, bytes, int, int]]) -> None:
        """Validate and store a batch of raw messages (also usable without MQTT, e.g. in benchmarks).

        Every message ends stored, counted as a duplicate, or refused with a named reason and kept in
        the quarantine table with its raw bytes. Windows are then confirmed to their devices (an ack on
        ``<prefix>/<fleet>/<device>/ack``), so a device forgets a window only once it is committed here.
        Raises only when the database is unreachable (the caller retries the batch).
        """
        self._commit(self._prepare(batch))

    def _prepare(self, batch: list[tuple[str, bytes, int, int]]) -> _Prepared:
        """Validate a batch and do the Python work of its commit ahead (each window's stored JSON, the
        devices' confirmations), so that the thread committing the previous batch holds the interpreter
        only while it talks to the database and the broker."""
        now = time.time()
        parsed: list[tuple[str, bytes, Message, str | None]] = []
        refused: list[tuple[str, str, str, bytes]] = []
        for topic, payload, _mid, _qos in batch:
            self.stats.received += 1
            if topic.startswith("$SYS/"):
                self._broker_stat(payload)
                continue
            try:
                msg = self._validate(topic, payload, now)
                text = self._stored_json(topic, msg) if msg.kind == "telemetry" else None
            except Rejected as rej:
                self._reject(topic, rej)
                refused.append((topic, rej.reason, rej.detail, payload))
                continue
            parsed.append((topic, payload, msg, text))
        try:
            acks = self._confirmations(parsed, refused)
        except Exception:  # noqa: BLE001 - the batch is stored all the same; its devices send it again
            log.exception("building the confirmations of a batch of %d messages failed; its devices will send "
                          "those windows again (stored once)", len(batch))
            acks = []
        return _Prepared(parsed, refused, acks)

    def _stored_json(self, topic: str, msg: Message) -> str:
        """A validated window's stored JSON; a failure quarantines that message alone."""
        try:
            return store.window_json(msg.doc)
        except Exception as exc:  # noqa: BLE001 - one window must not stop the batch or the ingest thread
            log.exception("encoding the window on %s for storage failed; it is quarantined", topic[:200])
            raise Rejected("internal_error", f"{type(exc).__name__}: {exc}"[:500]) from None

    def _broker_stat(self, payload: bytes) -> None:
        try:
            value = float(payload[:64])
        except ValueError:
            return
        if math.isfinite(value):
            self.stats.broker_dropped = value

    def _load_bundles(self) -> dict:
        """The registered bundles; each one's reference profile also decodes its ``cbor-ref`` windows."""
        bundles = store.load_bundles(self.engine)
        for manifest in bundles.values():
            compact.register_bundle(manifest)
        return bundles

    def _parse(self, topic: str, payload: bytes, now: float) -> Message:
        try:
            return parse(topic, payload, self.prefix, self.max_payload, now=now, max_skew=self.max_skew)
        except Rejected as rej:
            # a cbor-ref window of a bundle registered since (by `convert --register` or another worker):
            # read the registry again, at most every 10 s, and try once more
            if rej.reason != "unknown_bundle" or time.monotonic() - self._bundles_reloaded < 10.0:
                raise
            self._bundles_reloaded = time.monotonic()
            self._bundles = self._load_bundles()
            return parse(topic, payload, self.prefix, self.max_payload, now=now, max_skew=self.max_skew)

    def _validate(self, topic: str, payload: bytes, now: float) -> Message:
        """Parse and check one message; any failure, expected or not, becomes a Rejected."""
        try:
            if isinstance(payload, CutPayload):      # read only in part: too large to hold
                raise Rejected("oversized", f"a {payload.packet_size}-byte packet is over the "
                                            f"{self.max_payload}-byte limit (its first bytes are kept)")
            msg = self._parse(topic, payload, now)
            if msg.kind == "telemetry":
                manifest = self._manifest(msg.doc["model"])
                if manifest is not None:
                    check_against_profile(msg.doc, manifest.get("reference_profile"), manifest.get("labels"))
            return msg
        except Rejected:
            raise
        except Exception as exc:  # noqa: BLE001 - a validation bug must not stall the stream
            log.exception("validating a message on %s failed unexpectedly; it is quarantined", topic[:200])
            raise Rejected("internal_error", f"{type(exc).__name__}: {exc}"[:500]) from None

    def _commit(self, prepared: _Prepared) -> None:
        """Store what was parsed and quarantine what was refused; acknowledge windows to their devices."""
        parsed, refused = prepared.parsed, prepared.refused
        try:
            self._store(parsed, refused)
        except Exception as exc:  # noqa: BLE001
            if _transient(exc):
                raise
            # one message the database refuses (a value out of a column's range, say) must not hold up the
            # others: store the batch in halves, down to the single messages it refuses, and quarantine those
            log.warning("the database refused a batch (%s); storing its %d messages in halves",
                        str(exc).splitlines()[0][:200], len(parsed))
            store_bisecting(parsed, lambda part: self._store(part, []), self._quarantine_refused, _transient)
            self._store([], refused)
        self._confirm(prepared.acks)

    def _quarantine_refused(self, item: tuple, exc: BaseException) -> None:
        rej = Rejected("database_error", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"[:500])
        self._reject(item[0], rej)
        self._store([], [(item[0], rej.reason, rej.detail, item[1])])

    def _store(self, parsed: list, refused: list) -> None:
        windows = [(m.fleet, m.device_id, m.doc) for _, _, m, _ in parsed if m.kind == "telemetry"]
        for _, _, m, _ in parsed:
            if m.kind == "status":
                store.store_status(self.engine, m.fleet, m.device_id, m.doc)
                if not m.doc["online"]:
                    self._mark(m.fleet, m.device_id, m.doc.get("model") or {})
            elif m.kind == "bench":
                store.store_bench(self.engine, m.fleet, m.device_id, m.doc)
        if windows:
            result = store.store_windows(self.engine, windows,
                                         texts=[text for _, _, m, text in parsed if m.kind == "telemetry"])
            new, dup = result
            if dup and getattr(result, "duplicate_keys", None):
                log.debug("%d windows were stored before (redelivered): %s", dup,
                          ", ".join(f"{f}/{d}#{q}" for f, d, q in result.duplicate_keys[:20]))
            self.stats.stored += new
            self.stats.duplicates += dup
            st = self.stats
            dirty = set()
            for fleet, device, doc in windows:       # validated windows (wire.check_telemetry's dicts)
                key = (fleet, device)
                st.inferences[key] += doc["count"]
                st.errors[key] += doc["errors"]
                st.latest[key] = doc["latency_ms"]
                model = doc["model"]
                if model["name"]:
                    dirty.add((fleet, device, model["name"], model["version"]))
            with self._dirty_lock:
                self._dirty |= dirty
        if refused:       # after the windows: a batch the database refuses is retried without these
            store.quarantine_messages(self.engine, refused, keep=self.quarantine_keep)
            for _, reason, _, _ in refused:
                self.stats.quarantined[reason] += 1

    def _confirmations(self, parsed: list, refused: list) -> list[tuple[str, bytes]]:
        """Each device's confirmation of a batch's windows (stored, duplicates or quarantined), built before
        the commit and sent after it."""
        if not self.confirm or self.client is None:
            return []
        done: dict[tuple[str, str], list[int]] = defaultdict(list)
        bad: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        for _, _, m, _ in parsed:
            if m.kind == "telemetry":
                done[(m.fleet, m.device_id)].append(m.doc["seq"])
        for topic, reason, _, payload in refused:
            try:
                fleet, device, kind = parse_topic(topic, self.prefix)
            except Rejected:
                continue
            seq = seq_of(payload, fleet, device, self.max_payload) if kind == "telemetry" else None
            if seq is not None:
                done[(fleet, device)].append(seq)
                bad[(fleet, device)][seq] = reason
        ts = round(time.time(), 3)
        return [(wire_topic(self.prefix, fleet, device, ACK), encode_ack(seqs, bad.get((fleet, device)), ts))
                for (fleet, device), seqs in done.items()]

    def _confirm(self, acks: list[tuple[str, bytes]]) -> None:
        """Tell each device which of its windows are committed."""
        if self.client is None or not acks:
            return
        many = getattr(self.client, "publish_many", None)
        if many is not None:        # one write for the batch's confirmations
            many(acks, qos=self.ack_qos)
            return
        for topic, payload in acks:
            self.client.publish(topic, payload, qos=self.ack_qos)

    def _reject(self, topic: str, rej: Rejected) -> None:
        parts = topic.split("/")
        device = parts[2][:64] if len(parts) > 2 else "?"
        self.stats.rejected[rej.reason] += 1
        if len(self._logged) < 10_000 and (device, rej.reason) not in self._logged:
            self._logged.add((device, rej.reason))
            log.warning("rejected a message from %r (%s): %s (further ones logged only as counts)",
                        device, rej.reason, rej.detail[:300])

    def _manifest(self, model: dict) -> dict | None:
        key = (model.get("name"), model.get("version"))
        m = self._bundles.get(key)
        if m is None and key not in self._bundles:
            self._bundles = self._load_bundles()  # another process may have registered it
            m = self._bundles.get(key)
            if m is None:
                self._bundles[key] = None
                log.info("no bundle %s %s is registered: its windows are stored, drift is not evaluated", *key)
        return m

    def _mark(self, fleet: str, device: str, model: dict) -> None:
        if model.get("name"):
            with self._dirty_lock:
                self._dirty.add((fleet, device, model["name"], model.get("version", "")))

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate_loop(self) -> None:
        while not self._stop.wait(self.eval_interval):
            try:
                self.evaluate_pending()
                self.check_silence()
            except Exception:  # noqa: BLE001
                log.exception("evaluation failed; retrying at the next interval")

    def evaluate_pending(self) -> list[tuple[str, dict]]:
        """Evaluate every device (and its fleet) that got windows since the last call."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        events = []
        fleets = set()
        for i, (fleet, device, name, version) in enumerate(sorted(dirty)):
            if self._stop.is_set():         # stopping: what is left waits for the next start's windows
                with self._dirty_lock:
                    self._dirty |= set(sorted(dirty)[i:])
                break
            # ingestion first: windows waiting in the inbox are not acknowledged yet, while an evaluation
            # that waits loses nothing (it reads the stored windows whenever it runs)
            while self._inbox.qsize() > self._inbox_busy and not self._stop.is_set():
                time.sleep(0.02)
            events += self._evaluate_contained(fleet, device, name, version)
            fleets.add((fleet, name, version))
        fleets |= self._fleet_pending
        self._fleet_pending = set()
        for key in sorted(fleets):
            started = time.monotonic()
            if started < self._fleet_due.get(key, 0.0):
                self._fleet_pending.add(key)
                continue
            events += self._evaluate_contained(key[0], "*", key[1], key[2])
            self._fleet_due[key] = time.monotonic() + FLEET_EVAL_SHARE * (time.monotonic() - started)
        return events

    def _evaluate_contained(self, fleet: str, device: str, name: str, version: str) -> list[tuple[str, dict]]:
        """One device's (or fleet's) evaluation; its failure is reported once and touches no other."""
        try:
            return self.evaluate_device(fleet, device, name, version)
        except Exception as exc:  # noqa: BLE001
            self.stats.evaluation_errors += 1
            key = ("evaluate", fleet, device, name, version, type(exc).__name__)
            if key not in self._logged:
                self._logged.add(key)
                seqs = self._recent_seqs(fleet, device, name, version)
                log.error("evaluating %s/%s (%s %s) failed: %s: %s; recent windows %s (reported once; other "
                          "devices are not affected)", fleet, device, name, version, type(exc).__name__, exc, seqs)
            return []

    def _fitting(self, windows: list[dict], manifest: dict) -> list[dict]:
        """The windows that fit the bundle's profile; one that does not (stored before it was registered, or
        by an older monitor) is left out of every evaluation and reported once with its id."""
        out = []
        for w in windows:
            try:
                check_against_profile(w, manifest.get("reference_profile"), manifest.get("labels"))
            except (Rejected, KeyError, TypeError) as exc:
                key = ("unfit", w.get("fleet"), w.get("device_id"), w.get("seq"))
                if key not in self._logged:
                    self._logged.add(key)
                    log.error("window %s/%s#%s is left out of evaluation: %s", *key[1:], exc)
                continue
            out.append(w)
        return out

    def _recent_seqs(self, fleet: str, device: str, name: str, version: str) -> str:
        try:
            recent = store.recent_windows(self.engine, fleet, None if device == "*" else device, name, version,
                                          self.config.recent_windows)
            return ", ".join(f"{w.get('device_id')}#{w.get('seq')}" for w in recent) or "none"
        except Exception:  # noqa: BLE001
            return "unknown"

    def evaluate_device(self, fleet: str, device: str, name: str, version: str) -> list[tuple[str, dict]]:
        manifest = self._manifest({"name": name, "version": version})
        cfg = self.config
        source = "first_windows"
        if device == "*":
            return self._evaluate_fleet(fleet, name, version, manifest)
        else:
            recent = store.recent_windows(self.engine, fleet, device, name, version, cfg.recent_windows)
            # the baseline: the device's own `edgeops bench --publish` result for this version and artifact
            # when it published one, else the median p95 of its first windows of this version
            artifact = (recent[0].get("model") or {}).get("artifact") if recent else None
            baseline = store.bench_p95(self.engine, fleet, device, name, version, artifact)
            source = "bench" if baseline is not None else "first_windows"
            if baseline is None:
                first = store.first_windows(self.engine, fleet, device, name, version, cfg.baseline_windows)
                baseline = sorted(first)[len(first) // 2] if len(first) >= cfg.baseline_windows else None
        if manifest is not None:
            recent = self._fitting(recent, manifest)
            self.fleet_view.update(fleet, name, version, device, recent)
        if not recent:
            return []
        if manifest is None:
            # no reference profile: drift is not judged, and the windows' feature blocks (whose histogram
            # lengths nothing pins) are left out of the merge; latency and errors are still judged
            recent = [{**w, "features": _NO_FEATURES} for w in recent]
        ev: Evaluation = evaluate(recent, manifest, cfg, baseline_p95=baseline, baseline_source=source)
        self.stats.scores[(fleet, device)] = ev.feature_scores
        for v in ev.verdicts:
            if v.detector == "accuracy":
                self.stats.accuracy[(fleet, device)] = (v.detail["accuracy"], v.detail["holdout_accuracy"],
                                                        v.detail["labelled"])
        return self._apply(fleet, device, name, version, ev.verdicts)

    def _evaluate_fleet(self, fleet: str, name: str, version: str, manifest: dict | None) -> list[tuple[str, dict]]:
        """The fleet's drift verdicts, from the pooled recent statistics of its devices (see FleetView): the
        cost does not grow with the number of devices."""
        if manifest is None:
            return []          # fleet verdicts are about drift, which needs the bundle's reference profile
        self._load_fleet_view(fleet, name, version)
        self.fleet_view.expire(fleet, name, version, FLEET_DEVICE_MAX_AGE)
        merged = self.fleet_view.merged(fleet, name, version)
        if merged is None:
            return []
        ev = evaluate([merged], manifest, self.config,
                      dependence_from=self.fleet_view.sample_windows(fleet, name, version))
        fleet_level = ("feature_drift", "prediction_drift", "missing_values", "confidence_drift", "accuracy")
        return self._apply(fleet, "*", name, version, [v for v in ev.verdicts if v.detector in fleet_level])

    def _load_fleet_view(self, fleet: str, name: str, version: str) -> None:
        """Fill the fleet view from the database for devices this process has not evaluated: at the first
        fleet verdict, and, when workers share the stream (each evaluates only the devices it received),
        every FLEET_RELOAD_S seconds."""
        key = (fleet, name, version)
        due = self._fleet_loaded.get(key)
        if due is not None and (not self._shared or time.monotonic() < due):
            return
        started = time.monotonic()
        manifest = self._manifest({"name": name, "version": version})
        for d in store.device_rows(self.engine):
            if d["fleet"] != fleet or d["model_name"] != name or d["model_version"] != version:
                continue
            recent = store.recent_windows(self.engine, fleet, d["device_id"], name, version,
                                          self.config.recent_windows)
            self.fleet_view.update(fleet, name, version, d["device_id"], self._fitting(recent, manifest))
        # the next reload: after FLEET_RELOAD_S, or 4x what this one took (a large fleet's reload never
        # takes more than a fifth of the evaluation loop)
        took = time.monotonic() - started
        self._fleet_loaded[key] = time.monotonic() + max(FLEET_RELOAD_S, FLEET_EVAL_SHARE * took)

    def _apply(self, fleet: str, device: str, name: str, version: str,
               verdicts: list[Verdict]) -> list[tuple[str, dict]]:
        events = []
        states = store.alert_states(self.engine, fleet, device, name, version) if verdicts else {}
        for v in verdicts:
            if not v.firing and not states.get(v.detector):
                continue        # nothing open and nothing firing: no state to change
            change = alerting.apply(self.engine, fleet, device, name, version, v, self.config.close_after)
            if change:
                event = {"event": change, "fleet": fleet, "device_id": device,
                         "model": {"name": name, "version": version},
                         "detector": v.detector, "features": v.features, "statistic": v.statistic, "detail": v.detail,
                         "ts": time.time()}
                log.warning("alert %s: %s on %s/%s (%s %s) %s", change, v.detector, fleet, device, name, version,
                            ", ".join(v.features) if v.features else f"statistic {v.statistic:.4g}")
                events.append((change, event))
                if self.webhook:
                    alerting.post_webhook(self.webhook, event)
                if change == "opened" and self.trigger is not None:
                    self._trigger(fleet, device, name, version, v.detector)
        if events:
            self.publish_alerts(fleet)
        return events

    def _trigger(self, fleet: str, device: str, name: str, version: str, detector: str) -> None:
        """Hand a drift or accuracy alert that just opened to the retraining trigger (it never blocks)."""
        from telemetry import retrain

        if detector not in retrain.TRIGGER_DETECTORS:
            return
        try:
            alert_id = store.alert_id_of(self.engine, fleet, device, name, version, detector)
            alert = store.alert_by_id(self.engine, alert_id) if alert_id is not None else None
            if alert is not None:
                self.trigger.fire(retrain.incident(self.engine, alert, self.config.recent_windows))
        except Exception:  # noqa: BLE001 - the trigger must not stop the evaluation
            log.exception("the alert trigger failed for %s on %s/%s", detector, fleet, device)

    def check_silence(self, now: float | None = None) -> list[tuple[str, dict]]:
        """Open a silence alert for devices with no window for K periods or a retained offline status."""
        now = now or time.time()
        events = []
        for d in store.device_rows(self.engine):
            if self.fleet not in ("+", d["fleet"]) or not d["model_name"]:
                continue
            series = store.window_series(self.engine, d["fleet"], d["device_id"], limit=5)
            period = typical_period([w["end"] for w in series])
            quiet = now - (d["last_seen"] or now)
            silent = SilenceDetector(self.config.silence_periods).update(d["online"], quiet, period).drift_detected
            verdict = Verdict("silence", silent, quiet, [], {"online": d["online"], "seconds_quiet": round(quiet, 1),
                                                             "period_s": round(period, 2)})
            events += self._apply(d["fleet"], d["device_id"], d["model_name"], d["model_version"] or "", [verdict])
        return events

    def publish_alerts(self, fleet: str) -> None:
        """The fleet's open alerts, retained on <prefix>/<fleet>/alerts."""
        if self.client is None:
            return
        self.client.publish(*self._alerts_message(fleet), qos=1, retain=True)

    def _alerts_message(self, fleet: str) -> tuple[str, bytes]:
        open_ = store.open_alerts(self.engine, fleet)
        doc = {"fleet": fleet, "ts": time.time(), "open": [
            {k: a[k] for k in ("device_id", "model_name", "model_version", "detector", "features", "statistic",
                               "opened_at")}
            for a in open_]}
        return fleet_topic(self.prefix, fleet, ALERTS), encode(doc)
