"""`edgeops report`: one page that tells how the fleet's models are doing, from the monitor's database.

Four panels: accuracy at conversion per bundle artifact (the manifests' parity
figures), p95 latency per window for each device, drift (the largest feature
PSI) over time, recomputed from the stored windows with the monitor's own
evaluation on a sliding window, and fleet status with open alerts. ``.png``
writes the figure; ``.html`` writes a self-contained page with the figure
embedded and the tables beneath it.

The work is bounded whatever the fleet size: at most MAX_DEVICES devices are
drawn (those in alarm first, then the slowest), each with its last
HISTORY_WINDOWS windows.
"""

from __future__ import annotations

import base64
import html
import io
import time
from pathlib import Path

from edge_runtime.errors import InvalidInputError
from telemetry import store
from telemetry.evaluate import MonitorConfig, evaluate

MAX_DEVICES = 12
HISTORY_WINDOWS = 60


def _engine(db_url: str):
    if db_url.startswith("sqlite:///"):
        path = Path(db_url[len("sqlite:///"):])
        if not path.is_file():
            raise InvalidInputError(f"--db {db_url}: no database file at {path}")
    try:
        return store.connect(db_url)
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy and drivers raise many kinds for a bad URL
        raise InvalidInputError(f"--db {db_url}: {str(exc).splitlines()[0][:200]}") from None


def parity_rows(bundles: dict[tuple[str, str], dict]) -> list[dict]:
    """One row per bundle artifact with the metric measured at conversion (source and artifact)."""
    return [_parity_row(f"{name} {version}", a)
            for (name, version), m in sorted(bundles.items()) for a in (m or {}).get("artifacts") or []]


def _parity_row(bundle: str, a: dict) -> dict:
    p = a.get("parity") or {}
    return {"bundle": bundle, "file": a.get("file"), "quantization": a.get("quantization"),
            "metric": p.get("metric"), "source": p.get("source_metric"),
            "artifact": p.get("artifact_metric"), "drop_points": p.get("metric_drop_points"),
            "size_bytes": a.get("size_bytes")}


def chosen_devices(snapshot: list[dict]) -> list[dict]:
    """The devices worth drawing: in alarm first, then by p95 latency, at most MAX_DEVICES."""
    ranked = sorted(snapshot, key=lambda d: (not d["open_alerts"], -(d["p95_ms"] or 0.0), d["device_id"]))
    return [d for d in ranked if d["model"]["name"]][:MAX_DEVICES]


def psi_history(engine, device: dict, manifest: dict | None, config: MonitorConfig) -> list[tuple[int, float]]:
    """(seq, largest feature PSI) after each of the device's last windows, over the monitor's sliding window."""
    if not manifest or not (manifest.get("reference_profile") or {}).get("features"):
        return []
    fleet, dev = device["fleet"], device["device_id"]
    name, version = device["model"]["name"], device["model"]["version"]
    recent = store.recent_windows(engine, fleet, dev, name, version, HISTORY_WINDOWS + config.recent_windows - 1)
    recent.sort(key=lambda w: w["seq"])
    # only full sliding windows, as the monitor sees them (all of them when there are fewer)
    first = config.recent_windows - 1 if len(recent) >= config.recent_windows else 0
    out = []
    for i in range(first, len(recent)):
        ev = evaluate(recent[max(0, i - config.recent_windows + 1): i + 1], manifest, config)
        if ev.feature_scores:
            out.append((recent[i]["seq"], max(ev.feature_scores.values())))
    return out


def _figure(engine, snapshot, parity, open_alerts, config):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 10))
    fig.suptitle(f"edgeops fleet report - {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", fontsize=14)
    chosen = chosen_devices(snapshot)
    _parity_panel(axes[0][0], parity)
    _latency_panel(axes[0][1], engine, chosen)
    _drift_panel(axes[1][0], engine, chosen, store.load_bundles(engine), config)
    _status_panel(axes[1][1], snapshot, open_alerts)
    fig.tight_layout()
    return fig


def _parity_panel(ax, parity) -> None:
    """Accuracy at conversion per bundle artifact, against its source model."""
    scored = [r for r in parity if r["artifact"] is not None]
    if scored:
        _parity_bars(ax, scored)
    else:
        ax.text(0.5, 0.5, "no bundle with parity figures registered", ha="center", va="center")
    ax.set_title("accuracy at conversion per bundle artifact")


def _parity_bars(ax, scored: list[dict]) -> None:
    """One bar per artifact (its metric) with its source model's metric marked."""
    labels = [f"{r['bundle']}\n{r['file']}" for r in scored]
    ys = range(len(scored))
    ax.barh(list(ys), [r["artifact"] for r in scored], color="#60a5fa", label="artifact")
    ax.scatter([r["source"] for r in scored], list(ys), color="#111", marker="|", s=200, label="source model",
               zorder=3)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(*_parity_xlim(scored))
    ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel(f"{scored[0]['metric'] or 'metric'} at conversion (holdout)")


def _parity_xlim(scored: list[dict]) -> tuple[float, float | None]:
    """From a little below the lowest metric to 1.0 for accuracy (open-ended for other metrics)."""
    lo = min(min(r["artifact"] for r in scored), min((r["source"] or 1) for r in scored))
    return max(0.0, lo - 0.05), 1.0 if scored[0]["metric"] in ("accuracy", None) else None


def _latency_panel(ax, engine, chosen) -> None:
    """p95 latency per window of the chosen devices (red: in alarm)."""
    series = _latency_series(engine, chosen)
    if series:
        box = ax.boxplot([s[1] for s in series], vert=False, patch_artist=True)
        for patch, s in zip(box["boxes"], series, strict=False):
            patch.set_facecolor("#fca5a5" if s[2] else "#bfdbfe")
        ax.set_yticks(range(1, len(series) + 1), [s[0] for s in series], fontsize=8)
        ax.set_xlabel(f"p95 latency per window (ms), last {HISTORY_WINDOWS} windows")
    else:
        ax.text(0.5, 0.5, "no windows stored", ha="center", va="center")
    ax.set_title("latency per device (red: device in alarm)")


def _latency_series(engine, chosen) -> list[tuple[str, list[float], bool]]:
    """(device, p95 per window, in alarm) of the chosen devices that stored windows with latencies."""
    series = []
    for d in chosen:
        p95 = [w["p95_ms"] for w in store.window_series(engine, d["fleet"], d["device_id"], limit=HISTORY_WINDOWS)
               if w["p95_ms"] is not None]
        if p95:
            series.append((d["device_id"], p95, bool(d["open_alerts"])))
    return series


def _drift_panel(ax, engine, chosen, bundles, config) -> None:
    """The largest feature PSI over time of the chosen devices."""
    drawn = 0
    for d in chosen:
        hist = psi_history(engine, d, bundles.get((d["model"]["name"], d["model"]["version"])), config)
        if hist:
            ax.plot([h[0] for h in hist], [h[1] for h in hist], marker=".", label=d["device_id"],
                    linestyle="-" if d["open_alerts"] else "--")
            drawn += 1
    if drawn:
        _psi_axes(ax, config)
    else:
        ax.text(0.5, 0.5, "no drift history (no registered reference profile or windows)", ha="center", va="center")
    ax.set_title("drift over time")


def _psi_axes(ax, config) -> None:
    """The drift panel's threshold line, symlog PSI scale, labels and legend."""
    ax.axhline(config.psi_threshold, color="#dc2626", linewidth=1, label=f"threshold {config.psi_threshold}")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel(f"window seq (PSI over the last {config.recent_windows} windows)")
    ax.set_ylabel("largest feature PSI")
    ax.legend(fontsize=7, ncol=2)


def _status_panel(ax, snapshot, open_alerts) -> None:
    """Devices online, silent, offline and in alarm; open alerts by detector."""
    states = ["online", "silent", "offline"]
    counts = [sum(1 for d in snapshot if d["status"] == s) for s in states]
    in_alarm = sum(1 for d in snapshot if d["open_alerts"])
    bars = ax.bar(states + ["in alarm"], counts + [in_alarm], color=["#16a34a", "#d97706", "#6b7280", "#dc2626"])
    ax.bar_label(bars)
    ax.text(0.98, 0.97, _alerts_by_detector(open_alerts), transform=ax.transAxes, ha="right", va="top", fontsize=9,
            family="monospace", bbox={"facecolor": "white", "edgecolor": "#ccc"})
    ax.set_ylim(0, max(counts + [in_alarm, 1]) * 1.35)
    ax.set_title(f"fleet status: {len(snapshot)} devices")


def _alerts_by_detector(open_alerts) -> str:
    """The status panel's text: how many alerts of each detector are open."""
    by_det: dict[str, int] = {}
    for a in open_alerts:
        by_det[a["detector"]] = by_det.get(a["detector"], 0) + 1
    return "open alerts by detector:\n" + ("\n".join(f"  {k}: {v}" for k, v in sorted(by_det.items())) or "  none")


def _table(rows: list[dict], columns: list[str]) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e('' if r.get(c) is None else str(r.get(c)))}</td>" for c in columns)
                   + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>" if rows else "<p>none</p>"


def write_report(db_url: str, out: str | Path, config: MonitorConfig | None = None) -> Path:
    """Write the fleet report to ``out`` (.png: the figure; .html: page with the figure and tables)."""
    from telemetry.http import fleet_snapshot

    out = _checked_out(out)
    config = config or MonitorConfig()
    engine = _engine(db_url)
    try:
        snapshot = fleet_snapshot(engine)
        parity = parity_rows(store.load_bundles(engine))
        open_ = store.open_alerts(engine)
        quarantine = [_quarantine_row(q) for q in store.quarantined(engine, 50)]
        png = _png(_figure(engine, snapshot, parity, open_, config))
    finally:
        engine.dispose()
    if out.suffix.lower() == ".png":
        out.write_bytes(png)
        return out
    out.write_text(_html_report(png, [_device_row(d) for d in snapshot], [_alert_row(a) for a in open_],
                                parity, quarantine))
    return out


def _checked_out(out: str | Path) -> Path:
    """The report's path: a .png or .html file in an existing folder."""
    out = Path(out)
    if out.suffix.lower() not in (".png", ".html"):
        raise InvalidInputError(f"--out {out}: the report is written as .png or .html")
    if not out.parent.is_dir():
        raise InvalidInputError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _png(fig) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _utc(ts: float | None) -> str | None:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts)) if ts else None


def _quarantine_row(q: dict) -> dict:
    """A quarantined message for the table: when, its detail cut short and the start of its bytes."""
    return {**q, "received_at": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(q["received_at"])),
            "detail": q["detail"][:200], "payload": f"{len(q['payload'])} B: {bytes(q['payload'][:60])!r}"}


def _device_row(d: dict) -> dict:
    """A device of the fleet snapshot for the table."""
    return {**d, "model": f"{d['model']['name']} {d['model']['version']}",
            "open_alerts": ", ".join(d["open_alerts"]), "last_seen": _utc(d["last_seen"]),
            "p95_ms": None if d["p95_ms"] is None else round(d["p95_ms"], 3),
            "ALERT": "ALERT" if d["open_alerts"] else ""}


def _alert_row(a: dict) -> dict:
    """An open alert for the table."""
    return {**a, "features": ", ".join(a["features"]), "statistic": round(a["statistic"] or 0.0, 4),
            "opened_at": _utc(a["opened_at"])}


def _html_report(png: bytes, devices: list[dict], alerts: list[dict], parity: list[dict],
                 quarantine: list[dict]) -> str:
    """The self-contained page: the figure embedded, then the tables."""
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>edgeops fleet report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border-bottom:1px solid #ddd;padding:2px 8px;font-size:.85em;text-align:left}th{background:#f0f0f0}"
        "img{max-width:100%}</style></head><body><h1>edgeops fleet report</h1>"
        f"<img alt='fleet report' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"
        "<h2>Open alerts</h2>" + _table(alerts, ["fleet", "device_id", "model_name", "model_version", "detector",
                                                 "features", "statistic", "opened_at"])
        + "<h2>Devices</h2>" + _table(devices, ["fleet", "device_id", "status", "ALERT", "open_alerts", "model",
                                                "last_seen", "p95_ms"])
        + "<h2>Accuracy at conversion</h2>" + _table(parity, ["bundle", "file", "quantization", "metric", "source",
                                                             "artifact", "drop_points", "size_bytes"])
        + "<h2>Quarantined messages (newest)</h2>" + _table(quarantine, ["received_at", "topic", "reason", "detail",
                                                                         "payload"])
        + "</body></html>")
