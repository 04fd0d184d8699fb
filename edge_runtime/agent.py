"""The device agent: run a bundle on a stream of inputs and report every window over MQTT.

Every closed window goes to the on-disk spool first and leaves it only when
the monitor confirms it is committed to its database (see
edge_runtime.delivery), so a broker crash, a broker outage, a network cut or
an agent restart loses nothing: windows are delivered at least once, and the
monitor deduplicates by (device, seq).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import platform
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edge_runtime import wire
from edge_runtime.delivery import WindowDelivery
from edge_runtime.errors import EdgeOpsError, InvalidInputError
from edge_runtime.inputs import BadSample, Labelled, input_id
from edge_runtime.labels import LabelJoiner, predicted_class
from edge_runtime.messages import TelemetryWindow
from edge_runtime.model import EdgeModel
from edge_runtime.mqtt import DEFAULT_PREFIX, BrokerAddress, MqttLink
from edge_runtime.outputs import VARIANTS, CallbackSink, Prediction, PredictionSink, open_sink
from edge_runtime.spool import WindowSpool
from edge_runtime.state import check_id, prepare_state_dir
from edge_runtime.stats import LatencyHistogram

log = logging.getLogger("edgeops.agent")


def board_model() -> str | None:
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def os_name() -> str | None:
    try:
        info = platform.freedesktop_os_release()
    except OSError:
        return None
    return info.get("PRETTY_NAME") or info.get("NAME")


def platform_info() -> dict:
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "os": os_name(),
        "release": platform.release(),
        "python": platform.python_version(),
        "board": board_model(),
        "cpu_count": os.cpu_count(),
    }


@dataclass(frozen=True)
class RollbackPolicy:
    """When a freshly flashed bundle rolls itself back: judged on its first ``windows`` windows.

    It rolls back when their error rate is above ``max_error_rate``, when the share of their inputs
    it refused (wrong shape, NaN, ...) is above ``max_rejected_rate`` (a bundle that does not fit
    what the device is fed refuses everything), or their p95 latency (the median of their windows'
    p95, so one window slowed by something else on the device does not decide) is above
    ``latency_factor`` x the same figure of the bundle before, and higher by at least
    ``min_increase_ms``.
    """

    windows: int = 3
    latency_factor: float = 2.0
    min_increase_ms: float = 1.0
    max_error_rate: float = 0.05
    max_rejected_rate: float = 0.2


class DeviceAgent:
    """Runs a model, closes telemetry windows, spools and publishes them.

    Start it with :meth:`start` (connects in the background), feed it with
    :meth:`run` (blocks until the input ends, ``max_inferences`` or
    ``duration``), and stop it with :meth:`stop` (flushes the last window and
    waits a bounded time for the spool to drain).

    Args:
        model: the loaded model.
        device_id, fleet: identity; topics are ``<prefix>/<fleet>/<device_id>/...``.
        broker: where to publish.
        state_dir: spool and identity (see edge_runtime.state).
        window_seconds, window_size: when windows close.
        prefix: topic prefix.
        spool_max: at most this many unsent windows are kept.
        slots: the device's bundle slots; with them the agent takes flash and rollback commands
            on ``.../cmd`` and answers on ``.../cmd/result`` (see edge_runtime.commands).
        reload: loads a bundle folder into a model (the same options as the first one).
        rollback_policy: judges a newly flashed bundle on its first windows (None: never by itself).
        confirm: "monitor" (a window leaves the spool when the monitor confirms it is stored, the
            default) or "broker" (at the broker's PUBACK; for a deployment without an edgeops monitor).
        resend_after: seconds before a window the monitor has not confirmed is published again.
        outputs: where predictions go: ``--output`` values ("stdout", "jsonl:PATH", "mqtt", "http:URL";
            see edge_runtime.outputs) or sinks; each runs off the inference thread with a bounded queue.
        on_prediction: called with every :class:`~edge_runtime.outputs.Prediction` (from its own thread).
        encoding: how telemetry windows are published: json (the default), zlib (the same as ``compress``), cbor
            or cbor-exact (edge_runtime.compact; the monitor reads every one of them).
        output_variants: "primary" (the prediction the device acts on: A's, or B's for the inputs the A/B
            split sends to B) or "all" (the shadow's too).
    """

    def __init__(  # noqa: PLR0913 - configuration constructor: the keyword arguments are the agent's settings
                 self, model: EdgeModel, device_id: str, fleet: str, broker: BrokerAddress,
                 state_dir: str | Path | None = None, window_seconds: float | None = 10.0,
                 window_size: int | None = None, prefix: str = DEFAULT_PREFIX, spool_max: int = 10_000,
                 slots=None, reload: Callable[[Path], EdgeModel] | None = None,
                 rollback_policy: RollbackPolicy | None = RollbackPolicy(), second: EdgeModel | None = None,
                 mode: str = "ab", split: float = 0.5, seed: int | None = None, compress: bool = False,
                 confirm: str = "monitor", resend_after: float = 30.0, outputs: Iterable = (),
                 on_prediction: Callable[[Prediction], object] | None = None, output_variants: str = "primary",
                 encoding: str | None = None):
        self.model = model
        self.window_seconds, self.window_size = window_seconds, window_size
        self.learner = None     # --learn: see learn()
        self.device_id = check_id(device_id, "device id")
        self.fleet = check_id(fleet, "fleet")
        self.prefix = prefix
        self.state_dir = prepare_state_dir(state_dir, device_id, fleet)
        self.spool = WindowSpool(self.state_dir / "spool.sqlite", max_windows=spool_max)
        if second is not None and mode not in ("ab", "shadow"):
            raise ValueError(f"mode {mode!r}: ab or shadow")
        self.second, self.mode, self.split = second, mode, split
        self.compress = compress
        primary_variant = None if second is None else "A"
        self.recorder = model.start_recording(window_seconds=window_seconds, window_size=window_size,
                                              variant=primary_variant)
        self.recorder.on_close = self._attach_labels
        self.second_recorder = None if second is None else second.start_recording(
            window_seconds=window_seconds, window_size=window_size, variant="B" if mode == "ab" else "shadow")
        import random

        self._rng = random.Random(seed)
        self._agree = {"compared": 0, "agreed": 0, "max_abs_diff": 0.0}
        self.telemetry_topic = wire.topic(prefix, fleet, device_id, "telemetry")
        self.status_topic = wire.topic(prefix, fleet, device_id, "status")
        self.cmd_topic = wire.topic(prefix, fleet, device_id, wire.CMD)
        self.result_topic = wire.topic(prefix, fleet, device_id, wire.CMD_RESULT)
        self.ack_topic = wire.topic(prefix, fleet, device_id, wire.ACK)
        self.labels_topic = wire.topic(prefix, fleet, device_id, wire.LABELS)
        # late ground truth joined to predictions by input id (edge_runtime/labels.py); classifiers only
        n_classes = self.recorder.n_classes
        self.labels: LabelJoiner | None = LabelJoiner(model.labels, n_classes) if n_classes else None
        self.labels_refused: collections.Counter[str] = collections.Counter()
        self._results: queue.Queue[bytes] = queue.Queue()
        self._pending: queue.Queue[tuple[EdgeModel, str, dict]] = queue.Queue()
        self._recent_p95: collections.deque[float] = collections.deque(maxlen=5)
        self._probation: dict | None = None
        self.rollback_policy = rollback_policy
        self.slots = slots
        self._reload = reload
        self.commands = None
        self._reconnected = threading.Event()
        self.link = MqttLink(broker, client_id=f"edgeops-{fleet}-{device_id}",
                             will=(self.status_topic, self._status(online=False)),
                             on_connect=self._on_connect, on_ack=lambda mid, ok: self.delivery.pubacks.put((mid, ok)),
                             on_message=self._on_message)
        self.delivery = WindowDelivery(self.spool, self.link, self.telemetry_topic, confirm=confirm,
                                       compress=compress, resend_after=resend_after, encoding=encoding)
        self._stop = threading.Event()
        self._interrupted = threading.Event()
        self._waiting_input = False
        self._publisher = threading.Thread(target=self._publish_loop, name="edgeops-publisher", daemon=True)
        self.inferences = 0
        self.bad_inputs = 0
        self._logged_bad: set[str] = set()
        self._scale_warned: set[tuple] = set()
        self.last_window: dict | None = None
        if output_variants not in VARIANTS:
            raise ValueError(f"output_variants {output_variants!r}: one of {VARIANTS}")
        self.output_variants = output_variants
        predictions_topic = wire.topic(prefix, fleet, device_id, wire.PREDICTIONS)
        self.sinks: list[PredictionSink] = [o if isinstance(o, PredictionSink) else open_sink(
            o, publish=lambda t, payload, qos: self.link.publish(t, payload, qos=qos), topic=predictions_topic,
            envelope=lambda records: wire.encode(wire.predictions_message(self.fleet, self.device_id, records)))
            for o in outputs]
        if on_prediction is not None:
            self.sinks.append(CallbackSink(on_prediction, max_queue=10_000))
        self._input_index = 0
        self._out_meta: dict[int, tuple] = {}
        self._source = None
        self._losses_reported = (0, 0, 0)   # output drops, output failures, live-input drops in earlier windows

    # -- status --------------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        m = self.model
        info = self.recorder.model_info
        try:
            free = shutil.disk_usage(self.state_dir).free
        except OSError:
            free = None
        from edge_runtime import __version__

        doc = wire.status_message(
            self.fleet, self.device_id, online, runtime_version=__version__, platform=platform_info(),
            model={k: info.get(k) for k in ("name", "version", "artifact", "sha256")},
            backend=f"{m.backend.name} {m.backend.version}", free_disk_bytes=free,
            accepts_flash=self._accepts_flash())
        if m.manifest:
            from edge_runtime.slots import input_schema

            doc["input"] = input_schema(m.manifest)   # lets `edgeops flash` check a new bundle's fit first
        second = getattr(self, "second", None)
        if second is not None:
            info2 = self.second_recorder.model_info
            doc["second_model"] = {**{k: info2.get(k) for k in ("name", "version", "artifact", "sha256")},
                                   "mode": self.mode, "split": self.split if self.mode == "ab" else None}
        prev = self.slots.previous if getattr(self, "slots", None) is not None else None
        if prev is not None:
            try:
                pm = json.loads((prev / "manifest.json").read_text())
                doc["previous_model"] = {"name": pm.get("name"), "version": pm.get("version")}
            except (OSError, ValueError):
                pass
        return wire.encode(doc)

    def _accepts_flash(self) -> bool:
        """The device takes flashes: it has bundle slots and a trusted key (or was told to take unsigned)."""
        slots = getattr(self, "slots", None)
        return slots is not None and slots.flash_refusal() is None

    def _on_connect(self) -> None:
        # network thread: the status is small and retained; windows are resent by the publisher
        self.link.client.publish(self.status_topic, self._status(online=True), qos=1, retain=True)
        topics = [(self.ack_topic, 1)] if self.delivery.confirm == "monitor" else []
        if self.labels is not None:
            topics.append((self.labels_topic, 1))
        if self.commands is not None:
            topics.append((self.cmd_topic, 1))
        if topics:
            self.link.client.subscribe(topics)
        self._reconnected.set()

    def _on_message(self, topic_name: str, payload: bytes) -> None:
        if topic_name == self.ack_topic:
            try:
                self.delivery.confirmations.put(wire.parse_ack(payload))
            except wire.Rejected as rej:
                log.warning("ignored a malformed ack (%s); unconfirmed windows are resent", rej)
        elif topic_name == self.cmd_topic and self.commands is not None:
            self.commands.submit(payload)
        elif topic_name == self.labels_topic and self.labels is not None:
            self.take_labels(payload, f"topic {topic_name}")

    def take_labels(self, payload: bytes, where: str = "the API") -> tuple[int, int]:
        """Join a labels message (``{"labels": [{"id", "label"}, ...]}``) to recent predictions; returns
        (joined, not joined). A malformed one is refused whole, counted by reason and logged once per reason.
        A model that does not classify takes no labels: (0, 0)."""
        if self.labels is None:
            return 0, 0
        try:
            pairs = wire.parse_labels(payload)
        except wire.Rejected as rej:
            self.labels_refused[rej.reason] += 1
            self.labels.count_invalid()
            if self.labels_refused[rej.reason] == 1:
                log.warning("refused a labels message on %s: %s (counted; further ones of this kind are not "
                            "logged)", where, rej)
            return 0, 0
        joined = sum(self.labels.label(i, y) is not None for i, y in pairs)
        return joined, len(pairs) - joined

    # -- flashing ------------------------------------------------------------------------------

    def _publish_result(self, doc: dict) -> None:
        if doc.get("stage") == "switched" and doc.get("type") == "flash":
            pol = self.rollback_policy
            doc = {**doc, "probation_windows": pol.windows if pol is not None else 0}
        log.info("command %s %s: %s", doc.get("type"), doc.get("stage"), doc.get("message"))
        self._results.put(json.dumps(doc, separators=(",", ":")).encode())

    def _switched(self, kind: str, res) -> None:
        """Command thread: the slots switched; load the new active bundle and hand it to the run loop."""
        try:
            model = self._reload(self.slots.active)
        except EdgeOpsError as exc:
            back = self.slots.rollback()
            self._publish_result({"id": None, "type": "auto_rollback", "ok": back.ok, "stage": back.stage,
                                  "message": f"the new bundle did not load ({exc}); {back.message}",
                                  "bundle": back.bundle, "version": back.version, "ts": round(time.time(), 3),
                                  "device_id": self.device_id})
            return
        self._pending.put((model, kind, {}))

    def _apply_pending(self) -> None:
        """Run loop: swap in a model the command thread loaded (between two inferences)."""
        while True:
            try:
                model, kind, detail = self._pending.get_nowait()
            except queue.Empty:
                return
            before = sorted(self._recent_p95)
            baseline = before[len(before) // 2] if before else None
            self._spool_closed_windows(self.recorder.poll())
            last = self.recorder.flush()
            if last is not None:
                self._spool_closed_windows([last])
            variant = self.recorder.model_info.get("variant")
            self.model.stop_recording()
            model.added_latency_s = self.model.added_latency_s
            self.model = model
            self.recorder = model.start_recording(window_seconds=self.window_seconds, window_size=self.window_size,
                                                  variant=variant)
            self.recorder.on_close = self._attach_labels
            self._recent_p95.clear()
            if self.labels is not None and self.recorder.n_classes:
                self.labels.reset(model.labels, self.recorder.n_classes)   # predictions of the old model go
            self._probation = None
            if kind == "flash" and self.rollback_policy is not None and self.rollback_policy.windows > 0:
                self._probation = {"baseline_p95": baseline, "windows": 0, "count": 0, "errors": 0, "p95s": [],
                                   "version": self.recorder.model_info.get("version")}
            log.info("now running %s %s (%s)", self.recorder.model_info.get("name"),
                     self.recorder.model_info.get("version"), kind)
            if self.link.connected.is_set():
                self.link.client.publish(self.status_topic, self._status(online=True), qos=1, retain=True)
            if detail:
                self._publish_result(detail)

    def _judge(self, w: dict) -> None:
        """Probation of a freshly flashed bundle: roll back by itself on errors or a latency regression."""
        p = self._probation
        pol = self.rollback_policy
        p["windows"] += 1
        p["count"] += w["count"]          # every attempt: served, failed or refused
        p["errors"] += w["errors"]
        p["rejected"] = p.get("rejected", 0) + int(w.get("rejected") or 0)
        q = LatencyHistogram.from_dict(w["latency_ms"]).quantile(0.95) if w["count"] else None
        if q is not None:
            p["p95s"].append(q)
        if p["windows"] < pol.windows:
            return
        self._probation = None
        p95s = sorted(p["p95s"])
        p95 = p95s[len(p95s) // 2] if p95s else None
        err = p["errors"] / p["count"] if p["count"] else 0.0
        refused = p["rejected"] / p["count"] if p["count"] else 0.0
        base = p["baseline_p95"]
        reason = None
        if refused > pol.max_rejected_rate:
            reason = (f"rejected inputs: {p['rejected']} of {p['count']} ({refused:.1%}) refused in its first "
                      f"{pol.windows} windows, over {pol.max_rejected_rate:.1%}")
        elif err > pol.max_error_rate:
            reason = f"error rate {err:.1%} over {pol.max_error_rate:.1%} in its first {pol.windows} windows"
        elif base and p95 is not None and p95 > pol.latency_factor * base and p95 - base >= pol.min_increase_ms:
            reason = (f"latency regression: p95 {p95:.3f} ms in its first {pol.windows} windows vs {base:.3f} ms "
                      f"before the flash (limit x{pol.latency_factor:g})")
        doc = {"id": None, "ts": round(time.time(), 3), "device_id": self.device_id,
               "p95_ms": p95, "baseline_p95_ms": base, "error_rate": err, "rejected_rate": refused}
        if reason is None:
            self._publish_result({**doc, "type": "probation", "ok": True, "stage": "confirmed",
                                  "message": f"{p['version']} passed its first {pol.windows} windows",
                                  "bundle": self.recorder.model_info.get("name"), "version": p["version"]})
            return
        log.warning("rolling back %s: %s", p["version"], reason)
        res = self.slots.rollback()
        if not res.ok:
            self._publish_result({**doc, "type": "auto_rollback", "ok": False, "stage": "failed",
                                  "message": f"{reason}; {res.message}", "bundle": None, "version": p["version"]})
            return
        try:
            model = self._reload(self.slots.active)
        except EdgeOpsError as exc:
            self._publish_result({**doc, "type": "auto_rollback", "ok": False, "stage": "failed",
                                  "message": f"{reason}; the previous bundle did not load: {exc}",
                                  "bundle": res.bundle, "version": res.version})
            return
        self._pending.put((model, "auto_rollback", {
            **doc, "type": "auto_rollback", "ok": True, "stage": "rolled_back",
            "message": f"{reason}; {res.message}", "bundle": res.bundle, "version": res.version,
            "from_version": p["version"]}))

    # -- publishing ----------------------------------------------------------------------------

    def _publish_loop(self) -> None:
        while not self._stop.is_set() or (self.delivery.inflight and self.link.connected.is_set()):
            if self._reconnected.is_set():
                self._reconnected.clear()
                self.delivery.reconnected()
            while self.link.connected.is_set() and not self._results.empty():
                if self.link.publish(self.result_topic, self._results.get_nowait(), qos=1) is None:
                    break
            self.delivery.step()
            if self._stop.is_set() and not len(self.spool):
                break
            time.sleep(0.02)

    def _attach_labels(self, w: dict) -> None:
        """The labels joined while window ``w`` was open go with it (called as it closes)."""
        joiner = getattr(self, "labels", None)
        labelled = joiner.take_window() if joiner is not None else None
        if labelled is not None and len(w["predictions"].get("counts") or []) == joiner.n_classes:
            w["labels"] = labelled

    def _spool_closed_windows(self, windows: list[dict], primary: bool = True) -> None:
        for w in windows:
            if primary:
                self.last_window = w
                self._report_losses(w)
                self._check_scale(w)
                p95 = LatencyHistogram.from_dict(w["latency_ms"]).quantile(0.95) if w["count"] else None
                if p95 is not None:
                    self._recent_p95.append(p95)
                if self._probation is not None:
                    self._judge(w)
            elif self.mode == "shadow":
                a = self._agree
                w["agreement"] = {"compared": a["compared"], "agreed": a["agreed"],
                                  "rate": round(a["agreed"] / a["compared"], 6) if a["compared"] else None,
                                  "max_abs_diff": round(a["max_abs_diff"], 6)}
                self._agree = {"compared": 0, "agreed": 0, "max_abs_diff": 0.0}
            seq = self.spool.append(TelemetryWindow.from_window(self.fleet, self.device_id, w).to_canonical())
            log.debug("window %d spooled (%d inferences)", seq, w["count"])

    def _report_losses(self, w: dict) -> None:
        """Predictions the outputs dropped or failed and inputs a live source dropped, since the last window."""
        now = (sum(s.counts.dropped for s in self.sinks), sum(s.counts.failed for s in self.sinks),
               getattr(self._source, "dropped", 0))
        last, self._losses_reported = self._losses_reported, now
        if self.sinks:
            w["outputs"] = {"dropped": now[0] - last[0], "failed": now[1] - last[1]}
        if hasattr(self._source, "dropped"):
            w["inputs_dropped"] = now[2] - last[2]

    def _check_scale(self, w: dict) -> None:
        """Warn once per bundle when the inputs look like another scale than the calibration data (raw
        0..16 pixels for a model calibrated on 0..1, say): it quietly costs accuracy. A feature looks
        rescaled when over 20% of its values fall outside the calibration range and the window reaches
        more than two calibration spans beyond it; the warning needs most features to look so."""
        f = w.get("features") or {}
        oor, counts = f.get("out_of_range"), f.get("count") or []
        key = (self.recorder.model_info.get("name"), self.recorder.model_info.get("version"))
        feats = ((self.model.manifest or {}).get("reference_profile") or {}).get("features") or []
        if not oor or key in self._scale_warned or sum(counts) < 20 or len(feats) != len(oor):
            return
        flagged, seen = [], 0
        for i, (o, c, ref) in enumerate(zip(oor, counts, feats, strict=True)):
            if not c:
                continue
            seen += 1
            span = max(ref["max"] - ref["min"], 1e-12)
            far = f["max"][i] > ref["max"] + 2 * span or f["min"][i] < ref["min"] - 2 * span
            if o / c > 0.2 and far:
                flagged.append(i)
        if not seen or len(flagged) * 2 <= seen:
            return
        self._scale_warned.add(key)
        i = flagged[0]
        ref = feats[i]
        log.warning("inputs look like another scale than the data %s %s was calibrated on (%d of %d features "
                    "mostly outside its range; e.g. %r reads %.4g..%.4g, calibration %.4g..%.4g): unnormalised "
                    "inputs quietly cost accuracy", *key, len(flagged), seen, ref.get("name", i), f["min"][i],
                    f["max"][i], ref["min"], ref["max"])

    def collect(self) -> None:
        """Spool the windows closed so far (for callers that predict outside :meth:`run`, like serve)."""
        self._spool_closed_windows(self.recorder.poll())
        if self.second_recorder is not None:
            self._spool_closed_windows(self.second_recorder.poll(), primary=False)
        self._learn_step()

    def _learn_step(self, max_batches: int = 4) -> None:
        """``--learn``: train on the full batches of joined labels (not after a flash: another model runs)."""
        if self.learner is not None and self.learner.trainer.model is self.model:
            self.learner.step(max_batches)

    def learn(self, learner) -> None:
        """Fine-tune on late labels (``--learn``): ``learner`` (edge_runtime.training.Learner, whose trainer's
        model must be the one this agent runs) remembers each input by id, gets every label joined to a
        prediction, and trains a batch at a time on the inference thread (in :meth:`collect`)."""
        self.learner = learner
        if getattr(self, "labels", None) is not None:
            self.labels.subscribe(learner.on_joined)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set() or self._interrupted.is_set()

    @property
    def spool_depth(self) -> int | None:
        """Windows not yet confirmed (None once the spool is closed)."""
        try:
            return len(self.spool)
        except Exception:  # noqa: BLE001 - closed at stop
            return None

    @property
    def spool_dropped(self) -> int | None:
        try:
            return self.spool.dropped
        except Exception:  # noqa: BLE001
            return None

    @property
    def output_counts(self) -> dict[str, dict]:
        """Per output sink: predictions delivered, dropped (queue full) and failed (delivery lost)."""
        return {s.name: s.counts.as_dict() for s in self.sinks}

    def _answer(self, model: EdgeModel, sample, sample_id, emit: bool = True):
        """``model.predict(sample)``, offered to the output sinks (labelled with the model's variant)."""
        t0 = time.perf_counter()
        out = model.predict(sample)
        if self.learner is not None and model is self.model and sample_id is not None:
            self.learner.remember(sample_id, sample)
        if self.labels is not None and model is self.model and sample_id is not None:
            cls = predicted_class(out)
            if cls is not None:
                self.labels.predicted(sample_id, cls)
        if emit and self.sinks:
            ms = (time.perf_counter() - t0) * 1000.0
            rec = model.recorder
            meta = self._out_meta.get(id(rec))
            if meta is None or meta[0] is not rec:   # once per model (and recorder): not per inference
                info = rec.model_info if rec is not None else {}
                meta = self._out_meta[id(rec)] = (rec, {k: info.get(k) for k in ("name", "version", "variant")},
                                                  tuple(model.labels) if model.labels else None, model.task)
            p = Prediction(sample_id, time.time(), out, ms, *meta[1:])
            for sink in self.sinks:
                sink.offer(p)
        return out

    def _predict(self, sample, sample_id=None) -> None:
        if self.second is None:
            self._answer(self.model, sample, sample_id)
        elif self.mode == "ab":
            self._answer(self.second if self._rng.random() < self.split else self.model, sample, sample_id)
        else:
            a = self._answer(self.model, sample, sample_id)
            try:
                b = self._answer(self.second, sample, sample_id, emit=self.output_variants == "all")
            except EdgeOpsError:
                return   # counted as an error in the shadow's window
            a, b = np.asarray(a, np.float32).ravel(), np.asarray(b, np.float32).ravel()
            diff = float(np.max(np.abs(a - b))) if a.shape == b.shape else float("inf")
            if a.size > 1 and a.shape == b.shape:
                same = int(np.argmax(a)) == int(np.argmax(b))
            else:
                same = diff <= 0.01 * max(1.0, float(np.max(np.abs(a))) if a.size else 1.0)
            ag = self._agree
            ag["compared"] += 1
            ag["agreed"] += int(same)
            ag["max_abs_diff"] = max(ag["max_abs_diff"], diff if np.isfinite(diff) else 0.0)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "DeviceAgent":
        pending = len(self.spool)
        if pending:
            log.info("%d unsent windows in the spool from an earlier run; they go out first", pending)
        if self.slots is not None and self._reload is not None:
            from edge_runtime.commands import CommandHandler

            self.commands = CommandHandler(self.slots, self._publish_result, self._switched, self.device_id)
        self.link.start()
        self._publisher.start()
        for sink in self.sinks:
            sink.start()
        return self

    def run(self, samples: Iterable, rate: float | None = None, max_inferences: int | None = None,
            duration: float | None = None) -> None:
        """Predict on every sample (at ``rate`` per second when given) until the stream ends."""
        self._source = samples    # a live source counts the inputs it dropped; windows report them
        t_start = time.monotonic()
        next_due = t_start
        last_poll = t_start
        for sample in self._interruptible(samples):
            if self._stop.is_set() or self._interrupted.is_set():
                break
            if not self._pending.empty():
                self._apply_pending()
            self._serve_one(sample)
            now = time.monotonic()
            if now - last_poll >= 0.1:
                self.collect()
                last_poll = now
            if max_inferences is not None and self.inferences + self.bad_inputs >= max_inferences:
                break
            if duration is not None and now - t_start >= duration:
                break
            if rate:
                next_due += 1.0 / rate
                delay = next_due - time.monotonic()
                if delay > 0 and self._interrupted.wait(delay):
                    break
                elif delay < -1.0:
                    next_due = time.monotonic()  # fell behind: do not burst to catch up
        self.collect()

    def _serve_one(self, sample) -> None:
        """One input of the run loop: predicted (its label, when the input carries one, joined in the same
        window), or counted as bad."""
        truth = None
        if isinstance(sample, Labelled):       # a replayed file's label column
            truth, sample = sample.y, sample.x
        sample_id, sample = input_id(sample, self._input_index)
        self._input_index += 1
        if isinstance(sample, BadSample):
            self._bad(sample.where, sample.reason)
            self.recorder.record_error(rejected=True, reason="unreadable")
            return
        labelled = truth is not None and self.labels is not None
        if labelled:                      # the label joins the window of its inference
            self.recorder.hold = True
        try:
            self._predict(sample, sample_id)
            self.inferences += 1
            if labelled:
                self.labels.label(sample_id, truth)
                self._learn_step(1)         # a batch trains as soon as it is full, whatever the input's pace
        except EdgeOpsError as exc:
            self._bad("input", str(exc))
        finally:
            if labelled:
                self.recorder.release()

    def _interruptible(self, samples: Iterable):
        """The samples, with a flag that says when the run loop is waiting for the next one."""
        it = iter(samples)
        while True:
            self._waiting_input = True
            try:
                sample = next(it)
            except StopIteration:
                return
            finally:
                self._waiting_input = False
            yield sample

    def interrupt(self) -> None:
        """Ask :meth:`run` to return after the current inference (safe from a signal handler).

        The window being recorded is not lost: :meth:`stop` closes, spools and sends it. When the run
        loop is blocked reading its input (stdin, say), KeyboardInterrupt is raised to leave the read;
        nothing is half-written then, since no window is being spooled while an input is awaited.
        """
        self._interrupted.set()
        if self._waiting_input:
            raise KeyboardInterrupt

    def _bad(self, where: str, reason: str) -> None:
        self.bad_inputs += 1
        kind = reason.split(":")[0][:60]
        if kind not in self._logged_bad:
            self._logged_bad.add(kind)
            log.warning("bad input at %s: %s (counted in telemetry; further ones of this kind are not logged)",
                        where, reason)

    def stop(self, drain_timeout: float = 10.0) -> int:
        """Close the current window, wait up to ``drain_timeout`` for the spool to empty, go offline.

        Returns:
            Windows still in the spool (they are sent by the next run).
        """
        if self.commands is not None:
            self.commands.stop()
        for sink in self.sinks:   # before the link goes: the mqtt sink publishes its last batch on it
            sink.close()
            c = sink.counts
            if c.dropped or c.failed:
                log.warning("output %s: %d predictions delivered, %d dropped, %d failed", sink.name, c.delivered,
                            c.dropped, c.failed)
        # labels joined since the last window go out even when no inference came since
        last = self.recorder.flush(empty=self.labels is not None and self.labels.pending)
        if last is not None:
            self._spool_closed_windows([last])
        if self.second_recorder is not None:
            last = self.second_recorder.flush()
            if last is not None:
                self._spool_closed_windows([last], primary=False)
        # wait for the confirmations (or the broker's acknowledgements, without a monitor in sight); a broker
        # that is not there gets a few seconds to come back (a short run may stop before it connected)
        deadline = time.monotonic() + drain_timeout
        offline_deadline = time.monotonic() + min(drain_timeout, 5.0)
        while (not self.delivery.settled() or not self._results.empty()) and time.monotonic() < deadline:
            if not self.link.connected.is_set() and time.monotonic() > offline_deadline:
                break
            time.sleep(0.05)
        self._stop.set()
        self._publisher.join(timeout=5)
        self.link.stop(final=(self.status_topic, self._status(online=False)))
        left = len(self.spool)
        self.spool.close()
        if left:
            log.warning("%d windows could not be delivered yet; they stay in %s", left, self.state_dir)
        return left

    def __enter__(self) -> "DeviceAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def samples_from(source: str | None, model: EdgeModel, loop: bool = False, broker: BrokerAddress | None = None,
                 client_id: str = "edgeops-input", label_column: str | None = None) -> Iterable:
    """The sample stream for ``--input``: a .csv/.npy/.npz file, a folder of images, '-' for stdin,
    ``mqtt:TOPIC`` (on ``broker``), ``video:PATH``, ``camera:N`` or ``rtsp://...``.

    Live sources (MQTT, video) are started here; close them (``.close()``) when the run ends. A file with
    labels (``label_column`` of a .csv, the ``y`` array of a .npz) yields them with its samples.
    """
    from edge_runtime.inputs import (
        MqttInput,
        VideoInput,
        image_files,
        is_video_source,
        json_lines,
        read_labelled_rows,
        replay,
        replay_labelled,
    )

    if source in (None, "-"):
        return json_lines()
    if source.startswith("mqtt:"):
        if broker is None or not source[5:]:
            raise InvalidInputError(f"input {source!r}: mqtt:TOPIC reads from the agent's --broker")
        return MqttInput(broker, source[5:], client_id).start()
    if is_video_source(source):
        image = ((model.manifest or {}).get("input_schema") or {}).get("image")
        return VideoInput(source, image).start()
    p = Path(source)
    if p.is_dir():
        return image_files(p, loop)
    X, y = read_labelled_rows(p, model.input_spec.n_values, label_column)
    shape = model.input_spec.shape
    if X.ndim == 2 and len(shape) > 1 and X.shape[1] == int(np.prod(shape)):
        X = X.reshape((len(X),) + tuple(shape))
    return replay(X, loop) if y is None else replay_labelled(X, y, loop)
