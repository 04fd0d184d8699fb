"""MQTT for the device side: broker URLs, TLS options and a v5 client that reconnects.

Devices speak MQTT v5 so that a refused publish is visible (PUBACK reason
code >= 0x80) instead of a silent success. A broker that speaks only MQTT
3.1.1 (such as the pure-Python amqtt) is reached with ``?protocol=3.1.1`` on
the broker URL: the session is then kept with ``clean_session=False`` (the
broker keeps it until the client returns) and shared subscriptions are not
available. A broker that goes away is an expected event: it is logged in one
line and the client reconnects with exponential backoff; nothing raises into
the caller.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

from edge_runtime.errors import InvalidInputError

log = logging.getLogger("edgeops.mqtt")

DEFAULT_PREFIX = "edgeops"
PROTOCOLS = {"5": "5", "5.0": "5", "v5": "5", "3.1.1": "3.1.1", "311": "3.1.1", "v311": "3.1.1"}


@dataclass(frozen=True)
class BrokerAddress:
    """Where and how to reach a broker (from mqtt://[user:pass@]host[:port][?protocol=3.1.1] or mqtts://...)."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    insecure: bool = False
    protocol: str = "5"
    fallbacks: tuple[tuple[str, int], ...] = ()   # more nodes of the same broker cluster, tried in turn

    @property
    def hosts(self) -> list[tuple[str, int]]:
        """Every (host, port) to try, the first one first."""
        return [(self.host, self.port), *self.fallbacks]

    @property
    def url(self) -> str:
        query = "" if self.protocol == "5" else f"?protocol={self.protocol}"
        scheme = "mqtts" if self.tls else "mqtt"
        return ",".join(f"{scheme}://{h}:{p}{query}" for h, p in self.hosts)

    @property
    def v5(self) -> bool:
        return self.protocol == "5"

    def paho_protocol(self):
        import paho.mqtt.client as mqtt

        return mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311


def parse_broker_url(url: str, username: str | None = None, password: str | None = None,
                     ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None,
                     insecure: bool = False) -> BrokerAddress:
    """Parse ``mqtt://host:port`` or ``mqtts://user:pass@host:8883``; explicit options win over the URL.

    Several comma-separated URLs name the nodes of one broker cluster (same scheme, protocol and
    credentials): a client connects to the first and fails over to the next when it loses it.
    """
    parts = [u.strip() for u in url.split(",") if u.strip()]
    if len(parts) > 1:
        nodes = [parse_broker_url(u, username, password, ca_file, cert_file, key_file, insecure) for u in parts]
        first = nodes[0]
        for n in nodes[1:]:
            if (n.tls, n.protocol, n.username, n.password) != (first.tls, first.protocol, first.username,
                                                               first.password):
                raise InvalidInputError(f"broker URLs {url!r}: every node needs the same scheme, protocol and "
                                        "credentials")
        return replace(first, fallbacks=tuple((n.host, n.port) for n in nodes[1:]))
    parsed = urlparse(url if "://" in url else f"mqtt://{url}")
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise InvalidInputError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
    if not parsed.hostname:
        raise InvalidInputError(f"broker URL {url!r}: no host")
    tls = parsed.scheme in ("mqtts", "ssl")
    query = parse_qs(parsed.query)
    unknown = sorted(set(query) - {"protocol"})
    if unknown:
        raise InvalidInputError(f"broker URL {url!r}: unknown parameter {unknown[0]!r} (only 'protocol' is known)")
    wanted = (query.get("protocol") or ["5"])[-1]
    if wanted not in PROTOCOLS:
        raise InvalidInputError(f"broker URL {url!r}: protocol must be 5 or 3.1.1, not {wanted!r}")
    try:
        port = parsed.port or (8883 if tls else 1883)
    except ValueError:
        raise InvalidInputError(f"broker URL {url!r}: bad port") from None
    return BrokerAddress(
        host=parsed.hostname,
        port=port,
        tls=tls,
        username=username or (unquote(parsed.username) if parsed.username else None),
        password=password or (unquote(parsed.password) if parsed.password else None),
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        insecure=insecure,
        protocol=PROTOCOLS[wanted],
    )


def topic(prefix: str, fleet: str, device: str, kind: str) -> str:
    """``<prefix>/<fleet>/<device>/<kind>`` (defined in :mod:`edge_runtime.wire`)."""
    from edge_runtime import wire

    return wire.topic(prefix, fleet, device, kind)


def make_client(address: BrokerAddress, client_id: str, *, session_expiry: int = 3600,
                will: tuple[str, bytes] | None = None, max_inflight: int = 100,
                reconnect: tuple[int, int] = (1, 30)):
    """The one way this project configures a paho-mqtt 2.x client.

    Protocol (v5, or 3.1.1 from the URL), credentials, TLS (CA, client certificate and key, and
    ``insecure`` for a self-signed test broker), a retained QoS 1 last will, the in-flight window and
    the reconnect backoff. Connect it with ``client.connect_async(**connect_args(address, session_expiry))``
    (or ``connect``): a session that survives disconnects when ``session_expiry`` > 0.

    Args:
        address: the broker.
        client_id: MQTT client id.
        session_expiry: seconds the broker keeps the session while the client is away (0: clean).
        will: (topic, payload) the broker publishes, retained, if the connection dies.
        max_inflight: QoS 1 publishes awaiting their PUBACK at most.
        reconnect: (min, max) seconds of the reconnect backoff.
    """
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=address.paho_protocol(),
                         **({} if address.v5 else {"clean_session": session_expiry == 0}))
    client.max_inflight_messages_set(max_inflight)
    client.reconnect_delay_set(min_delay=reconnect[0], max_delay=reconnect[1])
    if address.username:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(ca_certs=address.ca_file, certfile=address.cert_file, keyfile=address.key_file,
                       cert_reqs=ssl.CERT_NONE if address.insecure else ssl.CERT_REQUIRED)
        if address.insecure:
            client.tls_insecure_set(True)
    if will:
        client.will_set(will[0], will[1], qos=1, retain=True)
    return client


def connect_args(address: BrokerAddress, session_expiry: int = 3600, keepalive: int = 30) -> dict:
    """Keyword arguments of ``connect``/``connect_async`` that go with :func:`make_client`."""
    args: dict = {"host": address.host, "port": address.port, "keepalive": keepalive}
    if address.v5:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        args.update(clean_start=session_expiry == 0, properties=props)
    return args


class NodeRotation:
    """Which node of a broker cluster a client uses; :meth:`advance` fails over to the next one.

    >>> r = NodeRotation(parse_broker_url("mqtt://a:1883,mqtt://b:1884"))
    >>> r.current, r.advance(None), r.current
    (('a', 1883), True, ('b', 1884))
    """

    def __init__(self, address: BrokerAddress):
        self.hosts = address.hosts
        self.index = 0
        self.rounds = 0          # full rounds of nodes tried since the last successful connection

    @property
    def current(self) -> tuple[str, int]:
        return self.hosts[self.index]

    def connected(self) -> None:
        """A node took the connection: the next failure starts with the shortest wait again."""
        self.rounds = 0

    def advance(self, client) -> bool:
        """Point ``client`` (a paho client whose connection is closed) at the next node; False with one node."""
        if len(self.hosts) < 2:
            return False
        self.index = (self.index + 1) % len(self.hosts)
        self.rounds += self.index == 0
        if client is not None:
            # paho's host/port setters refuse while its reconnect loop owns the connection state (inside the
            # disconnect and connect-failure callbacks); its reconnect reads these two fields, so set them
            client._host, client._port = self.current
            self._pace(client)
            log.info("trying broker node %s:%d", *self.current)
        return True

    def _pace(self, client) -> None:
        """paho doubles its reconnect wait at each failed attempt, so across a cluster the last nodes were
        tried after the longest waits (1, 2, 4, 8 s ... for the 1st, 2nd, 3rd, 4th node). The wait doubles
        once per full round of nodes instead: every node of the first round after the shortest wait."""
        lock = getattr(client, "_reconnect_delay_mutex", None)
        if lock is None or not hasattr(client, "_reconnect_min_delay"):
            return          # another paho version: its own backoff stays
        low, high = client._reconnect_min_delay, client._reconnect_max_delay
        wait = min(low * 2 ** min(self.rounds, 20), high)
        with lock:      # paho doubles the delay it holds just before waiting
            client._reconnect_delay = None if wait <= low else wait / 2


DOTTED_CLOSE_S = 2.0     # a connection closed this soon after a publish to a dotted topic: see _explain_dotted_topic


class MqttLink:
    """A paho-mqtt 2.x v5 client with a persistent session, a last will and reconnect backoff.

    Args:
        address: the broker.
        client_id: MQTT client id (the device id for an agent).
        will: (topic, payload) published retained by the broker if the link dies.
        on_connect: called (from the network thread) after every successful (re)connect.
        on_ack: called with (mid, ok) when a QoS 1 publish is acknowledged.
        session_expiry: seconds the broker keeps the session while disconnected.
    """

    def __init__(self, address: BrokerAddress, client_id: str, will: tuple[str, bytes] | None = None,  # noqa: PLR0913 - the link's configuration
                 on_connect: Callable[[], None] | None = None, on_ack: Callable[[int, bool], None] | None = None,
                 on_message: Callable[[str, bytes], None] | None = None, session_expiry: int = 3600,
                 min_backoff: float = 0.5, max_backoff: float = 30.0):
        import paho.mqtt.client as mqtt

        self._mqtt = mqtt
        self.address = address
        self.connected = threading.Event()
        self._user_on_connect = on_connect
        self._on_ack = on_ack
        self._on_message = on_message
        self._was_connected = False
        # 3.1.1: the broker keeps a non-clean session until the client comes back
        self.client = make_client(address, client_id, session_expiry=session_expiry, will=will,
                                  reconnect=(max(1, int(min_backoff)), int(max_backoff)))
        self._connect_args = connect_args(address, session_expiry)
        self.client.on_connect = self._handle_connect
        self.client.on_disconnect = self._handle_disconnect
        self.client.on_publish = self._handle_publish
        self.client.on_message = self._handle_message
        self.client.on_connect_fail = self._handle_connect_fail
        self._nodes = NodeRotation(address)
        self.last_contact: float | None = None     # wall time of the broker's last answer (for /metrics)
        self.refused: str | None = None
        self._stopping = False
        self._last_publish: tuple[str, float] = ("", 0.0)    # topic and monotonic time of the latest publish
        self._dotted_warned = False

    def start(self) -> None:
        """Connect in the background; returns at once (the link retries until stopped)."""
        self.client.connect_async(**self._connect_args)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, final: tuple[str, bytes] | None = None, timeout: float = 5.0) -> None:
        """Publish ``final`` (retained) if connected, then disconnect and stop the network thread."""
        if final and self.connected.is_set():
            info = self.client.publish(final[0], final[1], qos=1, retain=True)
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass
        self._stopping = True
        self.client.disconnect()
        self._stop_network_thread(timeout)
        self.connected.clear()

    def _stop_network_thread(self, timeout: float) -> None:
        """paho's ``loop_stop()`` joins its network thread without a time limit: joined here with one (a
        thread stuck in a callback or a socket call is left behind as a daemon, and said)."""
        stopper = threading.Thread(target=self.client.loop_stop, name="mqtt-loop-stop", daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            log.warning("the MQTT network thread did not stop within %.0f s; leaving it behind", timeout)

    def pause(self) -> None:
        """Drop the connection as if the network went away (the broker publishes the last will).

        For emulated outages: nothing is sent until :meth:`resume`; the spool keeps the windows.
        """
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.reasoncodes import ReasonCode

        self._stopping = True
        if self.address.v5:
            self.client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))  # with will message
            self.client.loop_stop()
        else:   # 3.1.1 has no "disconnect with will": the connection just drops, as on a network loss
            self.client.loop_stop()
            sock = self.client.socket()
            if sock is not None:
                sock.close()
        self.connected.clear()

    def resume(self) -> None:
        """Reconnect after :meth:`pause` (same persistent session)."""
        self._stopping = False
        self.start()

    def publish(self, topic_name: str, payload: bytes, qos: int = 1, retain: bool = False) -> int | None:
        """Queue a publish; returns its message id, or None when not connected."""
        if not self.connected.is_set():
            return None
        self._last_publish = (topic_name, time.monotonic())
        info = self.client.publish(topic_name, payload, qos=qos, retain=retain)
        if info.rc != self._mqtt.MQTT_ERR_SUCCESS:
            return None
        return info.mid

    def subscribe(self, topic_name: str, qos: int = 1) -> None:
        self.client.subscribe(topic_name, qos=qos)

    # -- callbacks (network thread) ------------------------------------------------------------

    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.refused = str(reason_code)
            log.error("broker %s refused the connection: %s", self.address.url, reason_code)
            return
        self.refused = None
        self._nodes.connected()
        self.last_contact = time.time()
        log.info("%s to broker %s", "reconnected" if self._was_connected else "connected",
                 self.address.url if len(self.address.hosts) == 1 else "%s:%d" % self.node)
        self._was_connected = True
        self.connected.set()
        if self._user_on_connect:
            self._user_on_connect()

    @property
    def node(self) -> tuple[str, int]:
        """The broker node this link uses (or tries) now."""
        return self._nodes.current

    def _next_node(self) -> None:
        if not self._stopping:
            self._nodes.advance(self.client)

    def _handle_connect_fail(self, client, userdata) -> None:
        self._next_node()

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        if self.connected.is_set() and not self._stopping:
            log.warning("lost broker %s:%d (%s); reconnecting with backoff, windows are kept on disk",
                        *self.node, reason_code)
            self._explain_dotted_topic()
        self.connected.clear()
        self._next_node()

    def _explain_dotted_topic(self) -> None:
        """nats-server (2.9) closes an MQTT connection that publishes to a topic with a '.' in it, and the
        resent publish closes the next one: say why, once, instead of reconnecting in silence."""
        name, when = self._last_publish
        if "." in name and time.monotonic() - when < DOTTED_CLOSE_S and not self._dotted_warned:
            self._dotted_warned = True
            log.error("broker %s:%d closed the connection right after a publish to %r: a NATS server (before "
                      "2.10) refuses MQTT topics with a '.' in them, so fleet and device ids with a dot cannot "
                      "be used there; the windows stay on disk until the ids or the broker change",
                      *self.node, name)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        self.last_contact = time.time()
        ok = not getattr(reason_code, "is_failure", False)
        if not ok:
            log.error("broker refused message %s: %s", mid, reason_code)
        if self._on_ack:
            self._on_ack(mid, ok)

    def _handle_message(self, client, userdata, message) -> None:
        if self._on_message:
            try:
                self._on_message(message.topic, message.payload)
            except Exception:  # noqa: BLE001 - a bad command must not kill the network thread
                log.exception("handling a message on %s failed", message.topic)
