"""A private Mosquitto broker on a free loopback port, for tests, emulated fleets and the demo.

Mosquitto's default ``max_queued_messages`` (1000) silently drops QoS 1
messages for a slow or offline subscriber while the publisher still gets its
PUBACK, so every broker started here raises it (and ``max_queued_bytes``)
unless a caller asks for the defaults on purpose.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from edge_runtime.errors import EdgeOpsError

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerUnavailable(EdgeOpsError, RuntimeError):
    """No broker is installed, or it would not start (exit status 1, like a missing inference backend)."""

    exit_code = 1


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary (it is usually not on an ordinary user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _BrokerProcess:
    """What both private brokers share: a child process to stop gently, kill, restart, use as a context."""

    stop_signal = signal.SIGTERM
    proc: subprocess.Popen | None
    workdir: Path
    _own_workdir: bool

    name = "broker"

    def _place(self, host: str, port: int | None, workdir: str | Path | None) -> None:
        """Host, port (a free one by default) and working folder (a temporary one by default)."""
        self.host = host
        self.port = port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"edgeops-{self.name}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def _wait_listening(self, deadline: float, exit_detail) -> None:
        """Wait until the process accepts TCP connections; BrokerUnavailable if it exits or the deadline passes."""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerUnavailable(f"{self.name} exited with {self.proc.returncode}: {exit_detail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.kill()
        raise BrokerUnavailable(f"{self.name} did not listen on {self.host}:{self.port} in time")

    def start(self, timeout: float = 10.0) -> "_BrokerProcess":
        raise NotImplementedError

    def _closed(self) -> None:
        """Called once the process is gone."""

    def stop(self) -> None:
        """Stop gracefully (Mosquitto writes its persistence file on SIGTERM; amqtt shuts down on SIGINT)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self._closed()

    def kill(self) -> None:
        """Kill at once (SIGKILL), like a crash or a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        self._closed()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)


class MosquittoBroker(_BrokerProcess):
    """A mosquitto process with its own config, port and persistence folder.

    Use as a context manager; ``kill()``/``start()`` simulate an outage, and
    with ``persistence=True`` sessions and queued messages survive it.

    Args:
        port: TCP port (a free one by default).
        persistence: keep sessions across restarts.
        default_queue_limits: keep Mosquitto's lossy default queue limits (for the test that shows the loss).
        extra_config: more mosquitto.conf lines (listeners, ACLs, TLS).
        workdir: folder for config, persistence and log (a temporary one by default).
    """

    name = "mosquitto"

    def __init__(
        self,
        port: int | None = None,
        persistence: bool = True,
        default_queue_limits: bool = False,
        extra_config: str = "",
        workdir: str | Path | None = None,
        host: str = "127.0.0.1",
        listener: bool = True,
    ) -> None:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerUnavailable("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self._place(host, port, workdir)
        self.log_path = self.workdir / "mosquitto.log"
        lines = []
        if listener:
            lines += [f"listener {self.port} {host}", "allow_anonymous true"]
        lines += [
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "max_inflight_messages 100",
        ]
        if os.geteuid() == 0:
            # Started as root, mosquitto switches to user 'mosquitto', which cannot write our folder.
            lines.insert(0, "user root")
        if persistence:
            lines += ["persistence true", f"persistence_location {self.workdir}/", "autosave_interval 1"]
        if not default_queue_limits:
            lines += ["max_queued_messages 1000000", "max_queued_bytes 1073741824"]
        if extra_config:
            lines.append(extra_config)
        self.config_path = self.workdir / "mosquitto.conf"
        self.config_path.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        """Start the broker and wait until it accepts TCP connections."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

        def detail() -> str:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
            return f"{err.strip()} {log.strip()}"

        self._wait_listening(time.monotonic() + timeout, detail)
        return self


class AmqttBroker(_BrokerProcess):
    """The pure-Python amqtt broker (MQTT 3.1.1) in a child process, for machines without Mosquitto.

    Same interface as :class:`MosquittoBroker`. Its ``url`` carries ``?protocol=3.1.1`` so that
    every edgeops client (agents, monitor, flasher) speaks 3.1.1 to it: non-clean sessions that the
    broker keeps in memory, retained messages and last wills work; MQTT 5 shared subscriptions (a
    monitor's ``--share``) do not, and sessions do not survive a restart of the broker.
    :meth:`start` checks with paho-mqtt that a QoS 1 publish reaches a subscriber before it returns.
    """

    def __init__(self, port: int | None = None, workdir: str | Path | None = None, host: str = "127.0.0.1") -> None:
        try:
            import amqtt  # noqa: F401 - only to say clearly when it is missing
        except ImportError:
            raise BrokerUnavailable(
                "amqtt is not installed (pip install 'edgeops[all]' or pip install amqtt)") from None
        self._place(host, port, workdir)
        self.log_path = self.workdir / "amqtt.log"
        self.config_path = self.workdir / "amqtt.yaml"
        # plugins: anonymous access only (amqtt's default set adds packet logging and $SYS, neither needed)
        self.config_path.write_text(
            "listeners:\n  default:\n    type: tcp\n"
            f"    bind: {host}:{self.port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n")
        self.proc: subprocess.Popen | None = None
        self._log = None

    name = "amqtt"
    stop_signal = signal.SIGINT     # amqtt shuts down cleanly on KeyboardInterrupt

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    def start(self, timeout: float = 20.0) -> "AmqttBroker":
        """Start the broker, wait for its port and check a QoS 1 round trip with paho-mqtt."""
        from devices.children import python_command

        if self.proc is not None and self.proc.poll() is None:
            return self
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            python_command(["-c", "from amqtt.scripts.broker_script import main; main()", "-c", str(self.config_path)]),
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        self._wait_listening(deadline, lambda: self.log_path.read_text(errors="replace")[-2000:].strip())
        problem = check_broker(self.url, timeout=max(1.0, deadline - time.monotonic()))
        if problem:
            self.kill()
            raise BrokerUnavailable(f"amqtt on port {self.port} does not work with paho-mqtt: {problem}")
        return self

    def _closed(self) -> None:
        if self._log:
            self._log.close()
            self._log = None


def check_broker(url: str, timeout: float = 5.0) -> str | None:
    """None when a paho-mqtt 2.x client can connect to ``url``, subscribe, and get its own QoS 1 publish back
    (retained, so the broker's retained store is exercised too); otherwise what went wrong."""
    import threading
    import uuid

    import paho.mqtt.client as mqtt

    from edge_runtime.mqtt import parse_broker_url

    address = parse_broker_url(url)
    got, connected = threading.Event(), threading.Event()
    failure: list[str] = []
    topic = f"edgeops/_check/{uuid.uuid4().hex[:8]}"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"edgeops-check-{uuid.uuid4().hex[:8]}",
                         protocol=address.paho_protocol())

    def on_connect(c, userdata, flags, rc, properties):
        if rc.is_failure:
            failure.append(f"connection refused: {rc}")
        connected.set()

    def on_message(c, userdata, msg):
        if msg.topic == topic and msg.payload == b"ping":
            got.set()

    client.on_connect, client.on_message = on_connect, on_message
    try:
        client.connect(address.host, address.port, keepalive=10)
    except OSError as exc:
        return f"cannot connect: {exc}"
    client.loop_start()
    try:
        if not connected.wait(timeout) or failure:
            return failure[0] if failure else "no CONNACK"
        client.publish(topic, b"ping", qos=1, retain=True).wait_for_publish(timeout)
        client.subscribe(topic, qos=1)
        if not got.wait(timeout):
            return "a retained QoS 1 message did not come back"
        client.publish(topic, b"", qos=1, retain=True).wait_for_publish(timeout)   # clear the retained message
        return None
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    finally:
        client.disconnect()
        client.loop_stop()


def start_broker(workdir: str | Path | None = None, prefer: str = "auto") -> MosquittoBroker | AmqttBroker:
    """A private broker: Mosquitto when installed (``auto``/``mosquitto``), else the pure-Python amqtt."""
    if prefer not in ("auto", "mosquitto", "amqtt"):
        raise ValueError(f"broker kind must be auto, mosquitto or amqtt, not {prefer!r}")
    if prefer in ("auto", "mosquitto"):
        try:
            return MosquittoBroker(workdir=Path(workdir) / "mosquitto" if workdir else None).start()
        except BrokerUnavailable:
            if prefer == "mosquitto":
                raise
    return AmqttBroker(workdir=Path(workdir) / "amqtt" if workdir else None).start()
