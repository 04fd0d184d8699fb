"""Fixtures shared by the whole suite: private Mosquitto brokers and the reference models."""

from __future__ import annotations

import os
import uuid

import pytest

from devtools.brokers import AmqttBroker, BrokerUnavailable, MosquittoBroker
from helpers import PG_ADMIN

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _start_or_skip(make):
    """Start a private broker; where it cannot run, skip (but fail in CI, which installs everything)."""
    try:
        return make().start()
    except BrokerUnavailable as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))


@pytest.fixture
def mosquitto(tmp_path):
    """A private Mosquitto on a free port with persistence and raised queue limits."""
    broker = _start_or_skip(lambda: MosquittoBroker(workdir=tmp_path / "broker"))
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def session_mosquitto(tmp_path_factory):
    """One private Mosquitto for tests that only need a working broker."""
    broker = _start_or_skip(lambda: MosquittoBroker(workdir=tmp_path_factory.mktemp("session-broker")))
    yield broker
    broker.stop()


@pytest.fixture
def amqtt(tmp_path):
    """The pure-Python amqtt broker (MQTT 3.1.1) on a free port."""
    broker = _start_or_skip(lambda: AmqttBroker(workdir=tmp_path / "amqtt"))
    yield broker
    broker.stop()


#: Fixtures that connect to the PostgreSQL server: a test that takes one is marked ``postgres``.
POSTGRES_FIXTURES = frozenset({"pg_url"})


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database on the local server (skipped where none runs, but not in CI)."""
    from sqlalchemy import create_engine, text

    name = f"edgeops_t_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN + "test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"create database {name}"))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            raise
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    yield PG_ADMIN + name
    with admin.connect() as conn:
        conn.execute(text(f"drop database if exists {name} with (force)"))
    admin.dispose()


@pytest.hookimpl(tryfirst=True)   # before ``-m`` selects on the markers
def pytest_collection_modifyitems(config, items):
    for item in items:
        if POSTGRES_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


pytest_plugins = ["helpers.fixtures_bundles"]
