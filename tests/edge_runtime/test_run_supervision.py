"""The demo and the emulated fleet depend on child processes (broker, monitor, device workers): a child
that dies stops the run at once with its name and the last lines of its log, and children start the
installed edgeops even from a folder that holds a folder named like one of its packages."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

import numpy as np
import pytest

from devices.children import ChildProcessDied, Supervisor, python_command, stop_process
from devtools.fleet_emulation import EmulatedFleet
from edge_runtime import signing
from edgeops.demo import start_monitor


@pytest.fixture
def parent_of_a_clone(tmp_path, monkeypatch):
    """The current folder holds folders named like the project's packages, as the folder holding the clone does."""
    parent = tmp_path / "src"
    for name in ("edgeops", "devices", "telemetry"):
        (parent / name).mkdir(parents=True)
    (parent / "devices" / "__init__.py").write_text("")   # a package of the same name, not only a folder
    (parent / "devices" / "emulate.py").write_text("raise SystemExit('the devices package of the current folder')")
    monkeypatch.chdir(parent)
    return parent


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _replay_rows(n_features: int = 30) -> tuple:
    rng = np.random.default_rng(0)
    return rng.normal(size=(64, n_features)).astype(np.float32), None, [f"f{i}" for i in range(n_features)]


# -- the folder the run starts from ---------------------------------------------------------------


def test_python_m_edgeops_from_the_folder_holding_the_clone_imports_the_wrong_edgeops(parent_of_a_clone):
    if os.environ.get("PYTHONSAFEPATH"):
        pytest.skip("PYTHONSAFEPATH keeps the current folder off sys.path for every child here")
    plain = subprocess.run([sys.executable, "-m", "edgeops", "--version"], capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0 and "cannot import name '__version__'" in plain.stderr


@pytest.mark.parametrize("safe_path", [True, False], ids=["-P", "launcher"])
def test_children_start_the_installed_edgeops_from_the_folder_holding_the_clone(parent_of_a_clone, safe_path):
    if safe_path and sys.version_info < (3, 11):
        pytest.skip("-P needs Python 3.11")
    res = subprocess.run(python_command(["-m", "edgeops", "--version"], safe_path=safe_path), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "edgeops" in res.stdout


def test_the_demo_monitor_starts_from_the_folder_holding_the_clone(parent_of_a_clone, tmp_path, session_mosquitto,
                                                                    bc_mlp_bundle):
    from devtools.brokers import free_port

    children, port = Supervisor(), free_port()
    monitor = start_monitor(tmp_path, session_mosquitto.url, f"sqlite:///{tmp_path / 'monitor.db'}", [bc_mlp_bundle],
                            port, children)
    try:
        assert children.wait(lambda: _answers(f"http://127.0.0.1:{port}/api/devices"), 60), \
            (tmp_path / "monitor.log").read_text()[-2000:]
    finally:
        stop_process(monitor)


# -- a child that dies stops the run ------------------------------------------------------------------


def test_a_demo_whose_monitor_dies_stops_naming_the_monitor_and_quoting_its_log(tmp_path, session_mosquitto,
                                                                               bc_mlp_bundle):
    from devtools.brokers import free_port

    children = Supervisor()
    monitor = start_monitor(tmp_path, session_mosquitto.url, "nosuchdb://nowhere", [bc_mlp_bundle], free_port(),
                            children)
    try:
        with pytest.raises(ChildProcessDied) as died:
            children.wait(lambda: False, timeout=120)
    finally:
        stop_process(monitor)
    message = str(died.value)
    assert message.startswith(f"the monitor (edgeops monitor) (pid {monitor.pid}) exited with status 3;")
    assert "the last lines of its log:" in message and "nosuchdb://nowhere" in message
    assert died.value.exit_code == 1


def test_a_supervised_call_stops_when_a_child_dies_during_it():
    children, release = Supervisor(), threading.Event()
    proc = children.watch("the sleeper", subprocess.Popen(python_command(["-c", "import time; time.sleep(60)"])))
    try:
        with pytest.raises(ChildProcessDied, match=r"the sleeper \(pid \d+\) was killed by SIGKILL; its log is empty"):
            children.call(lambda: (proc.kill(), release.wait(60)))   # a call that would block for a minute
    finally:
        release.set()
        stop_process(proc)


def test_an_emulated_fleet_whose_worker_is_killed_stops_naming_it(parent_of_a_clone, tmp_path, session_mosquitto,
                                                                  bc_mlp_bundle):
    # started from the folder holding the clone: the workers still run the installed devices package
    fleet = EmulatedFleet(bc_mlp_bundle, session_mosquitto.url, 1, _replay_rows(), tmp_path / "fleet",
                          fleet="killed", rate=20, window_size=20).start()
    try:
        assert fleet.wait_started(90), fleet.events
        os.kill(fleet.procs[0].pid, signal.SIGKILL)
        with pytest.raises(ChildProcessDied, match=r"device worker 1 \(dev-000 \.\. dev-000\) \(pid \d+\) "
                                                   r"was killed by SIGKILL"):
            fleet.wait(timeout=60)
    finally:
        fleet.stop()


def test_an_emulated_worker_that_refuses_its_bundle_stops_the_fleet_with_the_reason(
        tmp_path, session_mosquitto, bc_mlp_bundle):
    _, other_pub = signing.generate_key_pair(tmp_path / "keys", "other")   # the bundle is not signed with it
    fleet = EmulatedFleet(bc_mlp_bundle, session_mosquitto.url, 1, _replay_rows(), tmp_path / "fleet",
                          fleet="refused", public_key=str(other_pub)).start()
    try:
        with pytest.raises(ChildProcessDied) as died:
            fleet.wait_started(90)
    finally:
        fleet.stop()
    message = str(died.value)
    assert message.startswith("device worker 1 (dev-000 .. dev-000)") and "exited with status 4" in message
    assert message.splitlines()[-1].endswith("unsigned bundle, but a trusted key is configured; refusing it")


def test_fleet_emulate_stops_with_the_dead_worker_and_its_last_lines(tmp_path, session_mosquitto, bc_mlp_bundle):
    _, other_pub = signing.generate_key_pair(tmp_path / "keys", "other")
    rows = tmp_path / "rows.npy"
    np.save(rows, _replay_rows()[0])
    res = subprocess.run([sys.executable, "-m", "edgeops", "fleet", "emulate", "--devices", "1", "--bundle",
                          str(bc_mlp_bundle), "--broker", session_mosquitto.url, "--data", str(rows), "--public-key",
                          str(other_pub), "--state-root", str(tmp_path / "fleet"), "--duration", "60"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr[-2000:]
    assert "edgeops: error: device worker 1 (dev-000 .. dev-000)" in res.stderr
    assert "unexpected error" not in res.stderr
    assert json.dumps("started") not in res.stdout


def test_the_demo_fleet_stops_at_once_when_its_monitor_dies(tmp_path, bc_mlp_bundle, monkeypatch):
    import shutil

    from edgeops import demo

    out = tmp_path / "demo"
    shutil.copytree(bc_mlp_bundle, out / "bundles" / "breast_cancer-mlp")
    monkeypatch.setattr(demo, "EMULATED_LATENCY", ("--no-such-option",))   # the monitor refuses its command line
    with pytest.raises(ChildProcessDied) as died:
        demo._run_fleet(out, quick=True)
    message = str(died.value)
    assert message.startswith("the monitor (edgeops monitor)") and "exited with status 2" in message
    assert message.endswith("Error: No such option '--no-such-option'.")
    assert not list(out.glob("flagged.json"))   # stopped before any verdict
