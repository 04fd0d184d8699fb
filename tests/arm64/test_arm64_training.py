"""On-device fine-tuning inside the emulated Raspberry Pi: the trainable artifact trains there as on x86.

(A rank-0 signature input, the first artifact's learning rate, crashed LiteRT 2.3.0 on aarch64 with a
segmentation fault while it ran on x86; this runs the whole benchmark in the device.)
"""

from __future__ import annotations

import fcntl
import json

import pytest

from benchmarks.on_device_training import make_bundle, run, save_split


@pytest.mark.slow
def test_the_trainable_artifact_trains_on_aarch64_as_on_x86(arm_device, bundle_cache, tmp_path):
    with open(bundle_cache / ".digits-trainable.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        bundle = make_bundle(bundle_cache / "digits-trainable")
    data = save_split(tmp_path / "split.npz")
    out = tmp_path / "arm.json"
    res = arm_device.python(["-m", "benchmarks.on_device_training", "--bundle", str(bundle), "--data", str(data),
                             "--steps", "20", "--json", str(out)], timeout=1800)
    assert res.returncode == 0, res.stderr[-2000:]
    guest = json.loads(out.read_text())
    assert guest["machine"]["arch"] == "aarch64" and guest["heavy_modules_loaded"] == []
    assert guest["accuracy_after"] > guest["accuracy_before"] + 0.1
    host = run(32, 4, 20, None, 5, bundle, data)
    for g, h in zip(guest["curve"], host["curve"], strict=True):
        assert abs(g["accuracy"] - h["accuracy"]) <= 0.02, (g, h)
