"""Packed lists of non-negative integers for the compact window form (edge_runtime.compact).

Two packings, both byte strings:

- :func:`pack_ints`: a scheme byte (0: LEB128 varints; 1: nibbles, 15 escaping to a varint after the
  nibbles; 2: sparse, per non-zero entry a varint pair: the zeros before it and the value minus one),
  the count as a varint, the data. The encoder takes the shortest of the three.
- :func:`pack_columns`: frame-of-reference bit packing of equally long columns: per column its
  smallest value (a varint) and the bit width of the largest difference from it (one byte), then
  every column's differences in one little-endian bit stream. Moments coded as small integers
  (edge_runtime.compact's reference form) take 4 to 8 bits each this way.

Both unpackers take hostile input: a truncated, oversized or unknown packing raises
:class:`edge_runtime.wire.Rejected` (``malformed_cbor`` or ``oversized``).

>>> pack_ints([3, 0, 1, 2, 40]).hex(), unpack_ints(pack_ints([3, 0, 1, 2, 40]))
('01053012f019', [3, 0, 1, 2, 40])
>>> unpack_columns(pack_columns([[5, 6, 7], [0, 0, 0]]), 3, 2)
[[5, 6, 7], [0, 0, 0]]
"""

from __future__ import annotations

import itertools

import numpy as np

from edge_runtime.wire import MAX_LIST, Rejected

MAX_WIDTH = 40          # bits per packed column value (the reference form's codes stay below 2**26)


class NoCompact(Exception):
    """A value breaks an assumption of a compact form: its block goes generic."""


# -- varints ------------------------------------------------------------------------------------

def varint(v: int, out: bytearray) -> None:
    """Append ``v`` (>= 0) as a LEB128 varint."""
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (at most 10 bytes)."""
    if pos < len(buf) and buf[pos] < 0x80:
        return buf[pos], pos + 1
    v = shift = 0
    for i in range(pos, min(pos + 10, len(buf))):
        b = buf[i]
        v |= (b & 0x7F) << shift
        if b < 0x80:
            return v, i + 1
        shift += 7
    raise Rejected("malformed_cbor", "a packed list ends inside a varint (or one is over 10 bytes)")


def zigzag(d: int) -> int:
    return 2 * d if d >= 0 else -2 * d - 1


def unzigzag(z: int) -> int:
    return z >> 1 if not z & 1 else -((z + 1) >> 1)


UNZIGZAG = [unzigzag(z) for z in range(512)]
_PAIRS = np.array([(b >> 4, b & 15) for b in range(256)], dtype=np.int64)   # a byte's two nibbles
_NIBBLES = [(b >> 4, b & 15) for b in range(256)]


# -- pack_ints ----------------------------------------------------------------------------------

def _as_counts(values) -> list[int]:
    vals = [int(v) for v in values]
    if any(v < 0 for v in vals):
        raise NoCompact("a negative count")
    return vals


def _pack_varints(vals: list[int]) -> bytearray:
    out = bytearray((0,))
    varint(len(vals), out)
    for v in vals:
        varint(v, out)
    return out


def _pack_nibbles(vals: list[int]) -> bytearray:
    out = bytearray((1,))
    varint(len(vals), out)
    codes = [min(v, 15) for v in vals] + [0] * (len(vals) & 1)
    out += bytes(codes[i] << 4 | codes[i + 1] for i in range(0, len(codes), 2))
    for v in vals:
        if v >= 15:
            varint(v - 15, out)
    return out


def _pack_sparse(vals: list[int]) -> bytearray:
    out = bytearray((2,))
    varint(len(vals), out)
    last = -1
    for i, v in enumerate(vals):
        if v:
            varint(i - last - 1, out)
            varint(v - 1, out)
            last = i
    return out


def pack_ints(values) -> bytes:
    """A list of non-negative ints as bytes: varints, nibbles or sparse pairs, whichever is shortest."""
    vals = _as_counts(values)
    return bytes(min((_pack_varints(vals), _pack_nibbles(vals), _pack_sparse(vals)), key=len))


def _unpack_varints(buf: bytes, pos: int, n: int) -> tuple[list[int], int]:
    out = []
    for _ in range(n):
        v, pos = read_varint(buf, pos)
        out.append(v)
    return out, pos


def _unpack_nibbles(buf: bytes, pos: int, n: int) -> tuple[list[int], int]:
    m = (n + 1) // 2
    if pos + m > len(buf):
        raise Rejected("malformed_cbor", f"a packed list of {n} nibbles in {len(buf) - pos} bytes")
    out = list(itertools.chain.from_iterable(map(_NIBBLES.__getitem__, buf[pos:pos + m])))[:n]
    pos += m
    if 15 in out:
        for i in [i for i, v in enumerate(out) if v == 15]:
            v, pos = read_varint(buf, pos)
            out[i] = 15 + v
    return out, pos


def _unpack_sparse(buf: bytes, pos: int, n: int) -> tuple[list[int], int]:
    out = [0] * n
    i = -1
    while pos < len(buf):
        gap, pos = read_varint(buf, pos)
        v, pos = read_varint(buf, pos)
        i += gap + 1
        if i >= n:
            raise Rejected("malformed_cbor", f"a sparse packed list puts an entry past its {n} items")
        out[i] = v + 1
    return out, pos


_UNPACKERS = (_unpack_varints, _unpack_nibbles, _unpack_sparse)


def unpack_ints(buf: bytes, max_items: int = MAX_LIST) -> list[int]:
    """The list :func:`pack_ints` packed; raises Rejected for a truncated, oversized or unknown packing."""
    if len(buf) < 2 or buf[0] > 2:
        raise Rejected("malformed_cbor", "a packed list needs a scheme byte (0, 1 or 2) and a length")
    n, pos = read_varint(buf, 1)
    if n > max_items:
        raise Rejected("oversized", f"a packed list of {n} items")
    if buf[0] != 2 and n > 2 * (len(buf) - pos):
        raise Rejected("malformed_cbor", f"a packed list of {n} items in {len(buf) - pos} bytes")
    out, pos = _UNPACKERS[buf[0]](buf, pos, n)
    if pos != len(buf):
        raise Rejected("malformed_cbor", f"{len(buf) - pos} bytes after a packed list")
    return out


# -- bit-packed columns -------------------------------------------------------------------------

def _nibble_array(buf: bytes, max_items: int) -> np.ndarray | None:
    """Scheme 1 in numpy (None for another scheme): the nibbles, then the escaped values' varints in order."""
    if len(buf) < 2 or buf[0] != 1:
        return None
    n, pos = read_varint(buf, 1)
    m = (n + 1) // 2
    if n > max_items or pos + m > len(buf):
        raise Rejected("oversized" if n > max_items else "malformed_cbor", f"a packed list of {n} nibbles")
    out = _PAIRS[np.frombuffer(buf, dtype=np.uint8, count=m, offset=pos)].ravel()[:n]
    return _nibble_escapes(out, buf, pos + m)


def _nibble_escapes(out: np.ndarray, buf: bytes, pos: int) -> np.ndarray:
    """Each nibble 15 plus its varint after the nibbles (all at once when every varint is one byte)."""
    escaped = np.flatnonzero(out == 15)
    tail = np.frombuffer(buf, dtype=np.uint8, offset=pos)
    if len(tail) == len(escaped) and (tail < 0x80).all():
        out[escaped] += tail
        return out
    for i in escaped.tolist():
        v, pos = read_varint(buf, pos)
        out[i] = 15 + min(v, 2**62)
    if pos != len(buf):
        raise Rejected("malformed_cbor", f"{len(buf) - pos} bytes after a packed list")
    return out


def unpack_array(buf: bytes, max_items: int = MAX_LIST) -> np.ndarray:
    """:func:`unpack_ints` as an int64 array (values over 2**62 refused)."""
    out = _nibble_array(buf, max_items)
    if out is not None:
        if len(out) and out.max() >= 2**62:
            raise Rejected("bad_value", "a packed count over 2**62")
        return out
    vals = unpack_ints(buf, max_items)
    if vals and max(vals) >= 2**62:
        raise Rejected("bad_value", "a packed count over 2**62")
    return np.array(vals, dtype=np.int64)


def pack_columns(columns: list[list[int]]) -> bytes:
    """Equally long columns of non-negative ints: per column (smallest value, bit width), then the bits."""
    head, bits, shift = bytearray(), 0, 0
    for col in columns:
        base = min(col, default=0)
        width = (max(col, default=0) - base).bit_length()
        if width > MAX_WIDTH or base < 0:
            raise NoCompact(f"a column needs {width} bits")
        varint(base, head)
        head.append(width)
        for v in col:
            bits |= (v - base) << shift
            shift += width
    return bytes(head) + bits.to_bytes((shift + 7) // 8, "little")


def _column_layout(buf: bytes, rows: int, ncols: int) -> tuple[list[tuple[int, int]], int]:
    pos, layout, total = 0, [], 0
    for _ in range(ncols):
        base, pos = read_varint(buf, pos)
        width = buf[pos] if pos < len(buf) else 255
        if width > MAX_WIDTH or base >= 2**62:
            raise Rejected("malformed_cbor", "a packed column needs a base under 2**62 and at most 40 bits")
        layout.append((base, width))
        total += rows * width
        pos += 1
    if len(buf) - pos != (total + 7) // 8:
        raise Rejected("malformed_cbor", f"{len(buf) - pos} bytes of packed columns for {total} bits")
    return layout, pos


def unpack_columns(buf: bytes, rows: int, ncols: int) -> list[list[int]]:
    """The ``ncols`` columns of ``rows`` values :func:`pack_columns` packed; raises Rejected."""
    layout, pos = _column_layout(buf, rows, ncols)
    bits = int.from_bytes(buf[pos:], "little")
    out = []
    for base, width in layout:
        mask = (1 << width) - 1
        out.append([base + (bits >> i & mask) for i in range(0, rows * width, width)] if width else [base] * rows)
        bits >>= rows * width
    return out


