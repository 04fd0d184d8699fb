"""The monitor's own MQTT connection (telemetry.mqtt_stream.StreamConnection) speaks MQTT 5 and 3.1.1 correctly.

Against a real Mosquitto: messages of every size arrive whole and in order, the persistent session redelivers
exactly what was not acknowledged, an oversized PUBLISH arrives cut without losing the stream, QoS 1 publishes
survive a broker restart, keepalive holds an idle connection, and TLS works (and fails closed with a wrong CA).
Against a fake broker (a socket server in the test that sends crafted bytes): fragmented and coalesced packets
are cut correctly, malformed streams and refusals lead to a reconnection instead of a dead thread, the CONNECT
carries the right flags, and a silent broker is given up after one and a half keepalive periods.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import struct
import threading
import time
import uuid
from itertools import pairwise
from typing import Callable

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from devtools.brokers import MosquittoBroker, free_port
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry.mqtt_stream import CutPayload, StreamConnection, connack_receive_maximum

PROTOCOLS = {"5": "", "3.1.1": "?protocol=3.1.1"}
CONNACK_OK = {"5": b"\x20\x03\x00\x00\x00", "3.1.1": b"\x20\x02\x00\x00"}
HEAD_LIMIT = 65_536 + 16          # at most this much of an oversized PUBLISH's body is read
FAST = (0.1, 0.2)                 # reconnect backoff that keeps these tests quick


# -- MQTT bytes, written independently of the module under test ---------------------------------------------

def varint(n: int) -> bytes:
    out = bytearray([n & 0x7F])
    for shift in (7, 14, 21):
        if n >> shift:
            out[-1] |= 0x80
            out.append((n >> shift) & 0x7F)
    return bytes(out)


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = 0
    for i in range(4):
        value |= (data[pos + i] & 0x7F) << (7 * i)
        if not data[pos + i] & 0x80:
            return value, pos + i + 1
    raise ValueError("varint longer than 4 bytes")


def publish_packet(topic: str, payload: bytes, *, mid: int = 0, v5: bool = True, props: bytes = b"") -> bytes:
    """A PUBLISH at QoS 1 when ``mid`` is given, else QoS 0 (``props``: MQTT 5 properties)."""
    first = 0x30 | (0x02 if mid else 0)
    body = struct.pack("!H", len(topic)) + topic.encode() + (struct.pack("!H", mid) if mid else b"")
    body += (varint(len(props)) + props if v5 else b"") + payload
    return bytes((first,)) + varint(len(body)) + body


def puback(mid: int) -> bytes:
    return b"\x40\x02" + struct.pack("!H", mid)


def parse_connect(body: bytes) -> dict:
    """The fields of a CONNECT packet's body."""
    (n,) = struct.unpack_from("!H", body, 0)
    out = {"name": body[2:2 + n], "level": body[2 + n], "flags": body[3 + n]}
    (out["keepalive"],) = struct.unpack_from("!H", body, 4 + n)
    pos, out["props"] = 6 + n, b""
    if out["level"] == 5:
        length, pos = read_varint(body, pos)
        out["props"], pos = body[pos:pos + length], pos + length
    fields = []
    while pos < len(body):
        (n,) = struct.unpack_from("!H", body, pos)
        fields.append(body[pos + 2:pos + 2 + n])
        pos += 2 + n
    out["client_id"], out["credentials"] = fields[0], fields[1:]
    return out


# -- a fake broker ------------------------------------------------------------------------------------------

class Expect(bytes):
    """A script step: wait until the client has sent these bytes (on this connection, since its CONNECT)."""


class FakeBroker:
    """A TCP server that speaks only as much MQTT as a test scripts.

    ``script(index, connect_body)`` gives the steps for the index-th connection: bytes to send (``gap`` seconds
    apart, to keep fragments apart on the wire), :class:`Expect`, or a callable to run (to wait for the test).
    After its script a connection keeps reading
    what the client sends (``received[index]``) until the client leaves or the test ends.
    """

    def __init__(self, script: Callable[[int, bytes], list], gap: float = 0.0):
        self.script, self.gap = script, gap
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.cond = threading.Condition()
        self.connects: list[tuple[float, bytes]] = []    # (when, CONNECT body)
        self.received: list[bytearray] = []
        self.errors: list[str] = []
        self._done = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def url(self, query: str = "", userinfo: str = "") -> str:
        return f"mqtt://{userinfo}127.0.0.1:{self.port}{query}"

    def wait_connects(self, n: int, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.connects) >= n, timeout)

    def _accept(self) -> None:
        while not self._done.is_set():
            try:
                sock, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._socks.append(sock)
            t = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(t)
            t.start()

    def _read_until(self, sock: socket.socket, pending: bytearray, done: Callable[[], bool],
                    timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if self._done.is_set() or time.monotonic() > deadline:
                raise EOFError
            try:
                data = sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                raise EOFError
            with self.cond:
                pending += data
                self.cond.notify_all()

    def _serve(self, sock: socket.socket) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.1)
        pending = bytearray()

        def whole_packet() -> bool:
            if len(pending) < 2 or all(b & 0x80 for b in pending[1:5]):
                return False
            length, start = read_varint(bytes(pending), 1)
            return len(pending) >= start + length

        try:
            self._read_until(sock, pending, whole_packet)
            if pending[0] != 0x10:
                self.errors.append(f"first packet is not a CONNECT: {bytes(pending[:8])!r}")
                return
            length, start = read_varint(bytes(pending), 1)
            body = bytes(pending[start:start + length])
            del pending[:start + length]
            with self.cond:
                index = len(self.connects)
                self.connects.append((time.monotonic(), body))
                self.received.append(pending)
                self.cond.notify_all()
            for step in self.script(index, body):
                if isinstance(step, Expect):
                    try:
                        self._read_until(sock, pending, lambda s=step: s in pending)
                    except EOFError:
                        self.errors.append(f"connection {index}: the client never sent {bytes(step)!r}")
                        return
                elif callable(step):
                    step()
                else:
                    sock.sendall(step)
                    if self.gap:
                        time.sleep(self.gap)      # pacing, so that fragments travel apart
            self._read_until(sock, pending, lambda: False, timeout=3600)
        except (OSError, EOFError):
            pass
        finally:
            sock.close()

    def close(self) -> None:
        self._done.set()
        self.server.close()
        for t in self._threads:
            t.join(5)
        for s in self._socks:
            s.close()


# -- fixtures -----------------------------------------------------------------------------------------------

class Recorder:
    """The callbacks of one StreamConnection, recorded; ``topics`` are subscribed at each connect."""

    def __init__(self, topics: list[str] | None = None, ack: bool = True):
        self.topics, self.auto_ack = topics, ack
        self.cond = threading.Condition()
        self.conn: StreamConnection | None = None
        self.messages: list[tuple] = []
        self.connects: list[bool] = []
        self.subacks: list[tuple[int, list[int]]] = []
        self.disconnects: list[str] = []
        self.refusals: list[str] = []

    def callbacks(self) -> dict:
        return {"on_connect": self.on_connect, "on_subscribe": self.on_subscribe, "on_messages": self.on_messages,
                "on_disconnect": self.on_disconnect, "on_refused": self.on_refused}

    def _add(self, items: list, value) -> None:
        with self.cond:
            items.append(value)
            self.cond.notify_all()

    def on_connect(self, session_present: bool) -> None:
        self._add(self.connects, session_present)
        if self.topics:
            self.conn.subscribe(self.topics)

    def on_subscribe(self, mid: int, codes: list[int]) -> None:
        self._add(self.subacks, (mid, codes))

    def on_messages(self, messages: list) -> None:
        with self.cond:
            self.messages.extend(messages)
            self.cond.notify_all()
        if self.auto_ack:
            self.conn.ack([mid for _, _, mid, qos in messages if qos])

    def on_disconnect(self, reason: str) -> None:
        self._add(self.disconnects, reason)

    def on_refused(self, reason: str) -> None:
        self._add(self.refusals, reason)

    def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def payloads(self) -> list[bytes]:
        with self.cond:
            return [p for _, p, _, _ in self.messages]


@pytest.fixture
def stream():
    """open(url_or_address, recorder, **options): a started StreamConnection, stopped at the end."""
    opened: list[StreamConnection] = []

    def open_(where, recorder: Recorder, client_id: str | None = None, **options) -> StreamConnection:
        address = parse_broker_url(where) if isinstance(where, str) else where
        conn = StreamConnection(address, client_id or f"t-{uuid.uuid4().hex[:8]}", **recorder.callbacks(), **options)
        recorder.conn = conn
        opened.append(conn)
        return conn.start()

    yield open_
    for conn in opened:
        conn.stop()
    for conn in opened:
        assert conn._thread is None or not conn._thread.is_alive(), "the connection's thread outlived stop()"


@pytest.fixture
def fake_broker():
    """make(script, gap=0.0): a FakeBroker, closed at the end (and checked for script failures)."""
    made: list[FakeBroker] = []

    def make(script, gap: float = 0.0) -> FakeBroker:
        made.append(FakeBroker(script, gap))
        return made[-1]

    yield make
    for broker in made:
        broker.close()
    for broker in made:
        assert not broker.errors, broker.errors


@pytest.fixture(autouse=True)
def thread_errors(monkeypatch):
    """No exception may escape a thread (the connection's own thread above all)."""
    seen: list[str] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: seen.append(f"{args.thread}: {args.exc_value!r}"))
    yield seen
    assert not seen, seen


@pytest.fixture
def publisher(mosquitto):
    """A paho-mqtt client connected to the private broker; ``publisher.send(topic, payload)`` waits for PUBACK."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", mosquitto.port)
    client.loop_start()

    def send(topic: str, *payloads: bytes) -> None:
        infos = [client.publish(topic, p, qos=1) for p in payloads]
        for info in infos:
            info.wait_for_publish(10)
            assert info.is_published(), "the broker did not take a test publish"

    client.send = send
    try:
        yield client
    finally:
        client.disconnect()
        client.loop_stop()


def topic_name() -> str:
    return f"edgeops/t/{uuid.uuid4().hex[:8]}/telemetry"


# -- against Mosquitto --------------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_qos1_messages_of_every_size_arrive_whole_and_in_order(protocol, mosquitto, publisher, stream):
    topic = topic_name()
    rec = Recorder([topic])
    stream(mosquitto.url + PROTOCOLS[protocol], rec)
    assert rec.wait(lambda: rec.subacks, 10), "no SUBACK"
    assert rec.subacks[0][1] == [1], f"QoS 1 not granted: {rec.subacks}"
    assert rec.connects == [False]
    sizes = [b"", b"x", bytes(range(250)) * 4, bytes(range(256)) * 800]   # 0 B, 1 B, 1000 B, 200 KB
    numbered = [f"n-{i}".encode() for i in range(200)]
    expected = sizes + numbered
    publisher.send(topic, *expected)
    assert rec.wait(lambda: len(rec.messages) >= len(expected), 15), f"{len(rec.messages)} of {len(expected)}"
    assert [len(p) for p in rec.payloads()] == [len(p) for p in expected]
    assert rec.payloads() == expected
    assert {(t, q) for t, _, _, q in rec.messages} == {(topic, 1)}
    assert all(mid > 0 for _, _, mid, _ in rec.messages)
    assert not any(isinstance(p, CutPayload) for p in rec.payloads())


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_session_redelivers_exactly_the_messages_not_acknowledged(protocol, mosquitto, publisher, stream):
    topic, client_id, url = topic_name(), f"mon-{uuid.uuid4().hex[:8]}", mosquitto.url + PROTOCOLS[protocol]
    first = Recorder([topic], ack=False)
    conn = stream(url, first, client_id=client_id, session_expiry=600)
    assert first.wait(lambda: first.subacks, 10)
    publisher.send(topic, b"m1", b"m2", b"m3", b"m4")
    assert first.wait(lambda: len(first.messages) == 4, 10)
    conn.ack([mid for _, p, mid, _ in first.messages if p in (b"m1", b"m2")])
    conn.stop()

    again = Recorder()                      # no subscribe: the session has the subscription
    stream(url, again, client_id=client_id, session_expiry=600)
    assert again.wait(lambda: again.connects, 10)
    assert again.connects == [True], "the broker kept no session"
    publisher.send(topic, b"marker")        # queued behind the redeliveries: once it is in, nothing more comes
    assert again.wait(lambda: b"marker" in again.payloads(), 10), again.payloads()
    assert again.payloads() == [b"m3", b"m4", b"marker"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_oversized_publish_arrives_cut_and_the_stream_stays_in_sync(protocol, mosquitto, publisher, stream):
    topic, client_id, url = topic_name(), f"mon-{uuid.uuid4().hex[:8]}", mosquitto.url + PROTOCOLS[protocol]
    big = bytes(range(256)) * 400                       # 102,400 bytes
    rec = Recorder([topic])
    conn = stream(url, rec, client_id=client_id, max_packet=4096)
    assert rec.wait(lambda: rec.subacks, 10)
    publisher.send(topic, big, b"after")
    assert rec.wait(lambda: len(rec.messages) >= 2, 10), rec.payloads()
    (t1, cut, mid1, q1), (t2, after, _, _) = rec.messages[:2]
    assert (t1, q1, t2, after) == (topic, 1, topic, b"after")
    assert isinstance(cut, CutPayload)
    assert 0 < len(cut) <= HEAD_LIMIT and bytes(cut) == big[:len(cut)]
    remaining = 2 + len(topic) + 2 + (1 if protocol == "5" else 0) + len(big)    # topic, packet id, properties
    assert cut.packet_size == remaining
    conn.stop()                              # both were acknowledged (auto_ack): neither comes back

    again = Recorder()
    stream(url, again, client_id=client_id, max_packet=4096)
    assert again.wait(lambda: again.connects == [True], 10), again.connects
    publisher.send(topic, b"marker")
    assert again.wait(lambda: again.messages, 10)
    assert again.payloads() == [b"marker"]


def test_connecting_fails_over_to_the_next_cluster_node(mosquitto, stream):
    dead = free_port()                                   # nothing listens there
    address = parse_broker_url(f"mqtt://127.0.0.1:{dead},{mosquitto.url}")
    rec = Recorder()
    conn = stream(address, rec, reconnect=FAST)
    assert rec.wait(lambda: rec.connects, 10), "never connected to the second node"
    assert conn.current == ("127.0.0.1", mosquitto.port)
    assert conn.is_connected()


def test_a_qos1_publish_made_while_the_broker_is_down_is_delivered_after_its_restart(mosquitto, stream):
    topic, got, subscribed = topic_name(), [], threading.Event()
    cond = threading.Condition()
    watch = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}",
                        protocol=mqtt.MQTTv311, clean_session=False)     # its subscription survives the restart
    watch.reconnect_delay_set(1, 1)

    def on_message(client, userdata, msg):
        with cond:
            got.append(msg.payload)
            cond.notify_all()

    watch.on_message = on_message
    watch.on_connect = lambda c, u, flags, rc, props: c.subscribe(topic, 1)
    watch.on_subscribe = lambda *a: subscribed.set()
    watch.connect("127.0.0.1", mosquitto.port)
    watch.loop_start()
    try:
        rec = Recorder()
        conn = stream(mosquitto.url, rec, reconnect=FAST)
        assert subscribed.wait(10) and rec.wait(lambda: rec.connects, 10)
        mosquitto.stop()
        assert rec.wait(lambda: rec.disconnects, 10) and eventually(lambda: not conn.is_connected(), 5)
        conn.publish_many([(topic, b"in flight")], qos=1)
        mosquitto.start()
        assert rec.wait(lambda: len(rec.connects) == 2, 10), "did not reconnect after the restart"
        with cond:
            assert cond.wait_for(lambda: got, 15), "the publish made while the broker was down never arrived"
        conn.publish(topic, b"after", qos=1)         # behind any duplicate: once it is in, the count is final
        with cond:
            assert cond.wait_for(lambda: b"after" in got, 10)
            assert got == [b"in flight", b"after"]
    finally:
        watch.loop_stop()
        watch.disconnect()


def test_an_idle_connection_with_a_one_second_keepalive_stays_up(mosquitto, stream):
    rec = Recorder([topic_name()])
    conn = stream(mosquitto.url, rec, keepalive=1)
    assert rec.wait(lambda: rec.subacks, 10)
    # the broker drops a client silent for 1.5 keepalives; the client gives up on a broker silent as long
    assert not rec.wait(lambda: rec.disconnects, 3.0), rec.disconnects
    assert conn.is_connected() and rec.connects == [False]
    assert "exceeded timeout" not in mosquitto.log_path.read_text(errors="replace")


def test_a_connection_that_only_publishes_at_qos0_stays_up(mosquitto, stream):
    rec = Recorder()
    conn = stream(mosquitto.url, rec, keepalive=1)
    assert rec.wait(lambda: rec.connects, 10)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and not rec.disconnects:
        conn.publish("edgeops/t/nobody-listens", b"x", qos=0)
        time.sleep(0.1)                      # pacing the traffic; nothing is waited for here
    assert not rec.disconnects, rec.disconnects


# -- TLS ----------------------------------------------------------------------------------------------------

def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def write_ca(folder, stem: str):
    """A self-signed CA written as ``<stem>.crt``; returns (certificate, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    subject = _name(f"edgeops test {stem}")
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def write_server_cert(folder, ca, ca_key) -> None:
    """``server.crt``/``server.key`` for 127.0.0.1, signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))


@pytest.fixture
def tls_broker(tmp_path):
    """A Mosquitto with only a TLS listener, its server certificate signed by ``ca.crt``; ``other.crt`` is an
    unrelated CA."""
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, ca_key = write_ca(pki, "ca")
    write_ca(pki, "other")
    write_server_cert(pki, ca, ca_key)
    port = free_port()
    config = "\n".join([f"listener {port} 127.0.0.1", "allow_anonymous true", f"cafile {pki}/ca.crt",
                        f"certfile {pki}/server.crt", f"keyfile {pki}/server.key"])
    broker = MosquittoBroker(port=port, persistence=False, listener=False, extra_config=config,
                             workdir=tmp_path / "tls-broker")
    broker.start()
    try:
        yield broker, pki
    finally:
        broker.stop()


def test_a_tls_connection_receives_a_large_message(tls_broker, stream):
    broker, pki = tls_broker
    topic, payload = topic_name(), bytes(range(256)) * 800          # 200 KB: many TLS records per read
    rec = Recorder([topic])
    conn = stream(parse_broker_url(f"mqtts://127.0.0.1:{broker.port}", ca_file=str(pki / "ca.crt")), rec)
    assert rec.wait(lambda: rec.subacks, 10), f"no TLS session: {broker.log_path.read_text()[-500:]}"
    conn.publish_many([(topic, payload), (topic, b"small")], qos=1)   # no-local is off: it comes back
    assert rec.wait(lambda: len(rec.messages) >= 2, 10), rec.payloads()
    assert rec.payloads() == [payload, b"small"]


def test_a_tls_broker_with_a_certificate_from_another_ca_is_never_connected(tls_broker, stream):
    broker, pki = tls_broker
    rec = Recorder()
    conn = stream(parse_broker_url(f"mqtts://127.0.0.1:{broker.port}", ca_file=str(pki / "other.crt")), rec,
                  reconnect=FAST)
    assert not rec.wait(lambda: rec.connects, 2.0)
    assert not conn.is_connected() and not rec.refusals
    assert conn._thread.is_alive(), "the connection's thread died on a failed handshake"


# -- against a fake broker ----------------------------------------------------------------------------------

def _three_messages(v5: bool) -> list[bytes]:
    return [publish_packet("a/b", b"first", mid=1, v5=v5),
            publish_packet("a/bb", b"", v5=v5),                                   # QoS 0, empty payload
            publish_packet("x" * 200, bytes(range(256)) * 2, mid=2, v5=v5,       # two-byte remaining length
                           props=b"\x01\x00\x02\x00\x00\x00\x3c\x26\x00\x01k\x00\x01v")]   # format, expiry, user


def _expected_three() -> list[tuple]:
    return [("a/b", b"first", 1, 1), ("a/bb", b"", 0, 0), ("x" * 200, bytes(range(256)) * 2, 2, 1)]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_packets_sent_one_byte_at_a_time_are_all_delivered(protocol, fake_broker, stream):
    wire = CONNACK_OK[protocol] + b"".join(_three_messages(protocol == "5"))
    broker = fake_broker(lambda i, connect: [wire[k:k + 1] for k in range(len(wire))], gap=0.0005)
    rec = Recorder(ack=False)
    stream(broker.url(PROTOCOLS[protocol]), rec)
    assert rec.wait(lambda: len(rec.messages) >= 3, 10), rec.messages
    assert rec.messages == _expected_three()
    assert rec.connects == [False] and not rec.disconnects


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_many_packets_in_one_send_are_all_delivered_in_order(protocol, fake_broker, stream):
    v5 = protocol == "5"
    many = [publish_packet(f"t/{i}", str(i).encode(), mid=i + 1, v5=v5) for i in range(500)]
    broker = fake_broker(lambda i, connect: [CONNACK_OK[protocol] + b"".join(many)])
    rec = Recorder()
    stream(broker.url(PROTOCOLS[protocol]), rec)
    assert rec.wait(lambda: len(rec.messages) >= 500, 10), len(rec.messages)
    assert rec.messages == [(f"t/{i}", str(i).encode(), i + 1, 1) for i in range(500)]
    # every PUBACK reached the broker, in one or a few writes
    assert eventually(lambda: bytes(broker.received[0]).count(b"\x40\x02") == 500, 5)


def test_an_oversized_publish_split_at_awkward_places_keeps_the_stream_in_sync(fake_broker, stream):
    big = bytes(range(256)) * 400
    big_packet = publish_packet("big", big, mid=1)
    wire = CONNACK_OK["5"] + big_packet + publish_packet("next", b"intact", mid=2) + publish_packet("q0", b"too")
    start = len(CONNACK_OK["5"])
    cuts = sorted({start + 1, start + 3, start + 500, start + 60_000, start + HEAD_LIMIT + 3, start + 90_000,
                   start + len(big_packet) - 1, start + len(big_packet) + 4, len(wire) - 2})
    chunks = [wire[a:b] for a, b in pairwise([0, *cuts, len(wire)])]
    broker = fake_broker(lambda i, connect: chunks, gap=0.01)
    rec = Recorder()
    stream(broker.url(), rec, max_packet=4096)
    assert rec.wait(lambda: len(rec.messages) >= 3, 10), [(t, len(p)) for t, p, _, _ in rec.messages]
    (t, cut, mid, qos), *rest = rec.messages
    assert (t, mid, qos) == ("big", 1, 1) and isinstance(cut, CutPayload)
    assert cut.packet_size == len(big_packet) - 4 and bytes(cut) == big[:len(cut)] and len(cut) <= HEAD_LIMIT
    assert rest == [("next", b"intact", 2, 1), ("q0", b"too", 0, 0)]
    assert not rec.disconnects


GARBAGE = {
    "a five-byte remaining length": b"\x30\xff\xff\xff\xff\x7f",
    "packet type 0xF0": b"\xf0\x00",
    "a topic longer than its packet": b"\x30\x04\x00\x10ab",
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
def test_a_malformed_stream_is_dropped_and_the_connection_reopened(garbage, protocol, fake_broker, stream):
    v5 = protocol == "5"
    legit = publish_packet("ok", b"legit", mid=1, v5=v5)

    def script(index: int, connect: bytes) -> list:
        if index == 0:       # one message, its PUBACK, then garbage followed by a message that must not surface
            return [CONNACK_OK[protocol], legit, Expect(puback(1)), garbage + publish_packet("no", b"x", v5=v5)]
        return [CONNACK_OK[protocol]]

    broker = fake_broker(script)
    rec = Recorder()
    conn = stream(broker.url(PROTOCOLS[protocol]), rec, reconnect=FAST)
    assert broker.wait_connects(2, 5), "the client did not connect again after the malformed stream"
    assert rec.wait(lambda: len(rec.connects) == 2, 5)
    assert rec.messages == [("ok", b"legit", 1, 1)]
    assert len(rec.disconnects) == 1 and rec.disconnects[0].startswith("protocol error"), rec.disconnects
    assert conn.is_connected()


@pytest.mark.parametrize(("protocol", "refusal", "reason"), [
    ("3.1.1", b"\x20\x02\x00\x05", "not authorized"),
    ("5", b"\x20\x03\x00\x87\x00", "0x87"),
])
def test_a_refused_connection_is_reported_and_retried_with_backoff(protocol, refusal, reason, fake_broker, stream):
    broker = fake_broker(lambda i, connect: [refusal])
    rec = Recorder()
    conn = stream(broker.url(PROTOCOLS[protocol]), rec, reconnect=FAST)
    assert broker.wait_connects(4, 5), f"{len(broker.connects)} attempts"
    assert rec.wait(lambda: len(rec.refusals) >= 3, 5)
    assert all(reason in r for r in rec.refusals), rec.refusals
    assert not rec.connects and not rec.disconnects and not conn.is_connected()
    times = [t for t, _ in broker.connects[:4]]
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps[0] >= 0.08 and min(gaps[1:]) >= 0.18, f"retried without backing off: {gaps}"


@pytest.mark.parametrize(("url_protocol", "level", "userinfo", "session_expiry"), [
    ("5", 5, "", 3600),
    ("3.1.1", 4, "", 3600),
    ("5", 5, "mon:s3cret@", 0),
    ("3.1.1", 4, "mon:s3cret@", 600),
])
def test_the_connect_packet_carries_level_session_and_credentials(url_protocol, level, userinfo, session_expiry,
                                                                   fake_broker, stream):
    broker = fake_broker(lambda i, connect: [CONNACK_OK[url_protocol]])
    rec = Recorder()
    stream(broker.url(PROTOCOLS[url_protocol], userinfo), rec, client_id="mon-7", session_expiry=session_expiry,
           keepalive=17)
    assert rec.wait(lambda: rec.connects, 5)
    c = parse_connect(broker.connects[0][1])
    assert (c["name"], c["level"], c["keepalive"], c["client_id"]) == (b"MQTT", level, 17, b"mon-7")
    assert c["flags"] & 0x02 == (0 if session_expiry else 0x02), f"clean start flag: {c['flags']:#04x}"
    if userinfo:
        assert c["flags"] & 0xC0 == 0xC0 and c["credentials"] == [b"mon", b"s3cret"]
    else:
        assert c["flags"] & 0xC0 == 0 and c["credentials"] == []
    if level == 5:
        assert b"\x11" + struct.pack("!I", session_expiry) in c["props"], c["props"]


def test_a_broker_that_falls_silent_is_given_up_after_one_and_a_half_keepalives(fake_broker, stream):
    broker = fake_broker(lambda i, connect: [CONNACK_OK["5"]])        # then never a byte: not even PINGRESP
    rec = Recorder()
    stream(broker.url(), rec, keepalive=1, reconnect=FAST)
    assert broker.wait_connects(2, 6), "the client kept a silent connection"
    gap = broker.connects[1][0] - broker.connects[0][0]
    assert 1.4 <= gap <= 3.5, f"gave up after {gap:.2f} s with keepalive 1"
    assert rec.disconnects and "said nothing" in rec.disconnects[0], rec.disconnects
    assert bytes(broker.received[0]).count(b"\xc0\x00") >= 1, "no PINGREQ before giving up"


def test_keepalive_zero_neither_pings_nor_drops_a_quiet_broker(fake_broker, stream):
    broker = fake_broker(lambda i, connect: [CONNACK_OK["5"]])
    rec = Recorder()
    stream(broker.url(), rec, keepalive=0, reconnect=FAST)
    assert rec.wait(lambda: rec.connects, 5)
    assert not broker.wait_connects(2, 2.0), "the client dropped a quiet broker with keepalive 0"
    assert b"\xc0\x00" not in bytes(broker.received[0])


def test_qos1_publishes_wait_for_room_in_the_brokers_receive_maximum():
    """A broker that allows 2 unacknowledged QoS 1 publishes (MQTT 5 Receive Maximum in its CONNACK) gets
    no third until it acknowledges one (Mosquitto disconnects a client that sends more); the rest wait and
    go out in order as PUBACKs come back."""
    gate = threading.Event()
    # CONNACK: no session, success, properties: Receive Maximum 2
    steps = [b"\x20\x06\x00\x00\x03\x21\x00\x02", Expect(b"m/01"), Expect(b"m/02"), lambda: gate.wait(10)]
    for k in range(1, 11, 2):       # acknowledge two, then wait for the next two
        steps += [puback(k) + puback(k + 1)] + ([Expect(f"m/{k + 3:02d}".encode())] if k + 3 <= 10 else [])
    broker = FakeBroker(lambda i, connect: steps)
    rec = Recorder()
    conn = StreamConnection(parse_broker_url(broker.url()), "rm-test", **rec.callbacks())
    try:
        conn.start()
        assert rec.wait(lambda: rec.connects, 10)
        conn.publish_many([(f"m/{k:02d}", b"x") for k in range(1, 11)], qos=1)
        assert eventually(lambda: bytes(broker.received[0]).count(b"m/") == 2, 5)
        time.sleep(0.5)         # room for a third that must not come
        assert bytes(broker.received[0]).count(b"m/") == 2, "more QoS 1 publishes than the Receive Maximum"
        gate.set()
        assert eventually(lambda: bytes(broker.received[0]).count(b"m/") == 10, 10), bytes(broker.received[0])
        sent = bytes(broker.received[0])
        assert [sent.index(f"m/{k:02d}".encode()) for k in range(1, 11)] == sorted(
            sent.index(f"m/{k:02d}".encode()) for k in range(1, 11))
        assert eventually(lambda: not conn._inflight and not conn._waiting, 5)
        assert not rec.disconnects
    finally:
        conn.stop()
        broker.close()
    assert not broker.errors, broker.errors


@pytest.mark.parametrize(("body", "expected"), [
    (b"\x00\x00\x00", 65_535),                                          # no properties
    (b"\x00\x00\x03\x21\x00\x14", 20),                                  # Receive Maximum 20 (Mosquitto's default)
    (b"\x00\x00\x0e\x24\x01\x27\x00\x01\x00\x00\x12\x00\x01a\x21\x01\x00", 256),  # after a byte, a u32, a string
    (b"\x00\x00\x0d\x26\x00\x01k\x00\x01v\x0b\x81\x01\x21\x00\x05", 5),   # after a user property, a varint
    (b"\x00\x00\x03\x21\x00\x00", 1),                                   # 0 is a protocol error: at least 1
    (b"\x00\x00\x02\x21\x00", 65_535),                                   # cut short: the default
    (b"\x00\x00\x02\x7f\x00", 65_535),                                   # an unknown property: the default
])
def test_the_receive_maximum_is_read_from_any_connack(body, expected):
    assert connack_receive_maximum(body) == expected
