"""systemd's notify protocol and a liveness heartbeat for the device agent, with no dependency.

Under a unit with ``Type=notify`` and ``WatchdogSec=``, systemd sets ``$NOTIFY_SOCKET`` and
``$WATCHDOG_USEC``: the agent sends ``READY=1`` once it runs, ``WATCHDOG=1`` while its run loop makes
progress, and ``STOPPING=1`` when it stops. In a container, ``$EDGEOPS_HEARTBEAT_FILE`` names a file
touched on the same beat; ``python -m edge_runtime.sdnotify check FILE [MAX_AGE]`` is the health check.
Without either variable everything here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from typing import Callable, Hashable

log = logging.getLogger(__name__)


def notify(state: str) -> bool:
    """Send ``state`` (e.g. ``READY=1``) to ``$NOTIFY_SOCKET``; False when there is none or it fails."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # an abstract socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(state.encode())
        return True
    except OSError as exc:
        log.debug("sd_notify %s failed: %s", state, exc)
        return False


def watchdog_seconds() -> float | None:
    """systemd's watchdog period for this process (``$WATCHDOG_USEC``), or None."""
    usec, pid = os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 1e6 or None
    except ValueError:
        return None


def _touch(path: str) -> None:
    """Create the file or update its modification time (a failure is logged)."""
    try:
        with open(path, "a"):
            os.utime(path)
    except OSError as exc:
        log.warning("heartbeat file %s: %s", path, exc)


class Watchdog(threading.Thread):
    """Pings systemd's watchdog and touches the heartbeat file while ``progress()`` keeps changing.

    ``progress()`` returns a value that changes as work is done (a counter), or None when idle by
    design (waiting for input). When it has not changed for ``stall_after`` seconds, the beat stops:
    systemd then restarts the service and a container turns unhealthy.
    """

    def __init__(self, progress: Callable[[], Hashable | None], stall_after: float = 60.0,
                 heartbeat_file: str | None = None) -> None:
        super().__init__(name="edgeops-watchdog", daemon=True)
        period = watchdog_seconds()
        self.heartbeat_file = heartbeat_file or os.environ.get("EDGEOPS_HEARTBEAT_FILE") or None
        self.interval = min(period / 2 if period else 10.0, 10.0)
        self.stall_after = stall_after
        self.enabled = bool(period or self.heartbeat_file)
        self._progress = progress
        self._done = threading.Event()

    def beat(self) -> None:
        notify("WATCHDOG=1")
        if self.heartbeat_file:
            _touch(self.heartbeat_file)

    def run(self) -> None:
        last, since, stalled = object(), time.monotonic(), False
        while not self._done.is_set():
            now, value = time.monotonic(), self._progress()
            if value is None or value != last:
                last, since = value, now
            if now - since <= self.stall_after:
                stalled = False
                self.beat()
            elif not stalled:
                stalled = True
                log.error("no progress for %.0f s: watchdog beat stopped", now - since)
            self._done.wait(self.interval)

    def start(self) -> "Watchdog":
        if self.enabled:
            super().start()
        return self

    def stop(self) -> None:
        self._done.set()


def check(path: str, max_age: float = 60.0) -> int:
    """0 when ``path`` was touched within ``max_age`` seconds, else 1 (a container health check)."""
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    if age > max_age:
        print(f"unhealthy: no heartbeat for {age:.0f} s", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) in (3, 4) and sys.argv[1] == "check":
        sys.exit(check(sys.argv[2], float(sys.argv[3]) if len(sys.argv) == 4 else 60.0))
    print("usage: python -m edge_runtime.sdnotify check FILE [MAX_AGE_SECONDS]", file=sys.stderr)
    sys.exit(2)
