"""Where an agent keeps its state: the spool, identity and (for flashing) bundles.

Layout of ``--state-dir``::

    spool.sqlite      unsent telemetry windows and the next sequence number
    identity.json     device id and fleet this state belongs to
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from edge_runtime.errors import InvalidInputError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_id(value: str, what: str) -> str:
    if not ID_PATTERN.match(value or ""):
        raise InvalidInputError(
            f"{what} {value!r}: use 1-64 letters, digits, '.', '_' or '-' (no '/', '+', '#' or spaces)"
        )
    return value


def default_state_dir(device_id: str) -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "edgeops" / device_id


def prepare_state_dir(state_dir: str | Path | None, device_id: str, fleet: str) -> Path:
    """Create (or reopen) the state folder; refuse one that belongs to another device."""
    d = Path(state_dir) if state_dir else default_state_dir(device_id)
    d.mkdir(parents=True, exist_ok=True)
    ident = d / "identity.json"
    if ident.exists():
        try:
            known = json.loads(ident.read_text())
        except json.JSONDecodeError:
            known = {}
        if known.get("device_id") not in (None, device_id):
            raise InvalidInputError(
                f"state dir {d} belongs to device {known.get('device_id')!r}, not {device_id!r}; "
                "use another --state-dir"
            )
    tmp = ident.with_suffix(".tmp")
    tmp.write_text(json.dumps({"device_id": device_id, "fleet": fleet}))
    os.replace(tmp, ident)
    return d
