"""A light load generator: compact valid windows of many emulated devices, published by one MQTT client.

    python -m benchmarks.loadgen --broker mqtt://127.0.0.1:1883 [--devices 10000] [--windows 3]
        [--rate 10000] [--fleet load] [--features 4] [--manifest-out FILE] [--json FILE]

Not 10,000 agents: the windows are built beforehand (a few templates made by the device's own statistics
code, telemetry.synthetic.make_window, then each device's copy wrapped by edge_runtime.wire's
telemetry_message and encoded by wire.encode), and one MQTT connection (the monitor's own,
telemetry.mqtt_stream) publishes them with QoS 1 at the target rate (device after device, so each
device sends one window per round). It listens to the monitor's acks on ``<prefix>/<fleet>/+/ack``
and counts the windows confirmed as committed. A monitor
must know the model (``--manifest-out`` writes it, for ``edgeops monitor --bundle``) so it checks every
window against the profile.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

MODEL = "load-model"


def compact_manifest(features: int = 4, seed: int = 0) -> dict:
    """A small tabular model's manifest (``features`` features, 10 bins each, 2 classes)."""
    import numpy as np

    from telemetry.synthetic import reference_manifest

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(1000, features))
    y = (X[:, 0] > 0).astype(int)
    return reference_manifest(X, y, MODEL, feature_names=[f"f{i}" for i in range(features)])


def _sleep_until(due: float) -> None:
    wait = due - time.time()
    if wait > 0:
        time.sleep(wait)


@dataclass
class Load:
    """Prepared messages: (topic, payload, device, seq), in publishing order."""

    manifest: dict
    messages: list[tuple[str, bytes, str, int]]
    fleet: str

    @property
    def keys(self) -> set[tuple[str, int]]:
        return {(d, s) for _, _, d, s in self.messages}


def _window_shape(rng, manifest: dict, features: int, fleet: str, now: float) -> dict:
    """A synthetic window of 100 random rows, without the fields each message sets."""
    from telemetry.synthetic import make_window

    X = rng.normal(size=(100, features))
    w = make_window(X, manifest, "x", 0, fleet=fleet, start=now - 70, end=now - 60,
                    predictions=(X[:, 0] > 0).astype(int), latencies_ms=rng.gamma(4.0, 0.5, 100))
    return {k: v for k, v in w.items() if k not in ("schema_version", "type", "device_id", "fleet")}


def build(devices: int, windows: int, fleet: str = "load", features: int = 4, prefix: str = "edgeops",
          manifest: dict | None = None, templates: int = 16, seed: int = 0) -> Load:
    """``devices x windows`` encoded telemetry messages (window w of every device, then w + 1, ...)."""
    import numpy as np

    from edge_runtime.wire import encode, telemetry_message, topic

    manifest = manifest or compact_manifest(features, seed)
    rng = np.random.default_rng(seed)
    now = time.time()
    shapes = [_window_shape(rng, manifest, features, fleet, now) for _ in range(templates)]
    messages = []
    for s in range(windows):
        for i in range(devices):
            device = f"dev-{i:06d}"
            window = {**shapes[(i + s) % len(shapes)], "seq": s, "start": now - 70 + 10 * s, "end": now - 60 + 10 * s}
            doc = telemetry_message(fleet, device, window)
            messages.append((topic(prefix, fleet, device, "telemetry"), encode(doc), device, s))
    return Load(manifest, messages, fleet)


@dataclass
class Publisher:
    """One MQTT connection: publishes a Load at a rate and counts the acks the monitor sends back.

    It is the monitor's own connection (telemetry.mqtt_stream.StreamConnection), not paho: the load
    generator shares the machine's cores with the broker, the database and the workers it measures, and
    paho costs about a core at 10,000 publishes/s (one packet, one callback at a time)."""

    broker_url: str
    fleet: str
    prefix: str = "edgeops"
    acked: set = field(default_factory=set)
    ack_messages: int = 0
    ack_times: dict = field(default_factory=dict)    # (device, seq) -> first ack's arrival
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self, max_messages: int = 10_000_000) -> "Publisher":
        from edge_runtime.mqtt import parse_broker_url
        from telemetry.mqtt_stream import StreamConnection

        subscribed = threading.Event()
        # a clean session (session expiry 0); QoS 1 publishes wait for room in the broker's Receive Maximum,
        # up to max_messages of them (none dropped)
        self.client = c = StreamConnection(
            parse_broker_url(self.broker_url), f"loadgen-{uuid.uuid4().hex[:8]}", session_expiry=0,
            receive_max=65_535, max_waiting=max_messages, on_messages=self._on_acks,
            on_subscribe=lambda mid, codes: subscribed.set() if all(x < 0x80 for x in codes) else None,
            on_connect=lambda resumed: c.subscribe([f"{self.prefix}/{self.fleet}/+/ack"]))
        c.start()
        if not subscribed.wait(10):
            c.stop()
            raise RuntimeError(f"could not subscribe to the acks on {self.broker_url}")
        return self

    def _on_acks(self, messages: list) -> None:
        from edge_runtime.wire import Rejected, parse_ack

        now = time.time()
        mids = []
        with self._lock:
            for topic_, payload, mid, qos in messages:
                if qos:
                    mids.append(mid)
                try:
                    ranges = parse_ack(payload)
                except Rejected:
                    continue
                device = topic_.split("/")[2]
                self.ack_messages += 1
                for lo, hi in ranges:
                    for s in range(lo, hi + 1):
                        key = (device, s)
                        if key not in self.acked:
                            self.acked.add(key)
                            self.ack_times[key] = now
        self.client.ack(mids)

    def publish(self, load: Load, rate: float) -> dict:
        """Publish every message with QoS 1, paced at ``rate`` messages/s (0: as fast as possible); returns
        the publish time of each (device, seq) and the achieved rate once the broker confirmed them all."""
        sent_at: dict[tuple[str, int], float] = {}
        t0 = time.time()
        step = max(1, int(rate / 200)) if rate else 500
        for k in range(0, len(load.messages), step):
            if rate:
                _sleep_until(t0 + k / rate)
            now = time.time()
            chunk = load.messages[k:k + step]
            self.client.publish_many([(topic_, payload) for topic_, payload, _, _ in chunk], qos=1)
            for _, _, device, seq in chunk:
                sent_at[(device, seq)] = now
        last_publish = time.time()
        deadline = time.monotonic() + 120          # for all of them: a broker that lost some does not hang the run
        while self.client.unconfirmed() and time.monotonic() < deadline:
            time.sleep(0.01)
        done = time.time()
        n = len(load.messages)
        return {"published": n, "publish_seconds": round(last_publish - t0, 3),
                "unconfirmed_by_broker": self.client.unconfirmed(),
                "publish_rate": round(n / max(1e-9, last_publish - t0), 1),
                "broker_confirmed_seconds": round(done - t0, 3), "started": t0, "sent_at": sent_at}

    def wait_acked(self, keys: set, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if keys <= self.acked:
                    break
            time.sleep(0.05)
        with self._lock:
            return len(keys & self.acked)

    def close(self) -> None:
        self.client.stop()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--windows", type=int, default=3, help="windows per device")
    ap.add_argument("--rate", type=float, default=10_000, help="messages/s (0: as fast as the client can)")
    ap.add_argument("--fleet", default="load")
    ap.add_argument("--features", type=int, default=4)
    ap.add_argument("--ack-timeout", type=float, default=60.0, help="seconds to wait for the acks afterwards")
    ap.add_argument("--manifest-out", help="write the model's manifest here (for the monitor's --bundle)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    load = build(args.devices, args.windows, args.fleet, args.features)
    if args.manifest_out:
        Path(args.manifest_out).write_text(json.dumps(load.manifest))
    pub = Publisher(args.broker, args.fleet).connect()
    try:
        out = pub.publish(load, args.rate)
        acked = pub.wait_acked(load.keys, args.ack_timeout)
    finally:
        pub.close()
    out.pop("sent_at")
    doc = {**out, "acked": acked, "ack_messages": pub.ack_messages, "devices": args.devices,
           "window_bytes": len(load.messages[0][1]) if load.messages else 0}
    print(json.dumps(doc))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    main()
