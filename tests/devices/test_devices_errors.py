"""The devices' errors belong to edgeops' error hierarchy: the CLI reports them in one line with the exit
status of their kind (3 bad input, 1 failure), never as an "unexpected error"."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from devices.children import ChildProcessDied
from devtools.brokers import BrokerUnavailable
from devtools.emulated_arm import BinfmtError, EmulationError, PrepareError
from devtools.fleet_emulation import ScenarioError, load_scenario
from edge_runtime.errors import EdgeOpsError, InvalidInputError

DEVICES = [f"dev-{i:03d}" for i in range(10)]


@pytest.mark.parametrize("error, base, exit_code", [
    (ScenarioError, InvalidInputError, 3),
    (BrokerUnavailable, RuntimeError, 1),
    (EmulationError, RuntimeError, 1),
    (PrepareError, EmulationError, 1),
    (BinfmtError, EmulationError, 1),
    (ChildProcessDied, EdgeOpsError, 1),
])
def test_each_devices_error_is_an_edgeops_error_with_its_exit_status(error, base, exit_code):
    assert issubclass(error, EdgeOpsError) and issubclass(error, base)
    assert error("x").exit_code == exit_code


@pytest.mark.parametrize("event, message", [
    ({"kind": "drift", "count": "two", "shift": "scale"}, "'count' must be a whole number of devices from 1 to 10"),
    ({"kind": "drift", "count": 0, "shift": "scale"}, "'count' must be a whole number"),
    ({"kind": "drift", "fraction": "half", "shift": "scale"}, r"'fraction' must be a number in \(0, 1\]"),
    ({"kind": "drift", "fraction": 7, "shift": "scale"}, "'fraction' must be a number"),
    ({"kind": "offline", "devices": "dev-001"}, "'devices' must be a list of device ids"),
    ({"kind": "slow", "count": 1, "at": "soon"}, "'at' must be seconds after the start"),
    ({"kind": "slow", "count": 1, "at": -5}, "'at' must be seconds after the start"),
])
def test_a_scenario_with_a_field_of_the_wrong_kind_is_refused_naming_the_event(event, message):
    with pytest.raises(ScenarioError, match=r"scenario: events\[0\]: " + message):
        load_scenario({"events": [event]}, DEVICES)


def _emulate(tmp_path, bundle, *args):
    rows = tmp_path / "rows.npy"
    np.save(rows, np.zeros((16, 30), dtype=np.float32))
    return subprocess.run([sys.executable, "-m", "edgeops", "fleet", "emulate", "--bundle", str(bundle), "--broker",
                           "mqtt://127.0.0.1:1", "--data", str(rows), "--state-root", str(tmp_path / "fleet"), *args],
                          capture_output=True, text=True, timeout=120)


def test_fleet_emulate_refuses_a_bad_scenario_as_bad_input(tmp_path, bc_mlp_bundle):
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"events": [{"kind": "drift", "count": "two", "shift": "scale"}]}))
    res = _emulate(tmp_path, bc_mlp_bundle, "--scenario", str(scenario))
    assert res.returncode == 3, res.stderr
    assert res.stderr.strip() == (f"edgeops: error: {scenario}: events[0]: 'count' must be a whole number of devices "
                                  "from 1 to 10")


def test_fleet_emulate_refuses_a_drift_of_a_feature_the_data_does_not_have_before_starting(tmp_path, bc_mlp_bundle):
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"events": [{"at": 5, "kind": "drift", "count": 1, "shift": "scale",
                                                "features": ["mean radius", "colour"]}]}))
    res = _emulate(tmp_path, bc_mlp_bundle, "--scenario", str(scenario))
    assert res.returncode == 3, res.stderr
    assert "edgeops: error: drift event 0 at 5 s: drift feature 'colour' is not a feature of the data" in res.stderr
    assert not (tmp_path / "fleet" / "dev-000").exists()   # no device was started
