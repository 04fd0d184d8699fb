"""The monitor's HTTP side: Prometheus metrics, a dashboard, and JSON for scripts.

Standard library server in a daemon thread (like ``edgeops serve``); pages are
rendered on the server with inline SVG charts and inline CSS, so the dashboard
fetches nothing from outside and works on an air-gapped network.

Endpoints:
    ``GET /metrics``   Prometheus text (see :class:`FleetCollector` for the names).
    ``GET /``          fleet table: status, open alerts, worst drift, p95 latency.
    ``GET /device/<fleet>/<device>``  time series of one device.
    ``GET /api/devices``, ``GET /api/alerts`` (``?all=1`` includes closed ones).
Every error is a JSON body; a bug is logged and answered with a 500, never a traceback.
"""

from __future__ import annotations

import html
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from telemetry import store
from telemetry.evaluate import evaluate

log = logging.getLogger("edgeops.monitor.http")

QUANTILES = (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99"))


# -- the fleet as the pages and the metrics see it -----------------------------------------------

def device_status(row: dict, open_detectors: set[str]) -> str:
    """online, offline (the device said so, or its last will did) or silent (a silence alert is open)."""
    if row.get("online") is False:
        return "offline"
    if "silence" in open_detectors:
        return "silent"
    return "online"


def fleet_snapshot(engine, stats=None) -> list[dict]:
    """One dict per known device: status, model, last seen, open alerts, worst drift, p95 latency.

    ``stats`` (a MonitorStats) adds what only this process knows: PSI scores of the last
    evaluation and inference totals; without it, worst drift falls back to open drift alerts.
    """
    alerts_by_device: dict[tuple[str, str], list[dict]] = {}
    for a in store.open_alerts(engine):
        alerts_by_device.setdefault((a["fleet"], a["device_id"]), []).append(a)
    p95 = store.last_p95(engine)
    scores = dict(stats.scores) if stats is not None else {}
    inferences = dict(stats.inferences) if stats is not None else {}
    out = []
    for row in store.device_rows(engine):
        key = (row["fleet"], row["device_id"])
        open_ = alerts_by_device.get(key, [])
        detectors = {a["detector"] for a in open_}
        out.append({
            "fleet": row["fleet"], "device_id": row["device_id"], "status": device_status(row, detectors),
            "online": row["online"], "last_seen": row["last_seen"],
            "model": {"name": row["model_name"], "version": row["model_version"]},
            "open_alerts": sorted(detectors), "worst_drift": _worst_drift(scores.get(key), open_),
            "p95_ms": p95.get(key), "inferences": inferences.get(key),
        })
    return out


def _worst_drift(scores: dict | None, open_alerts: list[dict]) -> dict | None:
    """The feature with the highest PSI at the last evaluation, else the one an open drift alert names."""
    if scores:
        name, value = max(scores.items(), key=lambda kv: kv[1])
        return {"feature": name, "psi": value}
    drift = [a for a in open_alerts if a["detector"] == "feature_drift"]
    if drift:
        return {"feature": (drift[0]["features"] or [None])[0], "psi": drift[0]["statistic"]}
    return None


def _jsonable(alert: dict) -> dict:
    return {k: v for k, v in alert.items() if k != "id"}


# -- Prometheus ----------------------------------------------------------------------------------

class FleetCollector:
    """Renders monitor.stats and the database as Prometheus metric families at scrape time.

    Names: edgeops_monitor_{received,windows_stored,duplicates}_total, edgeops_monitor_rejected_total{reason},
    edgeops_monitor_quarantined_total{reason}, edgeops_monitor_evaluation_errors_total,
    edgeops_monitor_broker_dropped_messages, edgeops_device_latency_ms{quantile}, edgeops_device_inferences_total,
    edgeops_device_errors_total, edgeops_device_drift_psi{feature}, edgeops_device_labelled_accuracy,
    edgeops_device_holdout_accuracy, edgeops_device_labelled_inferences, edgeops_device_last_seen_timestamp_seconds,
    edgeops_device_online, edgeops_device_open_alerts, edgeops_open_alerts{detector}; device metrics carry
    fleet and device labels.
    """

    def __init__(self, monitor):
        self.monitor = monitor

    def collect(self):
        s = self.monitor.stats
        yield from _monitor_families(s)
        dev = ["fleet", "device"]
        yield from _device_families(s, dev)
        yield from _accuracy_families(dict(s.accuracy), dev)
        yield from _status_families(self.monitor.engine, dev)


def _monitor_families(s):
    """The monitor's own counters: messages received, stored, duplicated, rejected, quarantined; errors."""
    yield CounterMetricFamily("edgeops_monitor_received", "Messages received (all topics).", value=s.received)
    yield CounterMetricFamily("edgeops_monitor_windows_stored", "New telemetry windows stored.", value=s.stored)
    yield CounterMetricFamily("edgeops_monitor_duplicates", "Redelivered windows dropped by (device, seq).",
                              value=s.duplicates)
    rej = CounterMetricFamily("edgeops_monitor_rejected", "Messages rejected, by reason.", labels=["reason"])
    for reason, n in sorted(dict(s.rejected).items()):
        rej.add_metric([reason], n)
    yield rej
    quar = CounterMetricFamily("edgeops_monitor_quarantined", "Messages kept in quarantine (raw bytes, topic, "
                               "reason) by this process, by reason.", labels=["reason"])
    for reason, n in sorted(dict(s.quarantined).items()):
        quar.add_metric([reason], n)
    yield quar
    yield CounterMetricFamily("edgeops_monitor_evaluation_errors", "Evaluations that failed (contained to "
                              "their device or fleet).", value=s.evaluation_errors)
    if s.broker_dropped is not None:
        yield GaugeMetricFamily("edgeops_monitor_broker_dropped_messages",
                                "The broker's $SYS/broker/publish/messages/dropped.", value=s.broker_dropped)


def _device_families(s, dev: list[str]):
    """Per device, from this process's statistics: latency quantiles, inferences, errors and PSI per feature."""
    yield _latency_family(dict(s.latest), dev)
    for name, doc, data in (("edgeops_device_inferences", "Inferences reported.", s.inferences),
                            ("edgeops_device_errors", "Inference errors reported.", s.errors)):
        fam = CounterMetricFamily(name, doc, labels=dev)
        for (fleet, device), n in sorted(dict(data).items()):
            fam.add_metric([fleet, device], n)
        yield fam
    psi = GaugeMetricFamily("edgeops_device_drift_psi", "PSI per feature at the last evaluation.",
                            labels=dev + ["feature"])
    for (fleet, device), scores in sorted(dict(s.scores).items()):
        for feature, value in scores.items():
            psi.add_metric([fleet, device, feature], value)
    yield psi


def _latency_family(latest: dict, dev: list[str]) -> GaugeMetricFamily:
    """The latency quantiles of each device's last window."""
    lat = GaugeMetricFamily("edgeops_device_latency_ms", "Latency quantiles of the last window (ms).",
                            labels=dev + ["quantile"])
    for (fleet, device), block in sorted(latest.items()):
        for q, k in QUANTILES:
            if block.get(k) is not None:
                lat.add_metric([fleet, device, q], block[k])
    return lat


def _status_families(engine, dev: list[str]):
    """From the database: each device's last-seen time, online state and open alerts; open alerts by detector."""
    seen = GaugeMetricFamily("edgeops_device_last_seen_timestamp_seconds",
                             "When the monitor last received a window or status of the device.",
                             labels=dev)
    online = GaugeMetricFamily("edgeops_device_online", "1 online, 0 offline or silent.", labels=dev)
    n_open = GaugeMetricFamily("edgeops_device_open_alerts", "Open alerts of the device.", labels=dev)
    for d in fleet_snapshot(engine):
        labels = [d["fleet"], d["device_id"]]
        if d["last_seen"] is not None:
            seen.add_metric(labels, d["last_seen"])
        online.add_metric(labels, 1.0 if d["status"] == "online" else 0.0)
        n_open.add_metric(labels, len(d["open_alerts"]))
    by_detector: dict[str, int] = {}
    for a in store.open_alerts(engine):
        by_detector[a["detector"]] = by_detector.get(a["detector"], 0) + 1
    yield seen
    yield online
    yield n_open
    fam = GaugeMetricFamily("edgeops_open_alerts", "Open alerts by detector (fleet-level ones included).",
                            labels=["detector"])
    for det, n in sorted(by_detector.items()):
        fam.add_metric([det], n)
    yield fam


def _accuracy_families(accuracy: dict, dev: list[str]) -> list:
    """Per device: the labelled accuracy of its recent windows, the holdout's it is judged against, and how many
    labelled inferences it rests on (late ground truth, see docs/retraining.md)."""
    acc = GaugeMetricFamily("edgeops_device_labelled_accuracy", "Accuracy on the labelled inferences of the "
                            "recent windows at the last evaluation (late ground truth).", labels=dev)
    ref = GaugeMetricFamily("edgeops_device_holdout_accuracy", "The bundle artifact's accuracy on its holdout, "
                            "what the labelled accuracy is judged against.", labels=dev)
    labelled = GaugeMetricFamily("edgeops_device_labelled_inferences", "Labelled inferences in the recent "
                                 "windows at the last evaluation.", labels=dev)
    for (fleet, device), (a, h, n) in sorted(accuracy.items()):
        acc.add_metric([fleet, device], a)
        ref.add_metric([fleet, device], h)
        labelled.add_metric([fleet, device], n)
    return [acc, ref, labelled]


# -- pages ---------------------------------------------------------------------------------------

def _css() -> str:
    return resources.files("telemetry").joinpath("static/dashboard.css").read_text()


def _page(title: str, body: str, refresh: int = 15) -> str:
    # reload with a timer instead of <meta refresh> so a headless dump sees one stable page
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_css()}</style></head><body><h1>{html.escape(title)}</h1>{body}"
            f"<p class='foot'>rendered {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}</p>"
            f"<script>setTimeout(function(){{location.reload()}}, {refresh * 1000});</script></body></html>")


def _ago(ts: float | None) -> str:
    if ts is None:
        return "never"
    s = max(0.0, time.time() - ts)
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago" if s < 7200 else f"{s / 3600:.1f} h ago"


def dashboard_html(monitor) -> str:
    e = html.escape
    rows = [_dashboard_row(d) for d in fleet_snapshot(monitor.engine, monitor.stats)]
    s = monitor.stats
    open_ = store.open_alerts(monitor.engine)
    alert_rows = "".join(
        f"<tr class='alarm'><td>{e(a['fleet'])}</td><td>{e(a['device_id'])}</td><td>{e(a['detector'])}</td>"
        f"<td>{e(', '.join(a['features']))}</td><td>{(a['statistic'] or 0):.4g}</td>"
        f"<td>{_ago(a['opened_at'])}</td></tr>"
        for a in open_)
    body = (
        f"<p class='summary'>{len(rows)} devices, {len(open_)} open alerts; received {s.received}, "
        f"stored {s.stored}, duplicates {s.duplicates}, rejected {sum(dict(s.rejected).values())}</p>"
        "<h2>Devices</h2><table id='devices'><tr><th>fleet</th><th>device</th><th>status</th><th>model</th>"
        "<th>last seen</th><th>alerts</th><th>worst drift (PSI)</th><th>p95 ms</th></tr>"
        + "".join(rows) + "</table><h2>Open alerts</h2>"
        + ("<table id='alerts'><tr><th>fleet</th><th>device</th><th>detector</th><th>features</th><th>statistic</th>"
           f"<th>opened</th></tr>{alert_rows}</table>" if open_ else "<p>none</p>")
        + _quarantine_html(monitor.engine))
    return _page("edgeops fleet", body)


def _dashboard_row(d: dict) -> str:
    """A device of the dashboard's table: fleet, link to its page, status, model, last seen, alerts, drift, p95."""
    e = html.escape
    alarm = bool(d["open_alerts"])
    drift = d["worst_drift"]
    drift_txt = f"{e(str(drift['feature']))}: {drift['psi']:.3f}" if drift and drift["psi"] is not None else "-"
    p95_txt = "-" if d["p95_ms"] is None else f"{d['p95_ms']:.2f}"
    href = f"/device/{e(d['fleet'])}/{e(d['device_id'])}"
    return (f"<tr class='{'alarm' if alarm else 'ok'}' data-device='{e(d['device_id'])}'>"
            f"<td>{e(d['fleet'])}</td><td><a href='{href}'>{e(d['device_id'])}</a></td>"
            f"<td class='status {d['status']}'>{d['status']}</td>"
            f"<td>{e(str(d['model']['name']))} {e(str(d['model']['version']))}</td><td>{_ago(d['last_seen'])}</td>"
            f"<td>{'ALERT: ' + e(', '.join(d['open_alerts'])) if alarm else 'ok'}</td><td>{drift_txt}</td>"
            f"<td>{p95_txt}</td></tr>")


def _quarantine_html(engine, limit: int = 20) -> str:
    """The newest quarantined messages: when, topic, reason, detail and the first bytes."""
    e = html.escape
    counts = store.quarantine_counts(engine)
    if not counts:
        return "<h2>Quarantine</h2><p>empty</p>"
    rows = "".join(
        f"<tr><td>{_ago(q['received_at'])}</td><td>{e(q['topic'])}</td><td>{e(q['reason'])}</td>"
        f"<td>{e(q['detail'][:200])}</td><td>{len(q['payload'])} B: {e(repr(bytes(q['payload'][:60])))}</td></tr>"
        for q in store.quarantined(engine, limit))
    summary = ", ".join(f"{e(r)} {n}" for r, n in sorted(counts.items()))
    return (f"<h2>Quarantine</h2><p id='quarantine'>{sum(counts.values())} kept ({summary})</p>"
            "<table><tr><th>received</th><th>topic</th><th>reason</th><th>detail</th><th>payload</th></tr>"
            f"{rows}</table>")


def line_svg(values: list[float | None], title: str, unit: str = "", width: int = 640, height: int = 160) -> str:
    """A small line chart as inline SVG (None values are gaps)."""
    pts = [(i, v) for i, v in enumerate(values) if v is not None]
    head = (f"<svg class='chart' width='{width}' height='{height}' viewBox='0 0 {width} {height}' "
            f"xmlns='http://www.w3.org/2000/svg'><text x='4' y='14'>{html.escape(title)}</text>")
    if not pts:
        return head + "<text x='4' y='40'>no data</text></svg>"
    lo, hi = _value_range(pts)
    n = max(1, len(values) - 1)
    left, top, w, h = 50, 22, width - 60, height - 40
    line = " ".join(f"{left + w * i / n:.1f},{top + h * (1 - (v - lo) / (hi - lo)):.1f}" for i, v in pts)
    return (head + f"<rect x='{left}' y='{top}' width='{w}' height='{h}' class='frame'/>"
            f"<text x='2' y='{top + 10}'>{hi:.3g}{unit}</text><text x='2' y='{top + h}'>{lo:.3g}{unit}</text>"
            f"<polyline points='{line}' class='line'/></svg>")


def _value_range(pts: list[tuple[int, float]]) -> tuple[float, float]:
    """The chart's (low, high) values: the data's, widened by one each way when they are all equal."""
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    return (lo - 1, hi + 1) if hi == lo else (lo, hi)


def bars_svg(scores: dict[str, float], threshold: float, width: int = 640) -> str:
    """Horizontal PSI bars per feature; bars at or over the threshold are drawn as alarms."""
    items = sorted(scores.items(), key=lambda kv: -kv[1])[:40]
    height = 24 + 16 * max(1, len(items))
    out = [f"<svg class='chart' width='{width}' height='{height}' xmlns='http://www.w3.org/2000/svg'>"
           f"<text x='4' y='14'>PSI per feature at the last evaluation (threshold {threshold})</text>"]
    top = max([threshold * 1.2] + [v for _, v in items])
    for k, (name, v) in enumerate(items):
        y = 22 + 16 * k
        bw = (width - 260) * min(v, top) / top
        cls = "bar alarm" if v >= threshold else "bar"
        out.append(f"<text x='4' y='{y + 11}'>{html.escape(name[:30])}</text>"
                   f"<rect x='200' y='{y}' width='{bw:.1f}' height='12' class='{cls}'/>"
                   f"<text x='{205 + bw:.1f}' y='{y + 11}'>{v:.3f}</text>")
    return "".join(out) + "</svg>"


def device_scores(monitor, fleet: str, device: str, model: tuple[str, str]) -> dict[str, float]:
    """PSI per feature: this process's last evaluation, or one computed now from the stored windows."""
    known = dict(monitor.stats.scores).get((fleet, device))
    if known:
        return known
    manifest = store.load_bundles(monitor.engine).get(model)
    recent = store.recent_windows(monitor.engine, fleet, device, model[0], model[1], monitor.config.recent_windows)
    if not recent or not manifest:
        return {}
    return evaluate(recent, manifest, monitor.config).feature_scores


def device_html(monitor, fleet: str, device: str) -> str | None:
    row = next((d for d in fleet_snapshot(monitor.engine, monitor.stats)
                if (d["fleet"], d["device_id"]) == (fleet, device)), None)
    if row is None:
        return None
    scores = device_scores(monitor, fleet, device, (row["model"]["name"], row["model"]["version"]))
    history = [a for a in store.all_alerts(monitor.engine) if (a["fleet"], a["device_id"]) == (fleet, device)]
    body = (
        _device_heading(row)
        + _window_charts(store.window_series(monitor.engine, fleet, device, limit=200))
        + bars_svg(scores, monitor.config.psi_threshold)
        + "<h2>Alerts</h2>" + _alert_history_table(history))
    return _page(f"{fleet}/{device}", body)


def _window_charts(series: list[dict]) -> str:
    """The device's p95 latency and inferences per window, as line charts."""
    return (line_svg([w["p95_ms"] for w in series], f"p95 latency per window (last {len(series)} windows)", " ms")
            + line_svg([float(w["count"]) for w in series], "inferences per window"))


def _device_heading(row: dict) -> str:
    """The device page's first line: fleet, device, status, model, last seen and whether an alert is open."""
    e = html.escape
    return (f"<p><a href='/'>fleet</a> / {e(row['fleet'])} / {e(row['device_id'])}: "
            f"<span class='status {row['status']}'>{row['status']}"
            f"</span>, model {e(str(row['model']['name']))} {e(str(row['model']['version']))}, last seen "
            f"{_ago(row['last_seen'])}{', <b class=alarmtext>ALERT</b>' if row['open_alerts'] else ''}</p>")


def _alert_history_table(history: list[dict]) -> str:
    """The device's alerts, open and closed, as a table ("none" without any)."""
    if not history:
        return "<p>none</p>"
    e = html.escape
    rows = "".join(
        f"<tr class='{'alarm' if a['open'] else 'ok'}'><td>{e(a['detector'])}</td>"
        f"<td>{'ALERT (open)' if a['open'] else 'closed'}</td><td>{e(', '.join(a['features']))}</td>"
        f"<td>{(a['statistic'] or 0):.4g}</td><td>{_ago(a['opened_at'])}</td></tr>" for a in history)
    return (f"<table><tr><th>detector</th><th>state</th><th>features</th><th>statistic</th>"
            f"<th>opened</th></tr>{rows}</table>")


# -- the server ----------------------------------------------------------------------------------

class MonitorHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, monitor):
        super().__init__(address, MonitorHandler)
        self.monitor = monitor
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(FleetCollector(monitor))


class MonitorHandler(BaseHTTPRequestHandler):
    server: MonitorHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s " + fmt, self.address_string(), *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any) -> None:
        self._send(status, json.dumps(doc, default=float).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        path, query = url.path, parse_qs(url.query)
        try:
            page = self._PAGES.get(path)
            if page is not None:
                page(self, query)
            elif path.startswith("/device/") and len(path.split("/")) == 4:
                self._device_page(path)
            else:
                self._json(404, {"error": "not_found", "detail": f"no page {path}; try /, /metrics, "
                                 "/device/<fleet>/<device>, /api/devices, /api/alerts"})
        except Exception:  # noqa: BLE001 - never a traceback to the client
            log.exception("GET %s failed", path)
            self._json(500, {"error": "internal", "detail": "internal error (logged on the server)"})

    def _metrics(self, query: dict) -> None:
        self._send(200, generate_latest(self.server.registry), "text/plain; version=0.0.4; charset=utf-8")

    def _dashboard(self, query: dict) -> None:
        self._send(200, dashboard_html(self.server.monitor).encode(), "text/html; charset=utf-8")

    def _devices(self, query: dict) -> None:
        m = self.server.monitor
        self._json(200, {"devices": fleet_snapshot(m.engine, m.stats)})

    def _alerts(self, query: dict) -> None:
        """Open alerts; with ?all=1, closed ones too."""
        engine = self.server.monitor.engine
        rows = store.all_alerts(engine) if query.get("all") == ["1"] else store.open_alerts(engine)
        self._json(200, {"alerts": [_jsonable(a) for a in rows]})

    _PAGES = {"/metrics": _metrics, "/": _dashboard, "/index.html": _dashboard, "/api/devices": _devices,
              "/api/alerts": _alerts}

    def _device_page(self, path: str) -> None:
        """/device/<fleet>/<device>: the device's page, 404 for a device the monitor does not know."""
        _, _, fleet, device = (unquote(p) for p in path.split("/"))
        page = device_html(self.server.monitor, fleet, device)
        if page is None:
            self._json(404, {"error": "not_found", "detail": f"no device {device!r} in fleet {fleet!r}"})
        else:
            self._send(200, page.encode(), "text/html; charset=utf-8")

    def do_POST(self) -> None:  # noqa: N802
        self._json(405, {"error": "method_not_allowed", "detail": "the monitor's HTTP side is read-only (GET)"})


def start_http(monitor, host: str = "127.0.0.1", port: int = 9100) -> MonitorHTTPServer:
    """Serve metrics, dashboard and JSON for ``monitor`` in a daemon thread; port 0 picks a free one.

    Returns the server: ``.server_address`` is the bound (host, port), ``.shutdown()`` stops it.
    """
    server = MonitorHTTPServer((host, port), monitor)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="edgeops-monitor-http",
                     daemon=True).start()
    return server
