"""Compact CBOR windows (``--encoding cbor``): the same canonical window as JSON, and hostile CBOR refused by name."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import struct
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import wire_size
from edge_runtime import cbor, compact, wire
from helpers import eventually
from helpers.mqtt_collector import Collector

TOPIC = "edgeops/clinic-a/pi-0042/telemetry"
SIZES = (50, 100, 500)
HALF = 2.0**-11


@pytest.fixture(scope="module")
def setups():
    return {name: wire_size.setup(name) for name in wire_size.DATASETS}


@pytest.fixture(scope="module")
def bc_window(setups):
    return wire_size.window(setups["breast_cancer"], 100)


def canonical(payload: bytes, now: float = 2e9) -> dict:
    return wire.parse(TOPIC, payload, now=now).doc


def _close(got: float, want: float, tol: float) -> bool:
    return abs(got - want) <= tol + 1e-12


def assert_half_close(got: dict, want: dict) -> None:
    """Everything exact except the feature moments, each within the documented half-precision bound."""
    gf, wf = got["features"], want["features"]
    assert {k: v for k, v in got.items() if k != "features"} == {k: v for k, v in want.items() if k != "features"}
    assert {k: v for k, v in gf.items() if k not in ("min", "max", "mean", "m2")} == \
           {k: v for k, v in wf.items() if k not in ("min", "max", "mean", "m2")}
    for j, lo in enumerate(wf["min"]):
        if lo is None:
            assert all(gf[k][j] is None for k in ("min", "max", "mean", "m2"))
            continue
        slack = abs(lo) * HALF          # the decoded min's own error carries into max and mean
        assert _close(gf["min"][j], lo, abs(lo) * HALF)
        for k in ("max", "mean"):
            assert _close(gf[k][j], wf[k][j], HALF * (abs(wf[k][j] - lo) + slack) + slack), (k, j)
        assert _close(gf["m2"][j], wf["m2"][j], 2.1 * HALF * abs(wf["m2"][j])), ("m2", j)


# -- round trips ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset", wire_size.DATASETS)
@pytest.mark.parametrize("n", SIZES)
def test_a_window_decodes_to_the_canonical_json_window(setups, dataset, n):
    msg = wire_size.window(setups[dataset], n)
    want = canonical(wire.encode(msg))
    exact = wire.encode(msg, encoding="cbor-exact")
    half = wire.encode(msg, encoding="cbor")
    assert exact[:1] == half[:1] == b"\xd9"
    assert canonical(exact) == want                      # lossless
    assert_half_close(canonical(half), want)
    assert len(half) < min(len(exact), len(wire.encode(msg, encoding="zlib")))


def test_the_half_precision_check_notices_a_wrong_moment(bc_window):
    want = canonical(wire.encode(bc_window))
    got = canonical(wire.encode(bc_window, encoding="cbor"))
    got["features"]["mean"][3] *= 1.01
    with pytest.raises(AssertionError):
        assert_half_close(got, want)


def test_breast_cancer_at_100_inferences_is_far_below_json_and_float32_forwarding(bc_window):
    forwarding = 100 * 30 * 4
    payload = wire.encode(bc_window, encoding="cbor")
    assert len(payload) * 4 < len(wire.encode(bc_window))
    assert forwarding / len(payload) >= 15          # measured 18.2x; cbor-ref reaches 25.8x (test_compact_reference.py)


def test_blocks_without_a_compact_form_travel_generically(bc_window):
    msg = json.loads(json.dumps(bc_window))
    msg["labels"] = {"n": 3, "confusion": [[1, 0], [1, 1]], "unmatched": 0}
    msg["features"]["sketch"] = [5, 0, 7, 19, 3]
    msg["latency_ms"]["p50"] = 1234.5                   # not what the counts say: sent as it is
    msg["features"]["hist"][0] = msg["features"]["hist"][0][:-1] + [msg["features"]["hist"][0][-1] + 1]
    doc = compact.decode(compact.encode(msg, "exact"))
    assert doc == msg
    valid = {**msg, "features": bc_window["features"]}
    assert canonical(compact.encode(valid, "exact")) == canonical(wire.encode(valid))    # labels validated alike
    assert canonical(compact.encode(valid))["labels"] == {"n": 3, "confusion": [[1, 0], [1, 1]], "unmatched": 0}
    raw = cbor.loads(compact.encode(msg)[3:])
    assert "features" in raw and compact.K_FEATURES not in raw      # a histogram that breaks the form: generic
    assert raw[compact.K_LATENCY][4][0] == 1234.5


def test_status_and_bench_messages_round_trip_too():
    status = wire.status_message("lab", "pi-1", True, platform={"machine": "aarch64", "cpu_count": 4})
    assert wire.parse("edgeops/lab/pi-1/status", wire.encode(status, encoding="cbor")).doc == \
        wire.parse("edgeops/lab/pi-1/status", wire.encode(status)).doc


def test_float_and_int_edges_of_the_codec():
    for x in (0.0, -0.0, 1.5, 65504.0, 1e-8, 1.05, 3.4e38, 1e300, -2.5e-310):
        assert cbor.loads(cbor.dumps(x)) == x
    for i in (0, 23, 24, 255, 256, 65535, 65536, 2**32, 2**64 - 1, -1, -(2**64)):
        assert cbor.loads(cbor.dumps(i)) == i
    with pytest.raises(ValueError):
        cbor.dumps(2**64)
    with pytest.raises(ValueError):
        cbor.dumps(math.nan)
    assert compact.unpack_ints(compact.pack_ints([0, 15, 16, 300, 2**40])) == [0, 15, 16, 300, 2**40]


def test_typed_messages_read_and_give_back_the_canonical_dicts(setups, bc_window):
    from edge_runtime.messages import Alert, Bench, Command, CommandResult, FleetAlerts, Status, TelemetryWindow

    doc = canonical(wire.encode(bc_window, encoding="cbor"))
    w = TelemetryWindow.from_canonical(doc)
    assert (w.fleet, w.device_id, w.seq, w.count, w.model.sha256) == ("clinic-a", "pi-0042", 17, 100, "5e0f3c1b" * 8)
    assert w.to_canonical() == doc
    with pytest.raises(dataclasses.FrozenInstanceError):
        w.count = 3
    window = {k: v for k, v in bc_window.items() if k not in ("schema_version", "type", "device_id", "fleet")}
    assert TelemetryWindow.from_window("clinic-a", "pi-0042", window).to_canonical() == bc_window
    status = wire.parse("edgeops/lab/pi-1/status", wire.encode(wire.status_message("lab", "pi-1", False))).doc
    assert Status.from_canonical(status).to_canonical() == status and not Status.from_canonical(status).online
    bench = wire.check_bench({"results": [{"artifact": "m.tflite", "latency_ms": {"p50": 1.0}}], "machine": {"a": 1}})
    assert Bench.from_canonical(bench).to_canonical() == bench
    cmd = {"type": "flash_url", "id": "t1", "url": "http://x", "size": 3, "sha256": "ab"}
    assert Command.from_canonical(cmd).to_canonical() == cmd
    res = {"id": "t1", "type": "flash_url", "ok": False, "stage": "fetch", "message": "404", "ts": 1.0}
    assert CommandResult.from_canonical(res).to_canonical() == res
    alerts = {"fleet": "lab", "ts": 2.0, "open": [{"device_id": "*", "model_name": "m", "model_version": "1",
                                                   "detector": "feature_drift", "features": ["f1"], "statistic": 0.3,
                                                   "opened_at": 1.0}]}
    parsed = FleetAlerts.from_canonical(alerts)
    assert parsed.open[0] == Alert("*", "m", "1", "feature_drift", ["f1"], 0.3, 1.0)
    assert parsed.to_canonical() == alerts


class _Link:
    def __init__(self):
        import threading

        self.connected, self.sent = threading.Event(), []
        self.connected.set()

    def publish(self, topic, payload, qos):
        self.sent.append(payload)
        return len(self.sent)


@pytest.mark.parametrize("encoding", ["json", "zlib", "cbor", "cbor-exact"])
def test_the_delivery_publishes_spooled_json_in_its_encoding(tmp_path, bc_window, encoding):
    from edge_runtime.delivery import WindowDelivery
    from edge_runtime.spool import WindowSpool

    spool, link = WindowSpool(tmp_path / "spool.sqlite"), _Link()
    spool.append(dict(bc_window))
    spool.append({**bc_window, "errors": 2**70})          # no 64-bit integer holds it: sent as JSON
    WindowDelivery(spool, link, TOPIC, encoding=encoding).step(now=0.0)
    assert len(link.sent) == 2
    first = wire.decode(link.sent[0])
    assert first["seq"] == 0 and first["count"] == 100
    assert link.sent[0][:1] == {"json": b"{", "zlib": b"x", "cbor": b"\xd9", "cbor-exact": b"\xd9"}[encoding]
    assert link.sent[1][:1] == (b"x" if encoding == "zlib" else b"{")
    with pytest.raises(ValueError):
        WindowDelivery(spool, link, TOPIC, encoding="msgpack")


# -- hostile CBOR -----------------------------------------------------------------------------------

def _m(body: bytes) -> bytes:
    return compact.MAGIC + body


def _window_with(bc_window, changes: dict) -> bytes:
    raw = cbor.loads(compact.encode(bc_window)[3:])
    raw.update(changes)
    return _m(cbor.dumps(raw))


HOSTILE = {
    "truncated": (lambda w: compact.encode(w)[:-7], "malformed_cbor"),
    "only_the_marker": (lambda w: compact.MAGIC, "malformed_cbor"),
    "wrong_marker": (lambda w: b"\xd9\x01\x00\xa0", "malformed_cbor"),
    "trailing_bytes": (lambda w: compact.encode(w) + b"\x00", "malformed_cbor"),
    "array_claims_2e9_items": (lambda w: _m(b"\xa1\x61a\x9a\x77\x35\x94\x00\x01"), "oversized"),
    "array_longer_than_payload": (lambda w: _m(b"\xa1\x61a\x99\x10\x00\x01\x02"), "malformed_cbor"),
    "text_longer_than_payload": (lambda w: _m(b"\xa1\x61a\x7a\x00\x10\x00\x00ab"), "malformed_cbor"),
    "bytes_of_2e64": (lambda w: _m(b"\xa1\x61a\x5b" + b"\xff" * 8), "malformed_cbor"),
    "deep_nesting": (lambda w: _m(b"\xa1\x61a" + b"\x81" * 5000 + b"\x00"), "too_deep"),
    "indefinite_map": (lambda w: _m(b"\xbf\x61a\x01\xff"), "cbor_unsupported"),
    "indefinite_array": (lambda w: _m(b"\xa1\x61a\x9f\x01\xff"), "cbor_unsupported"),
    "indefinite_text": (lambda w: _m(b"\xa1\x61a\x7f\x61b\xff"), "cbor_unsupported"),
    "break_alone": (lambda w: _m(b"\xa1\x61a\xff"), "cbor_unsupported"),
    "bignum_tag": (lambda w: _m(b"\xa1\x61a\xc2\x49\x01" + b"\x00" * 8), "cbor_unsupported"),
    "date_tag": (lambda w: _m(b"\xa1\x61a\xc1\x1a\x60\x00\x00\x00"), "cbor_unsupported"),
    "undefined": (lambda w: _m(b"\xa1\x61a\xf7"), "cbor_unsupported"),
    "simple_value": (lambda w: _m(b"\xa1\x61a\xf8\x20"), "cbor_unsupported"),
    "reserved_info": (lambda w: _m(b"\xa1\x61a\x1c"), "malformed_cbor"),
    "nan_half": (lambda w: _m(b"\xa1\x65start\xf9\x7e\x00"), "bad_value"),
    "infinity_single": (lambda w: _m(b"\xa1\x65start\xfa\x7f\x80\x00\x00"), "bad_value"),
    "infinity_double": (lambda w: _m(b"\xa1\x65start\xfb" + struct.pack(">d", -math.inf)), "bad_value"),
    "invalid_utf8": (lambda w: _m(b"\xa1\x61a\x62\xc3\x28"), "bad_string"),
    "invalid_utf8_key": (lambda w: _m(b"\xa1\x62\xff\xfe\x01"), "bad_string"),
    "map_key_is_an_array": (lambda w: _m(b"\xa1\x81\x01\x01"), "malformed_cbor"),
    "duplicate_key": (lambda w: _m(b"\xa2\x61a\x01\x61a\x02"), "malformed_cbor"),
    "top_level_array": (lambda w: _m(b"\x83\x01\x02\x03"), "not_an_object"),
    "huge_seq": (lambda w: _window_with(w, {compact.KEYS["seq"]: 2**64 - 1}), "bad_value"),
    "huge_negative_count": (lambda w: _window_with(w, {compact.KEYS["count"]: -(2**64)}), "bad_value"),
    "features_is_text": (lambda w: _window_with(w, {compact.K_FEATURES: "features"}), "malformed_cbor"),
    "model_is_a_number": (lambda w: _window_with(w, {compact.K_MODEL: 7}), "malformed_cbor"),
    "unknown_integer_key": (lambda w: _window_with(w, {99: 1}), "malformed_cbor"),
    "packed_list_claims_a_million": (lambda w: _window_with(w, {"distinct": b"\x00\x80\x89\x7a\x01"}), "oversized"),
    "packed_list_unknown_scheme": (lambda w: _window_with(w, {"distinct": b"\x07\x01\x01"}), "malformed_cbor"),
    "oversized_payload": (lambda w: _m(b"\x5a\x00\x05\x00\x00" + b"\x00" * 0x50000), "oversized"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_cbor_is_refused_by_name(bc_window, case):
    make, reason = HOSTILE[case]
    with pytest.raises(wire.Rejected) as exc:
        wire.parse(TOPIC, make(bc_window), now=2e9)
    assert exc.value.reason == reason, exc.value
    assert reason in wire.REASONS


def test_a_hostile_histogram_block_is_refused(bc_window):
    raw = cbor.loads(compact.encode(bc_window)[3:])
    feats = raw[compact.K_FEATURES]
    for change, reason in (({0: 2**40}, "oversized"), ({0: 31}, "histogram_mismatch"),
                           ({4: compact.pack_ints([1, 2, 3])}, "histogram_mismatch"),
                           ({5: b"\x00" * 7}, "feature_count_mismatch"),
                           ({5: b"\x00\x7c" * 120}, "bad_value"),          # infinities without escapes
                           ({1: 2**53 + 1}, "bad_value"),
                           ({3: 1}, "histogram_mismatch")):
        doc = {**raw, compact.K_FEATURES: {**feats, **change}}
        with pytest.raises(wire.Rejected) as exc:
            wire.parse(TOPIC, _m(cbor.dumps(doc)), now=2e9)
        assert exc.value.reason == reason, (change, exc.value)


def _outcome(payload: bytes) -> str:
    try:
        return wire.parse(TOPIC, payload, now=2e9).kind
    except wire.Rejected as rej:
        assert rej.reason in wire.REASONS, rej
        return rej.reason


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=st.binary(max_size=600))
def test_any_bytes_after_the_marker_are_parsed_or_refused_by_name(body):
    _outcome(compact.MAGIC + body)


@pytest.fixture(scope="module")
def bc_payload(setups):
    return compact.encode(wire_size.window(setups["breast_cancer"], 100))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_window_is_parsed_or_refused_by_name(bc_payload, data):
    buf = bytearray(bc_payload)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(("flip", "cut", "insert")))
        i = data.draw(st.integers(3, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "cut":
            del buf[i:i + data.draw(st.integers(1, 40))]
        else:
            buf[i:i] = data.draw(st.binary(min_size=1, max_size=12))
        if len(buf) < 5:
            break
    _outcome(bytes(buf))


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.integers(0, 20) | st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=30)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.integers(0, 20) | st.sampled_from(["features", "latency_ms", "model", "hist"]), value=cbor_values,
       inner=st.integers(0, 10))
def test_any_value_under_any_compact_key_is_parsed_or_refused_by_name(bc_payload, key, value, inner):
    raw = cbor.loads(bc_payload[3:])
    block = raw.get(key)
    if isinstance(block, dict) and inner in block:
        raw[key] = {**block, inner: value}
    else:
        raw[key] = value
    _outcome(_m(cbor.dumps(raw)))


# -- a real agent over a real broker ------------------------------------------------------------

@pytest.mark.slow
def test_an_agent_publishing_cbor_windows_is_stored_as_its_json_windows_would_be(mosquitto, bc_rf_bundle,
                                                                                 reference_data, tmp_path):
    from edge_runtime.mqtt import parse_broker_url
    from telemetry.monitor import FleetMonitor

    inputs = tmp_path / "bc.npy"
    np.save(inputs, reference_data["breast_cancer"].X_test)
    mon = FleetMonitor(parse_broker_url(mosquitto.url), f"sqlite:///{tmp_path}/cbor.db", fleet="lab").start()
    sub = Collector(mosquitto.port, "edgeops/lab/+/telemetry", client_id="cbor-collector")
    try:
        assert mon.connected.wait(10)
        runs = {}
        for device, encoding in (("dev-exact", "cbor-exact"), ("dev-half", "cbor")):
            runs[device] = subprocess.run(
                [sys.executable, "-m", "edgeops", "run", str(bc_rf_bundle), "--device-id", device, "--fleet", "lab",
                 "--broker", mosquitto.url, "--input", str(inputs), "--state-dir", str(tmp_path / device),
                 "--window-size", "40", "--encoding", encoding], capture_output=True, text=True, timeout=180)
            assert runs[device].returncode == 0, runs[device].stderr
        assert eventually(lambda: mon.stats.stored == 10, 30), dict(mon.stats.rejected)   # 171 inputs: 5 windows each
        assert not mon.stats.rejected
    finally:
        mon.stop()
        sub.close()
    payloads = [(t, m["raw"]) for t, m in sub.messages]
    assert len(payloads) >= 10 and all(p[:1] == b"\xd9" for _, p in payloads)
    # the same windows as JSON, through a second monitor's ingest
    json_mon = FleetMonitor(parse_broker_url("mqtt://127.0.0.1:1"), f"sqlite:///{tmp_path}/json.db", confirm=False)
    json_mon.ingest([(t, wire.encode(compact.decode(p)), 0, 1) for t, p in payloads])
    assert json_mon.stats.stored == 10
    for t, p in payloads:
        assert len(p) * (3 if "dev-half" in t else 2) < len(wire.encode(compact.decode(p)))

    def stored(db):
        with sqlite3.connect(db) as conn:
            rows = conn.execute("select device_id, seq, model_name, start, end, count, errors, p95_ms, payload "
                                "from edgeops_windows order by device_id, seq").fetchall()
        return [(*r[:-1], json.loads(r[-1])) for r in rows]

    got, want = stored(tmp_path / "cbor.db"), stored(tmp_path / "json.db")
    assert [r[:2] for r in got] == [(d, s) for d in ("dev-exact", "dev-half") for s in range(5)]
    assert got == want
    assert sum(r[5] for r in got) == 2 * 171
