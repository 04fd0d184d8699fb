"""The agent's publisher: spooled windows and command results out over the MQTT link.

A thread steps :class:`~edge_runtime.delivery.WindowDelivery` (new windows out, PUBACKs and the monitor's
confirmations in, overdue windows resent, everything unconfirmed again after a reconnect) and publishes
the results of commands. At a stop, :meth:`Publisher.drain` waits a bounded time for what is spooled to be
confirmed (sending it meanwhile, the backlog included), and :meth:`Publisher.stop` ends the thread.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass

from edge_runtime import wire
from edge_runtime.delivery import WindowDelivery

log = logging.getLogger("edgeops.agent")

OFFLINE_GRACE_S = 5.0   # at a stop, how long a broker that is not there gets to come back


@dataclass(frozen=True)
class Topics:
    """A device's MQTT topics: ``<prefix>/<fleet>/<device_id>/<kind>``."""

    telemetry: str
    status: str
    cmd: str
    result: str
    ack: str
    labels: str
    predictions: str

    @classmethod
    def of(cls, prefix: str, fleet: str, device_id: str) -> "Topics":
        def topic(kind: str) -> str:
            return wire.topic(prefix, fleet, device_id, kind)

        return cls(topic("telemetry"), topic("status"), topic(wire.CMD), topic(wire.CMD_RESULT), topic(wire.ACK),
                   topic(wire.LABELS), topic(wire.PREDICTIONS))


class Publisher:
    """Publishes the spool through ``delivery`` and command results on ``result_topic``, from its own thread.

    Args:
        delivery: the spool, the link and how windows are confirmed.
        topics: the device's topics (results go to ``topics.result``, confirmations come on ``topics.ack``).
    """

    POLL_S = 0.02

    def __init__(self, delivery: WindowDelivery, topics: Topics):
        self.delivery = delivery
        self.spool, self.link = delivery.spool, delivery.link
        self.topics = topics
        self._results: queue.Queue[bytes] = queue.Queue()
        self._reconnected = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="edgeops-publisher", daemon=True)

    # -- from the link's network thread ---------------------------------------------------------

    def on_ack(self, mid: int, ok: bool) -> None:
        """The broker acknowledged (or refused) publish ``mid``."""
        self.delivery.pubacks.put((mid, ok))

    def connected(self) -> None:
        """The link (re)connected: everything unconfirmed goes out again."""
        self._reconnected.set()

    def subscriptions(self) -> list[tuple[str, int]]:
        """What the publisher listens to: the monitor's confirmations (unless the broker's PUBACK confirms)."""
        return [(self.topics.ack, 1)] if self.delivery.confirm == "monitor" else []

    def take_ack(self, payload: bytes) -> None:
        """A confirmation from the monitor: the windows it names leave the spool."""
        try:
            self.delivery.confirmations.put(wire.parse_ack(payload))
        except wire.Rejected as rej:
            log.warning("ignored a malformed ack (%s); unconfirmed windows are resent", rej)

    # -- from the agent -------------------------------------------------------------------------

    def send_result(self, doc: dict) -> None:
        """Queue a command result (published in order, when connected)."""
        self._results.put(json.dumps(doc, separators=(",", ":")).encode())

    def start(self) -> None:
        self._thread.start()

    @property
    def idle(self) -> bool:
        """Nothing left to wait for: every window settled (see WindowDelivery.settled) and every result sent."""
        return self.delivery.settled() and self._results.empty()

    def drain(self, timeout: float) -> None:
        """Send the spool and wait up to ``timeout`` seconds for its confirmations (or the broker's
        acknowledgements, without a monitor in sight); a broker that is not there gets a few seconds to come
        back (a short run may stop before it connected).

        While connected, the thread keeps publishing what is spooled, windows of earlier runs included, and
        once a monitor confirms anything, the unconfirmed windows already sent go out again at once (see
        WindowDelivery.drain); that monitor is waited for until the spool is empty or the time is up.
        Without a monitor in sight (nothing confirmed in this run, not even within
        WindowDelivery.CONFIRM_GRACE of the broker's last acknowledgement) the drain ends once the broker
        has acknowledged every window."""
        self.delivery.drain()
        now = time.monotonic()
        deadline, offline_deadline = now + timeout, now + min(timeout, OFFLINE_GRACE_S)
        while not self.idle and time.monotonic() < deadline:
            if not self.link.connected.is_set() and time.monotonic() > offline_deadline:
                break
            time.sleep(0.05)

    def stop(self, timeout: float = 5.0) -> None:
        """End the thread (it first sends what is in flight while connected); wait at most ``timeout``."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)

    # -- the thread -----------------------------------------------------------------------------

    def _running(self) -> bool:
        return not self._stop.is_set() or bool(self.delivery.inflight and self.link.connected.is_set())

    def _loop(self) -> None:
        while self._running():
            self._step()
            if self._stop.is_set() and not len(self.spool):
                break
            time.sleep(self.POLL_S)

    def _step(self) -> None:
        if self._reconnected.is_set():
            self._reconnected.clear()
            self.delivery.reconnected()
        self._send_results()
        self.delivery.step()

    def _send_results(self) -> None:
        while self.link.connected.is_set() and not self._results.empty():
            if self.link.publish(self.topics.result, self._results.get_nowait(), qos=1) is None:
                break
