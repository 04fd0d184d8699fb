"""Conversion benchmark: what quantization costs and saves on the reference models.

Trains and converts every reference model (Keras MLPs on Breast Cancer and
Wine, the Keras CNN on Digits, StandardScaler+RandomForest on all three),
then prints, per artifact: size, size ratio against the float32 artifact of
the same format, accuracy of the source and of the artifact on the holdout
split, the drop in points, label agreement and the largest probability
difference. It also times one-row inference of the RandomForest pipelines:
ONNX Runtime on the converted model against scikit-learn's predict_proba,
both single-threaded, medians of the same run.

    python -m benchmarks.conversion [--json FILE] [--runs 300]

Targets checked (and printed as PASS/FAIL): int8 TFLite <= 0.30x float32 on
the Keras models; int8 and float16 lose <= 1.0 accuracy point; RandomForest
ONNX agrees on 100% of labels with probabilities within 1e-5; ONNX one-row
latency >= 100x faster than scikit-learn.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODELS = [("mlp", "breast_cancer"), ("mlp", "wine"), ("cnn", "digits"),
          ("rf", "breast_cancer"), ("rf", "wine"), ("rf", "digits")]
INT8_SIZE_TARGET = 0.30
DROP_TARGET = 1.0
PROB_DIFF_TARGET = 1e-5
SPEEDUP_TARGET = 100.0


def _median_ms(fn, runs: int, warmup: int = 20) -> dict:
    """Warm-up calls apart, then ``runs`` timed calls: median/p95/min in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    times.sort()
    return {"median_ms": statistics.median(times), "p95_ms": times[int(0.95 * (len(times) - 1))],
            "min_ms": times[0], "runs": runs, "warmup": warmup}


def artifact_rows(manifest: dict, kind: str, dataset: str) -> list[dict]:
    """One row per artifact of a converted reference bundle."""
    rows = []
    for art in manifest["artifacts"]:
        p = art.get("parity") or {}
        rows.append({
            "dataset": dataset, "model": kind, "artifact": art["file"], "format": art["format"],
            "quantization": art["quantization"], "size_bytes": art["size_bytes"], "size_ratio": art.get("size_ratio"),
            "source_accuracy": p.get("source_metric"), "artifact_accuracy": p.get("artifact_metric"),
            "drop_points": p.get("metric_drop_points"), "label_agreement": p.get("label_agreement"),
            "max_abs_prob_diff": p.get("max_abs_prob_diff"),
        })
    return rows


def forest_latency(bundle_dir: Path, dataset: str, runs: int) -> dict:
    """One-row latency: ONNX Runtime on the bundle's model.onnx vs scikit-learn predict_proba."""
    import onnxruntime as ort

    from convert.reference import load_reference_data, train_random_forest

    data = load_reference_data(dataset)
    pipe = train_random_forest(data)  # deterministic: the same forest the bundle was made from
    row = data.X_test[:1].astype(np.float32)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(bundle_dir / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    onnx = _median_ms(lambda: sess.run([out_name], {in_name: row}), runs)
    sk = _median_ms(lambda: pipe.predict_proba(row), runs)
    result = {"dataset": dataset, "onnxruntime": onnx, "sklearn": sk,
              "speedup": sk["median_ms"] / onnx["median_ms"], "onnxruntime_version": ort.__version__}
    try:  # the device path: EdgeModel.predict adds validation and statistics around the same session
        import edge_runtime

        model = edge_runtime.load(bundle_dir, threads=1)
        result["edge_runtime"] = _median_ms(lambda: model.predict(row[0]), runs)
    except Exception as exc:  # noqa: BLE001 - an optional column; the runtime may be mid-change
        result["edge_runtime_error"] = f"{type(exc).__name__}: {exc}"[:200]
    return result


def _int8_size_check(r: dict, where: str) -> list[dict]:
    if r["model"] in ("mlp", "cnn") and r["format"] == "tflite" and r["quantization"] == "int8":
        return [{"target": f"int8 size <= {INT8_SIZE_TARGET}x float32", "where": where, "value": r["size_ratio"],
                 "ok": r["size_ratio"] is not None and r["size_ratio"] <= INT8_SIZE_TARGET}]
    return []


def _drop_check(r: dict, where: str) -> list[dict]:
    if r["format"] == "tflite" and r["quantization"] in ("int8", "float16"):
        return [{"target": f"accuracy drop <= {DROP_TARGET} point", "where": where, "value": r["drop_points"],
                 "ok": r["drop_points"] is not None and r["drop_points"] <= DROP_TARGET}]
    return []


def _rf_parity_checks(r: dict, where: str) -> list[dict]:
    if r["model"] == "rf" and r["quantization"] == "none":
        return [{"target": "RF ONNX label agreement 100%", "where": where, "value": r["label_agreement"],
                 "ok": r["label_agreement"] == 1.0},
                {"target": f"RF ONNX max prob diff <= {PROB_DIFF_TARGET:g}", "where": where,
                 "value": r["max_abs_prob_diff"], "ok": r["max_abs_prob_diff"] <= PROB_DIFF_TARGET}]
    return []


def check_targets(rows: list[dict], latencies: list[dict]) -> list[dict]:
    """The project's conversion targets, each with the measured value and PASS/FAIL."""
    checks = []
    for r in rows:
        where = f"{r['dataset']}/{r['model']}/{r['artifact']}"
        for check in (_int8_size_check, _drop_check, _rf_parity_checks):
            checks.extend(check(r, where))
    for lat in latencies:
        checks.append({"target": f"RF ONNX one-row >= {SPEEDUP_TARGET:g}x faster than sklearn",
                       "where": f"{lat['dataset']}/rf", "value": round(lat["speedup"], 1),
                       "ok": lat["speedup"] >= SPEEDUP_TARGET})
    return checks


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(rows: list[dict], latencies: list[dict], checks: list[dict], out=sys.stdout) -> None:
    w = out.write
    w(f"{'dataset':<14}{'model':<6}{'artifact':<22}{'size':>10}{'ratio':>7}{'src acc':>9}{'art acc':>9}"
      f"{'drop':>7}{'agree':>8}{'max|dp|':>10}\n")
    for r in rows:
        w(f"{r['dataset']:<14}{r['model']:<6}{r['artifact']:<22}{r['size_bytes']:>10}{_f(r['size_ratio'], '.3f'):>7}"
          f"{_f(r['source_accuracy'], '.4f'):>9}{_f(r['artifact_accuracy'], '.4f'):>9}{_f(r['drop_points'], '.2f'):>7}"
          f"{_f(r['label_agreement'], '.3f'):>8}{_f(r['max_abs_prob_diff'], '.1e'):>10}\n")
    w("\nRandomForest pipeline, one row, single thread (median ms over the timed runs, warm-up excluded)\n")
    w(f"{'dataset':<14}{'onnxruntime':>12}{'sklearn':>10}{'speedup':>9}{'EdgeModel':>11}\n")
    for lat in latencies:
        em = lat.get("edge_runtime", {}).get("median_ms")
        w(f"{lat['dataset']:<14}{lat['onnxruntime']['median_ms']:>12.4f}{lat['sklearn']['median_ms']:>10.3f}"
          f"{lat['speedup']:>8.0f}x{_f(em, '.4f'):>11}\n")
    w("\ntargets\n")
    for c in checks:
        w(f"  {'PASS' if c['ok'] else 'FAIL'}  {c['target']:<44} {c['where']:<36} {c['value']}\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conversion", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", dest="json_file", help="Write the rows, latencies and target checks to this file.")
    parser.add_argument("--runs", type=int, default=300, help="Timed one-row runs per engine (default 300).")
    parser.add_argument("--keep", help="Keep the converted bundles in this folder (default: a temporary one).")
    args = parser.parse_args(argv)

    from convert.reference import convert_reference

    rows: list[dict] = []
    latencies: list[dict] = []
    timings: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgeops-bench-conv-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        for kind, dataset in MODELS:
            print(f"training and converting {dataset}/{kind} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            result, _ = convert_reference(kind, dataset, root / f"{dataset}-{kind}", force=True)
            timings[f"{dataset}/{kind}"] = round(time.perf_counter() - t0, 2)
            rows += artifact_rows(result.manifest, kind, dataset)
            if kind == "rf":
                latencies.append(forest_latency(result.path, dataset, args.runs))
    checks = check_targets(rows, latencies)
    print_report(rows, latencies, checks)
    if args.json_file:
        import onnxruntime
        import sklearn
        import tensorflow as tf

        doc = {
            "benchmark": "conversion", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "platform": {"machine": platform.machine(), "python": platform.python_version(),
                         "cpu_count": os.cpu_count()},
            "versions": {"tensorflow": tf.__version__, "sklearn": sklearn.__version__,
                         "onnxruntime": onnxruntime.__version__},
            "train_and_convert_seconds": timings, "artifacts": rows, "forest_latency": latencies, "targets": checks,
        }
        Path(args.json_file).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nwrote {args.json_file}", file=sys.stderr)
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
