"""Scale-out: windows/s and latency for 1, 2 and 4 monitor workers, and what a fleet verdict costs as fleets grow.

    python -m benchmarks.scale [--devices 10000] [--windows 1] [--rate 10000] [--workers 1,2,4] [--nats]
        [--nats-native 1,2] [--ack-qos 0,1] [--mqtt-client stream,paho] [--repeat 3] [--evaluate]
        [--fleet-devices 1000,10000,100000]
        [--plot docs/scale.svg] [--json FILE] [--quick]

Three parts, each printed as a table and written to the JSON document:

1. **ingest path, one process, no broker**: ``FleetMonitor.ingest`` on the load generator's prepared
   messages, 1,000 per batch (validation against the bundle's profile, one transaction per batch, the
   acks built), on SQLite and on PostgreSQL; windows/s over wall time and per CPU-second of the process.
2. **over MQTT**: a private Mosquitto on loopback, the load generator (``benchmarks.loadgen``: one paho
   client, 10,000 emulated devices, compact windows, QoS 1, at ``--rate``), and N monitor worker processes
   (``FleetMonitor``; its evaluation loop only with ``--evaluate``) sharing ``$share/scale/...`` when N > 1,
   writing one fresh PostgreSQL database (SQLite when PostgreSQL is unreachable, one worker only). Windows/s = windows
   stored / seconds from the first publish until all were stored; latency per window: publish to its row
   written (``received_at``, set in its batch's transaction) and publish to the monitor's ack reaching the
   load generator (after the commit); each worker's CPU time gives windows per worker CPU-second (what one
   process would do with a core to itself). ``--ack-qos 0,1`` runs each worker count with the workers'
   confirmations at QoS 0 and at QoS 1 (``edgeops monitor --ack-qos``); ``--mqtt-client stream,paho``
   runs each with the monitor's own batch-reading connection and with paho-mqtt (``edgeops monitor
   --mqtt-client``); ``--repeat N`` runs each configuration N times and keeps the median run (every run's
   windows/s and per CPU-second are listed with it). With ``--evaluate``, also publish
   to verdict: from a window's publish to the end of its device's first evaluation that started after the
   window was stored (each worker logs its device evaluations; the run waits until every device was
   evaluated after its last window). ``--nats`` adds one worker on the 3-node NATS JetStream cluster of
   ``devtools/nats_cluster.py`` over MQTT 3.1.1 (nats-server 2.9 has no shared subscriptions, so one worker).
   ``--nats-native 1,2`` adds 1 and 2 workers consuming natively from JetStream (``telemetry/jetstream.py``:
   one shared durable consumer, acked after the commit), the load generator on node 1 over MQTT.
3. **fleet verdict vs devices**: ``telemetry.fleet_view.FleetView`` holding 1,000 / 10,000 / 100,000
   emulated devices (one recent window each): one device's update, and one fleet verdict (the merge plus
   the drift tests), medians.

Everything runs on the one machine: broker, load generator, workers and PostgreSQL share its cores, so
the figures are for that machine (the JSON records it). ``--quick`` is a smoke run (a few seconds).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import print_table, write_json
from benchmarks.monitor_throughput import PG_ADMIN

NOWHERE = "mqtt://127.0.0.1:1"
FLEET_DEVICES = "1000,10000,100000"


def _cores() -> str:
    return f"{os.cpu_count()} cores"


def _pg_create() -> str | None:
    """A fresh PostgreSQL database's URL, or None when the server is not reachable."""
    from benchmarks.monitor_throughput import _pg_database

    name = _pg_database()
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name if name else None


def _pg_drop(url: str) -> None:
    from benchmarks.monitor_throughput import _drop_pg

    _drop_pg(url.rsplit("/", 1)[1])


def _engine(url: str):
    from sqlalchemy import create_engine

    return create_engine(url.replace("postgresql://", "postgresql+psycopg://"))


# -- 1. the ingest path in one process ------------------------------------------------------------

def ingest_path(load, db_url: str, reps: int, windows: int, batch: int = 1000) -> dict:
    """Median windows/s of FleetMonitor.ingest over ``reps`` runs (a fresh database each)."""
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    walls, cpus = [], []
    for _ in range(reps):
        with tempfile.TemporaryDirectory(prefix="edgeops-scale-") as tmp:
            pg = _pg_create() if db_url == "postgresql" else None
            if db_url == "postgresql" and pg is None:
                return {"database": "postgresql", "error": "not reachable"}
            url = pg or f"sqlite:///{tmp}/ingest.db"
            try:
                m = FleetMonitor(parse_broker_url(NOWHERE), url, fleet=load.fleet, bundles=[load.manifest])
                gc.freeze()          # as FleetMonitor.start does
                raw = [(t, p, i, 1) for i, (t, p, _, _) in enumerate(load.messages[:windows])]
                t0, c0 = time.perf_counter(), time.process_time()
                for k in range(0, len(raw), batch):
                    m.ingest(raw[k:k + batch])
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                assert m.stats.stored == len(raw), (m.stats.stored, dict(m.stats.rejected))
                m.engine.dispose()
            finally:
                if pg:
                    _pg_drop(pg)
        walls.append(len(raw) / wall)
        cpus.append(len(raw) / cpu)
    return {"database": "postgresql" if db_url == "postgresql" else "sqlite", "windows": len(raw),
            "batch": batch, "runs": reps, "windows_per_s": round(statistics.median(walls)),
            "windows_per_cpu_s": round(statistics.median(cpus)), "all_runs_per_s": [round(x) for x in walls],
            "cores": _cores()}


# -- 2. over MQTT, N worker processes ---------------------------------------------------------------

def _run_worker(spec: dict) -> None:
    """Child: one monitor worker until SIGTERM; prints its counters as JSON."""
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.jetstream import JetStreamMonitor, is_nats_url, nats_address
    from telemetry.monitor import FleetMonitor

    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    manifest = json.loads(Path(spec["manifest"]).read_text())
    # without --evaluate the evaluation loop does not run: what is measured is ingestion alone
    if is_nats_url(spec["broker"]):      # workers binding the same durable consumer (one client id) share it
        make, address = JetStreamMonitor, nats_address(spec["broker"])
    else:
        make, address = FleetMonitor, parse_broker_url(spec["broker"])
    extra = {} if make is JetStreamMonitor else {"ack_qos": spec.get("ack_qos", 1),
                                                 "mqtt_client": spec.get("mqtt_client", "stream")}
    mon = make(address, spec["db"], fleet=spec["fleet"], share=spec.get("share"),
               client_id=spec["client_id"], bundles=[manifest],
               eval_interval=1.0 if spec.get("evaluate") else 1e9, **extra)
    if spec.get("evals"):
        _record_evaluations(mon, spec["evals"])
    mon.start()
    if not mon.connected.wait(30):
        raise SystemExit("the worker could not connect")
    print(json.dumps({"ready": True}), flush=True)
    cpu0 = time.process_time()
    while not stop:
        time.sleep(0.1)
    mon.stop()
    s = mon.stats
    print(json.dumps({"received": s.received, "stored": s.stored, "duplicates": s.duplicates,
                      "rejected": sum(s.rejected.values()), "cpu_s": round(time.process_time() - cpu0, 3)}),
          flush=True)


def _record_evaluations(mon, path: str) -> None:
    """Append ``device start end`` (wall clock) to ``path`` for every device evaluation the worker makes."""
    out = open(path, "a", buffering=1)   # noqa: SIM115 - open for the worker's life
    evaluate_device = mon.evaluate_device

    def timed(fleet, device, name, version):
        started = time.time()
        try:
            return evaluate_device(fleet, device, name, version)
        finally:
            if device != "*":
                out.write(f"{device} {started:.6f} {time.time():.6f}\n")

    mon.evaluate_device = timed


def _evaluations(paths: list[Path]) -> dict[str, list[tuple[float, float]]]:
    """Per device, its evaluations' (start, end), in start order, from the workers' files."""
    import collections

    out = collections.defaultdict(list)
    for path in paths:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3:
                    out[parts[0]].append((float(parts[1]), float(parts[2])))
    return {d: sorted(v) for d, v in out.items()}


def _to_verdict(rows, sent_at: dict, evals: dict) -> tuple[list[float], int]:
    """Per window: from its publish to the end of its device's first evaluation that started after the
    window was stored (the verdict that saw it); and how many windows no evaluation saw."""
    import bisect

    latencies, unseen = [], 0
    for r in rows:
        key = (r.device_id, r.seq)
        runs = evals.get(r.device_id, [])
        i = bisect.bisect_left(runs, (r.received_at, 0.0))
        if key not in sent_at:
            continue
        if i == len(runs):
            unseen += 1
            continue
        latencies.append(runs[i][1] - sent_at[key])
    return latencies, unseen


def _wait_evaluated(evals_paths: list[Path], rows, timeout: float) -> dict:
    """Wait until every stored window's device was evaluated after the window was stored (or ``timeout``)."""
    last = {}
    for r in rows:
        last[r.device_id] = max(last.get(r.device_id, 0.0), r.received_at)
    deadline = time.monotonic() + timeout
    while True:
        evals = _evaluations(evals_paths)
        if all(evals.get(d) and evals[d][-1][0] >= t for d, t in last.items()) or time.monotonic() > deadline:
            return evals
        time.sleep(0.5)


def _start_workers(n: int, broker_url: str, db: str, fleet: str, manifest_path: Path,  # noqa: PLR0913
                   evaluate: bool, evals: list[Path] | None = None, ack_qos: int = 1,
                   mqtt_client: str = "stream") -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = []
    native = broker_url.startswith("nats://")
    shared_id = f"scale-js-{uuid.uuid4().hex[:4]}"
    for i in range(n):
        spec = {"broker": broker_url, "db": db, "fleet": fleet,
                "client_id": shared_id if native else f"scale-worker-{i}-{uuid.uuid4().hex[:4]}",
                "share": "scale" if n > 1 and not native else None, "manifest": str(manifest_path),
                "evaluate": evaluate, "evals": str(evals[i]) if evals else None, "ack_qos": ack_qos,
                "mqtt_client": mqtt_client}
        procs.append(subprocess.Popen([sys.executable, "-m", "benchmarks.scale", "--_worker", json.dumps(spec)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    for p in procs:
        if not p.stdout.readline():
            raise RuntimeError(f"a worker did not start: {p.stderr.read()[-1500:]}")
    return procs


def _stop_workers(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        lines = stdout.strip().splitlines()
        if not lines:
            raise RuntimeError(f"a worker exited without its counters: {stderr[-1500:]}")
        out.append(json.loads(lines[-1]))
    return out


def _wait_stored(engine, total: int, timeout: float) -> tuple[int, float]:
    """Poll the window count until ``total`` rows exist; returns (count, when)."""
    from sqlalchemy import text

    deadline = time.monotonic() + timeout
    stored = 0
    while time.monotonic() < deadline:
        try:
            with engine.connect() as conn:
                stored = conn.execute(text("select count(*) from edgeops_windows")).scalar()
        except Exception:  # noqa: BLE001 - the table appears when a worker starts
            stored = 0
        if stored >= total:
            break
        time.sleep(0.05)
    return stored, time.time()


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    v = sorted(values)
    pick = lambda q: round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)   # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}


def _nats_cluster(workdir: Path):
    """The 3-node NATS JetStream cluster the chaos test starts (devtools/nats_cluster.py), or None."""
    from devtools.nats_cluster import NatsCluster, find_nats

    return NatsCluster(workdir / "nats").start() if find_nats() else None


def _broker(workdir: Path, workers: int, nats: bool, native: bool = False):
    """(worker URL, load generator URL, stop) for a private Mosquitto, or the 3-node NATS cluster (the
    worker on node 0 failing over to the others, over MQTT or natively; the load generator on node 1)."""
    from devtools.brokers import MosquittoBroker

    if nats or native:
        cluster = _nats_cluster(workdir)
        if cluster is None:
            return None
        return cluster.nats_url() if native else cluster.url(0, 1, 2), cluster.url(1), cluster.stop
    # the monitor acknowledges a batch after its commit: let the broker have up to RECEIVE_MAX unacknowledged
    # messages in flight to each worker (the project's test brokers allow 100), and save its persistence file
    # as a production broker would (the test brokers save every second, for the tests that kill them: with
    # 50,000 windows queued that is 50 MB a second). A fresh folder each run: the sessions of an earlier
    # run's workers would otherwise queue every window again.
    from telemetry.monitor import RECEIVE_MAX

    folder = workdir / f"broker-{workers}-{uuid.uuid4().hex[:6]}"
    broker = MosquittoBroker(workdir=folder, extra_config=f"max_inflight_messages {RECEIVE_MAX}\n"
                                                          "autosave_interval 1800").start()

    def stop() -> None:
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)

    return broker.url, broker.url, stop


def over_mqtt(load, workers: int, rate: float, workdir: Path, evaluate: bool = False,  # noqa: PLR0913
              nats: bool = False, native: bool = False, ack_qos: int = 1, backlog: bool = False,
              mqtt_client: str = "stream") -> dict:
    """One run: a broker (Mosquitto, or the NATS cluster with one MQTT worker: it has no shared subscriptions,
    or with ``native`` workers sharing a JetStream consumer), ``workers`` monitor processes, the load generator
    (over MQTT)."""
    from sqlalchemy import text

    from benchmarks.loadgen import Publisher

    broker = _broker(workdir, workers, nats, native)
    if broker is None:
        return {"workers": workers, "broker": "nats", "error": "nats-server not found"}
    label = "nats (3 nodes), JetStream consumer" if native else "nats (3 nodes, MQTT)" if nats else "mosquitto"
    worker_url, pub_url, stop_broker = broker
    pg = _pg_create()
    if pg is None and workers > 1:
        stop_broker()
        return {"workers": workers, "error": "PostgreSQL not reachable (shared workers need it)"}
    db = pg or f"sqlite:///{workdir / f'scale-{workers}.db'}"
    manifest_path = workdir / "manifest.json"
    manifest_path.write_text(json.dumps(load.manifest))
    procs: list[subprocess.Popen] = []
    engine = _engine(db)
    evals_paths = [workdir / f"evals-{workers}-{i}.txt" for i in range(workers)] if evaluate else []
    try:
        procs = _start_workers(workers, worker_url, db, load.fleet, manifest_path, evaluate, evals_paths, ack_qos,
                               mqtt_client)
        pub = Publisher(pub_url, load.fleet).connect()
        keys = load.keys
        try:
            if backlog:      # the workers paused: the broker queues the whole load in their sessions
                for p in procs:
                    p.send_signal(signal.SIGSTOP)
            sent = pub.publish(load, rate)
            if backlog:      # ... then they consume it with no publisher competing for the cores
                sent["started"] = time.time()
                for p in procs:
                    p.send_signal(signal.SIGCONT)
            stored, t_all = _wait_stored(engine, len(keys), 60 + len(keys) / 500)
            acked = pub.wait_acked(keys, 30)
        finally:
            pub.close()
        with engine.connect() as conn:
            rows = conn.execute(text("select device_id, seq, received_at from edgeops_windows")).all()
        devices = len({d for _, _, d, _ in load.messages})
        evals = _wait_evaluated(evals_paths, rows, 60 + devices / 20) if evaluate else {}
        stats = _stop_workers(procs)
        procs = []
        sent_at = sent["sent_at"]
        to_row = [r.received_at - sent_at[(r.device_id, r.seq)] for r in rows if (r.device_id, r.seq) in sent_at]
        to_ack = [t - sent_at[k] for k, t in pub.ack_times.items() if k in sent_at]
        to_verdict, unseen = _to_verdict(rows, sent_at, evals) if evaluate else ([], None)
        seconds = t_all - sent["started"]
        cpu = sum(s.get("cpu_s", 0.0) for s in stats)
        return {"workers": workers, "database": "postgresql" if pg else "sqlite",
                "broker": label, "evaluation": evaluate, "ack_qos": None if native else ack_qos, "backlog": backlog,
                "mqtt_client": None if native else mqtt_client,
                "windows": len(keys), "stored": stored, "distinct_stored": len({(r.device_id, r.seq) for r in rows}),
                "acked": acked, "duplicates": sum(s["duplicates"] for s in stats),
                "rejected": sum(s["rejected"] for s in stats), "per_worker_stored": [s["stored"] for s in stats],
                "target_rate": rate, "publish_rate": sent["publish_rate"],
                "windows_per_s": round(stored / seconds) if seconds > 0 else None,
                "worker_cpu_s": round(cpu, 2), "windows_per_worker_cpu_s": round(stored / cpu) if cpu > 0 else None,
                "latency_stored_ms": _percentiles(to_row), "latency_acked_ms": _percentiles(to_ack),
                "latency_verdict_ms": _percentiles(to_verdict), "evaluations": sum(len(v) for v in evals.values()),
                "windows_no_verdict": unseen, "cores": _cores()}
    finally:
        if procs:
            for p in procs:
                p.kill()
        engine.dispose()
        stop_broker()
        if pg:
            _pg_drop(pg)


# -- 3. fleet verdicts as fleets grow ---------------------------------------------------------------

def fleet_cost(devices: int, manifest: dict, templates: list[dict], rounds: int = 5) -> dict:
    """FleetView with ``devices`` devices: the time to fill it, one device's update, one fleet verdict."""
    from telemetry.evaluate import MonitorConfig, evaluate
    from telemetry.fleet_view import FleetView

    view = FleetView()
    name, version = manifest["name"], manifest["version"]
    t0 = time.perf_counter()
    for i in range(devices):
        view.update("f", name, version, f"dev-{i:06d}", [templates[i % len(templates)]])
    fill_s = time.perf_counter() - t0
    update_ms, verdict_ms = [], []
    config = MonitorConfig()
    for r in range(rounds * 20):
        t = time.perf_counter()
        view.update("f", name, version, f"dev-{(r * 7919) % devices:06d}", [templates[(r + 1) % len(templates)]])
        update_ms.append((time.perf_counter() - t) * 1000)
    for _ in range(rounds):
        t = time.perf_counter()
        merged = view.merged("f", name, version)
        evaluate([merged], manifest, config, dependence_from=view.sample_windows("f", name, version))
        verdict_ms.append((time.perf_counter() - t) * 1000)
    return {"devices": devices, "fill_s": round(fill_s, 2),
            "device_update_ms": round(statistics.median(update_ms), 3),
            "fleet_verdict_ms": round(statistics.median(verdict_ms), 2),
            "fleet_verdict_max_ms": round(max(verdict_ms), 2), "cores": _cores()}


# -- the plot ------------------------------------------------------------------------------------------

def plot(path: Path, ingest: list[dict], mqtt: list[dict], fleets: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 5.2))
    ok = [r for r in mqtt if r.get("windows_per_s") and r.get("broker", "mosquitto") == "mosquitto"]
    lines: dict[tuple, list[dict]] = {}
    for r in ok:      # one line per MQTT client, ack QoS and backlog setting
        lines.setdefault((r.get("mqtt_client") or "paho", r.get("ack_qos"), r.get("backlog", False)), []).append(r)
    for (client, qos, backlog), rs in sorted(lines.items(), key=lambda kv: str(kv[0])):
        rs.sort(key=lambda r: r["workers"])
        a.plot([r["workers"] for r in rs], [r["windows_per_s"] for r in rs], "o-" if client == "stream" else "s--",
               label=f"over Mosquitto, {client}, acks QoS {qos}{', queued load' if backlog else ''}")
    for r in mqtt:
        if r.get("windows_per_s") and r.get("broker", "mosquitto") != "mosquitto":
            a.plot([r["workers"]], [r["windows_per_s"]], "D",
                   label=f"over {r['broker']}, {r['workers']} worker{'s' if r['workers'] > 1 else ''}")
    for r in ingest:
        if r.get("windows_per_s"):
            a.axhline(r["windows_per_s"], ls="--", lw=1, color="gray" if r["database"] == "sqlite" else "tab:green",
                      label=f"ingest path, 1 process, {r['database']}")
    a.axhline(10_000, ls=":", color="tab:red", label="target 10,000/s")
    a.set_xlabel("monitor worker processes")
    a.set_ylabel("windows/s")
    a.set_xticks(sorted({r["workers"] for r in ok}) or [1])
    rates = sorted({round(r["target_rate"]) for r in ok if r.get("target_rate")})
    a.set_title(f"ingest ({_cores()}, shared with broker, load, database)"
                + (f"; load published at {', '.join(f'{x:,}' for x in rates)}/s" if rates else ""), fontsize=9)
    a.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    b.loglog([r["devices"] for r in fleets], [r["fleet_verdict_ms"] for r in fleets], "o-", label="fleet verdict")
    b.loglog([r["devices"] for r in fleets], [r["device_update_ms"] for r in fleets], "s-", label="one device's update")
    b.axhline(50, ls=":", color="tab:red", label="target 50 ms (1,000 and 10,000 devices)")
    b.set_xlabel("emulated devices in the fleet")
    b.set_ylabel("ms (median)")
    b.set_title(f"fleet evaluation cost ({_cores()})", fontsize=9)
    b.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)
    print(f"wrote {path}")


def _median_run(results: list[dict]) -> dict:
    """Of several runs of one configuration, the median one by windows/s, with every run's figures."""
    ok = sorted((r for r in results if r.get("windows_per_s")), key=lambda r: r["windows_per_s"])
    if not ok:
        return results[-1]
    if len(results) == 1:
        return ok[0]
    return {**ok[len(ok) // 2], "all_runs_per_s": [r.get("windows_per_s") for r in results],
            "all_runs_per_cpu_s": [r.get("windows_per_worker_cpu_s") for r in results]}


def _fleet_templates(manifest: dict, n: int = 16) -> list[dict]:
    import numpy as np

    from telemetry.synthetic import make_window

    rng = np.random.default_rng(1)
    features = len(manifest["reference_profile"]["features"])
    out = []
    for _ in range(n):
        X = rng.normal(size=(100, features))
        out.append(make_window(X, manifest, "x", 0, predictions=(X[:, 0] > 0).astype(int)))
    return out


def main(argv: list[str] | None = None) -> dict:  # noqa: C901 - a sequence of optional parts
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=1, help="windows per device")
    ap.add_argument("--rate", type=float, default=10_000, help="target publish rate, windows/s")
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--nats", action="store_true",
                    help="also one worker on the 3-node NATS JetStream cluster over MQTT (devtools/nats_cluster.py)")
    ap.add_argument("--nats-native", default="", metavar="WORKERS",
                    help="also these numbers of workers consuming natively from JetStream on the 3-node NATS "
                         "cluster (e.g. 1,2; the devices' load over MQTT)")
    ap.add_argument("--ack-qos", default="1", metavar="QOS[,QOS]",
                    help="QoS of the workers' confirmations over MQTT (edgeops monitor --ack-qos); 0,1 runs each "
                         "worker count with both")
    ap.add_argument("--mqtt-client", default="stream", metavar="CLIENT[,CLIENT]",
                    help="the workers' MQTT connection (edgeops monitor --mqtt-client): stream, paho, or both")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each MQTT configuration; the median run (by windows/s) is kept")
    ap.add_argument("--backlog", action="store_true",
                    help="the workers paused while the load is published (the broker queues it), then resumed: "
                         "stored/s is how fast they drain it with no publisher on the same cores (latencies "
                         "then count the wait)")
    ap.add_argument("--evaluate", action="store_true",
                    help="workers also evaluate every device that sent windows (off: ingestion alone is measured)")
    ap.add_argument("--ingest-reps", type=int, default=3)
    ap.add_argument("--ingest-windows", type=int, default=10_000, help="windows per ingest-path run")
    ap.add_argument("--fleet-devices", default=FLEET_DEVICES)
    ap.add_argument("--skip", default="", help="parts to leave out: ingest,mqtt,fleet")
    ap.add_argument("--plot", default="docs/scale.svg", help="'' for none")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 200 devices x 2 windows, 1 worker")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        _run_worker(json.loads(args._worker))
        return {}
    if args.quick:
        args.devices, args.windows, args.rate, args.workers = 200, 2, 2000, "1"
        args.ingest_reps = 1
        args.fleet_devices = "100,1000" if args.fleet_devices == FLEET_DEVICES else args.fleet_devices
    from benchmarks.loadgen import build
    from benchmarks.machine import machine_info

    skip = set(filter(None, args.skip.split(",")))
    started = time.time()
    load = build(args.devices, args.windows, fleet="scale")
    doc = {"benchmark": "scale", "machine": machine_info(), "load_average": os.getloadavg(),
           "devices": args.devices, "windows_per_device": args.windows,
           "window_bytes": len(load.messages[0][1]), "ingest": [], "mqtt": [], "fleet": []}
    if "ingest" not in skip:
        for db in ("sqlite", "postgresql"):
            doc["ingest"].append(ingest_path(load, db, args.ingest_reps, args.ingest_windows))
        print_table(doc["ingest"], [("database", "database"), ("windows", "windows"), ("batch", "batch"),
                                    ("windows_per_s", "windows/s (median)"), ("windows_per_cpu_s", "per CPU-s"),
                                    ("all_runs_per_s", "runs"), ("cores", "machine")],
                    title=f"ingest path, one process, no broker ({doc['window_bytes']}-byte windows)")
    if "mqtt" not in skip:
        with tempfile.TemporaryDirectory(prefix="edgeops-scale-") as tmp:
            qos = [int(x) for x in args.ack_qos.split(",") if x.strip()]
            clients = [c.strip() for c in args.mqtt_client.split(",") if c.strip()]

            def runs(**kw) -> dict:
                return _median_run([over_mqtt(load, rate=args.rate, workdir=Path(tmp), evaluate=args.evaluate, **kw)
                                    for _ in range(max(1, args.repeat))])

            for n in [int(x) for x in args.workers.split(",") if x.strip()]:
                for client in clients:
                    for q in qos:
                        doc["mqtt"].append(runs(workers=n, ack_qos=q, backlog=args.backlog, mqtt_client=client))
            if args.nats:
                for client in clients:
                    for q in qos:
                        doc["mqtt"].append(runs(workers=1, nats=True, ack_qos=q, mqtt_client=client))
            for n in [int(x) for x in args.nats_native.split(",") if x.strip()]:
                doc["mqtt"].append(runs(workers=n, native=True, backlog=args.backlog))
        rows = [{**r, **{f"stored_{k}": v for k, v in (r.get("latency_stored_ms") or {}).items()},
                 **{f"acked_{k}": v for k, v in (r.get("latency_acked_ms") or {}).items()},
                 **{f"verdict_{k}": v for k, v in (r.get("latency_verdict_ms") or {}).items()}} for r in doc["mqtt"]]
        print_table(rows, [("workers", "workers"), ("broker", "broker"), ("mqtt_client", "client"),
                           ("ack_qos", "ack QoS"),
                           ("database", "database"), ("windows", "sent"),
                           ("distinct_stored", "stored"), ("acked", "acked"), ("duplicates", "dups"),
                           ("publish_rate", "published/s"), ("windows_per_s", "stored/s"),
                           ("windows_per_worker_cpu_s", "per worker CPU-s"),
                           *([("all_runs_per_s", "runs/s"), ("all_runs_per_cpu_s", "runs per CPU-s")]
                             if args.repeat > 1 else []),
                           ("stored_p50", "to row p50 ms"), ("stored_p95", "p95"),
                           ("acked_p50", "to ack p50 ms"), ("acked_p95", "p95")]
                    + ([("verdict_p50", "to verdict p50 ms"), ("verdict_p95", "p95"),
                        ("windows_no_verdict", "no verdict")] if args.evaluate else []) + [("cores", "machine")],
                    title=f"over one Mosquitto{' and the 3-node NATS cluster' if args.nats else ''}: "
                          f"{args.devices} devices x {args.windows} windows, target "
                          f"{args.rate:.0f}/s, workers sharing $share/scale (2 cores: broker, load generator, "
                          "workers and PostgreSQL on them)" if os.cpu_count() == 2 else "over one Mosquitto")
    if "fleet" not in skip:
        templates = _fleet_templates(load.manifest)
        doc["fleet"] = [fleet_cost(int(n), load.manifest, templates) for n in args.fleet_devices.split(",")]
        print_table(doc["fleet"], [("devices", "devices"), ("fill_s", "fill s"),
                                   ("device_update_ms", "device update ms"), ("fleet_verdict_ms", "fleet verdict ms"),
                                   ("fleet_verdict_max_ms", "max"), ("cores", "machine")],
                    title="fleet verdict vs fleet size (FleetView, one recent window per device)")
    doc["seconds"] = round(time.time() - started, 1)
    if args.plot and doc["fleet"]:
        plot(Path(args.plot), doc["ingest"], doc["mqtt"], doc["fleet"])
    print(json.dumps({k: v for k, v in doc.items() if k != "machine"}))
    write_json(args.json_out, doc)
    return doc


if __name__ == "__main__":
    main()
