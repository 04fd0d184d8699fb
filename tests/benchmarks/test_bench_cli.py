"""`edgeops bench` on models it made and models it did not, with every bad input."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from helpers.mqtt_collector import Collector

KEYS = {"artifact", "backend", "backend_version", "threads", "model_bytes", "init_ms", "first_ms", "warmup",
        "latency_ms", "throughput_ips", "peak_rss_mb", "accuracy", "machine"}


def bench(*args):
    return subprocess.run([sys.executable, "-m", "edgeops", "bench", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def plausible(r: dict, runs: int) -> None:
    assert KEYS <= set(r)
    lat = r["latency_ms"]
    assert lat["runs"] == runs
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
    assert lat["min"] <= lat["mean"] <= lat["max"] and lat["std"] >= 0
    assert r["throughput_ips"] > 0 and r["init_ms"] > 0 and r["first_ms"] > 0 and r["peak_rss_mb"] > 10
    assert r["machine"]["arch"] and r["machine"]["cores"] >= 1


@pytest.fixture(scope="module")
def two_input_onnx(tmp_path_factory):
    """A model this project did not make: two inputs, int64 ids and a float tensor with a dynamic length."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])
    feats = helper.make_tensor_value_info("feats", TensorProto.FLOAT, ["batch", 4])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 4])
    table = helper.make_tensor("table", TensorProto.FLOAT, [10, 4], np.random.default_rng(0).random(40).tolist())
    graph = helper.make_graph([
        helper.make_node("Gather", ["table", "ids"], ["emb"]),
        helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
        helper.make_node("Add", ["pooled", "feats"], ["out"]),
    ], "two_inputs", [ids, feats], [out], initializer=[table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("onnx") / "two_inputs.onnx"
    onnx.save(model, path)
    return path


def test_json_keys_and_plausibility_on_tflite_and_onnx(digits_cnn_bundle, tmp_path):
    res = bench(digits_cnn_bundle / "model.int8.tflite", digits_cnn_bundle / "model.onnx", "--runs", 30, "--json", "-")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["backend"] for r in doc["results"]] == ["litert", "onnxruntime"]
    for r in doc["results"]:
        plausible(r, 30)
        assert r["accuracy"] is None


def test_dynamic_batch_dimension_takes_the_batch_option(bc_rf_bundle):
    doc = json.loads(bench(bc_rf_bundle / "model.onnx", "--runs", 20, "--batch", 8, "--json", "-").stdout)
    (r,) = doc["results"]
    assert r["inputs"][0]["shape"] == [8, 30] and r["batch"] == 8
    plausible(r, 20)


def test_a_model_with_two_inputs_and_a_dynamic_dimension(two_input_onnx):
    res = bench(two_input_onnx, "--runs", 20, "--input-shape", "ids=2,7", "--input-shape", "feats=2,4", "--json", "-")
    assert res.returncode == 0, res.stderr
    (r,) = json.loads(res.stdout)["results"]
    assert {i["name"]: i["shape"] for i in r["inputs"]} == {"ids": [2, 7], "feats": [2, 4]}
    assert {i["name"]: i["dtype"] for i in r["inputs"]} == {"ids": "int64", "feats": "float32"}
    plausible(r, 20)


def test_side_by_side_with_accuracy_on_a_dataset(digits_cnn_bundle, tmp_path):
    res = bench(digits_cnn_bundle, "--runs", 20, "--dataset", "digits", "--json", tmp_path / "r.json",
                "--csv", tmp_path / "r.csv")
    assert res.returncode == 0, res.stderr
    assert "model.int8.tflite" in res.stdout and "speed-up" in res.stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    results = doc["results"]
    manifest = json.loads((digits_cnn_bundle / "manifest.json").read_text())
    expected = {a["file"]: a["parity"]["artifact_metric"] for a in manifest["artifacts"]}
    for r in results:
        assert r["accuracy"] == pytest.approx(expected[r["artifact"].split("/")[-1]], abs=1e-6)
    assert results[0]["speedup_vs_first"] == 1.0 and results[0]["size_ratio_vs_first"] == 1.0
    assert sum(r["recommended"] for r in results) == 1
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(results) and float(rows[0]["p50"]) > 0


@pytest.mark.parametrize("args,fragment", [
    (["{tmp}/missing.tflite"], "no such file"),
    (["{tmp}/notes.txt"], "not a model"),
    (["{tmp}/garbage.onnx"], "not a valid ONNX model"),
])
def test_bad_paths_are_one_line_errors(tmp_path, args, fragment):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "garbage.onnx").write_bytes(b"\xff\xfe" * 100)
    res = bench(*[a.format(tmp=tmp_path) for a in args])
    assert res.returncode == 3 and fragment in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unspecified_dynamic_dimension_names_the_input(two_input_onnx):
    res = bench(two_input_onnx, "--runs", 5)
    assert res.returncode == 3 and "input 'ids' has a dynamic dimension 1" in res.stderr
    assert "--input-shape ids=1,N" in res.stderr and "Traceback" not in res.stderr


def test_a_shape_that_does_not_fit(two_input_onnx, bc_rf_bundle):
    res = bench(bc_rf_bundle / "model.onnx", "--runs", 5, "--input-shape", "input=1,29")
    assert res.returncode == 3 and "does not fit" in res.stderr and "Traceback" not in res.stderr
    res = bench(two_input_onnx, "--input-shape", "ids=2,7,1", "--input-shape", "feats=2,4")
    assert res.returncode == 3 and "has 2 dimensions" in res.stderr


def test_publish_sends_the_result_to_the_bench_topic(mosquitto, bc_rf_bundle):
    sub = Collector(mosquitto.port)
    try:
        res = bench(bc_rf_bundle, "--runs", 10, "--publish", mosquitto.url, "--device-id", "pi-7", "--fleet", "lab")
        assert res.returncode == 0, res.stderr
        assert sub.wait_for(lambda: any(t == "edgeops/lab/pi-7/bench" for t, _ in sub.messages))
        doc = next(m for t, m in sub.messages if t == "edgeops/lab/pi-7/bench")
        assert doc["device_id"] == "pi-7" and doc["results"][0]["latency_ms"]["runs"] == 10
        # what the monitor needs to use it as the device's latency baseline for this bundle version
        manifest = json.loads((bc_rf_bundle / "manifest.json").read_text())
        r = doc["results"][0]
        assert (r["bundle"], r["bundle_version"]) == (manifest["name"], manifest["version"])
        assert r["latency_ms"]["p95"] > 0
    finally:
        sub.close()


def test_benchmarking_a_bundle_archive_leaves_no_temporary_folder(bc_mlp_bundle, tmp_path, monkeypatch):
    import tarfile

    from click.testing import CliRunner

    from benchmarks.cli import bench_cmd
    from edge_runtime.bundle import pack

    archive = pack(bc_mlp_bundle, tmp_path / "bc.tar.gz")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)     # read TMPDIR again
    res = CliRunner().invoke(bench_cmd, [str(archive), "--runs", "5", "--warmup", "1", "--in-process",
                                         "--artifact", "model.int8.tflite"])
    assert res.exit_code == 0, res.output
    assert tarfile.is_tarfile(archive)
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("edgeops-bundle-")]
