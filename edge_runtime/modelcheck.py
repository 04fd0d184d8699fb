"""Check a model file before any interpreter sees it.

Interpreters are native code: a truncated or crafted file can crash the
process instead of raising. These checks catch what is plainly not a model
(wrong magic, truncation, implausible structure) in pure Python; for files
from untrusted sources, :func:`probe_in_child` also loads the model in a
child process first, so a crash there is an error here.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

from edge_runtime.errors import ModelFormatError

TFLITE_IDENTIFIER = b"TFL3"


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _check_tflite_header(data: bytes, where: str) -> None:
    if len(data) < 16:
        raise ModelFormatError(f"{where}: {len(data)} bytes is too short for a TFLite model")
    if data[4:8] != TFLITE_IDENTIFIER:
        raise ModelFormatError(f"{where}: not a TFLite model (no TFL3 flatbuffer identifier)")


def _root_table(data: bytes, where: str) -> tuple[int, int, int]:
    """(root table, its vtable, the vtable's size) of a flatbuffer, each checked to lie inside the data."""
    (root,) = struct.unpack_from("<I", data, 0)
    if root + 4 > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (root table beyond the end)")
    (vtable_rel,) = struct.unpack_from("<i", data, root)
    vtable = root - vtable_rel
    if not 0 <= vtable <= len(data) - 4:
        raise ModelFormatError(f"{where}: corrupt TFLite flatbuffer (vtable out of range)")
    vt_size, table_size = struct.unpack_from("<HH", data, vtable)
    if vt_size < 4 or vtable + vt_size > len(data) or root + table_size > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (root table incomplete)")
    return root, vtable, vt_size


def _check_vector(data: bytes, field_pos: int, i: int, where: str) -> tuple[int, int]:
    """(position, length) of the vector a uoffset field points to, checked to lie inside the data."""
    (rel,) = struct.unpack_from("<I", data, field_pos)
    target = field_pos + rel
    if target + 4 > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (vector {i} beyond the end)")
    (count,) = struct.unpack_from("<I", data, target)
    if target + 4 + 4 * count > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (vector {i} incomplete)")
    return target, count


def _check_model_field(data: bytes, root: int, vtable: int, i: int, where: str) -> None:
    """Field i of the Model table points inside the file, and so do its vector and buffers."""
    (off,) = struct.unpack_from("<H", data, vtable + 4 + 2 * i)
    if not off:
        return
    if root + off + 4 > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (field {i} beyond the end)")
    if i in (2, 4, 5):  # subgraphs, buffers, metadata_buffer: vectors via uoffset
        target, count = _check_vector(data, root + off, i, where)
        if i == 4:
            _check_buffers(data, target, count, where)


def check_tflite_bytes(data: bytes, where: str = "model") -> None:
    """Raise ModelFormatError unless ``data`` looks like a complete TFLite flatbuffer."""
    _check_tflite_header(data, where)
    root, vtable, vt_size = _root_table(data, where)
    # Every field offset of the Model table must point inside the file; buffers live at the end,
    # so truncation shows up here.
    for i in range((vt_size - 4) // 2):
        _check_model_field(data, root, vtable, i, where)


def _buffer_table(data: bytes, pos: int, j: int, where: str) -> tuple[int, int, int]:
    """(table, vtable, vtable size) of buffer j, whose uoffset is at pos."""
    (rel,) = struct.unpack_from("<I", data, pos)
    table = pos + rel
    if table + 4 > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (buffer {j})")
    (vt_rel,) = struct.unpack_from("<i", data, table)
    vt = table - vt_rel
    if not 0 <= vt <= len(data) - 4:
        raise ModelFormatError(f"{where}: corrupt TFLite flatbuffer (buffer {j} vtable)")
    (vt_size,) = struct.unpack_from("<H", data, vt)
    return table, vt, vt_size


def _check_buffer_data(data: bytes, table: int, vt: int, j: int, where: str) -> None:
    """The data vector of buffer j lies inside the file."""
    (off,) = struct.unpack_from("<H", data, vt + 4)
    if not off:
        return
    (brel,) = struct.unpack_from("<I", data, table + off)
    target = table + off + brel
    if target + 4 > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (buffer {j} data)")
    (n,) = struct.unpack_from("<I", data, target)
    if target + 4 + n > len(data):
        raise ModelFormatError(f"{where}: truncated TFLite flatbuffer (buffer {j} data incomplete)")


def _check_external_buffer(data: bytes, table: int, vt: int, j: int, where: str) -> None:
    """The offset of buffer j stored outside the flatbuffer (models > 2 GB) lies inside the file."""
    (off,) = struct.unpack_from("<H", data, vt + 6)
    if off:
        (boff,) = struct.unpack_from("<Q", data, table + off)
        if boff > len(data):
            raise ModelFormatError(f"{where}: truncated TFLite model (external buffer {j})")


def _check_buffers(data: bytes, vec: int, count: int, where: str) -> None:
    for j in range(count):
        table, vt, vt_size = _buffer_table(data, vec + 4 + 4 * j, j, where)
        if vt_size >= 6:
            _check_buffer_data(data, table, vt, j, where)
        if vt_size >= 8:  # offset/size fields of buffers stored outside the flatbuffer (models > 2 GB)
            _check_external_buffer(data, table, vt, j, where)


def _skip_length_delimited(data: bytes, pos: int) -> int:
    length, pos = _varint(data, pos)
    return pos + length


# protobuf wire type: where the field's value ends, from where it starts
_WIRE_SKIPS = {
    0: lambda data, pos: _varint(data, pos)[1],
    1: lambda data, pos: pos + 8,
    2: _skip_length_delimited,
    5: lambda data, pos: pos + 4,
}


def _protobuf_fields(data: bytes) -> set[int]:
    """The field numbers of a top-level protobuf message; ValueError when it is not well-formed."""
    pos, seen = 0, set()
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise ValueError("field number 0")
        if wire not in _WIRE_SKIPS:
            raise ValueError(f"wire type {wire}")
        pos = _WIRE_SKIPS[wire](data, pos)
        if pos > len(data):
            raise ValueError("truncated")
        seen.add(field)
    return seen


def check_onnx_bytes(data: bytes, where: str = "model") -> None:
    """Raise ModelFormatError unless ``data`` parses as an ONNX ModelProto with a graph.

    Walks the protobuf wire format of the top-level message (no onnx package
    needed on a device): every field must be well-formed and a graph (field 7)
    must be present.
    """
    if len(data) < 8:
        raise ModelFormatError(f"{where}: {len(data)} bytes is too short for an ONNX model")
    try:
        seen = _protobuf_fields(data)
    except ValueError as exc:
        raise ModelFormatError(f"{where}: not a valid ONNX model (protobuf {exc})") from None
    if 7 not in seen:
        raise ModelFormatError(f"{where}: not a valid ONNX model (no graph)")
    if 1 not in seen:
        raise ModelFormatError(f"{where}: not a valid ONNX model (no ir_version)")


def check_model_file(path: str | Path) -> str:
    """The format ("tflite" or "onnx") of a model file, after checking it; ModelFormatError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ModelFormatError(f"{p}: no such model file")
    data = p.read_bytes()
    return check_model_bytes(data, str(p), hint=p.suffix.lower())


def check_model_bytes(data: bytes, where: str = "model", hint: str = "") -> str:
    """Like :func:`check_model_file` for bytes; ``hint`` is a file suffix to name the expected format."""
    if hint == ".tflite" or (not hint.endswith(".onnx") and data[4:8] == TFLITE_IDENTIFIER):
        check_tflite_bytes(data, where)
        return "tflite"
    if hint == ".onnx" or not hint:
        check_onnx_bytes(data, where)
        return "onnx"
    raise ModelFormatError(f"{where}: unsupported model file type {hint}; expected .tflite or .onnx")


_PROBE = """
import sys
from edge_runtime.backends import open_backend
b = open_backend(sys.argv[1], format=sys.argv[2])
print(len(b.inputs), len(b.outputs))
"""


def probe_in_child(path: str | Path, fmt: str, timeout: float = 60.0) -> None:
    """Load a model in a child Python first; a crash or hang there becomes a ModelFormatError here."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE, str(path), fmt], capture_output=True, text=True,
                             timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise ModelFormatError(f"{path}: loading the model did not finish within {timeout:g}s") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["no message"])[-1]
        how = f"crashed the interpreter (signal {-res.returncode})" if res.returncode < 0 else last
        raise ModelFormatError(f"{path}: the model cannot be loaded: {how}")
