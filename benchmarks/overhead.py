"""What measuring costs on the device: the raw interpreter loop vs EdgeModel.predict, one process.

    python -m benchmarks.overhead [--json FILE] [--rounds N] [--calls N]

Three loops run interleaved in rounds on the same input: the bare LiteRT
loop (set_tensor / invoke / get_tensor on pre-quantized input), ``predict``
without telemetry, and ``predict`` feeding a telemetry window. Medians of
per-call times; overhead = predict-with-telemetry minus the raw loop.
Targets: at most 20 us per call on the Digits MLP (int8), at most 5% of the
median latency on a ~3 ms image model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json


def build_models(out: Path) -> dict[str, Path]:
    """The Digits MLP (int8 TFLite bundle) and a ~3 ms image CNN (float32 TFLite bundle)."""
    import keras

    from convert import to_bundle
    from convert.reference import load_reference_data, standardisation, train_keras_mlp

    data = load_reference_data("digits")
    mlp = train_keras_mlp(data, hidden=128, epochs=10)
    to_bundle(mlp, out / "digits-mlp", formats=["tflite"], quantize=["int8"], calibration=data.X_train,
              holdout=(data.X_test, data.y_test), labels=data.labels, normalization=standardisation(data), force=True)
    keras.utils.set_random_seed(0)
    cnn = keras.Sequential([
        keras.Input((128, 128, 3)),
        keras.layers.Conv2D(32, 3, activation="relu"),
        keras.layers.Conv2D(64, 3, strides=2, activation="relu"),
        keras.layers.Conv2D(64, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    rng = np.random.default_rng(0)
    X = rng.random((32, 128, 128, 3), dtype=np.float32)
    y = rng.integers(0, 10, 32)
    to_bundle(cnn, out / "image-cnn", formats=["tflite"], quantize=["none"], holdout=(X, y), calibration=X,
              max_accuracy_drop=100.0, force=True)
    return {"digits-mlp (int8)": out / "digits-mlp", "image-cnn 128x128x3 (float32)": out / "image-cnn"}


def time_calls(fn, n: int) -> list[float]:
    perf = time.perf_counter
    out = []
    for _ in range(n):
        t0 = perf()
        fn()
        out.append(perf() - t0)
    return out


def measure(bundle: Path, rounds: int, calls: int) -> dict:
    import edge_runtime
    from edge_runtime.input_check import quantize

    model = edge_runtime.load(bundle)
    shape = model.input_spec.shape
    rng = np.random.default_rng(1)
    x = rng.random(shape, dtype=np.float32) if len(shape) == 3 else rng.normal(5, 3, size=shape).astype(np.float32)
    # the raw loop: what an application would write against the interpreter directly
    it = model.backend._it
    din, dout = it.get_input_details()[0], it.get_output_details()[0]
    it.resize_tensor_input(din["index"], [1, *shape])
    it.allocate_tensors()
    feed = model._to_model(x[None, ...])
    if feed.dtype != din["dtype"]:
        feed = quantize(feed, *din["quantization"], din["dtype"])

    def raw():
        it.set_tensor(din["index"], feed)
        it.invoke()
        return it.get_tensor(dout["index"])

    model.backend._refresh()
    recorder = model.start_recording(window_seconds=None, window_size=1000)
    model.stop_recording()
    plain, recorded, bare = [], [], []
    for _ in range(3):  # warm-up
        raw()
        model.predict(x)
    for _ in range(rounds):
        bare += time_calls(raw, calls)
        model.recorder = None
        plain += time_calls(lambda: model.predict(x), calls)
        model.recorder = recorder
        recorded += time_calls(lambda: model.predict(x), calls)
        recorder.poll()
    med = {k: float(np.median(v)) * 1e6 for k, v in (("raw", bare), ("predict", plain), ("recorded", recorded))}
    return {
        "raw_us": round(med["raw"], 2), "predict_us": round(med["predict"], 2),
        "recorded_us": round(med["recorded"], 2),
        "validation_us": round(med["predict"] - med["raw"], 2),
        "telemetry_us": round(med["recorded"] - med["predict"], 2),
        "overhead_us": round(med["recorded"] - med["raw"], 2),
        "overhead_pct": round((med["recorded"] - med["raw"]) / med["raw"] * 100, 2),
        "calls_each": rounds * calls,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeops-overhead-") as out:   # the models, removed however it ends
        for name, path in build_models(Path(out)).items():
            r = {"model": name, **measure(path, args.rounds, args.calls)}
            if "mlp" in name:
                r["target"] = "<= 20 us"
                r["met"] = r["overhead_us"] <= 20
            else:
                r["target"] = "<= 5 %"
                r["met"] = r["overhead_pct"] <= 5
            rows.append(r)
    print_table(rows, [("model", "model"), ("raw_us", "raw loop us"), ("predict_us", "predict us"),
                       ("recorded_us", "predict+telemetry us"), ("validation_us", "validation us"),
                       ("telemetry_us", "telemetry us"), ("overhead_us", "overhead us"),
                       ("overhead_pct", "overhead %"), ("target", "target"), ("met", "met")],
                title="Measuring overhead: medians of per-call times, interleaved rounds, one process")
    doc = {"results": rows}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
