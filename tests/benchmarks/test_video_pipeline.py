"""`python -m benchmarks.video_pipeline --quick`: every frame of the video is classified and published on MQTT."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from devtools.brokers import find_mosquitto


def test_the_quick_run_classifies_and_publishes_every_frame(digits_cnn_bundle, tmp_path):
    pytest.importorskip("cv2")
    if find_mosquitto() is None and not os.environ.get("CI"):
        pytest.skip("no mosquitto binary")
    out, scratch = tmp_path / "video.json", tmp_path / "scratch"
    scratch.mkdir()
    res = subprocess.run([sys.executable, "-m", "benchmarks.video_pipeline", "--quick", "--bundle",
                          str(digits_cnn_bundle), "--json", str(out)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(scratch)})
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads(out.read_text())
    e2e = doc["end_to_end"]
    assert e2e["frames"] == doc["frames"] == doc["frames_in_video"] == 40
    assert e2e["published"] == 40 and e2e["every_frame_once"]          # every frame, once, over MQTT
    assert e2e["accuracy"] >= 0.8 and len(e2e["first"]) == 10
    assert all(p["predicted"] in "0123456789" for p in e2e["first"])
    assert doc["pipeline_median_us"] > 0 and doc["predict_median_us"] > 0 and doc["ratio"] > 0
    rows = {r["what"]: r for r in doc["per_frame"]}
    assert rows["predict alone"]["ratio_to_predict"] == 1.0
    assert rows["video pipeline (agent)"]["frames"] == 2 * 39        # the first frame of each pass is not timed
    assert all(r["median_us"] > 0 for r in rows.values())
    assert not list(scratch.iterdir())                                  # the video, the broker's folder: gone
