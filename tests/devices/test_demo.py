"""The README's first command: `edgeops demo` runs end to end (the --quick variant in CI)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("broker_kind", ["auto", "amqtt"])   # auto: the private Mosquitto CI installs
def test_demo_runs_the_whole_path_and_flags_only_the_drifted_devices(tmp_path, broker_kind):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "edgeops", "demo", "--quick", "--out", str(out),
                          "--broker-kind", broker_kind], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    conversion = json.loads((out / "conversion.json").read_text())
    assert {r["bundle"] for r in conversion} == {"breast-cancer-mlp", "wine-mlp", "digits-cnn", "breast-cancer-rf",
                                                 "wine-rf", "digits-rf"}
    bench = json.loads((out / "bench.json").read_text())
    assert all(r["accuracy"] > 0.95 for r in bench["results"])
    rollout = json.loads((out / "rollout.json").read_text())
    assert rollout["phase"] == "done" and len(rollout["devices"]) >= 20
    assert {d["state"] for d in rollout["devices"].values()} == {"flashed"}
    flagged = json.loads((out / "flagged.json").read_text())
    assert flagged["ok"] and set(flagged["flagged"]) == set(flagged["injected"])
    assert all(any(a["model_version"] == "1.1.0" for a in alerts) for alerts in flagged["flagged"].values())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "dev-004" in (out / "report.html").read_text()
    assert "flagged: dev-004, dev-011, dev-017 -> the injected devices and only them" in res.stderr
    assert ("pure-Python amqtt broker" in res.stderr) == (broker_kind == "amqtt")
    if broker_kind == "amqtt":
        return
    again = subprocess.run([sys.executable, "-m", "edgeops", "demo", "--out", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert again.returncode != 0 and "--force" in again.stderr
