"""The monitor's MQTT connection: a protocol-level reader built for a stream of small windows.

paho-mqtt (which every other part of the project uses, through :func:`edge_runtime.mqtt.make_client`)
handles one packet per ``select``: a handful of ``recv`` calls, a message object, a properties object,
and for each manual acknowledgement a wake-up of its network thread and one ``send``. On a monitor
worker that was about 40% of the CPU per window. This connection reads what the socket holds (up to
256 KiB at a time), cuts it into packets in one loop, hands the messages over in one call, and sends
the acknowledgements of a committed batch (PUBACKs, and the monitor's confirmations to the devices) in
one ``sendall``. See ``python -m benchmarks.scale --mqtt-client lean,paho``.

What it speaks: MQTT 5 and 3.1.1 over TCP or TLS (the same :class:`~edge_runtime.mqtt.BrokerAddress`:
URLs with several cluster nodes, credentials, CA, client certificate, ``insecure``), a persistent
session (v5 session expiry, or 3.1.1 ``clean_session=0``), QoS 0 and 1 in both directions, keepalive,
and reconnection with backoff that rotates through the nodes (the backoff grows after a full round
of nodes has failed, not at each node). It never uses topic aliases, and asks for at most QoS 1.

A broker that sends something malformed, or a packet over ``max_packet`` bytes, does not stall it:
a malformed stream closes the connection (the session redelivers what was not acknowledged), and a
PUBLISH over ``max_packet`` is handed over as its first 64 KiB (topic, packet id and the payload's
head, a :class:`CutPayload` naming the packet's size) while the rest is skipped as it arrives, so that
the monitor refuses it as oversized, quarantines its head and acknowledges it, without holding the
whole packet in memory. Brokers are not told a Maximum Packet Size: an MQTT 5 broker would then drop
such a message unseen, and its device would send the window again forever.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import ssl
import struct
import threading
import time
from typing import Callable

from edge_runtime.mqtt import BrokerAddress

log = logging.getLogger("edgeops.monitor.mqtt")

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
READ_SIZE = 256 * 1024
MAX_WAITING_OUT = 100_000     # our QoS 1 publishes waiting for room in the broker's Receive Maximum; over it,
                              # the oldest are dropped (logged): a device whose confirmation is lost sends again
CONNECT_TIMEOUT = 10.0
HEAD_MAX = 65_536 + 16       # of an oversized PUBLISH, what is read: its topic, packet id and payload's head
SEND_TIMEOUT = 30.0           # a broker that takes no bytes for this long is treated as gone

CONNACK_V311 = {1: "unacceptable protocol version", 2: "identifier rejected", 3: "server unavailable",
                4: "bad user name or password", 5: "not authorized"}


class CutPayload(bytes):
    """The head of a PUBLISH payload too large to read whole; ``packet_size`` is the whole packet's size."""

    packet_size: int

    def __new__(cls, head: bytes, packet_size: int):
        obj = super().__new__(cls, head)
        obj.packet_size = packet_size
        return obj


class ProtocolError(Exception):
    """The broker sent bytes that are not MQTT: the connection is closed (the session redelivers)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8") if isinstance(s, str) else s
    if len(b) > 0xFFFF:
        raise ValueError("an MQTT string is at most 65,535 bytes")
    return struct.pack("!H", len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _read_varint(buf, pos: int, end: int) -> tuple[int, int] | None:
    """(value, next position) of the variable byte integer at ``pos``; None when it runs past ``end``."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= end:
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("a variable byte integer longer than 4 bytes")


def encode_connect(address: BrokerAddress, client_id: str, session_expiry: int, keepalive: int,
                   receive_max: int) -> bytes:
    clean = session_expiry == 0
    flags = 0x02 if clean else 0
    if address.username is not None:
        flags |= 0x80
        if address.password is not None:
            flags |= 0x40
    body = _string("MQTT") + bytes((5 if address.v5 else 4, flags)) + struct.pack("!H", keepalive)
    if address.v5:
        # no Maximum Packet Size: a broker would drop larger messages unseen, and the device would send its
        # window forever; the monitor reads their head instead, quarantines it and confirms the window
        props = b"\x11" + struct.pack("!I", session_expiry) + b"\x21" + struct.pack("!H", receive_max)
        body += _varint(len(props)) + props
    body += _string(client_id)
    if address.username is not None:
        body += _string(address.username)
        if address.password is not None:
            body += _string(address.password)
    return _packet(CONNECT, body)


def encode_subscribe(mid: int, topics: list[str], v5: bool) -> bytes:
    body = struct.pack("!H", mid) + (b"\x00" if v5 else b"")
    for t in topics:
        body += _string(t) + b"\x01"       # at most QoS 1 (v5: no-local 0, retain-as-published 0, send retained)
    return _packet(SUBSCRIBE, body)


def encode_publish(topic: str, payload: bytes, qos: int, retain: bool, mid: int, v5: bool, dup: bool = False) -> bytes:
    first = PUBLISH | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    head = _string(topic) + (struct.pack("!H", mid) if qos else b"") + (b"\x00" if v5 else b"")
    return bytes((first,)) + _varint(len(head) + len(payload)) + head + payload


def encode_pubacks(mids) -> bytes:
    """PUBACKs for these packet ids, back to back (success: v5 allows the 3.1.1 form)."""
    return b"".join(b"\x40\x02" + struct.pack("!H", m) for m in mids)


# MQTT 5 property identifiers by the size of their value (MQTT 5, 2.2.2.2)
_PROP_BYTE = frozenset((0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A))
_PROP_U16 = frozenset((0x13, 0x21, 0x22, 0x23))
_PROP_U32 = frozenset((0x02, 0x11, 0x18, 0x27))
_PROP_LENGTH_PREFIXED = frozenset((0x03, 0x08, 0x09, 0x12, 0x15, 0x16, 0x1A, 0x1C, 0x1F))


def connack_receive_maximum(body: bytes) -> int:
    """The Receive Maximum (property 0x21) of an MQTT 5 CONNACK's body; 65,535 when it is absent or the
    properties cannot be read."""
    got = _read_varint(body, 2, len(body))
    if got is None:
        return 65_535
    length, pos = got
    end = min(len(body), pos + length)
    while pos < end:
        ident = body[pos]
        pos += 1
        if ident == 0x21 and pos + 2 <= end:
            return max(1, struct.unpack_from("!H", body, pos)[0])
        if ident in _PROP_BYTE:
            pos += 1
        elif ident in _PROP_U16:
            pos += 2
        elif ident in _PROP_U32:
            pos += 4
        elif ident == 0x0B:
            got = _read_varint(body, pos, end)
            if got is None:
                break
            pos = got[1]
        elif ident in _PROP_LENGTH_PREFIXED and pos + 2 <= end:
            pos += 2 + struct.unpack_from("!H", body, pos)[0]
        elif ident == 0x26 and pos + 2 <= end:            # a user property: two strings
            pos += 2 + struct.unpack_from("!H", body, pos)[0]
            if pos + 2 > end:
                break
            pos += 2 + struct.unpack_from("!H", body, pos)[0]
        else:
            break
    return 65_535


def tls_context(address: BrokerAddress) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=address.ca_file)
    if address.cert_file:
        ctx.load_cert_chain(address.cert_file, address.key_file)
    if address.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class StreamConnection:
    """One MQTT client connection for a consumer that acknowledges in batches (see the module's text).

    Callbacks run on the connection's own thread:
        on_connect(session_present): after a successful CONNACK (subscribe from here).
        on_subscribe(mid, codes): a SUBACK; ``codes`` are the return/reason codes (>= 0x80: refused).
        on_messages([(topic, payload, mid, qos), ...]): the PUBLISH packets of one read, in order. A QoS 1
            message is acknowledged only by :meth:`ack` (after it is committed): until then the broker
            keeps it and delivers it again on the next connection.
        on_disconnect(reason): the connection is gone (it reconnects by itself until :meth:`stop`).
        on_refused(reason): the broker refused the connection (CONNACK failure).
    """

    def __init__(self, address: BrokerAddress, client_id: str, *, session_expiry: int = 3600,  # noqa: PLR0913
                 keepalive: int = 30, receive_max: int = 1000, max_packet: int = 1 << 20,
                 reconnect: tuple[float, float] = (1.0, 30.0), max_waiting: int = MAX_WAITING_OUT,
                 on_connect: Callable[[bool], None] | None = None,
                 on_subscribe: Callable[[int, list[int]], None] | None = None,
                 on_messages: Callable[[list], None] | None = None,
                 on_disconnect: Callable[[str], None] | None = None,
                 on_refused: Callable[[str], None] | None = None):
        self.address = address
        self.client_id = client_id
        self.session_expiry = session_expiry
        self.keepalive = keepalive
        self.receive_max = receive_max
        self.max_packet = max_packet
        self.reconnect = reconnect
        self.max_waiting = max_waiting
        self.on_connect, self.on_subscribe, self.on_messages = on_connect, on_subscribe, on_messages
        self.on_disconnect, self.on_refused = on_disconnect, on_refused
        self.v5 = address.v5
        self.hosts = address.hosts
        self.node = 0                       # index of the node used (or tried) now
        self._sock: socket.socket | None = None
        self._connected = False
        self._stop = threading.Event()
        self._wlock = threading.Lock()
        self._mid = 0
        self._mid_lock = threading.Lock()
        self._inflight: dict[int, bytes] = {}       # our QoS 1 publishes awaiting PUBACK (resent on reconnect)
        self._waiting: collections.deque = collections.deque()   # QoS 1 (topic, payload, retain) not sent yet
        self._out_lock = threading.Lock()
        self._send_quota = 65_535                   # the broker's Receive Maximum (MQTT 5 CONNACK)
        self._subscribing: set[int] = set()         # SUBSCRIBE packet ids awaiting their SUBACK
        self._dropped_out = 0
        self._last_sent = 0.0
        self._last_heard = 0.0
        self._last_ping = 0.0
        self._thread: threading.Thread | None = None

    # -- public ------------------------------------------------------------------------------------

    @property
    def current(self) -> tuple[str, int]:
        return self.hosts[self.node]

    def start(self) -> "StreamConnection":
        self._thread = threading.Thread(target=self._run, name="edgeops-monitor-mqtt", daemon=True)
        self._thread.start()
        return self

    def is_connected(self) -> bool:
        return self._connected

    def stop(self, timeout: float = 5.0) -> None:
        """Disconnect normally (the session stays on the broker; nothing unacknowledged is lost)."""
        self._stop.set()
        if self._connected:
            self._send(b"\xe0\x00")
        self._close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def drop(self) -> None:
        """Close the connection as a network failure would; it reconnects (to the next node)."""
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def subscribe(self, topics: list[str]) -> int | None:
        """Subscribe at QoS 1; returns the packet id its SUBACK will carry, or None when not connected."""
        mid = self._next_mid()
        self._subscribing.add(mid)
        if self._send(encode_subscribe(mid, topics, self.v5)):
            return mid
        self._subscribing.discard(mid)
        return None

    def ack(self, mids) -> None:
        """Acknowledge received QoS 1 messages (one write for all)."""
        if mids:
            self._send(encode_pubacks(mids))

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        self.publish_many([(topic, payload)], qos=qos, retain=retain)

    def publish_many(self, items: list[tuple[str, bytes]], qos: int = 0, retain: bool = False) -> None:
        """Publish several messages in one write. At QoS 1 each is kept until its PUBACK, and sent again
        after a reconnect (also when published while disconnected); no more are unacknowledged at a time
        than the broker's Receive Maximum allows (the rest wait, in order). At QoS 0 they are dropped when
        the connection is down."""
        if not qos:
            if self._connected:
                self._send(b"".join(encode_publish(t, p, 0, retain, 0, self.v5) for t, p in items))
            return
        with self._out_lock:
            for topic, payload in items:
                if len(self._waiting) >= self.max_waiting:
                    self._waiting.popleft()
                    self._dropped_out += 1
                    if self._dropped_out in (1, 10, 100, 1000) or self._dropped_out % 10_000 == 0:
                        log.warning("%d QoS 1 publishes of the monitor dropped: %d await the broker's PUBACK "
                                    "and %d more wait", self._dropped_out, len(self._inflight), len(self._waiting))
                self._waiting.append((topic, payload, retain))
        self._pump()

    def _pump(self) -> None:
        """Send waiting QoS 1 publishes while the broker's Receive Maximum has room (one write)."""
        if not self._connected:
            return
        out = []
        with self._out_lock:
            while self._waiting and len(self._inflight) < self._send_quota:
                topic, payload, retain = self._waiting.popleft()
                mid = self._next_mid()
                packet = encode_publish(topic, payload, 1, retain, mid, self.v5)
                self._inflight[mid] = packet
                out.append(packet)
        if out:
            self._send(b"".join(out))

    def unconfirmed(self) -> int:
        """Our QoS 1 publishes the broker has not acknowledged yet (sent, or waiting to be sent)."""
        with self._out_lock:
            return len(self._inflight) + len(self._waiting)

    # -- internals ---------------------------------------------------------------------------------

    def _next_mid(self) -> int:
        with self._mid_lock:
            for _ in range(65535):
                self._mid = self._mid % 65535 + 1
                if self._mid not in self._inflight and self._mid not in self._subscribing:
                    return self._mid
        raise RuntimeError("no free MQTT packet id")

    def _send(self, data: bytes) -> bool:
        sock = self._sock
        if sock is None:
            return False
        try:
            with self._wlock:
                sock.sendall(data)
            self._last_sent = time.monotonic()
            return True
        except OSError as exc:
            log.debug("send to the broker failed: %s", exc)
            self.drop()
            return False

    def _close(self) -> None:
        sock, self._sock = self._sock, None
        self._connected = False
        self._subscribing.clear()          # a SUBSCRIBE of a closed connection gets no SUBACK
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _run(self) -> None:
        delay = self.reconnect[0]
        failed_nodes = 0
        while not self._stop.is_set():
            host, port = self.current
            reason = None
            try:
                self._open(host, port)
                self._read_loop()
                reason = "connection closed"
            except ProtocolError as exc:
                reason = f"protocol error: {exc}"
            except (OSError, ssl.SSLError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            except _Refused as exc:
                reason = f"refused: {exc}"
                if self.on_refused:
                    self.on_refused(str(exc))
            except Exception as exc:  # noqa: BLE001 - a callback's bug must not end the connection for good
                if self._stop.is_set():
                    return
                log.exception("the monitor's MQTT connection failed unexpectedly")
                reason = f"{type(exc).__name__}: {exc}"
            was_connected = self._connected
            self._close()
            if self._stop.is_set():
                return
            if was_connected:
                if self.on_disconnect:
                    self.on_disconnect(reason or "closed")
            else:       # the first failure of a series is a warning, the retries are not
                (log.info if failed_nodes else log.warning)("could not connect to broker %s:%d (%s)", host, port,
                                                            reason)
            if len(self.hosts) > 1:
                self.node = (self.node + 1) % len(self.hosts)
                log.info("trying broker node %s:%d", *self.current)
            if was_connected:
                delay, failed_nodes = self.reconnect[0], 0
                wait = self.reconnect[0]
            else:
                failed_nodes += 1
                wait = delay
                if failed_nodes % len(self.hosts) == 0:       # a full round of nodes failed: back off further
                    delay = min(delay * 2, self.reconnect[1])
            self._stop.wait(wait)

    def _open(self, host: str, port: int) -> None:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.address.tls:
                sock = tls_context(self.address).wrap_socket(sock, server_hostname=host)
            sock.settimeout(SEND_TIMEOUT)
            self._sock = sock
            self._buf = bytearray()
            self._skip = 0
            self._last_heard = time.monotonic()
            if not self._send(encode_connect(self.address, self.client_id, self.session_expiry, self.keepalive,
                                             self.receive_max)):
                raise OSError("the broker closed the connection at CONNECT")
        except BaseException:
            if self._sock is None:
                sock.close()
            raise

    def _read_loop(self) -> None:
        sock = self._sock
        while not self._stop.is_set() and sock is self._sock:
            pending = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not pending:
                ready, _, _ = select.select([sock], [], [], 0.5)
                if not ready:
                    self._keep_alive(time.monotonic())
                    continue
            try:
                data = sock.recv(READ_SIZE)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            if not data:
                return
            self._last_heard = time.monotonic()
            self._feed(data)
            self._keep_alive(self._last_heard)

    def _keep_alive(self, now: float) -> None:
        """PINGREQ when nothing was sent, or nothing heard, for half the keepalive (at most one per half);
        a broker silent for 1.5 keepalives (or a CONNECT unanswered for 10 s) is taken as gone.
        Keepalive 0 turns both off (MQTT 3.1.2.10)."""
        if not self._connected:
            if now - self._last_heard > CONNECT_TIMEOUT:
                raise OSError(f"the broker did not answer the CONNECT in {now - self._last_heard:.0f} s")
            return
        if not self.keepalive:
            return
        if now - self._last_heard > 1.5 * self.keepalive:
            raise OSError(f"the broker said nothing for {now - self._last_heard:.0f} s")
        half = self.keepalive / 2
        if (now - self._last_sent >= half or now - self._last_heard >= half) and now - self._last_ping >= half:
            self._last_ping = now
            self._send(b"\xc0\x00")

    def _feed(self, data: bytes) -> None:
        """Cut what was read into packets; hand the messages over in one call."""
        if self._skip:                       # the tail of an oversized PUBLISH: dropped as it arrives
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if not data:
                return
        buf = self._buf
        buf += data
        messages: list = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            got = _read_varint(buf, pos + 1, end)
            if got is None:
                break
            length, start = got
            if length > self.max_packet:
                if first & 0xF0 != PUBLISH:
                    raise ProtocolError(f"a {length}-byte packet of type 0x{first:02x}")
                head = min(length, HEAD_MAX)       # always holds the topic and the packet id
                if end - start < head:
                    break
                messages.append(self._publish(first, bytes(buf[start:start + head]), full=length))
                self._skip = length - head
                pos = start + head
                if self._skip and end > pos:       # the rest of the read belongs to it too
                    n = min(self._skip, end - pos)
                    self._skip -= n
                    pos += n
                continue
            if end - start < length:
                break
            body = bytes(buf[start:start + length])
            pos = start + length
            if first & 0xF0 == PUBLISH:
                messages.append(self._publish(first, body))
            else:
                self._control(first, body)
        del buf[:pos]
        if messages and self.on_messages:
            self.on_messages(messages)

    def _publish(self, first: int, body: bytes, full: int | None = None) -> tuple[str, bytes, int, int]:
        """(topic, payload, packet id, qos) of a PUBLISH; ``full``: the length of a packet of which ``body``
        is the head (its payload is then a :class:`CutPayload`)."""
        qos = (first >> 1) & 0x03
        if qos == 3:
            raise ProtocolError("a PUBLISH with QoS 3")
        if len(body) < 2:
            raise ProtocolError("a PUBLISH too short for its topic")
        (tlen,) = struct.unpack_from("!H", body, 0)
        pos = 2 + tlen
        topic = body[2:pos].decode("utf-8", "replace")
        mid = 0
        if qos:
            if len(body) < pos + 2:
                raise ProtocolError("a PUBLISH too short for its packet id")
            (mid,) = struct.unpack_from("!H", body, pos)
            pos += 2
        if self.v5:
            got = _read_varint(body, pos, len(body))
            if got is None and full is None:
                raise ProtocolError("a PUBLISH too short for its properties")
            pos = got[1] + got[0] if got else len(body)
        if pos > len(body) and full is None:
            raise ProtocolError("a PUBLISH whose header runs past its end")
        if full is not None:
            return topic, CutPayload(body[pos:], full), mid, min(qos, 1)
        return topic, body[pos:], mid, min(qos, 1)

    def _connack(self, body: bytes) -> None:
        if len(body) < 2:
            raise ProtocolError("a CONNACK too short")
        code = body[1]
        if code:
            raise _Refused(CONNACK_V311.get(code, f"reason code 0x{code:02x}") if not self.v5
                           else f"reason code 0x{code:02x}")
        self._send_quota = connack_receive_maximum(body) if self.v5 else 65_535
        self._connected = True
        with self._out_lock:          # what was published and never acknowledged, in order, marked DUP
            again = list(self._inflight.values())
        if again:
            self._send(b"".join(bytes((p[0] | 0x08,)) + p[1:] for p in again))
        self._pump()
        if self.on_connect:
            self.on_connect(bool(body[0] & 0x01))

    def _control(self, first: int, body: bytes) -> None:
        kind = first & 0xF0
        if kind == CONNACK:
            self._connack(body)
        elif kind == SUBACK:
            if len(body) < 2:
                raise ProtocolError("a SUBACK too short")
            (mid,) = struct.unpack_from("!H", body, 0)
            self._subscribing.discard(mid)
            pos = 2
            if self.v5:
                got = _read_varint(body, pos, len(body))
                if got is None:
                    raise ProtocolError("a SUBACK too short for its properties")
                pos = got[1] + got[0]
            if self.on_subscribe:
                self.on_subscribe(mid, list(body[pos:]))
        elif kind == PUBACK:
            if len(body) < 2:
                raise ProtocolError("a PUBACK too short")
            (mid,) = struct.unpack_from("!H", body, 0)
            with self._out_lock:
                self._inflight.pop(mid, None)
            if self.v5 and len(body) > 2 and body[2] >= 0x80:
                log.warning("the broker refused a publish of the monitor (reason code 0x%02x)", body[2])
            if self._waiting:
                self._pump()
        elif kind == DISCONNECT:
            code = body[0] if body else 0
            raise OSError(f"the broker disconnected the monitor (reason code 0x{code:02x})")
        elif kind == PINGRESP:
            pass
        else:
            raise ProtocolError(f"unexpected packet type 0x{first:02x}")


class _Refused(Exception):
    """A CONNACK with a failure code."""
