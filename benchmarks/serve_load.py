"""Load on `edgeops serve`: throughput and p99 under concurrent clients, memory under maximum-size bodies.

    python -m benchmarks.serve_load [--bundle DIR] [--clients 20] [--seconds 10] [--big 4]
                                    [--old PATH/TO/old_serve.py] [--json FILE]

The server runs in a child process (its memory is read from /proc). Two phases, each
on a fresh server:

1. ``--clients`` threads, each on its own keep-alive connection, POST one Breast
   Cancer sample after another for ``--seconds``: requests/s and latency percentiles
   seen by the clients (warm-up requests are not counted).
2. ``--big`` clients POST a maximum-size body at once (the server's own body limit,
   a batch of samples written as JSON numbers): the server's resident memory before,
   at its peak (VmHWM) and two seconds after, and the statuses it answered.

``--old`` also measures a former implementation (a copy of edge_runtime/serve.py, e.g.
``git show REV:edge_runtime/serve.py > /tmp/old_serve.py``) that has ``make_server``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.agent_rss import vm_value
from benchmarks.common import print_table, write_json

OLD_MAX_BODY = 16 * 1024 * 1024     # the standard-library server's fixed limit


def serve_child(impl: str, bundle: str) -> None:
    """Child process: serve ``bundle`` on a free port, print the URL, stop when stdin closes."""
    import edge_runtime

    model = edge_runtime.load(bundle)
    if impl == "new":
        from edge_runtime.serving import running_server

        with running_server(model) as url:
            print(url, flush=True)
            sys.stdin.read()
        return
    import importlib.util

    spec = importlib.util.spec_from_file_location("old_serve", impl)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    srv = old.make_server(model, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    print(f"http://127.0.0.1:{srv.server_address[1]}", flush=True)
    sys.stdin.read()
    srv.shutdown()


class Server:
    """A serving child process; ``url`` and ``pid`` once it listens."""

    def __init__(self, impl: str, bundle: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.serve_load", "--serve-child", impl,
                                      "--bundle", str(bundle)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.proc.kill()
            raise SystemExit(f"the {impl} server did not start")
        self.host, port = self.url[len("http://"):].split(":")
        self.port = int(port)
        self.pid = self.proc.pid

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp.status


def load_phase(server: Server, samples: np.ndarray, clients: int, seconds: float, warmup: int = 20) -> dict:
    """Clients posting single samples as fast as answers come: requests/s and latency percentiles."""
    bodies = [json.dumps({"inputs": s.tolist()}).encode() for s in samples]
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures = [0] * clients
    start = threading.Barrier(clients + 1)
    stop = threading.Event()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)

        def ok(body: bytes) -> bool:
            nonlocal conn
            try:
                return post(conn, body) == 200
            except OSError:       # a reset connection (e.g. a full listen backlog) counts as a failure
                conn.close()
                conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
                return False

        for k in range(warmup):
            ok(bodies[k % len(bodies)])
        start.wait()
        k = i
        while not stop.is_set():
            t0 = time.perf_counter()
            answered = ok(bodies[k % len(bodies)])
            latencies[i].append((time.perf_counter() - t0) * 1000)
            failures[i] += not answered
            k += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    lat = np.concatenate([np.asarray(x) for x in latencies])
    return {"clients": clients, "requests": int(lat.size), "failed": int(sum(failures)),
            "rps": round(lat.size / elapsed, 1), "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "max_ms": round(float(lat.max()), 1)}


def big_body(samples: np.ndarray, size: int) -> bytes:
    """A JSON batch of samples (one decimal, as a sensor would send) of exactly ``size`` bytes (padded)."""
    row = json.dumps([round(float(v), 1) for v in samples[0]])
    head, tail = b'{"inputs": [', b"]}"
    n = (size - len(head) - len(tail)) // (len(row) + 1)
    body = head + ",".join([row] * n).encode() + tail
    return body[:-1] + b" " * (size - len(body)) + body[-1:]


def memory_phase(server: Server, samples: np.ndarray, n: int, size: int) -> dict:
    """``n`` clients send a ``size``-byte body at once: the server's RSS before, at peak and after."""
    post(http.client.HTTPConnection(server.host, server.port, timeout=60), json.dumps(
        {"inputs": samples[0].tolist()}).encode())
    before = vm_value(server.pid, "VmRSS")
    body = big_body(samples, size)
    statuses: list[int] = []
    go = threading.Barrier(n)

    def client() -> None:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
        go.wait()
        try:
            statuses.append(post(conn, body))
        except OSError as exc:
            statuses.append(type(exc).__name__)
        conn.close()

    threads = [threading.Thread(target=client) for _ in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    time.sleep(2.0)      # what the process keeps once the answers are out
    return {"bodies": n, "body_mib": round(size / 2**20, 2), "statuses": sorted(statuses, key=str),
            "seconds": round(seconds, 2), "rss_before_mb": round(before, 1),
            "peak_rss_mb": round(vm_value(server.pid, "VmHWM"), 1),
            "rss_after_mb": round(vm_value(server.pid, "VmRSS"), 1)}


def measure(impl: str, label: str, bundle: Path, samples: np.ndarray, args) -> dict:
    server = Server(impl, bundle)
    try:
        load = load_phase(server, samples, args.clients, args.seconds)
    finally:
        server.close()
    if impl == "new":
        from edge_runtime.serving.limits import ServeLimits

        size = ServeLimits().max_body_bytes
    else:
        size = OLD_MAX_BODY
    server = Server(impl, bundle)
    try:
        memory = memory_phase(server, samples, args.big, size)
    finally:
        server.close()
    return {"server": label, **load, **{f"big_{k}": v for k, v in memory.items()}}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle to serve (default: convert the Breast Cancer MLP reference, int8)")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--big", type=int, default=4, help="concurrent maximum-size bodies")
    ap.add_argument("--old", help="also measure this copy of a former edge_runtime/serve.py")
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--serve-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if args.serve_child:
        serve_child(args.serve_child, args.bundle)
        return {}
    from convert.reference import load_reference_data

    samples = load_reference_data("breast_cancer").X_test.astype(np.float64)
    with tempfile.TemporaryDirectory(prefix="edgeops-serve-load-") as work:
        bundle = Path(args.bundle) if args.bundle else Path(work) / "bc-mlp"
        if not args.bundle:
            from convert.reference import convert_reference

            convert_reference("mlp", "breast_cancer", bundle, quantize=("none", "int8"), formats=("tflite",))
        rows = []
        if args.old:
            rows.append(measure(str(Path(args.old).resolve()), "old (http.server)", bundle, samples, args))
        rows.append(measure("new", "new (Starlette/uvicorn)", bundle, samples, args))
    print_table(rows, [("server", "server"), ("clients", "clients"), ("rps", "req/s"), ("p50_ms", "p50 ms"),
                       ("p99_ms", "p99 ms"), ("failed", "failed")],
                title=f"POST /predict, one Breast Cancer sample per request, {args.seconds:g} s")
    print()
    print_table(rows, [("server", "server"), ("big_bodies", "bodies"), ("big_body_mib", "MiB each"),
                       ("big_statuses", "statuses"), ("big_rss_before_mb", "RSS before MB"),
                       ("big_peak_rss_mb", "peak RSS MB"), ("big_rss_after_mb", "RSS after MB")],
                title="concurrent maximum-size bodies (each server's own body limit)")
    doc = {"bundle": str(bundle.name), "cpu_count": os.cpu_count(), "results": rows}
    print(json.dumps(doc))
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
