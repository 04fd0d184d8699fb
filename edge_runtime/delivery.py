"""End-to-end delivery of spooled windows: publish, resend, forget only what is confirmed.

A window leaves the spool when the monitor says it is committed to its
database (an ``ack`` message on ``<prefix>/<fleet>/<device>/ack`` naming
ranges of sequence numbers), not when the broker acknowledges the publish:
a broker holds what it acknowledged in memory until its next autosave, and a
broker crash loses it. Windows without a confirmation are published again
after ``resend_after`` seconds (doubling per attempt up to ``max_resend``),
and all of them after a reconnect; the monitor deduplicates by (device, seq).

With ``confirm="broker"`` the broker's PUBACK is enough (for a deployment
without an edgeops monitor): a broker crash can then lose windows.
"""

from __future__ import annotations

import json
import logging
import queue
import time
import zlib

from edge_runtime import wire
from edge_runtime.spool import WindowSpool

log = logging.getLogger("edgeops.agent")

CONFIRM_MODES = ("monitor", "broker")


class WindowDelivery:
    """Publishes spooled windows and forgets them once confirmed.

    An unconfirmed window is published again ``resend_after`` seconds after its last attempt (doubling
    per attempt), at once after a reconnect, and soon when a newer window of this device is confirmed
    before it (it was lost on the way).

    Args:
        spool: the durable window spool.
        link: the MQTT link (``publish(topic, payload, qos)`` returns a message id or None).
        topic: the telemetry topic.
        confirm: "monitor" (end-to-end, the default) or "broker" (PUBACK).
        compress: zlib-compress each payload (the same as ``encoding="zlib"``).
        encoding: how windows go on the wire: json, zlib, cbor or cbor-exact (edge_runtime.wire.ENCODINGS);
            the spool keeps JSON whatever the encoding.
        resend_after: seconds before an unconfirmed window is published again.
        max_resend: the longest wait between two resends of one window.
        max_inflight: publishes awaiting a PUBACK at most.
    """

    GAP_GRACE = 2.0     # seconds an older window may trail a newer confirmed one before it is resent
    CONFIRM_GRACE = 1.0  # at a stop: how long after the broker's last PUBACK a first confirmation is waited for

    def __init__(self, spool: WindowSpool, link, topic: str, confirm: str = "monitor", compress: bool = False,  # noqa: PLR0913
                 resend_after: float = 30.0, max_resend: float = 600.0, max_inflight: int = 50,
                 encoding: str | None = None):
        if confirm not in CONFIRM_MODES:
            raise ValueError(f"confirm must be one of {CONFIRM_MODES}, not {confirm!r}")
        self.encoding = encoding or ("zlib" if compress else "json")
        if self.encoding not in wire.ENCODINGS:
            raise ValueError(f"encoding must be one of {wire.ENCODINGS}, not {encoding!r}")
        self.spool, self.link, self.topic = spool, link, topic
        self.confirm, self.compress = confirm, self.encoding == "zlib"
        self.resend_after, self.max_resend, self.max_inflight = resend_after, max_resend, max_inflight
        self.pubacks: queue.Queue[tuple[int, bool]] = queue.Queue()
        self.confirmations: queue.Queue[list[tuple[int, int]]] = queue.Queue()
        self._inflight: dict[int, int] = {}                  # mid -> seq, awaiting the broker
        self._sent: dict[int, tuple[float, int]] = {}        # seq -> (last publish, attempts), awaiting the monitor
        self._last_new = -1                                  # highest seq published since the last (re)connect
        self._next_resend_check = 0.0
        self._last_puback = float("-inf")                    # when the broker last acknowledged a window
        self._draining = False                               # a stop is waiting for the spool (see drain)
        self._drain_begun = False                            # ... and the publisher thread took it up
        self.confirmed = 0
        self.resent = 0

    @property
    def monitor_seen(self) -> bool:
        """A monitor has confirmed at least one window of this run."""
        return self.confirmed > 0

    def drain(self) -> None:
        """A stop began and waits for the spool (from any thread; the next :meth:`step` takes it up).

        The spool keeps going out: windows not yet published in this connection (the one the stop closed,
        those of earlier runs) as always, and, once a monitor is in sight, every unconfirmed window at once
        instead of after its resend backoff (which may be longer than the drain): when the drain begins
        if a monitor confirmed windows of this run, and at each confirmation those sent before the window
        it confirms (a broker delivers one client's messages in order: they did not reach the monitor,
        which may have come after them) or GAP_GRACE ago or longer. Without a monitor in sight nothing is
        published twice.
        """
        self._draining = True

    def _begin_drain(self) -> None:
        self._drain_begun = True
        if self.confirm == "monitor" and self.monitor_seen:
            self._hurry()

    def _hurry(self, before: float = float("-inf")) -> None:
        """Make due at once every unconfirmed window last sent before ``before`` or GAP_GRACE ago or longer."""
        now = time.monotonic()
        for seq, (sent_at, attempts) in list(self._sent.items()):
            if sent_at < before or now - sent_at >= self.GAP_GRACE:
                self._sent[seq] = (float("-inf"), attempts)
        self._next_resend_check = 0.0

    def reconnected(self) -> None:
        """After a reconnect everything unconfirmed goes out again, oldest first."""
        self._inflight.clear()
        self._sent.clear()
        self._last_new = -1

    def step(self, now: float | None = None) -> None:
        """Apply PUBACKs and confirmations, then publish new windows and resend overdue ones."""
        now = time.monotonic() if now is None else now
        self._apply_pubacks(now)
        self._apply_confirmations()
        if not self.link.connected.is_set():
            return
        if self._draining and not self._drain_begun:
            self._begin_drain()
        room = self.max_inflight - len(self._inflight)
        if room > 0:
            room -= self._publish(self.spool.peek(limit=room, after=self._last_new), now, new=True)
        if room > 0 and self._resend_check_due(now):
            # more overdue windows than room: look again at the next step, not a second later
            more = self._resend_overdue(now, room)
            self._next_resend_check = now if more else now + 1.0

    def _resend_check_due(self, now: float) -> bool:
        """Whether to look for overdue windows now (a monitor confirms them; at most once a second)."""
        return self.confirm == "monitor" and now >= self._next_resend_check

    def _overdue(self, now: float) -> list[int]:
        """Sequence numbers sent and unconfirmed for longer than their backoff (doubling per attempt), oldest first."""
        return sorted(s for s, (t, n) in self._sent.items()
                      if now - t >= min(self.max_resend, self.resend_after * 2 ** min(n - 1, 10)))

    def _resend_overdue(self, now: float, room: int) -> bool:
        """Publish again up to room overdue windows; forget those no longer spooled. True when more were
        overdue than there was room for."""
        overdue = self._overdue(now)
        due = overdue[:room]
        if not due:
            return False
        rows = self.spool.get(due)
        for gone in set(due) - {s for s, _ in rows}:
            self._sent.pop(gone, None)
        self.resent += self._publish(rows, now, new=False)
        return len(overdue) > room

    def _publish(self, rows: list[tuple[int, bytes]], now: float, new: bool) -> int:
        n = 0
        for seq, payload in rows:
            mid = self.link.publish(self.topic, self._wire_payload(payload), qos=1)
            if mid is None:
                break
            self._inflight[mid] = seq
            attempts = self._sent.get(seq, (0.0, 0))[1] + 1
            self._sent[seq] = (now, attempts)
            if new:
                self._last_new = max(self._last_new, seq)
            n += 1
        return n

    def _wire_payload(self, payload: bytes) -> bytes:
        """A spooled window as it is published: compressed, or in the delivery's encoding."""
        if self.compress:
            return zlib.compress(payload, 6)
        if self.encoding != "json":
            return self._encoded(payload)
        return payload

    def _encoded(self, payload: bytes) -> bytes:
        """A spooled (JSON) window in the delivery's encoding; the JSON itself should the encoder refuse it
        (an integer past 64 bits, say): the monitor reads either, and a window must never stall the spool."""
        try:
            return wire.encode(json.loads(payload), encoding=self.encoding)
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:
            log.warning("window sent as JSON: the %s encoder refused it (%s)", self.encoding, exc)
            return payload

    def _apply_pubacks(self, now: float) -> None:
        while True:
            try:
                mid, ok = self.pubacks.get_nowait()
            except queue.Empty:
                return
            seq = self._inflight.pop(mid, None)
            if seq is not None:
                self._last_puback = now
            if seq is not None and ok and self.confirm == "broker":
                # acknowledged is enough; one the broker refused stays spooled and is resent
                self.spool.delete(seq)
                self._sent.pop(seq, None)

    def _apply_confirmations(self) -> None:
        while True:
            try:
                ranges = self.confirmations.get_nowait()
            except queue.Empty:
                return
            self.confirmed += self.spool.delete_ranges(ranges)
            last_sent = self._forget(ranges)
            self._mark_gaps(max((hi for _, hi in ranges), default=-1))
            if self._draining:
                self._hurry(before=last_sent)

    def _forget(self, ranges: list[tuple[int, int]]) -> float:
        """Stop waiting for the confirmation of the windows in the ranges (inclusive); returns when the last
        of them was last published (-inf when none was awaited)."""
        last = float("-inf")
        for seq in [s for s in self._sent if any(lo <= s <= hi for lo, hi in ranges)]:
            last = max(last, self._sent.pop(seq)[0])
        return last

    def _mark_gaps(self, newest: int) -> None:
        """Make windows older than the newest confirmed one due at once.

        A broker delivers one client's messages on a topic in order: an older window still
        unconfirmed when a newer one is confirmed was lost on the way (a broker restart, or no
        monitor subscribed yet); resend it at the next check instead of after the timeout.
        """
        now = time.monotonic()
        for seq, (sent_at, attempts) in list(self._sent.items()):
            if seq < newest and now - sent_at >= self.GAP_GRACE:
                self._sent[seq] = (float("-inf"), attempts)

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    def settled(self, now: float | None = None) -> bool:
        """Nothing left to wait for at a stop: all confirmed, or (without a monitor in sight) every
        publish acknowledged by the broker; what is unconfirmed stays spooled for the next run.

        With ``confirm="monitor"``, no monitor is in sight when none has confirmed a window of this run,
        not even within :data:`CONFIRM_GRACE` of the broker's last PUBACK (a short run may stop before the
        first confirmation came; a monitor that is there confirms what it receives within a round trip and
        a commit): once one is, the drain waits for the whole spool, up to its timeout.
        """
        if not len(self.spool):
            return True
        acknowledged = not self._inflight and self._last_new >= self.spool.newest()
        if self.confirm != "monitor":
            return acknowledged
        if self.monitor_seen:
            return False
        now = time.monotonic() if now is None else now
        return acknowledged and now - self._last_puback >= self.CONFIRM_GRACE
