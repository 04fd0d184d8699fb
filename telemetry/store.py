"""Storage of windows, device status, bench results, bundles and alerts (SQLAlchemy Core).

SQLite by default (WAL, nothing to start), PostgreSQL for a fleet that
outgrows one machine; several monitor processes can share one PostgreSQL.
Windows are unique by (fleet, device, seq): a redelivered window is counted
once, whichever process sees it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    delete,
    event,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine

try:                       # an optional speed-up: compact JSON about ten times faster than json.dumps
    import orjson

    def _dumps(doc) -> str:
        try:
            return orjson.dumps(doc).decode()
        except TypeError:           # an integer past 64 bits (the checks let it through as a number)
            return json.dumps(doc, separators=(",", ":"))
except ImportError:  # pragma: no cover - orjson comes with the monitor extra
    def _dumps(doc) -> str:
        return json.dumps(doc, separators=(",", ":"))

metadata = MetaData()

windows = Table(
    "edgeops_windows", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("start", Float, nullable=False),
    Column("end", Float, nullable=False),
    Column("count", BigInteger, nullable=False),
    Column("errors", BigInteger, nullable=False),
    Column("p95_ms", Float),
    Column("payload", Text, nullable=False),
    Column("received_at", Float, nullable=False),
    UniqueConstraint("fleet", "device_id", "seq", name="edgeops_windows_device_seq"),
)
Index("edgeops_windows_recent", windows.c.fleet, windows.c.device_id, windows.c.model_name, windows.c.model_version,
      windows.c.seq)

devices = Table(
    "edgeops_devices", metadata,
    Column("fleet", String(64), primary_key=True),
    Column("device_id", String(64), primary_key=True),
    Column("online", Boolean),
    Column("last_seen", Float),
    Column("status", Text),
    Column("model_name", String(128)),
    Column("model_version", String(64)),
)

bundles = Table(
    "edgeops_bundles", metadata,
    Column("name", String(128), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("manifest", Text, nullable=False),
)

bench = Table(
    "edgeops_bench", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),
    Column("received_at", Float, nullable=False),
    Column("payload", Text, nullable=False),
)
Index("edgeops_bench_device", bench.c.fleet, bench.c.device_id)

# the dead-letter table: messages that were refused or could not be stored, with their raw bytes
quarantine = Table(
    "edgeops_quarantine", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("received_at", Float, nullable=False),
    Column("topic", String(256), nullable=False),
    Column("reason", String(32), nullable=False),
    Column("detail", Text, nullable=False),
    Column("payload", LargeBinary, nullable=False),
)

# which monitor client id last connected when, for which fleet (a resumed broker session is logged with both)
sessions = Table(
    "edgeops_monitor_sessions", metadata,
    Column("client_id", String(128), primary_key=True),
    Column("fleet", String(64), nullable=False),
    Column("last_connected", Float, nullable=False),
)

alerts = Table(
    "edgeops_alerts", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("fleet", String(64), nullable=False),
    Column("device_id", String(64), nullable=False),   # '*' for a fleet-level alert
    Column("model_name", String(128), nullable=False),
    Column("model_version", String(64), nullable=False),
    Column("detector", String(32), nullable=False),
    Column("open", Boolean, nullable=False),
    Column("statistic", Float),
    Column("features", Text),
    Column("detail", Text),
    Column("opened_at", Float),
    Column("closed_at", Float),
    Column("clean_evaluations", Integer, nullable=False, default=0),
    UniqueConstraint("fleet", "device_id", "model_name", "model_version", "detector", name="edgeops_alerts_key"),
)


def connect(url: str) -> Engine:
    """An engine for ``sqlite:///file.db`` or ``postgresql://...`` (psycopg 3), with tables created."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    kwargs = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    if engine.dialect.name == "postgresql":
        # several monitors may start at once on a fresh database: create the tables under a lock
        with engine.begin() as conn:
            conn.execute(text("SELECT pg_advisory_xact_lock(424242)"))
            metadata.create_all(conn)
    else:
        metadata.create_all(engine)
    return engine


def _insert(engine: Engine, table: Table):
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table)


class Stored(tuple):
    """``(new, duplicates)``, and in ``duplicate_keys`` the (fleet, device, seq) of every duplicate."""

    duplicate_keys: list


def _stored(new: int, dup: int, keys: list) -> Stored:
    out = Stored((new, dup))
    out.duplicate_keys = keys
    return out


_WINDOW_COLUMNS = ("fleet", "device_id", "seq", "model_name", "model_version", "start", "end", "count", "errors",
                   "p95_ms", "payload", "received_at")
_COLS = ", ".join(f'"{c}"' for c in _WINDOW_COLUMNS)
_SQLITE_WINDOWS = f"INSERT OR IGNORE INTO edgeops_windows ({_COLS}) VALUES ({', '.join('?' * len(_WINDOW_COLUMNS))})"
_SQLITE_NEWEST = ("SELECT fleet, device_id, seq FROM edgeops_windows WHERE id > "
                  "(SELECT max(id) FROM edgeops_windows) - ?")
_PG_TYPES = ("text", "text", "bigint", "text", "text", "float8", "float8", "bigint", "bigint", "float8", "text",
             "float8")
# one statement for the whole batch: a column per array, duplicates skipped by the unique key
_PG_WINDOWS = (f"INSERT INTO edgeops_windows ({_COLS}) SELECT * FROM unnest("
               + ", ".join(f"%b::{t}[]" for t in _PG_TYPES)
               + ") ON CONFLICT (fleet, device_id, seq) DO NOTHING RETURNING fleet, device_id, seq")
_DEVICES_UPSERT = ("INSERT INTO edgeops_devices (fleet, device_id, last_seen, online, model_name, model_version) "
                   "{values} ON CONFLICT (fleet, device_id) DO UPDATE SET last_seen = excluded.last_seen, "
                   "model_name = excluded.model_name, model_version = excluded.model_version")
_DEVICE_COLUMNS = ("fleet", "device_id", "last_seen", "online", "model_name", "model_version")
_SQLITE_DEVICES = _DEVICES_UPSERT.format(values="VALUES (?, ?, ?, ?, ?, ?)")
_PG_DEVICE_ARRAYS = "unnest(%b::text[], %b::text[], %b::float8[], %b::bool[], %b::text[], %b::text[])"
# a batch in one statement, so in one round trip and its own transaction: the windows, then the devices'
# last_seen and model when any window was new (data-modifying CTEs run on one snapshot, all or nothing)
_PG_STORE = (f"WITH ins AS ({_PG_WINDOWS}), dev AS ("
             + _DEVICES_UPSERT.format(values=f"SELECT * FROM {_PG_DEVICE_ARRAYS} WHERE EXISTS (SELECT 1 FROM ins)")
             + ") SELECT fleet, device_id, seq FROM ins")


def _insert_rows(conn, dialect: str, rows: list[tuple]) -> set[tuple]:
    """Insert window rows (tuples in _WINDOW_COLUMNS order) with the driver's bulk path; returns the keys
    (fleet, device, seq) really inserted (a key already stored is skipped)."""
    return _WINDOW_INSERTS.get(dialect, _insert_rows_core)(conn, rows)


def _insert_rows_sqlite(conn, rows: list[tuple]) -> set[tuple]:
    """executemany of one prepared statement; when some row was a duplicate, the rows this transaction
    inserted are the newest ids (it holds the write lock from its first insert to its commit)."""
    inserted = conn.exec_driver_sql(_SQLITE_WINDOWS, rows).rowcount
    if inserted == len(rows):
        return {r[:3] for r in rows}
    return {tuple(r) for r in conn.exec_driver_sql(_SQLITE_NEWEST, (inserted,))} if inserted else set()


def _insert_rows_core(conn, rows: list[tuple]) -> set[tuple]:
    """SQLAlchemy's portable INSERT ... ON CONFLICT DO NOTHING RETURNING, for other dialects."""
    stmt = _insert(conn.engine, windows).on_conflict_do_nothing(
        index_elements=["fleet", "device_id", "seq"]).returning(windows.c.fleet, windows.c.device_id, windows.c.seq)
    return {tuple(r) for r in conn.execute(stmt, [dict(zip(_WINDOW_COLUMNS, r, strict=True)) for r in rows])}


_WINDOW_INSERTS = {"sqlite": _insert_rows_sqlite}


def _upsert_devices(conn, dialect: str, rows: list[tuple]) -> None:
    """Devices' last_seen and model, one row per (fleet, device), in (fleet, device) order (two workers
    upserting the same devices then take their row locks in the same order)."""
    if dialect == "sqlite":
        conn.exec_driver_sql(_SQLITE_DEVICES, rows)
    else:
        ins = _insert(conn.engine, devices)
        conn.execute(ins.on_conflict_do_update(index_elements=["fleet", "device_id"], set_={
            "last_seen": ins.excluded.last_seen, "model_name": ins.excluded.model_name,
            "model_version": ins.excluded.model_version}),
            [dict(zip(_DEVICE_COLUMNS, r, strict=True)) for r in rows])


def store_windows(engine: Engine, items: Iterable[tuple[str, str, dict]], texts: list[str] | None = None) -> Stored:
    """Insert (fleet, device, window) items in one transaction (a multi-row insert; a window already stored
    is skipped by the unique key); returns (new, duplicates) with the duplicates' keys. ``texts``: each
    window's :func:`window_json`, when the caller made them already."""
    items = list(items)
    if not items:
        return _stored(0, 0, [])
    now = time.time()
    rows = _window_rows(items, now, texts)
    # last_seen is when the monitor received a window, not when the device says it ended: a clock that runs
    # ahead cannot hide a silent device, and a late window from a spool is a sign of life
    seen = [(fleet, device, now, True, w["model"]["name"], w["model"]["version"])
            for (fleet, device), w in sorted(_latest_windows(items).items())]
    dialect = engine.dialect.name
    if dialect == "postgresql":
        inserted = _store_postgresql(engine, rows, seen)
    else:
        with engine.begin() as conn:
            inserted = _insert_rows(conn, dialect, rows)
            if inserted:
                _upsert_devices(conn, dialect, seen)
    new = len(inserted)
    return _stored(new, len(items) - new, _duplicates(items, inserted))


def _store_postgresql(engine: Engine, rows: list[tuple], seen: list[tuple]) -> set[tuple]:
    """Windows and devices in one statement, autocommitted: one round trip to the server per batch (a
    transaction around two statements took four, each one a wait for the interpreter's lock on the way
    back when other threads validate the next batch)."""
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        cur = conn.connection.dbapi_connection.cursor()
        try:
            cur.execute(_PG_STORE, (*(list(c) for c in zip(*rows, strict=True)),
                                    *(list(c) for c in zip(*seen, strict=True))), binary=True)
            return {tuple(r) for r in cur.fetchall()}
        finally:
            cur.close()


def window_json(window: dict) -> str:
    """A validated window as it is stored (compact JSON)."""
    return _dumps(window)


def _window_rows(items: list[tuple[str, str, dict]], now: float, texts: list[str] | None = None) -> list[tuple]:
    """The windows as table rows (_WINDOW_COLUMNS order), the same window twice in a batch (a redelivery) once."""
    if texts is not None and len(texts) != len(items):
        raise ValueError(f"{len(texts)} texts for {len(items)} windows")
    rows, seen = [], set()
    for i, (fleet, device, w) in enumerate(items):
        key = (fleet, device, w["seq"])
        if key in seen:
            continue
        seen.add(key)
        rows.append((fleet, device, w["seq"], w["model"]["name"], w["model"]["version"], w["start"], w["end"],
                     w["count"], w["errors"], w["latency_ms"].get("p95"),
                     _dumps(w) if texts is None else texts[i], now))
    return rows


def _latest_windows(items: list[tuple[str, str, dict]]) -> dict[tuple[str, str], dict]:
    """(fleet, device) -> its window of the batch that ended last."""
    latest: dict[tuple[str, str], dict] = {}
    for fleet, device, w in items:
        cur = latest.get((fleet, device))
        if cur is None or w["end"] >= cur["end"]:
            latest[(fleet, device)] = w
    return latest


def _duplicates(items: list[tuple[str, str, dict]], inserted: set[tuple]) -> list[tuple]:
    """The keys of the batch's duplicates: a key inserted now counts as new once; any other copy is one.
    (``inserted`` is used up.)"""
    dups = []
    for f, d, w in items:
        key = (f, d, w["seq"])
        if key in inserted:
            inserted.discard(key)
        else:
            dups.append(key)
    return dups


def _touch(conn, engine, fleet: str, device: str, seen: float, model: dict) -> None:
    stmt = _insert(engine, devices).values(fleet=fleet, device_id=device, last_seen=seen, online=True,
                                          model_name=model["name"], model_version=model["version"])
    stmt = stmt.on_conflict_do_update(index_elements=["fleet", "device_id"], set_={
        "last_seen": seen, "model_name": model["name"], "model_version": model["version"]})
    conn.execute(stmt)


def store_status(engine: Engine, fleet: str, device: str, status: dict, received_at: float | None = None) -> None:
    """Upsert a device's status (a validated, canonical message); last_seen is the receive time."""
    model = status.get("model") or {}
    values = {"online": bool(status["online"]), "status": json.dumps(status),
              "last_seen": time.time() if received_at is None else received_at}
    if model.get("name"):
        values.update(model_name=model["name"], model_version=model.get("version"))
    stmt = _insert(engine, devices).values(fleet=fleet, device_id=device, **values)
    stmt = stmt.on_conflict_do_update(index_elements=["fleet", "device_id"], set_=values)
    with engine.begin() as conn:
        conn.execute(stmt)


def store_bench(engine: Engine, fleet: str, device: str, doc: dict) -> None:
    with engine.begin() as conn:
        conn.execute(bench.insert().values(fleet=fleet, device_id=device, received_at=time.time(),
                                           payload=json.dumps(doc)))


def quarantine_messages(engine: Engine, items: list[tuple[str, str, str, bytes]], keep: int = 10_000) -> None:
    """Keep (topic, reason, detail, raw payload) of refused messages; at most ``keep`` rows, the newest."""
    if not items:
        return
    now = time.time()
    rows = [{"received_at": now, "topic": _clip(t, 256), "reason": _clip(r, 32), "detail": _clip(d, 1000),
             "payload": bytes(p)} for t, r, d, p in items]
    with engine.begin() as conn:
        conn.execute(quarantine.insert(), rows)
        newest = conn.execute(select(func.max(quarantine.c.id))).scalar() or 0
        conn.execute(delete(quarantine).where(quarantine.c.id <= newest - keep))


def _clip(s: str, n: int) -> str:
    """A string any database column takes: valid UTF-8, no NUL, at most n characters."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\0")[:n]


def quarantine_counts(engine: Engine) -> dict[str, int]:
    """reason -> messages kept in quarantine."""
    with engine.connect() as conn:
        return {r.reason: r.n for r in conn.execute(
            select(quarantine.c.reason, func.count().label("n")).group_by(quarantine.c.reason))}


def quarantined(engine: Engine, limit: int = 50) -> list[dict]:
    """The newest quarantined messages (payload as bytes)."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(quarantine).order_by(quarantine.c.id.desc()).limit(limit))]


def note_session(engine: Engine, client_id: str, fleet: str) -> tuple[float, str] | None:
    """Record that ``client_id`` connected now for ``fleet``; returns the previous (time, fleet) if any."""
    with engine.begin() as conn:
        row = conn.execute(select(sessions.c.last_connected, sessions.c.fleet)
                           .where(sessions.c.client_id == client_id)).first()
        stmt = _insert(engine, sessions).values(client_id=client_id, fleet=fleet, last_connected=time.time())
        conn.execute(stmt.on_conflict_do_update(index_elements=["client_id"], set_={
            "fleet": fleet, "last_connected": stmt.excluded.last_connected}))
    return (row.last_connected, row.fleet) if row else None


def store_bundle(engine: Engine, manifest: dict) -> None:
    doc = json.dumps(manifest)
    stmt = _insert(engine, bundles).values(name=manifest["name"], version=manifest["version"], manifest=doc)
    with engine.begin() as conn:
        conn.execute(stmt.on_conflict_do_update(index_elements=["name", "version"], set_={"manifest": doc}))


def load_bundles(engine: Engine) -> dict[tuple[str, str], dict]:
    with engine.connect() as conn:
        return {(r.name, r.version): json.loads(r.manifest) for r in conn.execute(select(bundles))}


_KEY = (windows.c.fleet == bindparam("fleet")) & (windows.c.model_name == bindparam("name")) \
    & (windows.c.model_version == bindparam("version"))
# built once: the monitor runs these for every evaluation, and building a statement costs more than running it
_RECENT_DEVICE = (select(windows.c.payload).where(_KEY, windows.c.device_id == bindparam("device"))
                  .order_by(windows.c.seq.desc()).limit(bindparam("limit")))
_RECENT_FLEET = select(windows.c.payload).where(_KEY).order_by(windows.c.end.desc()).limit(bindparam("limit"))
_FIRST = (select(windows.c.p95_ms).where(_KEY, windows.c.device_id == bindparam("device"))
          .order_by(windows.c.seq).limit(bindparam("limit")))


def recent_windows(engine: Engine, fleet: str, device: str | None, model_name: str, model_version: str,
                   limit: int) -> list[dict]:
    """The ``limit`` most recent windows (by seq) of a device, or of every device of a fleet when device is None."""
    params = {"fleet": fleet, "name": model_name, "version": model_version, "limit": limit}
    q = _RECENT_FLEET if device is None else _RECENT_DEVICE
    if device is not None:
        params["device"] = device
    with engine.connect() as conn:
        return [json.loads(r.payload) for r in conn.execute(q, params)]


def first_windows(engine: Engine, fleet: str, device: str, model_name: str, model_version: str,
                  limit: int) -> list[float]:
    """p95 of a device's first windows of a model version (its latency baseline)."""
    with engine.connect() as conn:
        return [r.p95_ms for r in conn.execute(_FIRST, {"fleet": fleet, "device": device, "name": model_name,
                                                        "version": model_version, "limit": limit})
                if r.p95_ms is not None]


_BENCH = (select(bench.c.payload)
          .where((bench.c.fleet == bindparam("fleet")) & (bench.c.device_id == bindparam("device")))
          .order_by(bench.c.id.desc()).limit(20))


def bench_p95(engine: Engine, fleet: str, device: str, model_name: str, model_version: str,
              artifact: str | None) -> float | None:
    """p95 latency (ms) of the device's latest ``edgeops bench --publish`` result for this bundle version
    and artifact file (the one its windows name), or None when it published none."""
    with engine.connect() as conn:
        payloads = [r.payload for r in conn.execute(_BENCH, {"fleet": fleet, "device": device})]
    for payload in payloads:
        for r in _bench_results(payload):
            p95 = _result_p95(r, model_name, model_version, artifact)
            if p95 is not None:
                return p95
    return None


def _bench_results(payload: str) -> list:
    """The ``results`` of a published bench document (none when it is not one)."""
    try:
        return json.loads(payload).get("results") or []
    except (ValueError, AttributeError):
        return []


def _result_p95(r: object, model_name: str, model_version: str, artifact: str | None) -> float | None:
    """A bench result's positive p95 (ms) when it measured this bundle version (and artifact file), else None."""
    if not _measured(r, model_name, model_version, artifact):
        return None
    p95 = (r.get("latency_ms") or {}).get("p95")
    return float(p95) if isinstance(p95, (int, float)) and p95 > 0 else None


def _measured(r: object, model_name: str, model_version: str, artifact: str | None) -> bool:
    """Whether a bench result is of this bundle version and (when given) of this artifact file."""
    if not isinstance(r, dict) or r.get("bundle") != model_name or r.get("bundle_version") != model_version:
        return False
    return not artifact or Path(str(r.get("artifact") or "")).name == artifact


def device_rows(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(select(devices).order_by(devices.c.fleet, devices.c.device_id))]


_ALERT_STATES = select(alerts.c.detector, alerts.c.open).where(
    (alerts.c.fleet == bindparam("fleet")) & (alerts.c.device_id == bindparam("device"))
    & (alerts.c.model_name == bindparam("name")) & (alerts.c.model_version == bindparam("version")))


def alert_states(engine: Engine, fleet: str, device: str, model_name: str, model_version: str) -> dict[str, bool]:
    """detector -> open, for the alerts on record of one device and model version."""
    with engine.connect() as conn:
        rows = conn.execute(_ALERT_STATES, {"fleet": fleet, "device": device, "name": model_name,
                                            "version": model_version}).all()
    return {r.detector: bool(r.open) for r in rows}


def open_alerts(engine: Engine, fleet: str | None = None) -> list[dict]:
    q = select(alerts).where(alerts.c.open.is_(True))
    if fleet:
        q = q.where(alerts.c.fleet == fleet)
    with engine.connect() as conn:
        return [_alert(dict(r._mapping)) for r in conn.execute(q.order_by(alerts.c.opened_at))]


def all_alerts(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        return [_alert(dict(r._mapping)) for r in conn.execute(select(alerts).order_by(alerts.c.opened_at))]


def _alert(row: dict) -> dict:
    row["features"] = json.loads(row["features"] or "[]")
    row["detail"] = json.loads(row["detail"] or "{}")
    return row


def alert_by_id(engine: Engine, alert_id: int) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(select(alerts).where(alerts.c.id == alert_id)).first()
    return _alert(dict(row._mapping)) if row is not None else None


def alert_id_of(engine: Engine, fleet: str, device: str, name: str, version: str, detector: str) -> int | None:
    with engine.connect() as conn:
        return conn.execute(select(alerts.c.id).where(
            alerts.c.fleet == fleet, alerts.c.device_id == device, alerts.c.model_name == name,
            alerts.c.model_version == version, alerts.c.detector == detector)).scalar()


# -- the alert state machine's steps (telemetry/alerts.py decides, these write) --------------------
# every transition is a conditional UPDATE: two monitor processes cannot open or close an alert twice

def alert_state(conn, ident: tuple[str, str, str, str, str]):
    """(id, open, clean_evaluations, opened_at) of the alert of (fleet, device, model, version, detector)."""
    fleet, device, name, version, detector = ident
    t = alerts
    return conn.execute(select(t.c.id, t.c.open, t.c.clean_evaluations, t.c.opened_at).where(
        t.c.fleet == fleet, t.c.device_id == device, t.c.model_name == name, t.c.model_version == version,
        t.c.detector == detector)).first()


def insert_open_alert(conn, engine: Engine, ident: tuple[str, str, str, str, str], finding: dict,
                      now: float) -> bool:
    """Insert the alert open; False when another worker inserted it first. ``finding``: statistic, features
    and detail (JSON text)."""
    fleet, device, name, version, detector = ident
    stmt = _insert(engine, alerts).values(
        fleet=fleet, device_id=device, model_name=name, model_version=version, detector=detector, open=True,
        opened_at=now, closed_at=None, clean_evaluations=0, **finding,
    ).on_conflict_do_nothing(
        index_elements=["fleet", "device_id", "model_name", "model_version", "detector"]
    ).returning(alerts.c.id)
    return conn.execute(stmt).first() is not None


def reopen_alert(conn, alert_id: int, finding: dict, now: float) -> bool:
    """Open a closed alert again; False when it was not closed (another worker reopened it)."""
    res = conn.execute(update(alerts).where(alerts.c.id == alert_id, alerts.c.open.is_(False)).values(
        open=True, opened_at=now, closed_at=None, clean_evaluations=0, **finding))
    return res.rowcount == 1


def close_alert(conn, alert_id: int, clean: int, now: float) -> bool:
    """Close an open alert; False when it was not open (another worker closed it)."""
    res = conn.execute(update(alerts).where(alerts.c.id == alert_id, alerts.c.open.is_(True)).values(
        open=False, closed_at=now, clean_evaluations=clean))
    return res.rowcount == 1


def set_alert(conn, alert_id: int, **values) -> None:
    """Refresh an alert's counters or finding (clean_evaluations, statistic, features, detail)."""
    conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))


def last_p95(engine: Engine) -> dict[tuple[str, str], float | None]:
    """p95 latency of each device's most recent window, from the database (one query)."""
    w = windows
    last = (select(w.c.fleet, w.c.device_id, func.max(w.c.seq).label("seq"))
            .group_by(w.c.fleet, w.c.device_id).subquery())
    q = select(w.c.fleet, w.c.device_id, w.c.p95_ms).join(
        last, (w.c.fleet == last.c.fleet) & (w.c.device_id == last.c.device_id) & (w.c.seq == last.c.seq))
    with engine.connect() as conn:
        return {(r.fleet, r.device_id): r.p95_ms for r in conn.execute(q)}


def prune(engine: Engine, retention_days: float) -> int:
    """Delete windows older than the retention; returns how many."""
    cutoff = time.time() - retention_days * 86400
    with engine.begin() as conn:
        return conn.execute(delete(windows).where(windows.c.received_at < cutoff)).rowcount


def window_series(engine: Engine, fleet: str, device: str, limit: int = 200) -> list[dict]:
    q = (select(windows.c.seq, windows.c.end, windows.c.count, windows.c.errors, windows.c.p95_ms,
                windows.c.model_version)
         .where(windows.c.fleet == fleet, windows.c.device_id == device).order_by(windows.c.seq.desc()).limit(limit))
    with engine.connect() as conn:
        return [dict(r._mapping) for r in reversed(list(conn.execute(q)))]


__all__ = ["connect", "store_windows", "store_status", "quarantine_messages", "quarantine_counts", "quarantined",
           "store_bench", "bench_p95", "store_bundle", "load_bundles", "recent_windows", "first_windows",
           "device_rows", "open_alerts", "all_alerts", "prune", "window_series", "alerts", "update", "windows",
           "devices", "bench", "quarantine"]
