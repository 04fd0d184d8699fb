"""The per-stage benchmark of the monitor's ingest path runs and reports every stage and both databases."""

from __future__ import annotations

import json

import pytest

from benchmarks import ingest_stages


def test_ingest_stages_times_every_stage_and_stores_new_then_duplicate_batches(tmp_path, pg_url):
    out = tmp_path / "stages.json"
    doc = ingest_stages.main(["--windows", "60", "--repeat", "1", "--batch", "25", "--json", str(out)])
    assert json.loads(out.read_text())["benchmark"] == "ingest_stages"
    stages = {r["stage"]: r["us_per_window"] for r in doc["stages"]}
    assert len(stages) == 8 and all(us > 0 for us in stages.values()), stages
    by_db = {r["database"]: r for r in doc["store"]}
    assert set(by_db) == {"sqlite", "postgresql"}
    for row in by_db.values():
        assert row["batches"] == 3 and row["new_ms_per_batch"] > 0 and row["duplicates_ms_per_batch"] > 0, row


def test_ingest_stages_refuses_a_zero_count():
    with pytest.raises(SystemExit) as exit_:
        ingest_stages.main(["--windows", "0"])
    assert exit_.value.code == 2
