"""What the agent's video input costs per frame, and `edgeops run --input video:... --output mqtt` end to end.

    python -m benchmarks.video_pipeline [--bundle DIR] [--frames 300] [--rounds 30] [--size 64]
                                        [--quick] [--json FILE]

Writes an MJPEG video of Digits test images (scikit-learn's load_digits,
upscaled to SIZE x SIZE grey frames) with OpenCV in a temporary folder, then:

1. Per frame, in one process, configurations taking turns round after round
   (the order reversed every other round, so a busy machine slows them alike):
   the agent's input pipeline (``VideoInput``: OpenCV decodes in its reader
   thread and the bundle's image preprocessing turns each frame into the
   model's input; the consumer predicts with telemetry recording on, as the
   agent does) timed as the interval between consecutive predictions; the
   same steps in one thread (no hand-over between threads);
   ``predict`` alone on the same frames decoded and preprocessed beforehand,
   without and with telemetry recording; and, for the breakdown, OpenCV's
   decode and the bundle's preprocessing alone, in one thread. Medians of all
   frames of all rounds, in microseconds, and each one's ratio to predict alone.
2. End to end: ``edgeops run BUNDLE --input video:PATH --output mqtt?qos=1`` as
   a subprocess against a private Mosquitto, with a subscriber on
   ``edgeops/<fleet>/<device>/predictions``: frames classified and published
   (every frame, expected), the first predictions against the frames' true
   digits, the accuracy over all frames, and the wall time.

The broker and the temporary folder go on every path.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json

FLEET, DEVICE = "bench", "video-bench"


def write_digits_video(path: Path, images: np.ndarray, size: int) -> None:
    """An MJPEG .avi of Digits rows (64 pixels, 0..16 grey levels), each upscaled to a size x size frame."""
    import cv2

    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    if not out.isOpened():
        raise SystemExit(f"OpenCV cannot write {path}")
    try:
        for img in images:
            grey = np.clip(img.reshape(8, 8) * 255.0 / 16.0, 0, 255).astype(np.uint8)
            big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
            out.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    finally:
        out.release()


def decode_all(path: Path) -> tuple[list, list[float]]:
    """The video's frames as PIL images (RGB, as the agent's reader makes them) and the decode time of each (us)."""
    import cv2
    from PIL import Image

    cap, frames, times = cv2.VideoCapture(str(path)), [], []
    try:
        while True:
            t0 = time.perf_counter()
            ok, frame = cap.read()
            if not ok:
                return frames, times
            img = Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            times.append((time.perf_counter() - t0) * 1e6)
            frames.append(img)
    finally:
        cap.release()


def preprocess_all(frames: list, image: dict) -> tuple[np.ndarray, list[float]]:
    from edge_runtime.preprocess import image_to_array

    out, times = [], []
    for f in frames:
        t0 = time.perf_counter()
        out.append(image_to_array(f, image))
        times.append((time.perf_counter() - t0) * 1e6)
    return np.stack(out), times


def predict_each(model, X: np.ndarray) -> list[float]:
    times = []
    for x in X:
        t0 = time.perf_counter()
        model.predict(x)
        times.append((time.perf_counter() - t0) * 1e6)
    return times


def pipeline_pass(model, video: Path, image: dict) -> tuple[list[float], int]:
    """The agent's video source feeding predict: the interval between consecutive predictions (us), and frames."""
    from edge_runtime.inputs import VideoInput

    source = VideoInput(f"video:{video}", image).start()
    times, prev, n = [], None, 0
    try:
        for sample in source:
            model.predict(sample.x)
            now = time.perf_counter()
            if prev is not None:          # the first frame carries the opening of the file and the thread
                times.append((now - prev) * 1e6)
            prev, n = now, n + 1
    finally:
        source.close()
    return times, n


def serial_pass(model, video: Path, image: dict) -> list[float]:
    """The same steps in one thread, no hand-over: decode, preprocess and predict with telemetry (us per frame)."""
    import cv2
    from PIL import Image

    from edge_runtime.preprocess import image_to_array

    cap, times = cv2.VideoCapture(str(video)), []
    try:
        while True:
            t0 = time.perf_counter()
            ok, frame = cap.read()
            if not ok:
                return times
            model.predict(image_to_array(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)), image))
            times.append((time.perf_counter() - t0) * 1e6)
    finally:
        cap.release()


def _take_turns(configs: dict, rounds: int, recorded) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run the configurations in turns, reversed every other round; per configuration, every frame's time
    and each round's median."""
    samples: dict[str, list[float]] = {k: [] for k in configs}
    per_round: dict[str, list[float]] = {k: [] for k in configs}
    for r in range(rounds):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            t = configs[name]()
            samples[name].extend(t)
            per_round[name].append(statistics.median(t))
            recorded.recorder.poll()                  # closed windows leave, as the agent's collect does
    return samples, per_round


def _config_row(name: str, t: list[float], round_medians: list[float], base: float) -> dict:
    med = statistics.median(t)
    return {"what": name, "frames": len(t), "median_us": round(med, 1),
            "p90_us": round(float(np.percentile(t, 90)), 1),
            "round_medians_spread_us": round(max(round_medians) - min(round_medians), 1),
            "ratio_to_predict": round(med / base, 2)}


def measure(bundle: Path, video: Path, rounds: int) -> tuple[list[dict], dict]:
    import edge_runtime

    plain = edge_runtime.load(bundle)                 # no recorder: predict alone
    recorded = edge_runtime.load(bundle)
    recorded.start_recording(window_seconds=10.0)     # the agent's default windows
    image = recorded.manifest["input_schema"]["image"]
    frames, _ = decode_all(video)
    X, _ = preprocess_all(frames, image)
    for m in (plain, recorded):
        predict_each(m, X[:50])                       # warm-up, not measured
    pipeline_pass(recorded, video, image)
    configs = {
        "video pipeline (agent)": lambda: pipeline_pass(recorded, video, image)[0],
        "same steps, one thread": lambda: serial_pass(recorded, video, image),
        "predict alone": lambda: predict_each(plain, X),
        "predict + telemetry": lambda: predict_each(recorded, X),
        "decode (OpenCV)": lambda: decode_all(video)[1],
        "preprocess (bundle)": lambda: preprocess_all(frames, image)[1],
    }
    samples, per_round = _take_turns(configs, rounds, recorded)
    base = statistics.median(samples["predict alone"])
    rows = [_config_row(name, t, per_round[name], base) for name, t in samples.items()]
    by = {r["what"]: r for r in rows}
    summary = {"pipeline_median_us": by["video pipeline (agent)"]["median_us"], "predict_median_us": round(base, 1),
               "ratio": by["video pipeline (agent)"]["ratio_to_predict"],
               "one_thread_median_us": by["same steps, one thread"]["median_us"],
               "predict_telemetry_median_us": by["predict + telemetry"]["median_us"],
               "artifact": plain.path.name, "frames_in_video": len(X)}
    return rows, summary


class Subscriber:
    """Collects the prediction records published on one topic (returns once the broker's SUBACK is in)."""

    def __init__(self, port: int, topic: str, timeout: float = 10.0):
        import paho.mqtt.client as mqtt

        self.records: list[dict] = []
        self.messages = 0
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="video-bench-sub",
                                  protocol=mqtt.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(timeout):
            self.close()
            raise SystemExit(f"no SUBACK for {topic} from the broker on port {port}")

    def _on_message(self, client, userdata, msg) -> None:
        doc = json.loads(msg.payload)
        with self.lock:
            self.messages += 1
            self.records.extend(doc.get("predictions", []))

    def count(self) -> int:
        with self.lock:
            return len(self.records)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _run_agent(bundle: Path, video: Path, broker_url: str, work: Path) -> float:
    """Run ``edgeops run`` on the video, publishing its predictions; its wall time in seconds."""
    cmd = [sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", DEVICE, "--fleet", FLEET,
           "--broker", broker_url, "--input", f"video:{video}", "--output", "mqtt?qos=1", "--no-flash",
           "--confirm", "broker", "--state-dir", str(work / "state")]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise SystemExit(f"edgeops run failed (exit {res.returncode}): {res.stderr[-1500:]}")
    return wall


def _wait_for(sub: Subscriber, n: int) -> None:
    """Until n predictions arrived (at most 10 s), and a little longer for duplicates or stragglers."""
    deadline = time.monotonic() + 10
    while sub.count() < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)                           # a duplicate or a straggler would show up in the count


def _frame_rate(ts: list[float]) -> float | None:
    """Frames per second between the first and the last prediction."""
    return round((len(ts) - 1) / (ts[-1] - ts[0]), 1) if len(ts) > 1 and ts[-1] > ts[0] else None


def end_to_end(bundle: Path, video: Path, truth: np.ndarray, work: Path, show: int = 10) -> dict:
    from devtools.brokers import MosquittoBroker

    with MosquittoBroker(workdir=work / "broker") as broker:
        sub = Subscriber(broker.port, f"edgeops/{FLEET}/{DEVICE}/predictions")
        try:
            wall = _run_agent(bundle, video, broker.url, work)
            _wait_for(sub, len(truth))
        finally:
            sub.close()
    recs = sorted(sub.records, key=lambda p: p["id"])
    ids = [p["id"] for p in recs]
    right = [int(p["label"]) == int(truth[p["id"]]) for p in recs if 0 <= p["id"] < len(truth)]
    return {"frames": len(truth), "published": len(recs), "messages": sub.messages,
            "every_frame_once": ids == list(range(len(truth))),
            "accuracy": round(float(np.mean(right)), 4) if right else None,
            "first": [{"frame": p["id"], "predicted": p["label"], "true": int(truth[p["id"]])} for p in recs[:show]],
            "wall_s": round(wall, 2),
            "frames_per_s_between_first_and_last": _frame_rate([p["ts"] for p in recs])}


def default_bundle(work: Path) -> Path:
    from convert.reference import convert_reference

    print("converting the Digits CNN reference model (pass --bundle DIR to skip this) ...", flush=True)
    out = work / "digits-cnn"
    convert_reference("cnn", "digits", out, quantize=("none",), formats=("tflite",))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", help="an image bundle (default: convert the Digits CNN reference model)")
    ap.add_argument("--frames", type=int, default=300, help="frames in the video (Digits test images, repeated)")
    ap.add_argument("--rounds", type=int, default=30, help="turns of every configuration")
    ap.add_argument("--size", type=int, default=64, help="frame width and height in pixels")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 40 frames, 2 rounds")
    ap.add_argument("--json", help="write the results as JSON to this file")
    args = ap.parse_args(argv)
    if args.quick:
        args.frames, args.rounds = 40, 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from convert.reference import load_reference_data

    work = Path(tempfile.mkdtemp(prefix="edgeops-video-"))
    try:
        bundle = Path(args.bundle) if args.bundle else default_bundle(work)
        data = load_reference_data("digits")
        idx = np.arange(args.frames) % len(data.X_test)
        truth = np.asarray(data.y_test)[idx]
        video = work / "digits.avi"
        write_digits_video(video, data.X_test[idx], args.size)
        rows, summary = measure(bundle, video, args.rounds)
        e2e = end_to_end(bundle, video, truth, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)     # the video, the broker's folder, the agent's state, a bundle
    load = os.getloadavg()
    print_table(rows, [("what", "per frame"), ("frames", "frames"), ("median_us", "median us"), ("p90_us", "p90 us"),
                       ("round_medians_spread_us", "spread of round medians"),
                       ("ratio_to_predict", "x predict alone")],
                title=f"{bundle.name} ({summary['artifact']}), {args.frames} frames of {args.size}x{args.size} "
                      f"x {args.rounds} rounds, configurations in turn")
    print()
    print_table([e2e], [("frames", "frames"), ("published", "predictions on MQTT"), ("messages", "messages"),
                        ("every_frame_once", "every frame once"), ("accuracy", "accuracy"), ("wall_s", "wall s"),
                        ("frames_per_s_between_first_and_last", "frames/s")],
                title="edgeops run --input video:PATH --output mqtt?qos=1 (a subprocess, a private Mosquitto)")
    print("first predictions (frame: predicted/true): "
          + ", ".join(f"{p['frame']}: {p['predicted']}/{p['true']}" for p in e2e["first"]))
    print(f"pipeline {summary['pipeline_median_us']} us vs predict alone {summary['predict_median_us']} us "
          f"per frame: x{summary['ratio']}; load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    doc = {"bundle": str(bundle), "frames": args.frames, "rounds": args.rounds, "size": args.size,
           "python": sys.version.split()[0], "cpu_count": os.cpu_count(), "load_average_1min": round(load[0], 2),
           **summary, "per_frame": rows, "end_to_end": e2e}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
