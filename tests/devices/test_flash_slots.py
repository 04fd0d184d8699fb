"""Flashing on the device: verified, health-checked, atomic, with the previous bundle kept."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

import edge_runtime
from edge_runtime import signing
from edge_runtime.bundle import pack
from edge_runtime.slots import BundleSlots
from helpers.bundle_variants import variant


@pytest.fixture
def keys(tmp_path):
    return signing.generate_key_pair(tmp_path / "keys")


def test_a_flash_switches_and_keeps_the_previous_bundle(tmp_path, bc_rf_bundle, keys):
    key, pub = keys
    v1 = variant(bc_rf_bundle, tmp_path / "v1", "1.0.0", key)
    v2 = pack(variant(bc_rf_bundle, tmp_path / "v2", "1.1.0", key), tmp_path / "v2.tar.gz")
    slots = BundleSlots(tmp_path / "state", public_key=str(pub))
    slots.install_initial(v1)
    result = slots.flash(v2)
    assert result.ok and result.version == "1.1.0"
    assert edge_runtime.load(slots.active).manifest["version"] == "1.1.0"
    assert edge_runtime.load(slots.previous).manifest["version"] == "1.0.0"
    back = slots.rollback()
    assert back.ok and edge_runtime.load(slots.active).manifest["version"] == "1.0.0"


def test_tampered_and_unsigned_bundles_are_refused(tmp_path, bc_rf_bundle, keys):
    key, pub = keys
    slots = BundleSlots(tmp_path / "state", public_key=str(pub))
    slots.install_initial(variant(bc_rf_bundle, tmp_path / "v1", "1.0.0", key))
    unsigned = variant(bc_rf_bundle, tmp_path / "u", "2.0.0")
    r = slots.flash(unsigned)
    assert not r.ok and "unsigned bundle" in r.message
    tampered = variant(bc_rf_bundle, tmp_path / "t", "2.0.1", key)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[100] ^= 1
    (tampered / "model.onnx").write_bytes(bytes(data))
    r = slots.flash(tampered)
    assert not r.ok and "sha256" in r.message
    assert edge_runtime.load(slots.active).manifest["version"] == "1.0.0"


def test_a_bundle_failing_its_health_check_never_becomes_active(tmp_path, bc_rf_bundle):
    slots = BundleSlots(tmp_path / "state", allow_unsigned=True)
    slots.install_initial(variant(bc_rf_bundle, tmp_path / "v1", "1.0.0"))
    bad = variant(bc_rf_bundle, tmp_path / "bad", "3.0.0", break_vectors=True)
    r = slots.flash(bad)
    assert not r.ok and "health check failed" in r.message and "test vector" in r.message
    assert edge_runtime.load(slots.active).manifest["version"] == "1.0.0"
    assert slots.previous is None


FLASH = """
import sys
from edge_runtime.slots import BundleSlots
BundleSlots(sys.argv[1], allow_unsigned=True).flash(sys.argv[2])
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.6, 0.9, 1.2, 1.6])
def test_a_crash_at_any_moment_leaves_a_working_bundle(tmp_path, bc_rf_bundle, delay):
    slots = BundleSlots(tmp_path / "state")
    slots.install_initial(variant(bc_rf_bundle, tmp_path / "v1", "1.0.0"))
    v2 = pack(variant(bc_rf_bundle, tmp_path / "v2", "1.1.0"), tmp_path / "v2.tar.gz")
    proc = subprocess.Popen([sys.executable, "-c", FLASH, str(tmp_path / "state"), str(v2)])
    time.sleep(delay)   # the moment of the power cut, swept by the parameter; not a wait for an event
    proc.send_signal(signal.SIGKILL)   # power cut
    proc.wait()
    after = BundleSlots(tmp_path / "state")
    model = edge_runtime.load(after.active)
    assert model.manifest["version"] in ("1.0.0", "1.1.0")
    assert model.self_test() >= 0.0
