"""`edgeops run` stops within its --stop-timeout whatever blocks it, keeping its unsent windows.

The case found in a full run: an agent whose stderr was a pipe nobody read any more blocked in a log
write; SIGTERM was taken (the handler ran) but the process never ended. Here the test owns the pipe and
fills it, so the agent's next log line blocks for good, the same way.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from devtools.brokers import free_port
from helpers import agent_output, eventually


def _start(bundle, tmp_path, rows, stop_timeout: str, stderr, state: str = "state"):
    np.save(tmp_path / "x.npy", rows)
    # a broker that is not there: every window stays in the spool, and the stop says so (a log line)
    return subprocess.Popen(
        [sys.executable, "-m", "edgeops", "-v", "run", str(bundle), "--device-id", "dev-s",
         "--broker", f"mqtt://127.0.0.1:{free_port()}", "--input", str(tmp_path / "x.npy"), "--loop",
         "--rate", "200", "--window-size", "20", "--state-dir", str(tmp_path / state),
         "--stop-timeout", stop_timeout],
        stdout=subprocess.DEVNULL, stderr=stderr)


def _spooled(state) -> int:
    """Windows in the agent's spool (0 while the agent has not made it yet)."""
    if not (state / "spool.sqlite").exists():
        return 0
    try:
        with sqlite3.connect(state / "spool.sqlite") as db:
            return db.execute("select count(*) from windows").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _fill(fd: int) -> None:
    """Write into the pipe until it would block: the reader has gone away without closing it. (The
    flag is on the pipe end the agent shares, so it is cleared again: the agent's writes must block.)"""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    try:
        while True:
            os.write(fd, b"x" * 512)
    except BlockingIOError:
        pass
    finally:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags)


@pytest.mark.slow
def test_an_agent_blocked_writing_its_log_still_ends_after_sigterm_and_keeps_its_windows(
        bc_mlp_bundle, reference_data, tmp_path):
    read_end, write_end = os.pipe()
    agent = _start(bc_mlp_bundle, tmp_path, reference_data["breast_cancer"].X_train, "12", write_end)
    try:
        log = b""
        os.set_blocking(read_end, False)

        def running() -> bool:
            nonlocal log
            try:
                log += os.read(read_end, 65536)
            except BlockingIOError:
                pass
            return b" runs " in log and _spooled(tmp_path / "state") >= 3

        assert eventually(running, 60), log.decode(errors="replace")[-2000:]
        _fill(write_end)                       # from now on every log line of the agent blocks
        agent.send_signal(signal.SIGTERM)
        started = time.monotonic()
        agent.wait(timeout=60)
        took = time.monotonic() - started
        # ended by its stop guard (faulthandler exits with 1) after the 12 s it was given, not hanging on
        assert agent.returncode == 1 and took < 40, (agent.returncode, took)
        stacks = (tmp_path / "state" / "stop-stacks.txt").read_text()
        assert "Thread" in stacks and "emit" in stacks, stacks[-3000:]   # the blocked log write, named
        assert _spooled(tmp_path / "state") >= 3                        # the unsent windows are kept
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        os.close(read_end)
        os.close(write_end)


@pytest.mark.slow
def test_a_second_sigterm_ends_the_agent_at_once_and_a_clean_stop_leaves_no_stack_file(
        bc_mlp_bundle, reference_data, tmp_path):
    agent = _start(bc_mlp_bundle, tmp_path, reference_data["breast_cancer"].X_train, "45", subprocess.PIPE)
    try:
        assert eventually(lambda: _spooled(tmp_path / "state") >= 1, 60)
        agent.send_signal(signal.SIGTERM)      # the stop waits up to 5 s for a broker that is not there...
        # the first signal was taken once the stop guard armed (it opens its stack file)
        assert eventually(lambda: (tmp_path / "state" / "stop-stacks.txt").exists(), 10)
        agent.send_signal(signal.SIGTERM)      # ...a second signal does not wait
        agent.communicate(timeout=4)
        assert agent.returncode == 128 + signal.SIGTERM
        assert _spooled(tmp_path / "state") >= 1
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.communicate()
    # a stop that ends in time removes the (empty) stack file
    clean = _start(bc_mlp_bundle, tmp_path, reference_data["breast_cancer"].X_train, "45", subprocess.PIPE,
                   state="clean")
    try:
        assert eventually(lambda: _spooled(tmp_path / "clean") >= 1, 60)
        clean.send_signal(signal.SIGTERM)
        _, err = clean.communicate(timeout=60)
        assert clean.returncode == 0, err.decode()[-2000:]
        assert not (tmp_path / "clean" / "stop-stacks.txt").exists()
    finally:
        if clean.poll() is None:
            clean.kill()
            clean.communicate()


# Python runs a signal handler in the main thread, between two bytecodes of whatever it was doing. The
# run loop paces its inputs with threading.Event.wait(), which holds the event's lock for a moment on
# each call; a handler that sets that event (or takes any lock the main thread may hold) at that moment
# waits for itself. Found in a full run: the agent stopped answering SIGTERM until the stop guard ended
# it 45 s later, without closing its last window. Here the moment is made to happen: a profile hook
# raises SIGTERM inside the run loop's Event.wait, with the lock held, after a few hundred waits.
_SIGNAL_INSIDE_EVENT_WAIT = """
import runpy, signal, sys, threading

EVENT_WAIT, CONDITION_WAIT = threading.Event.wait.__code__, threading.Condition.wait.__code__
calls = 0

def hook(frame, event, arg):
    global calls
    if event == "call" and frame.f_code is CONDITION_WAIT and frame.f_back.f_code is EVENT_WAIT:
        calls += 1
        if calls == 300:                 # about 1.5 s into the run at --rate 200
            sys.setprofile(None)
            signal.raise_signal(signal.SIGTERM)

sys.argv = ["edgeops"] + sys.argv[1:]
sys.setprofile(hook)
runpy.run_module("edgeops", run_name="__main__")
"""


@pytest.mark.slow
def test_sigterm_that_arrives_while_the_run_loop_holds_its_pacing_lock_still_stops_the_agent(
        mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    np.save(tmp_path / "x.npy", reference_data["breast_cancer"].X_train)
    (tmp_path / "signal_inside_wait.py").write_text(_SIGNAL_INSIDE_EVENT_WAIT)
    agent = subprocess.Popen(
        [sys.executable, str(tmp_path / "signal_inside_wait.py"), "run", str(bc_mlp_bundle), "--device-id", "dev-w",
         "--broker", mosquitto.url, "--input", str(tmp_path / "x.npy"), "--loop", "--rate", "200",
         "--window-size", "20", "--window-seconds", "600", "--state-dir", str(tmp_path / "state"),
         "--stop-timeout", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = agent_output(agent, 45)      # a hang fails with every thread's stack: where it waits
    assert agent.returncode == 0, log[-3000:]
    # a clean stop, not the stop guard's: the last (partial) window was closed into the spool, where the
    # windows wait for a monitor's confirmation (none runs here)
    found = re.search(r"(\d+) inferences, 0 bad inputs, (\d+) windows left in the spool", log)
    assert found, log[-3000:]
    inferences, left = int(found[1]), int(found[2])
    assert inferences > 0 and left == _spooled(tmp_path / "state") == -(-inferences // 20)
    assert not (tmp_path / "state" / "stop-stacks.txt").exists()
