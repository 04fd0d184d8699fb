"""Acting on a signal without taking a lock inside its handler.

Python runs a signal handler in the main thread, between two bytecodes of whatever that thread was doing.
If the handler takes a lock the main thread holds at that moment, it waits for itself for ever. The lock
need not be one of ours: ``threading.Event.set()`` takes the event's lock, which the main thread holds for
a moment inside every ``Event.wait()``; a handler that sets the event the run loop paces itself with hangs
once in some thousands of signals. (Found in a full test run: the agent stopped answering SIGTERM until its
stop guard ended it.)

:class:`SignalRelay` moves the action out of the handler: the handler writes one byte to a pipe (a system
call, no lock), and a thread of the relay that waits on the pipe's other end runs the action.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Callable

log = logging.getLogger("edgeops.signals")


class SignalRelay:
    """Runs ``action`` in its own thread each time :meth:`fire` is called; :meth:`fire` is safe in a signal
    handler. Several fires that come before the thread woke run the action once.

    >>> import threading
    >>> done = threading.Event()
    >>> relay = SignalRelay(done.set)
    >>> relay.fire()
    >>> done.wait(5)
    True
    >>> relay.close()
    """

    def __init__(self, action: Callable[[], None], name: str = "edgeops-signal-relay"):
        self._action = action
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write: int | None = write   # a full pipe already holds a wake-up: fire() never blocks
        self._thread = threading.Thread(target=self._relay, name=name, daemon=True)
        self._thread.start()

    def fire(self) -> None:
        """Ask for the action (from a signal handler or anywhere else); nothing once closed."""
        fd = self._write
        if fd is None:
            return
        try:
            os.write(fd, b"\0")
        except OSError:   # pipe full: a wake-up is already waiting
            pass

    def close(self, timeout: float = 1.0) -> None:
        """End the relay's thread (closing the write end wakes it with end-of-file). The descriptor is
        forgotten before it is closed, so a later fire() cannot write into a file that reuses its number."""
        fd, self._write = self._write, None
        if fd is not None:
            os.close(fd)
        self._thread.join(timeout)

    def _relay(self) -> None:
        try:
            while os.read(self._read, 512):
                try:
                    self._action()
                except Exception:  # noqa: BLE001 - the relay outlives a failing action, which is logged
                    log.exception("signal action %r failed", self._action)
        finally:
            os.close(self._read)
