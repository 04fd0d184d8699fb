"""Devices cannot pose as each other: identity comes from the credential (deploy/mosquitto, `devices provision`).

Every test runs Mosquitto on the shipped configuration, with identities made by the project's own
provisioning: TLS listeners for password devices, certificate devices and the central services.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from devices import provision
from edge_runtime.errors import InvalidInputError
from helpers import eventually
from helpers.deploy_broker import (
    NOT_AUTHORIZED,
    REFUSED_AT_CONNECT,
    SERVICES,
    DeployedBroker,
    Identity,
    Session,
)

MONITOR = Identity("monitor", SERVICES["monitor"])
FLASHER = Identity("flasher", SERVICES["flasher"])


@pytest.fixture
def broker(tmp_path):
    with DeployedBroker(tmp_path) as b:
        yield b


def test_a_device_that_claims_another_devices_client_id_does_not_take_over_its_session(broker):
    dev_a, dev_b = broker.provision("fleet-a", "dev-a"), broker.provision("fleet-a", "dev-b")
    # B connects the way its agent does (client id edgeops-<fleet>-<device>) and keeps a session.
    b = Session(broker, dev_b, client_id="edgeops-fleet-a-dev-b", clean_start=False, session_expiry=3600)
    b.subscribe("edgeops/fleet-a/dev-b/cmd")
    a = None
    try:
        assert b.connack == 0
        # A, with its own credentials, claims B's client id and asks to resume B's session.
        a = Session(broker, dev_a, client_id="edgeops-fleet-a-dev-b", clean_start=False, session_expiry=3600)
        assert a.connack == 0
        # The broker's CONNACK to A comes after any takeover; B still answers, and was never disconnected.
        acked = b.publish("edgeops/fleet-a/dev-b/telemetry")
        assert acked is not None and acked < 0x80, f"B lost its connection (DISCONNECT {b.disconnects})"
        assert b.disconnects == [] and b.connected.is_set()
        # B's session (its subscription) is B's: a command for B reaches B, and A gets nothing.
        flasher = Session(broker, FLASHER, client_id="edgeops-flasher-t", listener="services")
        try:
            assert flasher.publish("edgeops/fleet-a/dev-b/cmd", b"for-b") < 0x80
        finally:
            flasher.close()
        assert eventually(lambda: ("edgeops/fleet-a/dev-b/cmd", b"for-b") in b.messages, 10)
        assert a.messages == []
    finally:
        b.close()
        if a:
            a.close()


def test_a_device_cannot_publish_into_another_fleet_or_as_another_device(broker):
    dev_a = broker.provision("fleet-a", "dev-a")
    broker.provision("other-fleet", "dev-a")        # the same device id in another fleet is another device
    a = Session(broker, dev_a)
    try:
        assert a.connack == 0
        assert a.publish("edgeops/fleet-a/dev-a/telemetry") < 0x80
        assert a.publish("edgeops/other-fleet/dev-a/telemetry") == NOT_AUTHORIZED
        assert a.publish("edgeops/other-fleet/dev-a/status") == NOT_AUTHORIZED
        assert a.publish("edgeops/fleet-a/dev-b/telemetry") == NOT_AUTHORIZED
        assert a.publish("edgeops/fleet-a/alerts") == NOT_AUTHORIZED
        assert a.publish("edgeops/fleet-a/dev-a/ack") == NOT_AUTHORIZED   # only the monitor confirms windows
        assert a.publish("edgeops/fleet-a/dev-a/cmd") == NOT_AUTHORIZED   # only the flasher commands
    finally:
        a.close()


def test_a_device_reads_its_own_commands_and_acks_and_nothing_else(broker):
    dev_a = broker.provision("fleet-a", "dev-a")
    broker.provision("fleet-a", "dev-b")
    a = Session(broker, dev_a)
    monitor = Session(broker, MONITOR, listener="services")
    flasher = Session(broker, FLASHER, listener="services")
    try:
        a.subscribe("edgeops/#")
        # Sent first: what A must not see. The last one is A's, so once it is in, the others had their turn.
        for s, t in [(flasher, "edgeops/fleet-a/dev-b/cmd"), (monitor, "edgeops/fleet-a/dev-b/ack"),
                     (flasher, "edgeops/other-fleet/dev-a/cmd"), (monitor, "edgeops/fleet-a/alerts"),
                     (monitor, "edgeops/fleet-a/dev-a/ack"), (flasher, "edgeops/fleet-a/dev-a/cmd/chunk"),
                     (flasher, "edgeops/fleet-a/dev-a/cmd")]:
            assert s.publish(t) < 0x80, t
        assert eventually(lambda: len(a.messages) >= 3, 10)
        assert sorted(t for t, _ in a.messages) == ["edgeops/fleet-a/dev-a/ack", "edgeops/fleet-a/dev-a/cmd",
                                                    "edgeops/fleet-a/dev-a/cmd/chunk"]
    finally:
        for s in (a, monitor, flasher):
            s.close()


def _connack(broker, who: Identity, listener: str = "devices") -> int | str | None:
    s = Session(broker, who, listener=listener)
    s.close()
    return s.refused_handshake or s.connack


def test_a_revoked_device_is_refused_once_the_broker_reloads(broker):
    dev_a = broker.provision("fleet-a", "dev-a")
    connected = Session(broker, dev_a)
    try:
        assert connected.connack == 0
        done = broker.revoke("fleet-a", "dev-a")
        assert done["password_removed"] and done["acl_removed"]
        broker.reload()
        # SIGHUP: Mosquitto reads the password file again and drops the connection of a credential it lost.
        assert eventually(lambda: connected.disconnects, 10)
        assert eventually(lambda: _connack(broker, dev_a) in REFUSED_AT_CONNECT, 10)
    finally:
        connected.close()
    with pytest.raises(InvalidInputError, match="nothing to revoke"):
        broker.revoke("fleet-a", "dev-a")


def test_a_device_with_a_certificate_is_its_certificate_and_a_revoked_certificate_is_refused(broker):
    dev_c = broker.provision("fleet-a", "dev-c", cert=True)
    dev_b = broker.provision("fleet-a", "dev-b")
    b = Session(broker, dev_b, client_id="edgeops-fleet-a-dev-b")
    c = Session(broker, dev_c, client_id="edgeops-fleet-a-dev-b", listener="certificates")
    try:
        assert c.connack == 0
        acked = b.publish("edgeops/fleet-a/dev-b/telemetry")
        assert acked is not None and acked < 0x80, f"B lost its connection (DISCONNECT {b.disconnects})"
        assert c.publish("edgeops/fleet-a/dev-c/telemetry") < 0x80
        assert c.publish("edgeops/fleet-a/dev-b/telemetry") == NOT_AUTHORIZED
        assert c.publish("edgeops/other-fleet/dev-c/telemetry") == NOT_AUTHORIZED
        done = broker.revoke("fleet-a", "dev-c")
        assert len(done["revoked_serials"]) == 1 and done["acl_removed"]
        broker.reload()
        # Still connected (the TLS session stands), but without its ACL block it may publish nothing...
        assert c.publish("edgeops/fleet-a/dev-c/telemetry") == NOT_AUTHORIZED
    finally:
        b.close()
        c.close()
    # ... and a new connection fails verification against the CRL: the broker drops it before any CONNACK
    # (under TLS 1.3 the client's handshake ends before the server has checked the client's certificate).
    again = Session(broker, dev_c, listener="certificates")
    again.close()
    assert again.connack is None and (again.refused_handshake or again.disconnects)
    assert "certificate verify failed" in broker.log()


def test_a_password_hashed_by_the_project_is_the_one_mosquitto_passwd_would_write():
    # mosquitto_passwd 2.x wrote this line for password "secret"; the same salt gives the same hash.
    line = ("fleet-a/dev-1:$7$101$PHiDehzkA2p/r5ut$"
            "oTpztJkYqx2iZeeFZnRgkrTe96azhngcy5aDJVRchn2yulLZ8Jzd6W8gOQlBms5NSsAAE9H9+cV/F5JC3GdA5w==")
    assert provision.hash_password("secret", base64.b64decode("PHiDehzkA2p/r5ut")) == line.split(":", 1)[1]


def test_provisioning_refuses_ids_that_would_escape_a_topic_level(tmp_path):
    for fleet, device in [("fleet/a", "dev"), ("fleet-a", "+"), ("fleet-a", "#"), ("", "dev"), ("fleet-a", "x" * 65)]:
        with pytest.raises(InvalidInputError):
            provision.provision(fleet, device, tmp_path / "out",
                                provision.BrokerFiles(tmp_path / "passwd", tmp_path / "acl", tmp_path))
    assert not (tmp_path / "passwd").exists() and not (tmp_path / "acl").exists()


@pytest.mark.slow
def test_a_provisioned_devices_agent_runs_from_its_folder_and_the_monitor_reads_its_telemetry(
        broker, bc_mlp_bundle, reference_data, tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgeops", "devices", "provision", "--fleet", "fleet-a", "--device",
                          "dev-a", "--out", str(tmp_path / "dev-a"), "--password-file", str(broker.etc / "passwd"),
                          "--acl", str(broker.etc / "acl"), "--ca-dir", str(broker.etc), "--broker",
                          broker.url("devices"), "--json"], check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert made["username"] == "fleet-a/dev-a" and "run-agent.sh" in made["files"] and "ca.crt" in made["files"]
    broker.reload()
    monitor = Session(broker, MONITOR, listener="services")
    monitor.subscribe("edgeops/fleet-a/dev-a/telemetry")
    np.save(tmp_path / "x.npy", reference_data["breast_cancer"].X_train)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    agent = subprocess.Popen(["sh", made["files"]["run-agent.sh"], str(bc_mlp_bundle),
                              "--input", str(tmp_path / "x.npy"), "--loop", "--rate", "200", "--window-size", "50",
                              "--state-dir", str(tmp_path / "s"),
                              "--duration", "60", "--confirm", "broker"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        assert eventually(lambda: monitor.messages or agent.poll() is not None, 45)
        assert monitor.messages, agent.communicate(timeout=10)[0]
        window = json.loads(monitor.messages[0][1])
        assert window["device_id"] == "dev-a" and window["fleet"] == "fleet-a"
    finally:
        monitor.close()
        agent.terminate()
        try:
            agent.communicate(timeout=30)
        except subprocess.TimeoutExpired:      # what this test checks happened above; the process must go
            agent.kill()
            agent.communicate(timeout=10)


def _edgeops(*args):
    return subprocess.run([sys.executable, "-m", "edgeops", *args],
                          check=False, capture_output=True, text=True, timeout=60)


@pytest.mark.slow
def test_the_cli_provisions_and_revokes_a_certificate_device_and_says_why_it_refuses(tmp_path):
    files = ["--password-file", str(tmp_path / "etc" / "passwd"), "--acl", str(tmp_path / "etc" / "acl"),
             "--ca-dir", str(tmp_path / "etc"), "--json"]
    made = _edgeops("devices", "provision", "--fleet", "lab", "--device", "pi-8", "--cert", "--out",
                    str(tmp_path / "pi-8"), *files)
    assert made.returncode == 0, made.stderr
    serial = json.loads(made.stdout)["cert_serial"]
    assert {"device.crt", "device.key", "ca.crt", "run-agent.sh"} <= set(json.loads(made.stdout)["files"])
    revoked = _edgeops("devices", "revoke", "--fleet", "lab", "--device", "pi-8", *files)
    assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_serials"] == [serial]
    again = _edgeops("devices", "revoke", "--fleet", "lab", "--device", "pi-8", *files)
    assert again.returncode == 3 and "lab/pi-8: nothing to revoke" in again.stderr
    bad = _edgeops("devices", "provision", "--fleet", "lab", "--device", "pi/8", *files)
    assert bad.returncode == 3 and "device id 'pi/8'" in bad.stderr
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "ca.crt").write_bytes((tmp_path / "etc" / "ca.crt").read_bytes())
    no_key = _edgeops("devices", "provision", "--fleet", "lab", "--device", "pi-9", "--cert", "--ca-dir",
                      str(tmp_path / "other"), "--out", str(tmp_path / "pi-9"), *files[:4])
    assert no_key.returncode == 3 and "needs both ca.crt and ca.key" in no_key.stderr


def test_provisioning_a_device_again_rotates_its_password(broker):
    old = broker.provision("fleet-a", "dev-a")
    connected = Session(broker, old)
    try:
        assert connected.connack == 0
        new = broker.provision("fleet-a", "dev-a")          # a new password; the broker reloads
        assert new.password != old.password
        # At the reload the broker checks connected clients again: the old password is no longer valid.
        assert eventually(lambda: connected.disconnects, 10)
    finally:
        connected.close()
    assert _connack(broker, old) in REFUSED_AT_CONNECT
    assert _connack(broker, new) == 0
