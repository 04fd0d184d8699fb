"""Delegates and execution providers: what this machine can load, and the fall back to the CPU when one cannot.

Real LiteRT and ONNX Runtime on the project's Digits CNN; a real external delegate built here from C
(it takes no nodes, but LiteRT loads it, passes it its options and applies it) stands for Coral's
libedgetpu, which this machine does not have.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_runtime.accel import Acceleration, parse_delegate, parse_provider
from edge_runtime.backends import open_backend
from edge_runtime.errors import AcceleratorError, InvalidInputError

ABSENT = "/nonexistent/libedgetpu.so.1"

# The external delegate interface LiteRT's load_delegate() calls; Prepare claims no node (or fails with
# the option prepare=fail), create refuses with the option fail=1, record=FILE writes the options it got,
# static=1 makes it a delegate for static shapes only (as most NPU delegates are).
DELEGATE_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
typedef struct TfLiteDelegate {
  void* data_;
  int (*Prepare)(void*, struct TfLiteDelegate*);
  int (*CopyFromBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  int (*CopyToBufferHandle)(void*, struct TfLiteDelegate*, int, void*);
  void (*FreeBufferHandle)(void*, struct TfLiteDelegate*, int*);
  int64_t flags;
  void* opaque_delegate_builder;
} TfLiteDelegate;
static int prepare_ok(void* context, TfLiteDelegate* d) { return 0; }
static int prepare_fail(void* context, TfLiteDelegate* d) { return 1; }
TfLiteDelegate* tflite_plugin_create_delegate(char** keys, char** values, size_t n, void (*report)(const char*)) {
  TfLiteDelegate* d = calloc(1, sizeof(TfLiteDelegate));
  d->Prepare = prepare_ok;
  d->flags = 1;  /* kTfLiteDelegateFlagsAllowDynamicTensors: the Digits CNN has a dynamic batch dimension */
  for (size_t i = 0; i < n; i++) {
    if (strcmp(keys[i], "fail") == 0) { if (report) report("refused by its options"); free(d); return NULL; }
    if (strcmp(keys[i], "prepare") == 0 && strcmp(values[i], "fail") == 0) d->Prepare = prepare_fail;
    if (strcmp(keys[i], "static") == 0) d->flags = 0;
    if (strcmp(keys[i], "record") == 0) {
      FILE* f = fopen(values[i], "a");
      if (f) { for (size_t j = 0; j < n; j++) fprintf(f, "%s=%s\n", keys[j], values[j]); fclose(f); }
    }
  }
  return d;
}
void tflite_plugin_destroy_delegate(TfLiteDelegate* d) { free(d); }
"""


@pytest.fixture(scope="module")
def test_delegate(tmp_path_factory) -> Path:
    """A minimal external delegate library compiled here."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the test delegate")
    d = tmp_path_factory.mktemp("delegate")
    (d / "noop.c").write_text(DELEGATE_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(d / "libnoop_delegate.so"), str(d / "noop.c")],
                   check=True, capture_output=True)
    return d / "libnoop_delegate.so"


@pytest.fixture(scope="module")
def cnn(digits_cnn_bundle) -> dict[str, Path]:
    return {"tflite": digits_cnn_bundle / "model.tflite", "onnx": digits_cnn_bundle / "model.onnx"}


def sample(backend) -> list[np.ndarray]:
    t = backend.inputs[0]
    shape = [1 if d < 0 else d for d in t.shape]
    return [np.random.default_rng(0).random(shape).astype(t.dtype)]


def edgeops(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeops", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


# -- what this machine can load ----------------------------------------------------------------------


def test_xnnpack_on_takes_nodes_and_off_runs_the_builtin_kernels_with_the_same_answer(cnn):
    on = open_backend(cnn["tflite"], accel=Acceleration())
    off = open_backend(cnn["tflite"], accel=Acceleration(xnnpack=False))
    assert on.accel.delegate == "xnnpack" and on.accel.delegated_nodes >= 1 and on.accel.fallback is None
    assert off.accel.delegate is None and off.accel.delegated_nodes == 0 and off.accel.fallback is None
    x = sample(on)
    np.testing.assert_allclose(on.run(x)[0], off.run(x)[0], atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_the_interpreter_with_xnnpack(cnn, threads):
    b = open_backend(cnn["tflite"], threads=threads, accel=Acceleration())
    ref = open_backend(cnn["tflite"])
    assert b.threads == threads and b.accel.delegate == "xnnpack"
    x = sample(b)
    np.testing.assert_allclose(b.run(x)[0], ref.run(x)[0], atol=1e-5)


def test_every_provider_in_this_onnx_runtime_wheel_runs_the_model(cnn):
    import onnxruntime as ort

    ref = open_backend(cnn["onnx"])
    x = sample(ref)
    for name in ort.get_available_providers():
        b = open_backend(cnn["onnx"], accel=Acceleration.from_specs(providers=[name]))
        assert b.accel.providers[0] == name, (name, b.accel)
        assert b.accel.providers[-1] == "CPUExecutionProvider" and b.accel.fallback is None
        np.testing.assert_allclose(b.run(x)[0], ref.run(x)[0], atol=1e-5)


def test_providers_go_to_onnx_runtime_in_order_with_their_options(cnn, monkeypatch):
    import onnxruntime as ort

    if "AzureExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime wheel has only the CPU provider")
    asked = []
    real = ort.InferenceSession

    def spy(data, opts, providers):
        asked.append(providers)
        return real(data, opts, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", spy)
    b = open_backend(cnn["onnx"], accel=Acceleration.from_specs(providers=["azure:x=1", "cpu:use_arena=0"]))
    assert asked == [[("AzureExecutionProvider", {"x": "1"}), ("CPUExecutionProvider", {"use_arena": "0"})]]
    assert b.accel.providers == ("AzureExecutionProvider", "CPUExecutionProvider") and b.accel.fallback is None


def test_an_external_delegate_loads_with_its_options_and_runs(cnn, test_delegate, tmp_path):
    record = tmp_path / "options.txt"
    b = open_backend(cnn["tflite"], accel=Acceleration.from_specs(f"{test_delegate}:record={record},cache=off"))
    assert b.accel.delegate == str(test_delegate) and b.accel.fallback is None
    assert record.read_text().splitlines() == [f"record={record}", "cache=off"]
    x = sample(b)
    np.testing.assert_allclose(b.run(x)[0], open_backend(cnn["tflite"]).run(x)[0], atol=1e-5)


def test_a_second_input_shape_gets_its_own_delegate_instance(cnn, test_delegate, tmp_path, digits_cnn_bundle):
    record = tmp_path / "options.txt"
    b = open_backend(cnn["tflite"], accel=Acceleration.from_specs(f"{test_delegate}:record={record}"))
    shape = [3 if d < 0 or i == 0 else d for i, d in enumerate(b.inputs[0].shape)]
    out = b.run([np.zeros(shape, np.float32)])
    assert out[0].shape[0] == 3
    assert len(record.read_text().splitlines()) == 2   # the first interpreter's delegate, then the batch's


# -- falling back to the CPU ---------------------------------------------------------------------------


def test_an_absent_delegate_falls_back_to_the_cpu_with_one_logged_line(cnn, caplog):
    with caplog.at_level(logging.WARNING, logger="edgeops.runtime"):
        b = open_backend(cnn["tflite"], accel=Acceleration.from_specs(ABSENT))
    assert b.accel.delegate == "xnnpack"
    assert ABSENT in b.accel.fallback and "cannot be loaded" in b.accel.fallback
    lines = [r.getMessage() for r in caplog.records if r.name == "edgeops.runtime"]
    assert len(lines) == 1 and ABSENT in lines[0] and "running on the CPU instead" in lines[0]
    assert "\n" not in lines[0]
    assert b.run(sample(b))[0].shape[-1] == 10


def test_a_library_that_is_not_a_delegate_falls_back(cnn, capfd):
    libc = ctypes.util.find_library("c")
    assert libc
    b = open_backend(cnn["tflite"], accel=Acceleration.from_specs(libc))
    assert "not a LiteRT external delegate" in b.accel.fallback and b.accel.delegate == "xnnpack"
    assert "Traceback" not in capfd.readouterr().err   # LiteRT's own loader would print one from __del__


def test_a_delegate_that_refuses_its_options_or_fails_to_prepare_falls_back(cnn, test_delegate):
    refused = open_backend(cnn["tflite"], accel=Acceleration.from_specs(f"{test_delegate}:fail=1"))
    assert "failed to load" in refused.accel.fallback and "refused by its options" in refused.accel.fallback
    for option in ("prepare=fail", "static=1"):   # static: the model's batch dimension is dynamic
        failed = open_backend(cnn["tflite"], accel=Acceleration.from_specs(f"{test_delegate}:{option}"))
        assert "could not be applied" in failed.accel.fallback and failed.accel.delegate == "xnnpack"
        assert failed.run(sample(failed))[0].shape[-1] == 10


def test_a_provider_missing_from_this_build_falls_back_to_cpu(cnn, caplog):
    import onnxruntime as ort

    missing = next(p for p in ("CUDAExecutionProvider", "OpenVINOExecutionProvider", "CoreMLExecutionProvider")
                   if p not in ort.get_available_providers())
    with caplog.at_level(logging.WARNING, logger="edgeops.runtime"):
        b = open_backend(cnn["onnx"], accel=Acceleration.from_specs(providers=[missing]))
    assert b.accel.providers == ("CPUExecutionProvider",)
    assert missing in b.accel.fallback and "not in this ONNX Runtime build" in b.accel.fallback
    assert any(missing in r.getMessage() for r in caplog.records)


def test_an_unknown_provider_name_is_an_error_that_lists_the_available_ones(cnn):
    with pytest.raises(InvalidInputError, match="knows no such provider.*CPUExecutionProvider"):
        open_backend(cnn["onnx"], accel=Acceleration.from_specs(providers=["TurboNPU"]))


# -- --require-delegate ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [ABSENT, "libc"])
def test_require_delegate_turns_the_fallback_into_an_error(cnn, spec):
    spec = ctypes.util.find_library("c") if spec == "libc" else spec
    with pytest.raises(AcceleratorError) as err:
        open_backend(cnn["tflite"], accel=Acceleration.from_specs(spec, require=True))
    assert err.value.exit_code == 6 and spec in str(err.value)


def test_require_delegate_with_a_missing_provider_is_an_error(cnn):
    with pytest.raises(AcceleratorError, match="CUDAExecutionProvider"):
        open_backend(cnn["onnx"], accel=Acceleration.from_specs(providers=["cuda"], require=True))


def test_bench_require_delegate_exits_6_with_one_line(cnn):
    res = edgeops("bench", cnn["tflite"], "--runs", 5, "--delegate", ABSENT, "--require-delegate")
    assert res.returncode == 6, res.stderr
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgeops: error: delegate") and ABSENT in err[0]


def test_serve_require_delegate_refuses_to_start(digits_cnn_bundle):
    res = edgeops("serve", digits_cnn_bundle, "--artifact", "model.tflite", "--port", "0", "--delegate", ABSENT,
                  "--require-delegate", timeout=120)
    assert res.returncode == 6 and ABSENT in res.stderr


def test_bench_unknown_provider_exits_3(cnn):
    res = edgeops("bench", cnn["onnx"], "--runs", 5, "--provider", "TurboNPU")
    assert res.returncode == 3 and "TurboNPU" in res.stderr


# -- what bench reports --------------------------------------------------------------------------------


def test_bench_json_says_what_ran_and_why_not(cnn, test_delegate):
    res = edgeops("bench", cnn["tflite"], cnn["onnx"], "--runs", 5, "--delegate", ABSENT, "--provider", "cpu",
                  "--json", "-")
    assert res.returncode == 0, res.stderr
    tfl, onx = json.loads(res.stdout)["results"]
    assert tfl["delegate"] == "xnnpack" and tfl["provider"] is None
    assert ABSENT in tfl["accelerator"]["fallback"] and tfl["accelerator"]["requested"]["delegate"] == ABSENT
    assert onx["delegate"] is None and onx["provider"] == "CPUExecutionProvider"
    assert "applies to TFLite" in onx["accelerator"]["fallback"]
    ok = edgeops("bench", cnn["tflite"], "--runs", 5, "--delegate", test_delegate, "--json", "-")
    r = json.loads(ok.stdout)["results"][0]
    assert r["delegate"] == str(test_delegate) and r["accelerator"]["fallback"] is None


def test_bench_table_prints_the_fallback_note(cnn):
    res = edgeops("bench", cnn["tflite"], "--runs", 5, "--no-xnnpack", "--delegate", ABSENT)
    assert res.returncode == 0, res.stderr
    note = [line for line in res.stdout.splitlines() if line.startswith("note:")]
    assert len(note) == 1 and ABSENT in note[0] and "ran on the builtin CPU kernels" in note[0]


def test_bench_profile_uses_the_board_delegate_with_fallback(cnn):
    res = edgeops("bench", cnn["tflite"], "--runs", 5, "--profile", "coral-dev-board", "--json", "-", "--in-process")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    r = doc["results"][0]
    assert doc["profile"] == "coral-dev-board"
    assert r["accelerator"]["requested"]["delegate"] == "libedgetpu.so.1"
    assert "libedgetpu.so.1" in r["accelerator"]["fallback"] and r["delegate"] == "xnnpack"
    strict = edgeops("bench", cnn["tflite"], "--runs", 5, "--profile", "coral-dev-board", "--require-delegate")
    assert strict.returncode == 6 and "libedgetpu.so.1" in strict.stderr


def test_board_profiles_name_their_delegate():
    from devices.boards import PROFILES

    assert PROFILES["coral-dev-board"].delegate == "libedgetpu.so.1"
    assert all(PROFILES[p].delegate is None for p in ("rpi-zero-2w", "rpi-3b-plus", "rpi-4b", "rpi-5"))


def test_load_takes_an_acceleration_and_the_model_reports_it(digits_cnn_bundle):
    import edge_runtime

    model = edge_runtime.load(digits_cnn_bundle, artifact="model.tflite", accel=Acceleration.from_specs(ABSENT))
    assert ABSENT in model.backend.accel.fallback
    assert model.predict(np.zeros(model.input_spec.shape, np.float32)).shape[-1] == 10


# -- parsing -------------------------------------------------------------------------------------------


def test_delegate_and_provider_specs():
    assert parse_delegate("libedgetpu.so.1") == ("libedgetpu.so.1", {})
    assert parse_delegate("/opt/armnn/libarmnnDelegate.so:backends=CpuAcc,logging-severity=info") == (
        "/opt/armnn/libarmnnDelegate.so", {"backends": "CpuAcc", "logging-severity": "info"})
    assert parse_provider("CPUExecutionProvider") == ("CPUExecutionProvider", {})
    assert parse_provider("xnnpack:intra_op_num_threads=2") == ("XnnpackExecutionProvider",
                                                                {"intra_op_num_threads": "2"})
    for bad in (":a=b", "lib.so:novalue", "lib.so:=1"):
        with pytest.raises(InvalidInputError, match="--delegate"):
            parse_delegate(bad)
    with pytest.raises(InvalidInputError, match="--provider"):
        parse_provider(":a=b")


def test_bench_csv_has_the_accelerator_columns(cnn, tmp_path):
    import csv

    out = tmp_path / "bench.csv"
    res = edgeops("bench", cnn["tflite"], cnn["onnx"], "--runs", 5, "--delegate", ABSENT, "--csv", out, "--in-process")
    assert res.returncode == 0, res.stderr
    tfl, onx = csv.DictReader(out.open())
    assert tfl["delegate"] == "xnnpack" and ABSENT in tfl["accelerator_fallback"]
    assert onx["provider"] == "CPUExecutionProvider"


def test_a_device_runs_on_the_cpu_when_its_delegate_is_absent_and_says_so_once(session_mosquitto, digits_cnn_bundle,
                                                                                tmp_path):
    stream = tmp_path / "x.npy"
    np.save(stream, np.random.default_rng(0).random((20, 8, 8, 1)).astype(np.float32))

    def run(*extra):
        return edgeops("run", digits_cnn_bundle, "--artifact", "model.tflite", "--device-id", "coral-1",
                       "--broker", session_mosquitto.url, "--input", stream, "--max-inferences", 20, "--no-flash",
                       "--confirm", "broker", "--state-dir", tmp_path / "state", "--delegate", ABSENT, *extra,
                       timeout=120)

    res = run()
    assert res.returncode == 0, res.stderr[-2000:]
    notes = [line for line in res.stderr.splitlines() if "running on the CPU instead" in line]
    assert len(notes) == 1 and ABSENT in notes[0]
    strict = run("--require-delegate")
    assert strict.returncode == 6 and "edgeops: error: delegate" in strict.stderr and ABSENT in strict.stderr
