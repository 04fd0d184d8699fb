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
    info = 24 + (arg >= 0x100) + (arg >= 0x10000) + (arg >= 0x100000000)
    return bytes((major << 5 | info,)) + arg.to_bytes(1 << (info - 24), "big")


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


def _enc_int(obj, out: list) -> None:
    obj = int(obj)
    if not -MAX_UINT - 1 <= obj <= MAX_UINT:
        raise ValueError(f"integer {obj} does not fit 64 bits")
    out.append(_head(0, obj) if obj >= 0 else _head(1, -1 - obj))


def _enc_text(obj: str, out: list) -> None:
    raw = obj.encode("utf-8")
    out.append(_head(3, len(raw)))
    out.append(raw)


def _enc_bytes(obj, out: list) -> None:
    out.append(_head(2, len(obj)))
    out.append(bytes(obj))


def _enc_array(obj, out: list) -> None:
    out.append(_head(4, len(obj)))
    for item in obj:
        _encode(item, out)


def _enc_map(obj: dict, out: list) -> None:
    out.append(_head(5, len(obj)))
    for k, v in obj.items():
        if type(k) not in (int, str):
            raise ValueError(f"map keys are integers or text, not {type(k).__name__}")
        _encode(k, out)
        _encode(v, out)


def _enc_tag(obj: Tag, out: list) -> None:
    out.append(_head(6, obj.number))
    _encode(obj.value, out)


_ENCODERS = {bool: lambda obj, out: out.append(b"\xf5" if obj else b"\xf4"),
             type(None): lambda obj, out: out.append(b"\xf6"),
             int: _enc_int, float: lambda obj, out: out.append(encode_float(obj)), str: _enc_text,
             bytes: _enc_bytes, bytearray: _enc_bytes, memoryview: _enc_bytes, list: _enc_array, tuple: _enc_array,
             dict: _enc_map, Tag: _enc_tag}


def _encode(obj, out: list) -> None:
    enc = _ENCODERS.get(type(obj))
    if enc is None:       # subclasses (numpy integers and floats among them)
        if isinstance(obj, int):
            enc = _enc_int
        elif isinstance(obj, float):
            obj, enc = float(obj), _ENCODERS[float]
        else:
            raise ValueError(f"cannot encode a {type(obj).__name__} as CBOR")
    enc(obj, out)


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
    __slots__ = ("buf", "pos", "end", "max_depth", "tags", "max_items")

    def __init__(self, buf: bytes, max_depth: int, tags: frozenset, max_items: int):
        self.buf, self.pos, self.end = buf, 0, len(buf)
        self.max_depth, self.tags, self.max_items = max_depth, tags, max_items

    def _take(self, n: int) -> bytes:
        pos = self.pos
        end = pos + n
        if end > self.end:
            raise Rejected("malformed_cbor", f"truncated: {n} bytes needed at byte {pos}, {self.end - pos} left")
        self.pos = end
        return self.buf[pos:end]

    def _long_arg(self, info: int, start: int) -> int:
        if info == 24 and start + 1 < self.end:
            self.pos = start + 2
            return self.buf[start + 1]
        if info <= 27:
            return int.from_bytes(self._take(1 << (info - 24)), "big")
        if info == 31:
            raise Rejected("cbor_unsupported", f"indefinite-length item at byte {start}")
        raise Rejected("malformed_cbor", f"reserved additional information {info} at byte {start}")

    def item(self, depth: int):
        """The data item at ``pos`` (a small unsigned int inline, anything else by its major type)."""
        pos = self.pos
        if pos >= self.end:
            raise Rejected("malformed_cbor", f"truncated: a data item expected at byte {pos}")
        ib = self.buf[pos]
        self.pos = pos + 1
        if ib < 24:
            return ib
        info = ib & 31
        arg = info if info < 24 else self._long_arg(info, pos)
        return _READERS[ib >> 5](self, arg, info, pos, depth)

    def _length(self, n: int, per_item: int, what: str) -> None:
        if n > self.max_items:
            raise Rejected("oversized", f"{what} of {n} items is over the {self.max_items}-item limit")
        if n * per_item > self.end - self.pos:
            raise Rejected("malformed_cbor", f"truncated: {what} of {n} items in {self.end - self.pos} bytes")

    def _nested(self, depth: int) -> None:
        if depth >= self.max_depth:
            raise Rejected("too_deep", f"the payload nests deeper than {self.max_depth} levels")

    def uint(self, arg: int, info: int, start: int, depth: int) -> int:
        return arg

    def nint(self, arg: int, info: int, start: int, depth: int) -> int:
        return -1 - arg

    def bytestring(self, arg: int, info: int, start: int, depth: int) -> bytes:
        return self._take(arg)

    def text(self, arg: int, info: int, start: int, depth: int) -> str:
        raw = self._take(arg)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Rejected("bad_string", f"text at byte {start} is not UTF-8 ({exc.reason})") from None

    def array(self, arg: int, info: int, start: int, depth: int) -> list:
        self._nested(depth)
        self._length(arg, 1, "an array")
        item, depth = self.item, depth + 1
        return [item(depth) for _ in range(arg)]

    def map(self, arg: int, info: int, start: int, depth: int) -> dict:
        self._nested(depth)
        self._length(arg, 2, "a map")
        item, depth, out, buf, end = self.item, depth + 1, {}, self.buf, self.end
        for _ in range(arg):
            at = self.pos
            if at < end and buf[at] < 24:      # the usual key: a small unsigned int
                key = buf[at]
                self.pos = at + 1
            else:
                key = self._key(depth, at)
            if key in out:
                raise Rejected("malformed_cbor", f"duplicate map key {str(key)[:40]!r} at byte {at}")
            out[key] = item(depth)
        return out

    def _key(self, depth: int, at: int):
        key = self.item(depth)
        if type(key) not in (int, str):
            raise Rejected("malformed_cbor", f"map key at byte {at} is a {type(key).__name__}, not an integer or text")
        return key

    def tag(self, arg: int, info: int, start: int, depth: int) -> Tag:
        self._nested(depth)
        if arg not in self.tags:
            raise Rejected("cbor_unsupported", f"unexpected tag {arg} at byte {start}")
        return Tag(arg, self.item(depth + 1))

    def simple(self, arg: int, info: int, start: int, depth: int):
        if info in _SIMPLE:
            return _SIMPLE[info]
        if info not in _FLOATS:
            raise Rejected("cbor_unsupported", f"simple value {arg} at byte {start} (only false, true, null)")
        x = _FLOATS[info].unpack(arg.to_bytes(1 << (info - 24), "big"))[0]
        if not math.isfinite(x):
            raise Rejected("bad_value", f"NaN or infinite float at byte {start}")
        return x


_SIMPLE = {20: False, 21: True, 22: None}
_FLOATS = {25: _HALF, 26: _SINGLE, 27: _DOUBLE}
_READERS = (_Decoder.uint, _Decoder.nint, _Decoder.bytestring, _Decoder.text, _Decoder.array, _Decoder.map,
            _Decoder.tag, _Decoder.simple)
