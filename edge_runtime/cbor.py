"""A small, hardened CBOR (RFC 8949) codec for the subset the wire format uses.

Encoded: unsigned and negative integers (up to 64 bits), byte and text strings, arrays, maps with
integer or text keys, false/true/null, floats (the shortest of half, single and double precision
that holds the value exactly) and a few tags the caller names. Every length is definite.

The decoder treats its input as hostile: it bounds the total size, every length (a string or a
container can never claim more items than there are bytes left), the nesting depth and the items
per container; it refuses indefinite lengths, tags it was not told to expect, simple values other
than false/true/null, NaN and the infinities, invalid UTF-8, duplicate or non-scalar map keys and
trailing bytes, each with :class:`edge_runtime.wire.Rejected` and a named reason (``oversized``,
``too_deep``, ``malformed_cbor``, ``cbor_unsupported``, ``bad_string``, ``bad_value``). Nothing else
escapes it.

>>> loads(dumps({"a": [1, -2, 1.5, None, True], 3: b"\\x00"}))
{'a': [1, -2, 1.5, None, True], 3: b'\\x00'}
>>> dumps(1.05).hex(), dumps(0.5).hex()          # double where single would round, half where exact
('fb3ff0cccccccccccd', 'f93800')
>>> loads(bytes.fromhex("9f01ff"))                # an indefinite-length array
Traceback (most recent call last):
...
edge_runtime.wire.Rejected: cbor_unsupported: indefinite-length item at byte 0
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

from edge_runtime.wire import MAX_LIST, MAX_PAYLOAD, Rejected

MAX_DEPTH = 16
MAX_UINT = 2**64 - 1
_HALF = struct.Struct(">e")
_SINGLE = struct.Struct(">f")
_DOUBLE = struct.Struct(">d")


class Tag(NamedTuple):
    """A tagged data item (major type 6): ``number`` and the item it tags."""

    number: int
    value: object


# -- encoding -------------------------------------------------------------------------------------

def _head(major: int, arg: int) -> bytes:
    if arg < 24:
        return bytes((major << 5 | arg,))
    if arg < 0x100:
        return bytes((major << 5 | 24, arg))
    if arg < 0x10000:
        return bytes((major << 5 | 25,)) + arg.to_bytes(2, "big")
    if arg < 0x100000000:
        return bytes((major << 5 | 26,)) + arg.to_bytes(4, "big")
    return bytes((major << 5 | 27,)) + arg.to_bytes(8, "big")


def encode_float(x: float) -> bytes:
    """The shortest IEEE 754 form that holds ``x`` exactly (finite values only)."""
    if not math.isfinite(x):
        raise ValueError(f"CBOR here carries finite floats only, not {x!r}")
    for head, fmt in ((b"\xf9", _HALF), (b"\xfa", _SINGLE)):
        try:
            packed = fmt.pack(x)
        except OverflowError:
            continue
        if fmt.unpack(packed)[0] == x:
            return head + packed
    return b"\xfb" + _DOUBLE.pack(x)


def _encode(obj, out: list) -> None:  # noqa: C901 - one branch per CBOR type
    t = type(obj)
    if t is bool:
        out.append(b"\xf5" if obj else b"\xf4")
    elif obj is None:
        out.append(b"\xf6")
    elif t is int or isinstance(obj, int):
        obj = int(obj)
        if not -MAX_UINT - 1 <= obj <= MAX_UINT:
            raise ValueError(f"integer {obj} does not fit 64 bits")
        out.append(_head(0, obj) if obj >= 0 else _head(1, -1 - obj))
    elif t is float or isinstance(obj, float):
        out.append(encode_float(float(obj)))
    elif t is str:
        raw = obj.encode("utf-8")
        out.append(_head(3, len(raw)))
        out.append(raw)
    elif t in (bytes, bytearray, memoryview):
        out.append(_head(2, len(obj)))
        out.append(bytes(obj))
    elif t in (list, tuple):
        out.append(_head(4, len(obj)))
        for item in obj:
            _encode(item, out)
    elif t is dict:
        out.append(_head(5, len(obj)))
        for k, v in obj.items():
            if type(k) not in (int, str):
                raise ValueError(f"map keys are integers or text, not {type(k).__name__}")
            _encode(k, out)
            _encode(v, out)
    elif t is Tag:
        out.append(_head(6, obj.number))
        _encode(obj.value, out)
    else:
        raise ValueError(f"cannot encode a {t.__name__} as CBOR")


def dumps(obj) -> bytes:
    """``obj`` as one CBOR data item (definite lengths; ValueError for what the subset cannot hold)."""
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


# -- decoding -------------------------------------------------------------------------------------

def loads(data: bytes, max_bytes: int = MAX_PAYLOAD, max_depth: int = MAX_DEPTH,
          tags: frozenset = frozenset(), max_items: int = MAX_LIST):
    """The single data item of ``data``; raises Rejected for anything outside the subset or its bounds."""
    if len(data) > max_bytes:
        raise Rejected("oversized", f"{len(data)} bytes is over the {max_bytes}-byte limit")
    dec = _Decoder(bytes(data), max_depth, tags, max_items)
    value = dec.item(0)
    if dec.pos != len(dec.buf):
        raise Rejected("malformed_cbor", f"{len(dec.buf) - dec.pos} bytes after the data item")
    return value


class _Decoder:
    __slots__ = ("buf", "pos", "max_depth", "tags", "max_items")

    def __init__(self, buf: bytes, max_depth: int, tags: frozenset, max_items: int):
        self.buf, self.pos = buf, 0
        self.max_depth, self.tags, self.max_items = max_depth, tags, max_items

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.buf):
            raise Rejected("malformed_cbor", f"truncated: {n} bytes needed at byte {self.pos}, "
                                             f"{len(self.buf) - self.pos} left")
        chunk = self.buf[self.pos:end]
        self.pos = end
        return chunk

    def _head(self) -> tuple[int, int, int]:
        start = self.pos
        if start >= len(self.buf):
            raise Rejected("malformed_cbor", f"truncated: a data item expected at byte {start}")
        ib = self.buf[start]
        self.pos = start + 1
        major, info = ib >> 5, ib & 31
        if info < 24:
            return major, info, info
        if info <= 27:
            return major, info, int.from_bytes(self._take(1 << (info - 24)), "big")
        if info == 31:
            raise Rejected("cbor_unsupported", f"indefinite-length item at byte {start}")
        raise Rejected("malformed_cbor", f"reserved additional information {info} at byte {start}")

    def _length(self, n: int, per_item: int, what: str) -> None:
        if n > self.max_items:
            raise Rejected("oversized", f"{what} of {n} items is over the {self.max_items}-item limit")
        if n * per_item > len(self.buf) - self.pos:
            raise Rejected("malformed_cbor", f"truncated: {what} of {n} items in {len(self.buf) - self.pos} bytes")

    def item(self, depth: int):  # noqa: C901 - one branch per major type
        start = self.pos
        major, info, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major == 2:
            return self._take(arg)
        if major == 3:
            raw = self._take(arg)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise Rejected("bad_string", f"text at byte {start} is not UTF-8 ({exc.reason})") from None
        if major == 7:
            return self._simple(info, arg, start)
        if depth >= self.max_depth:
            raise Rejected("too_deep", f"the payload nests deeper than {self.max_depth} levels")
        if major == 4:
            self._length(arg, 1, "an array")
            return [self.item(depth + 1) for _ in range(arg)]
        if major == 5:
            self._length(arg, 2, "a map")
            out = {}
            for _ in range(arg):
                at = self.pos
                key = self.item(depth + 1)
                if type(key) not in (int, str):
                    raise Rejected("malformed_cbor", f"map key at byte {at} is a {type(key).__name__}, not an "
                                                     f"integer or text")
                if key in out:
                    raise Rejected("malformed_cbor", f"duplicate map key {str(key)[:40]!r} at byte {at}")
                out[key] = self.item(depth + 1)
            return out
        if arg not in self.tags:      # major 6
            raise Rejected("cbor_unsupported", f"unexpected tag {arg} at byte {start}")
        return Tag(arg, self.item(depth + 1))

    def _simple(self, info: int, arg: int, start: int):
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info in (25, 26, 27):
            raw = arg.to_bytes(1 << (info - 24), "big")
            x = (_HALF if info == 25 else _SINGLE if info == 26 else _DOUBLE).unpack(raw)[0]
            if not math.isfinite(x):
                raise Rejected("bad_value", f"NaN or infinite float at byte {start}")
            return x
        raise Rejected("cbor_unsupported", f"simple value {arg} at byte {start} (only false, true, null)")
