"""On-device fine-tuning: the bundle's trainable LiteRT artifact, its checkpoints and a probation.

A bundle converted with ``--trainable`` holds one more artifact (``role: "trainable"``, see
docs/bundle.md): a LiteRT model with four signatures that share resource variables holding the
last Dense layer's weights (everything before it is frozen into constants):

- ``train(x, y, lr) -> loss``: one SGD step of softmax cross-entropy on a labelled batch,
- ``infer(x) -> output``: class probabilities with the current weights,
- ``save() -> weights`` and ``restore(weights) -> weights``: the weights as tensors.

Only LiteRT builtin operators are used (the ``ai-edge-litert`` wheel has no flex delegate), so the
interpreter that runs the bundle trains it too. :class:`Trainer` adds what a device needs around
it: checkpoints in its state folder (written atomically, restored by the next Trainer), and a
probation: every ``holdout_every``-th labelled sample is held back, and an update round whose
accuracy on the held-back samples is worse than before it is undone.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import zipfile
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_runtime.backends import TensorInfo
from edge_runtime.backends.tflite import tflite_interpreter_class
from edge_runtime.bundle import Bundle, open_bundle
from edge_runtime.errors import BundleError, InvalidInputError, ModelFormatError, VerificationError
from edge_runtime.input_check import as_batch
from edge_runtime.model import EdgeModel

log = logging.getLogger("edgeops.training")

ROLE = "trainable"
SIGNATURES = ("train", "infer", "save", "restore")
CHECKPOINT = "checkpoint.npz"
DEFAULT_LEARNING_RATE = 0.1
MAX_HELD_BACK = 512          # held-back samples kept for the probation (the newest)
MIN_HELD_BACK = 10           # below this many, a round is accepted without a probation


def trainable_artifact(manifest: dict | None) -> dict | None:
    """The manifest entry of the bundle's trainable artifact, or None."""
    for art in (manifest or {}).get("artifacts", []):
        if art.get("role") == ROLE:
            return art
    return None


def _some(names: list) -> str:
    """The first dozen class names, for messages."""
    return ", ".join(map(str, names[:12])) + (", ..." if len(names) > 12 else "")


def _same_shapes(weights: dict[str, np.ndarray], have: dict[str, np.ndarray]) -> bool:
    """The same weight names as the model's, each of its shape."""
    return set(weights) == set(have) and all(np.shape(weights[k]) == have[k].shape for k in have)


class TrainableModel:
    """The trainable artifact in one interpreter: its four signatures share the weights."""

    def __init__(self, data: bytes, where: str = "model.trainable.tflite", threads: int | None = None):
        cls, self.name, self.version = tflite_interpreter_class()
        self._data = data  # the interpreter reads from this buffer: keep it alive
        it, sigs = self._load(cls, data, where, threads)
        self.interpreter = it
        self.threads = threads
        self._runners = {s: it.get_signature_runner(s) for s in SIGNATURES}
        self._x_name = sigs["infer"]["inputs"][0]
        self._out_name = sigs["infer"]["outputs"][0]
        # [1] (a rank-0 input crashes LiteRT on aarch64); () in artifacts made before that was known
        self._lr_shape = tuple(int(d) for d in self._runners["train"].get_input_details()["lr"]["shape"])
        details = self._runners["infer"].get_input_details()[self._x_name]
        self.input_shape = tuple(int(d) for d in details["shape_signature"])
        self.n_classes = int(self._runners["infer"].get_output_details()[self._out_name]["shape_signature"][-1])
        self.inputs = [TensorInfo(self._x_name, "float32", self.input_shape)]
        self.outputs = [TensorInfo(self._out_name, "float32", (-1, self.n_classes))]

    def _load(self, cls, data: bytes, where: str, threads: int | None) -> tuple[Any, dict]:
        """(interpreter, its signatures); ModelFormatError unless it loads and has the training signatures."""
        try:
            kwargs: dict[str, Any] = {"model_content": data}
            if threads:
                kwargs["num_threads"] = threads
            it = cls(**kwargs)
            sigs = it.get_signature_list()
        except Exception as exc:  # noqa: BLE001 - native code raises ValueError, RuntimeError, ...
            raise ModelFormatError(f"{where}: {self.name} cannot load it ({type(exc).__name__}: {exc})") from None
        missing = [s for s in SIGNATURES if s not in sigs]
        if missing:
            raise ModelFormatError(f"{where}: not a trainable model (signatures {', '.join(missing)} missing; "
                                   f"it has {', '.join(sigs) or 'none'})")
        return it, sigs

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step on model-space inputs ``x`` and class indices ``y``; the batch's mean loss."""
        out = self._runners["train"](x=x, y=y.astype(np.int32), lr=np.full(self._lr_shape, lr, dtype=np.float32))
        return float(next(iter(out.values())))

    def infer(self, x: np.ndarray) -> np.ndarray:
        return np.array(self._runners["infer"](**{self._x_name: x})[self._out_name])

    def weights(self) -> dict[str, np.ndarray]:
        return {k: np.array(v) for k, v in self._runners["save"]().items()}

    def set_weights(self, weights: dict[str, np.ndarray]) -> None:
        have = self.weights()
        if not _same_shapes(weights, have):
            shapes = {k: list(np.shape(v)) for k, v in weights.items()}
            want = {k: list(v.shape) for k, v in have.items()}
            raise InvalidInputError(f"weights {shapes} do not fit the trainable model ({want})")
        self._runners["restore"](**{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})

    # the Backend interface, so an EdgeModel predicts with the current weights
    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return [self.infer(feeds[0])]


@dataclass(frozen=True)
class Round:
    """What one update round did.

    Attributes:
        loss: mean training loss over this batch's steps (None when every sample was held back).
        trained: samples trained on; held_back: samples of this batch set aside for the probation.
        accuracy_before, accuracy_after: accuracy on the held-back samples with the weights kept before the
            round and with the round's (None when not judged, or fewer than ``MIN_HELD_BACK`` held back).
        reverted: the round made that accuracy worse and was undone.
        updates: kept training steps so far (all rounds, restarts included).
        judged: this batch ended an update round (``round_samples`` trained samples): the probation ran
            and the outcome was checkpointed; until then the batch's steps are pending.
    """

    loss: float | None
    trained: int
    held_back: int
    accuracy_before: float | None
    accuracy_after: float | None
    reverted: bool
    updates: int
    judged: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _trainable_bytes(bundle: Bundle) -> tuple[dict, Path, bytes]:
    """(manifest entry, path, bytes) of the bundle's trainable artifact, its sha256 checked."""
    art = trainable_artifact(bundle.manifest)
    if art is None:
        raise BundleError(f"{bundle.root}: the bundle has no trainable artifact (convert it with --trainable)")
    path = bundle.root / art["file"]
    if not path.is_file():
        raise BundleError(f"{path}: the trainable artifact is no longer on disk")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != art["sha256"]:
        raise VerificationError(f"{path}: sha256 differs from the manifest (altered since the bundle was opened)")
    return art, path, data


def _read_checkpoint(path: Path) -> tuple[dict, dict, tuple[np.ndarray, np.ndarray] | None]:
    """(metadata, weights by name, held-back samples and labels or None) of a checkpoint file."""
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        weights = {k[2:]: np.array(z[k]) for k in z.files if k.startswith("w_")}
        held = (np.array(z["held_x"]), np.array(z["held_y"])) if "held_y" in z.files else None
    return meta, weights, held


class Trainer:
    """Fine-tunes a bundle's trainable artifact on labelled batches, with checkpoints and a probation.

    Args:
        bundle: an opened bundle (or a path to one) holding a trainable artifact.
        state_dir: where checkpoints go (a folder of its own; created).
        learning_rate: SGD step size (default: the manifest's, else 0.05).
        batch_size: samples per training step; a round trains ``epochs`` passes over its batch.
        holdout_every: every n-th labelled sample is held back for the probation (0: no probation).
        round_samples: an update round ends (is judged and checkpointed) once this many samples were
            trained on; steps of an unfinished round are lost on a restart.
        tolerance: a round is undone when the held-back accuracy falls by more than this (a share: 0.02
            is two points), so one sample's flip in a small held-back set does not undo every round.
        threads: interpreter threads.
        public_key: with a bundle path, the Ed25519 key its signature must verify with.
        verify_vectors: run the manifest's test vectors of the trainable artifact before any checkpoint
            is restored (``QualityCheckError`` when they differ).
    """

    def __init__(self, bundle: Bundle | str | Path, state_dir: str | Path, *,  # noqa: PLR0913 - keyword options
                 learning_rate: float | None = None, batch_size: int = 32, epochs: int = 3,
                 holdout_every: int = 5, threads: int | None = None, public_key: Any = None,
                 verify_vectors: bool = True, tolerance: float = 0.02, round_samples: int = 64):
        if not isinstance(bundle, Bundle):
            bundle = open_bundle(bundle, public_key=public_key)
        art, path, data = _trainable_bytes(bundle)
        self.artifact = art
        self.net = TrainableModel(data, art["file"], threads)
        self.model = EdgeModel(self.net, path, bundle, art)   # input checks, normalization, labels
        training = art.get("training") or {}
        self.learning_rate = float(learning_rate or training.get("learning_rate") or DEFAULT_LEARNING_RATE)
        self.batch_size, self.epochs, self.holdout_every = int(batch_size), int(epochs), int(holdout_every)
        self.tolerance = float(tolerance)
        self.round_samples = max(1, int(round_samples))
        self._pending = self._pending_steps = 0    # trained since the last judgment
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.updates = 0
        self.reverted = 0
        self.seen = 0                       # labelled samples received (which one is held back)
        self.held_x: deque = deque(maxlen=MAX_HELD_BACK)
        self.held_y: deque = deque(maxlen=MAX_HELD_BACK)
        if verify_vectors:
            self.model.check_test_vectors()   # the bundle's own weights answer as at conversion
        self.initial = self.net.weights()
        self._accepted = self.initial
        self.restored = self._restore()

    # ---- inputs --------------------------------------------------------------------------------

    def _inputs(self, x: Any) -> np.ndarray:
        batch, _single = as_batch(x, self.model.input_spec, "reject")
        return self.model._to_model(np.array(batch, dtype=np.float32))

    def _labels(self, y: Any, n: int) -> np.ndarray:
        names = self.model.labels or []
        raw = list(y) if isinstance(y, (list, tuple, np.ndarray)) else [y]
        if len(raw) != n:
            raise InvalidInputError(f"{len(raw)} labels for {n} samples: give one label per sample")
        out = np.empty(n, dtype=np.int32)
        for i, v in enumerate(raw):
            out[i] = self._class_index(v, names, i)
        return out

    def _class_index(self, v: Any, names: list, i: int) -> int:
        if isinstance(v, str) and v in names:
            return names.index(v)
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer, str)):
            raise InvalidInputError(f"label {i}: {v!r} is not a class (give a class name or index)")
        try:
            idx = int(v)
        except ValueError:
            raise InvalidInputError(f"label {i}: {v!r} is not a class of this model ({_some(names)})") from None
        if not 0 <= idx < self.net.n_classes:
            raise InvalidInputError(f"label {i}: class index {idx} is out of range 0..{self.net.n_classes - 1}")
        return idx

    # ---- training ------------------------------------------------------------------------------

    def infer(self, x: Any) -> np.ndarray:
        """Class probabilities with the current weights (one sample: one row; a batch: a batch)."""
        return self.model.predict(x)

    def accuracy(self, x: Any, y: Any) -> float:
        xs = self._inputs(x)
        return float((self.net.infer(xs).argmax(axis=1) == self._labels(y, len(xs))).mean())

    def train(self, x: Any, y: Any) -> Round:
        """Train on a labelled batch (every ``holdout_every``-th sample is held back instead). Once
        ``round_samples`` samples were trained on since the last judgment, the round is judged: kept
        and checkpointed when the held-back accuracy did not fall by more than ``tolerance``, else undone."""
        xs = self._inputs(x)
        ys = self._labels(y, len(xs))
        hold = np.zeros(len(xs), dtype=bool)
        if self.holdout_every > 0:
            hold = (np.arange(self.seen, self.seen + len(xs)) % self.holdout_every) == self.holdout_every - 1
        self.seen += len(xs)
        for row, label in zip(xs[hold], ys[hold], strict=True):
            self.held_x.append(row)
            self.held_y.append(int(label))
        losses = self._steps(xs[~hold], ys[~hold])
        self._pending += int((~hold).sum())
        self._pending_steps += len(losses)
        before = after = None
        reverted = judged = False
        if self._pending >= self.round_samples:
            before, after, reverted = self.judge()
            judged = True
        return Round(float(np.mean(losses)) if losses else None, int((~hold).sum()), int(hold.sum()),
                     before, after, reverted, self.updates, judged)

    def judge(self) -> tuple[float | None, float | None, bool]:
        """End the update round: compare the held-back accuracy of the kept weights and the current ones;
        undo the round when it fell by more than ``tolerance``, else keep and checkpoint it.
        Returns (accuracy before, after, undone)."""
        current = self.net.weights()
        after = self._held_accuracy()
        before = None
        if after is not None:
            self.net.set_weights(self._accepted)
            before = self._held_accuracy()
            self.net.set_weights(current)
        reverted = before is not None and after is not None and after < before - self.tolerance
        if reverted:
            self.net.set_weights(self._accepted)
            self.reverted += 1
            log.warning("update round undone: held-back accuracy %.3f -> %.3f", before, after)
        else:
            self.updates += self._pending_steps
            self._accepted = current
        self._pending = self._pending_steps = 0
        self.save()
        return before, after, reverted

    def _steps(self, xs: np.ndarray, ys: np.ndarray) -> list[float]:
        losses = []
        for _ in range(self.epochs):
            for i in range(0, len(xs), self.batch_size):
                losses.append(self.net.train_step(xs[i:i + self.batch_size], ys[i:i + self.batch_size],
                                                  self.learning_rate))
        return losses

    def _held_accuracy(self) -> float | None:
        if len(self.held_y) < MIN_HELD_BACK:
            return None
        pred = self.net.infer(np.stack(self.held_x)).argmax(axis=1)
        return float((pred == np.asarray(self.held_y)).mean())

    def reset(self) -> None:
        """Back to the bundle's weights (the checkpoint is replaced)."""
        self.net.set_weights(self.initial)
        self._accepted = self.initial
        self.updates = self._pending = self._pending_steps = 0
        self.save()

    # ---- checkpoints ---------------------------------------------------------------------------

    @property
    def checkpoint_path(self) -> Path:
        return self.state_dir / CHECKPOINT

    def save(self) -> Path:
        """Write the accepted weights, counters and held-back samples: temp file, fsync, rename."""
        meta = {"artifact_sha256": self.artifact["sha256"], "updates": self.updates, "reverted": self.reverted,
                "seen": self.seen}
        arrays = {f"w_{k}": v for k, v in self._accepted.items()}
        if self.held_y:
            arrays["held_x"] = np.stack(self.held_x)
            arrays["held_y"] = np.asarray(self.held_y, dtype=np.int32)
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=self.state_dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return self.checkpoint_path

    def _restore(self) -> bool:
        """Load the latest checkpoint if it belongs to this artifact; a bad one is ignored (logged)."""
        path = self.checkpoint_path
        if not path.exists():
            return False
        try:
            meta, weights, held = _read_checkpoint(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("%s: unreadable checkpoint ignored (%s)", path, exc)
            return False
        if meta.get("artifact_sha256") != self.artifact["sha256"]:
            log.warning("%s: checkpoint of another model ignored", path)
            return False
        try:
            self.net.set_weights(weights)
        except InvalidInputError as exc:
            log.warning("%s: checkpoint ignored: %s", path, exc)
            return False
        self._accepted = weights
        self.updates, self.reverted, self.seen = int(meta["updates"]), int(meta["reverted"]), int(meta["seen"])
        self._restore_held(held)
        return True

    def _restore_held(self, held: tuple[np.ndarray, np.ndarray] | None) -> None:
        """Take back the held-back samples of a checkpoint, when it has some of this model's input shape."""
        if held is not None and held[1].size and held[0].shape[1:] == tuple(self.held_shape()):
            self.held_x.extend(held[0])
            self.held_y.extend(int(v) for v in held[1])

    def held_shape(self) -> tuple[int, ...]:
        return tuple(d for d in self.net.input_shape[1:])

    def status(self) -> dict:
        return {"updates": self.updates, "reverted": self.reverted, "held_back": len(self.held_y),
                "learning_rate": self.learning_rate, "checkpoint": str(self.checkpoint_path)}


def trainer_for(model: EdgeModel, state_dir: str | Path, **options: Any) -> Trainer | None:
    """A Trainer over the bundle ``model`` was loaded from, or None when it has no trainable artifact."""
    if model.bundle is None or trainable_artifact(model.manifest) is None:
        return None
    return Trainer(model.bundle, state_dir, **options)


class Learner:
    """Labels that arrive late, fed to a :class:`Trainer` in batches (``edgeops run --learn``).

    The device remembers its recent inputs by id (:meth:`remember`, bounded: the newest
    ``max_rows``); a joined label (:meth:`on_joined`, a ``LabelJoiner`` listener, called on whatever
    thread delivered the label) finds its input and queues the pair. :meth:`step` trains once a batch
    is queued; call it on the thread that predicts (the interpreter is not thread-safe). Anything else
    that has labelled rows calls :meth:`add` with (input row, label).
    """

    def __init__(self, trainer: Trainer, batch: int = 32, max_rows: int = 4096):
        import threading
        from collections import OrderedDict

        self.trainer = trainer
        self.batch = int(batch)
        self.max_rows = int(max_rows)
        self._rows: OrderedDict = OrderedDict()
        self._queue: deque = deque(maxlen=max(self.batch * 8, 256))
        self._lock = threading.Lock()
        self.rounds: list[Round] = []
        self.unmatched = 0

    def remember(self, input_id: Any, row: Any) -> None:
        if input_id is None:
            return
        with self._lock:
            self._rows[str(input_id)] = row
            self._rows.move_to_end(str(input_id))
            while len(self._rows) > self.max_rows:
                self._rows.popitem(last=False)

    def on_joined(self, joined: Any) -> None:
        """A ``LabelJoiner`` listener: ``joined.id`` and ``joined.actual`` (the true class index)."""
        with self._lock:
            row = self._rows.pop(str(joined.id), None)
        if row is None:
            self.unmatched += 1
            return
        self.add(row, joined.actual)

    def add(self, row: Any, label: Any) -> None:
        """Queue one labelled input (the small interface: (input row, label))."""
        with self._lock:
            self._queue.append((row, label))

    def _full_batch(self) -> list | None:
        """The oldest batch of queued (row, label) pairs, taken off the queue; None when not that many wait."""
        with self._lock:
            if len(self._queue) < self.batch:
                return None
            return [self._queue.popleft() for _ in range(self.batch)]

    def step(self, max_batches: int = 4) -> Round | None:
        """Train on the full batches of queued labels (at most ``max_batches``, so a backlog does not hold
        the inference thread for long); the last round, or None when no batch was full."""
        done = None
        for _ in range(max_batches):
            pairs = self._full_batch()
            if pairs is None:
                break
            try:
                done = self.trainer.train(np.asarray([np.asarray(r, dtype=np.float32) for r, _ in pairs]),
                                          [y for _, y in pairs])
            except InvalidInputError as exc:
                log.warning("a labelled batch was not trained on: %s", exc)
                continue
            self.rounds.append(done)
            del self.rounds[:-100]
        return done
