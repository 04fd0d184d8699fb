"""The monitor's benchmarks run, and their figures mean what the docs say."""

from __future__ import annotations

import pytest

from benchmarks import drift, monitor_rounds, monitor_throughput


def test_drift_benchmark_detects_shifts_without_false_alarms(tmp_path, capsys):
    doc = drift.main(["--quick", "--datasets", "wine", "--json", str(tmp_path / "d.json")])
    assert doc["pool"] == "population" and doc["window_inferences"] == 100
    rows = {r["scenario"]: r for r in doc["results"]}
    assert set(rows) == set(drift.SCENARIOS)
    clean = rows["clean"]
    assert clean["false_alarm_rate"] <= 0.1 and clean["ks_false_alarm_rate"] <= 0.1
    assert set(clean["false_alarms_by_detector"]) == set(drift.DRIFT_DETECTORS)
    for scenario in ("scale", "offset", "subset", "prior", "missing"):
        assert rows[scenario]["detection_rate"] >= 0.8, rows[scenario]
        assert rows[scenario]["median_delay_windows"] >= 2     # no verdict before 200 inferences
    assert rows["missing"]["ks_detection_rate"] == 0.0      # raw-sample KS cannot see NaNs
    size = doc["bytes"][0]
    assert size["window_zlib_bytes"] < size["window_bytes"] < size["raw_float32_bytes"] < size["raw_json_bytes"]
    # at least 45x fewer bytes than a JSON message per inference (Wine, 13 features: 50x before the windows
    # carried their distinct-rows sketch, about 45 compressed bytes of 64 characters)
    assert size["zlib_ratio_vs_json"] >= 45
    assert set(doc["summary"]) >= {"max_false_alarm_rate", "worst_detection_gap_points_vs_ks", "meets_detection_target"}
    out = capsys.readouterr().out
    assert "drift detection from telemetry windows" in out and "targets missed:" in out
    assert (tmp_path / "d.json").exists()


@pytest.mark.slow
def test_throughput_benchmark_stores_every_window_once(tmp_path):
    doc = monitor_throughput.main(["--devices", "100", "--windows", "3", "--processes", "1"])
    (r,) = doc["results"]
    assert r["windows_stored"] == r["windows_sent"] == 300
    assert r["duplicates"] == 0 and r["rejected"] == 0
    assert r["ingest_windows_per_s"] > 0 and r["evaluations"] > 0


def test_rounds_benchmark_times_both_fleet_merge_policies(tmp_path, capsys):
    import json

    import telemetry.monitor as monitor_module

    before = monitor_module.FLEET_EVAL_SHARE
    assert monitor_rounds.main(["--devices", "20", "--windows", "3", "--rounds", "3", "--json",
                                str(tmp_path / "r.json")]) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert [r["fleet_merge"] for r in doc["rows"]] == ["every round", "when due"]
    assert [r["share"] for r in doc["rows"]] == [0.0, before]
    assert all(len(r["round_s"]) == 3 and r["median_s"] > 0 for r in doc["rows"])
    assert monitor_module.FLEET_EVAL_SHARE == before                 # the monitor's default is restored
    assert doc["device_evaluation_ms"] > 0 and doc["fleet_evaluation_s"] > 0
    assert "merged every round / when due" in capsys.readouterr().out
