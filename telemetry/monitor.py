"""The fleet monitor: consume telemetry over MQTT, validate, store, evaluate, alert.

One process, or several sharing the load through an MQTT v5 shared
subscription: windows are stored in one database, and every evaluation reads
the merged recent windows from there, so which process received a window
does not change any conclusion.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

from edge_runtime.mqtt import BrokerAddress
from telemetry import alerts as alerting
from telemetry import store
from telemetry.evaluate import Evaluation, MonitorConfig, Verdict, evaluate
from telemetry.validation import MAX_PAYLOAD, Rejected, check_against_profile, parse

FLEET_EVAL_SHARE = 4.0   # a fleet's merge: at most about 1 / (1 + 4) of evaluation time

log = logging.getLogger("edgeops.monitor")


@dataclass
class MonitorStats:
    """What this process has seen (exposed on /metrics)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: dict = field(default_factory=lambda: defaultdict(int))
    inferences: dict = field(default_factory=lambda: defaultdict(int))
    errors: dict = field(default_factory=lambda: defaultdict(int))
    latest: dict = field(default_factory=dict)          # (fleet, device) -> last window's latency block
    scores: dict = field(default_factory=dict)          # (fleet, device) -> {feature: psi}
    broker_dropped: float | None = None


class FleetMonitor:
    """Consumes ``<prefix>/<fleet>/+/telemetry|status|bench`` and keeps the fleet's verdicts current.

    Args:
        broker: the broker.
        db_url: SQLAlchemy URL (sqlite:///monitor.db or postgresql://...).
        fleet: fleet to watch, or "+" for all.
        share: MQTT v5 shared-subscription group for horizontal scale.
        client_id: stable client id (a restart resumes the broker session with it).
        config: detector thresholds.
        bundles: manifests whose reference profiles drift is measured against.
        webhook: URL to POST alert transitions to.
    """

    def __init__(self, broker: BrokerAddress, db_url: str = "sqlite:///monitor.db", fleet: str = "+",
                 share: str | None = None, client_id: str | None = None, config: MonitorConfig | None = None,
                 bundles: list[dict] | None = None, webhook: str | None = None, prefix: str = "edgeops",
                 eval_interval: float = 1.0, session_expiry: int = 3600, max_payload: int = MAX_PAYLOAD):
        if share and not broker.v5:
            raise ValueError(f"--share needs MQTT 5 shared subscriptions; {broker.url} speaks MQTT 3.1.1")
        self.broker = broker
        self.engine = store.connect(db_url)
        self.fleet = fleet
        self.share = share
        self.prefix = prefix
        self.config = config or MonitorConfig()
        self.webhook = webhook
        self.eval_interval = eval_interval
        self.max_payload = max_payload
        self.client_id = client_id or ("edgeops-monitor" + (f"-{share}" if share else ""))
        self.session_expiry = session_expiry
        for m in bundles or []:
            store.store_bundle(self.engine, m)
        self._bundles = store.load_bundles(self.engine)
        self.stats = MonitorStats()
        self._inbox: queue.Queue = queue.Queue()
        self._dirty: set[tuple[str, str, str, str]] = set()
        self._dirty_lock = threading.Lock()
        # a fleet-level evaluation merges the recent windows of every device of the fleet: it waits
        # FLEET_EVAL_SHARE x its last duration before the next one (a fleet whose windows came in
        # meanwhile stays pending), so a large fleet's merge takes a bounded share of evaluation time
        self._fleet_due: dict[tuple[str, str, str], float] = {}
        self._fleet_pending: set[tuple[str, str, str]] = set()
        self._stop = threading.Event()
        self._logged: set[tuple[str, str]] = set()
        self._threads: list[threading.Thread] = []
        self.client = None
        self.connected = threading.Event()

    # -- MQTT ----------------------------------------------------------------------------------

    def _subscriptions(self) -> list[str]:
        base = f"{self.prefix}/{self.fleet}/+"
        shared = (lambda t: f"$share/{self.share}/{t}") if self.share else (lambda t: t)
        # retained status messages are not delivered to shared subscriptions: every process reads them
        return [shared(f"{base}/telemetry"), shared(f"{base}/bench"), f"{base}/status",
                "$SYS/broker/publish/messages/dropped"]

    def start(self) -> "FleetMonitor":
        import paho.mqtt.client as mqtt
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        # on an MQTT 3.1.1 broker: a non-clean session the broker keeps (and no shared subscription)
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=self.broker.paho_protocol(), **({} if self.broker.v5 else {"clean_session": False}))
        c.manual_ack_set(True)  # acknowledge a window only once it is in the database
        c.max_inflight_messages_set(1000)
        c.reconnect_delay_set(1, 30)
        if self.broker.username:
            c.username_pw_set(self.broker.username, self.broker.password)
        if self.broker.tls:
            c.tls_set(ca_certs=self.broker.ca_file, certfile=self.broker.cert_file, keyfile=self.broker.key_file)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.session_expiry

        def on_connect(client, userdata, flags, rc, properties):
            if rc.is_failure:
                log.error("broker %s refused the monitor: %s", self.broker.url, rc)
                return
            log.info("monitor connected to %s (session %s)", self.broker.url,
                     "resumed" if flags.session_present else "new")
            client.subscribe([(t, 1) for t in self._subscriptions()])
            self.connected.set()

        def on_disconnect(client, userdata, flags, rc, properties):
            if not self._stop.is_set():
                log.warning("monitor lost broker %s (%s); reconnecting", self.broker.url, rc)
            self.connected.clear()

        def on_message(client, userdata, msg):
            self._inbox.put((msg.topic, msg.payload, msg.mid, msg.qos))

        c.on_connect, c.on_disconnect, c.on_message = on_connect, on_disconnect, on_message
        self.client = c
        c.connect_async(self.broker.host, self.broker.port, keepalive=30,
                        **({"clean_start": False, "properties": props} if self.broker.v5 else {}))
        c.loop_start()
        for target, name in ((self._ingest_loop, "ingest"), (self._evaluate_loop, "evaluate")):
            t = threading.Thread(target=target, name=f"edgeops-monitor-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()

    # -- ingestion -----------------------------------------------------------------------------

    def _ingest_loop(self) -> None:
        while not self._stop.is_set() or not self._inbox.empty():
            batch = []
            try:
                batch.append(self._inbox.get(timeout=0.05))
            except queue.Empty:
                continue
            while len(batch) < 1000:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self.ingest(batch)
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the monitor
                log.exception("storing a batch of %d messages failed; they will be redelivered", len(batch))
                continue
            for _, _, mid, qos in batch:
                if qos and self.client is not None:
                    self.client.ack(mid, qos)

    def ingest(self, batch: list[tuple[str, bytes, int, int]]) -> None:
        """Validate and store a batch of raw messages (also usable without MQTT, e.g. in benchmarks)."""
        windows = []
        for topic, payload, _mid, _qos in batch:
            self.stats.received += 1
            if topic.startswith("$SYS/"):
                try:
                    self.stats.broker_dropped = float(payload)
                except ValueError:
                    pass
                continue
            try:
                msg = parse(topic, payload, self.prefix, self.max_payload)
                if msg.kind == "telemetry":
                    manifest = self._manifest(msg.doc["model"])
                    if manifest is not None:
                        check_against_profile(msg.doc, manifest.get("reference_profile"), manifest.get("labels"))
            except Rejected as rej:
                self._reject(topic, rej)
                continue
            if msg.kind == "telemetry":
                windows.append((msg.fleet, msg.device_id, msg.doc))
            elif msg.kind == "status":
                store.store_status(self.engine, msg.fleet, msg.device_id, msg.doc)
                if not msg.doc["online"]:
                    self._mark(msg.fleet, msg.device_id, msg.doc.get("model") or {})
            else:
                store.store_bench(self.engine, msg.fleet, msg.device_id, msg.doc)
        if windows:
            new, dup = store.store_windows(self.engine, windows)
            self.stats.stored += new
            self.stats.duplicates += dup
            for fleet, device, w in windows:
                key = (fleet, device)
                self.stats.inferences[key] += w["count"]
                self.stats.errors[key] += w["errors"]
                self.stats.latest[key] = w["latency_ms"]
                self._mark(fleet, device, w["model"])

    def _reject(self, topic: str, rej: Rejected) -> None:
        parts = topic.split("/")
        device = parts[2] if len(parts) > 2 else "?"
        self.stats.rejected[rej.reason] += 1
        if (device, rej.reason) not in self._logged:
            self._logged.add((device, rej.reason))
            log.warning("rejected a message from %s (%s): %s (further ones logged only as counts)",
                        device, rej.reason, rej.detail)

    def _manifest(self, model: dict) -> dict | None:
        key = (model.get("name"), model.get("version"))
        m = self._bundles.get(key)
        if m is None and key not in self._bundles:
            self._bundles = store.load_bundles(self.engine)  # another process may have registered it
            m = self._bundles.get(key)
            if m is None:
                self._bundles[key] = None
                log.info("no bundle %s %s is registered: its windows are stored, drift is not evaluated", *key)
        return m

    def _mark(self, fleet: str, device: str, model: dict) -> None:
        if model.get("name"):
            with self._dirty_lock:
                self._dirty.add((fleet, device, model["name"], model.get("version", "")))

    # -- evaluation ----------------------------------------------------------------------------

    def _evaluate_loop(self) -> None:
        while not self._stop.wait(self.eval_interval):
            try:
                self.evaluate_pending()
                self.check_silence()
            except Exception:  # noqa: BLE001
                log.exception("evaluation failed; retrying at the next interval")

    def evaluate_pending(self) -> list[tuple[str, dict]]:
        """Evaluate every device (and its fleet) that got windows since the last call."""
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        events = []
        fleets = set()
        for fleet, device, name, version in sorted(dirty):
            # ingestion first: windows waiting in the inbox are not acknowledged yet, while an evaluation
            # that waits loses nothing (it reads the stored windows whenever it runs)
            while self._inbox.qsize() > 500 and not self._stop.is_set():
                time.sleep(0.02)
            events += self.evaluate_device(fleet, device, name, version)
            fleets.add((fleet, name, version))
        fleets |= self._fleet_pending
        self._fleet_pending = set()
        for key in sorted(fleets):
            started = time.monotonic()
            if started < self._fleet_due.get(key, 0.0):
                self._fleet_pending.add(key)
                continue
            events += self.evaluate_device(key[0], "*", key[1], key[2])
            self._fleet_due[key] = time.monotonic() + FLEET_EVAL_SHARE * (time.monotonic() - started)
        return events

    def evaluate_device(self, fleet: str, device: str, name: str, version: str) -> list[tuple[str, dict]]:
        manifest = self._manifest({"name": name, "version": version})
        cfg = self.config
        source = "first_windows"
        if device == "*":
            n_devices = max(1, len([d for d in store.device_rows(self.engine) if d["fleet"] == fleet]))
            recent = store.recent_windows(self.engine, fleet, None, name, version, cfg.recent_windows * n_devices)
            baseline = None
        else:
            recent = store.recent_windows(self.engine, fleet, device, name, version, cfg.recent_windows)
            # the baseline: the device's own `edgeops bench --publish` result for this version and artifact
            # when it published one, else the median p95 of its first windows of this version
            artifact = (recent[0].get("model") or {}).get("artifact") if recent else None
            baseline = store.bench_p95(self.engine, fleet, device, name, version, artifact)
            source = "bench" if baseline is not None else "first_windows"
            if baseline is None:
                first = store.first_windows(self.engine, fleet, device, name, version, cfg.baseline_windows)
                baseline = sorted(first)[len(first) // 2] if len(first) >= cfg.baseline_windows else None
        if not recent:
            return []
        ev: Evaluation = evaluate(recent, manifest, cfg, baseline_p95=baseline, baseline_source=source)
        if device != "*":
            self.stats.scores[(fleet, device)] = ev.feature_scores
        else:
            ev.verdicts = [v for v in ev.verdicts if v.detector in ("feature_drift", "prediction_drift", "missing_values")]
        return self._apply(fleet, device, name, version, ev.verdicts)

    def _apply(self, fleet: str, device: str, name: str, version: str, verdicts: list[Verdict]) -> list[tuple[str, dict]]:
        events = []
        states = store.alert_states(self.engine, fleet, device, name, version) if verdicts else {}
        for v in verdicts:
            if not v.firing and not states.get(v.detector):
                continue        # nothing open and nothing firing: no state to change
            change = alerting.apply(self.engine, fleet, device, name, version, v, self.config.close_after)
            if change:
                event = {"event": change, "fleet": fleet, "device_id": device, "model": {"name": name, "version": version},
                         "detector": v.detector, "features": v.features, "statistic": v.statistic, "detail": v.detail,
                         "ts": time.time()}
                log.warning("alert %s: %s on %s/%s (%s %s) %s", change, v.detector, fleet, device, name, version,
                            ", ".join(v.features) if v.features else f"statistic {v.statistic:.4g}")
                events.append((change, event))
                if self.webhook:
                    alerting.post_webhook(self.webhook, event)
        if events:
            self.publish_alerts(fleet)
        return events

    def check_silence(self, now: float | None = None) -> list[tuple[str, dict]]:
        """Open a silence alert for devices with no window for K periods or a retained offline status."""
        now = now or time.time()
        events = []
        for d in store.device_rows(self.engine):
            if self.fleet not in ("+", d["fleet"]) or not d["model_name"]:
                continue
            series = store.window_series(self.engine, d["fleet"], d["device_id"], limit=5)
            periods = [w["end"] - prev["end"] for prev, w in zip(series, series[1:]) if w["end"] > prev["end"]]
            period = sorted(periods)[len(periods) // 2] if periods else 10.0
            quiet = now - (d["last_seen"] or now)
            silent = d["online"] is False or quiet > self.config.silence_periods * max(period, 1.0)
            verdict = Verdict("silence", silent, quiet, [], {"online": d["online"], "seconds_quiet": round(quiet, 1),
                                                             "period_s": round(period, 2)})
            events += self._apply(d["fleet"], d["device_id"], d["model_name"], d["model_version"] or "", [verdict])
        return events

    def publish_alerts(self, fleet: str) -> None:
        """The fleet's open alerts, retained on <prefix>/<fleet>/alerts."""
        if self.client is None:
            return
        open_ = store.open_alerts(self.engine, fleet)
        doc = {"fleet": fleet, "ts": time.time(), "open": [
            {k: a[k] for k in ("device_id", "model_name", "model_version", "detector", "features", "statistic", "opened_at")}
            for a in open_]}
        self.client.publish(f"{self.prefix}/{fleet}/alerts", json.dumps(doc, default=float), qos=1, retain=True)
