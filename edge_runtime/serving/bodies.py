"""A /predict body as model inputs: numbers or uploaded images, never paths on the server.

Every function here returns a value or raises :class:`Rejection`, which carries the
HTTP status, the error kind and a detail that says what is wrong and where. The
JSON is bounded before it is parsed: UTF-8 only, nesting depth, and how many
values it can hold (so parsing cannot cost more than a maximum batch).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge_runtime.serving.limits import ServeLimits

# Pillow decoders exposed to clients: the common formats, not every plugin Pillow has
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "PPM")
JSON_FIELDS = ("inputs", "image", "images")
FLOAT32_MAX = float(np.finfo(np.float32).max)

# linear because escaped quotes and backslashes are refused first (see parse_json)
_STRING = re.compile(r'"[^"]*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LITERAL = re.compile(r"\b(true|false|null)\b")


class Rejection(Exception):
    """A request refused: HTTP status, error kind (``bad_request``, ``invalid_input``, ...) and detail."""

    def __init__(self, status: int, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class SampleShape:
    """What one sample of the served model is: its input's name, shape, and whether it takes images."""

    name: str
    shape: tuple[int, ...]
    takes_images: bool

    @property
    def values(self) -> int:
        return int(np.prod(self.shape)) if self.shape else 1


def media_type(header: str | None) -> tuple[str, dict[str, str]]:
    """``"application/json; charset=UTF-8"`` -> ``("application/json", {"charset": "UTF-8"})``."""
    if not header:
        return "", {}
    main, *params = header.split(";")
    out = {}
    for p in params:
        key, _, value = p.partition("=")
        out[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), out


def is_plain_json(headers: Any) -> bool:
    """Request headers that say the body is uncompressed UTF-8 application/json."""
    ctype, params = media_type(headers.get("content-type"))
    return ctype == "application/json" and params.get("charset", "utf-8").lower() in ("utf-8", "utf8") \
        and headers.get("content-encoding", "identity").strip().lower() in ("", "identity")


def body_kind(ctype: str, params: dict[str, str], sample: SampleShape) -> str:
    """``"json"``, ``"image"`` or ``"multipart"`` for a Content-Type, or a 415 for any other."""
    if ctype == "application/json":
        charset = params.get("charset", "utf-8").lower()
        if charset not in ("utf-8", "utf8"):
            raise Rejection(415, "unsupported_media_type", f"JSON bodies must be UTF-8, not charset={charset}")
        return "json"
    if ctype.startswith("image/") or ctype in ("application/octet-stream", "multipart/form-data"):
        return _image_body_kind(ctype, params, sample)
    images_hint = (", or an image as image/*, multipart/form-data (field 'image') or base64 JSON {\"image\": ...}"
                   if sample.takes_images else "")
    raise Rejection(415, "unsupported_media_type",
                    f"Content-Type {ctype or '(none)'} is not taken: send application/json (UTF-8){images_hint}")


def _image_body_kind(ctype: str, params: dict[str, str], sample: SampleShape) -> str:
    """``"multipart"`` or ``"image"`` for an image Content-Type, when the model takes images."""
    if not sample.takes_images:
        raise Rejection(415, "unsupported_media_type",
                        f"this model does not take images ({ctype}); send JSON {{\"inputs\": [...]}}")
    if ctype == "multipart/form-data":
        if not params.get("boundary"):
            raise Rejection(400, "bad_request", "multipart/form-data without a boundary parameter")
        return "multipart"
    return "image"


def _check_json_size(body: bytes | bytearray, sample: SampleShape, limits: ServeLimits) -> None:
    """413 for a body with more values or strings than the largest batch; 422 for escapes in strings."""
    # counted on the raw bytes, before any copy: commas in strings only make the count larger,
    # and the strings taken here (base64) have none
    values = body.count(b",") + 1
    if values > 2 * limits.max_batch * sample.values + 64:
        raise Rejection(413, "too_large",
                        f"the body holds about {values} values; a batch of at most {limits.max_batch} samples "
                        f"of {sample.values} values is taken (--max-batch)")
    if b'\\"' in body or b"\\\\" in body:
        # no field or value taken here needs them, and without them every quote delimits a string,
        # which keeps finding the strings linear (an escaped-quote pattern backtracks on hostile input)
        raise Rejection(422, "invalid_input", "escaped quotes or backslashes in JSON strings are not taken "
                                              "(field names are plain, images are base64)")
    strings = body.count(b'"') // 2
    if strings > limits.max_batch + 16:
        raise Rejection(413, "too_large", f"the body holds {strings} strings; at most {limits.max_batch} images "
                                          "and a few field names are taken (--max-batch)")


def _load_json(text: str) -> Any:
    try:
        return json.loads(text, parse_constant=_not_finite)
    except json.JSONDecodeError as exc:
        raise Rejection(400, "bad_request", f"malformed JSON: {exc}") from None
    except ValueError as exc:       # e.g. an integer past Python's 4300-digit conversion limit
        raise Rejection(422, "invalid_input", f"a value JSON cannot be read as a number: {str(exc)[:120]}") from None


def _json_field(doc: Any) -> tuple[str, dict]:
    """(the one field given, the fields): a bare list is 'inputs'; 422 for anything else than one known field."""
    fields = {"inputs": doc} if isinstance(doc, list) else doc
    if not isinstance(fields, dict):
        raise Rejection(422, "invalid_input",
                        f"the body must be a JSON object {{\"inputs\": [...]}} (or a list), not {_json_type(doc)}")
    unknown = sorted(set(fields) - set(JSON_FIELDS))
    given = [k for k in JSON_FIELDS if k in fields]
    if unknown or len(given) != 1:
        what = f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown else f"fields {given}"
        raise Rejection(422, "invalid_input", f"{what}: send exactly one of 'inputs' (numbers), 'image' (base64) "
                                              "or 'images' (a list of base64)")
    return given[0], fields


def _json_images(field: str, fields: dict, sample: SampleShape, limits: ServeLimits) -> Any:
    """The base64 'image' or 'images' of a JSON body as PIL images, when the model takes images."""
    if not sample.takes_images:
        raise Rejection(422, "invalid_input", f"this model does not take images; send 'inputs' (numbers), "
                                              f"not {field!r}")
    if field == "image":
        return decode_image(_base64(fields["image"], "'image'"), limits, "'image'")
    items = fields["images"]
    if not isinstance(items, list) or not items:
        raise Rejection(422, "invalid_input", "'images' must be a non-empty list of base64 strings")
    _check_batch(len(items), limits)
    return [decode_image(_base64(s, f"'images'[{i}]"), limits, f"'images'[{i}]") for i, s in enumerate(items)]


def parse_json(body: bytes | bytearray, sample: SampleShape, limits: ServeLimits) -> Any:
    """A JSON body as a float32 array (numbers) or PIL images (base64), bounded before it is parsed."""
    _check_json_size(body, sample, limits)
    text = _utf8(body)
    skeleton = _STRING.sub('""', text)
    depth = _nesting_depth(skeleton)
    if depth > limits.max_depth:
        raise Rejection(400, "bad_request",
                        f"JSON nested {depth} levels deep; the limit is {limits.max_depth} (--max-depth)")
    field, fields = _json_field(_load_json(text))
    literal = _LITERAL.search(skeleton)
    if literal:
        raise Rejection(422, "invalid_input", f"{field!r}: {literal.group(1)} is not a number "
                                              "(booleans and null are refused: send numbers)")
    if field == "inputs":
        return numbers(fields["inputs"], sample, limits)
    return _json_images(field, fields, sample, limits)


def _number_array(x: Any, sample: SampleShape) -> np.ndarray:
    """A JSON list as an array of numbers (integers past int64 as float64); 422 for anything else."""
    name = sample.name
    if not isinstance(x, list):
        raise Rejection(422, "invalid_input", f"input {name!r}: 'inputs' must be a list (one sample) or a list "
                                              f"of lists (a batch), not {_json_type(x)}")
    try:
        arr = np.asarray(x)
    except ValueError:
        raise Rejection(422, "invalid_input", f"input {name!r}: lists of different lengths; expected "
                                              f"{list(sample.shape)} values per sample") from None
    if arr.dtype.kind == "O":
        arr = _object_numbers(arr, name)
    if arr.dtype.kind in "US":
        raise Rejection(422, "invalid_input",
                        f"input {name!r}: expected numbers, got strings (a string is never read as a file on the "
                        "server: upload an image as image/*, multipart/form-data or base64 'image')")
    if arr.dtype.kind not in "iuf":
        raise Rejection(422, "invalid_input", f"input {name!r}: expected numbers, got {arr.dtype.name}")
    return arr


def _finite_float32(arr: np.ndarray, name: str) -> np.ndarray:
    """arr as float32; 422 naming the first value that is not a finite float32 number."""
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32)
    # a value just past float32's range rounds to its maximum: refused like the OpenAPI schema says
    bad = ~np.isfinite(out) | (np.abs(arr) > FLOAT32_MAX)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise Rejection(422, "invalid_input", f"input {name!r}: the value at {list(where)} is not a finite "
                                              "float32 number")
    return out


def numbers(x: Any, sample: SampleShape, limits: ServeLimits) -> np.ndarray:
    """JSON numbers (one sample or a batch) as a finite float32 array; strings, booleans, null refused."""
    arr = _number_array(x, sample)
    if arr.size == 0:
        raise Rejection(422, "invalid_input", f"input {sample.name!r}: no values")
    out = _finite_float32(arr, sample.name)
    if out.ndim == len(sample.shape) + 1:
        _check_batch(out.shape[0], limits)
    return out


def _open_image(Image, data: bytes, where: str) -> Any:  # noqa: N803 - the PIL module passed in
    """The image's header read (its pixels not decoded yet); 413 for a decompression bomb, 422 otherwise."""
    try:
        return Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise Rejection(413, "too_large", f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - Pillow's plugins raise many types on hostile bytes
        raise Rejection(422, "invalid_input", f"{where}: not a readable {'/'.join(IMAGE_FORMATS)} image "
                                              f"({type(exc).__name__})") from None


def decode_image(data: bytes, limits: ServeLimits, where: str) -> Any:
    """Uploaded bytes as a loaded PIL image; its size is checked before its pixels are decoded."""
    try:
        from PIL import Image
    except ImportError:
        raise Rejection(415, "unsupported_media_type",
                        "this server cannot read images: it needs Pillow (pip install 'edgeops[serve]')") from None
    if not data:
        raise Rejection(422, "invalid_input", f"{where}: empty image")
    img = _open_image(Image, data, where)
    w, h = img.size
    if w * h > limits.max_image_pixels:
        raise Rejection(413, "too_large", f"{where}: {w}x{h} is {w * h} pixels, over the limit of "
                                          f"{limits.max_image_pixels} (--max-image-pixels)")
    try:
        img.load()
    except Exception as exc:  # noqa: BLE001
        raise Rejection(422, "invalid_input", f"{where}: damaged {img.format} image ({type(exc).__name__})") from None
    return img


def _check_batch(n: int, limits: ServeLimits) -> None:
    if n > limits.max_batch:
        raise Rejection(413, "too_large", f"a batch of {n} samples is over the limit of {limits.max_batch} "
                                          "(--max-batch)")


def _utf8(body: bytes | bytearray) -> str:
    if body[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in body:
        raise Rejection(415, "unsupported_media_type",
                        "JSON bodies must be UTF-8 (RFC 8259); this one looks like UTF-16 or UTF-32")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejection(415, "unsupported_media_type", f"the body is not UTF-8 (byte {exc.start})") from None
    return text.removeprefix("\ufeff")


def _nesting_depth(skeleton: str) -> int:
    """Deepest bracket nesting of JSON whose strings are emptied, without recursion."""
    brackets = _NOT_BRACKET.sub("", skeleton)
    if not brackets:
        return 0
    b = np.frombuffer(brackets.encode("ascii"), np.uint8)
    steps = np.where((b == ord("[")) | (b == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _not_finite(name: str) -> Any:
    raise Rejection(422, "invalid_input", f"{name} is not a finite number: inputs must be finite numbers")


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise Rejection(422, "invalid_input", f"{where} must be a base64 string, not {_json_type(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise Rejection(422, "invalid_input", f"{where} is not valid base64") from None


def _object_numbers(arr: np.ndarray, name: str) -> np.ndarray:
    """An object array from JSON: integers past int64 are numbers, anything else is refused."""
    flat = arr.ravel()
    others = {type(v) for v in flat if type(v) not in (int, float)}
    if others:
        words = {str: "strings", dict: "objects", list: "lists of different lengths"}
        got = ", ".join(sorted(words.get(t, t.__name__) for t in others))
        raise Rejection(422, "invalid_input", f"input {name!r}: expected numbers, got {got}")
    try:
        return arr.astype(np.float64)
    except OverflowError:
        raise Rejection(422, "invalid_input", f"input {name!r}: a value is not a finite float32 number") from None


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")
