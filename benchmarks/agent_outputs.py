"""What each prediction output costs the device agent per inference, against no output at all.

    python -m benchmarks.agent_outputs [--bundle DIR] [--n 3000] [--rounds 5] [--json FILE]

Runs the agent (``DeviceAgent.run``, telemetry windows on) on the same inputs
with no sink, a callback, stdout (to /dev/null), a JSON-lines file, MQTT at
QoS 0 and 1 (a private Mosquitto), and a webhook (a local HTTP server in
another process). Configurations take turns, round after round, so a busy
machine slows them alike. Per configuration, the median of the rounds of:
the wall time per inference of the run loop (what the inference thread pays),
and the process CPU time per inference from the start of the run until the
sink has delivered everything (what the device pays, sink threads included);
the overhead of each over no sink; and what each sink delivered or dropped (a
sink that cannot keep up drops, it never slows inference down).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json

WEBHOOK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *a): pass
s = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_port, flush=True)
s.serve_forever()
"""


def inputs_for(model, n: int, seed: int = 0) -> np.ndarray:
    """Inputs shaped for the model: around the manifest's normalisation, else uniform in 0..1."""
    rng = np.random.default_rng(seed)
    spec = model.input_spec
    if spec.mean is not None:
        return rng.normal(spec.mean, spec.std, size=(n, len(spec.mean))).astype(np.float32)
    return rng.random((n, *spec.shape), dtype=np.float32)


def sinks(work: Path, webhook_url: str) -> dict:
    """Configuration name -> ``outputs`` for DeviceAgent (None: the callback)."""
    from edge_runtime.outputs import StdoutSink

    return {
        "none": [],
        "callback": None,
        "stdout": [StdoutSink(stream=open(os.devnull, "w"))],
        "jsonl": [f"jsonl:{work / 'predictions.jsonl'}?max_mb=50&backups=1"],
        "mqtt qos0": ["mqtt?qos=0&batch=100&seconds=1&rate=50"],
        "mqtt qos1": ["mqtt?qos=1&batch=100&seconds=1&rate=50"],
        "http": [f"http:{webhook_url}"],
    }


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="bundle to run (default: convert the breast-cancer MLP reference model)")
    ap.add_argument("--n", type=int, default=3000, help="inferences per configuration and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results as JSON to this file")
    return ap.parse_args(argv)


def _bundle(arg: str | None, work: Path) -> Path:
    """The bundle given, else the breast-cancer MLP reference model converted into work."""
    if arg:
        return Path(arg)
    from convert.reference import convert_reference

    bundle = work / "bc-mlp"
    convert_reference("mlp", "breast_cancer", bundle)
    return bundle


def _start_agents(bundle: Path, work: Path, broker_url: str, webhook_url: str, received: list) -> dict:
    """One started agent per output configuration, each connected to the broker."""
    import edge_runtime
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.mqtt import parse_broker_url

    agents = {}
    for name, outputs in sinks(work, webhook_url).items():
        model = edge_runtime.load(bundle)
        kw = {"on_prediction": received.append} if outputs is None else {"outputs": outputs}
        agents[name] = DeviceAgent(model, f"bench-{len(agents)}", "bench", parse_broker_url(broker_url),
                                   state_dir=work / f"state-{len(agents)}", window_size=1000,
                                   confirm="broker", **kw).start()
    for a in agents.values():
        a.link.wait_connected(10)
    return agents


def _measure_round(a, X: np.ndarray) -> tuple[float, float]:
    """(wall, CPU) microseconds per inference of one run; the CPU time lasts until the sinks delivered."""
    t0, c0 = time.perf_counter(), time.process_time()
    a.run(X)
    wall = (time.perf_counter() - t0) / len(X) * 1e6
    deadline = time.monotonic() + 30
    while any(s.pending for s in a.sinks) and time.monotonic() < deadline:
        time.sleep(0.001)
    return wall, (time.process_time() - c0) / len(X) * 1e6


def _measure(agents: dict, X: np.ndarray, rounds: int) -> tuple[dict, dict]:
    """Per configuration, (wall, CPU) microseconds per inference of each round, configurations taking turns."""
    for a in agents.values():
        a.run(X[:200])                       # warm-up, not measured
    times: dict[str, list[float]] = {name: [] for name in agents}
    cpu: dict[str, list[float]] = {name: [] for name in agents}
    for _ in range(rounds):
        for name, a in agents.items():
            wall, used = _measure_round(a, X)
            times[name].append(wall)
            cpu[name].append(used)
    return times, cpu


def _stop_agents(agents: dict, received: list) -> dict:
    """Stop each agent; what its sinks delivered, dropped and failed."""
    counts = {}
    for name, a in agents.items():
        a.stop()
        counts[name] = {k: sum(c[k] for c in a.output_counts.values()) for k in ("delivered", "dropped", "failed")}
        received.clear()
    return counts


def _run_all(args: argparse.Namespace, bundle: Path, work: Path, url: str) -> tuple[dict, dict, dict]:
    from devtools.brokers import MosquittoBroker

    received: list = []
    with MosquittoBroker(workdir=work / "broker") as broker:
        agents = _start_agents(bundle, work, broker.url, url, received)
        X = inputs_for(next(iter(agents.values())).model, args.n)
        times, cpu = _measure(agents, X, args.rounds)
        counts = _stop_agents(agents, received)
    return times, cpu, counts


def _result_rows(times: dict, cpu: dict, counts: dict) -> list[dict]:
    """Median wall and CPU time per inference of each configuration and its overhead over no output."""
    base, cpu_base = statistics.median(times["none"]), statistics.median(cpu["none"])
    rows = []
    for name, t in times.items():
        med, cmed = statistics.median(t), statistics.median(cpu[name])
        rows.append({"output": name, "wall_us": round(med, 2), "wall_stdev_us": round(statistics.stdev(t), 2)
                     if len(t) > 1 else None, "wall_overhead_us": round(med - base, 2),
                     "cpu_us": round(cmed, 2), "cpu_overhead_us": round(cmed - cpu_base, 2), **counts[name]})
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = _parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import logging

    logging.basicConfig(level=logging.ERROR)
    work = Path(tempfile.mkdtemp(prefix="edgeops-outputs-"))
    bundle = _bundle(args.bundle, work)
    hook = subprocess.Popen([sys.executable, "-c", WEBHOOK], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{hook.stdout.readline().strip()}/hook"
        times, cpu, counts = _run_all(args, bundle, work, url)
    finally:
        hook.terminate()
        hook.wait(5)
        shutil.rmtree(work, ignore_errors=True)     # the broker's folder, the sinks' files, the bundle
    rows = _result_rows(times, cpu, counts)
    print_table(rows, [("output", "output"), ("wall_us", "wall us/inf"), ("wall_stdev_us", "stdev"),
                       ("wall_overhead_us", "+wall us"), ("cpu_us", "cpu us/inf"), ("cpu_overhead_us", "+cpu us"),
                       ("delivered", "delivered"), ("dropped", "dropped"), ("failed", "failed")],
                title=f"{bundle.name}: {args.n} inferences x {args.rounds} rounds per output, median of rounds")
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    doc = {"bundle": str(bundle), "n": args.n, "rounds": args.rounds, "python": sys.version.split()[0],
           "cpu_count": os.cpu_count(), "load_average_1min": round(load[0], 2), "results": rows}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
