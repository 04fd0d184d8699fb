"""The emulated aarch64 device itself: what it is, what it installs, and that it cleans up after itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from devices.boards import detect_profile
from devtools import emulated_arm

pytestmark = pytest.mark.arm64


def test_the_guest_is_an_aarch64_raspberry_pi_4(arm_device):
    info = arm_device.describe()
    assert info["machine"] == "aarch64"
    assert info["python"].startswith("3.11.")
    assert info["cpu_part"] == "0xd08"  # Cortex-A72
    assert info["qemu_cpu"] == "cortex-a72"
    assert "emulated" in info["model"]
    # The device-tree model names the board, so profile detection finds it.
    assert detect_profile(info["model"], info["machine"]).id == "rpi-4b"

    proc = arm_device.python(["-c", "import platform; print(platform.machine())"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "aarch64"


def test_a_raspberry_pi_5_is_a_cortex_a76(arm_device):
    device = emulated_arm.prepare(arm_device.root, board="rpi5", quiet=True)
    info = device.describe()
    assert info["machine"] == "aarch64"
    assert info["cpu_part"] == "0xd0b"
    assert info["qemu_cpu"] == "cortex-a76"
    assert detect_profile(info["model"], info["machine"]).id == "rpi-5"


def test_preparing_again_is_cached(arm_device):
    import time

    start = time.monotonic()
    emulated_arm.prepare(arm_device.root, board="rpi4", quiet=True)
    assert time.monotonic() - start < 5


def test_only_device_side_packages_are_installed(arm_device):
    code = textwrap.dedent("""
        import importlib.util, json
        names = ["numpy", "paho.mqtt", "ai_edge_litert", "onnxruntime", "click", "rich",
                 "tensorflow", "keras", "sklearn", "scipy", "onnx", "tf2onnx", "skl2onnx"]
        print(json.dumps({n: importlib.util.find_spec(n) is not None for n in names}))
    """)
    proc = arm_device.python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert all(found[n] for n in ("numpy", "paho.mqtt", "ai_edge_litert", "onnxruntime", "click", "rich"))
    assert not any(found[n] for n in ("tensorflow", "keras", "sklearn", "scipy", "onnx", "tf2onnx", "skl2onnx"))


def test_the_guest_starts_aarch64_children(arm_device, arm_binfmt):
    code = textwrap.dedent("""
        import multiprocessing, platform, subprocess, sys
        child = subprocess.run([sys.executable, "-c", "import platform; print(platform.machine())"],
                               capture_output=True, text=True, check=True).stdout.strip()
        if __name__ == "__main__":
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                spawned = pool.apply(platform.machine)
            print(child, spawned)
    """)
    proc = arm_device.python(["-c", code], timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-2:] == ["aarch64", "aarch64"]


def test_binfmt_is_restored_to_what_it_was():
    # Run in a fresh host process so that no other user in this process holds the setup.
    code = textwrap.dedent("""
        import json
        from devtools.emulated_arm import binfmt_enabled, binfmt_state
        before = binfmt_state()
        with binfmt_enabled():
            during = binfmt_state()
        print(json.dumps([before, during, binfmt_state()]))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=str(emulated_arm.REPO_ROOT))
    if proc.returncode != 0 and "BinfmtError" in proc.stderr and not os.environ.get("CI"):
        pytest.skip(proc.stderr.strip().splitlines()[-1])
    assert proc.returncode == 0, proc.stderr
    before, during, after = json.loads(proc.stdout)
    assert during["enabled"] is True
    assert after == before
