"""Fleet rollouts with a canary against an emulated fleet and the real monitor."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from devices.rollout import RolloutRunner, new_rollout, plan_groups
from devtools.fleet_emulation import EmulatedFleet, ScenarioError, load_scenario, replay_data
from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from helpers.bundle_variants import variant
from helpers.mqtt_collector import Collector

FLEET = "ward"


def statuses(col):
    with col.lock:
        out = {}
        for t, m in col.messages:
            if t.endswith("/status") and m.get("online"):
                out[m["device_id"]] = m["model"]["version"]
        return out


def test_plan_groups_and_scenario_errors():
    devs = [f"dev-{i:03d}" for i in range(20)]
    groups = plan_groups(devs, 0.1, 2)
    assert groups[0] == ["dev-000", "dev-001"] and len(groups) == 3
    assert sorted(d for g in groups for d in g) == devs
    assert plan_groups(["b", "a"], 0.01, 5) == [["a"], ["b"]]
    events = load_scenario({"events": [{"at": 5, "kind": "drift", "count": 2, "shift": "offset"},
                                       {"at": 1, "kind": "offline", "devices": ["dev-003"], "seconds": 4}]}, devs)
    assert [e.kind for e in events] == ["offline", "drift"] and events[1].devices == ["dev-000", "dev-001"]
    assert events[1].params["factor"] == 1.5
    for bad, message in [({"events": [{"kind": "explode", "count": 1}]}, "'kind' must be one of"),
                         ({"events": [{"kind": "drift", "devices": ["nope"], "shift": "scale"}]}, "unknown devices"),
                         ({"events": [{"kind": "drift", "count": 1, "shift": "sideways"}]}, "drift 'shift'"),
                         ({"events": [{"kind": "slow"}]}, "name the devices"),
                         ({"nothing": 1}, "list 'events'")]:
        with pytest.raises(ScenarioError, match=message):
            load_scenario(bad, devs)


@pytest.fixture
def versions(tmp_path, bc_mlp_bundle):
    return variant(bc_mlp_bundle, tmp_path / "v1", "1.0.0"), variant(bc_mlp_bundle, tmp_path / "v2", "1.1.0")


def test_which_open_alerts_stop_a_rollout(versions, tmp_path):
    from types import SimpleNamespace

    _, v2 = versions
    runner = RolloutRunner(parse_broker_url("mqtt://127.0.0.1:1"), new_rollout(v2, FLEET, ["dev-000", "dev-001"], 0.5,
                                                                              1, 2), tmp_path / "r.json")
    flashed_at = 1000.0
    runner.r.devices["dev-000"]["ts"] = flashed_at

    def alert(detector, version, opened_at, device="dev-000"):
        return {"device_id": device, "detector": detector, "model_version": version, "opened_at": opened_at}

    stopping = [alert("latency", "1.1.0", flashed_at + 5),          # the new version got slow
                alert("error_rate", "1.1.0", flashed_at - 50),       # (version decides, not the time)
                alert("feature_drift", "1.0.0", flashed_at + 5)]     # inputs moved since the flash
    ignored = [alert("latency", "1.0.0", flashed_at + 5),           # the old bundle, slow while the device
               alert("feature_drift", "1.0.0", flashed_at - 50),     # staged and health-checked the new one
               alert("silence", "1.1.0", flashed_at + 5),
               alert("latency", "1.1.0", flashed_at + 5, device="dev-001")]   # not in this group
    fleet_link = SimpleNamespace(alerts={"open": stopping + ignored})
    assert runner._alerts_for(fleet_link, ["dev-000"]) == stopping


def stored_devices(db) -> set[str]:
    """Devices the monitor has stored windows of (none before it created its database)."""
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return {row[0] for row in conn.execute("select distinct device_id from edgeops_windows")}
    except sqlite3.Error:
        return set()


def start_fleet(tmp_path, v1, broker, n=4, confirm="monitor"):
    fleet = EmulatedFleet(v1, broker.url, n, replay_data(v1, "breast_cancer", None), tmp_path / "fleet",
                          fleet=FLEET, per_process=n, rate=50, window_size=20, allow_unsigned=True,
                          confirm=confirm).start()
    assert fleet.wait_started(90), fleet.events
    return fleet


@pytest.mark.slow
def test_a_canary_rollout_stops_on_a_drift_alert_and_rolls_the_canary_back(mosquitto, versions, tmp_path):
    v1, v2 = versions
    monitor = subprocess.Popen([sys.executable, "-m", "edgeops", "monitor", "--broker", mosquitto.url, "--fleet", FLEET,
                                "--db", f"sqlite:///{tmp_path / 'm.db'}", "--bundle", str(v1), "--bundle", str(v2),
                                "--client-id", "rollout-monitor"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    col = Collector(mosquitto.port, client_id="rollout-watch")
    fleet = start_fleet(tmp_path, v1, mosquitto)
    try:
        assert eventually(lambda: stored_devices(tmp_path / "m.db") >= set(fleet.devices), 60)   # the monitor sees them
        rollout = new_rollout(v2, FLEET, fleet.devices, 0.25, 1, 60)
        assert rollout.groups[0] == ["dev-000"]
        said = []

        def progress(msg):
            said.append(msg)
            if msg.startswith("canary: waiting"):
                fleet.inject("drift", ["dev-000"], shift="scale", factor=2.0)   # the new version "goes wrong"

        r = RolloutRunner(parse_broker_url(mosquitto.url), rollout, tmp_path / "rollout.json", window_timeout=90,
                          progress=progress).run()
        assert r.phase == "stopped", said
        assert "feature_drift on dev-000" in r.reason
        assert r.devices["dev-000"]["state"] == "rolled_back"
        assert {r.devices[d]["state"] for d in ("dev-001", "dev-002", "dev-003")} == {"pending"}
        saved = json.loads((tmp_path / "rollout.json").read_text())
        assert saved["phase"] == "stopped" and saved["devices"]["dev-000"]["state"] == "rolled_back"
        assert col.wait_for(lambda: statuses(col).get("dev-000") == "1.0.0" and len(statuses(col)) == 4, 20)
        assert set(statuses(col).values()) == {"1.0.0"}
    finally:
        fleet.stop()
        monitor.send_signal(signal.SIGINT)
        monitor.wait(timeout=90)
        col.close()


@pytest.mark.slow
def test_a_rollout_survives_a_restart_of_the_orchestrator(mosquitto, versions, tmp_path):
    v1, v2 = versions
    col = Collector(mosquitto.port, client_id="resume-watch")
    fleet = start_fleet(tmp_path, v1, mosquitto, confirm="broker")
    state = tmp_path / "rollout-state.json"
    base = [sys.executable, "-m", "edgeops", "flash", "--broker", mosquitto.url, "--json"]
    try:
        first = subprocess.Popen(base + [str(v2), "--fleet", FLEET, "--canary", "25%", "--waves", "2",
                                         "--clean-windows", "3", "--canary-samples", "0",   # no monitor here
                                         "--state-file", str(state), "--devices", ",".join(fleet.devices)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        def canary_flashed() -> bool:
            try:
                return json.loads(state.read_text())["devices"]["dev-000"]["state"] == "flashed"
            except (OSError, ValueError):   # not written yet
                return False

        assert eventually(canary_flashed, 60)
        first.kill()                                   # the orchestrator dies in the middle of the rollout
        first.wait()
        doc = json.loads(state.read_text())
        assert doc["phase"] == "running" and doc["group_index"] == 0
        assert {doc["devices"][d]["state"] for d in ("dev-001", "dev-002", "dev-003")} == {"pending"}
        res = subprocess.run(base + ["--resume", str(state)], capture_output=True, text=True, timeout=240)
        assert res.returncode == 0, res.stderr[-3000:]
        done = json.loads(res.stdout)
        assert done["phase"] == "done" and {d["state"] for d in done["devices"].values()} == {"flashed"}
        assert done["id"] == doc["id"]
        assert col.wait_for(lambda: statuses(col) == {d: "1.1.0" for d in fleet.devices}, 20), statuses(col)
    finally:
        fleet.stop()
        col.close()
    assert all(s["version"] == "1.1.0" for s in fleet.stats.values())


@pytest.mark.slow
def test_fleet_emulate_applies_offline_and_slow_events(mosquitto, versions, tmp_path):
    v1, _ = versions
    scenario = tmp_path / "scenario.json"
    scenario.write_text(json.dumps({"events": [
        {"at": 2, "kind": "offline", "devices": ["dev-001"], "seconds": 4},
        {"at": 2, "kind": "slow", "devices": ["dev-002"], "added_latency_ms": 8}]}))
    col = Collector(mosquitto.port, client_id="emulate-watch")
    try:
        res = subprocess.run([sys.executable, "-m", "edgeops", "fleet", "emulate", "--devices", "3",
                              "--bundle", str(v1), "--broker", mosquitto.url, "--fleet", FLEET,
                              "--scenario", str(scenario), "--duration", "10", "--rate", "50", "--window-size", "25",
                              "--state-root", str(tmp_path / "fs"),
                              "--json", "--confirm", "broker"],      # no monitor here: the broker's ack empties spools
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        out = json.loads(res.stdout)
        assert {e["event"] for e in out["events"]} >= {"started", "offline", "online", "slow", "stopped"}
        assert all(s["unsent_windows"] == 0 for s in out["stats"].values())
        with col.lock:
            offline = [m for t, m in col.messages if t.endswith("dev-001/status") and m.get("online") is False]
        assert offline                                  # the last will said so while it was away
        seqs = sorted(col.seqs("dev-001"))             # nothing was lost while it was away
        assert len(seqs) >= 10 and seqs == list(range(seqs[0], seqs[-1] + 1))
        slow = [w["latency_ms"]["p50"] for w in col.telemetry("dev-002")[-3:]]
        fast = [w["latency_ms"]["p50"] for w in col.telemetry("dev-000")[-3:]]
        assert min(slow) >= 8.0 > max(fast)
    finally:
        col.close()
    bad = tmp_path / "bad.json"
    bad.write_text('{"events": [{"kind": "drift", "count": 1, "shift": "sideways"}]}')
    res = subprocess.run([sys.executable, "-m", "edgeops", "fleet", "emulate", "--bundle", str(v1), "--broker",
                          mosquitto.url, "--scenario", str(bad)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "events[0]: drift 'shift'" in res.stderr
    assert os.path.exists(v1)
