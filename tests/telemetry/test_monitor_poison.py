"""Hostile device messages: each is refused with a named reason and kept in quarantine, and none stops
ingestion or evaluation for anyone else."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest

from edge_runtime.mqtt import parse_broker_url
from edge_runtime.wire import parse
from telemetry import store
from telemetry.evaluate import MonitorConfig
from telemetry.monitor import FleetMonitor, default_client_id
from telemetry.synthetic import make_window, poison_messages, reference_manifest

NOWHERE = parse_broker_url("mqtt://127.0.0.1:1")


@pytest.fixture(scope="module")
def bc():
    from convert.reference import load_reference_data

    d = load_reference_data("breast_cancer")
    return d, reference_manifest(d.X_train, d.y_train, "bc-model", feature_names=d.feature_names)


def clean_window(bc, device="dev-ok", seq=0, t0=None, version="1.0.0", n=100):
    d, manifest = bc
    rows = d.X_train[np.random.default_rng(seq).integers(0, len(d.X_train), n)]
    w = make_window(rows, manifest, device, seq, fleet="f1", start=(time.time() - 20) if t0 is None else t0,
                    predictions=np.zeros(n, int), latencies_ms=np.full(n, 2.0))
    w["model"]["version"] = version
    return w


def t(device, kind="telemetry"):
    return f"edgeops/f1/{device}/{kind}"


def poison_kinds(bc) -> dict[str, tuple[str, bytes]]:
    """Every kind of message seen to stall or break the monitor, as (topic, payload)."""
    w = clean_window(bc, "dev-bad", seq=7)
    return {name: (t("dev-bad", kind), payload) if kind != "topic" else ("edgeops/f1/dev bad!/telemetry", payload)
            for name, (kind, payload) in poison_messages(w).items()}


def test_every_poison_kind_is_quarantined_and_the_valid_window_beside_it_is_stored(tmp_path, bc):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]])
    kinds = poison_kinds(bc)
    batch = [(t("dev-ok"), json.dumps(clean_window(bc)).encode(), 0, 0)]
    batch += [(topic, payload, 0, 0) for topic, payload in kinds.values()]
    m.ingest(batch)                      # raises nothing
    assert m.stats.stored == 1
    rows = store.quarantined(m.engine, limit=100)
    assert len(rows) == len(kinds)
    reasons = {r["reason"] for r in rows}
    assert {"too_deep", "bad_value", "bad_string", "clock_skew", "malformed_json"} <= reasons
    assert sum(m.stats.quarantined.values()) == len(kinds)
    # the raw bytes are kept, so nothing is lost to an operator
    assert {bytes(r["payload"]) for r in rows} == {p for _, p in kinds.values()}


@pytest.mark.parametrize("kind", ["huge_int_start", "seq_2_63", "lone_surrogate_name", "nul_in_name",
                                  "name_200_chars", "huge_int_mean", "dated_2100", "utf16", "nested_100k"])
def test_the_validator_names_what_is_wrong(bc, kind):
    from edge_runtime.wire import Rejected

    topic, payload = poison_kinds(bc)[kind]
    with pytest.raises(Rejected) as err:
        parse(topic, payload)
    assert err.value.reason in ("too_deep", "bad_value", "bad_string", "clock_skew", "malformed_json")


def test_poison_on_postgresql_is_quarantined_too(pg_url, bc):
    m = FleetMonitor(NOWHERE, pg_url, bundles=[bc[1]])
    kinds = poison_kinds(bc)
    batch = [(topic, payload, 0, 0) for topic, payload in kinds.values()]
    batch.append((t("dev-ok"), json.dumps(clean_window(bc)).encode(), 0, 0))
    m.ingest(batch)
    assert m.stats.stored == 1
    assert len(store.quarantined(m.engine, limit=100)) == len(kinds)


def test_a_row_the_database_refuses_is_quarantined_alone(tmp_path, bc, monkeypatch):
    """A value the validator lets through but a column refuses must not hold up the batch."""
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]])
    real = store.store_windows

    def picky(engine, items, **kw):
        items = list(items)
        if any(w["seq"] == 13 for _, _, w in items):
            raise OverflowError("Python int too large to convert to SQLite INTEGER")
        return real(engine, items, **kw)

    monkeypatch.setattr(store, "store_windows", picky)
    m.ingest([(t("dev-ok"), json.dumps(clean_window(bc, seq=s)).encode(), 0, 0) for s in (12, 13, 14)])
    assert m.stats.stored == 2
    assert [r["reason"] for r in store.quarantined(m.engine)] == ["database_error"]


def test_quarantine_is_bounded(tmp_path):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", quarantine_keep=5)
    for i in range(4):
        m.ingest([(t("dev-x"), b"not json %d" % j, 0, 0) for j in range(i * 3, i * 3 + 3)])
    rows = store.quarantined(m.engine)
    assert len(rows) == 5
    assert bytes(rows[0]["payload"]) == b"not json 11"      # the newest are kept


def test_a_window_that_breaks_evaluation_is_reported_once_and_the_others_are_still_judged(tmp_path, bc, caplog):
    d, manifest = bc
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[manifest],
                     config=MonitorConfig(recent_windows=3, min_samples=100))
    # a window stored before validation bounded everything: its histograms do not fit the profile
    broken = clean_window(bc, "dev-broken", seq=0)
    broken["features"]["hist"][0] = broken["features"]["hist"][0] + [0, 0]
    store.store_windows(m.engine, [("f1", "dev-broken", broken)])
    m._mark("f1", "dev-broken", broken["model"])
    drifted = []
    for s in range(3):
        w = clean_window(bc, "dev-drift", seq=s)
        rows = d.X_train[np.random.default_rng(s).integers(0, len(d.X_train), 100)] * 3.0
        w = make_window(rows, manifest, "dev-drift", s, fleet="f1", start=time.time() - 30 + 10 * s,
                        predictions=np.zeros(100, int), latencies_ms=np.full(100, 2.0))
        drifted.append((t("dev-drift"), json.dumps(w).encode(), 0, 0))
    m.ingest(drifted)
    with caplog.at_level(logging.ERROR, logger="edgeops.monitor"):
        events = m.evaluate_pending()
        m._mark("f1", "dev-broken", broken["model"])
        m.evaluate_pending()
    opened = {(e[0], e[1]["device_id"]) for e in events}
    assert ("opened", "dev-drift") in opened and ("opened", "*") in opened    # the fleet is judged too
    reports = [r.getMessage() for r in caplog.records if "dev-broken" in r.getMessage()]
    assert len(reports) == 1 and "f1/dev-broken#0" in reports[0]


def test_windows_of_an_unregistered_version_are_stored_and_not_judged_for_drift(tmp_path, bc):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]], config=MonitorConfig(min_samples=50))
    a = clean_window(bc, "dev-new", seq=0, version="9.9.9")
    b = clean_window(bc, "dev-new", seq=1, version="9.9.9")
    b["features"] = {k: v[:3] for k, v in b["features"].items()}   # another model's feature count
    b["features"]["hist"] = [[c] for c in b["features"]["count"]]
    m.ingest([(t("dev-new"), json.dumps(w).encode(), 0, 0) for w in (a, b)])
    assert m.stats.stored == 2
    m.evaluate_pending()
    assert m.stats.evaluation_errors == 0


def test_a_device_dating_its_windows_in_2100_still_gets_a_silence_alert(tmp_path, bc):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]])
    m.ingest([(t("dev-future"), json.dumps(clean_window(bc, "dev-future", seq=s, t0=time.time() - 30 + 10 * s))
               .encode(), 0, 0) for s in range(2)])
    m.ingest([(t("dev-future"), json.dumps(clean_window(bc, "dev-future", seq=2, t0=4102444800.0)).encode(), 0, 0)])
    assert m.stats.rejected["clock_skew"] == 1
    events = m.check_silence(now=time.time() + 3600)
    assert ("opened", "silence") in {(e[0], e[1]["detector"]) for e in events}


def test_an_old_window_delivered_late_from_a_spool_does_not_open_a_silence_alert(tmp_path, bc):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]])
    week_ago = time.time() - 7 * 86400
    m.ingest([(t("dev-late"), json.dumps(clean_window(bc, "dev-late", seq=s, t0=week_ago + 10 * s)).encode(), 0, 0)
              for s in range(5)])
    assert m.stats.stored == 5
    assert not [e for e in m.check_silence() if e[1]["detector"] == "silence"]


def test_monitors_of_different_fleets_never_share_a_broker_session():
    ids = {default_client_id("audit2"), default_client_id("audit3"), default_client_id("+"),
           default_client_id("audit2", share="workers")}
    assert len(ids) == 4


def test_an_evaluation_that_fails_is_contained_to_its_device(tmp_path, bc, monkeypatch, caplog):
    m = FleetMonitor(NOWHERE, f"sqlite:///{tmp_path}/m.db", bundles=[bc[1]], config=MonitorConfig(min_samples=50))
    m.ingest([(t(dev), json.dumps(clean_window(bc, dev, seq=0)).encode(), 0, 0) for dev in ("dev-a", "dev-b")])
    real = m.evaluate_device
    judged = []

    def flaky(fleet, device, name, version):
        if device == "dev-a":
            raise OverflowError("int too large to convert to float")
        judged.append(device)
        return real(fleet, device, name, version)

    monkeypatch.setattr(m, "evaluate_device", flaky)
    with caplog.at_level(logging.ERROR, logger="edgeops.monitor"):
        m.evaluate_pending()
        m._mark("f1", "dev-a", {"name": "bc-model", "version": "1.0.0"})
        m.evaluate_pending()
    assert "dev-b" in judged and "*" in judged
    assert m.stats.evaluation_errors == 2
    assert len([r for r in caplog.records if "dev-a" in r.getMessage()]) == 1


def test_quarantine_is_visible_in_metrics_dashboard_and_report(tmp_path, bc):
    import urllib.request

    from telemetry.http import start_http
    from telemetry.report import write_report

    db = f"sqlite:///{tmp_path}/m.db"
    m = FleetMonitor(NOWHERE, db, bundles=[bc[1]])
    m.ingest([(topic, payload, 0, 0) for topic, payload in poison_kinds(bc).values()])
    server = start_http(m, "127.0.0.1", 0)
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
        dashboard = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    finally:
        server.shutdown()
    assert 'edgeops_monitor_quarantined_total{reason="too_deep"} 1.0' in metrics
    assert "<h2>Quarantine</h2>" in dashboard and "clock_skew" in dashboard
    page = write_report(db, tmp_path / "report.html").read_text()
    assert "Quarantined messages" in page and "too_deep" in page
