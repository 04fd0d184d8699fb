"""The deploy/ images, built and run: an agent container's windows reach a monitor container's database.

Needs a Docker engine (skipped cleanly without one) and a local base image with Python 3.11 and its
venv module (EDGEOPS_TEST_BASE_IMAGE, default local/debian-py:bookworm; docs/deploy.md shows how to
make it from Debian packages: deploy/make-base). deploy/build-images fetches wheels into its wheelhouse
when they are missing (PyPI must then be reachable) and builds both images offline from them.

The arm64 agent image (marked arm64) builds from local/debian-py:bookworm-arm64 (deploy/make-base --arch
arm64) under QEMU user mode (deploy/with-qemu-binfmt, which needs root and qemu-user-static) and runs
a bundle through both backends there.
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

from devtools.brokers import free_port
from helpers import eventually

# building both images from a cold Docker cache takes minutes on a loaded machine, beyond the default 600 s
pytestmark = [pytest.mark.slow, pytest.mark.docker, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[2]
VERSION = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
BASE = os.environ.get("EDGEOPS_TEST_BASE_IMAGE", "local/debian-py:bookworm")
AGENT, MONITOR = f"edgeops-agent:{VERSION}", f"edgeops-monitor:{VERSION}"
AGENT_ARM64 = f"edgeops-agent:{VERSION}-arm64"
#: issue 13: the agent image (runtime, both inference backends, Python and its Debian base) stays below
AGENT_MAX_BYTES = 250e6
#: run in the agent image: every artifact of the bundle mounted at /share/b, on the rows of /share/x.npy;
#: prints {artifact: [backend, labels]} (loading also checks the manifest's test vectors)
PREDICT = """
import json, sys, numpy as np, edge_runtime
x = np.load("/share/x.npy")
manifest = json.load(open("/share/b/manifest.json"))
out = {}
for a in manifest["artifacts"]:
    m = edge_runtime.load("/share/b", artifact=a["file"])
    out[a["file"]] = [m.backend.name, m.predict_labels(x).tolist()]
assert not {"tensorflow", "sklearn", "keras"} & set(sys.modules)
print(json.dumps(out))
"""


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


def _predict_share(bundle: Path, x: np.ndarray, tmp_path: Path) -> Path:
    share = tmp_path / "predict"
    shutil.copytree(bundle, share / "b")
    np.save(share / "x.npy", x.astype(np.float32))
    for p in [share, *share.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return share


def _host_labels(bundle: Path, x: np.ndarray) -> dict[str, list[int]]:
    import edge_runtime

    manifest = json.loads((bundle / "manifest.json").read_text())
    return {a["file"]: edge_runtime.load(bundle, artifact=a["file"]).predict_labels(x.astype(np.float32)).tolist()
            for a in manifest["artifacts"]}


def test_the_agent_image_is_small_and_runs_a_bundle_through_both_backends(images, bc_mlp_bundle, reference_data,
                                                                           tmp_path):
    assert images[AGENT] < AGENT_MAX_BYTES, f"{AGENT} is {images[AGENT] / 1e6:.0f} MB"
    x = reference_data["breast_cancer"].X_test[:20]
    share = _predict_share(bc_mlp_bundle, x, tmp_path)
    res = _docker("run", "--rm", "--network", "none", "-v", f"{share}:/share:ro", "--entrypoint", "python", AGENT,
                  "-c", PREDICT, timeout=120, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    # the trimmed image keeps both backends: the bundle's TFLite artifacts on LiteRT, ONNX on ONNX Runtime
    assert {"litert", "onnxruntime"} <= {backend for backend, _ in out.values()}, out
    assert {f: labels for f, (_, labels) in out.items()} == _host_labels(bc_mlp_bundle, x)


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


@pytest.mark.arm64
@pytest.mark.timeout(3600)  # pip installs the venv under QEMU user mode
def test_the_arm64_agent_image_runs_a_bundle_under_qemu(docker_engine, bc_mlp_bundle, reference_data, tmp_path):
    """deploy/build-images --platform linux/arm64: the same trimmed agent, built and run under QEMU user mode.

    By hand (about 20 minutes on 2 cores: the arm64 base is made under QEMU, then the image):
    ``deploy/make-base --arch arm64 && EDGEOPS_ARM64_IMAGE=1 python -m pytest -m arm64 -k arm64_agent_image
    tests/devices/test_deploy_images.py``; CI leaves it out, for its time."""
    if os.environ.get("EDGEOPS_ARM64_IMAGE") != "1":
        pytest.skip("the arm64 image is built and tested by hand: EDGEOPS_ARM64_IMAGE=1 (see the docstring)")
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("no qemu-aarch64-static (apt-get install qemu-user-static)")
    if os.geteuid() != 0:
        pytest.skip("registering QEMU in binfmt_misc (deploy/with-qemu-binfmt) needs root")
    if _docker("image", "inspect", f"{BASE}-arm64", check=False).returncode != 0:
        pytest.skip(f"no base image {BASE}-arm64 (deploy/make-base --arch arm64)")
    start = time.monotonic()
    res = subprocess.run([str(ROOT / "deploy" / "build-images"), "--base", BASE, "--platform", "linux/arm64",
                          "--target", "agent"], capture_output=True, text=True, timeout=3600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    inspect = json.loads(_docker("image", "inspect", AGENT_ARM64).stdout)[0]
    print(f"{AGENT_ARM64} built in {time.monotonic() - start:.0f} s: {inspect['Size'] / 1e6:.0f} MB")
    assert inspect["Architecture"] == "arm64" and inspect["Size"] < AGENT_MAX_BYTES

    x = reference_data["breast_cancer"].X_test[:20]
    share = _predict_share(bc_mlp_bundle, x, tmp_path)
    # QEMU user mode shows the guest the host's x86 /proc/cpuinfo, on which ONNX Runtime's CPU probe crashes at
    # import; a real board has its own. The container gets the emulated Raspberry Pi 4's (as devtools.emulated_arm
    # gives its guests), the way LXCFS puts its own files over /proc.
    from devtools.emulated_arm import BOARDS

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(BOARDS["rpi4"].cpuinfo(2))
    res = subprocess.run([str(ROOT / "deploy" / "with-qemu-binfmt"), "docker", "run", "--rm", "--platform",
                          "linux/arm64", "--network", "none", "-e", "QEMU_CPU=cortex-a72", "-v", f"{share}:/share:ro",
                          "-v", f"{cpuinfo}:/proc/cpuinfo:ro",
                          "--entrypoint", "sh",
                          AGENT_ARM64, "-c", f"uname -m && python -c '{PREDICT}'"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    machine, result = res.stdout.split("\n", 1)
    assert machine == "aarch64"
    out = json.loads(result)
    assert {"litert", "onnxruntime"} <= {backend for backend, _ in out.values()}, out
    # float artifacts agree with the host's labels; int8 kernels may differ by architecture (see tests/arm64)
    host = _host_labels(bc_mlp_bundle, x)
    for f, (_, labels) in out.items():
        if "int8" not in f:
            assert labels == host[f], f
