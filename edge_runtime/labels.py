"""Ground truth that reaches a device late: labels joined to the predictions they belong to, by input id.

A device learns the true class of an input some time after it predicted it, and only for some
inputs (a clinician's diagnosis, a part inspected downstream, a reading confirmed by hand). The
agent keeps a bounded map of recent input id -> predicted class (:class:`LabelJoiner`, the newest
``max_ids`` ids, none older than ``max_age_s``); a label that arrives for an id still in the map
joins its prediction once, and one that finds nothing (unknown, expired, already labelled) is
counted as ``unmatched``. Joined labels add to a confusion count matrix (row: the true class,
column: the predicted one) that the next telemetry window carries as its ``labels`` block, so the
monitor can track accuracy against the bundle's holdout accuracy.

Labels come from a label column of a replayed file, the device's ``.../labels`` MQTT topic and
``POST /feedback`` on ``edgeops serve``; whoever else wants the joined labels (on-device learning,
say) subscribes with :meth:`LabelJoiner.subscribe` and is called with every :class:`Joined`.

>>> j = LabelJoiner(["benign", "malignant"])
>>> j.predicted("bed-7", 1)
>>> j.label("bed-7", "benign")
Joined(id='bed-7', predicted=1, actual=0, age_s=0.0)
>>> j.label("bed-7", "benign") is None            # labelled once; a second label is unmatched
True
>>> j.label("bed-9", 1) is None                   # never predicted here
True
>>> j.take_window()
{'n': 1, 'confusion': [[0, 1], [0, 0]], 'unmatched': 2}
>>> j.take_window() is None                       # nothing since
True
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, NamedTuple

import numpy as np

log = logging.getLogger("edgeops.labels")

MAX_IDS = 10_000          # predictions waiting for a label, at most (the oldest are forgotten first)
MAX_AGE_S = 24 * 3600.0   # a prediction older than this no longer takes a label
MAX_ID_CHARS = 128        # an input id, as in edge_runtime.inputs


class Joined(NamedTuple):
    """A label joined to its prediction: the input's id, the predicted and the true class index, and how
    long after the prediction the label came."""

    id: str
    predicted: int
    actual: int
    age_s: float


def predicted_class(output) -> int | None:
    """The class a classifier's output row says (argmax; a single sigmoid output: > 0.5), None for an
    output that is not one row of scores.

    >>> predicted_class(np.array([[0.1, 0.7, 0.2]])), predicted_class(np.array([0.8])), predicted_class([0.3])
    (1, 1, 0)
    """
    a = output if isinstance(output, np.ndarray) else np.asarray(output, dtype=np.float64)
    if a.ndim == 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 1 or a.size == 0:
        return None
    return int(a[0] > 0.5) if a.size == 1 else int(a.argmax())


def id_key(value) -> str | None:
    """An input id as the joiner keys it (ints and their decimal strings are the same id), None when the
    value cannot be an id (not a string or integer, a bool, too long)."""
    t = type(value)
    if t is str:                      # the common cases first: this runs once per inference
        return value if 0 < len(value) <= MAX_ID_CHARS else None
    if t is int:
        return str(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
        return None
    key = str(int(value)) if not isinstance(value, str) else value
    return key if 0 < len(key) <= MAX_ID_CHARS else None


def _number_in_text(y: str) -> float | None:
    """A class index written as text ("1", "1.0") as a number; None for other text."""
    try:
        return float(y) if len(y) <= 24 else None
    except ValueError:
        return None


class LabelJoiner:
    """Joins late labels to recent predictions and counts them per telemetry window (thread-safe).

    Args:
        labels: the class names in the manifest's order (a label may name its class or give its index).
        n_classes: number of classes (default: ``len(labels)``; at least 2).
        max_ids: predictions remembered at most (the oldest are forgotten first).
        max_age_s: a prediction older than this no longer takes a label (counted as unmatched).
        clock: monotonic time source.
    """

    def __init__(self, labels: list | tuple | None = None, n_classes: int | None = None, max_ids: int = MAX_IDS,
                 max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic):
        self.max_ids, self.max_age_s, self.clock = max(1, int(max_ids)), float(max_age_s), clock
        self.listeners: list[Callable[[Joined], object]] = []
        self._lock = threading.Lock()
        self.joined_total = self.unmatched_total = self.invalid_total = 0
        self.reset(labels, n_classes)

    def reset(self, labels: list | tuple | None = None, n_classes: int | None = None) -> None:
        """Start over for another model (a flash): forget the predictions and the open counts, keep listeners."""
        with self._lock:
            self.labels = [str(x) for x in labels] if labels else []
            self.n_classes = max(2, int(n_classes if n_classes is not None else len(self.labels)))
            self._names = {name: i for i, name in enumerate(self.labels)}
            self._recent: OrderedDict[str, tuple[int, float]] = OrderedDict()
            self._confusion = np.zeros((self.n_classes, self.n_classes), dtype=np.int64)
            self._unmatched = 0
            self._invalid = 0

    def subscribe(self, listener: Callable[[Joined], object]) -> None:
        """Call ``listener`` with every joined label (on the thread that delivered the label; keep it short)."""
        self.listeners.append(listener)

    def class_index(self, y) -> int | None:
        """The class a label names: a class name of the manifest, an index, or an index as a string."""
        if isinstance(y, bool):
            return None
        if isinstance(y, str):
            if y in self._names:
                return self._names[y]
            y = _number_in_text(y)
        if isinstance(y, (float, np.floating)) and np.isfinite(y) and float(y).is_integer():
            y = int(y)
        if isinstance(y, (int, np.integer)) and 0 <= int(y) < self.n_classes:
            return int(y)
        return None

    def predicted(self, input_id, cls: int) -> None:
        """Remember that input ``input_id`` was predicted as class ``cls``."""
        key = id_key(input_id)
        if key is None or not 0 <= cls < self.n_classes:
            return
        now = self.clock()
        with self._lock:
            recent = self._recent
            recent[key] = (int(cls), now)
            recent.move_to_end(key)
            while len(recent) > self.max_ids:
                recent.popitem(last=False)

    def label(self, input_id, y) -> Joined | None:
        """Join the true label ``y`` of input ``input_id`` to its prediction; None when nothing to join
        (counted as unmatched) or when ``y`` is no class of the model (counted as invalid)."""
        key = id_key(input_id)
        actual = self.class_index(y)
        now = self.clock()
        with self._lock:
            joined = self._join(key, actual, now)
        if joined is not None:
            self._tell_listeners(joined)
        return joined

    def _join(self, key: str | None, actual: int | None, now: float) -> Joined | None:
        """Count the label (under the lock): joined to a recent prediction, unmatched, or invalid."""
        if actual is None:
            self._invalid += 1
            self.invalid_total += 1
            return None
        hit = self._recent.pop(key, None) if key is not None else None
        if hit is None or now - hit[1] > self.max_age_s:
            self._unmatched += 1
            self.unmatched_total += 1
            return None
        self._confusion[actual, hit[0]] += 1
        self.joined_total += 1
        return Joined(key, hit[0], actual, round(now - hit[1], 3))

    def _tell_listeners(self, joined: Joined) -> None:
        for listener in list(self.listeners):
            try:
                listener(joined)
            except Exception:  # noqa: BLE001 - a subscriber's failure must not stop the labels
                log.exception("a label listener failed")

    def count_invalid(self, n: int = 1) -> None:
        """Count labels refused before they reached the joiner (a malformed labels message, say)."""
        with self._lock:
            self._invalid += n
            self.invalid_total += n

    @property
    def pending(self) -> bool:
        """Something to report in the next window (labels joined, unmatched or rejected since the last one)."""
        with self._lock:
            return bool(self._confusion.any() or self._unmatched or self._invalid)

    @property
    def waiting(self) -> int:
        """Predictions remembered and not yet labelled."""
        with self._lock:
            return len(self._recent)

    def take_window(self) -> dict | None:
        """The ``labels`` block of a telemetry window: labels joined (``n``, ``confusion``: rows the true
        class, columns the predicted one), ``unmatched`` and ``rejected`` (only when some were) since the
        last call; None when nothing happened."""
        with self._lock:
            n = int(self._confusion.sum())
            if not n and not self._unmatched and not self._invalid:
                return None
            out = {"n": n, "confusion": self._confusion.tolist(), "unmatched": self._unmatched}
            if self._invalid:
                out["rejected"] = self._invalid
            self._confusion[:] = 0
            self._unmatched = self._invalid = 0
            return out
