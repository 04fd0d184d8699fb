"""Input streams for the agent: a file replayed, JSON lines on stdin, a folder of images, an MQTT topic,
a video file, a camera or an RTSP stream.

Each source yields either a sample (numpy array, or a :class:`Sample` that
carries its own id) or a :class:`BadSample` saying why a line could not be
read, so one bad line is counted and logged, and the stream goes on. Live
sources (MQTT, cameras, RTSP) keep a bounded queue: when the model is slower
than the source, the oldest inputs are dropped and counted (``dropped``).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np

from edge_runtime.errors import InvalidInputError

log = logging.getLogger("edgeops.inputs")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".pgm", ".ppm")
MAX_MESSAGE = 1 << 20          # an MQTT input message larger than this is refused unread
MAX_ID = 128                   # characters of an input id


@dataclass(frozen=True)
class Sample:
    """An input that carries its own id (``{"id": ..., "x": [...]}``); the id goes out with its prediction."""

    id: object
    x: object


@dataclass(frozen=True)
class Labelled:
    """A replayed sample with its true label (a file's label column): the agent joins it to the prediction."""

    x: object
    y: object


def input_id(sample, index: int) -> tuple[object, object]:
    """(id, what to predict on): a :class:`Sample`'s own id, an image file's name, else the input's index."""
    if isinstance(sample, Sample):
        return sample.id, sample.x
    if isinstance(sample, Path):
        return sample.name, sample
    return index, sample


@dataclass(frozen=True)
class BadSample:
    """A line or file that is not a usable sample."""

    where: str
    reason: str


def _load_npy(p: Path) -> np.ndarray:
    return np.load(p, allow_pickle=False)


def _load_npz(p: Path) -> np.ndarray:
    with np.load(p, allow_pickle=False) as z:
        if "X" not in z.files:
            raise InvalidInputError(f"input {p}: .npz needs an array named X")
        return z["X"]


def _csv_has_header(p: Path) -> bool:
    """Whether the first line of a .csv file is something else than numbers."""
    with open(p) as fh:
        first = fh.readline()
    try:
        [float(v) for v in first.strip().split(",")]
    except ValueError:
        return True
    return False


def _load_csv(p: Path) -> np.ndarray:
    skip = 1 if _csv_has_header(p) else 0
    return np.loadtxt(p, delimiter=",", skiprows=skip, ndmin=2, dtype=np.float32)


def _unknown_suffix(p: Path) -> np.ndarray:
    raise InvalidInputError(f"input {p}: use .csv, .npy or .npz (or a folder of images, or - for stdin)")


_ROW_LOADERS = {".npy": _load_npy, ".npz": _load_npz, ".csv": _load_csv}


def _load_rows(p: Path) -> np.ndarray:
    """The array a .npy, .npz or .csv file holds."""
    try:
        return _ROW_LOADERS.get(p.suffix, _unknown_suffix)(p)
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"input {p}: not readable ({str(exc)[:120]})") from None


def _as_samples(X: np.ndarray, n_values: int | None) -> np.ndarray:
    """One row per sample: a vector is a column; a trailing label column (one more than n_values) is dropped."""
    if X.ndim == 1:
        X = X[:, None]
    if n_values is not None and X.ndim == 2 and X.shape[1] == n_values + 1:
        X = X[:, :n_values]  # a trailing label column
    return X


def read_rows(path: str | Path, n_values: int | None = None) -> np.ndarray:
    """Samples from .npy, .npz (array X) or .csv (numbers; a header line is skipped)."""
    p = Path(path)
    if not p.is_file():
        raise InvalidInputError(f"input {p}: no such file")
    X = _as_samples(np.asarray(_load_rows(p), dtype=np.float32), n_values)
    if len(X) == 0:
        raise InvalidInputError(f"input {p}: no samples")
    return X


def _npz_labels(p: Path, label_column: str | None) -> np.ndarray | None:
    """The labels array of a .npz: the one named, else y or labels; None when it has neither."""
    with np.load(p, allow_pickle=False) as z:
        key = label_column or next((k for k in ("y", "labels") if k in z.files), None)
        if key is None:
            return None
        if key not in z.files:
            raise InvalidInputError(f"input {p}: no array named {key!r} for the labels")
        return np.asarray(z[key]).ravel()


def _npz_with_labels(p: Path, n_values: int | None,
                     label_column: str | None) -> tuple[np.ndarray, np.ndarray | None]:
    X = read_rows(p, n_values)
    y = _npz_labels(p, label_column)
    if y is not None and len(y) != len(X):
        raise InvalidInputError(f"input {p}: {len(y)} labels for {len(X)} samples")
    return X, y


def read_labelled_rows(path: str | Path, n_values: int | None = None,
                       label_column: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Samples and their labels: a .csv column named (or numbered, from 0) ``label_column``, or the ``y``
    (or ``labels``) array of a .npz; (samples, None) when the file has no labels."""
    p = Path(path)
    if p.suffix == ".npz" and p.is_file():
        return _npz_with_labels(p, n_values, label_column)
    if label_column is None:
        return read_rows(p, n_values), None
    if p.suffix != ".csv":
        raise InvalidInputError(f"input {p}: --label-column takes a .csv file (a .npz carries its labels as y)")
    return _csv_with_labels(p, label_column)


def _csv_rows(p: Path) -> list[list[str]]:
    import csv

    try:
        with open(p, newline="") as fh:
            return list(csv.reader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInputError(f"input {p}: not readable ({str(exc)[:120]})") from None


def _all_numbers(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
    except ValueError:
        return False
    return True


def _label_column(p: Path, rows: list[list[str]], label_column: str) -> tuple[int, list[list[str]]]:
    """(index of the label column, the data rows): a column named in the header, or numbered from 0."""
    header = [h.strip() for h in rows[0]] if rows else []
    if label_column in header:
        return header.index(label_column), rows[1:]
    if label_column.isdigit() and header and int(label_column) < len(header):
        # a header line that names other columns is skipped
        return int(label_column), rows if _all_numbers(header) else rows[1:]
    raise InvalidInputError(f"input {p}: no column {label_column!r} (columns: {', '.join(header)[:200]})")


def _features_without(p: Path, rows: list[list[str]], col: int) -> np.ndarray:
    """The rows' values but column col, as float32."""
    try:
        return np.array([[float(v) for j, v in enumerate(r) if j != col] for r in rows], dtype=np.float32)
    except ValueError as exc:
        raise InvalidInputError(f"input {p}: a feature is not a number ({str(exc)[:120]})") from None


def _csv_with_labels(p: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    col, rows = _label_column(p, _csv_rows(p), label_column)
    rows = [r for r in rows if r]
    X = _features_without(p, rows, col)
    if len(X) == 0 or X.ndim != 2:
        raise InvalidInputError(f"input {p}: no samples (or rows of different lengths)")
    return X, np.array([r[col].strip() for r in rows])


def replay_labelled(X: np.ndarray, y: np.ndarray, loop: bool = False) -> Iterator[Labelled]:
    """The samples of a file with their labels (the agent predicts, then joins the label)."""
    while True:
        for x, label in zip(X, y, strict=True):
            yield Labelled(x, label.item() if hasattr(label, "item") else label)
        if not loop:
            return


def replay(X: np.ndarray, loop: bool = False) -> Iterator[np.ndarray]:
    while True:
        yield from X
        if not loop:
            return


def parse_sample(text: str | bytes, where: str) -> np.ndarray | Sample | BadSample:
    """One JSON sample: ``[1.0, 2.0, ...]`` or ``{"id": ..., "x": [...]}`` ("inputs"/"features" too).

    >>> parse_sample('{"id": "s-1", "x": [1, 2]}', "line 1")
    Sample(id='s-1', x=array([1., 2.], dtype=float32))
    >>> parse_sample('[1, "a"]', "line 2").reason
    'values are not all numbers'
    """
    doc = _decode_json(text)
    if isinstance(doc, _NotJson):
        return BadSample(where, doc.reason)
    sid = None
    if isinstance(doc, dict):
        sid = doc.get("id")
        if not _valid_id(sid):
            return BadSample(where, f"id must be a string or an integer of at most {MAX_ID} characters")
        doc = _sample_values(doc)
    if not isinstance(doc, list):
        return BadSample(where, "expected a list of numbers or an object with key 'x'")
    try:
        x = np.asarray(doc, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        return BadSample(where, "values are not all numbers")
    return x if sid is None else Sample(sid, x)


@dataclass(frozen=True)
class _NotJson:
    reason: str


def _decode_json(text: str | bytes):
    """The JSON document in text, or a _NotJson saying why there is none."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return _NotJson(f"not JSON ({exc.msg})")
    except (RecursionError, UnicodeDecodeError, ValueError):
        return _NotJson("not JSON (nested too deep or not UTF-8)")


def _sample_values(doc: dict):
    """What a sample object holds under "x" (or "inputs", "features"); None when none of them."""
    return next((doc[k] for k in ("x", "inputs", "features") if k in doc), None)


def _valid_id(sid) -> bool:
    """No id, or a string or an integer (not a bool) of at most MAX_ID characters."""
    return sid is None or (isinstance(sid, (str, int)) and not isinstance(sid, bool) and len(str(sid)) <= MAX_ID)


class _Idle:
    """What a live input yields when nothing came for a while (see :data:`IDLE`)."""

    def __repr__(self) -> str:
        return "IDLE"


#: Yielded by live inputs (stdin, MQTT, video) after IDLE_S seconds without an input, so that the run loop
#: closes windows on time and notices a stop although nothing arrives. Not an input: never predicted.
IDLE = _Idle()
IDLE_S = 0.5
MAX_LINE = 16 << 20            # a stdin line longer than this is refused (and skipped to its end)


def json_lines(stream: IO[str] | None = None) -> Iterator[np.ndarray | Sample | BadSample | _Idle]:
    """Samples from JSON lines (see :func:`parse_sample`). From a stream with a file descriptor (stdin, a
    pipe), :data:`IDLE` between them whenever no line came for IDLE_S seconds."""
    stream = stream or sys.stdin
    try:
        lines = _fd_lines(stream.fileno())
    except (AttributeError, OSError, ValueError):     # io.StringIO and the like: no descriptor to wait on
        lines = iter(stream)
    n = 0
    for line in lines:
        if line is IDLE:
            yield IDLE
            continue
        n += 1
        if isinstance(line, _TooLong):
            yield BadSample(f"line {n}", f"longer than {MAX_LINE} bytes")
            continue
        line = line.strip()
        if line:
            yield parse_sample(line, f"line {n}")


class _TooLong:
    """A line past MAX_LINE (its bytes are dropped as they come)."""


def _fd_lines(fd: int, idle_s: float = IDLE_S, max_line: int = MAX_LINE) -> Iterator[bytes | _TooLong | _Idle]:
    """The lines read from ``fd`` (without their newline), :data:`IDLE` after each ``idle_s`` without data,
    and a _TooLong for a line longer than ``max_line`` (memory stays bounded however long it is).

    >>> r, w = os.pipe()
    >>> _ = os.write(w, b'[1]\\n[2'); os.close(w)
    >>> list(_fd_lines(r))
    [b'[1]', b'[2']
    >>> os.close(r)
    """
    buf, too_long = bytearray(), False
    while True:
        ready, _, _ = select.select([fd], [], [], idle_s)
        if not ready:
            yield IDLE
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:                       # end of input: the last line needs no newline
            if too_long or len(buf) > max_line:
                yield _TooLong()
            elif buf:
                yield bytes(buf)
            return
        buf += chunk
        while (end := buf.find(b"\n")) >= 0:
            if too_long or end > max_line:
                yield _TooLong()
                too_long = False
            else:
                yield bytes(buf[:end])
            del buf[:end + 1]
        if len(buf) > max_line:
            too_long = True
            buf.clear()


def _image_paths(d: Path) -> list[Path]:
    """The image files of a folder, by name; InvalidInputError when it has none."""
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidInputError(f"input {d}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def image_files(folder: str | Path, loop: bool = False) -> Iterator[Path]:
    files = _image_paths(Path(folder))
    while True:
        yield from files
        if not loop:
            return


class LiveQueue:
    """What a live source has produced and the model has not taken yet: bounded, the oldest dropped first.

    Iterating blocks until an item arrives (yielding :data:`IDLE` every IDLE_S seconds meanwhile) and ends
    once :meth:`close` is called and the queue is empty.
    """

    def __init__(self, name: str, max_items: int):
        self.name = name
        self._items: collections.deque = collections.deque(maxlen=max(1, max_items))
        self._ready = threading.Condition()
        self._closed = False
        self.received = 0
        self.dropped = 0

    def put(self, item) -> None:
        with self._ready:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1       # the deque pushes the oldest out
                if self.dropped == 1:
                    log.warning("input %s: the model is slower than the source; the oldest inputs are dropped "
                                "and counted", self.name)
            self._items.append(item)
            self.received += 1
            self._ready.notify()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def __iter__(self) -> Iterator:
        """The items, and :data:`IDLE` after each IDLE_S seconds in which none came."""
        while True:
            with self._ready:
                if not self._items and not self._closed:
                    self._ready.wait(IDLE_S)
                if self._items:
                    item = self._items.popleft()
                elif self._closed:
                    return
                else:
                    item = IDLE
            yield item


class MqttInput(LiveQueue):
    """Samples published on an MQTT topic (sensor gateways): JSON arrays or ``{"id": ..., "x": [...]}``.

    Args:
        address: the broker (a :class:`edge_runtime.mqtt.BrokerAddress`).
        topic: topic filter to subscribe to (wildcards allowed).
        client_id: this subscription's client id.
        max_queue: inputs waiting at most; the oldest are dropped (and counted) beyond it.
        qos: subscription QoS.
    """

    def __init__(self, address, topic: str, client_id: str, max_queue: int = 1000, qos: int = 1):
        from edge_runtime.mqtt import connect_args, make_client

        super().__init__(f"mqtt:{topic}", max_queue)
        self.topic, self.qos = topic, qos
        self.subscribed = threading.Event()
        self._n = 0
        self.client = make_client(address, client_id, session_expiry=0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self._connect_args = connect_args(address, session_expiry=0)

    def start(self) -> "MqttInput":
        """Connect and subscribe in the background (returns at once; :attr:`subscribed` is set at the SUBACK)."""
        self.client.connect_async(**self._connect_args)
        self.client.loop_start()
        return self

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.error("input mqtt:%s: the broker refused the connection (%s); retrying", self.topic, reason_code)
        else:
            client.subscribe(self.topic, qos=self.qos)

    def _on_message(self, client, userdata, message) -> None:
        self._n += 1
        where = f"message {self._n} on {message.topic}"
        if len(message.payload) > MAX_MESSAGE:
            self.put(BadSample(where, f"over {MAX_MESSAGE} bytes"))
        else:
            self.put(parse_sample(message.payload, where))

    def close(self) -> None:
        """Stop taking messages; iteration ends once the queued ones are taken."""
        self.client.disconnect()
        self.client.loop_stop()
        super().close()


def is_video_source(source: str) -> bool:
    return source.startswith(("video:", "camera:", "rtsp://", "rtsps://"))


def _import_cv2(source: str):
    try:
        import cv2
    except ImportError:
        raise InvalidInputError(f"input {source}: video and cameras need OpenCV: "
                                "pip install 'edgeops[camera]'") from None
    return cv2


def _capture_target(source: str) -> int | str:
    """What OpenCV opens for a source: a camera's index, a video's path, else the URL itself."""
    kind, _, target = source.partition(":")
    if kind == "video" and not Path(target).is_file():
        raise InvalidInputError(f"input {source}: no such file")
    if kind == "camera" and not target.isdigit():
        raise InvalidInputError(f"input {source}: camera:N takes a device index (camera:0)")
    return int(target) if kind == "camera" else target if kind == "video" else source


class VideoInput(LiveQueue):
    """Frames from OpenCV (``video:PATH``, ``camera:N``, ``rtsp://...``) as the model's image input.

    A reader thread decodes frames and turns each into the model's input with the bundle's image
    preprocessing (resize, channels, normalisation from the manifest's input schema). A video file is
    read at the model's pace, every frame; a camera or stream runs at its own pace and, when the model
    is slower, the oldest frames are dropped and counted. Needs ``pip install 'edgeops[camera]'``.

    Args:
        source: ``video:PATH``, ``camera:INDEX`` or an ``rtsp://`` URL.
        image: the manifest's ``input_schema.image`` (height, width, channels, scale, mean, std).
        max_queue: frames waiting at most (a live source drops the oldest beyond it).
        live: drop frames when the model is behind (default: for cameras and streams, not for files).
    """

    def __init__(self, source: str, image: dict | None, max_queue: int = 2, live: bool | None = None):
        cv2 = _import_cv2(source)
        if not image:
            raise InvalidInputError(f"input {source}: the model takes no images (its manifest has no image schema)")
        super().__init__(source, max_queue)
        self.image = image
        self.live = not source.startswith("video:") if live is None else live
        self.capture = cv2.VideoCapture(_capture_target(source))
        if not self.capture.isOpened():
            raise InvalidInputError(f"input {source}: OpenCV cannot open it")
        self._room = threading.Semaphore(max(1, max_queue))
        self._cv2 = cv2
        self._reader = threading.Thread(target=self._read, name="edgeops-video", daemon=True)

    def start(self) -> "VideoInput":
        self._reader.start()
        return self

    def _read(self) -> None:
        from PIL import Image

        from edge_runtime.preprocess import image_to_array

        n = 0
        while not self._closed:
            if not self.live:
                self._room.acquire()      # a file waits for the model instead of dropping frames
            ok, frame = self.capture.read()
            if not ok:
                break
            rgb = self._cv2.cvtColor(frame, self._cv2.COLOR_BGR2RGB)
            self.put(Sample(n, image_to_array(Image.fromarray(rgb), self.image)))
            n += 1
        self.capture.release()
        super().close()

    def __iter__(self) -> Iterator:
        for item in super().__iter__():
            if not self.live:
                self._room.release()
            yield item

    def close(self) -> None:
        super().close()
        self._room.release()
