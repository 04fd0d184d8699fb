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

from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from telemetry import store
from telemetry.evaluate import Verdict

log = logging.getLogger("edgeops.alerts")


def apply(engine: Engine, fleet: str, device: str, model_name: str, model_version: str, verdict: Verdict,
          close_after: int, now: float | None = None) -> str | None:
    """Fold one verdict into the alert state; returns "opened", "closed" or None."""
    now = time.time() if now is None else now
    t = store.alerts
    key = (t.c.fleet == fleet) & (t.c.device_id == device) & (t.c.model_name == model_name) \
        & (t.c.model_version == model_version) & (t.c.detector == verdict.detector)
    with engine.begin() as conn:
        row = conn.execute(select(t.c.id, t.c.open, t.c.clean_evaluations, t.c.opened_at).where(key)).first()
        if verdict.firing and row is None:
            return _open_new(conn, engine, (fleet, device, model_name, model_version), verdict, now)
        if verdict.firing:
            return _fire_again(conn, row, verdict, now)
        if row is None or not row.open:
            return None
        return _clear_evaluation(conn, row, verdict, close_after, now)


def _open_new(conn, engine: Engine, ident: tuple[str, str, str, str], verdict: Verdict, now: float) -> str | None:
    """Insert an open alert for (fleet, device, model name, version); "opened" unless another worker did first."""
    t = store.alerts
    fleet, device, model_name, model_version = ident
    stmt = store._insert(engine, t).values(
        fleet=fleet, device_id=device, model_name=model_name, model_version=model_version,
        detector=verdict.detector, open=True, statistic=verdict.statistic, features=json.dumps(verdict.features),
        detail=json.dumps(verdict.detail, default=float), opened_at=now, closed_at=None, clean_evaluations=0,
    ).on_conflict_do_nothing(
        index_elements=["fleet", "device_id", "model_name", "model_version", "detector"]
    ).returning(t.c.id)
    return "opened" if conn.execute(stmt).first() is not None else None


def _fire_again(conn, row, verdict: Verdict, now: float) -> str | None:
    """A firing verdict on an alert on record: reopen a closed one ("opened"), refresh an open one."""
    t = store.alerts
    features = json.dumps(verdict.features)
    detail = json.dumps(verdict.detail, default=float)
    if not row.open:
        res = conn.execute(update(t).where(t.c.id == row.id, t.c.open.is_(False)).values(
            open=True, opened_at=now, closed_at=None, clean_evaluations=0, statistic=verdict.statistic,
            features=features, detail=detail))
        return "opened" if res.rowcount == 1 else None
    conn.execute(update(t).where(t.c.id == row.id).values(
        clean_evaluations=0, statistic=verdict.statistic, features=features, detail=detail))
    return None


def _clear_evaluation(conn, row, verdict: Verdict, close_after: int, now: float) -> str | None:
    """A verdict that does not fire on an open alert: count it as clear, and close the alert ("closed") after
    ``close_after`` clear ones once it was open ``verdict.hold_s``."""
    t = store.alerts
    if not verdict.is_clear:
        # still there below the opening level: the alert holds and the clear evaluations start again
        conn.execute(update(t).where(t.c.id == row.id).values(clean_evaluations=0))
        return None
    clean = row.clean_evaluations + 1
    if clean >= close_after and now - (now if row.opened_at is None else row.opened_at) >= verdict.hold_s:
        res = conn.execute(update(t).where(t.c.id == row.id, t.c.open.is_(True)).values(
            open=False, closed_at=now, clean_evaluations=clean))
        return "closed" if res.rowcount == 1 else None
    conn.execute(update(t).where(t.c.id == row.id).values(clean_evaluations=clean))
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
