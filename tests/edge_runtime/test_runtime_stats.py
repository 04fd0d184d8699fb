"""Statistics merge exactly, quantiles stay within a bucket, windows match the wire schema."""

from __future__ import annotations

import doctest
import json

import jsonschema
import numpy as np
import pytest

import edge_runtime
import edge_runtime.stats as stats
from edge_runtime.stats import (
    ClassCounts,
    FeatureStats,
    LatencyHistogram,
    merge_class_dicts,
    merge_feature_dicts,
    merge_latency_dicts,
)
from edge_runtime.window import WindowRecorder

SCHEMA = json.loads(open("edge_runtime/schemas/telemetry.schema.json").read())


def test_doctests():
    assert doctest.testmod(stats).failed == 0


@pytest.mark.parametrize("seed", range(5))
def test_merged_feature_stats_equal_the_stats_of_the_concatenation(seed):
    rng = np.random.default_rng(seed)
    edges = [np.sort(rng.normal(size=rng.integers(0, 9))).tolist() for _ in range(6)]
    a = rng.normal(3, 2, size=(rng.integers(1, 50), 6))
    b = rng.normal(-1, 5, size=(rng.integers(1, 50), 6))
    a[rng.random(a.shape) < 0.1] = np.nan
    whole = FeatureStats(edges)
    whole.update(np.vstack([a, b]))
    sa, sb = FeatureStats(edges), FeatureStats(edges)
    sa.update(a)
    for chunk in np.array_split(b, 3):
        sb.update(chunk)
    merged = sa.merge(sb)
    np.testing.assert_array_equal(merged.count, whole.count)
    np.testing.assert_array_equal(merged.nan, whole.nan)
    np.testing.assert_allclose(merged.mean, whole.mean, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged.m2, whole.m2, rtol=1e-9)
    np.testing.assert_array_equal(merged.hist, whole.hist)
    finite = np.vstack([a, b])
    np.testing.assert_allclose(merged.mean, np.nanmean(finite, axis=0))
    np.testing.assert_allclose(merged.m2 / merged.count, np.nanvar(finite, axis=0))
    # the histogram follows the documented rule: bin i holds edges[i-1] < x <= edges[i]
    for j, e in enumerate(edges):
        col = finite[:, j][np.isfinite(finite[:, j])]
        expected = np.bincount(np.searchsorted(e, col, side="left"), minlength=len(e) + 1)
        assert merged.histograms()[j] == expected.tolist()
    # the wire form round-trips and merges
    d = merge_feature_dicts(sa.to_dict(), FeatureStats(edges).to_dict(), edges)
    assert d["count"] == sa.to_dict()["count"]


def test_latency_quantiles_are_within_one_bucket():
    rng = np.random.default_rng(3)
    values = rng.lognormal(mean=1.0, sigma=0.6, size=5000)
    h = LatencyHistogram(gamma=1.05)
    for v in values:
        h.add(float(v))
    for q in (0.5, 0.95, 0.99):
        exact = float(np.quantile(values, q))
        assert abs(h.quantile(q) / exact - 1) < 0.05
    half = LatencyHistogram()
    other = LatencyHistogram()
    for v in values[:2500]:
        half.add(float(v))
    for v in values[2500:]:
        other.add(float(v))
    merged = LatencyHistogram.from_dict(half.to_dict()).merge(LatencyHistogram.from_dict(other.to_dict()))
    assert merged.counts == h.counts and merged.count == 5000


def test_windows_close_by_size_and_time_and_match_the_wire_schema(bc_mlp_bundle, reference_data):
    model = edge_runtime.load(bc_mlp_bundle)
    rec = model.start_recording(window_seconds=None, window_size=50)
    X = reference_data["breast_cancer"].X_test
    for row in X[:120]:
        model.predict(row)
    windows = rec.poll()
    assert [w["count"] for w in windows] == [50, 50]
    last = rec.flush()
    assert last["count"] == 20
    for seq, w in enumerate(windows + [last]):
        msg = {"schema_version": 1, "type": "telemetry", "device_id": "dev-1", "fleet": "f", "seq": seq, **w}
        jsonschema.validate(msg, SCHEMA)
        assert len(w["features"]["hist"]) == 30
        assert sum(w["predictions"]["counts"]) == w["count"]
    # column statistics equal numpy's on the same rows
    f = windows[0]["features"]
    assert f["mean"][0] == pytest.approx(float(X[:50, 0].mean()), rel=1e-5)
    assert f["max"][3] == pytest.approx(float(X[:50, 3].max()), rel=1e-5)

    now = [1000.0]
    timed = WindowRecorder({"name": "m", "version": "1.0.0"}, [[0.0]], window_seconds=10, clock=lambda: now[0])
    timed.record(np.zeros((1, 1)), 1.0, np.array([[0.2, 0.8]]))
    assert timed.poll() == []
    now[0] += 10
    (w,) = timed.poll()
    assert w["start"] == 1000.0 and w["end"] == 1010.0


def test_image_windows_hold_per_channel_statistics(digits_cnn_bundle, reference_data):
    from convert.reference import digits_images

    model = edge_runtime.load(digits_cnn_bundle)
    rec = model.start_recording(window_size=10)
    X = digits_images(reference_data["digits"].X_test[:10])
    model.predict(X)
    (w,) = rec.poll()
    assert w["features"]["count"] == [640]
    assert w["features"]["mean"][0] == pytest.approx(float(X.mean()), rel=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_wire_form_merges_equal_the_statistics_of_all_the_calls(seed):
    rng = np.random.default_rng(seed)
    lat = rng.lognormal(-1.0, 1.0, size=400)
    classes = rng.integers(0, 4, size=400)
    parts = np.array_split(np.arange(400), 4)
    lat_dicts, class_dicts = [], []
    for idx in parts:
        h, c = LatencyHistogram(), ClassCounts(4)
        for v in lat[idx]:
            h.add(float(v))
        c.update(classes[idx])
        lat_dicts.append(h.to_dict())
        class_dicts.append(c.to_dict())
    merged_lat, merged_cls = lat_dicts[0], class_dicts[0]
    for a, b in zip(lat_dicts[1:], class_dicts[1:], strict=True):
        merged_lat, merged_cls = merge_latency_dicts(merged_lat, a), merge_class_dicts(merged_cls, b)
    whole = LatencyHistogram()
    for v in lat:
        whole.add(float(v))
    assert merged_lat["counts"] == whole.to_dict()["counts"] and merged_lat["offset"] == whole.to_dict()["offset"]
    assert merged_lat["min"] == pytest.approx(lat.min(), rel=1e-5)
    assert merged_lat["sum"] == pytest.approx(lat.sum(), rel=1e-5)
    assert merged_cls["counts"] == np.bincount(classes, minlength=4).tolist()
    with pytest.raises(ValueError):
        ClassCounts(3).merge(ClassCounts(4))


def test_features_without_reference_edges_still_count_and_average():
    fs = FeatureStats([[], [], []])
    fs.update(np.arange(12, dtype=np.float64).reshape(4, 3))
    d = fs.to_dict()
    assert d["hist"] == [[4], [4], [4]] and d["mean"] == [4.5, 5.5, 6.5] and d["min"] == [0.0, 1.0, 2.0]


def test_latency_buckets_follow_the_documented_rule():
    h = LatencyHistogram(gamma=1.05)
    for k in (-40, 0, 1, 37):
        edge = 1.05 ** k
        h.add(edge)  # an edge value belongs to the bucket it closes
        h.add(edge * 1.0001)  # just above it: the next bucket
    d = h.to_dict()
    filled = sorted(d["offset"] + i for i, c in enumerate(d["counts"]) for _ in range(c))
    assert filled == [-40, -39, 0, 1, 1, 2, 37, 38]


def test_merging_many_windows_at_once_equals_folding_them_one_by_one():
    from edge_runtime.stats import merge_many_feature_dicts

    rng = np.random.default_rng(3)
    X = rng.normal(size=(2400, 6)) * [1, 10, 100, 0.1, 1, 5]
    X[rng.random(X.shape) < 0.04] = np.nan
    edges = [np.unique(np.nanquantile(X[:, j], np.linspace(0, 1, 11)[1:-1])).tolist() for j in range(6)]
    edges[2] = edges[2][:3]                                    # features may have different bin counts
    blocks = []
    for i in range(12):
        fs = FeatureStats(edges)
        fs.update(X[i * 200:(i + 1) * 200])
        blocks.append(fs.to_dict())
    folded = FeatureStats.from_dict(blocks[0], edges)
    for b in blocks[1:]:
        folded.merge(FeatureStats.from_dict(b, edges))
    at_once = merge_many_feature_dicts(blocks, edges)
    for key in ("count", "nan", "hist"):
        assert np.array_equal(getattr(folded, key), getattr(at_once, key)), key
    for key in ("mean", "m2", "min", "max"):
        assert np.allclose(getattr(folded, key), getattr(at_once, key), rtol=1e-9), key
    bad = dict(blocks[0], hist=[h[:-1] for h in blocks[0]["hist"]])
    with pytest.raises(ValueError):
        merge_many_feature_dicts([bad], edges)
