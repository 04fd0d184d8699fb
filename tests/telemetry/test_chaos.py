"""Chaos: crashes and partitions at every step of the delivery path lose no window and count none twice.

Each test runs real agents (``edgeops run``), a real monitor (``edgeops monitor``) and a real
Mosquitto, breaks something, and then compares the windows in the monitor's database with the
agents' own counters (the sequence numbers their spools handed out).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from devtools.brokers import MosquittoBroker, free_port
from helpers import eventually

pytestmark = [pytest.mark.slow, pytest.mark.chaos]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, reference_data):
    path = tmp_path_factory.mktemp("chaos-inputs") / "bc.npy"
    np.save(path, reference_data["breast_cancer"].X_test)
    return path


def default_autosave_broker(workdir: Path, port: int | None = None) -> MosquittoBroker:
    """Mosquitto as installed: persistence on, but saved only every autosave_interval (1800 s by default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    return MosquittoBroker(port=port, persistence=False, workdir=workdir,
                           extra_config=f"persistence true\npersistence_location {workdir}/")


class Monitor:
    """``edgeops monitor`` in a child process, killable."""

    def __init__(self, broker_url: str, db: Path, log: Path):
        self.args = [sys.executable, "-m", "edgeops", "monitor", "--broker", broker_url, "--db", f"sqlite:///{db}",
                     "--fleet", "chaos"]
        self.db, self.log, self.proc = db, log, None

    def start(self) -> "Monitor":
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        return self

    def wait_connected(self, timeout: float = 60) -> bool:
        """The monitor has subscribed (its log says it connected): windows sent from now on reach it."""
        return bool(eventually(lambda: "monitor connected" in self.log.read_text(errors="replace"), timeout))

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def seqs(self, device: str) -> list[int]:
        if not self.db.exists():
            return []
        try:
            with sqlite3.connect(self.db, timeout=10) as conn:
                return [r[0] for r in conn.execute(
                    "select seq from edgeops_windows where device_id = ? order by seq", (device,))]
        except sqlite3.OperationalError:      # the monitor has not created its tables yet
            return []


def agent(bundle, broker_url, inputs, state, device, *extra) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", device, "--fleet", "chaos",
           "--broker", broker_url, "--input", str(inputs), "--state-dir", str(state), "--loop",
           "--window-size", "10", "--resend-after", "2", *map(str, extra)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(Path(state).with_suffix(".log"), "ab"))


def report(**figures) -> None:
    """Append this case's figures to $EDGEOPS_CHAOS_REPORT (JSON lines) when set."""
    path = os.environ.get("EDGEOPS_CHAOS_REPORT")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], **figures}) + "\n")


def handed_out(state: Path) -> int:
    """How many windows the agent's spool ever numbered (its own counter)."""
    with sqlite3.connect(state / "spool.sqlite") as conn:
        return conn.execute("select value from meta where key = 'next_seq'").fetchone()[0]


def unconfirmed(state: Path) -> int:
    try:
        with sqlite3.connect(state / "spool.sqlite") as conn:
            return conn.execute("select count(*) from windows").fetchone()[0]
    except sqlite3.OperationalError:      # the agent has not created its spool's tables yet
        return 0


def assert_exactly_once(monitor: Monitor, device: str, state: Path, timeout: float = 60) -> int:
    n = handed_out(state)
    assert n > 0
    got = eventually(lambda: monitor.seqs(device) == list(range(n)), timeout)
    seqs = monitor.seqs(device)
    lost = sorted(set(range(n)) - set(seqs))
    report(device=device, sent=n, stored=len(set(seqs)), lost=len(lost), duplicated=len(seqs) - len(set(seqs)))
    assert got, f"{len(lost)} of {n} windows lost (first {lost[:10]}), {len(seqs) - len(set(seqs))} duplicated"
    return n


def test_broker_and_monitor_killed_together_on_the_default_autosave_lose_no_window(tmp_path, bc_mlp_bundle, inputs):
    """The broker acknowledged windows it had not saved; the agents still hold them until the monitor confirms."""
    broker = default_autosave_broker(tmp_path / "broker").start()
    monitor = Monitor(broker.url, tmp_path / "m.db", tmp_path / "monitor.log").start()
    states = [tmp_path / f"dev-{i}" for i in range(2)]
    agents = [agent(bc_mlp_bundle, broker.url, inputs, s, s.name, "--rate", 300, "--duration", 25) for s in states]
    try:
        assert eventually(lambda: len(monitor.seqs("dev-0")) >= 60, 60), "the monitor stored nothing"
        broker.kill()
        monitor.kill()
        broker.start()
        monitor.start()
        for a in agents:
            assert a.wait(timeout=120) == 0
        total = sum(assert_exactly_once(monitor, s.name, s) for s in states)
        assert total >= 200
    finally:
        for a in agents:
            a.kill()
        monitor.stop()
        broker.stop()


@pytest.mark.parametrize("confirm", ["monitor", "broker"])
def test_a_broker_killed_with_a_backlog_loses_no_window(tmp_path, bc_mlp_bundle, inputs, confirm):
    """Windows pile up at the broker while no monitor runs; then the broker dies before its autosave.

    With ``--confirm broker`` (a window leaves the spool at the broker's PUBACK) the backlog is lost:
    kept here so nobody trusts a broker's acknowledgement again."""
    broker = default_autosave_broker(tmp_path / "broker").start()
    monitor = Monitor(broker.url, tmp_path / "m.db", tmp_path / "monitor.log").start()
    state = tmp_path / "dev-b"
    a = agent(bc_mlp_bundle, broker.url, inputs, state, "dev-b", "--rate", 300, "--duration", 20,
              "--confirm", confirm)
    try:
        assert eventually(lambda: len(monitor.seqs("dev-b")) >= 20, 60)
        monitor.kill()                                    # a backlog builds up at the broker
        assert eventually(lambda: handed_out(state) >= len(monitor.seqs("dev-b")) + 100, 60)
        broker.kill()
        broker.start()
        monitor.start()
        assert a.wait(timeout=120) == 0
        if confirm == "broker":
            n = handed_out(state)
            assert eventually(lambda: monitor.seqs("dev-b")[-1:] == [n - 1], 60)
            stored = monitor.seqs("dev-b")
            report(device="dev-b", sent=n, stored=len(set(stored)), lost=n - len(set(stored)),
                   duplicated=len(stored) - len(set(stored)))
            assert len(stored) <= n - 50, "the broker's PUBACK lost nothing this time"
            return
        assert_exactly_once(monitor, "dev-b", state)
    finally:
        a.kill()
        monitor.stop()
        broker.stop()


def test_an_agent_killed_with_a_full_spool_delivers_it_after_restart(tmp_path, bc_mlp_bundle, inputs):
    port = free_port()
    state = tmp_path / "dev-k"
    # no broker yet: every window stays in the spool
    a = agent(bc_mlp_bundle, f"mqtt://127.0.0.1:{port}", inputs, state, "dev-k", "--rate", 500, "--duration", 60)
    assert eventually(lambda: (state / "spool.sqlite").exists() and unconfirmed(state) >= 100, 60)
    a.send_signal(signal.SIGKILL)
    a.wait()
    broker = default_autosave_broker(tmp_path / "broker", port=port).start()
    monitor = Monitor(broker.url, tmp_path / "m.db", tmp_path / "monitor.log").start()
    # a short run: the monitor must be there to confirm before the agent stops (what it does not confirm
    # stays spooled for the next run, which this test does not make)
    assert monitor.wait_connected()
    a = agent(bc_mlp_bundle, broker.url, inputs, state, "dev-k", "--rate", 200, "--duration", 3)
    try:
        assert a.wait(timeout=120) == 0
        assert_exactly_once(monitor, "dev-k", state)
        assert unconfirmed(state) == 0
    finally:
        a.kill()
        monitor.stop()
        broker.stop()


def test_a_monitor_killed_mid_batch_again_and_again_loses_no_window(tmp_path, bc_mlp_bundle, inputs):
    broker = default_autosave_broker(tmp_path / "broker").start()
    monitor = Monitor(broker.url, tmp_path / "m.db", tmp_path / "monitor.log").start()
    state = tmp_path / "dev-m"
    a = agent(bc_mlp_bundle, broker.url, inputs, state, "dev-m", "--rate", 400, "--duration", 20)
    try:
        for round_ in range(3):
            stored = len(monitor.seqs("dev-m"))
            assert eventually(lambda n=stored: len(monitor.seqs("dev-m")) > n + 20, 60), f"round {round_}"
            monitor.kill()
            monitor.start()
        assert a.wait(timeout=120) == 0
        assert_exactly_once(monitor, "dev-m", state)
    finally:
        a.kill()
        monitor.stop()
        broker.stop()


class Partition:
    """A TCP proxy between agents and the broker that can cut the link: while cut, it closes every
    connection and refuses new ones, as a network partition looks to both ends."""

    def __init__(self, target_port: int):
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.cut = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self.cut.is_set():
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def partition(self) -> None:
        self.cut.set()
        with self._lock:
            for s in self._conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._conns.clear()

    def heal(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        self.partition()
        self.server.close()


def test_a_60_second_partition_between_agents_and_broker_loses_no_window(tmp_path, bc_mlp_bundle, inputs):
    broker = default_autosave_broker(tmp_path / "broker").start()
    link = Partition(broker.port)
    monitor = Monitor(broker.url, tmp_path / "m.db", tmp_path / "monitor.log").start()
    state = tmp_path / "dev-p"
    a = agent(bc_mlp_bundle, f"mqtt://127.0.0.1:{link.port}", inputs, state, "dev-p", "--rate", 200,
              "--duration", 80)
    try:
        assert eventually(lambda: len(monitor.seqs("dev-p")) >= 20, 60)
        link.partition()
        cut_at = handed_out(state)
        assert eventually(lambda: handed_out(state) >= cut_at + 60 * 20 - 100, 75)   # a minute of windows
        stored_during = len(monitor.seqs("dev-p"))
        link.heal()
        assert a.wait(timeout=150) == 0
        n = assert_exactly_once(monitor, "dev-p", state)
        assert n - stored_during >= 1000       # most of the stream crossed after the partition healed
    finally:
        a.kill()
        link.close()
        monitor.stop()
        broker.stop()


def test_an_agent_given_two_broker_nodes_fails_over_when_one_dies(tmp_path, bc_mlp_bundle, inputs):
    """Two nodes, one monitor on each writing one database: the first node dies for good, and every window
    reaches the database through the second (resent, since the first node never delivered it)."""
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    a = default_autosave_broker(tmp_path / "a").start()
    b = default_autosave_broker(tmp_path / "b").start()
    db = f"sqlite:///{tmp_path}/m.db"
    monitors = [FleetMonitor(parse_broker_url(x.url), db, fleet="chaos").start() for x in (a, b)]
    state = tmp_path / "dev-f"
    proc = agent(bc_mlp_bundle, f"{a.url},{b.url}", inputs, state, "dev-f", "--rate", 300, "--duration", 15)
    reader = Monitor(a.url, tmp_path / "m.db", tmp_path / "unused.log")      # only to read the database
    try:
        assert eventually(lambda: len(reader.seqs("dev-f")) >= 30, 60)
        a.kill()
        assert proc.wait(timeout=120) == 0
        log = Path(state).with_suffix(".log").read_text()
        assert "trying broker node" in log and f":{b.port}" in log
        assert_exactly_once(reader, "dev-f", state)
    finally:
        proc.kill()
        for m in monitors:
            m.stop()
        a.stop()
        b.stop()


def nats_refusals(workdir: Path) -> str:
    """What the NATS nodes refused their MQTT clients (subscriptions and connections whose JetStream requests
    timed out), the last few lines."""
    lines = [line for log in sorted(workdir.glob("n*.log")) for line in log.read_text(errors="replace").splitlines()
             if "[ERR]" in line and ("subscription" in line or "unable to connect" in line)]
    return " | ".join(line[:300] for line in lines[-8:]) or "none"


def test_a_nats_cluster_node_and_a_monitor_die_and_no_window_is_lost(tmp_path, bc_mlp_bundle, inputs, pg_url):
    """Three NATS nodes (JetStream, MQTT 3.1.1 on each), agents spread over them, two monitors on
    PostgreSQL: the node two agents use is killed, and so is one monitor; every window is stored once."""
    from sqlalchemy import create_engine, text

    from devtools.nats_cluster import NatsCluster, find_nats

    if find_nats() is None:
        assert not os.environ.get("CI"), "nats-server is not installed (.ci/run installs it)"
        pytest.skip("nats-server is not installed")
    cluster = NatsCluster(tmp_path / "nats").start()
    monitors = [subprocess.Popen([sys.executable, "-m", "edgeops", "monitor", "--broker", cluster.url(*order),
                                  "--db", pg_url, "--fleet", "chaos", "--client-id", f"monitor-{k}"],
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"monitor-{k}.log", "ab"))
                for k, order in enumerate(((1, 2), (2, 1)))]
    engine = create_engine(pg_url)

    def seqs(device):
        try:
            with engine.connect() as conn:
                return [r[0] for r in conn.execute(text(
                    "select seq from edgeops_windows where device_id = :d order by seq"), {"d": device})]
        except Exception:  # noqa: BLE001 - tables not created yet
            return []

    states = [tmp_path / f"dev-n{i}" for i in range(3)]
    again: list[subprocess.Popen] = []
    # each agent starts on another node and fails over to the others in turn
    agents = [agent(bc_mlp_bundle, cluster.url(i, (i + 1) % 3, (i + 2) % 3), inputs, s, s.name, "--rate", 200,
                    "--duration", 40) for i, s in enumerate(states)]
    try:
        assert eventually(lambda: all(len(seqs(s.name)) >= 20 for s in states), 90), cluster.log_tail()
        cluster.kill_node(0)            # dev-n0's node
        monitors[0].send_signal(signal.SIGKILL)
        monitors[0].wait()
        for a in agents:
            assert a.wait(timeout=150) == 0
        # a window the monitor had not confirmed when its agent stopped is still in the agent's spool, not
        # lost: the device's next run sends it first, and its stop's drain waits for the monitor to confirm
        # the spool. On a loaded machine the fail-over can outlast the 40 s run: the killed node led the
        # JetStream streams that hold the MQTT sessions, connects time out until new leaders are elected,
        # and the client's reconnect backoff doubles at every failed attempt, whichever node (1, 2, 4, ...
        # 30 s). A subscription NATS refuses meanwhile (a consumer it could not create in time) is not
        # retried by the monitor until it reconnects: one left without its telemetry subscription stores
        # nothing more, and the check below fails, with the nodes' refusals in its message
        left_after_failover = {s.name: unconfirmed(s) for s in states}
        for _ in range(3):
            runs = [agent(bc_mlp_bundle, cluster.url(1, 2), inputs, s, s.name, "--rate", 20, "--duration", 2)
                    for s in states if unconfirmed(s)]
            again += runs
            for a in runs:
                assert a.wait(timeout=150) == 0
        for s in states:
            n = handed_out(s)
            got = eventually(lambda s=s, n=n: seqs(s.name) == list(range(n)), 90)
            stored = seqs(s.name)
            report(device=s.name, sent=n, stored=len(set(stored)), lost=n - len(set(stored) & set(range(n))),
                   duplicated=len(stored) - len(set(stored)), left_after_failover=left_after_failover[s.name],
                   runs_after_failover=len(again))
            assert got, (f"{s.name}: {n - len(set(stored))} of {n} lost, {unconfirmed(s)} still spooled "
                         f"({left_after_failover[s.name]} after the first run); its log: "
                         f"{s.with_suffix('.log').read_text(errors='replace')[-1500:]} | the monitor's: "
                         f"{(tmp_path / 'monitor-1.log').read_text(errors='replace')[-1000:]} | "
                         f"NATS: {nats_refusals(tmp_path / 'nats')}")
    finally:
        for a in agents + again:
            a.kill()
        for m in monitors:
            m.kill()
            m.wait()
        engine.dispose()
        cluster.stop()
