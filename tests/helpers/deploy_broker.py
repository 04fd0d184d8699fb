"""Mosquitto running deploy/mosquitto's configuration, for tests: TLS, per-listener identities and the ACL.

The configuration file is the shipped one with two changes: paths under ``/etc/mosquitto/edgeops/``
point to a temporary folder, and the three listeners (password devices, certificate devices,
services) move to free loopback ports. Device identities are made by ``devices.provision`` itself.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from devices import fleet_ca, provision
from devtools.brokers import MosquittoBroker, free_port
from helpers import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
SERVICES = {"monitor": "pw-monitor", "flasher": "pw-flasher"}
LISTENERS = {"8883": "devices", "8884": "certificates", "8885": "services"}
NOT_AUTHORIZED = 0x87                     # a refused PUBLISH under MQTT v5
REFUSED_AT_CONNECT = (0x86, 0x87)        # CONNACK: bad user name or password / not authorised


def make_pki(d: Path) -> None:
    """A throwaway fleet CA (``ca.crt``/``ca.key``, the one ``devices provision --cert`` signs with) and a
    server certificate for 127.0.0.1."""
    ca, ca_key = fleet_ca.load_or_create(d)
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


@dataclass
class Identity:
    """What a provisioned device (or a service) connects with."""

    username: str
    password: str | None = None
    cert: Path | None = None
    key: Path | None = None
    out: Path | None = None


class DeployedBroker:
    """The shipped broker configuration on free ports, with the services' passwords set.

    Use as a context manager. ``provision`` runs the project's provisioning on this broker's files and
    reloads the broker; ``revoke`` leaves the reload to the test.
    """

    def __init__(self, tmp_path: Path):
        self.etc = tmp_path / "etc"
        self.etc.mkdir()
        make_pki(self.etc)
        self.ca = self.etc / "ca.crt"
        for user, password in SERVICES.items():
            provision.set_password(self.etc / "passwd-services", user, password)
        (self.etc / "passwd").touch()
        (self.etc / "acl").write_text((DEPLOY / "acl").read_text())
        self.ports = {name: free_port() for name in LISTENERS.values()}
        lines = []
        for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
            if line.startswith(("log_dest", "log_type", "persistence", "autosave_interval")):
                continue  # the test broker logs to its own file and keeps nothing
            if line.startswith("listener "):
                line = f"listener {self.ports[LISTENERS[line.split()[1]]]} 127.0.0.1"
            lines.append(line.replace("/etc/mosquitto/edgeops/", f"{self.etc}/"))
        self.broker = MosquittoBroker(port=self.ports["devices"], persistence=False, default_queue_limits=True,
                                      listener=False, extra_config="\n".join(lines), workdir=tmp_path / "broker")
        self.devices_dir = tmp_path / "devices"

    @property
    def port(self) -> int:
        return self.ports["devices"]

    def url(self, listener: str = "devices") -> str:
        return f"mqtts://127.0.0.1:{self.ports[listener]}"

    def provision(self, fleet: str, device: str, cert: bool = False) -> Identity:
        out = self.devices_dir / fleet / device
        files = provision.BrokerFiles(self.etc / "passwd", self.etc / "acl", self.etc)
        made = provision.provision(fleet, device, out, files, cert=cert,
                                   broker=self.url("certificates" if cert else "devices"))
        self.reload()
        if cert:
            return Identity(made.username, cert=out / "device.crt", key=out / "device.key", out=out)
        password = (out / "agent.env").read_text().strip().split("=", 1)[1]
        return Identity(made.username, password=password, out=out)

    def revoke(self, fleet: str, device: str) -> dict:
        return provision.revoke(fleet, device, self.etc / "passwd", self.etc / "acl", self.etc)

    def reload(self) -> None:
        """SIGHUP, as an operator sends after provisioning or revoking: Mosquitto reads its password files, ACL
        and CRL again. Returns once the reload is over: Mosquitto logs "Reloading config" when it starts one and
        answers no socket until it is done, so a CONNACK after that line marks its end. (A SIGHUP that arrives
        during a reload is lost: the broker clears its reload flag when it finishes.)"""
        before = self.log().count("Reloading config")
        self.broker.proc.send_signal(signal.SIGHUP)
        assert eventually(lambda: self.log().count("Reloading config") > before, 10), \
            f"the broker did not reload (exit status {self.broker.proc.poll()}): {self.log()[-800:]}"
        probe = Session(self, Identity("monitor", SERVICES["monitor"]), listener="services")
        probe.close()
        assert probe.connack == 0, f"the monitor was refused after a reload: {probe.connack}"

    def log(self) -> str:
        return self.broker.log_path.read_text(errors="replace")

    def __enter__(self) -> DeployedBroker:
        self.broker.start()
        # Mosquitto listens before it installs its signal handlers, and SIGHUP's default action ends a process:
        # wait for the line it logs once they are in place.
        assert eventually(lambda: " running" in self.log(), 10), f"mosquitto did not start: {self.log()[-800:]}"
        return self

    def __exit__(self, *exc) -> None:
        self.broker.stop()


class Session:
    """A connected MQTT v5 TLS client that records CONNACK, PUBACK and DISCONNECT reason codes.

    The constructor returns once the CONNACK (or a refused TLS handshake) is in.
    """

    def __init__(self, broker: DeployedBroker, who: Identity, client_id: str | None = None,
                 listener: str = "devices", clean_start: bool = True, session_expiry: int = 0):
        self.connected = threading.Event()
        self.done = threading.Event()
        self.cond = threading.Condition()
        self.acked: dict[int, int] = {}
        self.connack: int | None = None
        self.disconnects: list[int] = []
        self.subscribed = threading.Event()
        self.messages: list[tuple[str, bytes]] = []
        self.assigned_client_id: str | None = None
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{who.username}",
                                  protocol=mqtt.MQTTv5)
        if who.password is not None:
            self.client.username_pw_set(who.username, who.password)
        self.client.tls_set(ca_certs=str(broker.ca), certfile=str(who.cert) if who.cert else None,
                            keyfile=str(who.key) if who.key else None)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry
        self.client.reconnect_delay_set(60, 120)   # a session taken over must stay down for the test to see it
        try:
            self.client.connect("127.0.0.1", broker.ports[listener], clean_start=clean_start, properties=props)
        except OSError as exc:              # TLS handshake refused (e.g. a revoked certificate)
            self.refused_handshake = str(exc)
            self.done.set()
            return
        self.refused_handshake = None
        self.client.loop_start()
        self.done.wait(10)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code.value
        self.assigned_client_id = getattr(properties, "AssignedClientIdentifier", None)
        if not reason_code.is_failure:
            self.connected.set()
        self.done.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self.disconnects.append(reason_code.value)
        self.connected.clear()
        self.done.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.cond:
            self.acked[mid] = reason_code.value
            self.cond.notify_all()

    def publish(self, topic: str, payload: bytes = b"{}") -> int | None:
        """PUBACK reason code of a QoS 1 publish (below 0x80: accepted), None without an answer."""
        info = self.client.publish(topic, payload, qos=1)
        with self.cond:
            self.cond.wait_for(lambda: info.mid in self.acked, timeout=10)
        return self.acked.get(info.mid)

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(10), f"no SUBACK for {topic}"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
