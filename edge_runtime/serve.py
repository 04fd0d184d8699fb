"""`edgeops serve`: a small HTTP prediction server on the standard library.

No web framework: a device installs nothing more than the runtime to serve.
Every error is a JSON body with a 4xx status (a 500 only for a bug, and
never with a traceback); inference is serialised by a lock because
interpreters are not thread-safe.

Endpoints: ``POST /predict`` (JSON ``{"inputs": [...]}``, one sample or a
batch, or an image file as the body with ``Content-Type: image/*``),
``GET /healthz``, ``GET /metrics`` (Prometheus text), ``GET /model``.
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

from edge_runtime.errors import EdgeOpsError, InvalidInputError
from edge_runtime.model import EdgeModel

log = logging.getLogger("edgeops.serve")

MAX_BODY = 16 * 1024 * 1024
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class ServeMetrics:
    """Counters and a latency histogram in Prometheus' cumulative-bucket form."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.inferences = 0
        self.errors: dict[str, int] = {}
        self.buckets = [0] * len(LATENCY_BUCKETS_MS)
        self.latency_sum = 0.0
        self.latency_count = 0

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

    def render(self, model: EdgeModel) -> str:
        m = model.manifest or {}
        lines = [
            "# HELP edgeops_model_info The model being served.",
            "# TYPE edgeops_model_info gauge",
            f'edgeops_model_info{{name="{m.get("name", model.path.stem)}",version="{m.get("version", "")}",'
            f'artifact="{model.path.name}",backend="{model.backend.name}"}} 1',
            "# HELP edgeops_requests_total HTTP requests received.",
            "# TYPE edgeops_requests_total counter",
            f"edgeops_requests_total {self.requests}",
            "# HELP edgeops_inferences_total Samples predicted.",
            "# TYPE edgeops_inferences_total counter",
            f"edgeops_inferences_total {self.inferences}",
            "# HELP edgeops_errors_total Requests refused or failed, by kind.",
            "# TYPE edgeops_errors_total counter",
        ]
        for kind, n in sorted(self.errors.items()):
            lines.append(f'edgeops_errors_total{{kind="{kind}"}} {n}')
        lines += ["# HELP edgeops_predict_latency_ms Latency of a predict call in milliseconds.",
                  "# TYPE edgeops_predict_latency_ms histogram"]
        for bound, count in zip(LATENCY_BUCKETS_MS, self.buckets):
            lines.append(f'edgeops_predict_latency_ms_bucket{{le="{bound}"}} {count}')
        lines += [f'edgeops_predict_latency_ms_bucket{{le="+Inf"}} {self.latency_count}',
                  f"edgeops_predict_latency_ms_sum {self.latency_sum:.6f}",
                  f"edgeops_predict_latency_ms_count {self.latency_count}"]
        return "\n".join(lines) + "\n"


def model_summary(model: EdgeModel) -> dict:
    m = model.manifest or {}
    return {
        "name": m.get("name", model.path.stem), "version": m.get("version"), "task": model.task,
        "artifact": model.path.name, "backend": model.backend.name, "backend_version": model.backend.version,
        "labels": model.labels, "input_schema": m.get("input_schema"),
        "inputs": [t.to_dict() for t in model.inputs], "outputs": [t.to_dict() for t in model.outputs],
        "parity": (model.artifact or {}).get("parity"),
    }


class PredictionServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, model: EdgeModel, agent=None):
        super().__init__(address, PredictHandler)
        self.model = model
        self.agent = agent
        self.metrics = ServeMetrics()
        self.infer_lock = threading.Lock()


class PredictHandler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: dict | str, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, kind: str, message: str) -> None:
        self.server.metrics.error(kind)
        self._send(status, {"error": kind, "detail": message})

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.metrics.requests += 1
        path = self.path.split("?")[0]
        try:
            if path == "/healthz":
                self._send(200, {"status": "ok", "model": self.server.model.path.name})
            elif path == "/metrics":
                self._send(200, self.server.metrics.render(self.server.model), "text/plain; version=0.0.4")
            elif path == "/model":
                self._send(200, model_summary(self.server.model))
            elif path == "/predict":
                self._error(405, "method_not_allowed", "use POST /predict")
            else:
                self._error(404, "not_found", f"no endpoint {path}; try POST /predict, GET /healthz, /metrics, /model")
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("GET %s failed", path)
            self._error(500, "internal", "internal error (logged on the server)")

    def do_POST(self) -> None:  # noqa: N802
        self.server.metrics.requests += 1
        path = self.path.split("?")[0]
        if path != "/predict":
            self._error(404, "not_found", f"no endpoint {path}; POST /predict")
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._error(400, "bad_request", "Content-Length is not a number")
            return
        if length <= 0:
            self._error(400, "bad_request", "empty body: send JSON {\"inputs\": [...]} or an image")
            return
        if length > MAX_BODY:
            self._error(413, "too_large", f"body of {length} bytes is over the {MAX_BODY}-byte limit")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        try:
            x = self._parse(body)
            model = self.server.model
            t0 = time.perf_counter()
            with self.server.infer_lock:
                out = model.predict(x)
            ms = (time.perf_counter() - t0) * 1000
            batch = out if out.ndim == 2 else out[None, :]
            self.server.metrics.observe(ms, len(batch))
            result: dict = {"outputs": np.round(out.astype(np.float64), 6).tolist(), "latency_ms": round(ms, 3),
                            "model": {"name": (model.manifest or {}).get("name"),
                                      "version": (model.manifest or {}).get("version"), "artifact": model.path.name}}
            if model.task == "classification" and model.labels:
                idx = batch.argmax(axis=1) if batch.shape[1] > 1 else (batch[:, 0] > 0.5).astype(int)
                labels = [model.labels[i] for i in idx]
                result["labels"] = labels if out.ndim == 2 else labels[0]
            self._send(200, result)
            if self.server.agent is not None:
                self.server.agent.collect()
        except InvalidInputError as exc:
            self._error(422, "invalid_input", str(exc))
        except _BadRequest as exc:
            self._error(400, "bad_request", str(exc))
        except EdgeOpsError as exc:
            self._error(400, "bad_request", str(exc))
        except Exception:  # noqa: BLE001
            log.exception("POST /predict failed")
            self._error(500, "internal", "internal error (logged on the server)")

    def _parse(self, body: bytes) -> Any:
        ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip().lower()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            image = (self.server.model.manifest or {}).get("input_schema", {}).get("image")
            if not image:
                raise _BadRequest("this model does not take images; send JSON {\"inputs\": [...]}")
            try:
                from PIL import Image

                img = Image.open(io.BytesIO(body))
                img.load()
            except ImportError:
                raise _BadRequest("image uploads need Pillow on the server (pip install 'edgeops[image]')") from None
            except OSError as exc:
                raise _BadRequest(f"the body is not a readable image ({exc})") from None
            return img
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _BadRequest(f"malformed JSON: {exc}") from None
        if isinstance(doc, dict):
            if "inputs" not in doc:
                raise _BadRequest("JSON object needs an 'inputs' field")
            doc = doc["inputs"]
        if not isinstance(doc, list):
            raise _BadRequest("'inputs' must be a list (one sample) or a list of lists (a batch)")
        return doc


class _BadRequest(Exception):
    pass


def make_server(model: EdgeModel, host: str = "127.0.0.1", port: int = 8080, agent=None) -> PredictionServer:
    return PredictionServer((host, port), model, agent)


def serve_forever(model: EdgeModel, host: str, port: int, agent=None) -> None:
    server = make_server(model, host, port, agent)
    log.info("serving %r on http://%s:%d (POST /predict)", model, host, server.server_address[1])
    ticker = None
    if agent is not None:
        stop = threading.Event()

        def tick():
            while not stop.wait(1.0):
                agent.collect()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        server.server_close()
        if agent is not None:
            stop.set()
            agent.stop()
