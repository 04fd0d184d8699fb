"""A/B and shadow: a device running two bundles reports each one's windows (and the shadow's agreement)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from helpers.mqtt_collector import Collector
from telemetry.profile_check import parse


def run_agent(broker, bundle, device, tmp_path, stream, *extra):
    return subprocess.run([sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", device, "--fleet", "ab",
                           "--broker", broker.url, "--input", str(stream), "--loop", "--max-inferences", "1200",
                           "--window-size", "100", "--state-dir", str(tmp_path / device), *extra],
                          capture_output=True, text=True, timeout=120)


def test_ab_split_and_shadow_agreement(session_mosquitto, bc_mlp_bundle, bc_rf_bundle, reference_data, tmp_path):
    data = reference_data["breast_cancer"]
    stream = tmp_path / "x.npy"
    np.save(stream, data.X_test)   # held out: the two models disagree on a few of these
    col = Collector(session_mosquitto.port, topic="edgeops/ab/#", client_id="ab-watch")
    try:
        res = run_agent(session_mosquitto, bc_mlp_bundle, "ab-1", tmp_path, stream, "--ab", str(bc_rf_bundle),
                        "--ab-split", "0.25")
        assert res.returncode == 0, res.stderr[-2000:]
        res = run_agent(session_mosquitto, bc_mlp_bundle, "sh-1", tmp_path, stream, "--shadow", str(bc_rf_bundle))
        assert res.returncode == 0, res.stderr[-2000:]
        assert col.wait_for(lambda: sum(w["count"] for w in col.telemetry("ab-1")) == 1200, 20)
        assert col.wait_for(lambda: sum(w["count"] for w in col.telemetry("sh-1")) == 2400, 20)
    finally:
        col.close()
    ab = col.telemetry("ab-1")
    by_variant = {v: sum(w["count"] for w in ab if w["model"]["variant"] == v) for v in ("A", "B")}
    assert {w["model"]["name"] for w in ab if w["model"]["variant"] == "B"} == {"breast-cancer-rf"}
    assert 0.18 < by_variant["B"] / 1200 < 0.32, by_variant        # a 25% split (binomial, n=1200)
    assert len({w["seq"] for w in ab}) == len(ab)                     # one sequence for the device
    shadow = [w for w in col.telemetry("sh-1") if w["model"]["variant"] == "shadow"]
    primary = [w for w in col.telemetry("sh-1") if w["model"]["variant"] == "A"]
    assert sum(w["count"] for w in shadow) == sum(w["count"] for w in primary) == 1200
    compared = sum(w["agreement"]["compared"] for w in shadow)
    agreed = sum(w["agreement"]["agreed"] for w in shadow)
    assert compared == 1200 and 0.9 < agreed / compared < 1.0       # two different models: close, not identical
    for w in shadow + ab:
        parse(f"edgeops/ab/{w['device_id']}/telemetry", json.dumps(w).encode())   # the monitor accepts it
    with col.lock:
        status = [m for t, m in col.messages if t == "edgeops/ab/sh-1/status" and m.get("online")][-1]
    assert status["second_model"]["mode"] == "shadow" and status["second_model"]["name"] == "breast-cancer-rf"
