"""Runs inside the emulated aarch64 device (and, for comparison, on the host).

    python guest.py JOBS.json REPORT.json

Each job: ``kind`` (``onnx``: ONNX Runtime on a model file, ``tflite``: LiteRT on a
model file, ``bundle``: ``edge_runtime.load(model, artifact=...).predict``),
``model``, optional ``artifact``, ``x`` (an .npy input) and ``out`` (where the
output .npy goes). The report says which machine ran it, the versions of the
libraries, how long each job took and which forbidden packages (TensorFlow,
scikit-learn, Keras) ended up in ``sys.modules``: none may.
"""

from __future__ import annotations

import json
import platform
import sys
import time

import numpy as np

FORBIDDEN = ("tensorflow", "sklearn", "keras")


def run_onnx(job: dict, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(job["model"], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: x})[0]


def run_tflite(job: dict, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=job["model"])
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x.astype(inp["dtype"]))
    interpreter.invoke()
    return interpreter.get_tensor(out["index"]).copy()


def run_bundle(job: dict, x: np.ndarray) -> np.ndarray:
    import edge_runtime

    return np.asarray(edge_runtime.load(job["model"], artifact=job.get("artifact")).predict(x))


def main(jobs_path: str, report_path: str) -> None:
    start = time.perf_counter()
    jobs = json.loads(open(jobs_path).read())
    results = []
    for job in jobs:
        x = np.load(job["x"])
        t0 = time.perf_counter()
        y = {"onnx": run_onnx, "tflite": run_tflite, "bundle": run_bundle}[job["kind"]](job, x)
        results.append({"seconds": time.perf_counter() - t0, "dtype": str(y.dtype), "shape": list(y.shape)})
        np.save(job["out"], y)
    versions = {}
    for name in ("numpy", "onnxruntime", "ai_edge_litert", "paho"):
        mod = sys.modules.get(name)
        versions[name] = getattr(mod, "__version__", None) if mod else None
    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "forbidden": sorted(m for m in sys.modules if m.split(".")[0] in FORBIDDEN),
        "versions": versions,
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    with open(report_path, "w") as fh:
        json.dump(report, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
