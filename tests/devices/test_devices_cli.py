"""`edgeops devices list/profiles`, `bench --store-profile` and the flash latency budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from helpers.mqtt_collector import Collector


def edgeops(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "edgeops", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_devices_list_shows_running_agents_with_their_bundle_and_platform(session_mosquitto, bc_mlp_bundle,
                                                                          reference_data, tmp_path):
    np.save(tmp_path / "x.npy", reference_data["breast_cancer"].X_train)
    col = Collector(session_mosquitto.port, topic="edgeops/inv/#", client_id="inv-watch")
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "inv-1",
                              "--fleet", "inv", "--broker", session_mosquitto.url, "--input", str(tmp_path / "x.npy"),
                              "--loop", "--rate", "100", "--state-dir", str(tmp_path / "s"), "--duration", "60"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert col.wait_for(lambda: any(t.endswith("/status") for t, _ in col.messages), 30)
        res = edgeops("devices", "list", "--broker", session_mosquitto.url, "--fleet", "inv", "--json")
        assert res.returncode == 0, res.stderr
        (row,) = json.loads(res.stdout)
        assert row["device_id"] == "inv-1" and row["fleet"] == "inv" and row["online"] is True
        assert row["arch"] == os.uname().machine and row["bundle"] == "breast-cancer-mlp" and row["version"]
        assert row["free_disk_bytes"] > 0 and row["last_seen_ago_s"] < 30 and row["alerts"] == []
        table = edgeops("devices", "list", "--broker", session_mosquitto.url, "--fleet", "inv")
        assert table.returncode == 0 and "inv-1" in table.stdout
    finally:
        agent.terminate()
        agent.wait(timeout=30)
        col.close()
    res = edgeops("devices", "list", "--broker", session_mosquitto.url, "--fleet", "inv", "--json")
    assert json.loads(res.stdout)[0]["online"] is False          # it said goodbye (retained)


def test_a_bundle_over_its_latency_budget_on_a_profile_is_not_flashed(bc_mlp_bundle, tmp_path):
    env = {"EDGEOPS_BENCH_STORE": str(tmp_path / "store")}
    res = edgeops("bench", str(bc_mlp_bundle), "--runs", "20", "--warmup", "2", "--in-process",
                  "--store-profile", "rpi-4b", env=env)
    assert res.returncode == 0, res.stderr
    stored = json.loads((tmp_path / "store" / "rpi-4b.json").read_text())
    (entry,) = stored.values()
    assert entry["bundle"] == "breast-cancer-mlp" and "model.int8.tflite" in entry["artifacts"]
    p50 = entry["artifacts"]["model.int8.tflite"]["p50_ms"]
    base = ["flash", str(bc_mlp_bundle), "--device", "d", "--broker", "mqtt://127.0.0.1:9", "--profile", "rpi-4b"]
    over = edgeops(*base, "--max-latency-ms", str(p50 / 10), env=env)
    assert over.returncode == 5 and "over the budget" in over.stderr
    unknown = edgeops(*base[:-1], "rpi-9", "--max-latency-ms", "1", env=env)
    assert unknown.returncode == 3 and "unknown board profile" in unknown.stderr
    within = edgeops(*base, "--max-latency-ms", str(p50 * 100), "--timeout", "2", env=env)
    assert "within" in within.stderr and within.returncode == 1   # passed the budget; no broker at port 9
    profiles = edgeops("devices", "profiles", "--json")
    assert {p["id"] for p in json.loads(profiles.stdout)} >= {"rpi-zero-2w", "rpi-3b-plus", "rpi-4b", "rpi-5",
                                                               "arm64-generic", "x86-64"}
