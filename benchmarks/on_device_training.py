"""On-device fine-tuning on Digits: the accuracy gained and what a training step costs.

    python -m benchmarks.on_device_training [--batch 32] [--every 4] [--steps 200] [--holdout-every 5]
                                            [--cache DIR] [--json FILE] [--arm64]

A small Keras MLP (64 pixels -> 32 ReLU -> 10 softmax) is trained on the first half of Digits'
rows, classes 0-6 only, and converted with ``trainable=True``. The device (``edge_runtime.training.
Trainer``, LiteRT) then receives the second half's rows as labelled batches, all ten classes;
every third row of the second half is a test set it never trains on. The curve gives the test
accuracy after every ``--every`` update rounds, with the probation on (every 5th labelled sample
held back). The step cost is the median of ``--steps`` calls of the ``train`` signature on one
batch, next to ``infer`` on one sample and on the batch. Prints a table and the JSON document.
With ``--arm64`` the same run (on the host's bundle and split, without TensorFlow or scikit-learn)
also goes inside the emulated aarch64 device (prepare it: ``python -m devtools.emulated_arm prepare``);
its timings are QEMU's, not a Raspberry Pi's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json
from benchmarks.conversion import _median_ms as _timed

BASE_CLASSES = 7     # the source model sees classes 0..6 only
SEED = 0


def digits_split(data: Path | None = None) -> dict:
    """Digits as raw 0..16 pixels: the source model's rows, the device's stream and a test set (from
    ``data``, a .npz :func:`save_split` wrote, on a device without scikit-learn)."""
    if data is not None:
        with np.load(data) as z:
            return {k: np.array(z[k]) for k in ("X", "y", "base", "stream", "test")}
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X.astype(np.float32), y.astype(np.int64)
    half = len(X) // 2
    first = np.arange(half)
    second = np.arange(half, len(X))
    base = first[y[first] < BASE_CLASSES]
    test = second[(second - half) % 3 == 0]
    stream = second[(second - half) % 3 != 0]
    np.random.default_rng(SEED).shuffle(stream)
    return {"X": X, "y": y, "base": base, "stream": stream, "test": test}


def save_split(path: Path) -> Path:
    np.savez(path, **digits_split())
    return path


def make_bundle(out: Path, force: bool = False) -> Path:
    """Train the source model (classes 0-6, first half) and convert it with a trainable artifact."""
    if (out / "manifest.json").exists() and not force:
        return out
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    from convert.api import to_bundle

    d = digits_split()
    X, y, base = d["X"], d["y"], d["base"]
    keras.utils.set_random_seed(SEED)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Rescaling(1 / 16),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(X[base], y[base], epochs=40, batch_size=32, verbose=0)
    holdout = base[::4]
    to_bundle(model, out, name="digits-trainable", formats=["tflite"], quantize=["none", "int8"],
              holdout=(X[holdout], y[holdout]), calibration=X[base][:300], trainable=True, force=True,
              labels=[str(i) for i in range(10)])
    return out


def _median_ms(fn, n: int) -> float:
    return _timed(fn, n, warmup=5)["median_ms"]


def curve(bundle: Path, batch: int, every: int, state_dir: Path, holdout_every: int = 5,  # noqa: PLR0913
          data: Path | None = None) -> tuple[list[dict], object]:
    """Test accuracy after every ``every`` rounds of ``batch`` labelled samples."""
    from edge_runtime.training import Trainer

    d = digits_split(data)
    X, y, stream, test = d["X"], d["y"], d["stream"], d["test"]
    trainer = Trainer(bundle, state_dir, batch_size=batch, holdout_every=holdout_every)

    def point(rounds: int, samples: int, losses: list[float]) -> dict:
        return {"rounds": rounds, "samples": samples, "updates": trainer.updates,
                "loss": round(float(np.mean(losses)), 4) if losses else None,
                "accuracy": trainer.accuracy(X[test], y[test]),
                "acc_0_6": _acc(trainer, X, y, test, lambda v: v < BASE_CLASSES),
                "acc_7_9": _acc(trainer, X, y, test, lambda v: v >= BASE_CLASSES), "reverted": trainer.reverted}

    rows = [point(0, 0, [])]
    losses: list[float] = []
    n = 0
    for n, i in enumerate(range(0, len(stream), batch), start=1):
        idx = stream[i:i + batch]
        done = trainer.train(X[idx], y[idx].tolist())
        if done.loss is not None:
            losses.append(done.loss)
        if n % every == 0 and i + batch < len(stream):
            rows.append(point(n, i + batch, losses))
            losses = []
    trainer.judge()                     # the last, unfinished round
    rows.append(point(n, len(stream), losses))
    return rows, trainer


def _acc(trainer, X, y, idx, which) -> float:
    sel = idx[which(y[idx])]
    return trainer.accuracy(X[sel], y[sel])


def step_costs(trainer, batch: int, steps: int, data: Path | None = None) -> dict:
    """Median ms of the train signature on one batch, and of infer on one sample and on the batch."""
    d = digits_split(data)
    rows = d["stream"][:batch]
    xb = trainer._inputs(d["X"][rows])
    yb = d["y"][rows].astype(np.int32)
    before = trainer.net.weights()
    cost = {"train_step_ms": _median_ms(lambda: trainer.net.train_step(xb, yb, 1e-6), steps),
            "infer_one_ms": _median_ms(lambda: trainer.net.infer(xb[:1]), steps),
            "infer_batch_ms": _median_ms(lambda: trainer.net.infer(xb), steps),
            "checkpoint_ms": _median_ms(trainer.save, max(5, steps // 20))}
    trainer.net.set_weights(before)
    return {k: round(v, 4) for k, v in cost.items()}


def run(batch: int, every: int, steps: int, cache: Path | None, holdout_every: int = 5,  # noqa: PLR0913
        bundle: Path | None = None, data: Path | None = None) -> dict:
    with tempfile.TemporaryDirectory(prefix="edgeops-odt-") as tmp:
        bundle = bundle or make_bundle((cache or Path(tmp)) / "digits-trainable")
        rows, trainer = curve(bundle, batch, every, Path(tmp) / "state", holdout_every, data)
        cost = step_costs(trainer, batch, steps, data)
    import edge_runtime.backends.tflite as tfl

    _cls, backend, version = tfl.tflite_interpreter_class()
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras", "sklearn"})
    return {"machine": {"arch": platform.machine(), "python": platform.python_version(),
                        "backend": f"{backend} {version}", "emulated": os.environ.get("EDGEOPS_EMULATED")},
            "batch": batch, "holdout_every": holdout_every, "curve": rows, "cost": cost,
            "accuracy_before": rows[0]["accuracy"], "accuracy_after": rows[-1]["accuracy"],
            "heavy_modules_loaded": heavy}


def on_arm64(args, cache: Path) -> dict:
    """The same run inside the emulated aarch64 device (devtools/emulated_arm.py), on the host's bundle."""
    from devtools.emulated_arm import EmulatedArmDevice

    device = EmulatedArmDevice()
    if not device.prepared:
        raise SystemExit("the emulated aarch64 device is not prepared: python -m devtools.emulated_arm prepare")
    bundle = make_bundle(cache / "digits-trainable")
    data = save_split(cache / "digits-split.npz")
    out = cache / "arm64.json"
    res = device.python(["-m", "benchmarks.on_device_training", "--bundle", str(bundle), "--data", str(data),
                         "--batch", str(args.batch), "--every", str(args.every), "--steps", str(args.steps),
                         "--holdout-every", str(args.holdout_every), "--json", str(out)], timeout=3600)
    if res.returncode != 0:
        raise SystemExit(f"the emulated device failed: {res.stderr[-2000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="labelled samples per update round")
    ap.add_argument("--every", type=int, default=4, help="a curve point after this many rounds")
    ap.add_argument("--steps", type=int, default=200, help="timed calls for the step cost")
    ap.add_argument("--holdout-every", type=int, default=5, help="probation: hold back every n-th sample (0: off)")
    ap.add_argument("--cache", type=Path, help="keep the converted bundle here")
    ap.add_argument("--json", help="also write the JSON document to this file")
    ap.add_argument("--bundle", type=Path, help="use this trainable bundle (made by this benchmark) as is")
    ap.add_argument("--data", type=Path, help="the Digits split as a .npz (a device without scikit-learn)")
    ap.add_argument("--arm64", action="store_true",
                    help="also run it inside the emulated aarch64 device (QEMU user mode; docs/emulated-arm.md)")
    args = ap.parse_args(argv)
    doc = run(args.batch, args.every, args.steps, args.cache, args.holdout_every, args.bundle, args.data)
    if args.arm64:
        with tempfile.TemporaryDirectory(prefix="edgeops-odt-arm-") as tmp:
            doc["arm64"] = on_arm64(args, args.cache or Path(tmp))
    probation = f"every {args.holdout_every}th sample held back" if args.holdout_every else "no probation"
    print_table(doc["curve"], [("rounds", "rounds"), ("samples", "samples"), ("updates", "steps kept"),
                               ("loss", "mean loss"), ("accuracy", "test acc"), ("acc_0_6", "acc 0-6"),
                               ("acc_7_9", "acc 7-9"), ("reverted", "rounds undone")],
                title=f"Digits, on-device fine-tuning of the last layer ({doc['machine']['arch']}, "
                      f"{doc['machine']['backend']}, batch {args.batch}, {probation})")
    print()
    costs = [{"machine": doc["machine"]["arch"], **doc["cost"], "accuracy_after": doc["accuracy_after"]}]
    if "arm64" in doc:
        costs.append({"machine": f"{doc['arm64']['machine']['arch']} (emulated)", **doc["arm64"]["cost"],
                      "accuracy_after": doc["arm64"]["accuracy_after"]})
    print_table(costs, [(k, k) for k in costs[0]], title="cost (median ms)")
    print(json.dumps(doc, indent=2))
    write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
