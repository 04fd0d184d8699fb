"""Batch ingestion helpers: storing a batch in one transaction, and isolating the rows a database refuses.

The monitor validates a batch of messages, then stores all its windows in one transaction (a multi-row
insert, see :func:`telemetry.store.store_windows`). When the database refuses the batch for one row's
value (not because it is unreachable), :func:`store_bisecting` splits the batch in halves and stores
each, down to the single rows it refuses, which the caller quarantines: a batch of n rows with one bad
row costs about 2 log2(n) transactions instead of n.

>>> stored, refused = [], []
>>> def store(items):
...     if 13 in items:
...         raise ValueError("out of range")
...     stored.extend(items)
>>> store_bisecting(list(range(10, 20)), store, lambda item, exc: refused.append(item), lambda exc: False)
>>> sorted(stored) == [10, 11, 12, 14, 15, 16, 17, 18, 19], refused
(True, [13])
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def store_bisecting(items: Sequence[T], store: Callable[[Sequence[T]], object],
                    refuse: Callable[[T, BaseException], None],
                    transient: Callable[[BaseException], bool]) -> None:
    """``store(items)`` in one go; when it raises an error that is not ``transient``, store each half the
    same way, and hand a single item the database refuses to ``refuse(item, error)``. A transient error
    (the database unreachable) propagates: the caller retries the whole batch later, nothing acknowledged."""
    if not items:
        return
    try:
        store(items)
        return
    except Exception as exc:  # noqa: BLE001 - sorted below: transient errors propagate
        if transient(exc):
            raise
        if len(items) == 1:
            refuse(items[0], exc)
            return
    mid = len(items) // 2
    store_bisecting(items[:mid], store, refuse, transient)
    store_bisecting(items[mid:], store, refuse, transient)


def put_bounded(q, item, stop) -> bool:
    """Put ``item`` on the bounded queue ``q``, waiting while it is full (the MQTT client's thread then stops
    reading, and the broker holds the messages); gives up when ``stop`` is set (the message stays
    unacknowledged, so the broker delivers it again). Returns whether it was queued."""
    import queue

    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False
