"""Validation of device messages: every message is accepted or rejected for one named reason.

Follows ``edge_runtime/schemas/telemetry.schema.json`` in plain Python: the
monitor validates thousands of windows a second, which a generic JSON Schema
validator does not (a test checks both agree). Checks against the bundle's
reference profile (feature count, histogram lengths) come on top.
"""

from __future__ import annotations

import json
import zlib
import math
import re
from dataclasses import dataclass

SCHEMA_VERSION = 1
MAX_PAYLOAD = 256 * 1024
ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

REASONS = (
    "oversized", "malformed_json", "not_an_object", "schema_version", "wrong_type", "missing_field", "bad_value",
    "device_mismatch", "fleet_mismatch", "feature_count_mismatch", "histogram_mismatch", "unknown_topic",
)


class Rejected(Exception):
    """A message refused for ``reason`` (one of REASONS), with a human ``detail``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Message:
    kind: str          # telemetry | status | bench
    fleet: str
    device_id: str
    doc: dict


def parse_topic(topic: str, prefix: str = "edgeops") -> tuple[str, str, str]:
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != prefix or parts[3] not in ("telemetry", "status", "bench"):
        raise Rejected("unknown_topic", f"topic {topic!r} is not {prefix}/<fleet>/<device>/telemetry|status|bench")
    return parts[1], parts[2], parts[3]


def parse(topic: str, payload: bytes, prefix: str = "edgeops", max_bytes: int = MAX_PAYLOAD) -> Message:
    """Decode and check one message; raises Rejected."""
    fleet, device, kind = parse_topic(topic, prefix)
    if len(payload) > max_bytes:
        raise Rejected("oversized", f"{len(payload)} bytes is over the {max_bytes}-byte limit")
    if payload[:1] == b"\x78":     # a zlib stream (agents with --compress); JSON starts with '{'
        payload = _inflate(payload, max_bytes)
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise Rejected("malformed_json", str(exc)[:100]) from None
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a JSON {type(doc).__name__}, not an object")
    if kind == "bench":
        _ids(doc, fleet, device, required=False)
        return Message(kind, fleet, device, doc)
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise Rejected("schema_version", f"schema_version {doc.get('schema_version')!r} is not {SCHEMA_VERSION}")
    if doc.get("type") != kind:
        raise Rejected("wrong_type", f"type {doc.get('type')!r} on a {kind} topic")
    _ids(doc, fleet, device)
    if kind == "telemetry":
        check_telemetry(doc)
    else:
        check_status(doc)
    return Message(kind, fleet, device, doc)


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


def _ids(doc: dict, fleet: str, device: str, required: bool = True) -> None:
    for key, want, reason in (("device_id", device, "device_mismatch"), ("fleet", fleet, "fleet_mismatch")):
        if key not in doc:
            if required:
                raise Rejected("missing_field", f"no {key!r}")
            continue
        if doc[key] != want:
            raise Rejected(reason, f"{key} {doc[key]!r} in the payload, {want!r} in the topic")


def _count(v, field: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise Rejected("bad_value", f"{field} must be a non-negative integer, got {v!r}")
    return v


def _counts(v, field: str) -> list[int]:
    if not isinstance(v, list):
        raise Rejected("bad_value", f"{field} must be a list of counts")
    for c in v:   # fast path: every item a plain non-negative int (bool is not: type(True) is bool)
        if type(c) is not int or c < 0:
            break
    else:
        return v
    for i, c in enumerate(v):
        _count(c, f"{field}[{i}]")
    return v


def _number(v, field: str, nullable: bool = True) -> None:
    if v is None and nullable:
        return
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Rejected("bad_value", f"{field} must be a finite number, got {v!r}")


def _numbers_ok(v: list) -> bool:
    """True when every item is None, an int or a finite float (the common case, checked fast)."""
    for x in v:
        t = type(x)
        if t is float:
            if x - x != 0.0:      # inf - inf and nan - nan are nan
                return False
        elif t is not int and x is not None:
            return False
    return True


def check_telemetry(doc: dict) -> None:
    for key in ("seq", "start", "end", "model", "count", "errors", "latency_ms", "features", "predictions"):
        if key not in doc:
            raise Rejected("missing_field", f"no {key!r}")
    _count(doc["seq"], "seq")
    _number(doc["start"], "start", False)
    _number(doc["end"], "end", False)
    if doc["end"] < doc["start"]:
        raise Rejected("bad_value", "window ends before it starts")
    count = _count(doc["count"], "count")
    if _count(doc["errors"], "errors") > count or _count(doc.get("rejected", 0), "rejected") > count:
        raise Rejected("bad_value", "more errors or rejected inputs than inferences")
    model = doc["model"]
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not isinstance(model.get("version"), str):
        raise Rejected("bad_value", "model must have a name and a version")
    lat = doc["latency_ms"]
    if not isinstance(lat, dict):
        raise Rejected("bad_value", "latency_ms must be an object")
    _number(lat.get("gamma"), "latency_ms.gamma", False)
    if lat["gamma"] <= 1:
        raise Rejected("bad_value", "latency_ms.gamma must be > 1")
    if not isinstance(lat.get("offset"), int):
        raise Rejected("bad_value", "latency_ms.offset must be an integer")
    lat_n = sum(_counts(lat.get("counts"), "latency_ms.counts"))
    for k in ("min", "max", "p50", "p95", "p99"):
        _number(lat.get(k), f"latency_ms.{k}")
        if lat.get(k) is not None and lat[k] < 0:
            raise Rejected("bad_value", f"latency_ms.{k} is negative")
    if lat_n > count:
        raise Rejected("bad_value", f"{lat_n} latencies for {count} inferences")
    f = doc["features"]
    if not isinstance(f, dict):
        raise Rejected("bad_value", "features must be an object")
    n = None
    for key in ("count", "nan", "mean", "m2", "min", "max", "hist"):
        if not isinstance(f.get(key), list):
            raise Rejected("missing_field" if key not in f else "bad_value", f"features.{key} must be a list")
        if n is None:
            n = len(f[key])
        elif len(f[key]) != n:
            raise Rejected("feature_count_mismatch", f"features.{key} has {len(f[key])} entries, features.count {n}")
    _counts(f["count"], "features.count")
    _counts(f["nan"], "features.nan")
    for key in ("mean", "m2", "min", "max"):
        if not _numbers_ok(f[key]):
            for i, v in enumerate(f[key]):
                _number(v, f"features.{key}[{i}]")
    for i, v in enumerate(f["m2"]):
        if v is not None and v < -1e-6 * max(1.0, abs(v)):
            raise Rejected("bad_value", f"features.m2[{i}] is negative")
    for i, h in enumerate(f["hist"]):
        if sum(_counts(h, f"features.hist[{i}]")) != f["count"][i]:
            raise Rejected("histogram_mismatch", f"features.hist[{i}] sums to {sum(h)}, features.count[{i}] is {f['count'][i]}")
    p = doc["predictions"]
    if not isinstance(p, dict):
        raise Rejected("bad_value", "predictions must be an object")
    if "counts" in p and sum(_counts(p["counts"], "predictions.counts")) > count:
        raise Rejected("bad_value", "more predictions than inferences")


def check_against_profile(doc: dict, profile: dict | None, labels: list | None) -> None:
    """Feature count and histogram lengths must match the bundle the window claims to come from."""
    if not profile:
        return
    feats = profile.get("features") or []
    f = doc["features"]
    if len(f["count"]) != len(feats):
        raise Rejected("feature_count_mismatch", f"{len(f['count'])} features, the bundle's profile has {len(feats)}")
    for i, (h, ref) in enumerate(zip(f["hist"], feats)):
        if len(h) != len(ref["bin_edges"]) + 1:
            raise Rejected("histogram_mismatch",
                           f"features.hist[{i}] has {len(h)} bins, the profile's {ref['name']!r} has {len(ref['bin_edges']) + 1}")
    counts = doc["predictions"].get("counts")
    if labels and counts is not None and len(counts) != len(labels):
        raise Rejected("histogram_mismatch", f"predictions.counts has {len(counts)} classes, the bundle {len(labels)}")


def check_status(doc: dict) -> None:
    for key in ("online", "ts"):
        if key not in doc:
            raise Rejected("missing_field", f"no {key!r}")
    if not isinstance(doc["online"], bool):
        raise Rejected("bad_value", "online must be true or false")
    _number(doc["ts"], "ts", False)
