"""The device agent's own /metrics and /healthz (`edgeops run --http`), scraped while it runs."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import numpy as np

from devtools.brokers import free_port
from helpers import eventually


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


def value(text: str, prefix: str) -> float | None:
    hits = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)]
    return hits[0] if hits else None


def test_a_running_agent_serves_its_metrics_and_health(mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test.copy()
    X[::10, 2] = np.nan                                  # every tenth row refused
    np.save(tmp_path / "x.npy", X)
    port = free_port()
    agent = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "dev-m",
                              "--fleet", "lab", "--broker", mosquitto.url, "--input", str(tmp_path / "x.npy"),
                              "--state-dir", str(tmp_path / "s"), "--loop", "--rate", "200", "--window-size", "20",
                              "--http", f"127.0.0.1:{port}", "--output", "stdout"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def ready():
            code, text = scrape(port, "/metrics")
            return text if code == 200 and (value(text, "edgeops_agent_inferences_total") or 0) > 100 \
                and value(text, 'edgeops_agent_last_window_latency_ms{quantile="0.95"}') is not None else None

        text = eventually(ready, 60)
        assert text, agent.stderr.read1().decode() if agent.poll() is not None else "no metrics"
        assert value(text, "edgeops_agent_bad_inputs_total") > 0
        assert value(text, "edgeops_agent_broker_connected") == 1
        assert value(text, "edgeops_agent_spool_windows") >= 1          # no monitor confirms them here
        assert value(text, "edgeops_agent_broker_last_contact_timestamp_seconds") > 0
        assert 'edgeops_agent_model_info{name="breast-cancer-mlp",version="1.0.0"' in text
        assert 'edgeops_agent_output_delivered_total{sink="stdout"}' in text
        code, body = scrape(port, "/healthz")
        assert code == 200 and json.loads(body)["status"] == "ok"
        assert scrape(port, "/nothing")[0] == 404
    finally:
        agent.terminate()
        agent.wait(timeout=60)
    assert scrape(port, "/healthz")[0] == 0                            # closed with the agent
