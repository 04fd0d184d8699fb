"""Measure one model artifact: initialisation, first inference, warm-up, steady state, memory.

Like LiteRT's benchmark_model and onnxruntime_perf_test, the timed loop runs
the interpreter on prepared input tensors and nothing else; accuracy, when
asked for, is measured apart from the timing.
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
from edge_runtime.backends import TensorInfo, open_backend
from edge_runtime.errors import EdgeOpsError, InvalidInputError


def parse_input_shapes(specs: list[str] | tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``NAME=1,3,224,224`` options as a dict (clear error on a malformed one)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        name, sep, dims = spec.rpartition("=")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = tuple(int(d) for d in dims.split(","))
            if any(d <= 0 for d in shapes[name]):
                raise ValueError
        except ValueError:
            raise InvalidInputError(f"--input-shape {spec!r}: expected NAME=D1,D2,... with positive integers") from None
    return shapes


def concrete_shape(t: TensorInfo, batch: int, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape to feed for input ``t``: from --input-shape, else the model's, with -1 batch = ``batch``."""
    if t.name in shapes:
        given = shapes[t.name]
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
    dims = list(t.shape)
    if dims and dims[0] < 0:
        dims[0] = batch
    missing = [i for i, d in enumerate(dims) if d < 0]
    if missing:
        raise InvalidInputError(
            f"input {t.name!r} has a dynamic dimension {missing[0]} (shape {list(t.shape)}); "
            f"give it with --input-shape {t.name}=" + ",".join(str(d) if d > 0 else "N" for d in dims)
        )
    return tuple(dims)


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


def measure(path: str | Path, runs: int = 100, warmup: int = 10, duration: float | None = None,
            threads: int | None = None, batch: int = 1, input_shapes: dict | None = None, seed: int = 0) -> dict:
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
    """
    p = Path(path)
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file")
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    backend = open_backend(p, threads=threads)
    init_ms = (time.perf_counter() - t0) * 1000
    feeds = _feeds(backend.inputs, batch, input_shapes or {}, rng)
    first_ms = _first_inference(p, backend.run, feeds)
    warm = [_timed(backend.run, feeds) for _ in range(warmup)]
    samples, wall = _steady_state(backend.run, feeds, runs, duration)
    return {
        "artifact": str(p),
        "format": "onnx" if backend.name == "onnxruntime" else "tflite",
        "backend": backend.name,
        "backend_version": backend.version,
        "threads": threads,
        "batch": batch,
        "model_bytes": p.stat().st_size,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(f.shape)}
                   for t, f in zip(backend.inputs, feeds, strict=True)],
        "init_ms": round(init_ms, 3),
        "first_ms": round(first_ms, 3),
        "warmup": {"runs": len(warm), "mean_ms": round(statistics.fmean(warm), 4) if warm else None},
        "latency_ms": summarise(samples),
        "throughput_ips": round(len(samples) * batch / wall, 2) if wall > 0 else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def _feeds(inputs: list[TensorInfo], batch: int, shapes: dict[str, tuple[int, ...]],
           rng: np.random.Generator) -> list[np.ndarray]:
    """Random input tensors of the shapes to benchmark (InvalidInputError for a shape naming no input)."""
    unknown = set(shapes) - {t.name for t in inputs}
    if unknown:
        names = ", ".join(t.name for t in inputs)
        raise InvalidInputError(f"--input-shape names unknown input(s) {', '.join(sorted(unknown))}; inputs: {names}")
    return [random_input(t, concrete_shape(t, batch, shapes), rng) for t in inputs]


def _timed(run: Callable, feeds: list[np.ndarray]) -> float:
    """Milliseconds of one inference."""
    t0 = time.perf_counter()
    run(feeds)
    return (time.perf_counter() - t0) * 1000


def _first_inference(p: Path, run: Callable, feeds: list[np.ndarray]) -> float:
    """Milliseconds of the first inference; InvalidInputError when the interpreter refuses the inputs."""
    try:
        return _timed(run, feeds)
    except EdgeOpsError:
        raise
    except Exception as exc:  # noqa: BLE001 - interpreters raise RuntimeError/ValueError/ORT errors on bad shapes
        detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise InvalidInputError(
            f"{p.name}: the input shapes {[list(f.shape) for f in feeds]} do not fit the model ({detail})"
        ) from None


def _steady_state(run: Callable, feeds: list[np.ndarray], runs: int,
                  duration: float | None) -> tuple[list[float], float]:
    """The measured runs: at least ``runs``, and at least ``duration`` seconds; their latencies and wall time."""
    samples: list[float] = []
    perf = time.perf_counter
    start = perf()
    while True:
        t0 = perf()
        run(feeds)
        samples.append((perf() - t0) * 1000)
        if len(samples) >= runs and (duration is None or perf() - start >= duration):
            break
    return samples, perf() - start


def main() -> None:
    """Child-process entry: measure one artifact and print its JSON (used for an honest RSS per artifact)."""
    args = json.loads(sys.argv[1])
    try:
        result = measure(args["path"], runs=args["runs"], warmup=args["warmup"], duration=args["duration"],
                         threads=args["threads"], batch=args["batch"],
                         input_shapes={k: tuple(v) for k, v in args["input_shapes"].items()})
        print(json.dumps({"ok": result}))
    except EdgeOpsError as exc:
        print(json.dumps({"error": str(exc), "exit_code": exc.exit_code}))


if __name__ == "__main__":
    main()
