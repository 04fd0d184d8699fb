"""How many telemetry windows per second does one monitor process take? And two sharing the load?

    python -m benchmarks.monitor_throughput [--devices 2000] [--windows 10] [--processes 1,2] [--json FILE]

A private Mosquitto on loopback; a publisher process sends ``devices x windows`` valid windows
(Breast Cancer, 30 features, 100 inferences each; built beforehand with the device's statistics
code) with QoS 1 as fast as the broker takes them; monitor processes (``FleetMonitor``, the code
behind ``edgeops monitor``) validate every message against the schema and the bundle's profile,
store it (SQLite for one process; PostgreSQL for two sharing ``$share/bench/...``, or SQLite when
PostgreSQL is not reachable) and evaluate drift per device and per fleet. Ingestion rate = stored
windows / seconds from the first to the last stored window; the table also gives the evaluations
done, and how long the evaluation backlog took to drain after the last window.

Target (issue 5): at least 2,000 windows/s for one process on a 2-core machine (2,000 devices
reporting every second).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import print_table, write_json

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _manifest():
    from convert.reference import load_reference_data
    from telemetry.synthetic import reference_manifest

    d = load_reference_data("breast_cancer")
    return d, reference_manifest(d.X_train, d.y_train, "bench-bc", feature_names=d.feature_names)


def _run_monitor(spec: dict) -> None:
    """Child: a FleetMonitor until SIGTERM; prints its counters as JSON."""
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.evaluate import MonitorConfig
    from telemetry.monitor import FleetMonitor

    _, manifest = _manifest()
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    mon = FleetMonitor(parse_broker_url(spec["broker"]), spec["db"], fleet="bench", share=spec.get("share"),
                       client_id=spec["client_id"], bundles=[manifest], config=MonitorConfig(),
                       eval_interval=spec.get("eval_interval", 1.0))
    evaluated = [0, 0.0]
    orig = mon.evaluate_device

    def counting(*a, **kw):
        t = time.perf_counter()
        try:
            return orig(*a, **kw)
        finally:
            evaluated[0] += 1
            evaluated[1] += time.perf_counter() - t

    mon.evaluate_device = counting
    mon.start()
    print(json.dumps({"ready": True}), flush=True)
    while not stop:
        time.sleep(0.1)
    mon.stop()
    s = mon.stats
    print(json.dumps({"received": s.received, "stored": s.stored, "duplicates": s.duplicates,
                      "rejected": dict(s.rejected), "evaluations": evaluated[0],
                      "evaluation_seconds": round(evaluated[1], 3)}), flush=True)


def _run_publisher(spec: dict) -> None:
    """Child: publish devices x windows prepared windows with QoS 1, as fast as the broker takes them."""
    import numpy as np
    import paho.mqtt.client as mqtt

    from telemetry.synthetic import make_window

    d, manifest = _manifest()
    rng = np.random.default_rng(0)
    templates = []
    for _ in range(50):
        idx = rng.integers(0, len(d.X_train), 100)
        templates.append(make_window(d.X_train[idx], manifest, "x", 0, fleet="bench", predictions=d.y_train[idx]))
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}",
                    protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", spec["port"])
    c.loop_start()
    payloads = []
    for w in range(spec["windows"]):
        for dev in range(spec["devices"]):
            doc = dict(templates[(dev + w) % len(templates)])
            doc.update(device_id=f"d{dev:05d}", seq=w, start=1000.0 + w, end=1001.0 + w)
            payloads.append((f"edgeops/bench/d{dev:05d}/telemetry", json.dumps(doc, separators=(",", ":"))))
    print(json.dumps({"publishing": len(payloads)}), flush=True)
    t0 = time.perf_counter()
    infos = [c.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(120)
    print(json.dumps({"published": len(payloads), "seconds": round(time.perf_counter() - t0, 3),
                      "bytes": int(np.mean([len(p) for _, p in payloads[:200]]))}), flush=True)
    c.loop_stop()
    c.disconnect()


def _pg_database() -> str | None:
    try:
        from sqlalchemy import create_engine, text

        name = f"edgeops_bench_{uuid.uuid4().hex[:8]}"
        admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"create database {name}"))
        admin.dispose()
        return name
    except Exception:  # noqa: BLE001 - PostgreSQL is optional here
        return None


def _drop_pg(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"drop database if exists {name} with (force)"))
    admin.dispose()


def _start_monitors(monitors: list[subprocess.Popen], processes: int, broker_url: str, db: str, env: dict) -> None:
    """Start monitor processes on the broker and database (one shared subscription when several) into
    monitors (so that the caller stops those started even when a later one fails); each has said it
    started when this returns."""
    for i in range(processes):
        spec = {"broker": broker_url, "db": db, "client_id": f"bench-mon-{i}",
                "share": "bench" if processes > 1 else None}
        monitors.append(subprocess.Popen([sys.executable, "-m", "benchmarks.monitor_throughput", "--_monitor",
                                          json.dumps(spec)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True, env=env))
    for p in monitors:
        line = p.stdout.readline()
        if not line:
            raise RuntimeError(f"a monitor did not start: {p.stderr.read()[-1500:]}")


def _start_publisher(port: int, devices: int, windows: int, env: dict) -> subprocess.Popen:
    """The publisher process, once its windows are built (publishing starts when this returns)."""
    pub = subprocess.Popen([sys.executable, "-m", "benchmarks.monitor_throughput", "--_publisher",
                            json.dumps({"port": port, "devices": devices, "windows": windows})],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not pub.stdout.readline():          # the windows are built: publishing starts now
        raise RuntimeError(f"the publisher failed: {pub.stderr.read()[-1500:]}")
    return pub


def _stored_windows(engine) -> int:
    from sqlalchemy import text

    try:
        with engine.connect() as conn:
            return conn.execute(text("select count(*) from edgeops_windows")).scalar()
    except Exception:  # noqa: BLE001 - the table appears when a monitor starts
        return 0


def _poll_stored(engine, total: int) -> list[tuple[float, int]]:
    """(time, windows stored) every 20 ms until all total are stored or the deadline passes."""
    samples = []
    deadline = time.monotonic() + 60 + total / 200
    while time.monotonic() < deadline:
        stored = _stored_windows(engine)
        samples.append((time.monotonic(), stored))
        if stored >= total:
            break
        time.sleep(0.02)
    return samples


def _rates(samples: list[tuple[float, int]], stored: int, t_publish: float) -> tuple[float | None, float | None]:
    """(end to end, ingestion) windows per second.

    End to end: from the start of publishing to the first poll that saw everything stored;
    ingestion: from the last poll that saw nothing stored yet to the same moment.
    """
    last = next((t for t, n in samples if n >= stored), None)
    t_first = max((t for t, n in samples if n == 0), default=t_publish)
    return _per_second(stored, t_publish, last), _per_second(stored, t_first, last)


def _per_second(n: int, start: float, end: float | None) -> float | None:
    """n over the seconds from start to end; None without a later end."""
    return (n / (end - start)) if end and end > start else None


def _stop_monitors(monitors: list[subprocess.Popen]) -> list[dict]:
    """SIGTERM each monitor; the counters each prints as it ends."""
    stats = []
    for p in monitors:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
        if not out.strip():
            raise RuntimeError(f"a monitor exited without its counters: {err[-1500:]}")
        stats.append(json.loads(out.strip().splitlines()[-1]))
    return stats


def _monitor_totals(stats: list[dict]) -> dict:
    """The monitors' counters, summed."""
    return {"evaluations": sum(s["evaluations"] for s in stats),
            "evaluations_per_busy_s": round(sum(s["evaluations"] for s in stats)
                                            / max(1e-9, sum(s["evaluation_seconds"] for s in stats)), 1),
            "duplicates": sum(s["duplicates"] for s in stats),
            "rejected": sum(sum(s["rejected"].values()) for s in stats),
            "per_process_stored": [s["stored"] for s in stats]}


def _database(processes: int, workdir: Path) -> tuple[str | None, str]:
    """(a new PostgreSQL database's name or None, the URL): several monitors share PostgreSQL, one uses SQLite."""
    pg = _pg_database() if processes > 1 else None
    db = (PG_ADMIN.rsplit("/", 1)[0] + "/" + pg) if pg else f"sqlite:///{workdir / f'monitor-{processes}.db'}"
    return pg, db


def _rounded(rate: float | None) -> float | None:
    return round(rate, 1) if rate else None


def run(processes: int, devices: int, windows: int, workdir: Path) -> dict:
    from sqlalchemy import create_engine

    from devtools.brokers import MosquittoBroker

    pg, db = _database(processes, workdir)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    broker = MosquittoBroker(workdir=workdir / f"broker-{processes}").start()
    monitors: list[subprocess.Popen] = []
    try:
        _start_monitors(monitors, processes, broker.url, db, env)
        time.sleep(1.0)
        pub = _start_publisher(broker.port, devices, windows, env)
        engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
        total = devices * windows
        t_publish = time.monotonic()
        samples = _poll_stored(engine, total)
        stored = samples[-1][1] if samples else 0
        pub_out = json.loads(pub.communicate(timeout=120)[0].strip().splitlines()[-1])
        engine.dispose()
        rate, ingest_rate = _rates(samples, stored, t_publish)
        time.sleep(3.0)   # let the evaluation loops catch up before stopping them
        stats = _stop_monitors(monitors)
        return {"processes": processes, "database": "postgresql" if pg else "sqlite", "devices": devices,
                "windows_sent": total, "windows_stored": stored, "window_bytes": pub_out["bytes"],
                "publish_seconds": pub_out["seconds"], "end_to_end_windows_per_s": _rounded(rate),
                "ingest_windows_per_s": _rounded(ingest_rate), **_monitor_totals(stats)}
    finally:
        for p in monitors:
            if p.poll() is None:
                p.kill()
        broker.stop()
        if pg:
            _drop_pg(pg)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=10, help="windows per device")
    ap.add_argument("--processes", default="1,2", help="monitor process counts to measure, e.g. 1,2")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--_monitor", help=argparse.SUPPRESS)
    ap.add_argument("--_publisher", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._monitor:
        _run_monitor(json.loads(args._monitor))
        return {}
    if args._publisher:
        _run_publisher(json.loads(args._publisher))
        return {}
    from benchmarks.machine import machine_info

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-monitor-") as tmp:
        for n in [int(x) for x in args.processes.split(",")]:
            rows.append(run(n, args.devices, args.windows, Path(tmp)))
    print_table(rows, [("processes", "monitors"), ("database", "database"), ("windows_sent", "sent"),
                       ("windows_stored", "stored"), ("duplicates", "dups"), ("rejected", "rejected"),
                       ("ingest_windows_per_s", "ingest/s"), ("end_to_end_windows_per_s", "end-to-end/s"),
                       ("evaluations", "evaluations"),
                       ("evaluations_per_busy_s", "evals/busy s"),
                       ("window_bytes", "bytes/window")],
                title=f"monitor throughput: {args.devices} devices x {args.windows} windows on loopback Mosquitto")
    doc = {"benchmark": "monitor_throughput", "machine": machine_info(), "results": rows,
           "target_windows_per_s": 2000}
    write_json(args.json_out, doc)
    return doc


if __name__ == "__main__":
    main()
