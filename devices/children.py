"""Child processes a run depends on (broker, monitor, device workers): started so that the current
folder cannot shadow the project's packages, and watched so that one that dies stops the run at once
with its name and the tail of its log, instead of a run that waits for it and ends in a wrong verdict.

    >>> import subprocess
    >>> children = Supervisor()
    >>> proc = children.watch("a child", subprocess.Popen(python_command(["-c", "raise SystemExit(3)"])),
    ...                       lambda: ["the last line it wrote"])
    >>> children.wait(lambda: False, timeout=30)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    devices.children.ChildProcessDied: a child (pid ...) exited with status 3; the last lines of its log:
        the last line it wrote
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from edge_runtime.errors import EdgeOpsError

T = TypeVar("T")

#: How many lines of a dead child's log its error quotes.
TAIL_LINES = 20

# Python < 3.11 has no -P: the launcher drops the current folder ('' in sys.path[0] under -c) itself.
_RUN_MODULE = ("import runpy, sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
               "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)")
_DROP_CWD = "import sys; sys.path[:] = [p for p in sys.path if p not in ('', '.')]\n"


class ChildProcessDied(EdgeOpsError):
    """A child process a run depends on ended before the run did; the message quotes the tail of its log."""

    exit_code = 1


def python_command(args: Sequence[str], safe_path: bool | None = None) -> list[str]:
    """The command that runs this interpreter with ``args`` (``-m MODULE ...`` or ``-c CODE ...``) without the
    current folder on ``sys.path``.

    ``python -m edgeops`` started from a folder that holds a folder named ``edgeops`` (the clone itself,
    seen from its parent) imports that folder instead of the installed package, editable or not. Python
    3.11 and later have ``-P`` for exactly this; on older ones a one-line launcher drops the entry. (``-I``
    would also drop ``PYTHONPATH`` and the user's site-packages, where the project may be installed.)

    Args:
        args: the interpreter's arguments, starting with ``-m`` or ``-c``.
        safe_path: use ``-P`` (default: when this Python has it).
    """
    args = [str(a) for a in args]
    if not args or args[0] not in ("-m", "-c") or len(args) < 2:
        raise ValueError(f"expected ['-m', MODULE, ...] or ['-c', CODE, ...], not {args[:2]}")
    if safe_path is None:
        safe_path = sys.version_info >= (3, 11)
    if safe_path:
        return [sys.executable, "-P", *args]
    return _launcher_command(args)


def _launcher_command(args: list[str]) -> list[str]:
    """For a Python without ``-P``: a one-line launcher that drops the current folder, then runs ``args``."""
    if args[0] == "-m":
        return [sys.executable, "-c", _RUN_MODULE, *args[1:]]
    return [sys.executable, "-c", _DROP_CWD + args[1], *args[2:]]


def file_tail(path: str | Path, lines: int = TAIL_LINES) -> list[str]:
    """The last ``lines`` lines of a log file (none if it does not exist)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 200 * lines))
            text = fh.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-lines:]


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Ask a child to stop (SIGTERM), and kill it if it has not stopped after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ending(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with status {returncode}"


@dataclass
class Child:
    """One watched process: its name in errors, where its log's tail comes from, whether it may end."""

    name: str
    proc: subprocess.Popen
    tail: Callable[[], list[str]]
    may_finish: bool = False   # exit status 0 ends its work; otherwise any exit is a death

    def died(self) -> bool:
        code = self.proc.poll()
        return code is not None and not (self.may_finish and code == 0)

    def error(self) -> ChildProcessDied:
        lines = self.tail()[-TAIL_LINES:]
        where = ("the last lines of its log:\n" + "\n".join(f"    {line}" for line in lines)) if lines else (
            "its log is empty")
        return ChildProcessDied(f"{self.name} (pid {self.proc.pid}) {_ending(self.proc.returncode)}; {where}")


class Supervisor:
    """The child processes a run depends on. Every wait of the run goes through :meth:`wait` (or
    :meth:`sleep`, :meth:`call`), which raises :class:`ChildProcessDied` as soon as one of them died."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def watch(self, name: str, proc: subprocess.Popen, log: str | Path | Callable[[], list[str]] | None = None,
              may_finish: bool = False) -> subprocess.Popen:
        """Watch ``proc`` from now on; ``log`` is its log file or a callable returning its last lines."""
        if log is None:
            tail: Callable[[], list[str]] = list
        elif callable(log):
            tail = log
        else:
            tail = lambda: file_tail(log)   # noqa: E731
        self.children.append(Child(name, proc, tail, may_finish))
        return proc

    def check(self) -> None:
        """Raise :class:`ChildProcessDied` for the first watched child that died."""
        for child in self.children:
            if child.died():
                raise child.error()

    def wait(self, predicate: Callable[[], T], timeout: float | None, interval: float = 0.2) -> T:
        """Poll ``predicate`` until it is truthy or ``timeout`` seconds pass (None: no limit), watching the
        children all along; returns its last value."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.check()
            value = predicate()
            if value or (deadline is not None and time.monotonic() >= deadline):
                return value
            pause = interval if deadline is None else min(interval, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def sleep(self, seconds: float) -> None:
        """Let ``seconds`` pass, watching the children."""
        self.wait(lambda: False, seconds)

    def call(self, fn: Callable[[], T], interval: float = 0.2) -> T:
        """Run a blocking call in a thread while watching the children; its result, or its exception.

        If a child dies first, :class:`ChildProcessDied` is raised at once and the call is left to end
        in its (daemon) thread when the run tears down what it uses.
        """
        outcome: dict[str, object] = {}

        def run() -> None:
            try:
                outcome["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                outcome["error"] = exc

        worker = threading.Thread(target=run, name="supervised-call", daemon=True)
        worker.start()
        self.wait(lambda: not worker.is_alive(), None, interval)
        if "error" in outcome:
            raise outcome["error"]   # type: ignore[misc]
        return outcome["value"]   # type: ignore[return-value]
