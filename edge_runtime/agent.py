"""The device agent: run a bundle on a stream of inputs and report every window over MQTT.

Every closed window goes to the on-disk spool first and leaves it only when
the monitor confirms it is committed to its database (see
edge_runtime.delivery), so a broker crash, a broker outage, a network cut or
an agent restart loses nothing: windows are delivered at least once, and the
monitor deduplicates by (device, seq).

:class:`DeviceAgent` composes the parts: a :class:`~edge_runtime.publisher.Publisher` (spool to MQTT, the
publisher thread), a :class:`~edge_runtime.router.VariantRouter` (A/B split and shadow mode), a
:class:`~edge_runtime.probation.ProbationJudge` (a flashed bundle's first windows) and, with bundle slots, a
:class:`~edge_runtime.commands.CommandHandler` (flash and rollback commands).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
import platform
import queue
import shutil
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from edge_runtime import compact, wire
from edge_runtime.delivery import WindowDelivery
from edge_runtime.errors import EdgeOpsError, InvalidInputError
from edge_runtime.inputs import IDLE, BadSample, Labelled, input_id
from edge_runtime.labels import LabelJoiner, predicted_class
from edge_runtime.messages import TelemetryWindow
from edge_runtime.model import EdgeModel
from edge_runtime.mqtt import DEFAULT_PREFIX, BrokerAddress, MqttLink
from edge_runtime.outputs import CallbackSink, Prediction, PredictionSink, open_sink
from edge_runtime.probation import ProbationJudge, RollbackPolicy, Verdict
from edge_runtime.publisher import Publisher, Topics
from edge_runtime.router import MODEL_KEYS, VariantRouter, Variants
from edge_runtime.spool import WindowSpool
from edge_runtime.state import check_id, prepare_state_dir

__all__ = ["AgentConfig", "DeviceAgent", "RollbackPolicy", "Variants", "platform_info", "samples_from"]

log = logging.getLogger("edgeops.agent")

STOP_CLOSE_S = 5.0      # at a stop: the command thread and the output sinks (closed together) get this long
STOP_PUBLISHER_S = 5.0  # then, after the drain: the publisher thread's last round
STOP_OFFLINE_S = 5.0    # and the final (offline) status and the link's disconnect
STOP_SLACK_S = 1.0      # what a thread that ignores its own timeout is waited for beyond it
# stop() returns within drain_timeout + STOP_BOUND_S, whatever the link, the broker or the sinks do
STOP_BOUND_S = STOP_CLOSE_S + STOP_PUBLISHER_S + STOP_OFFLINE_S + 2 * STOP_SLACK_S


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
class AgentConfig:
    """The agent's settings (each one has a default).

    Args:
        state_dir: spool and identity (see edge_runtime.state).
        window_seconds, window_size: when windows close.
        prefix: topic prefix; topics are ``<prefix>/<fleet>/<device_id>/...``.
        spool_max: at most this many unsent windows are kept.
        confirm: "monitor" (a window leaves the spool when the monitor confirms it is stored, the
            default) or "broker" (at the broker's PUBACK; for a deployment without an edgeops monitor).
        resend_after: seconds before a window the monitor has not confirmed is published again.
        compress: zlib-compress published windows (the same as ``encoding="zlib"``).
        encoding: how telemetry windows are published: json (the default), zlib, cbor or cbor-exact
            (edge_runtime.compact; the monitor reads every one of them).
        outputs: where predictions go: ``--output`` values ("stdout", "jsonl:PATH", "mqtt", "http:URL";
            see edge_runtime.outputs) or sinks; each runs off the inference thread with a bounded queue.
        on_prediction: called with every :class:`~edge_runtime.outputs.Prediction` (from its own thread).
        rollback_policy: judges a newly flashed bundle on its first windows (None: never by itself).
    """

    state_dir: str | Path | None = None
    window_seconds: float | None = 10.0
    window_size: int | None = None
    prefix: str = DEFAULT_PREFIX
    spool_max: int = 10_000
    confirm: str = "monitor"
    resend_after: float = 30.0
    compress: bool = False
    encoding: str | None = None
    outputs: Iterable = ()
    on_prediction: Callable[[Prediction], object] | None = None
    rollback_policy: RollbackPolicy | None = RollbackPolicy()


_CONFIG_FIELDS = frozenset(f.name for f in fields(AgentConfig))
_VARIANT_FIELDS = frozenset(f.name for f in fields(Variants))


def agent_settings(config: AgentConfig | None, variants: Variants | None,
                   settings: dict) -> tuple[AgentConfig, Variants]:
    """``config`` and ``variants`` (their defaults when None) with the keyword ``settings`` applied: each
    one a field of :class:`AgentConfig` or :class:`~edge_runtime.router.Variants`."""
    unknown = sorted(set(settings) - _CONFIG_FIELDS - _VARIANT_FIELDS)
    if unknown:
        raise TypeError(f"DeviceAgent() got unexpected keyword arguments: {', '.join(unknown)}")
    config = replace(config or AgentConfig(), **{k: v for k, v in settings.items() if k in _CONFIG_FIELDS})
    variants = replace(variants or Variants(), **{k: v for k, v in settings.items() if k in _VARIANT_FIELDS})
    return config, variants


def _free_disk(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _previous_model(slots) -> dict | None:
    """The bundle a rollback would go back to (name and version), if the slots hold one."""
    prev = slots.previous if slots is not None else None
    if prev is None:
        return None
    try:
        pm = json.loads((prev / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return {"name": pm.get("name"), "version": pm.get("version")}


def _in_background(fn: Callable[[], object], name: str) -> threading.Thread:
    thread = threading.Thread(target=fn, name=name, daemon=True)
    thread.start()
    return thread


def _join_all(threads: list[threading.Thread], timeout: float) -> None:
    """Wait for the threads, ``timeout`` seconds in all."""
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            log.warning("%s did not end within %.0f s at stop; left behind", thread.name, timeout)


# -- inputs on another scale than the calibration data ---------------------------------------------


def _scale_checkable(f: dict, feats: list) -> bool:
    """The window has enough values, per feature of the reference profile, to judge their scale."""
    oor, counts = f.get("out_of_range"), f.get("count") or []
    return bool(oor) and sum(counts) >= 20 and len(feats) == len(oor)


def _far_out(f: dict, i: int, ref: dict) -> bool:
    """Feature ``i`` of the window reaches more than two calibration spans beyond its calibration range."""
    span = max(ref["max"] - ref["min"], 1e-12)
    return f["max"][i] > ref["max"] + 2 * span or f["min"][i] < ref["min"] - 2 * span


def _rescaled_features(f: dict, feats: list) -> tuple[list[int], int]:
    """(features that look rescaled, features with values)."""
    flagged, seen = [], 0
    for i, (o, c, ref) in enumerate(zip(f["out_of_range"], f["count"], feats, strict=True)):
        if not c:
            continue
        seen += 1
        far = _far_out(f, i, ref)
        if o / c > 0.2 and far:
            flagged.append(i)
    return flagged, seen


def _warn_scale(key: tuple, f: dict, feats: list, flagged: list[int], seen: int) -> None:
    i = flagged[0]
    ref = feats[i]
    log.warning("inputs look like another scale than the data %s %s was calibrated on (%d of %d features "
                "mostly outside its range; e.g. %r reads %.4g..%.4g, calibration %.4g..%.4g): unnormalised "
                "inputs quietly cost accuracy", *key, len(flagged), seen, ref.get("name", i), f["min"][i],
                f["max"][i], ref["min"], ref["max"])


class _Pacer:
    """The run loop's clock: windows collected every 0.1 s, the ``duration`` limit and the input ``rate``."""

    POLL_S = 0.1

    def __init__(self, rate: float | None, duration: float | None, interrupted: threading.Event):
        self.rate, self.duration, self.interrupted = rate, duration, interrupted
        self.t_start = self.next_due = self.last_poll = time.monotonic()

    def poll_due(self, now: float) -> bool:
        if now - self.last_poll >= self.POLL_S:
            self.last_poll = now
            return True
        return False

    def expired(self, now: float) -> bool:
        return self.duration is not None and now - self.t_start >= self.duration

    def wait(self) -> bool:
        """Wait for the next input's turn at ``rate``; True when interrupted meanwhile."""
        if not self.rate:
            return False
        self.next_due += 1.0 / self.rate
        delay = self.next_due - time.monotonic()
        if delay > 0:
            return self.interrupted.wait(delay)
        if delay < -1.0:
            self.next_due = time.monotonic()  # fell behind: do not burst to catch up
        return False


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
        config: the settings (:class:`AgentConfig`).
        variants: a second bundle, A/B or shadow (:class:`~edge_runtime.router.Variants`).
        slots: the device's bundle slots; with them the agent takes flash and rollback commands
            on ``.../cmd`` and answers on ``.../cmd/result`` (see edge_runtime.commands).
        reload: loads a bundle folder into a model (the same options as the first one).
        **settings: any field of :class:`AgentConfig` or :class:`~edge_runtime.router.Variants` by keyword
            (``state_dir=``, ``window_size=``, ``second=``, ``mode=``, ...); it overrides ``config``/``variants``.
    """

    def __init__(self, model: EdgeModel, device_id: str, fleet: str, broker: BrokerAddress,
                 config: AgentConfig | None = None, variants: Variants | None = None, slots=None,
                 reload: Callable[[Path], EdgeModel] | None = None, **settings):
        config, variants = agent_settings(config, variants, settings)
        self.config = config
        self.model = model
        self.window_seconds, self.window_size = config.window_seconds, config.window_size
        self.learner = None     # --learn: see learn()
        self.device_id = check_id(device_id, "device id")
        self.fleet = check_id(fleet, "fleet")
        self.prefix = config.prefix
        self.topics = Topics.of(self.prefix, self.fleet, self.device_id)
        self.state_dir = prepare_state_dir(config.state_dir, device_id, fleet)
        self.spool = WindowSpool(self.state_dir / "spool.sqlite", max_windows=config.spool_max)
        self.router = VariantRouter(variants)
        self.compress = config.compress
        self._start_recording(model, self.router.primary_variant)
        self.router.start_recording(self.window_seconds, self.window_size)
        self._init_labels()
        self.judge = ProbationJudge(config.rollback_policy)
        self._pending: queue.Queue[tuple[EdgeModel, str, dict]] = queue.Queue()
        self.slots, self._reload, self.commands = slots, reload, None
        self._init_link(broker, config)
        self._init_run_state()
        self.sinks: list[PredictionSink] = self._open_sinks(config)

    def _init_labels(self) -> None:
        """Late ground truth joined to predictions by input id (edge_runtime/labels.py); classifiers only."""
        n_classes = self.recorder.n_classes
        self.labels: LabelJoiner | None = LabelJoiner(self.model.labels, n_classes) if n_classes else None
        self.labels_refused: collections.Counter[str] = collections.Counter()

    def _init_link(self, broker: BrokerAddress, config: AgentConfig) -> None:
        self.link = MqttLink(broker, client_id=f"edgeops-{self.fleet}-{self.device_id}",
                             will=(self.topics.status, self._status(online=False)),
                             on_connect=self._on_connect, on_ack=self._on_ack, on_message=self._on_message)
        self.delivery = WindowDelivery(self.spool, self.link, self.topics.telemetry, confirm=config.confirm,
                                       compress=config.compress, resend_after=config.resend_after,
                                       encoding=config.encoding)
        self.publisher = Publisher(self.delivery, self.topics)

    def _init_run_state(self) -> None:
        self._stop = threading.Event()
        self._interrupted = threading.Event()
        self._waiting_input = False
        self.inferences = 0
        self.bad_inputs = 0
        self._logged_bad: set[str] = set()
        self._scale_warned: set[tuple] = set()
        self.last_window: dict | None = None
        self._input_index = 0
        self._out_meta: dict[int, tuple] = {}
        self._source = None
        self._losses_reported = (0, 0, 0)   # output drops, output failures, live-input drops in earlier windows

    def _open_sinks(self, config: AgentConfig) -> list[PredictionSink]:
        sinks = [o if isinstance(o, PredictionSink) else open_sink(
            o, publish=lambda t, payload, qos: self.link.publish(t, payload, qos=qos), topic=self.topics.predictions,
            envelope=lambda records: wire.encode(wire.predictions_message(self.fleet, self.device_id, records)))
            for o in config.outputs]
        if config.on_prediction is not None:
            sinks.append(CallbackSink(config.on_prediction, max_queue=10_000))
        return sinks

    def _start_recording(self, model: EdgeModel, variant: str | None) -> None:
        """Record ``model``'s windows (as :attr:`recorder`), each closing with the labels joined meanwhile."""
        if model.manifest:       # its reference profile codes the moments of cbor-ref windows
            compact.register_bundle(model.manifest)
        self.recorder = model.start_recording(window_seconds=self.window_seconds, window_size=self.window_size,
                                              variant=variant)
        self.recorder.on_close = self._attach_labels

    # -- the parts' settings, as attributes ----------------------------------------------------

    @property
    def second(self) -> EdgeModel | None:
        return self.router.second

    @property
    def second_recorder(self):
        return self.router.second_recorder

    @property
    def mode(self) -> str:
        return self.router.mode

    @property
    def split(self) -> float:
        return self.router.split

    @property
    def output_variants(self) -> str:
        return self.router.output_variants

    @property
    def rollback_policy(self) -> RollbackPolicy | None:
        return self.judge.policy

    @property
    def telemetry_topic(self) -> str:
        return self.topics.telemetry

    @property
    def status_topic(self) -> str:
        return self.topics.status

    @property
    def cmd_topic(self) -> str:
        return self.topics.cmd

    @property
    def result_topic(self) -> str:
        return self.topics.result

    @property
    def ack_topic(self) -> str:
        return self.topics.ack

    @property
    def labels_topic(self) -> str:
        return self.topics.labels

    # -- status --------------------------------------------------------------------------------

    def _status(self, online: bool) -> bytes:
        m = self.model
        info = self.recorder.model_info
        from edge_runtime import __version__

        doc = wire.status_message(
            self.fleet, self.device_id, online, runtime_version=__version__, platform=platform_info(),
            model={k: info.get(k) for k in MODEL_KEYS},
            backend=f"{m.backend.name} {m.backend.version}", free_disk_bytes=_free_disk(self.state_dir),
            accepts_flash=self._accepts_flash())
        if m.manifest:
            from edge_runtime.slots import input_schema

            doc["input"] = input_schema(m.manifest)   # lets `edgeops flash` check a new bundle's fit first
        second = self.router.status()
        if second is not None:
            doc["second_model"] = second
        previous = _previous_model(self.slots)
        if previous is not None:
            doc["previous_model"] = previous
        return wire.encode(doc)

    def _accepts_flash(self) -> bool:
        """The device takes flashes: it has bundle slots and a trusted key (or was told to take unsigned)."""
        return self.slots is not None and self.slots.flash_refusal() is None

    def _publish_status(self) -> None:
        """The retained online status, now (from the run loop: after a switch of bundle)."""
        if self.link.connected.is_set():
            self.link.client.publish(self.topics.status, self._status(online=True), qos=1, retain=True)

    def _on_connect(self) -> None:
        # network thread: the status is small and retained; windows are resent by the publisher
        self.link.client.publish(self.topics.status, self._status(online=True), qos=1, retain=True)
        topics = self.publisher.subscriptions()
        if self.labels is not None:
            topics.append((self.topics.labels, 1))
        if self.commands is not None:
            topics.append((self.topics.cmd, 1))
        if topics:
            self.link.client.subscribe(topics)
        self.publisher.connected()

    def _on_ack(self, mid: int, ok: bool) -> None:
        self.publisher.on_ack(mid, ok)

    def _on_message(self, topic_name: str, payload: bytes) -> None:
        if topic_name == self.topics.ack:
            self.publisher.take_ack(payload)
        elif topic_name == self.topics.cmd and self.commands is not None:
            self.commands.submit(payload)
        elif topic_name == self.topics.labels and self.labels is not None:
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
            doc = {**doc, "probation_windows": self.judge.windows}
        log.info("command %s %s: %s", doc.get("type"), doc.get("stage"), doc.get("message"))
        self.publisher.send_result(doc)

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
            self._swap(model, kind, detail)

    def _swap(self, model: EdgeModel, kind: str, detail: dict) -> None:
        """Run ``model`` from now on: the old one's windows close, a flashed one goes on probation."""
        baseline = self.judge.baseline()
        self._spool_closed_windows(self.recorder.poll())
        last = self.recorder.flush()
        if last is not None:
            self._spool_closed_windows([last])
        variant = self.recorder.model_info.get("variant")
        self.model.stop_recording()
        self.model = model
        self._start_recording(model, variant)
        if self.labels is not None and self.recorder.n_classes:
            self.labels.reset(model.labels, self.recorder.n_classes)   # predictions of the old model go
        self.judge.begin(kind, self.recorder.model_info.get("version"), baseline)
        log.info("now running %s %s (%s)", self.recorder.model_info.get("name"),
                 self.recorder.model_info.get("version"), kind)
        self._publish_status()
        if detail:
            self._publish_result(detail)

    def _judged(self, verdict: Verdict) -> None:
        """A probation ended: confirm the bundle, or roll back by itself (errors or a latency regression)."""
        doc = verdict.figures(self.device_id)
        if verdict.passed:
            self._publish_result({**doc, "type": "probation", "ok": True, "stage": "confirmed",
                                  "message": f"{verdict.version} passed its first {verdict.windows} windows",
                                  "bundle": self.recorder.model_info.get("name"), "version": verdict.version})
            return
        log.warning("rolling back %s: %s", verdict.version, verdict.reason)
        self._roll_back(verdict, doc)

    def _roll_back(self, verdict: Verdict, doc: dict) -> None:
        """Switch the slots back and hand the previous bundle to the run loop (or report why not)."""
        failed = {**doc, "type": "auto_rollback", "ok": False, "stage": "failed"}
        res = self.slots.rollback()
        if not res.ok:
            self._publish_result({**failed, "message": f"{verdict.reason}; {res.message}", "bundle": None,
                                  "version": verdict.version})
            return
        try:
            model = self._reload(self.slots.active)
        except EdgeOpsError as exc:
            self._publish_result({**failed, "message": f"{verdict.reason}; the previous bundle did not load: {exc}",
                                  "bundle": res.bundle, "version": res.version})
            return
        self._pending.put((model, "auto_rollback", {
            **doc, "type": "auto_rollback", "ok": True, "stage": "rolled_back",
            "message": f"{verdict.reason}; {res.message}", "bundle": res.bundle, "version": res.version,
            "from_version": verdict.version}))

    # -- windows -------------------------------------------------------------------------------

    def _attach_labels(self, w: dict) -> None:
        """The labels joined while window ``w`` was open go with it (called as it closes)."""
        joiner = getattr(self, "labels", None)
        labelled = joiner.take_window() if joiner is not None else None
        if labelled is not None and len(w["predictions"].get("counts") or []) == joiner.n_classes:
            w["labels"] = labelled

    def _spool_closed_windows(self, windows: list[dict], primary: bool = True) -> None:
        for w in windows:
            if primary:
                self._primary_window(w)
            else:
                self.router.annotate(w)
            seq = self.spool.append(TelemetryWindow.from_window(self.fleet, self.device_id, w).to_canonical())
            log.debug("window %d spooled (%d inferences)", seq, w["count"])

    def _primary_window(self, w: dict) -> None:
        """What the primary model's closed windows feed: the metrics, the scale check, the probation."""
        self.last_window = w
        self._report_losses(w)
        self._check_scale(w)
        verdict = self.judge.observe(w)
        if verdict is not None:
            self._judged(verdict)

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
        key = (self.recorder.model_info.get("name"), self.recorder.model_info.get("version"))
        feats = ((self.model.manifest or {}).get("reference_profile") or {}).get("features") or []
        if key in self._scale_warned or not _scale_checkable(f, feats):
            return
        flagged, seen = _rescaled_features(f, feats)
        if not seen or len(flagged) * 2 <= seen:
            return
        self._scale_warned.add(key)
        _warn_scale(key, f, feats, flagged, seen)

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

    # -- predictions ---------------------------------------------------------------------------

    def _answer(self, model: EdgeModel, sample, sample_id, emit: bool = True):
        """``model.predict(sample)``, offered to the output sinks (labelled with the model's variant)."""
        t0 = time.perf_counter()
        out = model.predict(sample)
        if model is self.model and sample_id is not None:
            self._note_prediction(sample_id, sample, out)
        if emit and self.sinks:
            self._offer(model, sample_id, out, (time.perf_counter() - t0) * 1000.0)
        return out

    def _note_prediction(self, sample_id, sample, out) -> None:
        """The primary model's prediction of an input with an id: remembered for --learn and late labels."""
        if self.learner is not None:
            self.learner.remember(sample_id, sample)
        if self.labels is not None:
            cls = predicted_class(out)
            if cls is not None:
                self.labels.predicted(sample_id, cls)

    def _offer(self, model: EdgeModel, sample_id, out, ms: float) -> None:
        p = Prediction(sample_id, time.time(), out, ms, *self._output_meta(model))
        for sink in self.sinks:
            sink.offer(p)

    def _output_meta(self, model: EdgeModel) -> tuple:
        """(model info, labels, task) of the model's predictions: once per model and recorder, not per inference."""
        rec = model.recorder
        meta = self._out_meta.get(id(rec))
        if meta is None or meta[0] is not rec:
            info = rec.model_info if rec is not None else {}
            meta = self._out_meta[id(rec)] = (rec, {k: info.get(k) for k in ("name", "version", "variant")},
                                              tuple(model.labels) if model.labels else None, model.task)
        return meta[1:]

    def _predict(self, sample, sample_id=None) -> None:
        self.router.serve(self.model, functools.partial(self._answer, sample=sample, sample_id=sample_id))

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "DeviceAgent":
        pending = len(self.spool)
        if pending:
            log.info("%d unsent windows in the spool from an earlier run; they go out first", pending)
        if self.slots is not None and self._reload is not None:
            from edge_runtime.commands import CommandHandler

            self.commands = CommandHandler(self.slots, self._publish_result, self._switched, self.device_id)
        self.link.start()
        self.publisher.start()
        for sink in self.sinks:
            sink.start()
        return self

    def run(self, samples: Iterable, rate: float | None = None, max_inferences: int | None = None,
            duration: float | None = None) -> None:
        """Predict on every sample (at ``rate`` per second when given) until the stream ends."""
        self._source = samples    # a live source counts the inputs it dropped; windows report them
        pacer = _Pacer(rate, duration, self._interrupted)
        for sample in self._interruptible(samples):
            if self.stopping:
                break
            if not self._pending.empty():
                self._apply_pending()
            if sample is IDLE:     # a live input quiet for a while: close the windows whose time is up
                self.collect()
                if pacer.expired(time.monotonic()):
                    break
                continue
            self._serve_one(sample)
            if self._run_ends(pacer, max_inferences):
                break
        self.collect()

    def _run_ends(self, pacer: _Pacer, max_inferences: int | None) -> bool:
        """After an input: collect the closed windows now and then; True when the run loop ends."""
        now = time.monotonic()
        if pacer.poll_due(now):
            self.collect()
        if max_inferences is not None and self.inferences + self.bad_inputs >= max_inferences:
            return True
        return pacer.expired(now) or pacer.wait()

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
        """Ask :meth:`run` to return after the current inference (from any thread).

        The window being recorded is not lost: :meth:`stop` closes, spools and sends it.

        Not from a signal handler: this sets a threading.Event, whose lock the run loop (the main thread,
        where handlers run) holds inside each paced wait. A handler hands the call to a
        :class:`~edge_runtime.signals.SignalRelay` instead, and raises KeyboardInterrupt itself when
        :attr:`waiting_input` says the run loop is blocked reading its input (stdin, say); nothing is
        half-written then, since no window is being spooled while an input is awaited.
        """
        self._interrupted.set()

    @property
    def waiting_input(self) -> bool:
        """True while the run loop waits for its next input."""
        return self._waiting_input

    def _bad(self, where: str, reason: str) -> None:
        self.bad_inputs += 1
        kind = reason.split(":")[0][:60]
        if kind not in self._logged_bad:
            self._logged_bad.add(kind)
            log.warning("bad input at %s: %s (counted in telemetry; further ones of this kind are not logged)",
                        where, reason)

    def stop(self, drain_timeout: float = 10.0) -> int:
        """Close the current window, wait up to ``drain_timeout`` for the spool to empty, go offline.

        Every wait is bounded: it returns within ``drain_timeout`` + :data:`STOP_BOUND_S` seconds whatever
        the broker, the link, the command thread or the output sinks do.

        Returns:
            Windows still in the spool (they are sent by the next run).
        """
        self._close_commands_and_outputs()
        self._flush_windows()
        self.publisher.drain(drain_timeout)
        self._stop.set()
        self.publisher.stop(timeout=STOP_PUBLISHER_S)
        self._go_offline()
        left = len(self.spool)
        self.spool.close()
        if left:
            log.warning("%d windows could not be delivered yet; they stay in %s", left, self.state_dir)
        return left

    def _close_commands_and_outputs(self) -> None:
        """Stop the command thread and close the output sinks (before the link goes: the mqtt sink publishes
        its last batch on it), all at once, within STOP_CLOSE_S."""
        threads = [_in_background(self.commands.stop, "edgeops-commands-stop")] if self.commands is not None else []
        threads += [_in_background(functools.partial(self._close_sink, sink), f"edgeops-output-{sink.name}-close")
                    for sink in self.sinks]
        _join_all(threads, STOP_CLOSE_S + STOP_SLACK_S)

    @staticmethod
    def _close_sink(sink: PredictionSink) -> None:
        sink.close(timeout=STOP_CLOSE_S)
        c = sink.counts
        if c.dropped or c.failed:
            log.warning("output %s: %d predictions delivered, %d dropped, %d failed", sink.name, c.delivered,
                        c.dropped, c.failed)

    def _flush_windows(self) -> None:
        """Spool the windows closed since the last collect, then close and spool the ones being recorded.
        (The run loop collects now and then, and not at all when a signal took it out of a blocking read
        of its input: a window filled by the inputs just before would be lost otherwise.)"""
        self._spool_closed_windows(self.recorder.poll())
        if self.second_recorder is not None:
            self._spool_closed_windows(self.second_recorder.poll(), primary=False)
        # labels joined since the last window go out even when no inference came since
        last = self.recorder.flush(empty=self.labels is not None and self.labels.pending)
        if last is not None:
            self._spool_closed_windows([last])
        if self.second_recorder is not None:
            last = self.second_recorder.flush()
            if last is not None:
                self._spool_closed_windows([last], primary=False)

    def _go_offline(self) -> None:
        """Publish the offline status (retained) and disconnect, within STOP_OFFLINE_S (+ slack)."""
        final = (self.topics.status, self._status(online=False))
        link_stop = functools.partial(self.link.stop, final=final, timeout=STOP_OFFLINE_S)
        _join_all([_in_background(link_stop, "edgeops-link-stop")], STOP_OFFLINE_S + STOP_SLACK_S)

    def __enter__(self) -> "DeviceAgent":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _live_source(source: str, model: EdgeModel, broker: BrokerAddress | None, client_id: str):
    """An MQTT topic or a video source, started; None for a file or folder."""
    from edge_runtime.inputs import MqttInput, VideoInput, is_video_source

    if source.startswith("mqtt:"):
        if broker is None or not source[5:]:
            raise InvalidInputError(f"input {source!r}: mqtt:TOPIC reads from the agent's --broker")
        return MqttInput(broker, source[5:], client_id).start()
    if is_video_source(source):
        image = ((model.manifest or {}).get("input_schema") or {}).get("image")
        return VideoInput(source, image).start()
    return None


def _file_samples(p: Path, model: EdgeModel, loop: bool, label_column: str | None) -> Iterable:
    """The rows of a .csv/.npy/.npz file (with their labels when it has them)."""
    from edge_runtime.inputs import read_labelled_rows, replay, replay_labelled

    X, y = read_labelled_rows(p, model.input_spec.n_values, label_column)
    shape = model.input_spec.shape
    if X.ndim == 2 and len(shape) > 1 and X.shape[1] == int(np.prod(shape)):
        X = X.reshape((len(X),) + tuple(shape))
    return replay(X, loop) if y is None else replay_labelled(X, y, loop)


def samples_from(source: str | None, model: EdgeModel, loop: bool = False, broker: BrokerAddress | None = None,
                 client_id: str = "edgeops-input", label_column: str | None = None) -> Iterable:
    """The sample stream for ``--input``: a .csv/.npy/.npz file, a folder of images, '-' for stdin,
    ``mqtt:TOPIC`` (on ``broker``), ``video:PATH``, ``camera:N`` or ``rtsp://...``.

    Live sources (MQTT, video) are started here; close them (``.close()``) when the run ends. A file with
    labels (``label_column`` of a .csv, the ``y`` array of a .npz) yields them with its samples.
    """
    from edge_runtime.inputs import image_files, json_lines

    if source in (None, "-"):
        return json_lines()
    live = _live_source(source, model, broker, client_id)
    if live is not None:
        return live
    p = Path(source)
    if p.is_dir():
        return image_files(p, loop)
    return _file_samples(p, model, loop, label_column)
