"""SignalRelay: what a signal handler asks for runs in the relay's thread, never inside the handler."""

from __future__ import annotations

import logging
import os
import signal
import threading

from edge_runtime.signals import SignalRelay
from helpers import eventually


def test_a_fire_from_a_signal_handler_runs_the_action_in_the_relay_thread():
    ran_in = []
    done = threading.Event()

    def action():
        ran_in.append(threading.current_thread().name)
        done.set()

    relay = SignalRelay(action, "test-relay")
    previous = signal.signal(signal.SIGUSR2, lambda *a: relay.fire())
    try:
        # the main thread holds the event's lock, as inside Event.wait(), when the handler runs: a
        # handler that set the event itself would wait here for ever
        with done._cond:
            signal.raise_signal(signal.SIGUSR2)
        assert done.wait(5)
        assert ran_in == ["test-relay"]
    finally:
        signal.signal(signal.SIGUSR2, previous)
        relay.close()


def test_fires_before_the_thread_woke_run_the_action_at_least_once_and_never_more_often():
    count = []
    gate = threading.Event()

    def action():
        gate.wait(5)
        count.append(1)

    relay = SignalRelay(action)
    try:
        for _ in range(50):
            relay.fire()
        gate.set()
        assert eventually(lambda: count, 5)
        relay.close()
        assert 1 <= len(count) <= 50
    finally:
        gate.set()
        relay.close()


def test_a_failing_action_is_logged_and_the_relay_goes_on(caplog):
    calls = []

    def action():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")

    relay = SignalRelay(action)
    try:
        with caplog.at_level(logging.ERROR, logger="edgeops.signals"):
            relay.fire()
            assert eventually(lambda: calls, 5)
            assert eventually(lambda: "boom" in caplog.text, 5)
            relay.fire()
            assert eventually(lambda: len(calls) == 2, 5)
    finally:
        relay.close()


def test_a_fire_after_close_writes_nowhere_even_when_the_descriptor_number_is_reused():
    relay = SignalRelay(lambda: None)
    number = relay._write
    relay.close()
    assert not relay._thread.is_alive()
    read_end, write_end = os.pipe()        # the lowest free numbers: the relay's old ones, most likely
    try:
        os.set_blocking(read_end, False)
        relay.fire()
        try:
            leaked = os.read(read_end, 16)
        except BlockingIOError:
            leaked = b""
        assert leaked == b"", (number, read_end, write_end)
    finally:
        os.close(read_end)
        os.close(write_end)
