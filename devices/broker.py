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

MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


class BrokerUnavailable(RuntimeError):
    """No mosquitto binary is installed, or it would not start."""


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


class MosquittoBroker:
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
        self.host = host
        self.port = port or free_port(host)
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgeops-mosquitto-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise BrokerUnavailable(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {log.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.01)
        self.kill()
        raise BrokerUnavailable(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM: mosquitto writes its persistence file)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Kill at once (SIGKILL), like a crash or a power cut."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "MosquittoBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
