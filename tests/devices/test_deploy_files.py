"""deploy/: every file parses and says what the deployment needs (quick, structural; no Docker).

The images themselves are built and run in tests/devices/test_deploy_images.py (slow, docker).
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_runtime import sdnotify
from helpers import eventually

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PYPROJECT = (ROOT / "pyproject.toml").read_text()
VERSION = re.search(r'^version = "([^"]+)"', PYPROJECT, re.M).group(1)  # no tomllib on Python 3.10
IMAGES = {"agent": f"edgeops-agent:{VERSION}", "monitor": f"edgeops-monitor:{VERSION}"}


def _exported_metrics() -> set[str]:
    """The metric names the monitor's /metrics serves (counters get _total), read from its collector."""
    src = (ROOT / "telemetry" / "http.py").read_text()
    names = set()
    for kind, name in re.findall(r"(Counter|Gauge)MetricFamily\(\s*\"(edgeops_[a-z_]+)\"", src):
        names.add(name + "_total" if kind == "Counter" else name)
    for m in re.finditer(r"\(\"(edgeops_device_[a-z]+)\", \"[^\"]*\", s\.", src):  # the counter loop
        names.add(m.group(1) + "_total")
    return names


# -- Dockerfile and build-images -----------------------------------------------------------------

def _stages(dockerfile: str) -> dict[str, str]:
    parts = re.split(r"^FROM\s+", dockerfile, flags=re.M)[1:]
    return {re.match(r"\S+\s+AS\s+(\S+)", p, re.I).group(1): p for p in parts}


def test_the_dockerfile_has_an_agent_and_a_monitor_target_non_root_with_health_checks():
    text = (DEPLOY / "docker" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = _stages(text)
    assert {"agent", "monitor"} <= set(stages)
    for target in ("agent", "monitor"):
        body = stages[target]
        assert re.search(r"^USER edgeops$", body, re.M), target
        assert "HEALTHCHECK" in body, target
        assert re.search(r"COPY --from=build-\w+ /opt/edgeops /opt/edgeops", body), target
    # installs from the wheelhouse only, into a venv
    for build in ("build-agent", "build-monitor"):
        assert "python3 -m venv /opt/edgeops" in stages[build]
        assert "--no-index" in stages[build]
    # dependencies first (a layer a change to edgeops alone reuses), then the edgeops wheel
    assert "-r /tmp/wheels/agent.txt" in stages["build-agent"] and re.search(
        r"--disable-pip-version-check /tmp/edgeops/edgeops-\*\.whl\s", stages["build-agent"]), \
        "the agent installs the runtime alone, no extras"
    assert "-r /tmp/wheels/monitor.txt" in stages["build-monitor"]
    # and trims it: no byte code, no pip, no GPU/NPU plugins or ONNX Runtime's C library and offline tools
    for trimmed in ("--no-compile", "pip uninstall --yes --quiet pip setuptools", "libonnxruntime.so*",
                    "libLiteRtWebGpuAccelerator.so", "vendors/*/*/*.so", "'*.pyi'"):
        assert trimmed in stages["build-agent"], trimmed
    assert 'edgeops-*.whl)[monitor]"' in stages["build-monitor"]
    # the agent's health check is the heartbeat the run loop touches
    assert "edge_runtime.sdnotify" in stages["agent"] and "EDGEOPS_HEARTBEAT_FILE" in stages["agent"]
    assert "EDGEOPS_HEALTH_URL=http://127.0.0.1:9100/metrics" in stages["monitor"]


def test_build_images_is_valid_bash_tags_the_version_and_downloads_binary_wheels():
    script = DEPLOY / "build-images"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert 'image="edgeops-$t:$tag$suffix"' in text and 'tag="${tag:-$version}"' in text
    assert "--only-binary=:all:" in text and "pip download" in text.replace('" -m pip', " pip")
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--platform" in out and "--base" in out and "--tag" in out
    bad = subprocess.run([str(script), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_make_base_and_with_qemu_binfmt_are_valid_bash_and_answer_help():
    for name in ("make-base", "with-qemu-binfmt"):
        script = DEPLOY / name
        assert os.access(script, os.X_OK), name
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = (DEPLOY / "make-base").read_text()
    # Debian packages alone: essential + Python, no apt, no documentation, no iconv modules; kept when an
    # image of the same recipe exists
    assert "--variant=essential" in text and "python3,python3-venv,ca-certificates,passwd,libstdc++6" in text
    assert "path-exclude=/usr/lib/*/gconv/*" in text
    assert "org.edgeops.base-recipe" in text and "with-qemu-binfmt" in text
    out = subprocess.run([str(DEPLOY / "make-base"), "--help"], capture_output=True, text=True, check=True).stdout
    assert "--arch" in out and "--force" in out
    bad = subprocess.run([str(DEPLOY / "make-base"), "--arch", "s390x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "amd64 or arm64" in bad.stderr
    usage = subprocess.run([str(DEPLOY / "with-qemu-binfmt")], capture_output=True, text=True)
    assert usage.returncode == 2 and "COMMAND" in usage.stderr
    # it removes only what it added, the entry with the F flag (usable from containers)
    binfmt = (DEPLOY / "with-qemu-binfmt").read_text()
    assert ":PF'" in binfmt and "trap restore EXIT" in binfmt


# -- compose, Prometheus, Grafana ----------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_the_compose_stack_has_every_service_with_the_built_images_and_existing_files():
    doc = _compose()
    services = doc["services"]
    assert {"mosquitto", "postgres", "monitor", "prometheus", "grafana", "agent"} <= set(services)
    for name, image in IMAGES.items():
        repo, tag = image.split(":")
        assert services[name]["image"] == f"{repo}:${{EDGEOPS_VERSION:-{tag}}}"
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("./") and "${" not in src:
                assert (DEPLOY / src).exists(), src
    assert any(p.endswith(":9100") for p in services["monitor"]["ports"])
    monitor_args = " ".join(services["monitor"]["command"])
    assert "--share=" in monitor_args and "--http=0.0.0.0:9100" in monitor_args and "postgres:5432" in monitor_args
    agent = services["agent"]
    entry = " ".join(agent["entrypoint"])
    assert "--confirm monitor" in entry and "--allow-unsigned" in entry and "--public-key" in entry
    assert "replicas" in agent["deploy"]
    conf = (DEPLOY / "docker" / "mosquitto-dev.conf").read_text()
    assert int(re.search(r"^max_queued_messages (\d+)", conf, re.M).group(1)) > 1000
    assert re.search(r"^persistence true", conf, re.M)


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="neither docker compose nor docker-compose is installed")
def test_compose_reads_the_stack():
    res = subprocess.run([*_compose_command(), "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "EDGEOPS_AGENTS": "5"})
    assert res.returncode == 0, res.stderr
    services = yaml.safe_load(res.stdout)["services"]
    assert services["agent"]["deploy"]["replicas"] == 5 and services["agent"]["image"] == IMAGES["agent"]


def test_prometheus_scrapes_the_monitor_and_grafana_is_provisioned_with_it():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "monitor:9100" in targets
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "edgeops.yaml").read_text())
    mounted = [v for v in _compose()["services"]["grafana"]["volumes"] if v.startswith("./grafana/dashboards:")]
    assert mounted and mounted[0].split(":")[1] == prov["providers"][0]["options"]["path"]
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "edgeops-fleet.json").read_text())
    assert all(p["datasource"]["uid"] == source["uid"] for p in dash["panels"])


def test_the_grafana_dashboard_queries_only_metrics_the_monitor_exports_and_covers_the_fleet():
    exported = _exported_metrics()
    assert "edgeops_monitor_windows_stored_total" in exported and "edgeops_device_online" in exported
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "edgeops-fleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"edgeops_[a-z_]+", e)}
    assert used <= exported, used - exported
    for needed in ("edgeops_monitor_windows_stored_total", "edgeops_monitor_rejected_total",
                   "edgeops_monitor_quarantined_total", "edgeops_device_latency_ms", "edgeops_device_drift_psi",
                   "edgeops_open_alerts", "edgeops_device_online"):
        assert needed in used, needed
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in dash["templating"]["list"]} >= {"fleet", "device"}


# -- systemd -------------------------------------------------------------------------------------

def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_the_systemd_units_restart_are_hardened_and_read_an_environment_file():
    agent, monitor = _unit("edgeops-agent.service")["Service"], _unit("edgeops-monitor.service")["Service"]
    assert agent["Type"] == "notify" and int(agent["WatchdogSec"]) > 0 and agent["NotifyAccess"] == "main"
    for svc in (agent, monitor):
        assert svc["Restart"] in ("always", "on-failure")
        assert svc["ProtectSystem"] == "strict" and svc["NoNewPrivileges"] == "yes"
        assert svc.get("StateDirectory") and svc.get("EnvironmentFile")
        assert svc.get("DynamicUser") == "yes" or svc.get("User") not in (None, "root")
    assert "--state-dir %S/edgeops-agent" in agent["ExecStart"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_the_systemd_units_pass_systemd_analyze_verify(tmp_path):
    # verify checks that ExecStart's program exists: point it at this machine's edgeops
    edgeops = shutil.which("edgeops")
    if edgeops is None:
        pytest.skip("no edgeops on PATH")
    for unit in (DEPLOY / "systemd").glob("*.service"):
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/edgeops/bin/edgeops", edgeops))
    res = subprocess.run(["systemd-analyze", "verify", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "edgeops" not in res.stderr, res.stderr


# -- Kubernetes ----------------------------------------------------------------------------------

def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("initContainers", []) + spec.get("containers", [])


def test_every_k8s_manifest_parses_with_its_required_fields_and_kustomize_lists_them():
    docs = _k8s_docs()
    for path, doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), path
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], path
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), path
            assert all(c.get("image") for c in _containers(doc)), path
    for path, doc in docs:
        if doc["kind"] == "Kustomization":
            for res in doc["resources"]:
                assert (path.parent / res).exists(), (path, res)
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in docs if d["kind"] != "Kustomization"}
    assert {("StatefulSet", "mosquitto"), ("StatefulSet", "postgres"), ("Deployment", "edgeops-monitor"),
            ("Service", "edgeops-monitor"), ("DaemonSet", "edgeops-agent"), ("Secret", "edgeops-db")} <= kinds


def test_k8s_images_are_the_built_tags_and_the_workloads_are_set_up_for_their_job():
    docs = {(d["kind"], d["metadata"].get("name")): d for _, d in _k8s_docs() if d["kind"] != "Kustomization"}
    for _, doc in _k8s_docs():
        for c in _containers(doc):
            if c["image"].startswith("edgeops-"):
                assert c["image"] in IMAGES.values(), c["image"]
        if doc["kind"] == "Kustomization":
            for img in doc.get("images", []):
                assert f"{img['name']}:{img['newTag']}" in IMAGES.values()
    monitor = docs[("Deployment", "edgeops-monitor")]
    assert monitor["spec"]["replicas"] >= 2
    (container,) = monitor["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGES["monitor"]
    args = " ".join(container["args"])
    assert "--share=" in args and "--client-id=$(POD_NAME)" in args and "--db=$(EDGEOPS_DB)" in args
    annotations = monitor["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9100"
    agent = docs[("DaemonSet", "edgeops-agent")]
    pod = agent["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"edgeops.io/edge": "true"}
    state = next(v for v in pod["volumes"] if v["name"] == "state")
    assert state["hostPath"]["path"].startswith("/var/lib/edgeops")
    (main,) = pod["containers"]
    assert main["image"] == IMAGES["agent"] and "--state-dir /var/lib/edgeops/agent" in main["args"][0]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_manifests():
    res = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    built = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert all(d["metadata"].get("namespace") == "edgeops" for d in built if d["kind"] != "Namespace")
    assert {c["image"] for d in built for c in _containers(d) if c["image"].startswith("edgeops-")} \
        == set(IMAGES.values())


# -- the agent's systemd notifications and heartbeat (edge_runtime/sdnotify.py) -------------------

def test_notify_reaches_the_notify_socket_and_does_nothing_without_one(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1")
        assert server.recv(100) == b"READY=1"
        monkeypatch.delenv("NOTIFY_SOCKET")
        assert not sdnotify.notify("READY=1")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_seconds() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert sdnotify.watchdog_seconds() is None


def test_the_watchdog_beats_while_progress_changes_and_stops_when_it_stalls(tmp_path, monkeypatch):
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # beat every 0.05 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    heartbeat = tmp_path / "heartbeat"
    counter = {"n": 0, "moving": True}

    def progress():
        if counter["moving"]:
            counter["n"] += 1
        return counter["n"]

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.setblocking(False)

        total = {"n": 0}

        def beats() -> int:
            """Beats received since the last call (each one counted in total)."""
            n = 0
            while True:
                try:
                    assert server.recv(100) == b"WATCHDOG=1"
                    n += 1
                except BlockingIOError:
                    total["n"] += n
                    return n

        dog = sdnotify.Watchdog(progress, stall_after=0.3, heartbeat_file=str(heartbeat)).start()
        try:
            assert eventually(lambda: beats() >= 0 and total["n"] >= 3, timeout=10)
            assert sdnotify.check(str(heartbeat), 5) == 0
            counter["moving"] = False
            # once stalled for 0.3 s no beat comes any more: drain, then two beat intervals stay silent
            assert eventually(lambda: beats() == 0 and (dog._done.wait(0.2) or beats() == 0), timeout=10)
            assert sdnotify.check(str(heartbeat), 0.1) == 1
        finally:
            dog.stop()
    assert sdnotify.check(str(tmp_path / "missing"), 60) == 1


def test_the_docker_marker_is_registered():
    markers = PYPROJECT.split("markers = [", 1)[1].split("]", 1)[0]
    assert re.search(r'^\s+"docker: ', markers, re.M)


@pytest.mark.slow
def test_edgeops_run_tells_systemd_it_is_ready_beats_and_stops(tmp_path, session_mosquitto, bc_rf_bundle,
                                                             reference_data):
    import numpy as np

    inputs = tmp_path / "inputs.npy"
    np.save(inputs, reference_data["breast_cancer"].X_train[:50])
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(path))
        server.settimeout(60)
        env = {**os.environ, "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "2000000",
               "EDGEOPS_HEARTBEAT_FILE": str(tmp_path / "beat")}
        env.pop("WATCHDOG_PID", None)
        proc = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", "sd-1",
                                 "--broker", session_mosquitto.url, "--input", str(inputs), "--loop", "--rate", "20",
                                 "--state-dir", str(tmp_path / "state"), "--confirm", "broker", "--no-flash"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            seen = []
            while seen.count(b"WATCHDOG=1") < 2:
                seen.append(server.recv(100))
            assert b"READY=1" in seen and set(seen) <= {b"READY=1", b"WATCHDOG=1"}, seen
            assert sdnotify.check(str(tmp_path / "beat"), 30) == 0
            proc.send_signal(signal.SIGTERM)
            while server.recv(100) != b"STOPPING=1":
                pass
            assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
        finally:
            proc.kill()
            proc.wait()
