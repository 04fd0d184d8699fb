"""Where a window's time goes in the monitor: each ingest stage alone, per window, and a batch's store.

    python -m benchmarks.ingest_stages [--windows 2000] [--repeat 3] [--batch 1000] [--no-postgresql] [--json FILE]

The load generator's compact windows (benchmarks/loadgen.py: 4 features, about 1,000 bytes of JSON),
timed stage by stage over ``--windows`` of them, the best of ``--repeat`` passes: decoding
(``wire.decode``), checking the decoded window (``wire.check_telemetry``), the check against the
bundle's profile, the window's stored JSON (``store.window_json``), its table row, and its device's
confirmation (``wire.encode_ack``, and the same through ``json`` for comparison). Then
``store.store_windows`` of ``--batch`` windows at a time, new and then again (all duplicates), on SQLite
and on PostgreSQL (a fresh database on the local server, dropped afterwards): median ms per batch.
Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import timeit

from benchmarks.common import print_table, write_json


def _per_window(fn, n: int, repeat: int) -> float:
    """Microseconds per window: the best of ``repeat`` passes of ``fn`` over ``n`` windows."""
    return min(timeit.repeat(fn, number=1, repeat=repeat)) / n * 1e6


def stages(windows: int, repeat: int) -> list[dict]:
    from benchmarks.loadgen import build
    from edge_runtime import wire
    from telemetry import store
    from telemetry.profile_check import check_against_profile

    load = build(windows, 1)
    manifest = load.manifest
    raw = [(t, p) for t, p, _, _ in load.messages]
    now = time.time()
    decoded = [wire.decode(p) for _, p in raw]
    msgs = [wire.parse(t, p, now=now) for t, p in raw]
    items = [(m.fleet, m.device_id, m.doc) for m in msgs]
    texts = [store.window_json(m.doc) for m in msgs]
    profile, labels = manifest.get("reference_profile"), manifest.get("labels")
    timed = [
        ("decode (wire.decode)", lambda: [wire.decode(p) for _, p in raw]),
        ("check (wire.check_telemetry)", lambda: [wire.check_telemetry(d, now) for d in decoded]),
        ("parse: decode + check (wire.parse)", lambda: [wire.parse(t, p, now=now) for t, p in raw]),
        ("profile check", lambda: [check_against_profile(m.doc, profile, labels) for m in msgs]),
        ("stored JSON (store.window_json)", lambda: [store.window_json(m.doc) for m in msgs]),
        ("table row", lambda: store._window_rows(items, now, texts)),
        ("confirmation (wire.encode_ack)", lambda: [wire.encode_ack([m.doc["seq"]], None, now) for m in msgs]),
        ("confirmation through json", lambda: [wire.encode(wire.ack_message([m.doc["seq"]], None, now))
                                               for m in msgs]),
    ]
    return [{"stage": name, "us_per_window": round(_per_window(fn, len(raw), repeat), 2),
             "window_bytes": len(raw[0][1])} for name, fn in timed]


def store_batches(windows: int, batch: int, postgresql: bool) -> list[dict]:
    from benchmarks.loadgen import build
    from benchmarks.scale import _pg_create, _pg_drop
    from edge_runtime import wire
    from telemetry import store

    load = build(windows, 1)
    now = time.time()
    msgs = [wire.parse(t, p, now=now) for t, p, _, _ in load.messages]
    items = [(m.fleet, m.device_id, m.doc) for m in msgs]
    texts = [store.window_json(m.doc) for m in msgs]
    out = []
    with tempfile.TemporaryDirectory(prefix="edgeops-stages-") as tmp:
        urls = [("sqlite", f"sqlite:///{tmp}/stages.db")]
        if postgresql:
            pg = _pg_create()
            urls.append(("postgresql", pg) if pg else ("postgresql", None))
        for name, url in urls:
            if url is None:
                out.append({"database": name, "error": "not reachable"})
                continue
            engine = store.connect(url)
            try:
                row = {"database": name, "batch": batch}
                for phase in ("new", "duplicates"):
                    ms = []
                    for k in range(0, len(items), batch):
                        t0 = time.perf_counter()
                        store.store_windows(engine, items[k:k + batch], texts=texts[k:k + batch])
                        ms.append((time.perf_counter() - t0) * 1000)
                    row[f"{phase}_ms_per_batch"] = round(statistics.median(ms), 2)
                    row["batches"] = len(ms)
                out.append(row)
            finally:
                engine.dispose()
                if name == "postgresql":
                    _pg_drop(url)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=2000, help="windows timed (and stored in batches)")
    ap.add_argument("--repeat", type=int, default=3, help="passes per stage; the best is kept")
    ap.add_argument("--batch", type=int, default=1000, help="windows per store_windows call")
    ap.add_argument("--no-postgresql", action="store_true", help="store on SQLite only")
    ap.add_argument("--json", dest="json_out", help="write the results here")
    args = ap.parse_args(argv)
    if args.windows < 1 or args.repeat < 1 or args.batch < 1:
        ap.error("--windows, --repeat and --batch must be at least 1")
    doc = {"benchmark": "ingest_stages", "windows": args.windows,
           "stages": stages(args.windows, args.repeat),
           "store": store_batches(args.windows, args.batch, not args.no_postgresql)}
    print_table(doc["stages"], [("stage", "stage"), ("us_per_window", "us per window"),
                                ("window_bytes", "window bytes")],
                title=f"one window at a time, best of {args.repeat} passes over {args.windows}")
    print_table(doc["store"], [("database", "database"), ("batch", "batch"), ("batches", "batches"),
                               ("new_ms_per_batch", "new, ms per batch"),
                               ("duplicates_ms_per_batch", "duplicates, ms per batch"), ("error", "error")],
                title="store_windows, median per batch")
    print(json.dumps(doc))
    write_json(args.json_out, doc)
    return doc


if __name__ == "__main__":
    main()
