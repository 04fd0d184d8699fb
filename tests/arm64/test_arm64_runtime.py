"""edge_runtime on the emulated aarch64 device: it imports light and predicts what the host predicts."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.arm64


def test_edge_runtime_and_the_cli_import_without_training_frameworks(arm_device):
    code = textwrap.dedent("""
        import json, sys, time
        t = time.perf_counter()
        import edge_runtime, edge_runtime.model, edge_runtime.agent, edge_runtime.cli
        from edge_runtime.backends import onnx, tflite
        import onnxruntime, ai_edge_litert.interpreter, paho.mqtt.client
        import edgeops.cli
        seconds = time.perf_counter() - t
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "sklearn", "keras"))
        print(json.dumps({"bad": bad, "seconds": seconds, "version": edge_runtime.__version__}))
    """)
    proc = arm_device.python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["bad"] == []

    for args in (["--help"], ["run", "--help"], ["bench", "--help"], ["inspect", "--help"]):
        proc = arm_device.edgeops(args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "Usage:" in proc.stdout


def _host_predict(bundle, artifact, x):
    import edge_runtime

    return np.asarray(edge_runtime.load(bundle, artifact=artifact).predict(x))


def test_bundles_predict_inside_what_they_predict_on_the_host(guest, digits_cnn_bundle, bc_rf_bundle,
                                                                reference_data):
    from convert.reference import digits_images

    digits = digits_images(reference_data["digits"].X_test)
    bc = reference_data["breast_cancer"].X_test
    jobs = [
        {"kind": "bundle", "model": digits_cnn_bundle, "artifact": "model.int8.tflite", "x": digits},
        {"kind": "bundle", "model": digits_cnn_bundle, "artifact": "model.int8.onnx", "x": digits},
        {"kind": "bundle", "model": digits_cnn_bundle, "artifact": "model.tflite", "x": digits},
        {"kind": "bundle", "model": bc_rf_bundle, "artifact": None, "x": bc},
    ]
    report = guest(jobs)
    assert report["machine"] == "aarch64"
    assert report["forbidden"] == [], "a bundle loaded TensorFlow/scikit-learn/Keras on the device"

    for job, result in zip(jobs, report["results"], strict=True):
        inside = result["y"]
        host = _host_predict(job["model"], job["artifact"], job["x"])
        what = f"{job['model'].name}/{job['artifact'] or 'default'}"
        assert inside.shape == host.shape, what
        # Quantized TFLite computes in integers: the same numbers, bit for bit. ONNX Runtime's int8 kernels
        # differ by architecture (on x86 without VNNI its u8s8 products can saturate, on ARM they do not),
        # so there the device is held to the same classes, not to the host's saturated numbers.
        if job["artifact"] == "model.int8.onnx":
            agree = float((inside.argmax(axis=-1) == host.argmax(axis=-1)).mean())
            assert agree >= 0.98, f"{what}: {agree:.1%} of the classes agree"
            continue
        if job["artifact"] and "int8" in job["artifact"]:
            np.testing.assert_array_equal(inside, host, err_msg=what)
        else:
            np.testing.assert_allclose(inside, host, rtol=0, atol=1e-5, err_msg=what)
        assert (inside.argmax(axis=-1) == host.argmax(axis=-1)).all(), what
