"""`python -m benchmarks.bench_fidelity`: bench's loop against a bare interpreter loop, on the project's Digits CNN.

A smoke run (--quick): the structure of its JSON and that a ratio comes out, never a timing verdict.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

ARMS = {"bare", "bench", "run()"}


@pytest.fixture(scope="module")
def fidelity(digits_cnn_bundle, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fidelity") / "fidelity.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_fidelity", "--no-project-model", "--quick",
                          "--model", str(digits_cnn_bundle / "model.tflite"),
                          "--model", str(digits_cnn_bundle / "model.onnx"), "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    doc = json.loads(out.read_text())
    doc["stdout"] = res.stdout
    return doc


def test_the_json_has_one_result_per_model_with_medians_and_ratios(fidelity, digits_cnn_bundle):
    assert fidelity["schema_version"] == 1 and fidelity["blocks"] == 4 and fidelity["runs_per_block"] == 20
    assert "set_tensor" in fidelity["measures"] and fidelity["machine"]["cores"] >= 1
    tfl, onx = fidelity["results"]
    assert tfl["model"] == str(digits_cnn_bundle / "model.tflite") and tfl["backend"] == "litert"
    assert onx["backend"] == "onnxruntime" and onx["runs_on"] == "CPUExecutionProvider"
    assert tfl["runs_on"] == "xnnpack"
    for r in (tfl, onx):
        assert set(r["median_ms"]) == ARMS and all(v > 0 for v in r["median_ms"].values())
        assert r["ratio_bench_to_bare"] == pytest.approx(r["median_ms"]["bench"] / r["median_ms"]["bare"], rel=1e-2)
        assert r["ratio_bench_to_bare"] > 0 and r["ratio_run_to_bare"] > 0
        assert r["within_5pct"] == (abs(r["ratio_bench_to_bare"] - 1) <= 0.05)
        assert {k: len(v) for k, v in r["block_medians_ms"].items()} == {arm: 4 for arm in ARMS}
        assert len(r["sha256"]) == 64 and r["model_bytes"] > 1000


def test_the_table_names_each_model_and_its_ratio(fidelity):
    lines = fidelity["stdout"].splitlines()
    rows = [line for line in lines if line.startswith("digits-cnn/")]
    assert len(rows) == 2
    for row, r in zip(rows, fidelity["results"], strict=True):
        assert f"{r['ratio_bench_to_bare']:.4g}" in row


def test_the_bare_loop_and_bench_read_the_same_interpreter(digits_cnn_bundle):
    """Both loops leave the same outputs behind: they run one interpreter on one input."""
    from benchmarks.bench_fidelity import bare_loop, bench_loop
    from benchmarks.runner import _feeds
    from edge_runtime.backends import open_backend

    backend = open_backend(digits_cnn_bundle / "model.tflite")
    feeds = _feeds(backend.inputs, 1, {}, np.random.default_rng(0))
    bench_loop(backend, feeds)(3)
    after_bench = backend._it.get_tensor(backend._it.get_output_details()[0]["index"]).copy()
    assert len(bare_loop(backend, feeds)(3)) == 3
    after_bare = backend._it.get_tensor(backend._it.get_output_details()[0]["index"])
    np.testing.assert_array_equal(after_bench, after_bare)
    np.testing.assert_allclose(after_bare, backend.run(feeds)[0])
