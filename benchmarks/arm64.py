"""Same predictions on aarch64? The reference bundles on x86 and in the emulated Raspberry Pi.

    python -m benchmarks.arm64 [--board rpi4|rpi5] [--cache DIR] [--bench-runs N] [--json FILE]

Builds the reference bundles (cached in ``--cache``), runs each artifact on the held-out test set
with ``edge_runtime`` natively and inside the emulated aarch64 device (QEMU user mode, see
docs/emulated-arm.md; prepare it first with ``python -m devtools.emulated_arm prepare``), and
prints, per artifact, the label agreement and the largest output difference between the two
machines. Then ``edgeops bench`` on the Digits CNN inside the device and natively, for the
machine block (the device must say aarch64). Emulated timings are QEMU's, not a Raspberry Pi's.

Exit status 1 when a check fails: an int8 artifact whose outputs are not bit-identical, a float
artifact more than 1e-5 apart, a label that differs, TensorFlow/scikit-learn/Keras loaded in the
device, or a device bench whose machine block does not say aarch64.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
GUEST = REPO / "tests" / "arm64" / "guest.py"
BUNDLES = [("cnn", "digits", ["model.int8.tflite", "model.tflite", "model.onnx"]),
           ("mlp", "digits", ["model.int8.tflite", "model.onnx"]),
           ("mlp", "breast_cancer", ["model.int8.tflite", "model.tflite", "model.onnx"]),
           ("mlp", "wine", ["model.int8.tflite", "model.onnx"]),
           ("rf", "breast_cancer", ["model.onnx"]),
           ("rf", "wine", ["model.onnx"]),
           ("rf", "digits", ["model.onnx"])]
#: Largest output difference allowed for float artifacts; int8 ones must be bit-identical.
FLOAT_ATOL = 1e-5


def converter_hash() -> str:
    """A hash of the converter's source: cached bundles are rebuilt when the converter changes."""
    h = hashlib.sha256()
    for p in sorted((REPO / "convert").glob("*.py")):
        h.update(p.read_bytes())
    h.update((REPO / "edge_runtime" / "schemas" / "manifest.schema.json").read_bytes())
    return h.hexdigest()[:12]


def build(cache: Path) -> dict:
    from convert.bundle_io import is_complete
    from convert.reference import convert_reference, digits_images, load_reference_data

    out = {}
    for kind, dataset, arts in BUNDLES:
        path = cache / f"{dataset}-{kind}"
        if not is_complete(path):
            print(f"converting the {dataset} {kind} reference model ...", file=sys.stderr)
            convert_reference(kind, dataset, path, force=True)
        X = load_reference_data(dataset).X_test
        if kind == "cnn":
            X = digits_images(X)
        out[(kind, dataset)] = (path, arts, X.astype(np.float32))
    return out


def _jobs(bundles: dict, work: Path, side: str) -> list[dict]:
    jobs = []
    for (kind, dataset), (path, arts, X) in bundles.items():
        x = work / f"{dataset}-{kind}-x.npy"
        np.save(x, X)
        for a in arts:
            jobs.append({"kind": "bundle", "model": str(path), "artifact": a, "x": str(x),
                         "out": str(work / f"{side}-{dataset}-{kind}-{a}.npy"), "name": f"{dataset}-{kind}"})
    return jobs


def _predict(device, jobs: list[dict], work: Path, side: str) -> dict:
    """Run ``jobs`` with tests/arm64/guest.py natively (x86_64) or in the emulated device (aarch64); its report."""
    (work / f"{side}.json").write_text(json.dumps(jobs))
    cmd = [str(GUEST), str(work / f"{side}.json"), str(work / f"{side}-report.json")]
    if side == "x86_64":
        subprocess.run([sys.executable, *cmd], check=True, capture_output=True, text=True, timeout=600)
    else:
        res = device.python(cmd, timeout=1800)
        if res.returncode != 0:
            raise SystemExit(f"the emulated device failed: {res.stderr[-2000:]}")
    return json.loads((work / f"{side}-report.json").read_text())


def _label_agreement(a: np.ndarray, b: np.ndarray) -> float | None:
    """The share of rows whose argmax agrees; None for outputs that are not class scores."""
    return float(np.mean(a.argmax(axis=1) == b.argmax(axis=1))) if a.ndim == 2 and a.shape[1] > 1 else None


def _agreement(host_job: dict, guest_job: dict, host_result: dict, guest_result: dict) -> dict:
    """One artifact's row: label agreement and largest output difference between the two machines."""
    a, b = np.load(host_job["out"]), np.load(guest_job["out"])
    agree = _label_agreement(a, b)
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
    identical = bool(np.array_equal(a, b))
    exact = "int8" in host_job["artifact"]
    ok = a.shape == b.shape and agree in (None, 1.0) and (identical if exact else diff <= FLOAT_ATOL)
    return {"bundle": host_job["name"], "artifact": host_job["artifact"], "samples": len(a),
            "label_agreement": agree, "max_abs_diff": diff, "identical": identical,
            "required": "bit-identical" if exact else f"<= {FLOAT_ATOL:g}", "ok": ok,
            "x86_seconds": round(host_result["seconds"], 3), "aarch64_seconds": round(guest_result["seconds"], 3)}


def compare_outputs(device, bundles: dict) -> tuple[list[dict], list]:
    """Every artifact on both machines: a row per artifact, and the forbidden modules the device loaded."""
    with tempfile.TemporaryDirectory(prefix="edgeops-arm64-") as tmp:
        work = Path(tmp)
        jobs = {side: _jobs(bundles, work, side) for side in ("x86_64", "aarch64")}
        reports = {side: _predict(device, side_jobs, work, side) for side, side_jobs in jobs.items()}
        rows = [_agreement(*four) for four in zip(jobs["x86_64"], jobs["aarch64"], reports["x86_64"]["results"],
                                                  reports["aarch64"]["results"], strict=True)]
        return rows, reports["aarch64"]["forbidden"]


def bench_both(device, cnn: Path, runs: int) -> tuple[dict, list[dict]]:
    """``edgeops bench`` of the Digits CNN in the device and natively: the two documents, and a row per artifact."""
    bench_args = ["bench", str(cnn), "--in-process", "--runs", str(runs), "--warmup", "5", "--json", "-"]
    guest_bench = device.edgeops(bench_args, timeout=1800)
    if guest_bench.returncode != 0:
        raise SystemExit(f"edgeops bench failed in the emulated device: {guest_bench.stderr[-2000:]}")
    host_bench = subprocess.run([sys.executable, "-m", "edgeops", *bench_args], capture_output=True, text=True,
                                timeout=600, check=True)
    benches = {"aarch64": json.loads(guest_bench.stdout), "x86_64": json.loads(host_bench.stdout)}
    bench_rows = []
    for doc in benches.values():
        for r in doc["results"]:
            lat = r["latency_ms"]
            bench_rows.append({"machine": doc["machine"].get("machine") or doc["machine"].get("arch"),
                               "artifact": Path(r["artifact"]).name,
                               "backend": f"{r['backend']} {r['backend_version']}",
                               "init_ms": r["init_ms"], "p50_ms": lat["p50"], "p99_ms": lat["p99"]})
    return benches, bench_rows


def _print_report(info: dict, rows: list[dict], bench_rows: list[dict], benches: dict, forbidden: list,
                  checks: dict, bench_runs: int) -> None:
    print(f"emulated device: {info}")
    print_table(rows, [("bundle", "bundle"), ("artifact", "artifact"), ("samples", "samples"),
                       ("label_agreement", "label agreement"), ("max_abs_diff", "max |diff|"),
                       ("identical", "bit-identical"), ("required", "required"), ("ok", "ok"),
                       ("x86_seconds", "x86 s"), ("aarch64_seconds", "aarch64 s")],
                title="x86_64 vs emulated aarch64, same bundles, held-out test sets (edge_runtime.load(...).predict)")
    print()
    print_table(bench_rows, [("machine", "machine"), ("artifact", "artifact"), ("backend", "backend"),
                             ("init_ms", "init ms"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms")],
                title=f"edgeops bench digits-cnn --in-process --runs {bench_runs} (emulated timings are "
                      "QEMU's, not a Raspberry Pi's)")
    for side, doc in benches.items():
        print(f"machine block ({side} run): {json.dumps(doc['machine'])}")
    print(f"\nforbidden modules loaded in the device: {forbidden or 'none'}")
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--board", default="rpi4", choices=["rpi4", "rpi5"])
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "edgeops" / "arm64-bundles"),
                    help="where the reference bundles are built, in a subfolder per converter version")
    ap.add_argument("--bench-runs", type=int, default=50)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    from devtools import emulated_arm

    t0 = time.perf_counter()
    device = emulated_arm.prepare(board=args.board, quiet=True)
    info = device.describe()
    cache = Path(args.cache) / converter_hash()
    cache.mkdir(parents=True, exist_ok=True)
    bundles = build(cache)
    rows, forbidden = compare_outputs(device, bundles)
    benches, bench_rows = bench_both(device, bundles[("cnn", "digits")][0], args.bench_runs)
    guest_arch = benches["aarch64"]["machine"].get("arch")
    checks = {"outputs agree": all(r["ok"] for r in rows), "no training framework in the device": not forbidden,
              "device bench machine is aarch64": guest_arch == "aarch64"}
    _print_report(info, rows, bench_rows, benches, forbidden, checks, args.bench_runs)
    seconds = round(time.perf_counter() - t0, 1)
    print(f"{seconds} s")
    doc = {"benchmark": "arm64", "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "board": args.board, "device": info, "agreement": rows, "bench": bench_rows,
           "bench_machine": {k: v["machine"] for k, v in benches.items()}, "forbidden_in_device": forbidden,
           "checks": checks, "ok": all(checks.values()), "seconds": seconds}
    write_json(args.json_out, doc)
    return doc


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
