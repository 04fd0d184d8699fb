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


def stop_agent(proc, timeout: float = 60.0) -> str:
    """SIGTERM a ``python -m edgeops run`` subprocess started with ``stdout=PIPE, stderr=STDOUT, text=True``
    and return its output. One that has not ended within ``timeout`` seconds gets SIGUSR1 first (the agent
    writes every thread's stack to stderr), then SIGKILL, and the test fails with the end of its log and
    those stacks: what it hung on, instead of a bare TimeoutExpired."""
    proc.terminate()
    return agent_output(proc, timeout)


def agent_output(proc, timeout: float) -> str:
    """The output of an agent subprocess (as for :func:`stop_agent`) once it ends; one still running after
    ``timeout`` seconds fails the test with its log and every thread's stack (SIGUSR1, then SIGKILL)."""
    import signal
    import subprocess

    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR1)
        try:
            proc.communicate(timeout=3)       # ends only if the process does; the stacks are written by then
        except subprocess.TimeoutExpired:
            pass
        proc.kill()
        out = proc.communicate(timeout=10)[0] or ""
        raise AssertionError(f"the agent did not end within {timeout} s; its log and stacks:\n"
                             f"{out[-12000:]}") from None
