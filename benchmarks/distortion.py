"""Does `edgeops bench` distort what it measures? Its loop vs a bare interpreter loop, one process.

    python -m benchmarks.distortion [--json FILE] [--rounds N] [--runs N]

On a ~3 ms image model (float32 TFLite), rounds alternate between
``benchmarks.runner.measure`` (the loop behind `edgeops bench`) and a bare
LiteRT set_tensor/invoke/get_tensor loop on the same input. Target: the
bench p50 within 5% of the bare loop's p50 (medians over rounds).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json


def bare_loop(model_file: Path, runs: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_file))
    it.allocate_tensors()
    din, dout = it.get_input_details()[0], it.get_output_details()[0]
    shape = [1 if d < 0 else int(d) for d in din["shape"]]
    it.resize_tensor_input(din["index"], shape)
    it.allocate_tensors()
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(10):
        it.set_tensor(din["index"], x)
        it.invoke()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        it.set_tensor(din["index"], x)
        it.invoke()
        it.get_tensor(dout["index"])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=200)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from benchmarks.overhead import build_models
    from benchmarks.runner import measure

    bundles = build_models(Path(tempfile.mkdtemp(prefix="edgeops-distortion-")))
    model_file = next(p for name, p in bundles.items() if "image" in name) / "model.tflite"
    bench_p50, bare_p50 = [], []
    for _ in range(args.rounds):
        bare_p50.append(bare_loop(model_file, args.runs))
        bench_p50.append(measure(model_file, runs=args.runs, warmup=10)["latency_ms"]["p50"])
    bench, bare = float(np.median(bench_p50)), float(np.median(bare_p50))
    row = {"model": f"{model_file.parent.name}/{model_file.name}", "bare_p50_ms": round(bare, 4),
           "bench_p50_ms": round(bench, 4), "difference_pct": round((bench - bare) / bare * 100, 2),
           "rounds": args.rounds, "runs_per_round": args.runs}
    row["met"] = abs(row["difference_pct"]) <= 5
    print_table([row], [("model", "model"), ("bare_p50_ms", "bare loop p50 ms"),
                        ("bench_p50_ms", "edgeops bench p50 ms"),
                        ("difference_pct", "difference %"), ("rounds", "rounds"), ("met", "within 5%")],
                title="edgeops bench vs a bare interpreter loop (medians of per-round p50s, same process)")
    doc = {"result": row, "bare_p50_per_round": bare_p50, "bench_p50_per_round": bench_p50}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
