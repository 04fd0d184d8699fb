"""The load generator and the scale-out benchmark, end to end: every window published is stored exactly once."""

from __future__ import annotations

import json

from sqlalchemy import func, select

from benchmarks import scale
from benchmarks.loadgen import Publisher, build
from edge_runtime.mqtt import parse_broker_url
from telemetry import store
from telemetry.monitor import FleetMonitor


def test_the_load_generator_s_windows_are_stored_once_and_all_acknowledged(mosquitto, tmp_path):
    load = build(devices=300, windows=2, fleet="lg")
    m = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/m.db", fleet="lg",
                     bundles=[load.manifest], client_id="lg-monitor").start()
    pub = None
    try:
        assert m.connected.wait(10)
        pub = Publisher(mosquitto.url, "lg").connect()
        sent = pub.publish(load, rate=0)
        assert sent["published"] == 600
        assert pub.wait_acked(load.keys, 60) == 600
    finally:
        if pub is not None:
            pub.close()
        m.stop()
    with m.engine.connect() as conn:
        rows = conn.execute(select(store.windows.c.device_id, store.windows.c.seq)).all()
        assert conn.execute(select(func.count()).select_from(store.windows)).scalar() == 600
    assert {(r.device_id, r.seq) for r in rows} == load.keys
    assert m.stats.stored == 600 and not m.stats.rejected


def test_scale_quick_runs_end_to_end(tmp_path):
    out = tmp_path / "scale.json"
    doc = scale.main(["--quick", "--ingest-reps", "1", "--fleet-devices", "50,200", "--plot", str(tmp_path / "s.svg"),
                      "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "scale"
    for row in doc["ingest"]:
        assert row.get("windows_per_s") or row.get("error")
    (mqtt,) = doc["mqtt"]
    assert mqtt["distinct_stored"] == mqtt["stored"] == mqtt["windows"] == 400
    assert mqtt["acked"] == 400 and mqtt["rejected"] == 0
    assert [r["devices"] for r in doc["fleet"]] == [50, 200]
    assert (tmp_path / "s.svg").read_text().lstrip().startswith("<?xml")


def test_scale_measures_publish_to_verdict_and_both_ack_qos(tmp_path):
    doc = scale.main(["--quick", "--skip", "ingest,fleet", "--evaluate", "--ack-qos", "0,1", "--plot", ""])
    assert [r["ack_qos"] for r in doc["mqtt"]] == [0, 1]
    for row in doc["mqtt"]:
        assert row["distinct_stored"] == row["acked"] == 400 and row["windows_no_verdict"] == 0
        # every window was seen by an evaluation of its device that started after the window was stored
        assert row["evaluations"] >= 200 and row["latency_verdict_ms"]["p50"] >= row["latency_stored_ms"]["p50"]
        assert row["windows_per_worker_cpu_s"] > 0


def test_scale_backlog_lets_the_workers_drain_a_queued_load():
    doc = scale.main(["--quick", "--skip", "ingest,fleet", "--backlog", "--ack-qos", "0", "--plot", ""])
    (row,) = doc["mqtt"]
    assert row["backlog"] and row["distinct_stored"] == row["acked"] == 400 and row["duplicates"] == 0
    assert row["windows_per_s"] > 0
