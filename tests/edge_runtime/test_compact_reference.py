"""``--encoding cbor-ref``: moments coded against the bundle's reference profile, and what the monitor concludes.

The windows come from the device's own ``WindowRecorder`` over the reference data sets (Breast Cancer, Wine,
Digits; benchmarks.wire_size); the statistics from the monitor's own code (telemetry.drift, telemetry.evaluate).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks import wire_size
from edge_runtime import cbor, compact, wire

TOPIC = "edgeops/clinic-a/pi-0042/telemetry"
MEAN_BOUND = 1 / 256            # of the reference std (docs/telemetry.md, "Compact windows")
RANGE_BOUND = 1 / 64
M2_BOUND = 2 ** (1 / 64) - 1    # relative


@pytest.fixture(scope="module")
def setups():
    return {name: wire_size.setup(name) for name in wire_size.DATASETS}     # registers each bundle


def canonical(payload: bytes) -> dict:
    return wire.parse(TOPIC, payload, now=2e9).doc


def _scale(setup: dict) -> np.ndarray:
    std = np.array([f["std"] for f in setup["features"]])
    return np.where(std > 0, std, 1.0)


def assert_within_reference_bounds(got: dict, want: dict, scale: np.ndarray) -> None:
    """Everything exact but the moments; each moment within its documented bound."""
    gf, wf = got["features"], want["features"]
    assert {k: v for k, v in got.items() if k != "features"} == {k: v for k, v in want.items() if k != "features"}
    assert {k: v for k, v in gf.items() if k not in ("min", "max", "mean", "m2")} == \
           {k: v for k, v in wf.items() if k not in ("min", "max", "mean", "m2")}
    for j, sd in enumerate(scale):
        if wf["mean"][j] is None:
            assert all(gf[k][j] is None for k in ("min", "max", "mean", "m2"))
            continue
        assert abs(gf["mean"][j] - wf["mean"][j]) <= MEAN_BOUND * sd * (1 + 1e-9), j
        for k in ("min", "max"):
            assert abs(gf[k][j] - wf[k][j]) <= RANGE_BOUND * sd * (1 + 1e-9), (k, j)
        assert abs(gf["m2"][j] - wf["m2"][j]) <= M2_BOUND * wf["m2"][j] * (1 + 1e-9), ("m2", j)
        assert gf["min"][j] <= gf["mean"][j] <= gf["max"][j]


def _shift(setup: dict, sds: float):
    """Inputs whose first third of features moved by ``sds`` reference standard deviations."""
    k = max(1, len(setup["features"]) // 3)
    move = np.zeros(len(setup["features"]))
    move[:k] = sds * np.array([f["std"] for f in setup["features"]])[:k]
    return lambda X: X + move


@pytest.mark.parametrize("dataset", wire_size.DATASETS)
@pytest.mark.parametrize("n", (50, 100, 500))
def test_a_reference_coded_window_is_the_json_window_within_the_bounds(setups, dataset, n):
    msg = wire_size.window(setups[dataset], n)
    payload = wire.encode(msg, encoding="cbor-ref")
    raw = cbor.loads(payload[3:])
    assert compact.K_FEATURES_REF in raw and compact.K_MODEL_REF in raw and compact.K_BUNDLE in raw
    assert_within_reference_bounds(canonical(payload), canonical(wire.encode(msg)), _scale(setups[dataset]))
    assert len(payload) < len(wire.encode(msg, encoding="cbor"))


def test_breast_cancer_at_100_inferences_is_25x_below_float32_forwarding(setups):
    msg = wire_size.window(setups["breast_cancer"], 100)
    payload = wire.encode(msg, encoding="cbor-ref")
    assert 100 * 30 * 4 / len(payload) >= 25, len(payload)
    assert canonical(payload)["model"] == canonical(wire.encode(msg))["model"]      # sha256 and artifact exact


@pytest.mark.parametrize("dataset", wire_size.DATASETS)
def test_the_monitor_reads_the_same_drift_statistics(setups, dataset):
    """Per feature: PSI, chi-square and binned KS (exact histograms) and the mean-shift detector's mean shift
    and std ratio (within the quantisation bounds), for an undrifted and a drifted window."""
    from telemetry.drift.batch import feature_tests
    from telemetry.drift.meanshift import MeanShiftDetector

    s = setups[dataset]
    ref_hist = [f["hist"] for f in s["features"]]
    drifted = 0
    for transform in (None, _shift(s, 0.8)):
        msg = wire_size.window(s, 200, transform=transform)
        want, got = canonical(wire.encode(msg)), canonical(wire.encode(msg, encoding="cbor-ref"))
        for a, b in zip(feature_tests(ref_hist, want["features"]["hist"]),
                        feature_tests(ref_hist, got["features"]["hist"]), strict=True):
            assert np.array_equal(a, b)
        for j, f in enumerate(s["features"]):
            args = [f["mean"], f["std"], want["features"]["count"][j]]
            a = MeanShiftDetector().update(*args, want["features"]["mean"][j], want["features"]["m2"][j])
            a = (a.mean_shift, a.std_ratio, a.drift_detected)
            b = MeanShiftDetector().update(*args, got["features"]["mean"][j], got["features"]["m2"][j])
            assert abs(b.mean_shift - a[0]) <= MEAN_BOUND * (1 + 1e-9)      # both in reference stds
            assert abs(b.std_ratio - a[1]) <= (2 ** (1 / 128) - 1) * a[1] + 1e-12
            near = abs(a[0] - 0.5) <= MEAN_BOUND or abs(a[1] - 2) <= 0.02 or abs(a[1] - 0.5) <= 0.01
            assert b.drift_detected == a[2] or near
            drifted += a[2]
    assert drifted


@pytest.mark.parametrize("dataset", wire_size.DATASETS)
def test_the_monitor_evaluates_reference_coded_windows_as_json_ones(setups, dataset):
    """telemetry.evaluate over ten windows (half of them drifted): the same verdicts, PSI scores equal."""
    from telemetry.evaluate import MonitorConfig, evaluate

    s = setups[dataset]
    msgs = [wire_size.window(s, 100, seq=i, seed=i, transform=_shift(s, 1.0) if i >= 5 else None) for i in range(10)]
    json_windows = [canonical(wire.encode(m)) for m in msgs]
    ref_windows = [canonical(wire.encode(m, encoding="cbor-ref")) for m in msgs]
    a, b = (evaluate(w, s["manifest"], MonitorConfig()) for w in (json_windows, ref_windows))
    assert [(v.detector, v.firing) for v in a.verdicts] == [(v.detector, v.firing) for v in b.verdicts]
    assert any(v.firing for v in a.verdicts if v.detector == "feature_drift")
    assert a.feature_scores == b.feature_scores
    for va, vb in zip(a.verdicts, b.verdicts, strict=True):
        assert va.features == vb.features
        assert va.statistic == pytest.approx(vb.statistic, rel=1e-6, abs=1e-9)


def test_unregistered_bundles_and_far_values(setups):
    s = setups["wine"]
    msg = wire_size.window(s, 100)
    other = copy.deepcopy(msg)
    other["model"]["version"] = "9.9.9"                       # no bundle registered: the half form
    raw = cbor.loads(wire.encode(other, encoding="cbor-ref")[3:])
    assert compact.K_BUNDLE not in raw and compact.K_FEATURES in raw
    odd = copy.deepcopy(msg)
    f = odd["features"]
    f["mean"][0], f["max"][0], f["m2"][0] = 1e30, 2e30, 1e61   # codes far past 2**26: this feature goes exactly
    f["min"][1] = f["max"][1] = f["mean"][1] = 3.0
    f["m2"][1] = 0.0                                            # a constant feature: m2 exactly 0
    f["count"][2] = f["nan"][2] = 0
    f["hist"][2] = [0] * len(f["hist"][2])
    f["mean"][2] = f["m2"][2] = f["min"][2] = f["max"][2] = None   # no values: null moments
    f["out_of_range"][2] = 0
    payload = wire.encode(odd, encoding="cbor-ref")
    raw = cbor.loads(payload[3:])[compact.K_FEATURES_REF]
    assert compact.unpack_ints(raw[11]) == [0] and raw[12][:3] == [f["min"][0], 2e30, 1e30]
    got = compact.decode(payload)["features"]
    assert [got[k][0] for k in ("min", "max", "mean", "m2")] == [f["min"][0], 2e30, 1e30, 1e61]
    assert got["m2"][1] == 0.0 and abs(got["mean"][1] - 3.0) <= MEAN_BOUND * _scale(s)[1]
    assert [got[k][2] for k in ("min", "max", "mean", "m2")] == [None] * 4
    for j in range(3, len(f["mean"])):
        assert abs(got["mean"][j] - f["mean"][j]) <= MEAN_BOUND * _scale(s)[j] * (1 + 1e-9)
    assert canonical(payload)["features"]["hist"] == canonical(wire.encode(odd))["features"]["hist"]


def test_a_monitor_without_the_bundle_refuses_by_name(setups):
    payload = wire.encode(wire_size.window(setups["wine"], 100), encoding="cbor-ref")
    raw = cbor.loads(payload[3:])
    raw[compact.K_BUNDLE] = b"\x00" * compact.DIGEST_BYTES
    with pytest.raises(wire.Rejected) as exc:
        wire.parse(TOPIC, compact.MAGIC + cbor.dumps(raw), now=2e9)
    assert exc.value.reason == "unknown_bundle" and exc.value.reason in wire.REASONS
    del raw[compact.K_BUNDLE]
    with pytest.raises(wire.Rejected) as exc:
        wire.parse(TOPIC, compact.MAGIC + cbor.dumps(raw), now=2e9)
    assert exc.value.reason == "malformed_cbor"


def test_the_digest_changes_with_the_profile(setups):
    m = copy.deepcopy(setups["wine"]["manifest"])
    first = compact.bundle_reference(m).digest
    m["reference_profile"]["features"][0]["std"] *= 1.5
    assert compact.bundle_reference(m).digest != first
    assert compact.bundle_reference({"name": "x", "version": "1", "reference_profile": {}}) is None


@pytest.fixture(scope="module")
def ref_payload(setups):
    return wire.encode(wire_size.window(setups["breast_cancer"], 100), encoding="cbor-ref")


def _outcome(payload: bytes) -> str:
    try:
        return wire.parse(TOPIC, payload, now=2e9).kind
    except wire.Rejected as rej:
        assert rej.reason in wire.REASONS, rej
        return rej.reason


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.integers(0, 20) | st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from([compact.K_BUNDLE, compact.K_MODEL_REF, compact.K_FEATURES_REF, compact.K_DISTINCT]),
       value=cbor_values, inner=st.integers(0, 13))
def test_any_value_in_a_reference_block_is_parsed_or_refused_by_name(ref_payload, key, value, inner):
    raw = cbor.loads(ref_payload[3:])
    block = raw.get(key)
    if isinstance(block, dict) and inner in block:
        raw[key] = {**block, inner: value}
    else:
        raw[key] = value
    _outcome(compact.MAGIC + cbor.dumps(raw))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_reference_window_is_parsed_or_refused_by_name(ref_payload, data):
    buf = bytearray(ref_payload)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(3, len(buf) - 1))
        buf[i] ^= 1 << data.draw(st.integers(0, 7))
    _outcome(bytes(buf))
