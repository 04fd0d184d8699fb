"""Alerts with hysteresis: open at the first firing evaluation, close after N clear ones.

An open alert closes only when the change is gone: ``close_after`` evaluations in a row whose
verdict is clear (below the detector's leaving threshold, which sits apart from its opening one,
see evaluate.py), and not before ``verdict.hold_s`` seconds after it opened. A verdict that no
longer fires but is not clear (the change is still there, below the opening level) holds the alert
and restarts the count. So a change that hovers at a threshold is one incident: one opening and one
closing, not one per crossing.

The alert's state lives in the database, keyed by (fleet, device, model name,
model version, detector), and every transition is a conditional UPDATE, so two
monitor processes evaluating the same device cannot open it twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request

from sqlalchemy.engine import Engine

from telemetry import store
from telemetry.evaluate import Verdict

log = logging.getLogger("edgeops.alerts")


def apply(engine: Engine, fleet: str, device: str, model_name: str, model_version: str, verdict: Verdict,
          close_after: int, now: float | None = None) -> str | None:
    """Fold one verdict into the alert state; returns "opened", "closed" or None."""
    now = time.time() if now is None else now
    ident = (fleet, device, model_name, model_version, verdict.detector)
    with engine.begin() as conn:
        row = store.alert_state(conn, ident)
        if verdict.firing and row is None:
            return "opened" if store.insert_open_alert(conn, engine, ident, _finding(verdict), now) else None
        if verdict.firing:
            return _fire_again(conn, row, verdict, now)
        if row is None or not row.open:
            return None
        return _clear_evaluation(conn, row, verdict, close_after, now)


def _finding(verdict: Verdict) -> dict:
    """What an alert records of the verdict that fired."""
    return {"statistic": verdict.statistic, "features": json.dumps(verdict.features),
            "detail": json.dumps(verdict.detail, default=float)}


def _fire_again(conn, row, verdict: Verdict, now: float) -> str | None:
    """A firing verdict on an alert on record: reopen a closed one ("opened"), refresh an open one."""
    if not row.open:
        return "opened" if store.reopen_alert(conn, row.id, _finding(verdict), now) else None
    store.set_alert(conn, row.id, clean_evaluations=0, **_finding(verdict))
    return None


def _clear_evaluation(conn, row, verdict: Verdict, close_after: int, now: float) -> str | None:
    """A verdict that does not fire on an open alert: count it as clear, and close the alert ("closed") after
    ``close_after`` clear ones once it was open ``verdict.hold_s``."""
    if not verdict.is_clear:
        # still there below the opening level: the alert holds and the clear evaluations start again
        store.set_alert(conn, row.id, clean_evaluations=0)
        return None
    clean = row.clean_evaluations + 1
    if clean >= close_after and now - (now if row.opened_at is None else row.opened_at) >= verdict.hold_s:
        return "closed" if store.close_alert(conn, row.id, clean, now) else None
    store.set_alert(conn, row.id, clean_evaluations=clean)
    return None


def post_webhook(url: str, event: dict, timeout: float = 5.0) -> None:
    """POST an alert event as JSON in the background; a failure is logged, never raised."""

    def send() -> None:
        req = urllib.request.Request(url, data=json.dumps(event, default=float).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                resp.read()
        except Exception as exc:  # noqa: BLE001 - a webhook that is down must not stop the monitor
            log.warning("webhook %s failed: %s", url, exc)

    threading.Thread(target=send, daemon=True).start()
