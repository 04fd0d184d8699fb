"""Closing the loop: what an alert hands to a retraining pipeline.

When a drift or accuracy alert opens, the monitor can run a command (``--on-alert-exec CMD``: the
incident as JSON on its standard input, in its own thread, killed after ``--on-alert-timeout``
seconds) and/or POST the incident to a URL (``--on-alert-webhook``); neither ever holds up
ingestion or evaluation. An incident names the alert (id, kind, when it opened), the device(s),
the bundle (name, version), the features and statistics of the verdict, and the range of windows
it was judged on (first/last seq, their start and end times).

``edgeops export --alert ID`` writes what the store holds about an alert into a folder a training
pipeline can read (see :func:`export_alert` and docs/retraining.md).
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
from sqlalchemy.engine import Engine

from telemetry import store

log = logging.getLogger("edgeops.retrain")

# alerts that say the model no longer fits its data: what retraining answers (not latency, errors, silence)
TRIGGER_DETECTORS = ("feature_drift", "prediction_drift", "missing_values", "confidence_drift", "out_of_range",
                     "accuracy")
MAX_RUNNING = 4          # alert commands running at once; an opening beyond that is logged, not run
OUTPUT_LOG_CHARS = 2000  # what of a failed command's output the log keeps


def window_range(windows: list[dict]) -> dict:
    """First and last seq, and the time span, of the windows (per device for a fleet's)."""
    if not windows:
        return {"windows": 0}
    by_device: dict[str, list[dict]] = {}
    for w in windows:
        by_device.setdefault(str(w.get("device_id")), []).append(w)
    return {"windows": len(windows), "start": min(w["start"] for w in windows),
            "end": max(w["end"] for w in windows),
            "devices": {d: _seq_range(ws) for d, ws in sorted(by_device.items())}}


def _seq_range(windows: list[dict]) -> dict:
    seqs = [w["seq"] for w in windows]
    return {"first_seq": min(seqs), "last_seq": max(seqs)}


def incident(engine: Engine, alert: dict, recent: int = 10) -> dict:
    """The JSON description of an alert for a retraining pipeline (what --on-alert-exec reads on stdin)."""
    device = alert["device_id"]
    windows = store.recent_windows(engine, alert["fleet"], None if device == "*" else device, alert["model_name"],
                                   alert["model_version"], recent * (50 if device == "*" else 1))
    rng = window_range(windows)
    return {"type": "incident", "alert_id": alert["id"], "detector": alert["detector"], "fleet": alert["fleet"],
            "device_id": device, "devices": sorted(rng.get("devices", {})) or ([] if device == "*" else [device]),
            "bundle": {"name": alert["model_name"], "version": alert["model_version"]},
            "opened_at": alert["opened_at"], "features": alert["features"], "statistic": alert["statistic"],
            "detail": alert["detail"], "window_range": rng, "ts": round(time.time(), 3)}


class AlertTrigger:
    """Runs ``command`` (and/or POSTs to ``webhook``) with the incident of every drift or accuracy alert
    that opens, off the caller's thread; a command that fails or outlives ``timeout`` is logged (and killed).

    Args:
        command: a command line, split like a shell's but not run by one (use ``sh -c '...'`` for pipes).
        webhook: a URL the incident is POSTed to (``telemetry.alerts.post_webhook``).
        timeout: seconds a command may run.
    """

    def __init__(self, command: str | None = None, webhook: str | None = None, timeout: float = 60.0):
        self.argv = shlex.split(command) if command else None
        self.webhook = webhook
        self.timeout = timeout
        self._running = threading.BoundedSemaphore(MAX_RUNNING)
        self.started = self.failed = self.skipped = 0

    def fire(self, doc: dict) -> None:
        """Hand one incident to the command and the webhook; returns at once."""
        if self.webhook:
            from telemetry.alerts import post_webhook

            post_webhook(self.webhook, doc)
        if not self.argv:
            return
        if not self._running.acquire(blocking=False):
            self.skipped += 1
            log.warning("alert %s: %d alert commands are still running; this one is not run", doc.get("alert_id"),
                        MAX_RUNNING)
            return
        self.started += 1
        threading.Thread(target=self._run, args=(doc,), name="edgeops-alert-exec", daemon=True).start()

    def _run(self, doc: dict) -> None:
        try:
            res = subprocess.run(self.argv, input=json.dumps(doc, default=float).encode(), capture_output=True,
                                 timeout=self.timeout, check=False)
            if res.returncode != 0:
                self.failed += 1
                log.warning("alert command for alert %s exited %d: %s", doc.get("alert_id"), res.returncode,
                            (res.stderr or res.stdout).decode("utf-8", "replace")[-OUTPUT_LOG_CHARS:].strip())
        except subprocess.TimeoutExpired:
            self.failed += 1
            log.warning("alert command for alert %s was killed after %g s", doc.get("alert_id"), self.timeout)
        except OSError as exc:
            self.failed += 1
            log.warning("alert command %r could not run: %s", self.argv[0], exc)
        finally:
            self._running.release()


def export_alert(engine: Engine, alert_id: int, out: str | Path, windows: int = 100) -> Path | None:
    """Write what the store holds about an alert into ``out``; None when there is no such alert.

    Files: ``alert.json`` (the alert and its incident), ``windows.jsonl`` (the device's, or the fleet's,
    most recent ``windows`` windows of that bundle version, oldest first), ``merged.json`` (their merged
    feature statistics, predicted classes and latency), ``labels.json`` (labelled counts and the confusion
    matrix, accuracy against the holdout's) and ``reference.json`` (the bundle's reference profile summary).
    """
    from telemetry.evaluate import merge_windows

    alert = store.alert_by_id(engine, alert_id)
    if alert is None:
        return None
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    device = None if alert["device_id"] == "*" else alert["device_id"]
    rows = store.recent_windows(engine, alert["fleet"], device, alert["model_name"], alert["model_version"], windows)
    rows.sort(key=lambda w: (w.get("end", 0), str(w.get("device_id")), w.get("seq", 0)))
    manifest = store.load_bundles(engine).get((alert["model_name"], alert["model_version"]))
    profile = (manifest or {}).get("reference_profile") or {}
    _write(d / "alert.json", {"alert": alert, "incident": incident(engine, alert)})
    with open(d / "windows.jsonl", "w") as fh:
        for w in rows:
            fh.write(json.dumps(w, separators=(",", ":")) + "\n")
    _write(d / "merged.json", _merged(rows, profile, merge_windows))
    _write(d / "labels.json", _labels_summary(rows, manifest))
    _write(d / "reference.json", _reference_summary(manifest, profile))
    return d


def _labels_summary(rows: list[dict], manifest: dict | None) -> dict:
    """Labelled counts, accuracy and confusion matrix of the windows, with the holdout accuracy they are
    judged against."""
    from telemetry.evaluate import labelled_confusion

    confusion = labelled_confusion(rows)
    artifact = next(((w.get("model") or {}).get("artifact") for w in rows), None)
    return {
        **_accuracy(confusion),
        **_holdout_reference(manifest, artifact),
        "confusion": confusion.tolist() if confusion is not None else None,
        "unmatched": sum(_unmatched(w) for w in rows),
        "class_labels": (manifest or {}).get("labels")}


def _unmatched(w: dict) -> int:
    """Labels of the window that matched no inference it kept."""
    return int((w.get("labels") or {}).get("unmatched") or 0)


def _holdout_reference(manifest: dict | None, artifact: str | None) -> dict:
    """The holdout accuracy the windows' artifact is judged against, and the artifact it was measured on."""
    from telemetry.drift.accuracy import holdout_accuracy

    ref = holdout_accuracy(manifest, artifact)
    if not ref:
        return {"holdout_accuracy": None, "artifact": artifact}
    return {"holdout_accuracy": ref[0], "artifact": ref[1]}


def _accuracy(confusion: np.ndarray | None) -> dict:
    """Labelled inferences, correct ones and their share (None without labels)."""
    n = int(confusion.sum()) if confusion is not None else 0
    if not n:
        return {"labelled": n, "correct": 0, "accuracy": None}
    correct = np.trace(confusion)
    return {"labelled": n, "correct": int(correct), "accuracy": round(float(correct) / n, 6)}


def _merged(rows: list[dict], profile: dict, merge_windows) -> dict:
    ref = profile.get("features") or []
    if not rows or len(ref) != len(rows[0]["features"]["count"]):
        return {"windows": len(rows), "count": sum(w["count"] for w in rows)}
    fs, lat, classes, count, errors = merge_windows(rows, [f["bin_edges"] for f in ref])
    return {"windows": len(rows), "count": count, "errors": errors, "features": fs.to_dict(),
            "feature_names": [f["name"] for f in ref], "predictions": {"counts": classes.tolist()
                                                                       if classes is not None else None},
            "latency_ms": lat.to_dict()}


def _reference_summary(manifest: dict | None, profile: dict) -> dict:
    if not manifest:
        return {"bundle": None}
    return {"bundle": {"name": manifest.get("name"), "version": manifest.get("version"), "task": manifest.get("task"),
                       "labels": manifest.get("labels")},
            "n_samples": profile.get("n_samples"), "class_priors": profile.get("class_priors"),
            "features": [_feature_summary(f) for f in profile.get("features") or []],
            "parity": [{"file": a.get("file"), **(a.get("parity") or {})} for a in manifest.get("artifacts") or []]}


def _feature_summary(f: dict) -> dict:
    return {k: f.get(k) for k in ("name", "mean", "std", "min", "max", "nan_rate", "bin_edges")}


def _write(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=1, default=float) + "\n")
