"""Batch ingestion stores exactly what message-by-message ingestion stores, and acknowledges only committed windows."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import select

from benchmarks.loadgen import build
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.wire import ACK, parse_ack
from helpers import eventually
from telemetry import store
from telemetry.monitor import FleetMonitor

NOWHERE = parse_broker_url("mqtt://127.0.0.1:1")
REFUSED_SEQ = 2          # the database refuses this window of dev-000003 (a value a column cannot hold, say)


@pytest.fixture(scope="module")
def load():
    return build(devices=12, windows=4, fleet="bulk")


def _messages(load) -> list[tuple[str, bytes, int, int]]:
    """Every window once, three of them again (a redelivery inside a batch and one across batches), and two
    poison messages the validator refuses."""
    msgs = [(t, p, i, 1) for i, (t, p, _, _) in enumerate(load.messages)]
    msgs.insert(5, msgs[3])                                 # a duplicate a few messages later
    msgs.append(msgs[0])                                    # ... and one long after the first copy
    msgs.append(msgs[20])
    msgs.insert(17, ("edgeops/bulk/dev-000001/telemetry", b"{not json", 999, 1))
    bad = json.loads(load.messages[7][1])
    bad["count"] = -1
    msgs.insert(30, (load.messages[7][0], json.dumps(bad).encode(), 998, 1))
    return msgs


def _picky(real):
    """store_windows that refuses any batch holding the refused window, as a database refuses one row."""
    calls = []

    def store_windows(engine, items, **kw):
        items = list(items)
        calls.append(len(items))
        if any(d == "dev-000003" and w["seq"] == REFUSED_SEQ for _, d, w in items):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(engine, items, **kw)

    store_windows.calls = calls
    return store_windows


def _state(m: FleetMonitor) -> dict:
    with m.engine.connect() as conn:
        rows = conn.execute(select(store.windows.c.device_id, store.windows.c.seq, store.windows.c.payload)).all()
    quarantined = Counter((r["topic"], r["reason"], bytes(r["payload"])) for r in store.quarantined(m.engine, 1000))
    return {"windows": sorted((r.device_id, r.seq, json.dumps(json.loads(r.payload), sort_keys=True)) for r in rows),
            "rows": len(rows), "quarantined": quarantined, "stored": m.stats.stored,
            "duplicates": m.stats.duplicates, "rejected": dict(m.stats.rejected)}


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_batches_store_exactly_what_one_message_at_a_time_stored(database, tmp_path, load, monkeypatch, request):
    urls = ([f"sqlite:///{tmp_path}/one.db", f"sqlite:///{tmp_path}/batch.db"] if database == "sqlite"
            else [request.getfixturevalue("pg_url"), None])
    if urls[1] is None:       # a second fresh PostgreSQL database
        urls[1] = request.getfixturevalue("pg_url").rsplit("/", 1)[0] + "/" + _second_pg(request)
    picky = _picky(store.store_windows)
    monkeypatch.setattr(store, "store_windows", picky)
    msgs = _messages(load)
    one = FleetMonitor(NOWHERE, urls[0], fleet="bulk", bundles=[load.manifest])
    for m in msgs:
        one.ingest([m])
    batched = FleetMonitor(NOWHERE, urls[1], fleet="bulk", bundles=[load.manifest])
    picky.calls.clear()
    for k in range(0, len(msgs), 32):
        batched.ingest(msgs[k:k + 32])
    a, b = _state(one), _state(batched)
    assert a == b
    windows = len(load.messages)
    assert a["rows"] == a["stored"] == windows - 1                          # all but the refused one, once each
    assert a["duplicates"] == 3
    assert {reason for _, reason, _ in a["quarantined"]} == {"malformed_json", "bad_value", "database_error"}
    assert sum(a["quarantined"].values()) == 3
    # the refused row was isolated by halving its batch: a few transactions, not one per message
    assert len(picky.calls) <= 2 + 2 * 6, picky.calls


def _second_pg(request) -> str:
    import uuid

    from sqlalchemy import create_engine, text

    from helpers import PG_ADMIN

    name = f"edgeops_t_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN + "test", isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"create database {name}"))

    def drop():
        with admin.connect() as conn:
            conn.execute(text(f"drop database if exists {name} with (force)"))
        admin.dispose()

    request.addfinalizer(drop)
    return name


def test_store_windows_names_the_duplicates(tmp_path, load):
    engine = store.connect(f"sqlite:///{tmp_path}/d.db")
    items = [(load.fleet, d, json.loads(p)) for _, p, d, _ in load.messages[:5]]
    first = store.store_windows(engine, items[:3])
    again = store.store_windows(engine, items + items[3:4])
    assert tuple(first) == (3, 0) and first.duplicate_keys == []
    assert tuple(again) == (2, 4)
    assert sorted(again.duplicate_keys) == sorted([(load.fleet, d["device_id"], d["seq"]) for _, _, d in items[:4]])


def test_store_windows_on_postgresql_names_the_duplicates(pg_url, load):
    engine = store.connect(pg_url)
    items = [(load.fleet, d, json.loads(p)) for _, p, d, _ in load.messages[:5]]
    store.store_windows(engine, items[:2])
    again = store.store_windows(engine, items)
    assert tuple(again) == (3, 2)
    assert sorted(k[1] for k in again.duplicate_keys) == sorted(d for _, d, _ in items[:2])
    assert len(store.device_rows(engine)) == 5
    engine.dispose()


class _Client:
    """Stands in for the MQTT client: records acks to devices (publish) and to the broker (ack)."""

    def __init__(self, log: list):
        self.log = log

    def publish(self, topic, payload, qos=0, retain=False):
        if topic.endswith("/" + ACK):
            ranges = tuple(map(tuple, parse_ack(payload)))
            self.log.append(("device_ack", topic.split("/")[2], ranges, time.monotonic()))

    def publish_many(self, items, qos=0, retain=False):
        for topic, payload in items:
            self.publish(topic, payload, qos, retain)

    def ack(self, mids):         # telemetry.mqtt_stream.StreamConnection: a committed batch's PUBACKs at once
        for mid in mids:
            self.log.append(("broker_ack", mid, None, time.monotonic()))


def test_nothing_is_acknowledged_before_its_commit_and_a_database_outage_loses_nothing(tmp_path, load, monkeypatch):
    log: list = []
    real = store.store_windows
    down = {"failures": 3}

    def flaky(engine, items, **kw):
        items = list(items)
        if down["failures"]:
            down["failures"] -= 1
            log.append(("db_down", None, None, time.monotonic()))
            raise sa_exc.OperationalError("INSERT", {}, Exception("the database is unreachable"))
        out = real(engine, items, **kw)
        log.append(("commit", None, tuple(sorted((d, w["seq"]) for _, d, w in items)), time.monotonic()))
        return out

    monkeypatch.setattr(store, "store_windows", flaky)
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", fleet="bulk", bundles=[load.manifest])
    m.client = _Client(log)
    msgs = [(t, p, i + 1, 1) for i, (t, p, _, _) in enumerate(load.messages)]
    by_mid = {i + 1: (d, s) for i, (_, _, d, s) in enumerate(load.messages)}
    for item in msgs:
        m._inbox.put(item)
    worker = threading.Thread(target=m._ingest_loop, daemon=True)
    worker.start()
    try:
        assert eventually(lambda: len([e for e in log if e[0] == "broker_ack"]) == len(msgs), 30)
    finally:
        m._stop.set()
        worker.join(10)
    kinds = [e[0] for e in log]
    assert kinds[:3] == ["db_down"] * 3                      # retried with backoff, nothing acknowledged meanwhile
    committed: set = set()
    for kind, who, what, _ in log:
        if kind == "commit":
            committed |= set(what)
        elif kind == "device_ack":
            assert {(who, s) for lo, hi in what for s in range(lo, hi + 1)} <= committed
        elif kind == "broker_ack":
            assert by_mid[who] in committed
    assert m.stats.stored == len(msgs)
    assert {e[1] for e in log if e[0] == "device_ack"} == {d for _, _, d, _ in load.messages}


def test_postgresql_stores_a_batch_in_one_statement_and_moves_last_seen_only_for_new_windows(pg_url, load):
    """The windows and the devices' last_seen go in one autocommitted statement: a batch of duplicates alone
    (a redelivery) leaves last_seen where it was; the stored text is the caller's when it gives one."""
    from sqlalchemy import text

    engine = store.connect(pg_url)
    items = [(load.fleet, d, json.loads(p)) for _, p, d, _ in load.messages[:4]]
    texts = [store.window_json(w) for _, _, w in items]
    assert tuple(store.store_windows(engine, items[:2], texts=texts[:2])) == (2, 0)
    with engine.connect() as conn:
        seen = dict(conn.execute(text("select device_id, last_seen from edgeops_devices")).all())
    assert tuple(store.store_windows(engine, items[:2], texts=texts[:2])) == (0, 2)
    with engine.connect() as conn:
        assert dict(conn.execute(text("select device_id, last_seen from edgeops_devices")).all()) == seen
    # one new window among duplicates: its batch's devices are seen again, the new one added
    assert tuple(store.store_windows(engine, items[:3], texts=texts[:3])) == (1, 2)
    with engine.connect() as conn:
        after = dict(conn.execute(text("select device_id, last_seen from edgeops_devices")).all())
        payloads = dict(conn.execute(text("select device_id, payload from edgeops_windows")).all())
    assert len(after) == 3 and all(after[d] > seen[d] for d in seen)
    assert [payloads[d] for _, d, _ in items[:3]] == texts[:3]
    with pytest.raises(ValueError, match="3 texts for 2 windows"):
        store.store_windows(engine, items[:2], texts=texts[:3])
    engine.dispose()


def test_a_batch_with_the_same_window_twice_stores_it_once_with_its_own_text(tmp_path, load):
    engine = store.connect(f"sqlite:///{tmp_path}/t.db")
    items = [(load.fleet, d, json.loads(p)) for _, p, d, _ in load.messages[:3]]
    items.insert(1, items[0])
    texts = [store.window_json(w) for _, _, w in items]
    assert tuple(store.store_windows(engine, items, texts=texts)) == (3, 1)
    with engine.connect() as conn:
        rows = conn.execute(select(store.windows.c.device_id, store.windows.c.payload)).all()
    assert sorted(rows) == sorted({(d, t) for (_, d, _), t in zip(items, texts, strict=True)})


@pytest.mark.parametrize("ts", [0.0, 1.5, 1764740000.123, 1e10 + 0.001])
def test_the_monitors_fast_ack_encoding_is_the_agents_json(ts):
    """encode_ack (orjson on the monitor) gives byte for byte what wire.encode gives, and the agent reads it."""
    from edge_runtime.wire import ack_message, encode, encode_ack

    for seqs, bad in (([3], None), ([5, 1, 2, 3, 9], {9: "bad_value"}), (list(range(1000)), {7: "clock_skew"})):
        fast = encode_ack(seqs, bad, ts)
        assert fast == encode(ack_message(seqs, bad, ts))
        assert parse_ack(fast) == [tuple(r) for r in json.loads(fast)["ranges"]]
    # a reason is one of the monitor's names (ASCII); were it not, the JSON would still mean the same
    assert json.loads(encode_ack([1], {1: "é\u2028"}, ts)) == json.loads(encode(ack_message([1], {1: "é\u2028"}, ts)))


def test_a_postgresql_connection_cut_mid_batch_is_retried_not_refused(pg_url, load, caplog):
    """The server ends the monitor's session (a restart, a failover, an administrator): the driver's own
    error reaches the monitor, and it is a database that is away, not one refusing the batch: no halving,
    nothing quarantined, and the batch stored once it is tried again."""
    from sqlalchemy import create_engine, text

    from helpers import PG_ADMIN
    from telemetry.monitor import _transient

    m = FleetMonitor(NOWHERE, pg_url, fleet="bulk", bundles=[load.manifest])
    msgs = [(t, p, i, 1) for i, (t, p, _, _) in enumerate(load.messages)]
    m.ingest(msgs[:10])
    db = pg_url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN + "test", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:      # every session of the monitor's database, pooled ones too
            ended = conn.execute(text("select count(pg_terminate_backend(pid)) from pg_stat_activity "
                                      "where datname = :db and pid <> pg_backend_pid()"), {"db": db}).scalar()
        assert ended >= 1
    finally:
        admin.dispose()
    with caplog.at_level("WARNING", logger="edgeops.monitor"), pytest.raises(Exception) as raised:
        m.ingest(msgs[10:20])
    assert _transient(raised.value), repr(raised.value)
    assert "in halves" not in caplog.text and not m.stats.quarantined
    m.ingest(msgs[10:20])                  # the retry, on a new connection
    with m.engine.connect() as conn:
        assert conn.execute(select(store.windows.c.seq).where(store.windows.c.fleet == "bulk")).all().__len__() == 20
    m.engine.dispose()


def test_a_window_that_cannot_be_encoded_for_storage_is_quarantined_alone(tmp_path, load, monkeypatch):
    """The stored JSON is made on the ingest thread now: a failure there quarantines that message
    (internal_error, confirmed to its device) and the batch and the thread go on."""
    real = store.window_json

    def fragile(window):
        if window["device_id"] == "dev-000002":
            raise RecursionError("maximum recursion depth exceeded")
        return real(window)

    monkeypatch.setattr(store, "window_json", fragile)
    log: list = []
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", fleet="bulk", bundles=[load.manifest])
    m.client = _Client(log)
    m.ingest([(t, p, i, 1) for i, (t, p, _, _) in enumerate(load.messages[:6])])
    assert m.stats.stored == 5 and m.stats.quarantined == {"internal_error": 1}
    assert [r["reason"] for r in store.quarantined(m.engine)] == ["internal_error"]
    confirmed = {device for kind, device, _, _ in log if kind == "device_ack"}
    assert confirmed == {f"dev-{i:06d}" for i in range(6)}      # the quarantined one too: it is not resent
