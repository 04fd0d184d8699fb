"""The production broker configuration in deploy/mosquitto: TLS, passwords, per-device ACL."""

from __future__ import annotations

import datetime as dt
import ipaddress
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devices.broker import MosquittoBroker, free_port

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "mosquitto"
PASSWORDS = {"dev-1": "pw-dev-1", "dev-2": "pw-dev-2", "monitor": "pw-monitor", "flasher": "pw-flasher"}


def _write_key(key, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_pki(d: Path) -> None:
    """A throwaway CA and a server certificate for 127.0.0.1."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgeops test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, d / "server.key")


@pytest.fixture
def secure_broker(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    make_pki(etc)
    passwd = etc / "passwd"
    passwd.touch()
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    (etc / "acl").write_text((DEPLOY / "acl").read_text())
    port = free_port()
    lines = []
    for line in (DEPLOY / "mosquitto.conf").read_text().splitlines():
        if line.startswith(("log_dest", "log_type", "persistence", "autosave_interval")):
            continue  # the test broker logs to its own file and keeps nothing
        lines.append(line.replace("/etc/mosquitto/edgeops/", f"{etc}/").replace("listener 8883", f"listener {port} 127.0.0.1"))
    broker = MosquittoBroker(port=port, persistence=False, default_queue_limits=True, listener=False,
                             extra_config="\n".join(lines), workdir=tmp_path / "broker")
    broker.ca = etc / "ca.crt"
    with broker:
        yield broker


class Session:
    """A connected MQTT v5 TLS client that records CONNACK and PUBACK reason codes."""

    def __init__(self, broker, user: str, password: str):
        self.connected = threading.Event()
        self.acked: dict[int, int] = {}
        self.acked_event = threading.Condition()
        self.connack = None
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"t-{user}", protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, password)
        self.client.tls_set(ca_certs=str(broker.ca))
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.connected.wait(10)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code.value
        self.connected.set()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self.acked_event:
            self.acked[mid] = reason_code.value
            self.acked_event.notify_all()

    def publish(self, topic: str) -> int:
        info = self.client.publish(topic, b"{}", qos=1)
        with self.acked_event:
            self.acked_event.wait_for(lambda: info.mid in self.acked, timeout=10)
        return self.acked[info.mid]

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def test_a_device_publishes_as_itself_but_not_as_another_device(secure_broker):
    dev1 = Session(secure_broker, "dev-1", PASSWORDS["dev-1"])
    try:
        assert dev1.connack == 0
        # 0x10 "no matching subscribers" is a success code too: anything below 0x80 is accepted.
        assert dev1.publish("edgeops/fleet-a/dev-1/telemetry") < 0x80
        # Under MQTT v5 the broker says no with PUBACK 0x87 (not authorised).
        assert dev1.publish("edgeops/fleet-a/dev-2/telemetry") == 0x87
        assert dev1.publish("edgeops/fleet-a/alerts") == 0x87
        assert dev1.publish("edgeops/fleet-a/dev-2/cmd") == 0x87
    finally:
        dev1.close()


def test_a_wrong_password_is_refused(secure_broker):
    intruder = Session(secure_broker, "dev-1", "guess")
    try:
        assert intruder.connack in (0x86, 0x87)  # bad user name or password / not authorised
    finally:
        intruder.close()


def test_a_device_reads_only_its_own_commands(secure_broker):
    dev1 = Session(secure_broker, "dev-1", PASSWORDS["dev-1"])
    flasher = Session(secure_broker, "flasher", PASSWORDS["flasher"])
    try:
        got = threading.Event()
        dev1.client.on_subscribe = lambda *a: got.set()
        dev1.client.subscribe("edgeops/fleet-a/+/cmd", qos=1)
        got.wait(5)
        assert flasher.publish("edgeops/fleet-a/dev-1/cmd") < 0x80
        assert flasher.publish("edgeops/fleet-a/dev-2/cmd") < 0x80
        deadline = threading.Event()
        deadline.wait(1.0)
        topics = [t for t, _ in dev1.messages]
        assert topics == ["edgeops/fleet-a/dev-1/cmd"]
    finally:
        dev1.close()
        flasher.close()


@pytest.mark.slow
def test_flashing_works_through_the_secure_broker_with_each_identity(secure_broker, bc_mlp_bundle, reference_data,
                                                                     tmp_path):
    import json
    import shutil
    import sys

    import numpy as np

    from edge_runtime.bundle import write_manifest

    v2 = tmp_path / "v2"
    shutil.copytree(bc_mlp_bundle, v2)
    doc = json.loads((v2 / "manifest.json").read_text())
    doc["version"] = "1.1.0"
    write_manifest(v2, doc)
    np.save(tmp_path / "x.npy", reference_data["breast_cancer"].X_train)
    url = f"mqtts://127.0.0.1:{secure_broker.port}"
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "dev-1",
                              "--fleet", "fleet-a", "--broker", url, "--username", "dev-1", "--password",
                              PASSWORDS["dev-1"], "--ca", str(secure_broker.ca), "--input", str(tmp_path / "x.npy"),
                              "--loop", "--rate", "200", "--window-size", "50", "--state-dir", str(tmp_path / "s"),
                              "--duration", "60", "--allow-unsigned"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        base = [sys.executable, "-m", "edgeops", "flash", str(v2), "--device", "dev-1", "--fleet", "fleet-a",
                "--broker", url, "--ca", str(secure_broker.ca), "--json", "--timeout", "60"]
        threading.Event().wait(3)
        wrong = subprocess.run(base + ["--username", "dev-2", "--password", PASSWORDS["dev-2"], "--timeout", "5"],
                               capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "refused the command" in wrong.stderr   # another device may not command dev-1
        res = subprocess.run(base + ["--username", "flasher", "--password", PASSWORDS["flasher"]],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["ok"] and out["version"] == "1.1.0" and out["device_id"] == "dev-1"
    finally:
        agent.terminate()
        log, _ = agent.communicate(timeout=30)
    assert "now running breast-cancer-mlp 1.1.0" in log
