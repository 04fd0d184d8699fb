"""The deploy/ images, built and run: an agent container's windows reach a monitor container's database.

Needs a Docker engine (skipped cleanly without one) and a local base image with Python 3.11 and its
venv module (EDGEOPS_TEST_BASE_IMAGE, default local/debian-py:bookworm; docs/deploy.md shows how to
make it from Debian packages with mmdebstrap). deploy/build-images fetches wheels into its wheelhouse
when they are missing (PyPI must then be reachable) and builds both images offline from them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from devices.broker import free_port
from helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.docker]

ROOT = Path(__file__).resolve().parents[1]
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
BASE = os.environ.get("EDGEOPS_TEST_BASE_IMAGE", "local/debian-py:bookworm")
AGENT, MONITOR = f"edgeops-agent:{VERSION}", f"edgeops-monitor:{VERSION}"


def _docker(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=check)


@pytest.fixture(scope="module")
def docker_engine():
    if shutil.which("docker") is None:
        pytest.skip("no docker client")
    try:
        if _docker("info", "--format", "{{.ServerVersion}}", timeout=20, check=False).returncode != 0:
            pytest.skip("no Docker engine answers")
    except subprocess.TimeoutExpired:
        pytest.skip("the Docker engine does not answer")
    if _docker("image", "inspect", BASE, check=False).returncode != 0:
        pytest.skip(f"no base image {BASE} (docs/deploy.md: mmdebstrap ... | docker import - {BASE})")


@pytest.fixture(scope="module")
def images(docker_engine):
    """Both images built by deploy/build-images from the local base; the build's own report of sizes."""
    start = time.monotonic()
    res = subprocess.run([str(ROOT / "deploy" / "build-images"), "--base", BASE], capture_output=True, text=True,
                         timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    sizes = {img: int(_docker("image", "inspect", "-f", "{{.Size}}", img).stdout) for img in (AGENT, MONITOR)}
    print(f"built in {time.monotonic() - start:.0f} s: " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in sizes.items()))
    return sizes


@pytest.fixture
def containers():
    started: list[str] = []
    yield started
    for cid in started:
        logs = _docker("logs", "--tail", "30", cid, check=False)
        print(f"--- {cid[:12]}\n{logs.stdout[-2000:]}{logs.stderr[-3000:]}")
        _docker("rm", "-f", "-v", cid, check=False)  # -v: the anonymous state volume too


def test_the_agent_image_is_the_runtime_alone_and_runs_as_a_user(images):
    probe = ("import importlib.util as u, os, edge_runtime; "
             "print(os.getuid(), [m for m in ('tensorflow', 'sklearn', 'keras', 'sqlalchemy') if u.find_spec(m)])")
    out = _docker("run", "--rm", "--entrypoint", "python", AGENT, "-c", probe).stdout.split(maxsplit=1)
    assert out[0] != "0" and out[1].strip() == "[]", out
    assert _docker("run", "--rm", MONITOR, "--help").stdout.count("--share") >= 1
    health = json.loads(_docker("image", "inspect", "-f", "{{json .Config.Healthcheck}}", AGENT).stdout)
    assert "edge_runtime.sdnotify" in " ".join(health["Test"])


def _stored(http_port: int) -> float:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return 0.0
    m = re.search(r"^edgeops_monitor_windows_stored_total (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _health(cid: str) -> str:
    return _docker("inspect", "-f", "{{.State.Health.Status}}", cid, check=False).stdout.strip()


def test_an_agent_container_reports_to_a_monitor_container_which_stores_its_windows(
        images, containers, mosquitto, bc_rf_bundle, reference_data, tmp_path):
    # what the containers' user (uid 10001) reads and writes
    share = tmp_path / "share"
    shutil.copytree(bc_rf_bundle, share / "bundles" / "bc")
    np.save(share / "inputs.npy", reference_data["breast_cancer"].X_train.astype(np.float32))
    (share / "db").mkdir()
    for p in [share, *share.rglob("*")]:
        p.chmod(0o777 if p.is_dir() else 0o644)
    http_port = free_port()
    broker = f"mqtt://127.0.0.1:{mosquitto.port}"

    t0 = time.monotonic()
    containers.append(_docker(
        "run", "-d", "--network", "host", "--health-interval", "2s", "--health-start-period", "60s",
        "-e", f"EDGEOPS_HEALTH_URL=http://127.0.0.1:{http_port}/metrics", "-v", f"{share}:/share", MONITOR,
        "--broker", broker, "--db", "sqlite:////share/db/monitor.db", "--bundles", "/share/bundles",
        "--http", f"127.0.0.1:{http_port}", "--client-id", "docker-monitor").stdout.strip())
    containers.append(_docker(
        "run", "-d", "--network", "host", "--health-interval", "2s", "--health-start-period", "60s",
        "-v", f"{share}:/share:ro", AGENT, "/share/bundles/bc", "--device-id", "docker-1", "--fleet", "dock",
        "--broker", broker, "--input", "/share/inputs.npy", "--loop", "--rate", "200", "--window-size", "100",
        "--allow-unsigned").stdout.strip())
    monitor_id, agent_id = containers

    assert eventually(lambda: _stored(http_port) >= 1, timeout=180, interval=0.5), "no window stored"
    first = time.monotonic() - t0
    assert eventually(lambda: _stored(http_port) >= 5, timeout=120, interval=0.5)
    print(f"first window stored {first:.1f} s after the containers were started")
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/devices", timeout=5) as r:
        devices = {d["device_id"]: d for d in json.load(r)["devices"]}
    assert devices["docker-1"]["fleet"] == "dock" and devices["docker-1"]["status"] == "online"
    # both health checks pass: the monitor's /metrics answers, the agent's run loop beats
    assert eventually(lambda: _health(agent_id) == "healthy" and _health(monitor_id) == "healthy", timeout=90,
                      interval=1), (_health(agent_id), _health(monitor_id))
    # a clean stop: the agent goes offline (its retained status), the container exits 0
    _docker("stop", "-t", "30", agent_id, timeout=60)
    assert _docker("inspect", "-f", "{{.State.ExitCode}}", agent_id).stdout.strip() == "0"
