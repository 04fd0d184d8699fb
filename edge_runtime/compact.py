"""The compact binary form of a telemetry window: CBOR with integer keys, packed counts and coded moments.

``edgeops run --encoding cbor`` (``cbor-exact``, ``cbor-ref``) publishes each window as::

    d9 d9 f7 | one CBOR map                     (tag 55799, "self-described CBOR", as a 3-byte marker)

The monitor tells the encodings apart by the first byte: ``{`` JSON, ``x`` (0x78) zlib, 0xd9 CBOR.
:func:`decode` turns the map back into the same JSON document the window was built as (so
:func:`edge_runtime.wire.parse` validates it with the same code), except for the moment coding
below. The layout (docs/telemetry.md, "Compact windows"):

- Top-level fields the codec knows get small integer keys (:data:`NAMES`); ``type`` is a small int;
  ``start`` is integer milliseconds and ``end`` milliseconds after it, when they are whole milliseconds;
  the ``distinct`` sketch's 64 registers are bit-packed (key 19).
- ``model``: integer keys; a 64-character hex ``sha256`` travels as its 32 bytes.
- ``latency_ms``: ``gamma`` only when not 1.05; ``counts`` packed; ``min``/``max``/``sum`` as a
  six-digit float vector; ``p50``/``p95``/``p99`` left out when the monitor can recompute them
  from the counts exactly as the device did (:class:`edge_runtime.stats.LatencyHistogram`).
- ``features``: per-feature counts as one int when all equal, NaN counts left out when all zero,
  histograms as the deviation of each bin from ``count // bins`` (zigzag, packed in nibbles), the
  last bin of each histogram left out (it is ``count`` minus the others, which validation demands
  anyway), and the moments in one of three codings:

  ``half`` (``cbor``): ``min`` in IEEE half precision, ``max`` and ``mean`` as half-precision offsets
  from that ``min``, the square root of ``m2`` in half precision. ``exact`` (``cbor-exact``): single
  precision re-rounded to six significant digits on decoding (exactly the JSON value). ``ref``
  (``cbor-ref``): integers relative to the bundle's reference profile (``mean`` and ``std`` of each
  feature, :func:`register_bundle`): the mean in 1/128 reference standard deviations from the
  reference mean, the variance as log2 of its ratio to the reference variance in 1/32 steps,
  ``min`` and ``max`` as their distance below and above the decoded mean in 1/32 reference standard
  deviations, bit-packed by column (edge_runtime.packing). The window then names its bundle by a
  6-byte digest (key 20) and its model block (key 21) by the index of its artifact in the bundle;
  a monitor that has not registered the bundle refuses it as ``unknown_bundle``. A device that has
  no registered bundle for the window's model sends the ``half`` form instead.
- ``predictions``: integer keys (:data:`PREDICTION_KEYS`).
- Anywhere else in the document, a CBOR byte string means a packed list of non-negative ints.
- Any field or block the codec has no compact form for (a block another version adds, a block that
  breaks an assumption above) goes as a generic CBOR map under its text key: nothing is lost.

Precision: ``half`` keeps 11 significant bits (``min`` within 2**-11 of its value, ``mean`` and
``max`` within 2**-11 of their distance from ``min``, ``m2`` within 2**-10). ``ref``: ``mean`` within
1/256 of the reference std, ``min`` and ``max`` within 1/64 of it, ``m2`` within 1.1% (the std within
0.55%); a feature whose codes would not be small integers (a zero or missing reference std with a
non-constant input, values far out) travels exactly. Counts, histograms, ids, the model block,
timestamps and latency figures are exact in every form.

>>> win = {"schema_version": 1, "type": "telemetry", "device_id": "d", "fleet": "f", "seq": 3,
...        "start": 10.0, "end": 20.5, "model": {"name": "m", "version": "1"}, "count": 4, "errors": 0,
...        "latency_ms": {"gamma": 1.05, "offset": 3, "counts": [4], "min": 1.1, "max": 1.1, "sum": 4.4},
...        "features": {"count": [4], "nan": [0], "mean": [0.5], "m2": [1.0], "min": [0.0], "max": [1.0],
...                     "hist": [[2, 2]]}, "predictions": {"counts": [1, 3]}}
>>> decode(encode(win)) == win
True
>>> digest = register_bundle({"name": "m", "version": "1", "reference_profile": {"features": [{"mean": 0.5,
...                           "std": 0.5}]}})
>>> got = decode(encode(win, "ref"))["features"]
>>> got["mean"], got["m2"], got["min"], got["max"]
([0.5], [1.0], [0.0], [1.0])
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
import struct
from typing import NamedTuple

import numpy as np

from edge_runtime import cbor
from edge_runtime.packing import (
    UNZIGZAG,
    pack_columns,
    pack_ints,
    unpack_array,
    unpack_columns,
    unpack_ints,
    unzigzag,
    zigzag,
)
from edge_runtime.packing import NoCompact as _NoCompact
from edge_runtime.wire import _DIGITS, MAX_LIST, MAX_PAYLOAD, Rejected

__all__ = ["MAGIC", "FLOATS", "encode", "decode", "register_bundle", "bundle_reference", "pack_ints", "unpack_ints",
           "round6"]

MAGIC = b"\xd9\xd9\xf7"         # tag 55799: the payload is CBOR
FLOATS = ("half", "exact", "ref")
DEFAULT_GAMMA = 1.05
TYPES = ("telemetry", "status", "bench")

# top-level keys whose value travels as it is, under a small integer
NAMES = {0: "schema_version", 1: "type", 2: "device_id", 3: "fleet", 4: "seq", 8: "count", 9: "errors",
         10: "rejected", 13: "predictions", 14: "dropped_windows", 15: "inputs_dropped", 16: "rejected_by",
         17: "outputs", 18: "agreement"}
KEYS = {name: k for k, name in NAMES.items()}
K_START, K_END, K_MODEL, K_LATENCY, K_FEATURES, K_PREDICTIONS = 5, 6, 7, 11, 12, 13
K_DISTINCT, K_BUNDLE, K_MODEL_REF, K_FEATURES_REF = 19, 20, 21, 22
PREDICTION_KEYS = ("counts", "confidence", "hist", "count", "mean", "m2", "min", "max")
MODEL_KEYS = ("name", "version", "artifact", "sha256", "variant", "mode", "split")
M_ARTIFACT_INDEX = 8            # in the reference form's model block: the artifact's index in the bundle
_HEX = frozenset("0123456789abcdef")
_REGISTER_VALUE = {c: i for i, c in enumerate(_DIGITS)}
_UNZIGZAG_NP = np.array(UNZIGZAG, dtype=np.int64)

MEAN_STEPS = 128                # reference form: codes per reference std for the mean ...
RANGE_STEPS = 32                # ... for min and max (their distance from the decoded mean) ...
VAR_STEPS = 32                  # ... and per doubling of the variance
MAX_CODE = 2**26                # a larger code travels exactly (an escaped feature)
DIGEST_BYTES = 6
_MOMENTS = ("min", "max", "mean", "m2")


# -- the bundles the reference form is coded against ---------------------------------------------

class Reference(NamedTuple):
    """What the reference form needs of a bundle: its identity, artifacts and per-feature mean and scale."""

    digest: bytes
    name: str
    version: str
    artifacts: tuple            # (file, sha256) per artifact of the manifest
    mean: np.ndarray
    scale: np.ndarray           # the reference std, 1.0 where it is zero
    steps: tuple                # for decoding, as lists: mean, scale / MEAN_STEPS, scale / RANGE_STEPS, scale ** 2


_BUNDLES: dict[bytes, Reference] = {}
_BY_MODEL: dict[tuple, bytes] = {}


def _profile_moments(manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    feats = ((manifest.get("reference_profile") or {}).get("features")) or []
    try:
        mean = np.array([float(f["mean"]) for f in feats], dtype=np.float64)
        std = np.array([float(f["std"]) for f in feats], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    return (mean, np.where(std > 0, std, 1.0)) if _usable(mean, std) else None


def _usable(mean: np.ndarray, std: np.ndarray) -> bool:
    return bool(len(mean)) and bool(np.isfinite(mean).all() and np.isfinite(std).all()) and not (std < 0).any()


def bundle_reference(manifest: dict) -> Reference | None:
    """The reference-form view of a bundle manifest (None without a usable tabular reference profile)."""
    name, version = manifest.get("name"), manifest.get("version")
    moments = _profile_moments(manifest) if isinstance(name, str) and isinstance(version, str) else None
    if moments is None:
        return None
    arts = _artifacts(manifest)
    key = json.dumps([name, version, arts, moments[0].tolist(), moments[1].tolist()]).encode()
    mean, scale = moments
    steps = tuple(a.tolist() for a in (mean, scale / MEAN_STEPS, scale / RANGE_STEPS, scale * scale))
    return Reference(hashlib.sha256(key).digest()[:DIGEST_BYTES], name, version, arts, mean, scale, steps)


def _artifacts(manifest: dict) -> tuple:
    return tuple((str(a.get("file")), str(a.get("sha256"))) for a in manifest.get("artifacts") or []
                 if isinstance(a, dict))


def register_bundle(manifest: dict) -> bytes | None:
    """Make a bundle's reference profile known to this process's encoder and decoder (the device and the
    monitor both register the bundle for ``cbor-ref``); returns its digest, None when it has no usable
    profile (its windows then go in the ``half`` form)."""
    ref = bundle_reference(manifest)
    if ref is None:
        return None
    _BUNDLES[ref.digest] = ref
    _BY_MODEL[(ref.name, ref.version)] = ref.digest
    return ref.digest


def _reference_for(doc: dict) -> Reference | None:
    model = doc.get("model")
    if not isinstance(model, dict) or not _BY_MODEL:
        return None
    digest = _BY_MODEL.get((model.get("name"), model.get("version")))
    return None if digest is None else _BUNDLES.get(digest)


# -- small helpers ------------------------------------------------------------------------------

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


def _map(v, what: str, need: tuple = ()) -> dict:
    if not isinstance(v, dict) or any(k not in v for k in need):
        raise Rejected("malformed_cbor", f"the compact {what} block must be a map with keys {list(need)}")
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
            escapes.append(float(np.float32(v)) if 1.2e-38 < abs(v) < 3.0e38 else float(v))
    return half.astype("<f2").tobytes()


def _single6(v: float | None, escapes: list) -> float:
    if v is None:
        return math.nan
    s = np.float32(v) if abs(v) < 3.0e38 else np.float32(np.inf)
    if math.isfinite(s) and round6(float(s)) == v:
        return s
    escapes.append(float(v))
    return math.inf


def _pack_single6(values: list, escapes: list) -> bytes:
    """Single precision, where re-rounding to six significant digits gives the value back exactly."""
    return np.array([_single6(v, escapes) for v in values], dtype="<f4").tobytes()


def _unpack_floats(raw: bytes, dtype: str, n: int, escapes: list, used: list[int]) -> tuple[np.ndarray, list]:
    """The values of a float vector, escaped ones substituted, and the escaped positions."""
    if len(raw) != n * np.dtype(dtype).itemsize:
        raise Rejected("malformed_cbor", f"a float vector of {len(raw)} bytes for {n} values")
    arr = np.frombuffer(raw, dtype=dtype).astype(np.float64)
    if used[0] >= len(escapes):     # nothing left to substitute: an infinity stays one (validation refuses it)
        return arr, []
    escaped = np.flatnonzero(np.isinf(arr)).tolist()
    if used[0] + len(escaped) > len(escapes):
        raise Rejected("malformed_cbor", "more escaped floats than the escape list holds")
    for i in escaped:
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
    if not v[1] and len(raw) % 4 == 0:     # the usual case, a few values and no escapes: no numpy round trip
        return [None if x != x else round6(x) for x in struct.unpack(f"<{len(raw) // 4}f", raw)]
    used = [0]
    out = _six(*_unpack_floats(raw, "<f4", len(raw) // 4, v[1], used))
    if used[0] != len(v[1]):
        raise Rejected("malformed_cbor", f"{what}: unused escaped floats")
    return out


# -- encoding: generic values, model, latency ---------------------------------------------------

def _generic(v):
    """A JSON value as CBOR-ready data: lists of 4+ non-negative ints packed into byte strings."""
    if isinstance(v, dict):
        return {str(k): _generic(x) for k, x in v.items()}
    return _generic_list(v) if isinstance(v, list) else v


def _generic_list(v: list):
    if len(v) >= 4 and all(type(x) is int and x >= 0 for x in v):
        return pack_ints(v)
    return [_generic(x) for x in v]


def _model_field(k: str, v):
    if k == "sha256" and isinstance(v, str) and len(v) == 64 and _HEX.issuperset(v):
        return bytes.fromhex(v)
    return _generic(v)


def _model(m, ref: Reference | None = None) -> dict:
    if not isinstance(m, dict):
        raise _NoCompact("model is not an object")
    out: dict = {}
    for k, v in m.items():
        if k in MODEL_KEYS:
            out[MODEL_KEYS.index(k)] = _model_field(k, v)
        else:
            out[str(k)] = _generic(v)
    return out if ref is None else _model_ref(m, out, ref)


def _model_ref(m: dict, out: dict, ref: Reference) -> dict:
    """The model block against a registered bundle: name and version from it, the artifact by its index."""
    if (m.get("name"), m.get("version")) != (ref.name, ref.version):
        raise _NoCompact("the model block names another bundle")
    del out[0], out[1]
    art = (m.get("artifact"), m.get("sha256"))
    if art in ref.artifacts:
        del out[2], out[3]
        out[M_ARTIFACT_INDEX] = ref.artifacts.index(art)
    return out


_LATENCY_KNOWN = frozenset(("gamma", "offset", "counts", "min", "max", "sum", "p50", "p95", "p99"))
_QUANTILES = ("p50", "p95", "p99")


def _check_latency(lat) -> None:
    if not isinstance(lat, dict) or type(lat.get("offset")) is not int or not isinstance(lat.get("gamma"), float):
        raise _NoCompact("latency_ms without a float gamma and an int offset")
    if any(k not in lat or (lat[k] is not None and type(lat[k]) is not float) for k in ("min", "max", "sum")):
        raise _NoCompact("latency_ms.min/max/sum missing or not floats")


def _quantile_fields(lat: dict) -> dict:
    """9: true when the monitor recomputes p50/p95/p99 exactly as sent; else the values with presence flags."""
    qs = {k: lat[k] for k in _QUANTILES if k in lat}
    if len(qs) == 3 and _quantiles(lat) == qs:
        return {9: True}
    if qs:
        return {4: [qs.get(k) for k in _QUANTILES], 5: [k in qs for k in _QUANTILES]}
    return {}


def _latency(lat) -> dict:
    _check_latency(lat)
    out: dict = {1: lat["offset"], 2: pack_ints(_ints(lat.get("counts"))),
                 3: _floats6([lat["min"], lat["max"], lat["sum"]])}
    if lat["gamma"] != DEFAULT_GAMMA:
        out[0] = lat["gamma"]
    out.update(_quantile_fields(lat))
    out.update({str(k): _generic(v) for k, v in lat.items() if k not in _LATENCY_KNOWN})
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
        out[name] = round6(hi if i >= len(cum) else min(max(gamma ** (offset + i - 0.5), lo), hi))
    return out


# -- encoding: features -------------------------------------------------------------------------

_FEATURE_KNOWN = frozenset(("count", "nan", "mean", "m2", "min", "max", "hist", "out_of_range"))


def _feature_base(f) -> tuple[dict, list, list[int]]:
    """The compact block's counts, histograms and extras; the moment columns (min, max, mean, m2) and counts."""
    count, nan, cols = _feature_columns(f)
    n = len(count)
    out: dict = {0: n, 1: _uniform(count)}
    if any(nan):
        out[2] = _uniform(nan)
    out[3], out[4] = _hist_devs(f["hist"], count)
    if "out_of_range" in f:
        out[8] = _uniform(_ints(f["out_of_range"]))
    out.update({str(k): _generic(v) for k, v in f.items() if k not in _FEATURE_KNOWN})
    return out, cols, count


def _feature_columns(f) -> tuple[list[int], list[int], list]:
    """count, nan and the four moment columns, when every per-feature list has one entry per feature."""
    if not isinstance(f, dict):
        raise _NoCompact("features is not an object")
    count, nan = _ints(f.get("count")), _ints(f.get("nan"))
    cols = [f.get(k) for k in _MOMENTS]
    if any(not isinstance(c, list) or len(c) != len(count) for c in cols + [nan, f.get("hist")]):
        raise _NoCompact("features lists of different lengths")
    return count, nan, cols


def _hist_devs(hist: list, count: list[int]) -> tuple:
    """Histogram lengths and the packed zigzag deviations of each bin but the last from ``count // bins``."""
    lengths, devs = [], []
    for h, c in zip(hist, count, strict=True):
        h = _ints(h)
        if not h or sum(h) != c:
            raise _NoCompact("a histogram that does not sum to its count")
        lengths.append(len(h))
        e = c // len(h)
        devs.extend(zigzag(x - e) for x in h[:-1])
    return _uniform(lengths), pack_ints(devs)


def _has_moments(row: tuple) -> bool:
    """True for four numbers, False for four nulls; anything else has no compact form."""
    present = [x is not None for x in row]
    if any(present) != all(present) or (present[0] and any(type(x) not in (int, float) for x in row)):
        raise _NoCompact("moments partly null or not numbers")
    return present[0]


def _moment_rows(cols: list, out: dict) -> tuple[list[int], list[list[float]]]:
    """The features with moments (their index, their four columns as floats); the others' indices in out[9]."""
    keep = [j for j, row in enumerate(zip(*cols, strict=True)) if _has_moments(row)]
    if len(keep) < len(cols[0]):
        out[9] = pack_ints(sorted(set(range(len(cols[0]))) - set(keep)))
    return keep, [[float(c[j]) for j in keep] for c in cols]


def _features(f, floats: str) -> dict:
    out, cols, _ = _feature_base(f)
    _, (lo, hi, mean, m2) = _moment_rows(cols, out)
    escapes: list = []
    if floats == "half":
        vectors = _half_vectors(lo, hi, mean, m2, escapes)
    else:
        out[6] = 1
        vectors = [_pack_single6(v, escapes) for v in (lo, hi, mean, m2)]
    out[5] = b"".join(vectors)
    if escapes:
        out[7] = escapes
    return out


def _half_vectors(lo: list, hi: list, mean: list, m2: list, escapes: list) -> list[bytes]:
    """min in half precision, max and mean as offsets from the decoded min, the signed square root of m2."""
    lo_q = [float(np.float16(v)) if _half_fits(v) else v for v in lo]
    return [_pack_half(lo, escapes), _pack_half([a - b for a, b in zip(hi, lo_q, strict=True)], escapes),
            _pack_half([a - b for a, b in zip(mean, lo_q, strict=True)], escapes),
            _pack_half([math.copysign(math.sqrt(abs(v)), v) for v in m2], escapes)]


def _features_ref(f, ref: Reference) -> dict:
    """The features block with the moments coded against the bundle's reference profile (keys 10-12)."""
    out, cols, count = _feature_base(f)
    if len(count) != len(ref.mean):
        raise _NoCompact("the window's features are not the bundle's")
    keep, rows = _moment_rows(cols, out)
    codes, escaped = _ref_codes(ref, keep, [max(count[j], 1) for j in keep], rows)
    out[10] = pack_columns(codes)
    if escaped:
        out[11] = pack_ints([keep[i] for i in escaped])
        out[12] = [x for i in escaped for x in (rows[0][i], rows[1][i], rows[2][i], rows[3][i])]
    return out


def _ref_codes(ref: Reference, keep: list[int], count: list[int], rows: list) -> tuple[list[list[int]], list[int]]:
    """The four code columns (zigzag mean, variance code, below-mean and above-mean distance) of the features
    that code, and the positions (in ``keep``) of those that travel exactly."""
    lo, hi, mean, m2 = (np.array(r, dtype=np.float64) for r in rows)
    mu, sd = ref.mean[keep], ref.scale[keep]
    with np.errstate(all="ignore"):
        qm = np.rint((mean - mu) / sd * MEAN_STEPS)
        dec = mu + qm * sd / MEAN_STEPS                     # the mean the monitor will read
        qv = np.rint(np.log2(m2 / (np.array(count, dtype=np.float64) * sd * sd)) * VAR_STEPS)
        codes = np.stack([np.where(qm >= 0, 2 * qm, -2 * qm - 1),
                          np.where(m2 == 0, 0, np.where(qv >= 0, 2 * qv, -2 * qv - 1) + 1),
                          np.maximum(np.rint((dec - lo) / sd * RANGE_STEPS), 0),
                          np.maximum(np.rint((hi - dec) / sd * RANGE_STEPS), 0)])
        bad = ~(np.isfinite(codes).all(axis=0) & (codes < MAX_CODE).all(axis=0)) | (m2 < 0) | (lo > mean) \
            | (mean > hi)
    good = ~bad
    return codes[:, good].astype(np.int64).tolist(), np.flatnonzero(bad).tolist()


# -- encoding: the window -----------------------------------------------------------------------

def _compact_block(out: dict, key: int, name: str, build, value, *args) -> None:
    try:
        out[key] = build(value, *args)
    except (_NoCompact, TypeError, ValueError, OverflowError):
        out[name] = _generic(value)


def _enc_type(out: dict, k: str, v, ctx: dict) -> None:
    out[1] = TYPES.index(v) if v in TYPES else _generic(v)


def _enc_start(out: dict, k: str, v, ctx: dict) -> None:
    if ctx["ms"][0] is None:
        out[k] = _generic(v)
    else:
        out[K_START] = ctx["ms"][0]


def _enc_end(out: dict, k: str, v, ctx: dict) -> None:
    start, end = ctx["ms"]
    if start is None or end is None or end < start:
        out[k] = _generic(v)
    else:
        out[K_END] = end - start


def _enc_model(out: dict, k: str, v, ctx: dict) -> None:
    ref = ctx["ref"]
    if ref is not None:
        try:
            out[K_MODEL_REF] = _model(v, ref)
            return
        except (_NoCompact, KeyError):
            pass
    _compact_block(out, K_MODEL, k, _model, v)


def _enc_latency(out: dict, k: str, v, ctx: dict) -> None:
    _compact_block(out, K_LATENCY, k, _latency, v)


def _enc_features(out: dict, k: str, v, ctx: dict) -> None:
    if ctx["ref"] is not None:
        try:
            out[K_FEATURES_REF] = _features_ref(v, ctx["ref"])
            return
        except (_NoCompact, TypeError, ValueError, OverflowError):
            pass
    _compact_block(out, K_FEATURES, k, _features, v, ctx["floats"])


def _enc_predictions(out: dict, k: str, v, ctx: dict) -> None:
    if not isinstance(v, dict):
        out[K_PREDICTIONS] = _generic(v)
        return
    out[K_PREDICTIONS] = {PREDICTION_KEYS.index(pk) if pk in PREDICTION_KEYS else str(pk): _generic(pv)
                          for pk, pv in v.items()}


def _enc_distinct(out: dict, k: str, v, ctx: dict) -> None:
    if type(v) is str and len(v) == 64 and all(c in _REGISTER_VALUE for c in v):
        out[K_DISTINCT] = pack_columns([[_REGISTER_VALUE[c] for c in v]])
    else:
        out[k] = _generic(v)


def _enc_plain(out: dict, k, v, ctx: dict) -> None:
    out[KEYS.get(k, str(k))] = _generic(v)


_ENCODERS = {"type": _enc_type, "start": _enc_start, "end": _enc_end, "model": _enc_model,
             "latency_ms": _enc_latency, "features": _enc_features, "predictions": _enc_predictions,
             "distinct": _enc_distinct}


def encode(doc: dict, floats: str = "half") -> bytes:
    """A telemetry window (or any JSON object) in the compact form; ``floats``: half, exact or ref (the
    reference form when the window's bundle is registered, else half)."""
    if floats not in FLOATS:
        raise ValueError(f"floats must be one of {FLOATS}, not {floats!r}")
    ref = _reference_for(doc) if floats == "ref" else None
    ctx = {"ref": ref, "floats": "exact" if floats == "exact" else "half",
           "ms": (_millis(doc.get("start")), _millis(doc.get("end")))}
    out: dict = {}
    for k, v in doc.items():
        _ENCODERS.get(k, _enc_plain)(out, k, v, ctx)
    if K_MODEL_REF in out or K_FEATURES_REF in out:
        out[K_BUNDLE] = ref.digest
    return MAGIC + cbor.dumps(out)


def _millis(t) -> int | None:
    """Whole milliseconds of a timestamp when ``ms / 1000`` gives it back exactly."""
    if type(t) is not float or not 0 <= t < 1e13:
        return None
    ms = round(t * 1000)
    return ms if ms / 1000 == t else None


# -- decoding: generic values, model, latency ---------------------------------------------------

def _json(v):
    """A decoded generic value as JSON would give it (byte strings: packed int lists)."""
    t = type(v)
    if t is bytes:
        return unpack_ints(v)
    if t is dict:
        return _json_map(v)
    if t is list:
        return [_json(x) for x in v]
    return v


def _json_map(v: dict) -> dict:
    if any(type(k) is not str for k in v):
        raise Rejected("malformed_cbor", "a generic map with a non-text key")
    return {k: _json(x) for k, x in v.items()}


def _text_key(k) -> str:
    if type(k) is not str:
        raise Rejected("malformed_cbor", f"unknown key {str(k)[:20]} in a compact block")
    return k


def _un_model_item(k, v):
    if type(k) is str:
        return k, _json(v)
    if type(k) is not int or not 0 <= k < len(MODEL_KEYS):
        raise Rejected("malformed_cbor", f"unknown model key {str(k)[:20]}")
    return MODEL_KEYS[k], v.hex() if k == 3 and type(v) is bytes else _json(v)


def _un_model(m) -> dict:
    return dict(_un_model_item(k, v) for k, v in _map(m, "model").items())


def _un_model_ref(m, ref: Reference) -> dict:
    m = dict(_map(m, "model"))
    out = {"name": ref.name, "version": ref.version}
    if M_ARTIFACT_INDEX in m:
        i = m.pop(M_ARTIFACT_INDEX)
        if type(i) is not int or not 0 <= i < len(ref.artifacts):
            raise Rejected("malformed_cbor", f"artifact index {str(i)[:20]} is not one of the bundle's")
        out["artifact"], out["sha256"] = ref.artifacts[i]
    if 0 in m or 1 in m:
        raise Rejected("malformed_cbor", "a reference-form model block names its bundle only by digest")
    out.update(_un_model_item(k, v) for k, v in m.items())
    return out


def _un_latency(lat) -> dict:
    lat = _map(lat, "latency", (1, 2, 3))
    out = {"gamma": lat.get(0, DEFAULT_GAMMA), "offset": lat[1], "counts": unpack_ints(_bytes(lat[2], "counts"))}
    scalars = _unfloats6(lat[3], "latency_ms min/max/sum")
    if len(scalars) != 3:
        raise Rejected("malformed_cbor", "latency_ms min/max/sum must be 3 values")
    out["min"], out["max"], out["sum"] = scalars
    if lat.get(9) is True:
        out.update(_recomputed_quantiles(out))
    elif 4 in lat:
        out.update(_sent_quantiles(lat[4], lat.get(5)))
    out.update((k, _json(v)) for k, v in lat.items() if type(k) is str)
    return out


def _check_recomputable(lat: dict) -> None:
    g, off = lat["gamma"], lat["offset"]
    if type(g) is not float or not 1 < g <= 10 or type(off) is not int or abs(off) > 100_000:
        raise Rejected("bad_value", "latency_ms.gamma must be > 1 and <= 10, offset an int within +-100000")
    if len(lat["counts"]) > 4096 or any(lat[k] is not None and not 0 <= lat[k] <= 1e100 for k in ("min", "max")):
        raise Rejected("bad_value", "latency_ms quantiles recomputed only from bounded histograms")


def _recomputed_quantiles(lat: dict) -> dict:
    _check_recomputable(lat)
    try:
        return _quantiles(lat)
    except (ArithmeticError, ValueError) as exc:
        raise Rejected("bad_value", f"latency_ms quantiles cannot be recomputed ({exc})") from None


def _sent_quantiles(qs, present) -> dict:
    if not (isinstance(qs, list) and isinstance(present, list) and len(qs) == len(present) == 3):
        raise Rejected("malformed_cbor", "latency_ms quantiles must be 3 values with 3 presence flags")
    return {k: _json(q) for k, q, p in zip(_QUANTILES, qs, present, strict=True) if p is True}


# -- decoding: features -------------------------------------------------------------------------

def _un_feature_base(f, moments_key: int) -> tuple[dict, int, list[int]]:
    f = _map(f, "features", (0, 1, 3, 4, moments_key))
    n = f[0]
    if type(n) is not int or not 0 <= n <= MAX_LIST:
        raise Rejected("oversized", f"features: {str(n)[:20]} features")
    count = _expand_uniform(f[1], n, "features.count")
    out = {"count": count, "nan": _expand_uniform(f.get(2, 0), n, "features.nan")}
    out["hist"] = _histograms(count, _hist_lengths(f[3], n), _bytes(f[4], "features.hist"))
    if 8 in f:
        out["out_of_range"] = _expand_uniform(f[8], n, "features.out_of_range")
    out.update((k, _json(v)) for k, v in f.items() if type(k) is str)
    return out, n, count


def _hist_lengths(v, n: int) -> list[int]:
    lengths = _expand_uniform(v, n, "features.hist lengths")
    if sum(lengths) > MAX_LIST or min(lengths, default=1) < 1:
        raise Rejected("oversized", "more than 65536 histogram bins, or a histogram without bins")
    return lengths


def _histograms(count: list[int], lengths: list[int], packed: bytes) -> list[list[int]]:
    """Each histogram from its bins' zigzag deviations from ``count // bins``, the last bin from ``count``
    (in numpy when every histogram has the same bins and the counts are bounded)."""
    devs = unpack_array(packed)
    if len(devs) != sum(lengths) - len(count):
        raise Rejected("histogram_mismatch", f"{len(devs)} packed bins for {sum(lengths) - len(count)}")
    m = lengths[0] if lengths else 0
    if m > 1 and lengths.count(m) == len(lengths) and max(count) < 2**62:
        c = np.array(count, dtype=np.int64)
        h = np.empty((len(count), m), dtype=np.int64)
        h[:, :-1] = _UNZIGZAG_NP[devs].reshape(len(count), m - 1) if devs.max(initial=0) < 512 else \
            ((devs >> 1) ^ -(devs & 1)).reshape(len(count), m - 1)
        h[:, :-1] += (c // m)[:, None]
        h[:, -1] = c - h[:, :-1].sum(axis=1)
        return h.tolist()
    return _histograms_py(count, lengths, devs.tolist())


def _histograms_py(count: list[int], lengths: list[int], devs: list[int]) -> list[list[int]]:
    unz = UNZIGZAG.__getitem__ if max(devs, default=0) < len(UNZIGZAG) else unzigzag
    hist, pos = [], 0
    for c, m in zip(count, lengths, strict=True):
        h = [c // m + d for d in map(unz, devs[pos:pos + m - 1])]
        pos += m - 1
        h.append(c - sum(h))
        hist.append(h)
    return hist


def _nulls(f: dict, n: int) -> list[int]:
    nulls = sorted(set(unpack_ints(_bytes(f[9], "features nulls")))) if 9 in f else []
    if nulls and nulls[-1] >= n:
        raise Rejected("malformed_cbor", "a null feature index past the features")
    return nulls


def _spread(n: int, keep: list[int], cols: list[list]) -> dict:
    """The four moment lists of ``n`` features from the columns of the ``keep`` ones (the others null)."""
    if len(keep) == n:
        return dict(zip(_MOMENTS, cols, strict=True))
    out = {k: [None] * n for k in _MOMENTS}
    for k, col in zip(_MOMENTS, cols, strict=True):
        dest = out[k]
        for j, x in zip(keep, col, strict=True):
            dest[j] = x
    return out


def _moments(f: dict, n: int) -> dict:
    """The half or exact form's moments (key 5, escapes in 7, 6 = 1 for exact)."""
    nulls = _nulls(f, n)
    skip = set(nulls)
    keep = [j for j in range(n) if j not in skip]
    m = len(keep)
    exact = f.get(6) == 1
    arr, escaped = _moment_floats(f, m, exact)
    return _spread(n, keep, _exact_columns(arr, escaped, m) if exact else _half_columns(arr, m))


def _moment_floats(f: dict, m: int, exact: bool) -> tuple[np.ndarray, list]:
    """The 4 x m floats of key 5 (single or half precision), escaped ones (key 7) substituted."""
    raw, escapes, used = _bytes(f[5], "features floats"), f.get(7, []), [0]
    if not isinstance(escapes, list):
        raise Rejected("malformed_cbor", "features escapes must be an array")
    if len(raw) != 4 * m * (4 if exact else 2):
        raise Rejected("feature_count_mismatch", f"{len(raw)} bytes of moments for {m} features")
    arr, escaped = _unpack_floats(raw, "<f4" if exact else "<f2", 4 * m, escapes, used)
    if used[0] != len(escapes):
        raise Rejected("malformed_cbor", "unused escaped floats")
    return arr, escaped


def _exact_columns(arr: np.ndarray, escaped: list, m: int) -> list[list]:
    six = _six(arr, escaped)
    return [six[i * m:(i + 1) * m] for i in range(4)]


def _half_columns(arr: np.ndarray, m: int) -> list[list]:
    lo, hi, mean, m2 = arr.reshape(4, m)
    with np.errstate(all="ignore"):
        return [lo.tolist(), (lo + hi).tolist(), (lo + mean).tolist(), (np.abs(m2) * m2).tolist()]


def _un_features(f) -> dict:
    out, n, _ = _un_feature_base(f, 5)
    out.update(_moments(f, n))
    return out


def _un_features_ref(f, ref: Reference) -> dict:
    out, n, count = _un_feature_base(f, 10)
    if n != len(ref.mean):
        raise Rejected("feature_count_mismatch", f"{n} features for a bundle of {len(ref.mean)}")
    nulls = _nulls(f, n)
    escaped, exact = _escaped(f, n, nulls)
    skip = set(nulls) | set(escaped)
    coded = [j for j in range(n) if j not in skip] if skip else list(range(n))
    codes = unpack_columns(_bytes(f[10], "features moments"), len(coded), 4)
    cols = _ref_values(ref, coded, count, codes)
    if escaped:
        coded, cols = _with_escaped(coded, cols, escaped, exact)
    out.update(_spread(n, coded, cols))
    return out


def _escaped(f: dict, n: int, nulls: list[int]) -> tuple[list[int], list]:
    """The features whose moments travel exactly (key 11) and those moments, four each (key 12)."""
    escaped = sorted(set(unpack_ints(_bytes(f[11], "features escaped")))) if 11 in f else []
    exact = f.get(12, [])
    if not isinstance(exact, list) or len(exact) != 4 * len(escaped) or (escaped and escaped[-1] >= n):
        raise Rejected("malformed_cbor", "escaped features need 4 exact moments each")
    if set(nulls) & set(escaped):
        raise Rejected("malformed_cbor", "a feature both null and escaped")
    return escaped, exact


def _ref_values(ref: Reference, coded: list[int], count: list[int], codes: list[list[int]]) -> list[list[float]]:
    """min, max, mean and m2 of the coded features from their codes (the inverse of _ref_codes)."""
    mu, mstep, rstep, var = ref.steps
    if len(coded) != len(mu):
        mu, mstep, rstep, var, count = ([a[j] for j in coded] for a in (mu, mstep, rstep, var, count))
    zm, zv, qlo, qhi = codes
    mean = [m + (z >> 1 ^ -(z & 1)) * st for m, z, st in zip(mu, zm, mstep, strict=True)]
    m2 = [(c or 1) * v * 2.0 ** ((z - 1 >> 1 ^ -(z - 1 & 1)) / VAR_STEPS) if z else 0.0
          for z, c, v in zip(zv, count, var, strict=True)]
    return [[m - q * r for m, q, r in zip(mean, qlo, rstep, strict=True)],
            [m + q * r for m, q, r in zip(mean, qhi, rstep, strict=True)], mean, m2]


def _with_escaped(coded: list[int], cols: list[list], escaped: list[int], exact: list) -> tuple[list, list]:
    if any(type(x) not in (int, float) for x in exact):
        raise Rejected("malformed_cbor", "an escaped moment is not a number")
    rows = dict(zip(coded, zip(*cols, strict=True), strict=True)) if coded else {}
    rows.update((j, tuple(exact[4 * i:4 * i + 4])) for i, j in enumerate(escaped))
    order = sorted(rows)
    return order, [[rows[j][i] for j in order] for i in range(4)]


# -- decoding: the window -----------------------------------------------------------------------

def _un_distinct(v) -> str:
    registers = unpack_columns(_bytes(v, "distinct"), 64, 1)[0]
    if max(registers) >= len(_DIGITS):
        raise Rejected("bad_value", "a distinct register over 61")
    return "".join(map(_DIGITS.__getitem__, registers))


def _un_predictions(v):
    if not isinstance(v, dict):
        return _json(v)
    return {PREDICTION_KEYS[pk] if type(pk) is int and 0 <= pk < len(PREDICTION_KEYS) else _text_key(pk): _json(pv)
            for pk, pv in v.items()}


def _un_type(v):
    return TYPES[v] if type(v) is int and 0 <= v < len(TYPES) else _json(v)


def _bundle(doc: dict) -> Reference | None:
    if K_BUNDLE not in doc:
        if K_MODEL_REF in doc or K_FEATURES_REF in doc:
            raise Rejected("malformed_cbor", "a reference-form block without the bundle digest")
        return None
    digest = _bytes(doc[K_BUNDLE], "the bundle digest")
    ref = _BUNDLES.get(digest)
    if ref is None:
        raise Rejected("unknown_bundle", f"the window's moments are coded against bundle {digest.hex()[:16]}, "
                                         f"which this monitor has not registered (give it the bundle, or have the "
                                         f"device send --encoding cbor)")
    return ref


_DECODERS = {1: ("type", _un_type), K_PREDICTIONS: ("predictions", _un_predictions),
             K_MODEL: ("model", _un_model), K_LATENCY: ("latency_ms", _un_latency),
             K_FEATURES: ("features", _un_features), K_DISTINCT: ("distinct", _un_distinct)}
_DECODERS.update({k: (name, _json) for k, name in NAMES.items() if k not in _DECODERS})
_REF_DECODERS = {K_MODEL_REF: ("model", _un_model_ref), K_FEATURES_REF: ("features", _un_features_ref)}
_SKIP = frozenset((K_START, K_END, K_BUNDLE))


def _expand(doc: dict) -> dict:
    ref = _bundle(doc)
    out: dict = {}
    for k, v in doc.items():
        if type(k) is str:
            out[k] = _json(v)
        elif k in _DECODERS:
            name, fn = _DECODERS[k]
            out[name] = fn(v)
        elif k in _REF_DECODERS:
            name, fn = _REF_DECODERS[k]
            out[name] = fn(v, ref)
        elif k not in _SKIP:
            raise Rejected("malformed_cbor", f"unknown key {str(k)[:20]} in a compact window")
    _expand_time(out, doc)
    return out


def _millis_field(doc: dict, key: int, what: str) -> int:
    v = doc[key]
    if type(v) is not int or not 0 <= v < 10**16:
        raise Rejected("bad_value", f"{what} must be whole milliseconds")
    return v


def _expand_time(out: dict, doc: dict) -> None:
    if K_START not in doc:
        if K_END in doc:
            raise Rejected("malformed_cbor", "end in milliseconds without start")
        return
    start = _millis_field(doc, K_START, "start")
    out["start"] = start / 1000
    if K_END in doc:
        out["end"] = (start + _millis_field(doc, K_END, "end")) / 1000


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
