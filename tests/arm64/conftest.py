"""Fixtures for the tests that run inside the emulated aarch64 device (QEMU user mode).

The device is prepared once (cached under ``$EDGEOPS_ARM_ROOT`` or
``~/.cache/edgeops/arm64``; ``.ci/arm64-setup`` fills it in CI). When it
cannot be prepared (qemu-user-static or mmdebstrap missing, no archive) or
binfmt_misc cannot be set up, these tests fail under CI (``CI`` set) and are
skipped with the reason elsewhere.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from devtools import emulated_arm

HERE = Path(__file__).resolve().parent
GUEST = HERE / "guest.py"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(str(item.fspath)).resolve().parent == HERE:
            item.add_marker(pytest.mark.arm64)


def _unavailable(reason: str):
    if os.environ.get("CI"):
        pytest.fail(f"emulated aarch64 device unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"emulated aarch64 device unavailable: {reason}")


@pytest.fixture(scope="session")
def arm_device() -> emulated_arm.EmulatedArmDevice:
    """The prepared emulated Raspberry Pi 4 (Cortex-A72)."""
    missing = emulated_arm.missing_tools()
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)}, "
                     "or run .ci/arm64-setup)")
    try:
        device = emulated_arm.prepare(board="rpi4", quiet=True)
        info = device.describe()
    except emulated_arm.EmulationError as exc:
        _unavailable(str(exc))
    assert info["machine"] == "aarch64", info
    return device


@pytest.fixture(scope="module")
def arm_binfmt(arm_device):
    """binfmt_misc set up for the module (the guest may start aarch64 children), then restored."""
    try:
        with emulated_arm.binfmt_enabled() as before:
            yield before
    except emulated_arm.BinfmtError as exc:
        _unavailable(str(exc))


class GuestRun:
    """Runs ``guest.py`` jobs inside the device and reads back the arrays it wrote."""

    def __init__(self, device: emulated_arm.EmulatedArmDevice, workdir: Path) -> None:
        self.device = device
        self.workdir = workdir
        self.count = 0

    def __call__(self, jobs: list[dict], timeout: float = 240) -> dict:
        """Run ``jobs`` (each with ``kind``, ``model``, ``x``: an array) in one guest process.

        Returns the guest's report with each job's ``y`` (the output array) filled in.
        """
        self.count += 1
        run_dir = self.workdir / f"run{self.count}"
        run_dir.mkdir(parents=True)
        spec = []
        for i, job in enumerate(jobs):
            x_path = run_dir / f"x{i}.npy"
            np.save(x_path, job["x"])
            spec.append({k: str(v) if isinstance(v, Path) else v for k, v in job.items() if k != "x"}
                        | {"x": str(x_path), "out": str(run_dir / f"y{i}.npy")})
        (run_dir / "jobs.json").write_text(json.dumps(spec))
        proc = self.device.python([str(GUEST), str(run_dir / "jobs.json"), str(run_dir / "report.json")],
                                  timeout=timeout)
        assert proc.returncode == 0, f"guest failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
        report = json.loads((run_dir / "report.json").read_text())
        for job, result in zip(spec, report["results"], strict=True):
            result["y"] = np.load(job["out"])
        return report


@pytest.fixture
def guest(arm_device, tmp_path) -> GuestRun:
    return GuestRun(arm_device, tmp_path / "guest")
