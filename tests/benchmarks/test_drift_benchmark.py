"""The drift benchmark replays realistic clean streams and reports them with and without the PSI floor."""

from __future__ import annotations

import numpy as np

from benchmarks import drift


def test_the_benchmark_reports_every_realistic_clean_stream_with_and_without_the_floor(capsys):
    args = ["--devices", "2", "--windows", "4", "--datasets", "wine"]
    with_floor, without = drift.main(args), drift.main(args + ["--no-floor"])
    assert with_floor["psi_floor"] == 0.1 and without["psi_floor"] < 0     # no effect check at all
    for doc in (with_floor, without):
        rows = {r["scenario"]: r for r in doc["results"]}
        assert set(rows) == set(drift.SCENARIOS) >= {"heldout", "looped", "repeated", "ar1"}
        assert set(doc["summary"]["false_alarm_rate_by_stream"]) == set(drift.CLEAN)
        assert all(rows[s]["detection_rate"] is None and rows[s]["false_alarm_rate"] is not None for s in drift.CLEAN)
    out = capsys.readouterr().out
    assert "PSI floor 0.1" in out and "no PSI floor" in out and "targets missed:" in out


def test_clean_stream_sources_repeat_loop_and_wander_as_described():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 3))
    repeated = drift._clean_rows("repeated", X, 100, rng)
    assert len(repeated) == 100 and (repeated.reshape(-1, drift.REPEATS) == repeated[::drift.REPEATS, None]).all()
    looped = drift._clean_rows("looped", X, 120, rng)
    assert sorted(set(looped.tolist())) == list(range(50)) and ((np.diff(looped) % 50) == 1).all()
    walk = drift._clean_rows("ar1", X, 2000, rng)
    pc = X[walk] @ np.linalg.svd((X - X.mean(0)) / X.std(0), full_matrices=False)[2][0]
    assert np.corrcoef(pc[:-1], pc[1:])[0, 1] > 0.5          # consecutive rows are alike: autocorrelated
    assert len(set(walk.tolist())) > 40                      # yet the walk visits most rows
