"""The agent against a real Mosquitto: windows match the schema, and none is lost to outages."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import jsonschema
import numpy as np
import pytest

from helpers import eventually
from helpers.mqtt_collector import Collector

SCHEMA = json.loads(open("edge_runtime/schemas/telemetry.schema.json").read())


@pytest.fixture(scope="module")
def bc_inputs(tmp_path_factory, reference_data):
    path = tmp_path_factory.mktemp("inputs") / "bc.npy"
    np.save(path, reference_data["breast_cancer"].X_test)
    return path


def agent_cmd(bundle, broker, inputs, state, *extra):
    return [sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", "dev-1", "--fleet", "lab",
            "--broker", broker.url, "--input", str(inputs), "--state-dir", str(state), *map(str, extra)]


@contextlib.contextmanager
def stdin_agent(bundle, broker, state, *extra, rows: int = 0):
    """An agent reading JSON lines from a stdin the test keeps open (``rows`` lines written at once), and a
    collector of what it publishes; both ended however the test ends."""
    sub = Collector(broker.port)
    agent = subprocess.Popen(agent_cmd(bundle, broker, "-", state, *extra), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        agent.stdin.write("\n".join([json.dumps([1.0] * 30)] * rows) + "\n")
        agent.stdin.flush()
        yield agent, sub
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        sub.close()


def test_an_agent_publishes_windows_and_status_that_match_the_schema(mosquitto, bc_mlp_bundle, bc_inputs, tmp_path):
    sub = Collector(mosquitto.port)
    try:
        res = subprocess.run(agent_cmd(bc_mlp_bundle, mosquitto, bc_inputs, tmp_path / "s", "--window-size", 40),
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert sub.wait_for(lambda: len(sub.telemetry()) == 5)  # 171 inputs in windows of 40
        windows = sorted(sub.telemetry(), key=lambda m: m["seq"])
        for w in windows:
            jsonschema.validate(w, SCHEMA)
        assert [w["seq"] for w in windows] == [0, 1, 2, 3, 4]
        assert [w["count"] for w in windows] == [40, 40, 40, 40, 11]
        assert windows[0]["model"]["artifact"] == "model.int8.tflite"
        statuses = [m for t, m in sub.messages if t == "edgeops/lab/dev-1/status"]
        for s in statuses:
            jsonschema.validate(s, SCHEMA)
        assert statuses[0]["online"] is True and statuses[-1]["online"] is False
        assert statuses[0]["platform"]["machine"]
    finally:
        sub.close()


@pytest.mark.slow
def test_a_broker_outage_loses_no_window(mosquitto, bc_mlp_bundle, bc_inputs, tmp_path):
    sub = Collector(mosquitto.port)
    state = tmp_path / "state"
    # no monitor here to confirm windows: the broker's acknowledgement is what empties the spool
    agent = subprocess.Popen(agent_cmd(bc_mlp_bundle, mosquitto, bc_inputs, state, "--loop", "--rate", 400,
                                       "--window-size", 20, "--duration", 7, "--confirm", "broker"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sub.wait_for(lambda: len(sub.telemetry()) >= 5)
        mosquitto.kill()           # the broker dies (SIGKILL) for a while ...
        time.sleep(2.5)
        mosquitto.start()          # ... and comes back on the same port
        out, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err
        assert "lost broker" in err and "reconnected" in err
        # ~7 s at 400/s in windows of 20: every sequence number arrives at least once
        last = max(sub.seqs())
        assert sub.wait_for(lambda: sub.seqs() == set(range(last + 1)), timeout=30)
        assert last >= 30
        spool = sqlite3.connect(state / "spool.sqlite")
        assert spool.execute("SELECT COUNT(*) FROM windows").fetchone()[0] == 0
    finally:
        if agent.poll() is None:
            agent.kill()
        sub.close()


@pytest.mark.slow
def test_a_killed_agent_delivers_its_spooled_windows_after_restart(mosquitto, bc_mlp_bundle, bc_inputs, tmp_path):
    state = tmp_path / "state"
    mosquitto.stop()  # no broker: every window stays in the spool
    agent = subprocess.Popen(agent_cmd(bc_mlp_bundle, mosquitto, bc_inputs, state, "--loop", "--rate", 500,
                                       "--window-size", 25), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    def spooled_count():
        try:
            with sqlite3.connect(state / "spool.sqlite") as conn:
                return conn.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        except sqlite3.OperationalError:      # not created yet
            return 0

    assert eventually(lambda: spooled_count() >= 5, 60)
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=10)
    spool = sqlite3.connect(state / "spool.sqlite")
    spooled = [r[0] for r in spool.execute("SELECT seq FROM windows ORDER BY seq")]
    spool.close()
    assert len(spooled) >= 5 and spooled == list(range(len(spooled)))

    mosquitto.start()
    sub = Collector(mosquitto.port)
    try:
        res = subprocess.run(agent_cmd(bc_mlp_bundle, mosquitto, bc_inputs, state, "--window-size", 25,
                                       "--max-inferences", 50), capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "unsent windows in the spool" in res.stderr
        expected = set(range(len(spooled) + 2))  # the old windows, then this run's two
        assert sub.wait_for(lambda: sub.seqs() >= expected, timeout=30)
        telemetry = sub.telemetry()
        first_delivery = [m["seq"] for m in telemetry]
        assert first_delivery[: len(spooled)] == spooled  # in order
    finally:
        sub.close()


def test_malformed_stdin_lines_are_counted_and_the_agent_keeps_going(mosquitto, bc_rf_bundle, tmp_path):
    good = json.dumps([1.0] * 30)
    lines = [good, "not json", json.dumps({"x": [1.0] * 29}), json.dumps({"y": 1}), good, json.dumps(["a"] * 30), good]
    sub = Collector(mosquitto.port)
    try:
        res = subprocess.run(agent_cmd(bc_rf_bundle, mosquitto, "-", tmp_path / "s", "--window-size", 100),
                             input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert "bad input" in res.stderr and "Traceback" not in res.stderr
        assert sub.wait_for(lambda: len(sub.telemetry()) == 1)
        (w,) = sub.telemetry()
        assert w["count"] == 7 and w["rejected"] == 4
        assert sum(w["predictions"]["counts"]) == 3
    finally:
        sub.close()


def test_sigterm_while_the_agent_waits_on_stdin_stops_it_and_sends_the_partial_window(mosquitto, bc_rf_bundle,
                                                                                      tmp_path):
    """The run loop blocked reading an input that never comes (stdin left open): SIGTERM leaves the read,
    the open window is closed and sent, and the agent ends cleanly, not by its stop guard. The full window
    before it (closed at its third input, not yet collected: the run loop collects every 0.1 s, and the
    four inputs came within that) used to be lost here: the stop spooled only the open one."""
    from devtools.brokers import free_port

    port = free_port()

    def inferences() -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return -1
        return next((int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                     if line.startswith("edgeops_agent_inferences_total ")), -1)

    with stdin_agent(bc_rf_bundle, mosquitto, tmp_path / "s", "--window-size", 3, "--http", f"127.0.0.1:{port}",
                     rows=4) as (agent, sub):
        assert eventually(lambda: inferences() == 4, 60)
        agent.send_signal(signal.SIGTERM)                          # blocked reading the fifth line now
        agent.wait(timeout=30)
        err = agent.stderr.read()
        assert agent.returncode == 0, err[-3000:]
        assert "4 inferences, 0 bad inputs" in err, err[-3000:]
        assert sub.wait_for(lambda: len(sub.telemetry()) == 2), ([w["count"] for w in sub.telemetry()], err[-3000:])
        assert [w["count"] for w in sub.telemetry()] == [3, 1]


def test_a_window_closes_on_time_while_no_input_comes(mosquitto, bc_rf_bundle, tmp_path):
    """Inputs that stop coming (stdin left open, a quiet sensor): the window still closes after
    --window-seconds and goes out, instead of waiting in memory for the next input (and dying with a power
    cut meanwhile)."""
    with stdin_agent(bc_rf_bundle, mosquitto, tmp_path / "s", "--window-seconds", 1, rows=2) as (agent, sub):
        assert sub.wait_for(lambda: len(sub.telemetry()) == 1), "no window while stdin stays open"
        assert sub.telemetry()[0]["count"] == 2
        agent.stdin.write(json.dumps([2.0] * 30) + "\n")       # and the agent still reads what comes next
        agent.stdin.close()
        agent.wait(timeout=60)
        err = agent.stderr.read()
        assert agent.returncode == 0, err[-3000:]
        assert sub.wait_for(lambda: len(sub.telemetry()) == 2)
        assert [w["count"] for w in sub.telemetry()] == [2, 1]


def test_bad_device_id_and_broker_url_are_one_line_errors(bc_rf_bundle, tmp_path):
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", "a/b",
                          "--broker", "mqtt://127.0.0.1:1", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "device id 'a/b'" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", "d",
                          "--broker", "http://x", "--state-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and "mqtt://" in res.stderr


def test_an_agent_reads_a_folder_of_images(mosquitto, digits_cnn_bundle, reference_data, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    data = reference_data["digits"]
    for i in range(6):
        pixels = (data.X_test[i].reshape(8, 8) / 16.0 * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"{i:02d}.png")
    (folder / "README.txt").write_text("not an image")
    sub = Collector(mosquitto.port)
    try:
        res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(digits_cnn_bundle), "--device-id", "cam-1",
                              "--broker", mosquitto.url, "--input", str(folder), "--window-size", "6",
                              "--state-dir", str(tmp_path / "s")], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        assert sub.wait_for(lambda: len(sub.telemetry()) == 1)
        (w,) = sub.telemetry()
        assert w["count"] == 6 and w["rejected"] == 0
        expected = np.bincount(data.y_test[:6], minlength=10)
        assert w["predictions"]["counts"] == expected.tolist()
    finally:
        sub.close()


@pytest.mark.slow
@pytest.mark.parametrize("run", range(6))
def test_sigterm_sends_the_partial_window_and_loses_no_inference(mosquitto, bc_mlp_bundle, bc_inputs, tmp_path, run):
    """A stop at any moment: the agent finishes its inference, closes, spools and sends the open window."""
    from sqlalchemy import func, select

    from edge_runtime.mqtt import parse_broker_url
    from helpers import eventually
    from telemetry import store
    from telemetry.monitor import FleetMonitor

    monitor = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/m.db", fleet="lab").start()
    agent = subprocess.Popen(agent_cmd(bc_mlp_bundle, mosquitto, bc_inputs, tmp_path / "s", "--loop", "--rate", 400,
                                       "--window-size", 7), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert eventually(lambda: monitor.stats.stored >= 3 + run, 60)
        time.sleep(0.013 * run)   # vary the moment of the signal within an inference cycle; not a wait for an event
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=60)
        assert agent.returncode == 0, err.decode()[-2000:]
        line = [ln for ln in err.decode().splitlines() if " inferences, " in ln][-1]
        done = int(line.split(" inferences, ")[0].rsplit(" ", 1)[1])
        bad = int(line.split(" inferences, ")[1].split(" ")[0])

        def stored_count():
            with monitor.engine.connect() as conn:
                return conn.execute(select(func.sum(store.windows.c.count))).scalar()

        assert eventually(lambda: stored_count() == done + bad, 30), (stored_count(), done, bad)
        assert "windows left in the spool" in line and line.endswith(" 0 windows left in the spool")
    finally:
        agent.kill()
        monitor.stop()
