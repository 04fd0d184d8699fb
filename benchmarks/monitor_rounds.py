"""How long one evaluation round of the monitor takes when every device of a large fleet sent windows.

    python -m benchmarks.monitor_rounds [--devices 1000] [--windows 10] [--rounds 6] [--json FILE]

In one process, on SQLite: ``--devices`` devices of one fleet each store ``--windows`` Breast
Cancer windows of 100 inferences (clean rows, predictions as in the reference); then, for each
variant, ``--rounds`` rounds in which every device is marked as having sent a window and
``FleetMonitor.evaluate_pending`` runs: every device's evaluation, and the fleet-level one
(which merges every device's recent windows). Variants, in the same run:

    every round   the fleet is merged in every round (FLEET_EVAL_SHARE = 0)
    when due      the fleet merge waits FLEET_EVAL_SHARE x its last duration (the monitor's default)

Columns: median, min and max round time in seconds, and per-device evaluation time (the round's
median divided by the devices). Below the table, measured apart in the same run: one device's
evaluation alone (median over all devices: read its windows, merge, all tests, alert state) and
one fleet-level evaluation alone.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import tempfile
import time

import numpy as np

from benchmarks.common import print_table, write_json


def fill(devices: int, windows: int):
    from convert.reference import load_reference_data
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor
    from telemetry.synthetic import make_window, reference_manifest

    data = load_reference_data("breast_cancer")
    predicted = (data.X_train[:, 0] > np.median(data.X_train[:, 0])).astype(int)
    manifest = reference_manifest(data.X_train, predicted, "bc", feature_names=data.feature_names)
    workdir = tempfile.mkdtemp(prefix="edgeops-rounds-")
    atexit.register(shutil.rmtree, workdir, True)      # the benchmark's database, whatever way it ends
    monitor = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{workdir}/m.db", bundles=[manifest])
    rng = np.random.default_rng(0)
    for dev in range(devices):
        msgs = []
        for seq in range(windows):
            idx = rng.integers(0, len(data.X_train), 100)
            w = make_window(data.X_train[idx], manifest, f"dev-{dev}", seq, fleet="f1", start=1000.0 + 10 * seq,
                            predictions=predicted[idx])
            msgs.append((f"edgeops/f1/dev-{dev}/telemetry", json.dumps(w).encode(), 0, 0))
        monitor.ingest(msgs)
    monitor.evaluate_pending()      # alert state and caches warm
    return monitor, manifest


def measure(monitor, manifest, devices: int, rounds: int, share: float) -> list[float]:
    import telemetry.monitor as monitor_module

    monitor_module.FLEET_EVAL_SHARE = share
    monitor._fleet_due.clear()
    model = {"name": manifest["name"], "version": manifest["version"]}
    times = []
    for _ in range(rounds):
        for dev in range(devices):
            monitor._mark("f1", f"dev-{dev}", model)
        t0 = time.perf_counter()
        monitor.evaluate_pending()
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--windows", type=int, default=10, help="stored windows per device")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    logging.disable(logging.WARNING)       # the evaluation's warnings would flood the table; restored below
    try:
        return _run(args)
    finally:
        logging.disable(logging.NOTSET)


def _run(args) -> int:
    import telemetry.monitor as monitor_module

    default_share = monitor_module.FLEET_EVAL_SHARE
    monitor, manifest = fill(args.devices, args.windows)
    rows = []
    for label, share in (("every round", 0.0), ("when due", default_share)):
        times = measure(monitor, manifest, args.devices, args.rounds, share)
        med = float(np.median(times))
        rows.append({"fleet_merge": label, "share": share, "devices": args.devices, "rounds": args.rounds,
                     "median_s": round(med, 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
                     "per_device_ms": round(med / args.devices * 1000, 3), "round_s": [round(t, 3) for t in times]})
    monitor_module.FLEET_EVAL_SHARE = default_share
    model = (manifest["name"], manifest["version"])
    one = []
    for dev in range(args.devices):
        t0 = time.perf_counter()
        monitor.evaluate_device("f1", f"dev-{dev}", *model)
        one.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    monitor.evaluate_device("f1", "*", *model)
    fleet_s = time.perf_counter() - t0
    print_table(rows, [("fleet_merge", "fleet merge"), ("devices", "devices"), ("rounds", "rounds"),
                       ("median_s", "median s"), ("min_s", "min s"), ("max_s", "max s"),
                       ("per_device_ms", "per device ms")],
                title=f"monitor evaluation rounds: {args.devices} devices x {args.windows} stored windows, SQLite")
    ratio = rows[0]["median_s"] / rows[1]["median_s"] if rows[1]["median_s"] else None
    print(f"\nround time, merged every round / when due: {ratio:.2f}x" if ratio else "")
    device_ms = float(np.median(one)) * 1000
    print(f"one device's evaluation alone: {device_ms:.2f} ms (median of {args.devices}); "
          f"one fleet-level evaluation alone: {fleet_s:.2f} s")
    write_json(args.json_out, {"rows": rows, "speedup": round(ratio, 3) if ratio else None,
                               "device_evaluation_ms": round(device_ms, 3), "fleet_evaluation_s": round(fleet_s, 3)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
