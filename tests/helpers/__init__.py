"""Waiting for events in tests: one bounded polling helper instead of fixed sleeps."""

from __future__ import annotations

import time
from typing import Callable, TypeVar

T = TypeVar("T")


def eventually(predicate: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` seconds pass.

    Returns the last value of the predicate (truthy when the event happened in time, falsy
    otherwise), so a test writes ``assert eventually(lambda: ..., 10)``.

    >>> eventually(lambda: 42, timeout=1)
    42
    >>> eventually(lambda: [], timeout=0.1, interval=0.02)
    []
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))


#: The local PostgreSQL server's admin URL (database name appended); tests make their own databases.
PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/"
