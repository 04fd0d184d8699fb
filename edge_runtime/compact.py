"""The compact binary form of a telemetry window: CBOR with integer keys, packed counts and small floats.

``edgeops run --encoding cbor`` publishes each window as::

    d9 d9 f7 | one CBOR map                     (tag 55799, "self-described CBOR", as a 3-byte marker)

The monitor tells the encodings apart by the first byte: ``{`` JSON, ``x`` (0x78) zlib, 0xd9 CBOR.
:func:`decode` turns the map back into the same JSON document the window was built as (so
:func:`edge_runtime.wire.parse` validates it with the same code), except for the float rounding
below. The layout (see docs/telemetry.md, "Compact windows"):

- Top-level fields the codec knows get small integer keys (:data:`NAMES`); ``type`` is a small int;
  ``start`` is integer milliseconds and ``end`` milliseconds after it, when they are whole milliseconds.
- ``model``: integer keys; a 64-character hex ``sha256`` travels as its 32 bytes.
- ``latency_ms``: ``gamma`` only when not 1.05; ``counts`` packed; ``min``/``max``/``sum`` as a
  six-digit float vector; ``p50``/``p95``/``p99`` left out when the monitor can recompute them
  from the counts exactly as the device did (:class:`edge_runtime.stats.LatencyHistogram`).
- ``features``: per-feature counts as one int when all equal, NaN counts left out when all zero,
  histograms as the deviation of each bin from ``count // bins`` (zigzag, packed in nibbles), the
  last bin of each histogram left out (it is ``count`` minus the others, which validation demands
  anyway), and the moments as float vectors: ``half`` (the default) sends ``min`` in IEEE half
  precision, ``max`` and ``mean`` as half-precision offsets from that ``min`` and the square root
  of ``m2`` in half precision; ``exact`` sends all four in single precision, re-rounded to six
  significant digits on decoding (which gives back exactly the JSON value). A value a half (a
  single) cannot carry travels in an escape list in single precision (exactly).
- ``predictions``: integer keys (:data:`PREDICTION_KEYS`).
- A *packed* int list is a byte string: a scheme byte (0: LEB128 varints, 1: nibbles with 15 as
  escape, the escaped values as varints after the nibbles, 2: sparse, a varint pair per non-zero
  entry: the zeros before it and the value minus one), the count as a varint, the data.
  Anywhere else in the document, a CBOR byte string means such a list of non-negative ints.
- Any field or block the codec has no compact form for (a block another version adds, a block that
  breaks an assumption above) goes as a generic CBOR map under its text key: nothing is lost.

Half precision keeps 11 significant bits: ``min`` within 2**-11 (0.05%) of its value, ``mean`` and
``max`` within 2**-11 of their distance from ``min``, ``m2`` within 2**-10 of its value. Counts,
histograms, ids, the model block, timestamps and latency figures are exact.

>>> win = {"schema_version": 1, "type": "telemetry", "device_id": "d", "fleet": "f", "seq": 3,
...        "start": 10.0, "end": 20.5, "model": {"name": "m", "version": "1"}, "count": 4, "errors": 0,
...        "latency_ms": {"gamma": 1.05, "offset": 3, "counts": [4], "min": 1.1, "max": 1.1, "sum": 4.4},
...        "features": {"count": [4], "nan": [0], "mean": [0.5], "m2": [1.0], "min": [0.0], "max": [1.0],
...                     "hist": [[2, 2]]}, "predictions": {"counts": [1, 3]}}
>>> decode(encode(win)) == win
True
"""

from __future__ import annotations

import bisect
import itertools
import math
import struct

import numpy as np

from edge_runtime import cbor
from edge_runtime.wire import MAX_LIST, MAX_PAYLOAD, Rejected

MAGIC = b"\xd9\xd9\xf7"         # tag 55799: the payload is CBOR
FLOATS = ("half", "exact")
DEFAULT_GAMMA = 1.05
TYPES = ("telemetry", "status", "bench")

# top-level keys whose value travels as it is, under a small integer
NAMES = {0: "schema_version", 1: "type", 2: "device_id", 3: "fleet", 4: "seq", 8: "count", 9: "errors",
         10: "rejected", 13: "predictions", 14: "dropped_windows", 15: "inputs_dropped", 16: "rejected_by",
         17: "outputs", 18: "agreement"}
KEYS = {name: k for k, name in NAMES.items()}
K_START, K_END, K_MODEL, K_LATENCY, K_FEATURES, K_PREDICTIONS = 5, 6, 7, 11, 12, 13
PREDICTION_KEYS = ("counts", "confidence", "hist", "count", "mean", "m2", "min", "max")
MODEL_KEYS = ("name", "version", "artifact", "sha256", "variant", "mode", "split")
_HEX = frozenset("0123456789abcdef")


class _NoCompact(Exception):
    """A block breaks an assumption of its compact form: it goes generic."""


# -- packed non-negative int lists ---------------------------------------------------------------

def _varint(v: int, out: bytearray) -> None:
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def pack_ints(values) -> bytes:
    """A list of non-negative ints as bytes: varints or nibbles, whichever is shorter.

    >>> pack_ints([3, 0, 1, 2, 40]).hex(), unpack_ints(pack_ints([3, 0, 1, 2, 40]))
    ('01053012f019', [3, 0, 1, 2, 40])
    """
    vals = [int(v) for v in values]
    var = bytearray((0,))
    _varint(len(vals), var)
    for v in vals:
        if v < 0:
            raise _NoCompact("a negative count")
        _varint(v, var)
    nib = bytearray((1,))
    _varint(len(vals), nib)
    codes = [min(v, 15) for v in vals] + [0] * (len(vals) & 1)
    nib += bytes(codes[i] << 4 | codes[i + 1] for i in range(0, len(codes), 2))
    for v in vals:
        if v >= 15:
            _varint(v - 15, nib)
    sparse = bytearray((2,))
    _varint(len(vals), sparse)
    last = -1
    for i, v in enumerate(vals):
        if v:
            _varint(i - last - 1, sparse)
            _varint(v - 1, sparse)
            last = i
    return bytes(min((var, nib, sparse), key=len))


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i + 1
        shift += 7
    raise Rejected("malformed_cbor", "a packed list ends inside a varint (or one is over 10 bytes)")


def unpack_ints(buf: bytes, max_items: int = MAX_LIST) -> list[int]:
    """The list :func:`pack_ints` packed; raises Rejected for a truncated, oversized or unknown packing."""
    if len(buf) < 2 or buf[0] > 2:
        raise Rejected("malformed_cbor", "a packed list needs a scheme byte (0, 1 or 2) and a length")
    n, pos = _read_varint(buf, 1)
    if buf[0] == 2:
        return _unpack_sparse(buf, pos, n, max_items)
    if n > max_items or n > 2 * (len(buf) - pos):
        raise Rejected("oversized" if n > max_items else "malformed_cbor",
                       f"a packed list of {n} items in {len(buf) - pos} bytes")
    if buf[0] == 0:
        out = []
        for _ in range(n):
            v, pos = _read_varint(buf, pos)
            out.append(v)
    else:
        m = (n + 1) // 2
        if pos + m > len(buf):
            raise Rejected("malformed_cbor", f"a packed list of {n} nibbles in {len(buf) - pos} bytes")
        out = list(itertools.chain.from_iterable(map(_NIBBLES.__getitem__, buf[pos:pos + m])))[:n]
        pos += m
        i = out.index(15) if 15 in out else -1
        while i >= 0:
            v, pos = _read_varint(buf, pos)
            out[i] = 15 + v
            try:
                i = out.index(15, i + 1)
            except ValueError:
                i = -1
    if pos != len(buf):
        raise Rejected("malformed_cbor", f"{len(buf) - pos} bytes after a packed list")
    return out


def _unpack_sparse(buf: bytes, pos: int, n: int, max_items: int) -> list[int]:
    """Scheme 2: pairs (zeros skipped, value - 1) for the non-zero entries of a list of ``n``."""
    if n > max_items:
        raise Rejected("oversized", f"a packed list of {n} items")
    out = [0] * n
    i = -1
    while pos < len(buf):
        gap, pos = _read_varint(buf, pos)
        v, pos = _read_varint(buf, pos)
        i += gap + 1
        if i >= n:
            raise Rejected("malformed_cbor", f"a sparse packed list puts an entry past its {n} items")
        out[i] = v + 1
    return out


_NIBBLES = [(b >> 4, b & 15) for b in range(256)]


def _zigzag(d: int) -> int:
    return 2 * d if d >= 0 else -2 * d - 1


def _unzigzag(z: int) -> int:
    return z >> 1 if not z & 1 else -((z + 1) >> 1)


_UNZIGZAG = [_unzigzag(z) for z in range(512)]


def _ints(v) -> list[int]:
    if not isinstance(v, list) or any(type(x) is not int or x < 0 for x in v):
        raise _NoCompact("not a list of non-negative ints")
    return v


def _uniform(values: list[int]):
    """One int when every entry is the same (and there is at least one), else the packed list."""
    return values[0] if values and values.count(values[0]) == len(values) else pack_ints(values)


def _expand_uniform(v, n: int, what: str) -> list[int]:
    if type(v) is int:
        return [v] * n
    out = unpack_ints(_bytes(v, what))
    if len(out) != n:
        raise Rejected("feature_count_mismatch", f"{what} has {len(out)} entries for {n} features")
    return out


def _bytes(v, what: str) -> bytes:
    if type(v) is not bytes:
        raise Rejected("malformed_cbor", f"{what} must be a byte string")
    return v


# -- float vectors ------------------------------------------------------------------------------

def round6(x: float) -> float:
    return float(f"{x:.6g}")


def _half_fits(v: float) -> bool:
    a = abs(v)
    return a == 0.0 or 2.0**-14 <= a <= 65504.0


def _pack_half(values: list[float], escapes: list) -> bytes:
    """Half precision; a value out of its normal range escapes in single precision (or double beyond)."""
    arr = np.array(values, dtype=np.float64)
    ok = np.array([_half_fits(v) for v in values], dtype=bool) if values else np.zeros(0, dtype=bool)
    with np.errstate(over="ignore"):
        half = arr.astype(np.float16)
    half[~ok] = np.inf
    for v, good in zip(values, ok.tolist(), strict=True):
        if not good:
            single = float(np.float32(v)) if 1.2e-38 < abs(v) < 3.0e38 else float(v)
            escapes.append(single)
    return half.astype("<f2").tobytes()


def _pack_single6(values: list[float], escapes: list) -> bytes:
    """Single precision, where re-rounding to six significant digits gives the value back exactly."""
    out = np.empty(len(values), dtype="<f4")
    for i, v in enumerate(values):
        if v is None:
            out[i] = np.nan
            continue
        s = np.float32(v) if abs(v) < 3.0e38 else np.float32(np.inf)
        if math.isfinite(s) and round6(float(s)) == v:
            out[i] = s
        else:
            out[i] = np.inf
            escapes.append(float(v))
    return out.tobytes()


def _unpack_floats(raw: bytes, dtype: str, n: int, escapes: list, used: list[int]) -> tuple[np.ndarray, list]:
    """The values of a float vector, escaped ones substituted, and the escaped positions."""
    if len(raw) != n * np.dtype(dtype).itemsize:
        raise Rejected("malformed_cbor", f"a float vector of {len(raw)} bytes for {n} values")
    arr = np.frombuffer(raw, dtype=dtype).astype(np.float64)
    if used[0] >= len(escapes):     # nothing left to substitute: an infinity stays one (validation refuses it)
        return arr, []
    escaped = np.flatnonzero(np.isinf(arr)).tolist()
    for i in escaped:
        if used[0] >= len(escapes):
            raise Rejected("malformed_cbor", "more escaped floats than the escape list holds")
        x = escapes[used[0]]
        if type(x) not in (int, float):
            raise Rejected("malformed_cbor", "an escaped float is not a number")
        arr[i] = x
        used[0] += 1
    return arr, escaped


def _six(arr: np.ndarray, escaped: list) -> list:
    """Single-precision values re-rounded to six significant digits (escaped ones as sent, NaN: None)."""
    out = [None if x != x else round6(x) for x in arr.tolist()]
    for i in escaped:
        out[i] = float(arr[i])
    return out


def _floats6(values: list) -> list:
    """A six-digit float vector (None allowed): [single-precision bytes, escapes]."""
    escapes: list = []
    return [_pack_single6(values, escapes), escapes]


def _unfloats6(v, what: str) -> list:
    if not (isinstance(v, list) and len(v) == 2 and isinstance(v[1], list)):
        raise Rejected("malformed_cbor", f"{what} must be [bytes, escapes]")
    raw = _bytes(v[0], what)
    used = [0]
    if not v[1] and len(raw) % 4 == 0:     # the usual case, a few values and no escapes: no numpy round trip
        return [None if x != x else round6(x) for x in struct.unpack(f"<{len(raw) // 4}f", raw)]
    out = _six(*_unpack_floats(raw, "<f4", len(raw) // 4, v[1], used))
    if used[0] != len(v[1]):
        raise Rejected("malformed_cbor", f"{what}: unused escaped floats")
    return out


# -- encoding -----------------------------------------------------------------------------------

def _generic(v):
    """A JSON value as CBOR-ready data: lists of 4+ non-negative ints packed into byte strings."""
    if isinstance(v, dict):
        return {str(k): _generic(x) for k, x in v.items()}
    if isinstance(v, list):
        if len(v) >= 4 and all(type(x) is int and x >= 0 for x in v):
            return pack_ints(v)
        return [_generic(x) for x in v]
    return v


def _model(m) -> dict:
    if not isinstance(m, dict):
        raise _NoCompact("model is not an object")
    out: dict = {}
    for k, v in m.items():
        if k in MODEL_KEYS:
            i = MODEL_KEYS.index(k)
            if k == "sha256" and isinstance(v, str) and len(v) == 64 and _HEX.issuperset(v):
                v = bytes.fromhex(v)
            out[i] = _generic(v)
        else:
            out[str(k)] = _generic(v)
    return out


def _latency(lat) -> dict:
    if not isinstance(lat, dict) or type(lat.get("offset")) is not int or not isinstance(lat.get("gamma"), float):
        raise _NoCompact("latency_ms without a float gamma and an int offset")
    out: dict = {1: lat["offset"], 2: pack_ints(_ints(lat.get("counts")))}
    if lat["gamma"] != DEFAULT_GAMMA:
        out[0] = lat["gamma"]
    scalars = [k for k in ("min", "max", "sum") if k in lat]
    if scalars != ["min", "max", "sum"] or any(lat[k] is not None and type(lat[k]) is not float for k in scalars):
        raise _NoCompact("latency_ms.min/max/sum missing or not floats")
    out[3] = _floats6([lat["min"], lat["max"], lat["sum"]])
    qs = {k: lat[k] for k in ("p50", "p95", "p99") if k in lat}
    if len(qs) == 3 and _quantiles(lat) == qs:
        out[9] = True
    elif qs:
        out[4] = [qs.get(k) for k in ("p50", "p95", "p99")]
        out[5] = [k in qs for k in ("p50", "p95", "p99")]
    extra = set(lat) - {"gamma", "offset", "counts", "min", "max", "sum", "p50", "p95", "p99"}
    for k in extra:
        out[str(k)] = _generic(lat[k])
    return out


def _quantiles(lat: dict) -> dict:
    """p50, p95 and p99 from the counts as edge_runtime.stats.LatencyHistogram computes them: the geometric
    middle of the quantile's bucket, clamped to [min, max], six digits. (Should the two ever differ, the
    encoder, which compares, sends the device's values instead.)"""
    counts, gamma, offset = lat["counts"], float(lat["gamma"]), int(lat["offset"])
    cum = list(itertools.accumulate(counts))
    total = cum[-1] if cum else 0
    if total == 0:
        return {"p50": None, "p95": None, "p99": None}
    lo = float(lat["min"]) if lat.get("min") is not None else math.inf
    hi = float(lat["max"]) if lat.get("max") is not None else 0.0
    out = {}
    for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        i = bisect.bisect_left(cum, q * total)
        value = hi if i >= len(cum) else min(max(gamma ** (offset + i - 0.5), lo), hi)
        out[name] = round6(value)
    return out


def _features(f, floats: str) -> dict:  # noqa: C901 - each assumption of the compact form checked
    if not isinstance(f, dict):
        raise _NoCompact("features is not an object")
    count, nan = _ints(f.get("count")), _ints(f.get("nan"))
    n = len(count)
    cols = [f.get(k) for k in ("min", "max", "mean", "m2")]
    hist = f.get("hist")
    if any(not isinstance(c, list) or len(c) != n for c in cols + [nan, hist]):
        raise _NoCompact("features lists of different lengths")
    out: dict = {0: n, 1: _uniform(count)}
    if any(nan):
        out[2] = _uniform(nan)
    lengths, devs = [], []
    for h, c in zip(hist, count, strict=True):
        h = _ints(h)
        if not h or sum(h) != c:
            raise _NoCompact("a histogram that does not sum to its count")
        lengths.append(len(h))
        e = c // len(h)
        devs.extend(_zigzag(x - e) for x in h[:-1])
    out[3], out[4] = _uniform(lengths), pack_ints(devs)
    nulls = [j for j in range(n) if cols[0][j] is None]
    for j in range(n):
        present = [c[j] is not None for c in cols]
        if any(present) != all(present) or (present[0] and any(type(c[j]) not in (int, float) for c in cols)):
            raise _NoCompact("moments partly null or not numbers")
    if nulls:
        out[9] = pack_ints(nulls)
    keep = [j for j in range(n) if cols[0][j] is not None]
    lo, hi, mean, m2 = ([float(c[j]) for j in keep] for c in cols)
    escapes: list = []
    if floats == "half":
        lo_q = [float(np.float16(v)) if _half_fits(v) else v for v in lo]
        vectors = [_pack_half(lo, escapes), _pack_half([a - b for a, b in zip(hi, lo_q, strict=True)], escapes),
                   _pack_half([a - b for a, b in zip(mean, lo_q, strict=True)], escapes),
                   _pack_half([math.copysign(math.sqrt(abs(v)), v) for v in m2], escapes)]
    else:
        out[6] = 1
        vectors = [_pack_single6(v, escapes) for v in (lo, hi, mean, m2)]
    out[5] = b"".join(vectors)
    if escapes:
        out[7] = escapes
    if "out_of_range" in f:
        out[8] = _uniform(_ints(f["out_of_range"]))
    for k in set(f) - {"count", "nan", "mean", "m2", "min", "max", "hist", "out_of_range"}:
        out[str(k)] = _generic(f[k])
    return out


def _compact_block(out: dict, key: int, name: str, build, value, *args) -> None:
    try:
        out[key] = build(value, *args)
    except (_NoCompact, TypeError, ValueError, OverflowError):
        out[name] = _generic(value)


def encode(doc: dict, floats: str = "half") -> bytes:
    """A telemetry window (or any JSON object) in the compact form; ``floats``: half or exact."""
    if floats not in FLOATS:
        raise ValueError(f"floats must be one of {FLOATS}, not {floats!r}")
    out: dict = {}
    ms = _millis(doc.get("start")), _millis(doc.get("end"))
    for k, v in doc.items():
        if k == "type" and v in TYPES:
            out[1] = TYPES.index(v)
        elif k == "start" and ms[0] is not None:
            out[K_START] = ms[0]
        elif k == "end" and None not in ms and ms[1] >= ms[0]:
            out[K_END] = ms[1] - ms[0]
        elif k == "model":
            _compact_block(out, K_MODEL, k, _model, v)
        elif k == "latency_ms":
            _compact_block(out, K_LATENCY, k, _latency, v)
        elif k == "features":
            _compact_block(out, K_FEATURES, k, _features, v, floats)
        elif k == "predictions" and isinstance(v, dict):
            out[K_PREDICTIONS] = {PREDICTION_KEYS.index(pk) if pk in PREDICTION_KEYS else str(pk): _generic(pv)
                                  for pk, pv in v.items()}
        elif k in KEYS:
            out[KEYS[k]] = _generic(v)
        else:
            out[str(k)] = _generic(v)
    return MAGIC + cbor.dumps(out)


def _millis(t) -> int | None:
    """Whole milliseconds of a timestamp when ``ms / 1000`` gives it back exactly."""
    if type(t) is not float or not 0 <= t < 1e13:
        return None
    ms = round(t * 1000)
    return ms if ms / 1000 == t else None


# -- decoding -----------------------------------------------------------------------------------

def _json(v):
    """A decoded generic value as JSON would give it (byte strings: packed int lists)."""
    if type(v) is bytes:
        return unpack_ints(v)
    if isinstance(v, dict):
        if any(type(k) is not str for k in v):
            raise Rejected("malformed_cbor", "a generic map with a non-text key")
        return {k: _json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json(x) for x in v]
    return v


def _text_key(k) -> str:
    if type(k) is not str:
        raise Rejected("malformed_cbor", f"unknown key {str(k)[:20]} in a compact block")
    return k


def _un_model(m) -> dict:
    if not isinstance(m, dict):
        raise Rejected("malformed_cbor", "the compact model block must be a map")
    out = {}
    for k, v in m.items():
        if type(k) is int:
            if not 0 <= k < len(MODEL_KEYS):
                raise Rejected("malformed_cbor", f"unknown model key {k}")
            out[MODEL_KEYS[k]] = v.hex() if k == 3 and type(v) is bytes else _json(v)
        else:
            out[k] = _json(v)
    return out


def _un_latency(lat) -> dict:
    if not isinstance(lat, dict) or 1 not in lat or 2 not in lat or 3 not in lat:
        raise Rejected("malformed_cbor", "the compact latency block needs offset, counts and min/max/sum")
    out = {"gamma": lat.get(0, DEFAULT_GAMMA), "offset": lat[1], "counts": unpack_ints(_bytes(lat[2], "counts"))}
    scalars = _unfloats6(lat[3], "latency_ms min/max/sum")
    if len(scalars) != 3:
        raise Rejected("malformed_cbor", "latency_ms min/max/sum must be 3 values")
    out["min"], out["max"], out["sum"] = scalars
    if lat.get(9) is True:
        g, off = out["gamma"], out["offset"]
        if type(g) is not float or not 1 < g <= 10 or type(off) is not int or abs(off) > 100_000:
            raise Rejected("bad_value", "latency_ms.gamma must be > 1 and <= 10, offset an int within +-100000")
        if len(out["counts"]) > 4096 or any(x is not None and not 0 <= x <= 1e100 for x in scalars):
            raise Rejected("bad_value", "latency_ms quantiles recomputed only from bounded histograms")
        try:
            out.update(_quantiles(out))
        except (ArithmeticError, ValueError) as exc:
            raise Rejected("bad_value", f"latency_ms quantiles cannot be recomputed ({exc})") from None
    elif 4 in lat:
        qs, present = lat[4], lat.get(5)
        if not (isinstance(qs, list) and isinstance(present, list) and len(qs) == len(present) == 3):
            raise Rejected("malformed_cbor", "latency_ms quantiles must be 3 values with 3 presence flags")
        out.update({k: _json(q) for k, q, p in zip(("p50", "p95", "p99"), qs, present, strict=True) if p is True})
    for k, v in lat.items():
        if type(k) is str:
            out[k] = _json(v)
    return out


def _un_features(f) -> dict:
    if not isinstance(f, dict) or any(k not in f for k in (0, 1, 3, 4, 5)):
        raise Rejected("malformed_cbor", "the compact features block needs n, count, lengths, hist and floats")
    n = f[0]
    if type(n) is not int or not 0 <= n <= MAX_LIST:
        raise Rejected("oversized", f"features: {str(n)[:20]} features")
    count = _expand_uniform(f[1], n, "features.count")
    out = {"count": count, "nan": _expand_uniform(f.get(2, 0), n, "features.nan")}
    lengths = _expand_uniform(f[3], n, "features.hist lengths")
    if sum(lengths) > MAX_LIST or any(x < 1 for x in lengths):
        raise Rejected("oversized", "more than 65536 histogram bins, or a histogram without bins")
    devs = unpack_ints(_bytes(f[4], "features.hist"))
    if len(devs) != sum(lengths) - n:
        raise Rejected("histogram_mismatch", f"{len(devs)} packed bins for {sum(lengths) - n}")
    out.update(_moments(f, n))
    if 8 in f:
        out["out_of_range"] = _expand_uniform(f[8], n, "features.out_of_range")
    out["hist"] = _histograms(count, lengths, devs)
    for k, v in f.items():
        if type(k) is str:
            out[k] = _json(v)
    return out


def _histograms(count: list[int], lengths: list[int], devs: list[int]) -> list[list[int]]:
    """Each histogram from its bins' zigzag deviations from ``count // bins``, the last bin from ``count``."""
    m = lengths[0] if lengths else 0
    if m > 1 and lengths.count(m) == len(lengths) and max(devs) < 2**62 and max(count) < 2**62:
        z = np.array(devs, dtype=np.int64).reshape(len(count), m - 1)
        c = np.array(count, dtype=np.int64)
        h = np.empty((len(count), m), dtype=np.int64)
        h[:, :-1] = (c // m)[:, None] + ((z >> 1) ^ -(z & 1))
        h[:, -1] = c - h[:, :-1].sum(axis=1)
        return h.tolist()
    small = max(devs, default=0) < len(_UNZIGZAG)
    unz = _UNZIGZAG.__getitem__ if small else _unzigzag
    hist, pos = [], 0
    for c, m in zip(count, lengths, strict=True):
        e = c // m
        h = [e + d for d in map(unz, devs[pos:pos + m - 1])]
        pos += m - 1
        h.append(c - sum(h))
        hist.append(h)
    return hist


def _moments(f: dict, n: int) -> dict:
    nulls = set(unpack_ints(_bytes(f[9], "features nulls"))) if 9 in f else set()
    keep = [j for j in range(n) if j not in nulls]
    m = len(keep)
    raw, escapes, used = _bytes(f[5], "features floats"), f.get(7, []), [0]
    if not isinstance(escapes, list):
        raise Rejected("malformed_cbor", "features escapes must be an array")
    exact = f.get(6) == 1
    size = 4 if exact else 2
    if len(raw) != 4 * m * size:
        raise Rejected("feature_count_mismatch", f"{len(raw)} bytes of moments for {m} features")
    arr, escaped = _unpack_floats(raw, "<f4" if exact else "<f2", 4 * m, escapes, used)
    if used[0] != len(escapes):
        raise Rejected("malformed_cbor", "unused escaped floats")
    if exact:
        six = _six(arr, escaped)
        cols = [six[i * m:(i + 1) * m] for i in range(4)]
    else:
        lo, hi, mean, m2 = arr.reshape(4, m)
        with np.errstate(all="ignore"):
            cols = [lo.tolist(), (lo + hi).tolist(), (lo + mean).tolist(), (np.abs(m2) * m2).tolist()]
    if m == n:
        return dict(zip(("min", "max", "mean", "m2"), cols, strict=True))
    out = {k: [None] * n for k in ("min", "max", "mean", "m2")}
    for k, col in zip(("min", "max", "mean", "m2"), cols, strict=True):
        dest = out[k]
        for j, x in zip(keep, col, strict=True):
            dest[j] = x
    return out


def _expand_time(out: dict, doc: dict) -> None:
    if K_START in doc:
        start = doc[K_START]
        if type(start) is not int or not 0 <= start < 10**16:
            raise Rejected("bad_value", "start must be whole milliseconds since the epoch")
        out["start"] = start / 1000
        if K_END in doc:
            end = doc[K_END]
            if type(end) is not int or not 0 <= end < 10**16:
                raise Rejected("bad_value", "end must be whole milliseconds after start")
            out["end"] = (start + end) / 1000
    elif K_END in doc:
        raise Rejected("malformed_cbor", "end in milliseconds without start")


def decode(payload: bytes, max_bytes: int = MAX_PAYLOAD) -> dict:
    """The JSON document of a compact payload; raises Rejected (never anything else) for hostile input."""
    if payload[:3] != MAGIC:
        raise Rejected("malformed_cbor", "a CBOR payload starts with the self-described CBOR tag d9 d9 f7")
    doc = cbor.loads(payload[3:], max_bytes)
    if not isinstance(doc, dict):
        raise Rejected("not_an_object", f"payload is a CBOR {type(doc).__name__}, not a map")
    try:
        return _expand(doc)
    except Rejected:
        raise
    except (TypeError, ValueError, KeyError, IndexError, ArithmeticError, RecursionError) as exc:
        raise Rejected("malformed_cbor", f"inconsistent compact window ({type(exc).__name__}: {exc})"[:300]) from None


def _expand(doc: dict) -> dict:
    out: dict = {}
    for k, v in doc.items():
        if type(k) is str:
            out[k] = _json(v)
        elif k == 1:
            out["type"] = TYPES[v] if type(v) is int and 0 <= v < len(TYPES) else _json(v)
        elif k == K_PREDICTIONS and isinstance(v, dict):
            out["predictions"] = {PREDICTION_KEYS[pk] if type(pk) is int and 0 <= pk < len(PREDICTION_KEYS)
                                  else _text_key(pk): _json(pv) for pk, pv in v.items()}
        elif k in NAMES:
            out[NAMES[k]] = _json(v)
        elif k == K_MODEL:
            out["model"] = _un_model(v)
        elif k == K_LATENCY:
            out["latency_ms"] = _un_latency(v)
        elif k == K_FEATURES:
            out["features"] = _un_features(v)
        elif k not in (K_START, K_END):
            raise Rejected("malformed_cbor", f"unknown key {k} in a compact window")
    _expand_time(out, doc)
    return out
