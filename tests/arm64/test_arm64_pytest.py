"""A pytest session runs inside the emulated device, on the device-side wheels only."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.arm64


def test_a_pytest_session_runs_inside_the_device(arm_device, digits_cnn_bundle):
    proc = arm_device.python(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/arm64/on_device/device_checks.py"],
                             env={"EDGEOPS_TEST_BUNDLE": str(digits_cnn_bundle)}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "2 passed" in proc.stdout
