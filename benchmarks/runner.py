"""Measure one model artifact: initialisation, first inference, warm-up, steady state, memory.

Like LiteRT's benchmark_model and onnxruntime_perf_test, the timed loop runs
the interpreter on prepared input tensors and nothing else: one timed call is
set_tensor for each input, invoke and get_tensor for each output (TFLite), or
one session.run (ONNX), on inputs allocated before the loop, timed with
perf_counter_ns and stored in a list; accuracy, when asked for, is measured
apart from the timing. ``python -m benchmarks.bench_fidelity`` checks this loop
against a bare interpreter loop.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchmarks.machine import peak_rss_mb
from edge_runtime.accel import Acceleration, report_of
from edge_runtime.backends import TensorInfo, open_backend
from edge_runtime.errors import EdgeOpsError, InvalidInputError


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` options as a dict (clear error on a malformed one)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        try:
            name, dims = _name_and_dims(spec)
        except ValueError:
            raise InvalidInputError(f"--input-shape {spec!r}: expected NAME=D1,D2,... with positive integers") from None
        shapes[name] = dims
    return shapes


def _name_and_dims(spec: str) -> tuple[str, tuple[int, ...]]:
    """``NAME=D1,D2,...`` as (NAME, dims); ValueError unless every dimension is a positive integer."""
    name, sep, dims = spec.rpartition("=")
    if not sep or not name:
        raise ValueError(spec)
    shape = tuple(int(d) for d in dims.split(","))
    if any(d <= 0 for d in shape):
        raise ValueError(spec)
    return name, shape


def _given_shape(t: TensorInfo, given: tuple[int, ...]) -> tuple[int, ...]:
    """A shape given with --input-shape, checked against the input's: as many dimensions, the fixed ones equal
    (but for the first, the batch)."""
    if len(given) != len(t.shape):
        raise InvalidInputError(
            f"--input-shape {t.name}={','.join(map(str, given))}: the input has {len(t.shape)} dimensions "
            f"({list(t.shape)}), not {len(given)}"
        )
    for g, want in zip(given, t.shape, strict=True):
        if want > 0 and g != want and t.shape.index(want) != 0:
            raise InvalidInputError(
                f"--input-shape {t.name}={','.join(map(str, given))} does not fit the model's shape {list(t.shape)}"
            )
    return given


def concrete_shape(t: TensorInfo, batch: int, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape to feed for input ``t``: from --input-shape, else the model's, with -1 batch = ``batch``."""
    if t.name in shapes:
        return _given_shape(t, shapes[t.name])
    dims = list(t.shape)
    if dims and dims[0] < 0:
        dims[0] = batch
    missing = [i for i, d in enumerate(dims) if d < 0]
    if missing:
        raise InvalidInputError(
            f"input {t.name!r} has a dynamic dimension {missing[0]} (shape {list(t.shape)}); "
            f"give it with --input-shape {t.name}=" + _shape_template(dims)
        )
    return tuple(dims)


def _shape_template(dims: list[int]) -> str:
    """``1,N,3``: the known dimensions, N for the others."""
    return ",".join(str(d) if d > 0 else "N" for d in dims)


def random_input(t: TensorInfo, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Plausible random data for an input of any dtype."""
    dtype = np.dtype(t.dtype) if t.dtype != "string" else None
    if dtype is None:
        raise InvalidInputError(f"input {t.name!r} takes strings; edgeops bench feeds numeric tensors only")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if t.quantization is not None or dtype.itemsize == 1:
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    return rng.integers(0, 10, size=shape).astype(dtype)  # ids, indices, counts: small non-negative


def summarise(samples_ms: list[float]) -> dict:
    arr = np.asarray(samples_ms, dtype=np.float64)
    if arr.size == 0:
        return {"runs": 0, "mean": None, "std": None, "min": None, "p50": None, "p90": None, "p95": None, "p99": None,
                "max": None}
    return {
        "runs": int(arr.size),
        "mean": round(float(arr.mean()), 4),
        "std": round(float(arr.std(ddof=1)) if arr.size > 1 else 0.0, 4),
        "min": round(float(arr.min()), 4),
        "p50": round(float(np.percentile(arr, 50)), 4),
        "p90": round(float(np.percentile(arr, 90)), 4),
        "p95": round(float(np.percentile(arr, 95)), 4),
        "p99": round(float(np.percentile(arr, 99)), 4),
        "max": round(float(arr.max()), 4),
    }


def measure(path: str | Path, runs: int = 100, warmup: int = 10, duration: float | None = None,  # noqa: PLR0913
            threads: int | None = None, batch: int = 1, input_shapes: dict | None = None, seed: int = 0,
            accel: Acceleration | None = None) -> dict:
    """Benchmark one .tflite/.onnx file; returns the per-artifact result (without accuracy).

    Args:
        path: the model file.
        runs: measured runs (at least this many; with ``duration``, until both are met).
        warmup: runs before measuring, reported apart.
        duration: also keep measuring for at least this many seconds.
        threads: inference threads.
        batch: size of a dynamic first dimension.
        input_shapes: NAME -> shape for inputs with dynamic dimensions.
        seed: of the random inputs.
        accel: delegate, providers, XNNPACK on/off (default: the backend's defaults); the result says
            what ran (``delegate``, ``provider``, ``accelerator``) and why anything asked for did not.
    """
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    backend = open_backend(p, threads=threads, accel=accel or Acceleration())
    init_ms = (time.perf_counter() - t0) * 1000
    feeds = _feeds(backend.inputs, batch, input_shapes or {}, rng)
    first_ms = _first_inference(p, backend.run, feeds)
    step = timed_call(backend, feeds)
    warm = [_timed(step) for _ in range(warmup)]
    samples, wall = steady_state(step, runs, duration)
    return {
        "artifact": str(p),
        **_backend_fields(backend, threads, accel),
        "batch": batch,
        "model_bytes": p.stat().st_size,
        "inputs": _input_fields(backend.inputs, feeds),
        "init_ms": round(init_ms, 3),
        "first_ms": round(first_ms, 3),
        "warmup": {"runs": len(warm), "mean_ms": round(statistics.fmean(warm), 4) if warm else None},
        "latency_ms": summarise(samples),
        "throughput_ips": round(len(samples) * batch / wall, 2) if wall > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def _backend_fields(backend, threads: int | None, accel: Acceleration | None) -> dict:
    """What ran the model: the format, backend and its version, threads, and the acceleration asked and used."""
    report = report_of(backend)
    return {
        "format": "onnx" if backend.name == "onnxruntime" else "tflite",
        "backend": backend.name,
        "backend_version": backend.version,
        "threads": threads,
        "delegate": report.delegate,
        "provider": ",".join(report.providers) or None,
        "accelerator": {**report.to_dict(), "requested": (accel or Acceleration()).to_dict()},
    }


def _input_fields(inputs: list[TensorInfo], feeds: list[np.ndarray]) -> list[dict]:
    return [{"name": t.name, "dtype": t.dtype, "shape": list(f.shape)} for t, f in zip(inputs, feeds, strict=True)]


def _feeds(inputs: list[TensorInfo], batch: int, shapes: dict[str, tuple[int, ...]],
           rng: np.random.Generator) -> list[np.ndarray]:
    """Random input tensors of the shapes to benchmark (InvalidInputError for a shape naming no input)."""
    unknown = set(shapes) - {t.name for t in inputs}
    if unknown:
        names = ", ".join(t.name for t in inputs)
        raise InvalidInputError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: {names}")
    return [random_input(t, concrete_shape(t, batch, shapes), rng) for t in inputs]


def timed_call(backend, feeds: list[np.ndarray]) -> Callable[[], object]:
    """The call the benchmark times: set the inputs, invoke, get the outputs, with nothing else in it."""
    prepared = getattr(backend, "prepared", None)
    return prepared(feeds) if prepared is not None else (lambda: backend.run(feeds))


def _timed(step: Callable, feeds: list[np.ndarray] | None = None) -> float:
    """Milliseconds of one inference (``step(feeds)``, or ``step()`` without feeds)."""
    args = () if feeds is None else (feeds,)
    t0 = time.perf_counter_ns()
    step(*args)
    return (time.perf_counter_ns() - t0) / 1e6


def _first_line(exc: Exception) -> str:
    """The first line of an error's message (200 characters at most), else its type's name."""
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def _first_inference(p: Path, run: Callable, feeds: list[np.ndarray]) -> float:
    """Milliseconds of the first inference; InvalidInputError when the interpreter refuses the inputs."""
    try:
        return _timed(run, feeds)
    except EdgeOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - interpreters raise RuntimeError/ValueError/ORT errors on bad shapes
        detail = _first_line(exc)
        raise InvalidInputError(
            f"{p.name}: the input shapes {[list(f.shape) for f in feeds]} do not fit the model ({detail})"
        ) from None


def steady_state(step: Callable[[], object], runs: int, duration: float | None = None) -> tuple[list[float], float]:
    """The measured runs: at least ``runs``, and at least ``duration`` seconds; their latencies (ms) and wall time (s).

    Between the two clock reads there is the call alone: integer nanoseconds are appended to a
    list and converted after the loop.
    """
    samples: list[int] = []
    append, perf = samples.append, time.perf_counter_ns
    until = None if duration is None else perf() + int(duration * 1e9)
    start = perf()
    while True:
        t0 = perf()
        step()
        t1 = perf()
        append(t1 - t0)
        if len(samples) >= runs and (until is None or t1 >= until):
            break
    wall = (perf() - start) / 1e9
    return [ns / 1e6 for ns in samples], wall


def main() -> None:
    """Child-process entry: measure one artifact and print its JSON (used for an honest RSS per artifact)."""
    args = json.loads(sys.argv[1])
    try:
        accel = Acceleration.from_dict(args["accel"]) if args.get("accel") else None
        result = measure(args["path"], runs=args["runs"], warmup=args["warmup"], duration=args["duration"],
                         threads=args["threads"], batch=args["batch"],
                         input_shapes={k: tuple(v) for k, v in args["input_shapes"].items()}, accel=accel)
        print(json.dumps({"ok": result}))
    except EdgeOpsError as exc:
        print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}))


if __name__ == "__main__":
    main()
