"""The wire format between devices and the monitor, defined once.

Topics, schema version, encoding (JSON, optionally zlib) and the validation
the monitor applies to every device message live here; the agent, the
monitor, the flasher and ``edgeops bench`` all go through this module. The
JSON Schema ``edge_runtime/schemas/telemetry.schema.json`` describes the same
messages (a test checks both agree) and ``docs/telemetry.md`` explains them.

Every message from a device is hostile until bounded. :func:`parse` returns
a :class:`Message` whose ``doc`` is a *canonical* copy: only the fields this
module knows, every number finite and in range, every string valid UTF-8
without NUL and of bounded length, every list of bounded length. Anything
else raises :class:`Rejected` with one of :data:`REASONS`; nothing else
escapes it.

>>> doc = {"schema_version": 1, "type": "status", "device_id": "pi-1", "fleet": "lab", "online": True, "ts": 1.0}
>>> parse("edgeops/lab/pi-1/status", encode(doc)).doc["online"]
True
>>> parse("edgeops/lab/pi-1/status", b"[" * 100_000).kind
Traceback (most recent call last):
...
edge_runtime.wire.Rejected: too_deep: the payload nests deeper than the decoder allows
"""

from __future__ import annotations

import json
import re
import time
import zlib
from typing import NamedTuple

SCHEMA_VERSION = 1
DEFAULT_PREFIX = "edgeops"
MAX_PAYLOAD = 256 * 1024
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_NAME = 128                 # model names (the database column's width)
MAX_VERSION = 64
MAX_TEXT = 256                 # any other string the monitor keeps
MAX_INT = 2**53 - 1            # exact in JSON, float64 and every database's BIGINT
MAX_ABS = 1e100                # feature values, moments, latencies: beyond this a merge could overflow
MAX_M2 = 1e300
MAX_LIST = 65_536              # features x bins of any real model fit far below
MAX_CLOCK_SKEW = 300.0         # seconds a window may be dated ahead of the monitor's clock
DISTINCT_REGISTERS = 64        # distinct: the distinct-rows sketch (edge_runtime/distinct.py) ...
DISTINCT_MAX_RANK = 59         # ... each register at most this
_DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"   # edge_runtime/distinct.py's
_REGISTER_TEXT = re.compile(r"[0-9A-Za-x]{64}\Z")

DEVICE_KINDS = ("telemetry", "status", "bench")   # device -> monitor
ACK = "ack"                                       # monitor -> device: windows committed
CMD = "cmd"                                       # operator -> device
CMD_RESULT = "cmd/result"                         # device -> operator
ALERTS = "alerts"                                 # monitor -> operators, per fleet
PREDICTIONS = "predictions"                       # device -> its consumers: what the model said
LABELS = "labels"                                 # operator -> device: ground truth of earlier inputs, by id
MAX_LABELS_PAYLOAD = 256 * 1024                   # a labels message (or a POST /feedback body), at most
MAX_LABELS = 10_000                               # labels in one message
MAX_CLASSES = 256                                 # classes a window's confusion matrix may have

REASONS = (
    "oversized", "malformed_json", "too_deep", "not_an_object", "schema_version", "wrong_type", "missing_field",
    "bad_value", "bad_string", "clock_skew", "device_mismatch", "fleet_mismatch", "feature_count_mismatch",
    "histogram_mismatch", "unknown_topic", "internal_error", "database_error", "malformed_cbor", "cbor_unsupported",
    "unknown_bundle",
)
ENCODINGS = ("json", "zlib", "cbor", "cbor-exact", "cbor-ref")   # telemetry payloads (docs/telemetry.md)
_CBOR_FLOATS = {"cbor": "half", "cbor-exact": "exact", "cbor-ref": "ref"}


class Rejected(Exception):
    """A message refused for ``reason`` (one of REASONS), with a human ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Message(NamedTuple):
    """A device message that passed validation: ``doc`` holds only known, bounded fields."""

    kind: str          # telemetry | status | bench
    fleet: str
    device_id: str
    doc: dict


# -- topics --------------------------------------------------------------------------------------

def topic(prefix: str, fleet: str, device: str, kind: str) -> str:
    """``<prefix>/<fleet>/<device>/<kind>`` (kind: telemetry, status, bench, ack, cmd, cmd/result)."""
    return f"{prefix}/{fleet}/{device}/{kind}"


def fleet_topic(prefix: str, fleet: str, kind: str = ALERTS) -> str:
    """``<prefix>/<fleet>/<kind>``: messages about a whole fleet (its open alerts)."""
    return f"{prefix}/{fleet}/{kind}"


def subscription(prefix: str, fleet: str, kind: str) -> str:
    """The filter for ``kind`` messages of every device of ``fleet`` ("+" for every fleet)."""
    return f"{prefix}/{fleet}/+/{kind}"


def parse_topic(name: str, prefix: str = DEFAULT_PREFIX, kinds: tuple[str, ...] = DEVICE_KINDS) -> tuple[str, str, str]:
    """(fleet, device, kind) of a device topic; raises Rejected for any other topic or a bad id."""
    parts = name.split("/", 3)
    if len(parts) != 4 or parts[0] != prefix or parts[3] not in kinds:
        raise Rejected("unknown_topic", f"topic {name[:200]!r} is not {prefix}/<fleet>/<device>/{'|'.join(kinds)}")
    for part, what in ((parts[1], "fleet"), (parts[2], "device id")):
        if not ID.match(part):
            raise Rejected("bad_string", f"{what} {part[:80]!r} in the topic is not a valid id")
    return parts[1], parts[2], parts[3]


# -- encoding ------------------------------------------------------------------------------------

def encode(doc: dict, compress: bool = False, encoding: str | None = None) -> bytes:
    """Compact UTF-8 JSON (NaN refused), zlib-compressed when asked (about 2.5x fewer bytes); ``encoding``
    (one of :data:`ENCODINGS`) overrides ``compress``: ``cbor``, ``cbor-exact`` and ``cbor-ref`` give
    edge_runtime.compact's form (``cbor-ref`` codes the moments against the window's bundle when it is
    registered with ``edge_runtime.compact.register_bundle``, on the device and on the monitor)."""
    encoding = encoding or ("zlib" if compress else "json")
    if encoding in _CBOR_FLOATS:
        from edge_runtime import compact

        return compact.encode(doc, _CBOR_FLOATS[encoding])
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS}, not {encoding!r}")
    raw = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    return zlib.compress(raw, 6) if encoding == "zlib" else raw


def decode(payload: bytes, max_bytes: int = MAX_PAYLOAD):
    """The JSON value of a payload (zlib-inflated when it is a zlib stream); raises Rejected."""
    if len(payload) > max_bytes:
        raise Rejected("oversized", f"{len(payload)} bytes is over the {max_bytes}-byte limit")
    if payload[:1] == b"\x78":     # a zlib stream (agents with --compress); JSON starts with '{'
        payload = _inflate(payload, max_bytes)
    elif payload[:1] == b"\xd9":   # compact CBOR (--encoding cbor): edge_runtime.compact
        from edge_runtime import compact

        return compact.decode(payload, max_bytes)
    try:
        text = payload.decode("utf-8")   # strict: no UTF-16 guessing, no invalid sequences
    except UnicodeDecodeError as exc:
        raise Rejected("malformed_json", f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return _loads(text)
    except RecursionError:
        raise Rejected("too_deep", "the payload nests deeper than the decoder allows") from None
    except ValueError as exc:     # also int strings over Python's digit limit
        raise Rejected("malformed_json", str(exc)[:100]) from None


try:        # the monitor's speed-up (about 3x faster decoding); a device without it uses json alone
    from orjson import JSONDecodeError as _FastError
    from orjson import dumps as _fast_dumps
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson comes with the monitor extra
    _fast_dumps = _fast_loads = None
_FAST_MAX_NESTING = 512    # orjson 3.8 crashes the process on input nested 100,000 deep: it sees none past this


def _loads(text: str):
    """``json.loads``, through orjson first when it is installed and the text cannot nest deeply (at most
    _FAST_MAX_NESTING brackets in all). Whatever orjson refuses (NaN, numbers past float64, lone surrogates)
    goes to json.loads, so results and refusals are the standard library's; the one difference left is an
    integer literal past 2**64, which orjson reads as a float (refused or accepted alike by the checks)."""
    if _fast_loads is not None and text.count("[") + text.count("{") <= _FAST_MAX_NESTING:
        try:
            return _fast_loads(text)
        except _FastError:
            pass
    return json.loads(text)


def _inflate(payload: bytes, max_bytes: int) -> bytes:
    """Decompress a zlib payload, refusing one that inflates past ``max_bytes`` (a zip bomb)."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, max_bytes + 1)
    except zlib.error as exc:
        raise Rejected("malformed_json", f"not JSON and not a valid zlib stream ({exc})") from None
    if len(out) > max_bytes or d.unconsumed_tail:
        raise Rejected("oversized", f"inflates past the {max_bytes}-byte limit")
    return out


# -- messages a device sends ---------------------------------------------------------------------

def telemetry_message(fleet: str, device_id: str, window: dict) -> dict:
    """The telemetry envelope around a closed window (the spool adds ``seq`` and ``dropped_windows``)."""
    return {"schema_version": SCHEMA_VERSION, "type": "telemetry", "device_id": device_id, "fleet": fleet, **window}


def status_message(fleet: str, device_id: str, online: bool, **fields) -> dict:
    """The retained status envelope."""
    return {"schema_version": SCHEMA_VERSION, "type": "status", "device_id": device_id, "fleet": fleet,
            "online": online, "ts": round(time.time(), 3), **fields}


def predictions_message(fleet: str, device_id: str, predictions: list[dict]) -> dict:
    """A batch of prediction records on ``<prefix>/<fleet>/<device>/predictions`` (or a webhook's body).

    Each record: ``id``, ``ts``, ``label`` and ``probabilities`` (classification) or ``values``,
    ``latency_ms`` and ``model`` (name, version, variant); see docs/telemetry.md. The monitor does not
    consume this topic: it is for whatever acts on the device's predictions.
    """
    return {"schema_version": SCHEMA_VERSION, "type": PREDICTIONS, "device_id": device_id, "fleet": fleet,
            "ts": round(time.time(), 3), "predictions": predictions}


def labels_message(labels: list[tuple[object, object]]) -> dict:
    """Ground truth for a device's earlier inputs, on ``<prefix>/<fleet>/<device>/labels`` (or a
    ``POST /feedback`` body): ``{"labels": [{"id": ..., "label": ...}, ...]}``, each ``id`` an input's id
    and each ``label`` its class name or index (see edge_runtime/labels.py)."""
    return {"schema_version": SCHEMA_VERSION, "type": LABELS,
            "labels": [{"id": i, "label": y} for i, y in labels]}


def parse_labels(payload: bytes, max_bytes: int = MAX_LABELS_PAYLOAD) -> list[tuple[object, object]]:
    """The (id, label) pairs of a labels message; raises Rejected for the whole message otherwise.

    >>> parse_labels(b'{"labels": [{"id": "bed-7", "label": "benign"}, {"id": 12, "label": 1}]}')
    [('bed-7', 'benign'), (12, 1)]
    >>> parse_labels(b'{"labels": [{"id": true, "label": 1}]}')
    Traceback (most recent call last):
    ...
    edge_runtime.wire.Rejected: bad_value: labels[0].id must be a string or an integer, got True
    """
    items = _labels_items(decode(payload, max_bytes))
    return [_label_pair(i, item) for i, item in enumerate(items)]


def _labels_items(doc) -> list:
    """The ``labels`` list of a labels message whose envelope checks out."""
    _labels_envelope(doc)
    items = doc.get("labels")
    if not isinstance(items, list) or len(items) > MAX_LABELS:
        raise Rejected("missing_field" if items is None else "bad_value",
                       f"labels must be a list of at most {MAX_LABELS} {{id, label}} objects")
    return items


def _labels_envelope(doc) -> None:
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}, not an object")
    if "schema_version" in doc and doc["schema_version"] != SCHEMA_VERSION:
        raise Rejected("schema_version", f"schema_version {_short(doc['schema_version'])} is not {SCHEMA_VERSION}")
    if "type" in doc and doc["type"] != LABELS:
        raise Rejected("wrong_type", f"type {_short(doc['type'])} is not {LABELS!r}")


def _label_pair(i: int, item) -> tuple[object, object]:
    if not isinstance(item, dict) or "id" not in item or "label" not in item:
        raise Rejected("bad_value", f"labels[{i}] must be an object with an id and a label")
    return _label_value(item["id"], f"labels[{i}].id"), _label_value(item["label"], f"labels[{i}].label")


def _label_value(v, field: str):
    """An input id or a label: a string of at most 128 characters (no NUL) or an integer from 0 to 2**53-1."""
    if type(v) is int:
        return _count(v, field)
    if isinstance(v, str):
        return _text(v, field, MAX_NAME, False)
    raise Rejected("bad_value", f"{field} must be a string or an integer, got {_short(v)}")


def ack_message(seqs: list[int], rejected: dict[int, str] | None = None, ts: float | None = None) -> dict:
    """What the monitor sends a device once windows are committed (stored, duplicate or quarantined).

    ``ranges`` are inclusive [first, last] runs of sequence numbers the device may forget.
    """
    return {"schema_version": SCHEMA_VERSION, "type": ACK, "ts": round(time.time(), 3) if ts is None else ts,
            "ranges": seq_ranges(seqs), "rejected": {str(k): v for k, v in (rejected or {}).items()}}


def encode_ack(seqs: list[int], rejected: dict[int, str] | None = None, ts: float | None = None) -> bytes:
    """:func:`ack_message`, encoded: the same JSON as :func:`encode` gives (orjson's when installed, as the
    monitor has it: a monitor encodes one per device and batch)."""
    doc = ack_message(seqs, rejected, ts)
    if _fast_dumps is not None:
        return _fast_dumps(doc)
    return encode(doc)


def seq_ranges(seqs) -> list[list[int]]:
    """Inclusive runs of sorted distinct sequence numbers.

    >>> seq_ranges([5, 1, 2, 3, 7, 6, 9])
    [[1, 3], [5, 7], [9, 9]]
    """
    out: list[list[int]] = []
    for s in sorted(set(seqs)):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        else:
            out.append([s, s])
    return out


def parse_ack(payload: bytes) -> list[tuple[int, int]]:
    """The committed ranges of an ack; raises Rejected (the agent ignores a bad ack: it just resends)."""
    doc = decode(payload, 64 * 1024)
    if not isinstance(doc, dict) or doc.get("type") != ACK or doc.get("schema_version") != SCHEMA_VERSION:
        raise Rejected("wrong_type", "not an ack message")
    ranges = doc.get("ranges")
    if not isinstance(ranges, list) or len(ranges) > 10_000:
        raise Rejected("bad_value", "ranges must be a list")
    return [_ack_range(r) for r in ranges]


def _ack_range(r) -> tuple[int, int]:
    if not (isinstance(r, list) and len(r) == 2):
        raise Rejected("bad_value", "a range is [first, last]")
    lo, hi = _count(r[0], "range"), _count(r[1], "range")
    if hi < lo:
        raise Rejected("bad_value", "a range ends before it starts")
    return lo, hi


# -- validation (the monitor) --------------------------------------------------------------------

def parse(name: str, payload: bytes, prefix: str = DEFAULT_PREFIX, max_bytes: int = MAX_PAYLOAD,
          now: float | None = None, max_skew: float = MAX_CLOCK_SKEW) -> Message:
    """Decode and check one device message; returns it canonical, or raises Rejected."""
    fleet, device, kind = parse_topic(name, prefix)
    doc = decode(payload, max_bytes)
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}, not an object")
    if kind == "bench":
        _ids(doc, fleet, device, required=False)
        return Message(kind, fleet, device, check_bench(doc))
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise Rejected("schema_version", f"schema_version {_short(doc.get('schema_version'))} is not {SCHEMA_VERSION}")
    if doc.get("type") != kind:
        raise Rejected("wrong_type", f"type {_short(doc.get('type'))} on a {kind} topic")
    _ids(doc, fleet, device)
    if kind == "telemetry":
        return Message(kind, fleet, device, check_telemetry(doc, now, max_skew))
    return Message(kind, fleet, device, check_status(doc))


def seq_of(payload: bytes, fleet: str, device: str, max_bytes: int = MAX_PAYLOAD) -> int | None:
    """The sequence number of a telemetry payload that failed validation, when it has a usable one and
    names the device and fleet of its topic (so the monitor can tell that device to stop resending it)."""
    try:
        doc = decode(payload, max_bytes)
    except Rejected:
        return None
    if not isinstance(doc, dict) or doc.get("device_id") != device or doc.get("fleet") != fleet:
        return None
    try:
        return _count(doc.get("seq"), "seq")
    except Rejected:
        return None


def _short(v) -> str:
    return repr(v)[:60]


def _ids(doc: dict, fleet: str, device: str, required: bool = True) -> None:
    for key, want, reason in (("device_id", device, "device_mismatch"), ("fleet", fleet, "fleet_mismatch")):
        if key not in doc:
            if required:
                raise Rejected("missing_field", f"no {key!r}")
            continue
        if doc[key] != want:
            raise Rejected(reason, f"{key} {_short(doc[key])} in the payload, {want!r} in the topic")


def _count(v, field: str) -> int:
    if type(v) is not int or v < 0 or v > MAX_INT:
        raise Rejected("bad_value", f"{field} must be an integer from 0 to 2**53-1, got {_short(v)}")
    return v


def _counts(v, field: str) -> list[int]:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise Rejected("bad_value", f"{field} must be a list of at most {MAX_LIST} counts")
    for c in v:   # fast path: every item a plain int in range (bool is not: type(True) is bool)
        if type(c) is not int or c < 0 or c > MAX_INT:
            break
    else:
        return v
    for i, c in enumerate(v):
        _count(c, f"{field}[{i}]")
    return v


def _number(v, field: str, nullable: bool = True, limit: float = MAX_ABS):
    if v is None and nullable:
        return None
    t = type(v)
    if t is int:
        if -limit <= v <= limit:      # an int compares with a float exactly, without converting
            return float(v)
    elif t is float and -limit <= v <= limit:    # False for NaN and the infinities too
        return v
    raise Rejected("bad_value", f"{field} must be a finite number within +-{limit:g}, got {_short(v)}")


def _numbers(v, field: str, limit: float = MAX_ABS) -> list:
    if not isinstance(v, list) or len(v) > MAX_LIST:
        raise Rejected("bad_value", f"{field} must be a list of at most {MAX_LIST} numbers")
    if _plain_numbers(v, limit):
        return v
    return [_number(x, f"{field}[{i}]", limit=limit) for i, x in enumerate(v)]


def _plain_numbers(v: list, limit: float) -> bool:
    """The fast path of _numbers: every item a float or an int within +-limit, or None."""
    for x in v:
        t = type(x)
        if t is float or t is int:
            if not -limit <= x <= limit:      # False for NaN and the infinities too
                return False
        elif x is not None:
            return False
    return True


def _text(v, field: str, limit: int = MAX_TEXT, nullable: bool = True) -> str | None:
    if v is None and nullable:
        return None
    if not isinstance(v, str) or len(v) > limit:
        raise Rejected("bad_string", f"{field} must be a string of at most {limit} characters, got {_short(v)}")
    if "\x00" in v:
        raise Rejected("bad_string", f"{field} contains a NUL character")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise Rejected("bad_string", f"{field} is not valid Unicode (a lone surrogate)") from None
    return v


def _object(v, field: str) -> dict:
    if not isinstance(v, dict):
        raise Rejected("bad_value", f"{field} must be an object")
    return v


def check_model(v, field: str = "model", required: bool = True) -> dict | None:
    """The ``model`` block: name and version (bounded), artifact, sha256 and variant."""
    if v is None and not required:
        return None
    m = _object(v, field)
    out = _model_names(m, field)
    out.update((k, _text(m[k], f"{field}.{k}")) for k in ("artifact", "sha256", "variant", "mode") if k in m)
    if "split" in m:
        out["split"] = _number(m["split"], f"{field}.split")
    return out


def _model_names(m: dict, field: str) -> dict:
    if not isinstance(m.get("name"), str) or not isinstance(m.get("version"), str):
        raise Rejected("bad_value", f"{field} must have a name and a version")
    out = {"name": _text(m["name"], f"{field}.name", MAX_NAME, False),
           "version": _text(m["version"], f"{field}.version", MAX_VERSION, False)}
    if not out["name"]:
        raise Rejected("bad_value", f"{field}.name is empty")
    return out


def check_telemetry(doc: dict, now: float | None = None, max_skew: float = MAX_CLOCK_SKEW) -> dict:
    """A telemetry window, canonical; raises Rejected."""
    for key in _TELEMETRY_REQUIRED:
        if key not in doc:
            raise Rejected("missing_field", f"no {key!r}")
    out = {"schema_version": SCHEMA_VERSION, "type": "telemetry", "device_id": doc["device_id"], "fleet": doc["fleet"],
           "seq": _count(doc["seq"], "seq")}
    out["start"] = _number(doc["start"], "start", False)
    out["end"] = _number(doc["end"], "end", False)
    _check_clock(out["start"], out["end"], now, max_skew)
    _window_counts(doc, out)
    count = out["count"]
    out["model"] = check_model(doc["model"])
    out["latency_ms"] = _latency(doc["latency_ms"], count)
    out["features"] = _features(doc["features"])
    out["predictions"] = _predictions(doc["predictions"], count)
    for key, check in _TELEMETRY_OPTIONAL:
        if key in doc:
            out[key] = check(doc[key], out)
    return out


_TELEMETRY_REQUIRED = ("seq", "start", "end", "model", "count", "errors", "latency_ms", "features", "predictions")


def _window_counts(doc: dict, out: dict) -> None:
    """count, errors and rejected (neither over count), dropped_windows, rejected_by and distinct."""
    count = out["count"] = _count(doc["count"], "count")
    out["errors"] = _count(doc["errors"], "errors")
    out["rejected"] = _count(doc.get("rejected", 0), "rejected")
    if out["errors"] > count or out["rejected"] > count:
        raise Rejected("bad_value", "more errors or rejected inputs than inferences")
    if "dropped_windows" in doc:
        out["dropped_windows"] = _count(doc["dropped_windows"], "dropped_windows")
    if "rejected_by" in doc:
        out["rejected_by"] = _reason_counts(doc["rejected_by"], out["rejected"])
    if "distinct" in doc:
        out["distinct"] = _registers(doc["distinct"])


def _outputs(v, out: dict) -> dict:
    o = _object(v, "outputs")
    return {k: _count(o.get(k, 0), f"outputs.{k}") for k in ("dropped", "failed")}


_TELEMETRY_OPTIONAL = (("agreement", lambda v, out: _agreement(v)), ("outputs", _outputs),
                       ("inputs_dropped", lambda v, out: _count(v, "inputs_dropped")),
                       ("labels", lambda v, out: _labels_block(v, out["predictions"])))


def _check_clock(start: float, end: float, now: float | None, max_skew: float) -> None:
    if end < start:
        raise Rejected("bad_value", "window ends before it starts")
    now = time.time() if now is None else now
    if end > now + max_skew:
        raise Rejected("clock_skew", f"window ends {end - now:.0f} s after the monitor's clock (limit {max_skew:g} s)")


def _latency(v, count: int) -> dict:
    lat = _object(v, "latency_ms")
    out = {"gamma": _number(lat.get("gamma"), "latency_ms.gamma", False)}
    if not 1 < out["gamma"] <= 10:
        raise Rejected("bad_value", "latency_ms.gamma must be > 1 and <= 10")
    offset = lat.get("offset")
    if type(offset) is not int or abs(offset) > 100_000:
        raise Rejected("bad_value", "latency_ms.offset must be an integer within +-100000")
    out["offset"] = offset
    out["counts"] = _counts(lat.get("counts"), "latency_ms.counts")
    if sum(out["counts"]) > count:
        raise Rejected("bad_value", f"{sum(out['counts'])} latencies for {count} inferences")
    out.update((k, _latency_figure(lat[k], k)) for k in ("min", "max", "sum", "p50", "p95", "p99") if k in lat)
    return out


def _latency_figure(v, k: str) -> float | None:
    x = _number(v, f"latency_ms.{k}", limit=MAX_M2 if k == "sum" else MAX_ABS)
    if x is not None and x < 0:
        raise Rejected("bad_value", f"latency_ms.{k} is negative")
    return x


def _registers(v) -> str:
    """``distinct``: the registers of the window's distinct-rows sketch (edge_runtime/distinct.py), as 64
    characters (0-9, A-Z, a-x: 0..59) or a list of 64 integers; canonical: the characters."""
    if type(v) is str and len(v) == DISTINCT_REGISTERS and _REGISTER_TEXT.match(v):
        return v
    if _register_list(v):
        return "".join(_DIGITS[r] for r in v)
    raise Rejected("bad_value", f"distinct must be {DISTINCT_REGISTERS} characters or integers, each "
                                f"register in 0..{DISTINCT_MAX_RANK}")


def _register_list(v) -> bool:
    return type(v) is list and len(v) == DISTINCT_REGISTERS and set(map(type, v)) == {int} \
        and min(v) >= 0 and max(v) <= DISTINCT_MAX_RANK


def _features(v) -> dict:
    f = _object(v, "features")
    n = _feature_lists(f)
    out = {"count": _counts(f["count"], "features.count"), "nan": _counts(f["nan"], "features.nan")}
    for key in ("mean", "min", "max"):
        out[key] = _numbers(f[key], f"features.{key}")
    out["m2"] = _numbers(f["m2"], "features.m2", MAX_M2)
    for i, v2 in enumerate(out["m2"]):
        if v2 is not None and v2 < -1e-6 * max(1.0, abs(v2)):
            raise Rejected("bad_value", f"features.m2[{i}] is negative")
    if "out_of_range" in f:
        out["out_of_range"] = _out_of_range(f["out_of_range"], n, out["count"])
    out["hist"] = _histograms(f["hist"], out["count"])
    return out


def _feature_lists(f: dict) -> int:
    """The number of features, when every per-feature list is a list of that length."""
    n = None
    for key in ("count", "nan", "mean", "m2", "min", "max", "hist"):
        if not isinstance(f.get(key), list):
            raise Rejected("missing_field" if key not in f else "bad_value", f"features.{key} must be a list")
        if n is None:
            n = len(f[key])
        elif len(f[key]) != n:
            raise Rejected("feature_count_mismatch", f"features.{key} has {len(f[key])} entries, features.count {n}")
    return n


def _out_of_range(v, n: int, count: list[int]) -> list[int]:
    oor = _counts(v, "features.out_of_range")
    if len(oor) != n or any(o > c for o, c in zip(oor, count, strict=True)):
        raise Rejected("bad_value", "features.out_of_range must have one count per feature, each at most "
                                    "its features.count")
    return oor


def _histograms(hists: list, count: list[int]) -> list[list[int]]:
    """Each feature's histogram: counts summing to its count, at most MAX_LIST bins in all."""
    out = []
    bins = 0
    for i, h in enumerate(hists):
        h = _counts(h, f"features.hist[{i}]")
        bins += len(h)
        if bins > MAX_LIST:
            raise Rejected("oversized", f"more than {MAX_LIST} histogram bins")
        if sum(h) != count[i]:
            raise Rejected("histogram_mismatch", f"features.hist[{i}] sums to {sum(h)}, features.count[{i}] is "
                                                 f"{count[i]}")
        out.append(h)
    return out


def _predictions(v, count: int) -> dict:
    p = _object(v, "predictions")
    out = {}
    for key, check in _PREDICTION_FIELDS:
        if key in p:
            out[key] = check(p[key], count)
    return out


def _class_counts(v, count: int) -> list[int]:
    out = _counts(v, "predictions.counts")
    if sum(out) > count:
        raise Rejected("bad_value", "more predictions than inferences")
    return out


def _confidence(v, count: int) -> list[int]:
    out = _counts(v, "predictions.confidence")
    if len(out) > 64 or sum(out) > count:
        raise Rejected("bad_value", "predictions.confidence has more than 64 bins or more counts than inferences")
    return out


_PREDICTION_FIELDS = (
    ("counts", _class_counts), ("hist", lambda v, count: _counts(v, "predictions.hist")), ("confidence", _confidence),
    ("count", lambda v, count: _count(v, "predictions.count")),
    *((k, lambda v, count, k=k: _number(v, f"predictions.{k}")) for k in ("mean", "min", "max")),
    ("m2", lambda v, count: _number(v, "predictions.m2", limit=MAX_M2)))


def _reason_counts(v, total: int) -> dict:
    d = _object(v, "rejected_by")
    if len(d) > 32:
        raise Rejected("bad_value", "rejected_by has more than 32 reasons")
    out = {_text(k, "rejected_by key", 32, False): _count(c, f"rejected_by.{str(k)[:32]}") for k, c in d.items()}
    if sum(out.values()) > total:
        raise Rejected("bad_value", "rejected_by counts more rejections than rejected")
    return out


def _agreement(v) -> dict:
    a = _object(v, "agreement")
    out = {"compared": _count(a.get("compared"), "agreement.compared"),
           "agreed": _count(a.get("agreed"), "agreement.agreed")}
    if "rate" in a:
        out["rate"] = _number(a["rate"], "agreement.rate", limit=1.0)
    if "max_abs_diff" in a:
        out["max_abs_diff"] = _number(a["max_abs_diff"], "agreement.max_abs_diff", False)
    return out


def _labels_block(v, predictions: dict) -> dict:
    """``labels``: ground truth joined since the previous window (``n``), as a confusion count matrix (rows
    the true class, columns the predicted one; square of the window's class count), ``unmatched`` labels
    that found no prediction and ``rejected`` ones that named no class or came malformed."""
    lab = _object(v, "labels")
    k = len(predictions.get("counts") or [])
    if not 2 <= k <= MAX_CLASSES:
        raise Rejected("bad_value", f"labels need a classifier's predictions.counts of 2 to {MAX_CLASSES} classes")
    confusion = _confusion(lab.get("confusion"), k)
    out = {"n": _count(lab.get("n"), "labels.n"), "confusion": confusion,
           "unmatched": _count(lab.get("unmatched", 0), "labels.unmatched")}
    if sum(map(sum, confusion)) != out["n"]:
        raise Rejected("bad_value", "labels.confusion does not sum to labels.n")
    if "rejected" in lab:
        out["rejected"] = _count(lab["rejected"], "labels.rejected")
    return out


def _confusion(rows, k: int) -> list[list[int]]:
    """A k x k confusion count matrix."""
    if not isinstance(rows, list) or len(rows) != k:
        raise Rejected("bad_value", f"labels.confusion must be a list of {k} rows (one per class)")
    out = []
    for i, row in enumerate(rows):
        row = _counts(row, f"labels.confusion[{i}]")
        if len(row) != k:
            raise Rejected("bad_value", f"labels.confusion[{i}] must have {k} counts (one per class)")
        out.append(row)
    return out


_STATUS_TEXT = ("runtime_version", "backend", "os_name")
_PLATFORM = ("machine", "system", "os", "release", "python", "board")


def check_status(doc: dict) -> dict:
    """A status message, canonical; raises Rejected. Its ``ts`` is informative only: the monitor
    judges a device's silence by when it received its messages."""
    for key in ("online", "ts"):
        if key not in doc:
            raise Rejected("missing_field", f"no {key!r}")
    out = {"schema_version": SCHEMA_VERSION, "type": "status", "device_id": doc["device_id"], "fleet": doc["fleet"],
           "online": _flag(doc["online"], "online"), "ts": _number(doc["ts"], "ts", False, limit=1e12)}
    _status_texts(doc, out)
    if doc.get("platform") is not None:
        out["platform"] = _platform(doc["platform"])
    if doc.get("free_disk_bytes") is not None:
        out["free_disk_bytes"] = _count(doc["free_disk_bytes"], "free_disk_bytes")
    if "accepts_flash" in doc:
        out["accepts_flash"] = _flag(doc["accepts_flash"], "accepts_flash")
    if doc.get("input") is not None:
        out["input"] = _status_input(doc["input"])
    return out


def _status_texts(doc: dict, out: dict) -> None:
    out.update((k, _text(doc[k], k)) for k in _STATUS_TEXT if k in doc)
    out.update((k, _status_model(doc[k], k)) for k in ("model", "second_model", "previous_model") if k in doc)


def _platform(v) -> dict:
    p = _object(v, "platform")
    out = {k: _text(p.get(k), f"platform.{k}") for k in _PLATFORM if k in p}
    if "cpu_count" in p:
        out["cpu_count"] = None if p["cpu_count"] is None else _count(p["cpu_count"], "cpu_count")
    return out


def _flag(v, field: str) -> bool:
    if not isinstance(v, bool):
        raise Rejected("bad_value", f"{field} must be true or false")
    return v


def _status_input(v) -> dict:
    """A status's ``input`` block: what the running bundle takes (kind, shape, dtype, values per sample)."""
    i = _object(v, "input")
    shape = _shape(i.get("shape"))
    kind = _text(i.get("kind"), "input.kind", 16)
    if kind not in (None, "tabular", "image", "tensor"):
        raise Rejected("bad_value", f"input.kind must be tabular, image or tensor, got {_short(kind)}")
    digest = _text(i.get("feature_names_sha256"), "input.feature_names_sha256", 64)
    return {"kind": kind, "shape": shape, "dtype": _text(i.get("dtype"), "input.dtype", 16),
            "features": None if i.get("features") is None else _count(i["features"], "input.features"),
            "feature_names_sha256": digest}


def _shape(shape) -> list[int]:
    if not isinstance(shape, list) or len(shape) > 8 or any(type(d) is not int or not -1 <= d <= MAX_INT
                                                            for d in shape):
        raise Rejected("bad_value", "input.shape must be a list of at most 8 integers from -1 up")
    return shape


def _status_model(v, field: str) -> dict | None:
    """A status's model block may be partial (name None before a bundle is known)."""
    if v is None:
        return None
    m = _object(v, field)
    if m.get("name") is None:
        return {k: None for k in ("name", "version")}
    return check_model(m, field)


_BENCH_RESULT_TEXT = ("artifact", "bundle", "bundle_version", "quantization", "backend", "backend_version",
                      "recommended", "provider", "delegate")


def check_bench(doc: dict) -> dict:
    """An ``edgeops bench --publish`` result, canonical: per result its bundle, version, artifact and latency."""
    results = doc.get("results")
    if not isinstance(results, list) or len(results) > 256:
        raise Rejected("bad_value", "results must be a list of at most 256 benchmark results")
    out = {"type": "bench", "results": [_bench_result(i, r) for i, r in enumerate(results)]}
    if isinstance(doc.get("machine"), dict):
        out["machine"] = _machine(doc["machine"])
    out.update((k, doc[k]) for k in ("device_id", "fleet") if k in doc)
    out.update((k, _number(doc[k], k, limit=1e12)) for k in ("ts", "created_at") if type(doc.get(k)) in (int, float))
    return out


def _short_key(k, limit: int) -> bool:
    return isinstance(k, str) and len(k) <= limit


def _machine(m: dict) -> dict:
    """At most 64 scalar facts about the benchmark's machine."""
    return {k: _scalar(v, f"machine.{k}") for k, v in list(m.items())[:64]
            if _short_key(k, 64) and (v is None or type(v) in (str, int, float, bool))}


def _bench_result(i: int, r) -> dict:
    """One benchmark result: its texts, its other numbers and its latency figures (at most 32)."""
    r = _object(r, f"results[{i}]")
    item = {k: _scalar(r[k], f"results[{i}].{k}") for k in _BENCH_RESULT_TEXT if k in r}
    item.update((k, _number(v, f"results[{i}].{k}", limit=MAX_M2)) for k, v in r.items()
                if k not in item and _short_key(k, 64) and (v is None or type(v) in (int, float)))
    if r.get("latency_ms") is not None:
        item["latency_ms"] = _bench_latency(i, r["latency_ms"])
    return item


def _bench_latency(i: int, v) -> dict:
    lat = _object(v, f"results[{i}].latency_ms")
    return {k: _number(x, f"results[{i}].latency_ms.{k}") for k, x in list(lat.items())[:32] if _short_key(k, 32)}


def _scalar(v, field: str):
    if isinstance(v, str) or v is None:
        return _text(v, field)
    if isinstance(v, bool):
        return v
    return _number(v, field)

