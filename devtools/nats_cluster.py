"""A 3-node NATS cluster with JetStream and MQTT on every node, on loopback ports of its own."""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from pathlib import Path

from devtools.brokers import free_port


def _wait_for(predicate, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; whether it became true."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


def find_nats() -> str | None:
    return shutil.which("nats-server") or next((p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server")
                                                if Path(p).exists()), None)


class NatsCluster:
    """``n`` nats-server processes clustered together; each speaks MQTT 3.1.1 on its own port, and the
    MQTT sessions, retained and QoS 1 messages live in JetStream streams replicated on every node.
    ``n=1`` is a single standalone server."""

    def __init__(self, workdir: Path, n: int = 3):
        self.binary = find_nats()
        self.workdir = workdir
        self.ports = [{k: free_port() for k in ("client", "cluster", "mqtt", "http")} for _ in range(n)]
        self.procs: list[subprocess.Popen | None] = [None] * n

    def _config(self, i: int) -> Path:
        p = self.ports[i]
        routes = ", ".join(f"nats-route://127.0.0.1:{q['cluster']}" for q in self.ports)
        conf = self.workdir / f"n{i}.conf"
        conf.write_text(
            f"server_name: n{i}\nlisten: 127.0.0.1:{p['client']}\nhttp: 127.0.0.1:{p['http']}\n"
            f"jetstream {{ store_dir: {self.workdir / f's{i}'} }}\n"
            # one node: a standalone server (a cluster of one would wait for routes forever)
            + (f"cluster {{ name: edgeops, listen: 127.0.0.1:{p['cluster']}, routes: [{routes}] }}\n"
               if len(self.ports) > 1 else "")
            + f"mqtt {{ listen: 127.0.0.1:{p['mqtt']}, stream_replicas: {len(self.ports)}, "
            f"consumer_replicas: {len(self.ports)} }}\n")
        return conf

    def start(self) -> "NatsCluster":
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(len(self.ports)):
            self.start_node(i)
        assert self.wait_ready(), f"the NATS cluster did not serve MQTT in time: {self.log_tail()}"
        return self

    def start_node(self, i: int) -> None:
        log = open(self.workdir / f"n{i}.log", "ab")
        self.procs[i] = subprocess.Popen([self.binary, "-c", str(self._config(i))], stdout=log, stderr=log)

    def kill_node(self, i: int) -> None:
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        self.procs[i] = None

    def url(self, *nodes: int) -> str:
        """MQTT URLs of the given nodes (all by default), for a client that fails over between them."""
        return ",".join(f"mqtt://127.0.0.1:{self.ports[i]['mqtt']}?protocol=3.1.1"
                        for i in (nodes or range(len(self.ports))))

    def nats_url(self, *nodes: int) -> str:
        """NATS client URLs of the given nodes (all by default): a native (JetStream) client's failover list."""
        return ",".join(f"nats://127.0.0.1:{self.ports[i]['client']}" for i in (nodes or range(len(self.ports))))

    def wait_ready(self, timeout: float = 60) -> bool:
        """A QoS 1 message published on one node reaches a subscriber on another (JetStream is up)."""
        import paho.mqtt.client as mqtt

        topic = f"edgeops-probe/{uuid.uuid4().hex[:8]}"

        def probe() -> bool:
            got, subscribed = [], threading.Event()
            sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
            sub.on_message = lambda c, u, m: got.append(m.payload)
            sub.on_subscribe = lambda *a: subscribed.set()
            try:
                sub.connect("127.0.0.1", self.ports[0]["mqtt"])
                sub.loop_start()
                sub.subscribe(topic, 1)
                pub.connect("127.0.0.1", self.ports[-1]["mqtt"])
                pub.loop_start()
                if not subscribed.wait(5):
                    return False
                pub.publish(topic, b"x", qos=1).wait_for_publish(5)
                return _wait_for(lambda: bool(got), 3)
            except (OSError, RuntimeError, ValueError):
                return False
            finally:
                for c in (sub, pub):
                    c.loop_stop()
                    c.disconnect()

        return _wait_for(probe, timeout, 0.5)

    def log_tail(self) -> str:
        return " | ".join((self.workdir / f"n{i}.log").read_text(errors="replace")[-300:]
                          for i in range(len(self.ports)) if (self.workdir / f"n{i}.log").exists())

    def stop(self) -> None:
        for i in range(len(self.ports)):
            proc = self.procs[i]
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(self.workdir, ignore_errors=True)
