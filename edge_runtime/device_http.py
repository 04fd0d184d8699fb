"""The device agent's own ``/metrics`` and ``/healthz`` on a local port (``edgeops run --http :9101``).

A device-level Prometheus or node exporter scrapes the agent where it runs: inferences, refused
inputs, the last window's latency quantiles, the spool's depth and what it dropped, output sinks'
drops and failures, the model it runs, and when the broker last answered. The text exposition
format is written by hand (a handful of lines): the device installs no Prometheus client.
``/healthz`` answers 200 while the agent runs and 503 once it is stopping, with a small JSON body.

>>> print(render([("edgeops_agent_inferences_total", "counter", "Inferences served.", [({}, 3)])]), end="")
# HELP edgeops_agent_inferences_total Inferences served.
# TYPE edgeops_agent_inferences_total counter
edgeops_agent_inferences_total 3
"""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger("edgeops.agent")


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                    for k, v in labels.items())
    return "{" + body + "}"


def render(families: list[tuple[str, str, str, list[tuple[dict, float]]]]) -> str:
    """Prometheus text format of (name, type, help, [(labels, value)]) families."""
    lines = []
    for name, kind, text, samples in families:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{_labels(labels)} {value:g}" for labels, value in samples if value is not None]
    return "\n".join(lines) + "\n"


def _latency_quantiles(lat: dict) -> list[tuple[dict, float]]:
    return [({"quantile": q}, lat.get(k)) for q, k in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))]


def families(agent) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
    """What the agent measures, as metric families."""
    info = agent.recorder.model_info
    last = agent.last_window or {}
    lat = last.get("latency_ms") or {}
    out = [
        ("edgeops_agent_inferences_total", "counter", "Inferences served.", [({}, agent.inferences)]),
        ("edgeops_agent_bad_inputs_total", "counter", "Inputs refused (unreadable, wrong shape, NaN, ...).",
         [({}, agent.bad_inputs)]),
        ("edgeops_agent_last_window_latency_ms", "gauge", "Latency quantiles of the last closed window (ms).",
         _latency_quantiles(lat)),
        ("edgeops_agent_spool_windows", "gauge", "Windows in the spool, not yet confirmed by the monitor.",
         [({}, agent.spool_depth)]),
        ("edgeops_agent_spool_dropped_windows_total", "counter", "Windows the full spool dropped.",
         [({}, agent.spool_dropped)]),
        ("edgeops_agent_model_info", "gauge", "The bundle the agent runs.",
         [({"name": info.get("name"), "version": info.get("version"), "artifact": info.get("artifact")}, 1)]),
        ("edgeops_agent_broker_connected", "gauge", "1 while connected to the broker.",
         [({}, 1 if agent.link.connected.is_set() else 0)]),
        ("edgeops_agent_broker_last_contact_timestamp_seconds", "gauge", "When the broker last answered.",
         [({}, agent.link.last_contact)]),
    ]
    return out + _output_families(getattr(agent, "output_counts", {}) or {})


def _output_families(counts: dict) -> list[tuple[str, str, str, list[tuple[dict, float]]]]:
    """Predictions delivered, dropped and failed, per output sink."""
    return [(f"edgeops_agent_output_{kind}_total", "counter", f"Predictions {kind} per output sink.",
             [({"sink": name}, c.get(kind, 0)) for name, c in counts.items()])
            for kind in ("delivered", "dropped", "failed")]


class DeviceHTTP:
    """``/metrics`` and ``/healthz`` for one agent, served from a daemon thread; :meth:`close` stops it."""

    def __init__(self, agent, host: str = "127.0.0.1", port: int = 9101, timeout: float = 5.0):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the standard library's name
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = render(families(agent)).encode(), "text/plain; version=0.0.4", 200
                elif path == "/healthz":
                    ok = not agent.stopping
                    body = json.dumps({"status": "ok" if ok else "stopping", "inferences": agent.inferences,
                                       "connected": agent.link.connected.is_set(), "spool": agent.spool_depth,
                                       "ts": round(time.time(), 3)}).encode()
                    ctype, code = "application/json", 200 if ok else 503
                else:
                    body, ctype, code = b'{"error": "not found"}', "application/json", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):   # scrapes are not worth a log line each
                pass

        Handler.timeout = timeout
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="edgeops-device-http", daemon=True)
        self._thread.start()
        log.info("device metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
