"""Flashing running agents over MQTT: success, refusals, crashes at every step, automatic rollback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime import signing
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.slots import FAULT_ENV
from helpers.bundle_variants import variant
from helpers.mqtt_collector import Collector

FLEET = "lab"


@pytest.fixture
def keys(tmp_path):
    return signing.generate_key_pair(tmp_path / "keys")


@pytest.fixture
def stream(tmp_path, reference_data):
    path = tmp_path / "bc.npy"
    np.save(path, reference_data["breast_cancer"].X_train)
    return path


class Agent:
    """An `edgeops run` process with flashing on (no monitor here: the broker's ack empties its spool)."""

    def __init__(self, bundle, device, broker, state, stream, *extra, env=None):
        self.cmd = [sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", device, "--fleet", FLEET,
                    "--broker", broker.url, "--input", str(stream), "--loop", "--rate", "400", "--window-size", "40",
                    "--state-dir", str(state), "--duration", "120", "--confirm", "broker", *extra]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, **(env or {})})

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out


def running_version(col: Collector, device: str) -> str | None:
    with col.lock:
        statuses = [m for t, m in col.messages if t == f"edgeops/{FLEET}/{device}/status" and m.get("online")]
    return statuses[-1]["model"]["version"] if statuses else None


def windows_of(col: Collector, device: str, version: str) -> int:
    return sum(1 for w in col.telemetry(device) if w["model"]["version"] == version)


def flash(broker, bundle, device, *extra):
    res = subprocess.run([sys.executable, "-m", "edgeops", "flash", str(bundle), "--device", device, "--fleet", FLEET,
                          "--broker", broker.url, "--json", "--timeout", "60", *extra],
                         capture_output=True, text=True, timeout=180)
    doc = json.loads(res.stdout) if res.stdout.strip().startswith("{") else None
    return res.returncode, doc, res.stderr


def send_unchecked(broker, bundle, device, tmp_path):
    """Send a bundle the way a broken or hostile sender would: without checking it first."""
    import hashlib

    from devices.rollout import BundleImage, FleetLink
    from edge_runtime.bundle import pack

    data = pack(bundle, tmp_path / f"{bundle.name}.tar.gz").read_bytes()
    image = BundleImage(data, hashlib.sha256(data).hexdigest(), "breast-cancer-mlp", "x")
    with FleetLink(parse_broker_url(broker.url), FLEET) as fl:
        return fl.final_result(fl.start_flash(device, image), 60)


def test_a_signed_flash_switches_a_running_agent_and_rollback_returns(mosquitto, bc_mlp_bundle, keys, stream,
                                                                      tmp_path):
    key, pub = keys
    v1 = variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0", key)
    v2 = variant(bc_mlp_bundle, tmp_path / "v2", "1.1.0", key)
    col = Collector(mosquitto.port, client_id="flash-watch")
    agent = Agent(v1, "pi-1", mosquitto, tmp_path / "pi-1", stream, "--public-key", str(pub))
    try:
        assert col.wait_for(lambda: windows_of(col, "pi-1", "1.0.0") >= 2, 30)
        rc, doc, err = flash(mosquitto, v2, "pi-1", "--public-key", str(pub))
        assert rc == 0, err
        assert doc["ok"] and doc["stage"] == "switched" and doc["version"] == "1.1.0"
        assert col.wait_for(lambda: windows_of(col, "pi-1", "1.1.0") >= 2, 30)
        assert running_version(col, "pi-1") == "1.1.0"
        results = [m for t, m in col.messages if t.endswith("/cmd/result")]
        assert [r["stage"] for r in results][:2] == ["received", "switched"]
        res = subprocess.run([sys.executable, "-m", "edgeops", "flash", "--rollback", "--device", "pi-1", "--fleet",
                              FLEET, "--broker", mosquitto.url, "--json"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["version"] == "1.0.0"
        n = len(col.telemetry("pi-1"))
        assert col.wait_for(lambda: any(w["model"]["version"] == "1.0.0" for w in col.telemetry("pi-1")[n:]), 30)
    finally:
        out = agent.stop()
        col.close()
    assert "Traceback" not in out


def test_tampered_unsigned_and_unhealthy_bundles_never_become_active(mosquitto, bc_mlp_bundle, keys, stream,
                                                                     tmp_path):
    key, pub = keys
    v1 = variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0", key)
    unsigned = variant(bc_mlp_bundle, tmp_path / "unsigned", "2.0.0")
    tampered = variant(bc_mlp_bundle, tmp_path / "tampered", "2.0.1", key)
    art = next(p for p in tampered.iterdir() if p.suffix == ".tflite")
    data = bytearray(art.read_bytes())
    data[len(data) // 2] ^= 0xFF
    art.write_bytes(bytes(data))
    unhealthy = variant(bc_mlp_bundle, tmp_path / "unhealthy", "2.0.2", key, break_vectors=True)
    col = Collector(mosquitto.port, client_id="refusal-watch")
    agent = Agent(v1, "pi-2", mosquitto, tmp_path / "pi-2", stream, "--public-key", str(pub))
    try:
        assert col.wait_for(lambda: windows_of(col, "pi-2", "1.0.0") >= 1, 30)
        rc, doc, _ = flash(mosquitto, unsigned, "pi-2")
        assert rc == 4 and not doc["ok"] and "unsigned" in doc["message"]
        rc, doc, err = flash(mosquitto, tampered, "pi-2")   # edgeops flash checks before sending ...
        assert rc == 4 and doc is None and "sha256" in err
        doc = send_unchecked(mosquitto, tampered, "pi-2", tmp_path)   # ... and the device checks again
        assert not doc["ok"] and doc["stage"] == "failed" and "sha256" in doc["message"]
        rc, doc, _ = flash(mosquitto, unhealthy, "pi-2")
        assert rc == 5 and not doc["ok"] and "health check" in doc["message"]
        n = len(col.telemetry("pi-2"))
        assert col.wait_for(lambda: len(col.telemetry("pi-2")) >= n + 2, 30)
        assert {w["model"]["version"] for w in col.telemetry("pi-2")} == {"1.0.0"}
        assert (tmp_path / "pi-2" / "active").resolve().name.startswith("breast-cancer-mlp-1.0.0")
        assert not (tmp_path / "pi-2" / "previous").exists()
    finally:
        out = agent.stop()
        col.close()
    assert agent.proc.returncode == 0, out[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("step,expected", [("staged", "1.0.0"), ("health_checked", "1.0.0"),
                                           ("previous", "1.0.0"), ("switched", "1.1.0")])
def test_a_crash_at_any_step_of_a_flash_leaves_a_working_device(mosquitto, bc_mlp_bundle, stream, tmp_path, step,
                                                                expected):
    from devices.rollout import BundleImage, FleetLink

    v1 = variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0")
    v2 = variant(bc_mlp_bundle, tmp_path / "v2", "1.1.0")
    col = Collector(mosquitto.port, client_id=f"crash-watch-{step}")
    agent = Agent(v1, "pi-3", mosquitto, tmp_path / "pi-3", stream, "--allow-unsigned", env={FAULT_ENV: step})
    try:
        assert col.wait_for(lambda: windows_of(col, "pi-3", "1.0.0") >= 1, 30)
        with FleetLink(parse_broker_url(mosquitto.url), FLEET) as fl:
            fl.start_flash("pi-3", BundleImage.from_path(v2))
            agent.proc.wait(timeout=60)            # killed (SIGKILL) right after the step
        assert agent.proc.returncode == -9
        n = len(col.telemetry("pi-3"))
        again = Agent(v1, "pi-3", mosquitto, tmp_path / "pi-3", stream, "--allow-unsigned")   # power back on
        try:
            assert col.wait_for(lambda: sum(w["model"]["version"] == expected for w in col.telemetry("pi-3")[n:]) >= 2,
                                40), [w["model"]["version"] for w in col.telemetry("pi-3")]
            # windows spooled before the crash go out first (nothing is lost); then only the expected bundle
            after = [w["model"]["version"] for w in sorted(col.telemetry("pi-3")[n:], key=lambda w: w["seq"])]
            assert set(after[after.index(expected):]) == {expected}, after
        finally:
            out = again.stop()
        assert again.proc.returncode == 0, out[-2000:]
        assert not list((tmp_path / "pi-3" / "staging").iterdir())   # leftovers were cleaned up
    finally:
        agent.stop()
        col.close()


@pytest.fixture(scope="module")
def slow_bc_bundle(tmp_path_factory, reference_data):
    """Breast Cancer MLP 2.0.0, 2048 units wide in float32: the same inputs, about fifty times slower."""
    from convert.api import to_bundle
    from convert.reference import standardisation, train_keras_mlp

    data = reference_data["breast_cancer"]
    out = tmp_path_factory.mktemp("slow") / "bc-wide"
    to_bundle(train_keras_mlp(data, hidden=2048, epochs=3), out, name="breast-cancer-mlp", version="2.0.0",
              formats=("tflite",), quantize=("none",), calibration=data.X_train, holdout=(data.X_test, data.y_test),
              labels=data.labels, feature_names=data.feature_names, normalization=standardisation(data),
              max_accuracy_drop=100)
    return out


@pytest.mark.slow
def test_a_latency_regression_after_a_flash_rolls_back_by_itself(mosquitto, bc_mlp_bundle, slow_bc_bundle, stream,
                                                                 tmp_path):
    v1 = variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0")
    col = Collector(mosquitto.port, client_id="regression-watch")
    agent = Agent(v1, "pi-4", mosquitto, tmp_path / "pi-4", stream, "--allow-unsigned", "--rollback-windows", "3",
                  "--rollback-min-increase-ms", "0.2")
    try:
        assert col.wait_for(lambda: windows_of(col, "pi-4", "1.0.0") >= 5, 30)
        rc, doc, err = flash(mosquitto, slow_bc_bundle, "pi-4", "--wait-probation", "60")
        assert doc is not None, err
        assert doc["stage"] == "switched" and doc["after"]["type"] == "auto_rollback", doc
        assert rc == 1
        after = doc["after"]
        assert after["ok"] and after["version"] == "1.0.0" and "latency regression" in after["message"]
        assert after["p95_ms"] > 2 * after["baseline_p95_ms"]
        assert col.wait_for(lambda: running_version(col, "pi-4") == "1.0.0", 20)
        assert col.wait_for(lambda: [w["model"]["version"] for w in col.telemetry("pi-4")][-1] == "1.0.0", 20)
        seen = [w["model"]["version"] for w in col.telemetry("pi-4")]
        assert seen.count("2.0.0") >= 3 and seen.index("2.0.0") > 0
    finally:
        out = agent.stop()
        col.close()
    assert "rolling back 2.0.0" in out


def test_a_device_fetches_a_bundle_by_url_with_the_same_checks(mosquitto, bc_mlp_bundle, stream, tmp_path):
    import functools
    import threading
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    from edge_runtime.bundle import pack

    v1 = variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0")
    served = tmp_path / "www"
    served.mkdir()
    good = pack(variant(bc_mlp_bundle, tmp_path / "v2", "1.2.0"), served / "v2.tar.gz")
    local_copy = tmp_path / "v2.tar.gz"
    local_copy.write_bytes(good.read_bytes())

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v2.tar.gz"
    col = Collector(mosquitto.port, client_id="url-watch")
    agent = Agent(v1, "pi-5", mosquitto, tmp_path / "pi-5", stream, "--allow-unsigned")
    try:
        assert col.wait_for(lambda: windows_of(col, "pi-5", "1.0.0") >= 1, 30)
        data = bytearray(good.read_bytes())                 # the server now hands out other bytes
        data[-10] ^= 0xFF
        good.write_bytes(bytes(data))
        rc, doc, _ = flash(mosquitto, local_copy, "pi-5", "--url", url)
        assert rc == 4 and not doc["ok"] and "sha256" in doc["message"]
        good.write_bytes(local_copy.read_bytes())
        rc, doc, err = flash(mosquitto, local_copy, "pi-5", "--url", url)
        assert rc == 0, err
        assert doc["ok"] and doc["version"] == "1.2.0"
        rc, doc, err = flash(mosquitto, local_copy, "pi-5", "--url", "file:///etc/passwd")
        assert rc == 4 and "only http" in doc["message"]
        assert col.wait_for(lambda: running_version(col, "pi-5") == "1.2.0", 20)
    finally:
        agent.stop()
        server.shutdown()
        col.close()


def test_a_flasher_whose_subscription_the_broker_refuses_is_told_so_before_sending(bc_mlp_bundle, tmp_path):
    """Without results and statuses a flash could only time out waiting. A real nats-server refuses the
    subscription (its permissions deny the ``monitor`` user the fleet's topics): the flash ends at once,
    naming the topics, and sends no command. (Mosquitto grants such subscriptions and filters what its
    ACL denies: tests/devices/test_deploy_broker_acl.py covers the command refused there.)"""
    from helpers.nats_permissions import NatsWithPermissions

    nats = NatsWithPermissions(tmp_path / "nats")
    try:
        res = subprocess.run([sys.executable, "-m", "edgeops", "flash", str(bc_mlp_bundle), "--device", "dev-1",
                              "--fleet", FLEET, "--broker", f"mqtt://127.0.0.1:{nats.mqtt_port}?protocol=3.1.1",
                              "--username", "monitor", "--password", "pw", "--json", "--timeout", "60"],
                             capture_output=True, text=True, timeout=60)
    finally:
        nats.close()
    assert res.returncode == 1, res.stderr[-2000:]
    assert "refused this identity the subscription to edgeops/lab/+/cmd/result" in res.stderr, res.stderr[-2000:]
