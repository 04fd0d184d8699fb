"""Real input sources: sensor gateways publishing on MQTT, and video through OpenCV."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import numpy as np
import paho.mqtt.client as mqtt
import pytest

import edge_runtime
from devtools.fleet_emulation import slow_down
from edge_runtime.agent import DeviceAgent, samples_from
from edge_runtime.inputs import MqttInput
from edge_runtime.mqtt import parse_broker_url
from edge_runtime.wire import parse
from helpers import eventually
from helpers.mqtt_collector import Collector


def make_agent(broker, model, tmp_path, device, **kw) -> DeviceAgent:
    return DeviceAgent(model, device, "ins", parse_broker_url(broker.url), state_dir=tmp_path / device,
                       window_size=100, confirm="broker", **kw)


class Gateway:
    """A sensor gateway: publishes readings on a topic of the local broker."""

    def __init__(self, port: int):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="gateway", protocol=mqtt.MQTTv5)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload, qos: int = 1):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.client.publish(topic, data, qos=qos)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def run_in_background(agent: DeviceAgent, source) -> threading.Thread:
    agent.start()
    t = threading.Thread(target=agent.run, args=(source,), daemon=True)
    t.start()
    return t


def test_readings_published_by_a_gateway_come_out_as_predictions_with_their_ids(session_mosquitto, bc_mlp_bundle,
                                                                                 reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:40].astype(np.float32)
    model = edge_runtime.load(bc_mlp_bundle)
    want = model.predict(X)
    got = []
    agent = make_agent(session_mosquitto, edge_runtime.load(bc_mlp_bundle), tmp_path, "mq-1", on_prediction=got.append)
    source = MqttInput(parse_broker_url(session_mosquitto.url), "sensors/ward-3/#", "mq-1-input").start()
    gateway = Gateway(session_mosquitto.port)
    try:
        assert source.subscribed.wait(10)
        runner = run_in_background(agent, source)
        for i, row in enumerate(X[:20]):
            gateway.publish("sensors/ward-3/bed-1", {"id": f"r{i}", "x": row.tolist()}).wait_for_publish(5)
        gateway.publish("sensors/ward-3/bed-1", b"{not json").wait_for_publish(5)
        gateway.publish("sensors/ward-3/bed-1", {"id": ["a list"], "x": X[0].tolist()}).wait_for_publish(5)
        gateway.publish("sensors/ward-3/bed-1", b"[" * 100_000).wait_for_publish(5)
        for row in X[20:]:
            gateway.publish("sensors/ward-3/bed-2", row.tolist()).wait_for_publish(5)   # a bare array: no id
        assert eventually(lambda: len(got) == 40, 20)
    finally:
        source.close()
        gateway.close()
    runner.join(10)
    agent.stop()
    assert [p.id for p in got[:20]] == [f"r{i}" for i in range(20)]
    assert [p.id for p in got[20:]] == list(range(23, 43))     # their place in the stream (3 bad ones before)
    np.testing.assert_allclose(np.stack([p.output for p in got]), want, atol=1e-6)
    assert agent.bad_inputs == 3 and agent.inferences == 40


def test_a_flood_faster_than_the_model_drops_the_oldest_readings_and_counts_them(session_mosquitto, bc_mlp_bundle,
                                                                                 reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test.astype(np.float32)
    model = edge_runtime.load(bc_mlp_bundle)
    slow_down(model, 0.005)                # a slow device: 200 inferences a second at most
    got = []
    agent = make_agent(session_mosquitto, model, tmp_path, "mq-flood", on_prediction=got.append)
    col = Collector(session_mosquitto.port, topic="edgeops/ins/mq-flood/telemetry", client_id="flood-watch")
    source = MqttInput(parse_broker_url(session_mosquitto.url), "sensors/flood", "mq-flood-input", max_queue=10).start()
    gateway = Gateway(session_mosquitto.port)
    try:
        assert source.subscribed.wait(10)
        runner = run_in_background(agent, source)
        infos = [gateway.publish("sensors/flood", {"id": i, "x": X[i % len(X)].tolist()}, qos=0) for i in range(400)]
        for info in infos:
            info.wait_for_publish(5)
        assert eventually(lambda: source.received == 400, 20)
        source.close()
        runner.join(10)
        agent.stop()
        assert col.wait_for(lambda: sum(w["count"] for w in col.telemetry()) == agent.inferences, 20)
    finally:
        source.close()
        gateway.close()
        col.close()
    assert source.dropped > 0
    windows = [parse("edgeops/ins/mq-flood/telemetry", json.dumps(w).encode()).doc for w in col.telemetry()]
    assert sum(w["inputs_dropped"] for w in windows) == source.dropped          # the monitor sees the drops
    assert len(got) + source.dropped == 400 == agent.inferences + source.dropped
    ids = [p.id for p in got]
    assert ids == sorted(ids) and ids[-1] == 399                # the newest readings are the ones kept


def write_digits_video(path, images: np.ndarray, size: int = 64):
    """An MJPEG .avi of the Digits images (0..16 grey levels), upscaled, as a camera would film them."""
    cv2 = pytest.importorskip("cv2")
    out = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    assert out.isOpened()
    for img in images:
        grey = np.clip(img.reshape(8, 8) * 255.0 / 16.0, 0, 255).astype(np.uint8)
        big = cv2.resize(grey, (size, size), interpolation=cv2.INTER_NEAREST)
        out.write(cv2.cvtColor(big, cv2.COLOR_GRAY2BGR))
    out.release()


def decoded_frames(path) -> list:
    """The video's frames as PIL images, decoded independently of the agent."""
    import cv2
    from PIL import Image

    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(Image.fromarray(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)))


def test_a_video_file_is_classified_frame_by_frame_with_the_bundles_preprocessing(
        session_mosquitto, digits_cnn_bundle, reference_data, tmp_path):
    data = reference_data["digits"]
    video = tmp_path / "digits.avi"
    write_digits_video(video, data.X_test[:30])
    model = edge_runtime.load(digits_cnn_bundle)
    got = []
    agent = make_agent(session_mosquitto, model, tmp_path, "cam-1", on_prediction=got.append)
    source = samples_from(f"video:{video}", model)
    agent.start()
    try:
        agent.run(source)
    finally:
        agent.stop()
    assert [p.id for p in got] == list(range(30))                 # a file: every frame, none dropped
    want = np.stack([edge_runtime.load(digits_cnn_bundle).predict(f) for f in decoded_frames(video)])
    np.testing.assert_allclose(np.stack([p.output for p in got]), want, atol=1e-5)
    labels = [int(p.record()["label"]) for p in got]
    assert np.mean(np.array(labels) == data.y_test[:30]) >= 0.8    # resized, normalised like the training data


def test_edgeops_run_reads_a_video_and_prints_its_predictions(session_mosquitto, digits_cnn_bundle, reference_data,
                                                              tmp_path):
    video = tmp_path / "digits.avi"
    write_digits_video(video, reference_data["digits"].X_test[:12])
    res = subprocess.run([sys.executable, "-m", "edgeops", "run", str(digits_cnn_bundle), "--device-id", "cam-cli",
                          "--fleet", "ins", "--broker", session_mosquitto.url, "--input", f"video:{video}",
                          "--no-flash", "--confirm", "broker", "--state-dir", str(tmp_path / "state"),
                          "--output", "stdout"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert [p["id"] for p in lines] == list(range(12)) and all(p["label"] in "0123456789" for p in lines)


def test_a_video_source_that_cannot_be_opened_is_a_clear_input_error(digits_cnn_bundle, bc_mlp_bundle, tmp_path):
    pytest.importorskip("cv2")
    from edge_runtime.errors import InvalidInputError

    model = edge_runtime.load(digits_cnn_bundle)
    with pytest.raises(InvalidInputError, match="no such file"):
        samples_from(f"video:{tmp_path / 'missing.avi'}", model)
    (tmp_path / "junk.avi").write_bytes(b"not a video")
    with pytest.raises(InvalidInputError, match="cannot open"):
        samples_from(f"video:{tmp_path / 'junk.avi'}", model)
    with pytest.raises(InvalidInputError, match="takes no images"):
        samples_from(f"video:{tmp_path / 'junk.avi'}", edge_runtime.load(bc_mlp_bundle))


def test_edgeops_run_answers_a_gateway_on_stdout(session_mosquitto, bc_mlp_bundle, reference_data, tmp_path):
    X = reference_data["breast_cancer"].X_test[:5].astype(np.float32)
    proc = subprocess.Popen([sys.executable, "-m", "edgeops", "run", str(bc_mlp_bundle), "--device-id", "mq-cli",
                             "--fleet", "ins", "--broker", session_mosquitto.url, "--input", "mqtt:sensors/cli",
                             "--no-flash", "--confirm", "broker", "--state-dir", str(tmp_path / "state"),
                             "--output", "stdout", "--max-inferences", "5"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    gateway = Gateway(session_mosquitto.port)
    sent = []

    def keep_publishing():     # the gateway does not know when the device has subscribed: it keeps sending
        if proc.poll() is None:
            sent.append(len(sent))
            gateway.publish("sensors/cli", {"id": f"g{len(sent) - 1}", "x": X[(len(sent) - 1) % 5].tolist()})
        return proc.poll() is not None

    try:
        assert eventually(keep_publishing, 60, interval=0.1)
        out, err = proc.communicate(timeout=30)
    finally:
        gateway.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-2000:]
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 5 and all(p["id"].startswith("g") for p in lines)
    model = edge_runtime.load(bc_mlp_bundle)
    for p in lines:
        assert p["label"] == model.predict_labels(X[int(p["id"][1:]) % 5])


def test_a_live_camera_faster_than_the_model_drops_old_frames_and_counts_them(session_mosquitto, digits_cnn_bundle,
                                                                               reference_data, tmp_path):
    from edge_runtime.inputs import VideoInput

    video = tmp_path / "feed.avi"
    write_digits_video(video, np.tile(reference_data["digits"].X_test[:10], (6, 1)))    # 60 frames
    model = edge_runtime.load(digits_cnn_bundle)
    slow_down(model, 0.02)                        # 50 frames a second at most, slower than the decoder
    got = []
    agent = make_agent(session_mosquitto, model, tmp_path, "cam-live", on_prediction=got.append)
    # the file played as a camera would stream it: the decoder does not wait for the model
    source = VideoInput(f"video:{video}", model.manifest["input_schema"]["image"], max_queue=2, live=True).start()
    agent.start()
    try:
        agent.run(source)
    finally:
        agent.stop()
    assert source.dropped > 0 and len(got) + source.dropped == 60
    ids = [p.id for p in got]
    assert ids == sorted(ids) and ids[-1] == 59           # the newest frames are the ones classified


def test_stdin_lines_are_read_as_they_come_with_idle_marks_between_and_a_bound_on_length():
    import os
    import threading

    from edge_runtime.inputs import IDLE, BadSample, _fd_lines, _TooLong, json_lines

    r, w = os.pipe()
    try:
        # a line past the bound (in pieces) is refused and skipped to its end; memory stays bounded
        feeder = threading.Thread(target=lambda: [os.write(w, part) for part in
                                                  (b"[1]\n" + b"9" * 30, b"9" * 30, b"\n[2", b"]\n")])
        feeder.start()
        feeder.join()
        lines = _fd_lines(r, idle_s=0.05, max_line=16)
        got = [next(lines) for _ in range(4)]
        assert got[0] == b"[1]" and isinstance(got[1], _TooLong) and got[2] == b"[2]" and got[3] is IDLE
        os.close(w)
        w = None
        assert list(lines) == []                     # end of input ends the lines
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    r, w = os.pipe()
    try:
        os.write(w, b'[1, 2]\n{"x": [3, 4]}\nnot json\n')
        with os.fdopen(r, "r", closefd=False) as stream:
            samples = json_lines(stream)
            first = [next(samples) for _ in range(4)]
        assert first[0].tolist() == [1, 2] and first[1].tolist() == [3, 4]
        assert isinstance(first[2], BadSample) and first[2].where == "line 3"
        assert first[3] is IDLE                      # nothing more came: the run loop gets its turn
    finally:
        os.close(r)
        os.close(w)
