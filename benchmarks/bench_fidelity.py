"""Does `edgeops bench` measure what a bare interpreter loop measures? Both on one interpreter, interleaved.

    python -m benchmarks.bench_fidelity [--model PATH ...] [--no-project-model] [--blocks 20] [--runs 200]
                                        [--threads N] [--json FILE] [--quick]

For each model, one backend is opened as `edgeops bench` opens it, with random inputs made as it makes
them. Three loops time the same interpreter on the same input tensors:

- **bare**: set_tensor for each input, invoke, get_tensor for each output, written out against the
  interpreter (ONNX: ``session.run``), perf_counter_ns around each iteration;
- **bench**: ``benchmarks.runner.steady_state(timed_call(backend, feeds), runs)``, the very calls
  ``edgeops bench`` (``benchmarks.runner.measure``) makes;
- **run()**: the loop bench used before, ``backend.run(feeds)`` with perf_counter in float seconds
  (it checks the feeds and their shapes on every call).

Blocks of ``--runs`` iterations alternate between the loops, in rotating order and reversed every
other block, so the drift of a shared machine falls on all of them. Ratio = median of all of a
loop's samples / median of all of the bare loop's samples. Target: bench within 5% of bare.

Models: the project's Digits CNN (float32 and int8 TFLite, built with ``convert.reference`` unless
``--no-project-model``) and any ``--model`` file (.tflite or .onnx), e.g. a model this project
did not train.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.common import print_table, write_json

ARMS = ("bare", "bench", "run()")


def bare_loop(backend, feeds: list[np.ndarray]) -> Callable[[int], list[int]]:
    """The loop an application author writes against the interpreter: n iterations, their nanoseconds."""
    perf = time.perf_counter_ns
    if backend.name == "onnxruntime":
        sess = backend._sess
        feed = {i.name: x for i, x in zip(sess.get_inputs(), feeds, strict=True)}

        def onnx_loop(n: int) -> list[int]:
            times = []
            for _ in range(n):
                t0 = perf()
                sess.run(None, feed)
                times.append(perf() - t0)
            return times

        return onnx_loop
    it = backend._it   # the interpreter allocated for these input shapes (timed_call has run once)
    ins = [d["index"] for d in it.get_input_details()]
    outs = [d["index"] for d in it.get_output_details()]
    pairs = list(zip(ins, feeds, strict=True))

    def tflite_loop(n: int) -> list[int]:
        times = []
        for _ in range(n):
            t0 = perf()
            for idx, x in pairs:
                it.set_tensor(idx, x)
            it.invoke()
            for idx in outs:
                it.get_tensor(idx)
            times.append(perf() - t0)
        return times

    return tflite_loop


def run_loop(backend, feeds: list[np.ndarray]) -> Callable[[int], list[int]]:
    """The loop bench used before: ``backend.run(feeds)`` timed in float seconds."""
    perf, run = time.perf_counter, backend.run

    def loop(n: int) -> list[int]:
        samples = []
        for _ in range(n):
            t0 = perf()
            run(feeds)
            samples.append((perf() - t0) * 1000)
        return [int(ms * 1e6) for ms in samples]

    return loop


def bench_loop(backend, feeds: list[np.ndarray]) -> Callable[[int], list[int]]:
    """`edgeops bench`'s measurement: benchmarks.runner.steady_state on runner.timed_call."""
    from benchmarks.runner import steady_state, timed_call

    step = timed_call(backend, feeds)
    return lambda n: [int(ms * 1e6) for ms in steady_state(step, n)[0]]


def _block_order(b: int) -> tuple:
    """The arms in block b: rotated by one each block, reversed every other block."""
    order = ARMS[b % 3:] + ARMS[:b % 3]
    return order if b % 2 == 0 else order[::-1]


def _interleave(loops: dict, blocks: int, runs: int) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Run the loops block after block, in turns; (every sample in ns, each block's median in ms) per arm."""
    samples: dict[str, list[int]] = {arm: [] for arm in ARMS}
    block_medians: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for b in range(blocks):
        for arm in _block_order(b):
            got = loops[arm](runs)
            samples[arm].extend(got)
            block_medians[arm].append(float(np.median(got)) / 1e6)
    return samples, block_medians


def _rounded_lists(block_medians: dict[str, list[float]]) -> dict[str, list[float]]:
    return {arm: [round(v, 5) for v in vs] for arm, vs in block_medians.items()}


def compare(path: Path, blocks: int, runs: int, threads: int | None, warmup: int = 20) -> dict:
    """Interleave the three loops on one backend; medians (ms) and ratios to the bare loop."""
    from benchmarks.runner import _feeds, _input_fields
    from edge_runtime.accel import Acceleration, report_of
    from edge_runtime.backends import open_backend

    backend = open_backend(path, threads=threads, accel=Acceleration())
    feeds = _feeds(backend.inputs, 1, {}, np.random.default_rng(0))
    loops = {"bench": bench_loop(backend, feeds), "bare": bare_loop(backend, feeds), "run()": run_loop(backend, feeds)}
    for loop in loops.values():
        loop(warmup)
    samples, block_medians = _interleave(loops, blocks, runs)
    med = {arm: float(np.median(samples[arm])) / 1e6 for arm in ARMS}
    report = report_of(backend)
    data = path.read_bytes()
    return {
        "model": str(path), "sha256": hashlib.sha256(data).hexdigest(), "model_bytes": len(data),
        "backend": backend.name, "backend_version": backend.version, "threads": threads,
        "runs_on": report.delegate or ",".join(report.providers) or "cpu",
        "inputs": _input_fields(backend.inputs, feeds),
        "blocks": blocks, "runs_per_block": runs,
        "median_ms": {arm: round(v, 5) for arm, v in med.items()},
        "ratio_bench_to_bare": round(med["bench"] / med["bare"], 4),
        "ratio_run_to_bare": round(med["run()"] / med["bare"], 4),
        "block_median_ratio_bench_to_bare": round(float(np.median(
            np.array(block_medians["bench"]) / np.array(block_medians["bare"]))), 4),
        "within_5pct": abs(med["bench"] / med["bare"] - 1) <= 0.05,
        "block_medians_ms": _rounded_lists(block_medians),
    }


def project_models(work: Path) -> list[Path]:
    """The Digits CNN the tests build (float32 and int8 TFLite), converted into ``work`` once."""
    from convert.bundle_io import is_complete
    from convert.reference import convert_reference

    out = work / "digits-cnn"
    if not is_complete(out):
        convert_reference("cnn", "digits", out, force=True)
    return [out / "model.tflite", out / "model.int8.tflite"]


def _table_row(r: dict) -> dict:
    """A result as a row of the printed table."""
    return {"model": f"{Path(r['model']).parent.name}/{Path(r['model']).name}", "runs on": r["runs_on"],
            **{f"{arm} p50 ms": r["median_ms"][arm] for arm in ARMS},
            "bench/bare": r["ratio_bench_to_bare"], "run()/bare": r["ratio_run_to_bare"],
            "within 5%": r["within_5pct"]}


def _model_paths(args: argparse.Namespace) -> list[Path]:
    """The models given, after the project's Digits CNN unless --no-project-model."""
    paths = [Path(m) for m in args.model]
    if not args.no_project_model:
        paths = project_models(Path(args.work or tempfile.mkdtemp(prefix="edgeops-fidelity-"))) + paths
    return paths


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="a .tflite or .onnx file (repeatable)")
    ap.add_argument("--no-project-model", action="store_true", help="skip the project's Digits CNN")
    ap.add_argument("--work", help="folder for the Digits CNN bundle (default: a temporary one)")
    ap.add_argument("--blocks", type=int, default=20, help="blocks per loop (default 20)")
    ap.add_argument("--runs", type=int, default=200, help="iterations per block (default 200)")
    ap.add_argument("--threads", type=int, help="interpreter threads (default: the backend's)")
    ap.add_argument("--quick", action="store_true", help="4 blocks of 20 runs: a smoke run, not a measurement")
    ap.add_argument("--json", help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    blocks, runs = (4, 20) if args.quick else (args.blocks, args.runs)
    rows = [compare(p, blocks, runs, args.threads) for p in _model_paths(args)]
    table = [_table_row(r) for r in rows]
    print_table(table, [(k, k) for k in table[0]] if table else [],
                title=f"edgeops bench vs a bare interpreter loop: medians of {blocks} interleaved blocks x {runs} runs "
                      "each, one process, one interpreter")
    from benchmarks.machine import machine_info

    doc = {"schema_version": 1, "machine": machine_info(), "blocks": blocks, "runs_per_block": runs,
           "measures": "bench: set_tensor per input, invoke, get_tensor per output (ONNX: session.run), "
                       "perf_counter_ns around the call, inputs allocated before the loop",
           "results": rows}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
