"""What `edgeops serve` counts, in Prometheus' text format, and the model summary it shows."""

from __future__ import annotations

import threading

from edge_runtime.model import EdgeModel

LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ServeMetrics:
    """Counters and a latency histogram in Prometheus' cumulative-bucket form.

    A client that goes away before its answer is counted apart (``disconnects``): it is
    neither an error of the client's request nor of the server.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.inferences = 0
        self.disconnects = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * len(LATENCY_BUCKETS_MS)
        self.latency_sum = 0.0
        self.latency_count = 0

    def request(self) -> None:
        with self.lock:
            self.requests += 1

    def observe(self, ms: float, n: int) -> None:
        with self.lock:
            self.inferences += n
            self.latency_sum += ms
            self.latency_count += 1
            for i, bound in enumerate(LATENCY_BUCKETS_MS):
                if ms <= bound:
                    self.buckets[i] += 1

    def error(self, kind: str) -> None:
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1

    def disconnect(self) -> None:
        with self.lock:
            self.disconnects += 1

    def render(self, model: EdgeModel, in_flight_bytes: int = 0) -> str:
        m = model.manifest or {}
        lines = [
            "# HELP edgeops_model_info The model being served.",
            "# TYPE edgeops_model_info gauge",
            (f'edgeops_model_info{{name="{m.get("name", model.path.stem)}",version="{m.get("version", "")}",'
             f'artifact="{model.path.name}",backend="{model.backend.name}"}} 1'),
            "# HELP edgeops_requests_total HTTP requests received.",
            "# TYPE edgeops_requests_total counter",
            f"edgeops_requests_total {self.requests}",
            "# HELP edgeops_inferences_total Samples predicted.",
            "# TYPE edgeops_inferences_total counter",
            f"edgeops_inferences_total {self.inferences}",
            "# HELP edgeops_client_disconnects_total Requests whose client went away before the answer.",
            "# TYPE edgeops_client_disconnects_total counter",
            f"edgeops_client_disconnects_total {self.disconnects}",
            "# HELP edgeops_in_flight_bytes Request-body bytes being received or parsed now.",
            "# TYPE edgeops_in_flight_bytes gauge",
            f"edgeops_in_flight_bytes {in_flight_bytes}",
            "# HELP edgeops_errors_total Requests refused or failed, by kind.",
            "# TYPE edgeops_errors_total counter",
        ]
        for kind, n in sorted(self.errors.items()):
            lines.append(f'edgeops_errors_total{{kind="{kind}"}} {n}')
        lines += ["# HELP edgeops_predict_latency_ms Latency of a predict call in milliseconds.",
                  "# TYPE edgeops_predict_latency_ms histogram"]
        for bound, count in zip(LATENCY_BUCKETS_MS, self.buckets, strict=True):
            lines.append(f'edgeops_predict_latency_ms_bucket{{le="{bound}"}} {count}')
        lines += [f'edgeops_predict_latency_ms_bucket{{le="+Inf"}} {self.latency_count}',
                  f"edgeops_predict_latency_ms_sum {self.latency_sum:.6f}",
                  f"edgeops_predict_latency_ms_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def model_summary(model: EdgeModel) -> dict:
    """What GET /model answers: name, version, task, labels, input schema, tensors, parity."""
    m = model.manifest or {}
    return {
        "name": m.get("name", model.path.stem), "version": m.get("version"), "task": model.task,
        "artifact": model.path.name, "backend": model.backend.name, "backend_version": model.backend.version,
        "labels": model.labels, "input_schema": m.get("input_schema"),
        "inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs],
        "parity": (model.artifact or {}).get("parity"),
    }
