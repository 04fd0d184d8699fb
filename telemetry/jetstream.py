"""The monitor on NATS JetStream: devices speak MQTT to any node of a NATS cluster, workers consume natively.

nats-server's MQTT support keeps every QoS 1 message an MQTT client publishes in the JetStream stream
``$MQTT_msgs``, on the subject ``$MQTT.msgs.<topic>`` (the topic's ``/`` become ``.``; nats-server 2.9
refuses a topic with a ``.`` in it, so a fleet or device id with a dot cannot use it; 2.10 and later map a
``.`` to ``//``, as here). The stream keeps a message while a consumer is interested in it (interest
retention). Here the monitor reads the fleet's telemetry, bench and status messages from that stream
through durable pull consumers (one per kind, named after the monitor's default client id, e.g.
``edgeops-monitor-<fleet>-telemetry``), with explicit acknowledgement:

- a message is acknowledged only after the database transaction of the batch that holds it has
  committed (stored, a duplicate, or quarantined with its reason), so the messages of a worker that dies
  are delivered again after the consumer's AckWait, to whichever worker asks next;
- every worker (process) that binds the same durable consumers takes a share of the stream;
- the database deduplicates by (device, sequence): redelivery never stores a window twice.

The parsing, validation, batching, storage and evaluation are the :class:`~telemetry.monitor.FleetMonitor`'s;
only the transport differs. The acks the devices wait for (``<prefix>/<fleet>/<device>/ack``) and the
fleet's alerts are published the way nats-server handles an MQTT client's QoS 1 publish: into the same
stream (``$MQTT.msgs.<prefix>.<fleet>.<device>.ack``, marked as from MQTT), from which nats-server
delivers them to MQTT subscribers at QoS 1, also to a persistent session that is offline at that moment,
and as a plain NATS message (``<prefix>.<fleet>.<device>.ack``) for NATS and QoS 0 subscribers. (A plain
NATS message alone reaches only connected MQTT subscribers, at QoS 0.) The alerts are not retained (a
retained MQTT message needs an MQTT publisher).

nats-py's asyncio client runs in a thread of its own with its own event loop; the rest of the monitor
talks to it with thread-safe calls.

>>> mqtt_to_subject("edgeops/lab.1/cam-2/telemetry"), subject_to_mqtt("edgeops.lab//1.cam-2.telemetry")
('edgeops.lab//1.cam-2.telemetry', 'edgeops/lab.1/cam-2/telemetry')
>>> mqtt_to_subject("edgeops/+/+/telemetry")
'edgeops.*.*.telemetry'
>>> parse_nats_urls("nats://a:4222, nats://b")
['nats://a:4222', 'nats://b:4222']
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from edge_runtime.errors import InvalidInputError
from edge_runtime.wire import subscription
from telemetry.monitor import FleetMonitor, default_client_id

log = logging.getLogger("edgeops.monitor")

STREAM = "$MQTT_msgs"                  # where nats-server keeps the QoS 1 messages of MQTT clients
SUBJECTS = "$MQTT.msgs."               # ... on these subjects
KINDS = ("telemetry", "bench", "status")
FETCH = 256                            # messages asked for at a time, per consumer
QUEUED_MAX = 2_000                     # fetched messages waiting in the inbox, at most: the rest waits in the
                                       # stream, so none waits near AckWait in a worker (then to be sent again)
FETCH_WAIT = 1.0                       # seconds a fetch waits for a first message (also how fast a stop is seen)
RETRY_S = 2.0                          # between attempts to reach the server or find the stream
MAX_ACK_PENDING = 20_000               # delivered and not yet acknowledged, per consumer (all workers together)
PUBLISH_TIMEOUT = 2.0
MQTT_QOS1 = {"Nmqtt-Pub": "1"}        # nats-server's mark on what an MQTT client published at QoS 1


def is_nats_url(url: str) -> bool:
    return url.strip().lower().startswith("nats://")


def parse_nats_urls(url: str) -> list[str]:
    """The server URLs of ``nats://host[:port][,nats://host2...]`` (the nodes of one cluster, failed over in
    turn); raises InvalidInputError for anything else."""
    servers = []
    for part in (p.strip() for p in url.split(",")):
        if not part:
            continue
        parsed = urlparse(part)
        if parsed.scheme != "nats" or not parsed.hostname:
            raise InvalidInputError(f"broker URL {part!r}: a NATS server is nats://host[:port]")
        if parsed.path not in ("", "/") or parsed.query:
            raise InvalidInputError(f"broker URL {part!r}: a NATS URL takes no path or parameters")
        try:
            port = parsed.port or 4222
        except ValueError:
            raise InvalidInputError(f"broker URL {part!r}: bad port") from None
        auth = parsed.netloc.rpartition("@")[0]
        host = f"[{parsed.hostname}]" if ":" in parsed.hostname else parsed.hostname
        servers.append(f"nats://{auth + '@' if auth else ''}{host}:{port}")
    if not servers:
        raise InvalidInputError(f"broker URL {url!r}: no NATS server")
    return servers


def mqtt_to_subject(topic: str) -> str:
    """The NATS subject nats-server uses for an MQTT topic or filter (``+`` -> ``*``, ``#`` -> ``>``)."""
    levels = []
    for level in topic.split("/"):
        levels.append({"+": "*", "#": ">"}.get(level, level.replace(".", "//")))
    return ".".join(levels)


def subject_to_mqtt(subject: str) -> str:
    """The MQTT topic of a NATS subject (the inverse of :func:`mqtt_to_subject` for topics)."""
    return "/".join(token.replace("//", ".") for token in subject.split("."))


def _durable_base(name: str) -> str:
    """A consumer name from a client id: NATS names take no ``.``, ``*``, ``>`` or whitespace."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:200]


@dataclass(frozen=True)
class NatsAddress:
    """The NATS servers of one cluster, and how to authenticate."""

    servers: tuple[str, ...]
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None

    @property
    def url(self) -> str:
        """The servers, without any password."""
        return ",".join(s.split("://", 1)[0] + "://" + s.split("://", 1)[1].rpartition("@")[2] for s in self.servers)

    @property
    def v5(self) -> bool:          # no MQTT shared subscription here: workers share the durable consumer
        return False


def nats_address(url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None) -> NatsAddress:
    return NatsAddress(tuple(parse_nats_urls(url)), username, password, ca_file)


class _Link:
    """What the monitor's threads call to publish and acknowledge: each call is handed to the event loop."""

    def __init__(self, owner: "JetStreamMonitor"):
        self.owner = owner

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        self.owner._call(self.owner._publish, topic, bytes(payload))

    def ack(self, msg, qos: int = 1) -> None:
        self.owner._call(self.owner._ack, [msg])


class JetStreamMonitor(FleetMonitor):
    """A :class:`FleetMonitor` that consumes from NATS JetStream instead of subscribing over MQTT.

    Args (besides FleetMonitor's):
        broker: the NATS servers (:func:`nats_address`).
        share: a group name; workers with the same fleet and group (or the same ``client_id``) share the
            durable consumers, and so the stream.
        client_id: names the durable consumers (``<client_id>-telemetry`` and so on); the same on every
            worker that shares the stream.
        ack_wait: seconds after which a message delivered to a worker and not acknowledged (the worker
            died, or its database has been unreachable that long) is delivered again.
        alerts_broker: the MQTT side of the same servers (``mqtt://n1:1883,mqtt://n2:1883?protocol=3.1.1``):
            the fleet's open alerts are then published there, retained (a NATS publish cannot be a retained
            MQTT message); without it they go out as plain messages, seen only by whoever listens then.
    """

    def __init__(self, broker: NatsAddress, db_url: str = "sqlite:///monitor.db", fleet: str = "+",
                 share: str | None = None, client_id: str | None = None, ack_wait: float = 30.0,
                 alerts_broker=None, **kwargs):
        super().__init__(broker, db_url, fleet=fleet, share=None,
                         client_id=client_id or default_client_id(fleet, share), **kwargs)
        self.share = share
        self.ack_wait = ack_wait
        self.durable = _durable_base(self.client_id)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Event | None = None
        self._tasks: set = set()
        self._nc = None
        self._js = None
        self._warned: dict[str, float] = {}
        self.alerts_broker = alerts_broker
        self._alerts = None         # the MQTT connection the retained alerts go through

    @property
    def _shared(self) -> bool:
        return True         # any number of workers may bind the same durable consumers

    def consumers(self) -> dict[str, str]:
        """kind -> (consumer name, filter subject)."""
        return {k: (f"{self.durable}-{k}", SUBJECTS + mqtt_to_subject(subscription(self.prefix, self.fleet, k)))
                for k in KINDS}

    # -- the transport (called from the monitor's threads) ---------------------------------------

    def _connect(self) -> None:
        self.client = _Link(self)
        if self.alerts_broker is not None:
            import uuid

            from telemetry.mqtt_stream import StreamConnection

            # workers share the consumers, not this connection: each its own client id, a clean session
            self._alerts = StreamConnection(self.alerts_broker, f"{self.client_id}-alerts-{uuid.uuid4().hex[:6]}",
                                            session_expiry=0).start()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            self._closing = asyncio.Event()
            ready.set()
            try:
                loop.run_until_complete(self._main())
            except Exception:  # noqa: BLE001 - logged; the monitor's stop still ends the process
                log.exception("the NATS consumer stopped")
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="edgeops-monitor-nats", daemon=True)
        self._thread.start()
        ready.wait(5)

    def _acknowledge(self, batch: list) -> None:
        msgs = [token for _, _, token, qos in batch if qos and token is not None]
        if msgs:
            self._call(self._ack, msgs)

    def publish_alerts(self, fleet: str) -> None:
        if self._alerts is None:
            super().publish_alerts(fleet)
            return
        self._alerts.publish(*self._alerts_message(fleet), qos=1, retain=True)

    def _disconnect(self) -> None:
        if self._alerts is not None:
            self._alerts.stop()
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            loop.call_soon_threadsafe(self._closing.set)
        except RuntimeError:            # the loop has already ended
            pass
        thread.join(timeout=8)
        if thread.is_alive():
            log.warning("the NATS client did not close within 8 s; leaving it")

    def _call(self, coro_fn, *args) -> None:
        """Run ``coro_fn(*args)`` on the event loop, from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def spawn() -> None:
            task = loop.create_task(coro_fn(*args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        try:
            loop.call_soon_threadsafe(spawn)
        except RuntimeError:
            pass

    # -- the event loop's side ---------------------------------------------------------------------

    def _warn(self, key: str, message: str, *args, every: float = 30.0) -> None:
        """A warning, at most once per ``every`` seconds per key (a server that stays away is one line)."""
        now = time.monotonic()
        if now - self._warned.get(key, -1e9) >= every:
            self._warned[key] = now
            log.warning(message, *args)

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when the monitor is stopping."""
        end = time.monotonic() + seconds
        while not self._stop.is_set() and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))
        return self._stop.is_set()

    async def _main(self) -> None:
        pulls: list[asyncio.Task] = []
        try:
            if await self._open():
                pulls = [asyncio.get_running_loop().create_task(self._pull(kind)) for kind in KINDS]
            while not self._stop.is_set():
                await asyncio.sleep(0.1)
            await asyncio.gather(*pulls, return_exceptions=True)
            # the ingest thread acknowledges what it stored until it ends; then the monitor closes the link
            try:
                await asyncio.wait_for(self._closing.wait(), 20)
            except asyncio.TimeoutError:
                pass
            pending = [t for t in self._tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=PUBLISH_TIMEOUT + 0.5)
        finally:
            for t in pulls:
                t.cancel()
            await self._close_nc()

    async def _close_nc(self) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            await asyncio.wait_for(nc.flush(timeout=2), 3)
        except Exception:  # noqa: BLE001 - closing anyway
            pass
        try:
            await asyncio.wait_for(nc.close(), 3)
        except Exception:  # noqa: BLE001
            pass

    async def _open(self) -> bool:
        """Connect (retrying while no server answers), wait for the stream, create or bind the consumers.
        False when the monitor is stopped first."""
        import nats

        async def on_error(exc):
            what = "cannot reach" if not self.connected.is_set() else "error from"
            self._warn("error", "%s NATS %s: %s; retrying (said again at most every 30 s)", what, self.broker.url,
                       str(exc) or type(exc).__name__)

        async def on_disconnected():
            if not self._stop.is_set():
                self._warn("lost", "monitor lost NATS server %s; reconnecting to the cluster", self._server(), every=5)
            self.connected.clear()

        async def on_reconnected():
            log.info("monitor reconnected to NATS server %s", self._server())
            self.connected.set()

        tls = None
        if self.broker.ca_file:
            import ssl

            tls = ssl.create_default_context(cafile=self.broker.ca_file)
        # the servers in the order given (the first first, as over MQTT), the next one when a node goes away
        options = dict(name=self.client_id, connect_timeout=2, reconnect_time_wait=1, max_reconnect_attempts=-1,
                       allow_reconnect=True, dont_randomize=True, error_cb=on_error, disconnected_cb=on_disconnected,
                       reconnected_cb=on_reconnected, tls=tls, user=self.broker.username,
                       password=self.broker.password, pending_size=64 * 1024 * 1024)
        connect = asyncio.get_running_loop().create_task(nats.connect(list(self.broker.servers), **options))
        while not connect.done():
            if self._stop.is_set():
                connect.cancel()
                return False
            await asyncio.sleep(0.1)
        try:
            self._nc = connect.result()
        except Exception as exc:  # noqa: BLE001 - an authentication error, say: said in one line, then stop
            log.error("cannot connect to NATS %s: %s", self.broker.url, exc)
            return False
        self._js = self._nc.jetstream(timeout=5)
        while True:
            resumed = await self._ensure_consumers()
            if resumed is not None:
                break
            if await self._sleep(RETRY_S):
                return False
        await asyncio.get_running_loop().run_in_executor(None, self._log_session, resumed)
        log.info("monitor connected to %s as %s: JetStream consumers %s on %s (AckWait %.0f s)", self._server(),
                 self.client_id, ", ".join(name for name, _ in self.consumers().values()), STREAM, self.ack_wait)
        self.connected.set()
        return True

    def _server(self) -> str:
        nc = self._nc
        uri = getattr(getattr(nc, "_current_server", None), "uri", None) if nc is not None else None
        return f"nats://{uri.hostname}:{uri.port}" if uri is not None else self.broker.url

    async def _ensure_consumers(self) -> bool | None:
        """Create (or bind) the durable consumers; whether they existed before; None (logged) when the server
        has no JetStream or no MQTT stream yet."""
        from nats.js import errors as jse
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        try:
            await self._js.stream_info(STREAM)
        except jse.NotFoundError:
            self._warn("stream", "NATS %s has no JetStream stream %s yet (nats-server makes it when the first MQTT "
                       "client connects, with MQTT and JetStream enabled); waiting", self._server(), STREAM)
            return None
        except Exception as exc:  # noqa: BLE001 - no JetStream, no quorum yet, a timeout
            self._warn("stream", "NATS %s: JetStream does not answer (%s); waiting", self._server(),
                       str(exc) or type(exc).__name__)
            return None
        existed = True
        for name, subject in self.consumers().values():
            config = ConsumerConfig(durable_name=name, filter_subject=subject, ack_policy=AckPolicy.EXPLICIT,
                                    deliver_policy=DeliverPolicy.ALL, ack_wait=self.ack_wait, max_deliver=-1,
                                    max_ack_pending=MAX_ACK_PENDING)
            try:
                info = await self._js.consumer_info(STREAM, name)
                if info.config.filter_subject != subject:
                    log.error("JetStream consumer %s on %s filters %s, not %s: delete it, or give this monitor "
                              "another --client-id", name, STREAM, info.config.filter_subject, subject)
                    return None
                continue
            except jse.NotFoundError:
                existed = False
            except Exception as exc:  # noqa: BLE001
                self._warn("consumer", "NATS %s: cannot read consumer %s (%s); waiting", self._server(), name,
                           str(exc) or type(exc).__name__)
                return None
            try:
                await self._js.add_consumer(STREAM, config)
            except Exception as exc:  # noqa: BLE001 - another worker made it meanwhile: fine when it is there now
                try:
                    await self._js.consumer_info(STREAM, name)
                except Exception:  # noqa: BLE001
                    self._warn("consumer", "NATS %s: cannot create consumer %s (%s); waiting", self._server(), name,
                               str(exc) or type(exc).__name__)
                    return None
        return existed

    async def _pull(self, kind: str) -> None:
        """Fetch ``kind`` messages into the monitor's inbox while it runs."""
        name, _ = self.consumers()[kind]
        sub = None
        while not self._stop.is_set():
            if self._inbox.qsize() >= QUEUED_MAX:       # the ingest thread is behind: the stream keeps the rest
                await asyncio.sleep(0.05)
                continue
            try:
                if sub is None:
                    sub = await self._js.pull_subscribe_bind(name, STREAM)
                msgs = await sub.fetch(FETCH, timeout=FETCH_WAIT)
            except asyncio.TimeoutError:
                continue
            except Exception as exc:  # noqa: BLE001 - a node going away, a consumer leader moving, no quorum
                from nats.js import errors as jse

                if isinstance(exc, jse.NotFoundError):      # the consumer is gone: make it again
                    await self._ensure_consumers()
                self._warn(f"fetch-{kind}", "fetching %s from NATS %s failed (%s); retrying", kind, self._server(),
                           str(exc) or type(exc).__name__, every=10)
                if await self._sleep(0.5):
                    break
                continue
            for i, m in enumerate(msgs):
                item = (subject_to_mqtt(m.subject[len(SUBJECTS):]) if m.subject.startswith(SUBJECTS) else m.subject,
                        m.data, m, 1)
                while not self._stop.is_set():
                    try:
                        self._inbox.put_nowait(item)
                        break
                    except Exception:  # noqa: BLE001 - queue.Full
                        await asyncio.sleep(0.02)
                else:          # stopping: what was not queued goes back to the stream at once, for another worker
                    for rest in msgs[i:]:
                        await self._settle(rest.nak)
                    break

    async def _settle(self, fn) -> None:
        try:
            await fn()
        except Exception as exc:  # noqa: BLE001 - lost: JetStream delivers the message again after AckWait
            log.debug("an acknowledgement did not reach NATS: %s", exc)

    async def _ack(self, msgs: list) -> None:
        for m in msgs:
            await self._settle(m.ack)

    async def _publish(self, topic: str, payload: bytes) -> None:
        """What nats-server does with an MQTT client's QoS 1 publish: the message goes into the MQTT stream,
        marked as an MQTT QoS 1 publish (MQTT subscribers at QoS 1 get it from there, offline persistent
        sessions included), and out as a plain NATS message with the same mark (NATS subscribers and MQTT
        subscribers at QoS 0 get that one; QoS 1 subscribers skip it). Without the mark, nats-server 2.9
        delivers a message published into the stream only to the MQTT subscribers of some nodes of a cluster.
        When the stream does not take it, the plain message goes without the mark, to every connected
        subscriber."""
        if self._nc is None or self._js is None:
            return          # not connected yet: a device ack is sent again with its next window's commit
        subject = mqtt_to_subject(topic)
        stored = False
        try:
            await self._js.publish(SUBJECTS + subject, payload, timeout=PUBLISH_TIMEOUT, headers=dict(MQTT_QOS1))
            stored = True
        except Exception as exc:  # noqa: BLE001
            self._warn("publish", "publishing %s into %s failed (%s); sent as a plain NATS message", topic, STREAM,
                       str(exc) or type(exc).__name__, every=30)
        try:
            await self._nc.publish(subject, payload, headers=dict(MQTT_QOS1) if stored else None)
        except Exception as exc:  # noqa: BLE001 - a device ack that is lost: the device resends, and is acked then
            log.debug("publishing %s failed: %s", topic, exc)
