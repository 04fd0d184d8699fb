"""The monitor: validation, dedup, restart without loss, shared subscriptions, drift, latency and silence alerts."""

from __future__ import annotations

import json
import time
import uuid

import jsonschema
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import text

from edge_runtime.mqtt import parse_broker_url
from helpers import eventually
from telemetry import store
from telemetry.evaluate import MonitorConfig
from telemetry.monitor import FleetMonitor
from telemetry.profile_check import Rejected, parse
from telemetry.synthetic import make_window, reference_manifest, status_doc

SCHEMA = json.loads(open("edge_runtime/schemas/telemetry.schema.json").read())
PG = "postgresql+psycopg://postgres@127.0.0.1:5432/"
PRIORS = None


@pytest.fixture(scope="module")
def bc():
    from convert.reference import load_reference_data

    global PRIORS
    d = load_reference_data("breast_cancer")
    manifest = reference_manifest(d.X_train, d.y_train, "bc-model", feature_names=d.feature_names)
    PRIORS = manifest["reference_profile"]["class_priors"]["priors"]
    return d, manifest


def windows_for(device, reference, n_windows, shift=None, start_seq=0, latency=2.0, rng=None, t0=None):
    """Windows of 100 rows drawn from the training data of ``reference`` (the ``bc`` fixture: the reference
    data itself for clean streams: drawing many windows from a 171-row test set would compare its own
    sampling noise against the reference at 1000-sample power)."""
    d, manifest = reference
    X, size = d.X_train, 100
    rng = rng or np.random.default_rng(0)
    t0 = time.time() - 10 * n_windows if t0 is None else t0
    out = []
    for i in range(n_windows):
        idx = rng.integers(0, len(X), size)
        rows = X[idx].astype(np.float64)
        if shift is not None:
            rows = shift(rows)
        preds = rng.choice(2, size=size, p=PRIORS)
        out.append(make_window(rows, manifest, device, start_seq + i, fleet="f1", start=t0 + 10 * i,
                               predictions=preds, latencies_ms=np.full(size, latency)))
    return out


def publish(port, items, qos=1):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:6]}", protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.loop_start()
    infos = [c.publish(topic, payload if isinstance(payload, bytes) else json.dumps(payload), qos=qos)
             for topic, payload in items]
    for info in infos:
        info.wait_for_publish(30)
    c.loop_stop()
    c.disconnect()


def topic(device, kind="telemetry", fleet="f1"):
    return f"edgeops/{fleet}/{device}/{kind}"


def wait(predicate, timeout=30.0):
    return eventually(predicate, timeout)


def stored_count(engine):
    with engine.connect() as conn:
        return conn.execute(text("select count(*) from edgeops_windows")).scalar()


def test_the_hand_written_validator_agrees_with_the_json_schema(bc):
    d, manifest = bc
    good = windows_for("dev-1", bc, 1)[0]
    jsonschema.validate(good, SCHEMA)
    assert parse(topic("dev-1"), json.dumps(good).encode()).kind == "telemetry"
    broken = []
    for mutate in (
        lambda w: w.update(count=-1), lambda w: w.update(seq="7"), lambda w: w.pop("features"),
        lambda w: w.update(schema_version=2), lambda w: w["features"]["count"].__setitem__(0, -3),
        lambda w: w["latency_ms"].update(gamma=0.5), lambda w: w.update(type="status"),
        lambda w: w["features"].update(nan="x"), lambda w: w.update(device_id="bad/id"),
    ):
        w = json.loads(json.dumps(good))
        mutate(w)
        broken.append(w)
    for w in broken:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(w, SCHEMA)
        with pytest.raises(Rejected):
            parse(topic("dev-1"), json.dumps(w).encode())


def test_a_redelivered_window_is_stored_once(tmp_path, bc):
    d, manifest = bc
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest])
    ws = windows_for("dev-1", bc, 3)
    batch = [(topic("dev-1"), json.dumps(w).encode(), 0, 0) for w in ws + ws[:2]]
    m.ingest(batch)
    assert (m.stats.stored, m.stats.duplicates) == (3, 2)
    assert stored_count(m.engine) == 3


def test_malformed_messages_are_rejected_for_the_right_reason_while_valid_traffic_flows(mosquitto, tmp_path, bc):
    d, manifest = bc
    m = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     client_id="mon-malformed").start()
    try:
        assert m.connected.wait(10)
        good = windows_for("dev-ok", bc, 20)
        base = {**json.loads(json.dumps(good[0])), "device_id": "dev-bad"}
        bad_kinds = {
            "malformed_json": lambda i: b"{not json",
            "schema_version": lambda i: {**base, "schema_version": 99, "seq": i},
            "bad_value": lambda i: {**base, "count": -5, "seq": i},
            "device_mismatch": lambda i: {**base, "device_id": "someone-else", "seq": i},
            "histogram_mismatch": lambda i: {**base, "seq": i, "features": {**base["features"],
                                             "hist": [h[:-1] for h in base["features"]["hist"]]}},
            "oversized": lambda i: b"[" + b"1," * 200_000 + b"1]",
            "not_an_object": lambda i: b"[1, 2, 3]",
            "feature_count_mismatch": lambda i: {**base, "seq": i,
                                                 "features": {k: v[:5] for k, v in base["features"].items()}},
        }
        items = []
        per_kind = 125
        for make in bad_kinds.values():
            items += [(topic("dev-bad"), make(1000 + i)) for i in range(per_kind)]
        rng = np.random.default_rng(1)
        order = rng.permutation(len(items))
        mixed = [items[i] for i in order]
        for i, w in enumerate(good):  # valid traffic interleaved
            mixed.insert(i * 50, (topic("dev-ok"), w))
        publish(mosquitto.port, mixed)
        assert wait(lambda: sum(m.stats.rejected.values()) == per_kind * len(bad_kinds) and m.stats.stored == 20)
        assert dict(m.stats.rejected) == {reason: per_kind for reason in bad_kinds}
    finally:
        m.stop()


def test_a_monitor_restart_loses_no_window(mosquitto, tmp_path, bc):
    d, manifest = bc
    db = f"sqlite:///{tmp_path}/m.db"
    m = FleetMonitor(parse_broker_url(mosquitto.url), db, bundles=[manifest], client_id="mon-restart").start()
    assert m.connected.wait(10)
    ws = windows_for("dev-1", bc, 60)
    publish(mosquitto.port, [(topic("dev-1"), w) for w in ws[:20]])
    assert wait(lambda: m.stats.stored == 20)
    m.stop()                                   # the monitor goes down ...
    publish(mosquitto.port, [(topic("dev-1"), w) for w in ws[20:]])   # ... while devices keep reporting
    m2 = FleetMonitor(parse_broker_url(mosquitto.url), db, bundles=[manifest], client_id="mon-restart").start()
    try:
        assert wait(lambda: stored_count(m2.engine) == 60)
        with m2.engine.connect() as conn:
            seqs = [r[0] for r in conn.execute(text("select seq from edgeops_windows order by seq"))]
        assert seqs == list(range(60))
    finally:
        m2.stop()


def test_two_shared_subscription_monitors_count_each_window_once_and_agree(mosquitto, pg_url, bc):
    d, manifest = bc
    cfg = MonitorConfig(min_samples=200)
    monitors = [FleetMonitor(parse_broker_url(mosquitto.url), pg_url, share="g1", client_id=f"mon-{i}",
                             bundles=[manifest], config=cfg, eval_interval=0.2).start() for i in range(2)]
    try:
        assert all(m.connected.wait(10) for m in monitors)
        items = []
        for k in range(6):
            shift = (lambda r: r * 1.8) if k < 2 else None   # dev-0 and dev-1 drift
            items += [(topic(f"dev-{k}"), w) for w in windows_for(f"dev-{k}", bc, 15, shift=shift,
                                                                  rng=np.random.default_rng(k))]
        publish(mosquitto.port, items)
        assert wait(lambda: stored_count(monitors[0].engine) == 90)
        assert sum(m.stats.stored for m in monitors) == 90
        assert all(m.stats.stored > 0 for m in monitors)   # the load was split
        for m in monitors:
            m.evaluate_pending()
        opened = {(a["device_id"], a["detector"]) for a in store.open_alerts(monitors[0].engine)}
        assert ("dev-0", "feature_drift") in opened and ("dev-1", "feature_drift") in opened
        assert not any(dev in {"dev-2", "dev-3", "dev-4", "dev-5"} for dev, _ in opened), opened
    finally:
        for m in monitors:
            m.stop()


def test_drift_opens_an_alert_and_hysteresis_closes_it(tmp_path, bc):
    d, manifest = bc
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     config=MonitorConfig(recent_windows=3, min_samples=200, close_after=2, min_open_seconds=0))

    def feed(ws):
        m.ingest([(topic(w["device_id"]), json.dumps(w).encode(), 0, 0) for w in ws])
        return m.evaluate_pending()

    assert feed(windows_for("clean", bc, 5)) == []
    drifted = windows_for("dev-d", bc, 3, shift=lambda r: r + 0.8 * r.std(axis=0))
    events = feed(drifted)
    kinds = {(e[1]["device_id"], e[1]["detector"], e[0]) for e in events}
    assert ("dev-d", "feature_drift", "opened") in kinds
    alert = next(a for a in store.open_alerts(m.engine) if a["device_id"] == "dev-d")
    assert alert["features"] and alert["model_version"] == "1.0.0" and alert["statistic"] > 0.2
    # back to normal: clean windows replace the drifted ones and the alert closes
    closed_at = None
    for i in range(8):
        events = feed(windows_for("dev-d", bc, 1, start_seq=3 + i, rng=np.random.default_rng(10 + i)))
        if ("closed", "feature_drift") in {(e[0], e[1]["detector"]) for e in events}:
            closed_at = i
            break
    assert closed_at is not None and closed_at >= 3  # 3 windows to flush the drift, then 2 clean evaluations


def test_alert_hysteresis_needs_consecutive_clean_evaluations(tmp_path):
    from telemetry import alerts
    from telemetry.evaluate import Verdict

    engine = store.connect(f"sqlite:///{tmp_path}/a.db")
    fire, calm = Verdict("latency", True, 9.0), Verdict("latency", False, 1.0)
    seq = [fire, calm, fire, calm, calm, calm, fire]
    got = [alerts.apply(engine, "f", "d", "m", "1.0.0", v, close_after=2) for v in seq]
    assert got == ["opened", None, None, None, "closed", None, "opened"]


def test_latency_regression_and_silence_alert(tmp_path, bc):
    d, manifest = bc
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     config=MonitorConfig(recent_windows=3, baseline_windows=5))
    fast = windows_for("dev-l", bc, 8, latency=2.0, t0=1000.0)
    m.ingest([(topic("dev-l"), json.dumps(w).encode(), 0, 0) for w in fast])
    assert not [e for e in m.evaluate_pending() if e[1]["detector"] == "latency"]
    # one busy window, then a normal one: the merged p95 of the recent windows rises, but no regression
    burst = windows_for("dev-l", bc, 1, latency=9.0, start_seq=8, t0=1080.0) \
        + windows_for("dev-l", bc, 1, latency=2.0, start_seq=9, t0=1090.0)
    m.ingest([(topic("dev-l"), json.dumps(w).encode(), 0, 0) for w in burst])
    assert not [e for e in m.evaluate_pending() if e[1]["detector"] == "latency"]
    slow = windows_for("dev-l", bc, 3, latency=5.0, start_seq=10, t0=1100.0)
    m.ingest([(topic("dev-l"), json.dumps(w).encode(), 0, 0) for w in slow])
    events = m.evaluate_pending()
    assert ("opened", "latency") in {(e[0], e[1]["detector"]) for e in events}
    # silence: nothing received for long relative to the window period (judged by receive time)
    events = m.check_silence(now=time.time() + 60)
    assert ("opened", "silence") in {(e[0], e[1]["detector"]) for e in events}
    # and a retained offline status is silence too
    offline = status_doc("dev-off", "f1", False, 1.0, {"name": "bc-model", "version": "1.0.0"})
    m.ingest([(topic("dev-off", "status"), json.dumps(offline).encode(), 0, 0)])
    events = m.check_silence(now=2.0)
    assert ("opened", "silence", "dev-off") in {(e[0], e[1]["detector"], e[1]["device_id"]) for e in events}


def test_a_fleet_evaluation_that_is_not_due_waits_but_is_not_lost(tmp_path, bc, monkeypatch):
    import telemetry.monitor as monitor_module

    d, manifest = bc
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest])
    calls = []
    real = m.evaluate_device
    monkeypatch.setattr(m, "evaluate_device", lambda *a: calls.append(a[1]) or real(*a))
    monkeypatch.setattr(monitor_module, "FLEET_EVAL_SHARE", 1e6)    # the next fleet evaluation is far away
    send = lambda seq: m.ingest([(topic("dev-a"), json.dumps(w).encode(), 0, 0)  # noqa: E731
                                 for w in windows_for("dev-a", bc, 2, start_seq=seq)])
    send(0)
    m.evaluate_pending()
    assert calls == ["dev-a", "*"]                                  # the first fleet evaluation runs at once
    send(2)
    m.evaluate_pending()
    assert calls[2:] == ["dev-a"] and m._fleet_pending == {("f1", "bc-model", "1.0.0")}
    m._fleet_due.clear()                                            # now it is due: no new window needed
    m.evaluate_pending()
    assert calls[3:] == ["*"] and not m._fleet_pending


def test_a_published_bench_result_is_the_latency_baseline(tmp_path, bc):
    d, manifest = bc
    m = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     config=MonitorConfig(recent_windows=3, baseline_windows=5))

    def bench_doc(version, artifact, p95):
        return {"type": "bench", "device_id": "dev-b", "fleet": "f1", "results": [
            {"artifact": f"/opt/bundles/bc/{artifact}", "bundle": manifest["name"], "bundle_version": version,
             "latency_ms": {"p50": p95 / 2, "p90": p95 * 0.9, "p95": p95, "p99": p95 * 1.2}}]}

    # results of another version and of another artifact are not this device's baseline
    m.ingest([(topic("dev-b", "bench"), json.dumps(bench_doc("0.9.0", "model.tflite", 1.0)).encode(), 0, 0),
              (topic("dev-b", "bench"), json.dumps(bench_doc(manifest["version"], "model.int8.tflite", 1.0)).encode(),
               0, 0)])
    steady = windows_for("dev-b", bc, 6, latency=5.0, t0=1000.0)
    m.ingest([(topic("dev-b"), json.dumps(w).encode(), 0, 0) for w in steady])
    # 5 ms from its first window on: against its own first windows that is no regression
    assert not [e for e in m.evaluate_pending() if e[1]["detector"] == "latency"]
    # the device benchmarked this version's artifact at 1 ms p95: 5 ms in service is a regression
    bench = bench_doc(manifest["version"], "model.tflite", 1.0)
    m.ingest([(topic("dev-b", "bench"), json.dumps(bench).encode(), 0, 0)])
    more = windows_for("dev-b", bc, 1, latency=5.0, start_seq=6, t0=1060.0)
    m.ingest([(topic("dev-b"), json.dumps(w).encode(), 0, 0) for w in more])
    opened = [e[1] for e in m.evaluate_pending() if e[0] == "opened" and e[1]["detector"] == "latency"]
    assert len(opened) == 1
    stored = [a for a in store.open_alerts(m.engine, "f1") if a["detector"] == "latency"]
    assert stored and stored[0]["detail"]["baseline_source"] == "bench"
    assert stored[0]["detail"]["baseline_p95_ms"] == 1.0
