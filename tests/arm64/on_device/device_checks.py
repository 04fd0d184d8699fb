"""Checks that run as a pytest session INSIDE the emulated aarch64 device (see test_arm64_pytest.py).

The file name does not match test_*.py, so the host's test run does not collect it; the guest's
pytest is given its path explicitly. EDGEOPS_TEST_BUNDLE names a bundle to load.
"""

from __future__ import annotations

import os
import platform
import sys

import numpy as np


def test_this_is_aarch64():
    assert platform.machine() == "aarch64"


def test_the_runtime_loads_and_predicts_without_training_frameworks():
    import edge_runtime

    model = edge_runtime.load(os.environ["EDGEOPS_TEST_BUNDLE"])
    x = np.zeros((3,) + tuple(model.input_spec.shape), dtype=np.float32)
    y = model.predict(x)
    assert y.shape[0] == 3 and np.isfinite(y).all()
    assert not [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "sklearn")]
