"""Fixtures shared by the whole suite: private Mosquitto brokers and the reference models."""

from __future__ import annotations

import os

import pytest

from devices.broker import BrokerUnavailable, MosquittoBroker

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture
def mosquitto(tmp_path):
    """A private Mosquitto on a free port with persistence and raised queue limits."""
    try:
        broker = MosquittoBroker(workdir=tmp_path / "broker")
        broker.start()
    except BrokerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def session_mosquitto(tmp_path_factory):
    """One private Mosquitto for tests that only need a working broker."""
    try:
        broker = MosquittoBroker(workdir=tmp_path_factory.mktemp("session-broker"))
        broker.start()
    except BrokerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    yield broker
    broker.stop()


pytest_plugins = ["fixtures_bundles"]
