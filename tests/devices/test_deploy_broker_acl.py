"""The production broker configuration in deploy/mosquitto: TLS, per-listener passwords, per-device ACL.

How devices are kept from posing as each other (client ids, fleets, revocation) is in
test_device_identity.py; this file covers the configuration's baseline and flashing through it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from devices import provision
from edge_runtime.bundle import write_manifest
from helpers import eventually, stop_agent
from helpers.deploy_broker import (
    NOT_AUTHORIZED,
    REFUSED_AT_CONNECT,
    SERVICES,
    DeployedBroker,
    Identity,
    Session,
)


@pytest.fixture
def secure_broker(tmp_path):
    with DeployedBroker(tmp_path) as broker:
        yield broker


def test_a_device_publishes_as_itself_but_not_as_another_device(secure_broker):
    dev1 = Session(secure_broker, secure_broker.provision("fleet-a", "dev-1"))
    try:
        assert dev1.connack == 0
        # 0x10 "no matching subscribers" is a success code too: anything below 0x80 is accepted.
        assert dev1.publish("edgeops/fleet-a/dev-1/telemetry") < 0x80
        # Under MQTT v5 the broker says no with PUBACK 0x87 (not authorised).
        assert dev1.publish("edgeops/fleet-a/dev-2/telemetry") == NOT_AUTHORIZED
        assert dev1.publish("edgeops/fleet-a/alerts") == NOT_AUTHORIZED
        assert dev1.publish("edgeops/fleet-a/dev-2/cmd") == NOT_AUTHORIZED
    finally:
        dev1.close()


def test_a_wrong_password_or_no_credential_is_refused(secure_broker):
    secure_broker.provision("fleet-a", "dev-1")
    for who in (Identity("fleet-a/dev-1", "guess"), Identity("monitor", SERVICES["monitor"]), Identity("nobody")):
        s = Session(secure_broker, who)      # the services' passwords are not valid on the devices' listener
        s.close()
        assert s.connack in REFUSED_AT_CONNECT, who.username


def test_a_device_credential_is_not_valid_on_the_services_listener(secure_broker):
    # There client ids are free (monitor workers share one username), so a device must not get in.
    dev1 = secure_broker.provision("fleet-a", "dev-1")
    s = Session(secure_broker, dev1, client_id="edgeops-monitor-all", listener="services")
    s.close()
    assert s.connack in REFUSED_AT_CONNECT


def test_a_username_the_acl_does_not_name_may_do_nothing(secure_broker):
    # A credential of the earlier scheme (username = the bare device id) once matched `pattern write
    # edgeops/+/%u/...`, which let it publish into any fleet. No device pattern is left.
    provision.set_password(secure_broker.etc / "passwd", "dev-1", "pw-dev-1")
    secure_broker.reload()
    old = Session(secure_broker, Identity("dev-1", "pw-dev-1"))
    try:
        assert old.connack == 0
        for fleet in ("fleet-a", "other-fleet"):
            assert old.publish(f"edgeops/{fleet}/dev-1/telemetry") == NOT_AUTHORIZED
            assert old.publish(f"edgeops/{fleet}/dev-1/status") == NOT_AUTHORIZED
    finally:
        old.close()


def test_several_service_clients_of_one_username_keep_their_own_client_ids(secure_broker):
    # Monitor workers and concurrent flasher commands share a username: on their listener the broker
    # does not replace their client ids, so none disconnects another.
    workers = [Session(secure_broker, Identity("monitor", SERVICES["monitor"]), client_id=f"edgeops-monitor-all-{i}",
                       listener="services") for i in range(2)]
    try:
        assert [w.connack for w in workers] == [0, 0]
        assert all(w.publish("edgeops/fleet-a/alerts") < 0x80 for w in workers)
        assert not any(w.disconnects for w in workers)
    finally:
        for w in workers:
            w.close()


@pytest.mark.slow
def test_flashing_works_through_the_secure_broker_with_each_identity(secure_broker, bc_mlp_bundle, reference_data,
                                                                     tmp_path):
    v2 = tmp_path / "v2"
    shutil.copytree(bc_mlp_bundle, v2)
    doc = json.loads((v2 / "manifest.json").read_text())
    doc["version"] = "1.1.0"
    write_manifest(v2, doc)
    np.save(tmp_path / "x.npy", reference_data["breast_cancer"].X_train)
    dev1, dev2 = secure_broker.provision("fleet-a", "dev-1"), secure_broker.provision("fleet-a", "dev-2")
    status = Session(secure_broker, Identity("flasher", SERVICES["flasher"]), listener="services")
    status.subscribe("edgeops/fleet-a/dev-1/status")
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "dev-1",
                              "--fleet", "fleet-a", "--broker", secure_broker.url(), "--username", dev1.username,
                              "--password", dev1.password, "--ca", str(secure_broker.ca), "--input",
                              str(tmp_path / "x.npy"), "--loop", "--rate", "200", "--window-size", "50", "--state-dir",
                              str(tmp_path / "s"), "--duration", "60", "--allow-unsigned"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        # the agent subscribes to its cmd topic right after it publishes its retained status
        assert eventually(lambda: any(json.loads(p).get("online") for _, p in status.messages), 30), \
            "dev-1 never came online"
        base = [sys.executable, "-m", "edgeops", "flash", str(v2), "--device", "dev-1", "--fleet", "fleet-a",
                "--ca", str(secure_broker.ca), "--json", "--timeout", "60"]
        wrong = subprocess.run(base + ["--broker", secure_broker.url(), "--username", dev2.username, "--password",
                                       dev2.password, "--timeout", "5"],
                               check=False, capture_output=True, text=True, timeout=60)
        assert wrong.returncode == 1 and "refused the command" in wrong.stderr   # another device may not command dev-1
        res = subprocess.run(base + ["--broker", secure_broker.url("services"), "--username", "flasher", "--password",
                                     SERVICES["flasher"]], check=False, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        out = json.loads(res.stdout)
        assert out["ok"] and out["version"] == "1.1.0" and out["device_id"] == "dev-1"
    finally:
        status.close()
        log = stop_agent(agent)
    assert "now running breast-cancer-mlp 1.1.0" in log
