"""`edgeops monitor` and `edgeops report`."""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import click

from edge_runtime.errors import InvalidInputError

log = logging.getLogger("edgeops.monitor")


def _bundles(paths: tuple[str, ...], folder: str | None) -> list[dict]:
    from edge_runtime.bundle import open_bundle

    found = [Path(p) for p in paths]
    if folder:
        d = Path(folder)
        if not d.is_dir():
            raise InvalidInputError(f"--bundles {d}: not a folder")
        found += sorted(p for p in d.iterdir() if (p / "manifest.json").is_file() or p.name.endswith(".tar.gz"))
    from convert.mlflow_io import resolved_bundle

    manifests = []
    for p in found:
        with resolved_bundle(p) as local:   # a path, or an MLflow URI such as models:/NAME-edge/3
            b = open_bundle(local)
        b.cleanup()          # only the manifest is kept: a .tar.gz's temporary folder goes at once
        manifests.append(b.manifest)
    return manifests


@click.command("monitor")
@click.option("--broker", required=True,
              help="mqtt://host:port or mqtts://user:pass@host:8883; or nats://host:4222 to consume natively from NATS "
                   "JetStream what devices publish over nats-server's MQTT (comma-separate a cluster's nodes).")
@click.option("--fleet", default="+", show_default=True, help="Fleet to watch ('+' for all).")
@click.option("--db", default="sqlite:///monitor.db", show_default=True,
              help="sqlite:///file.db, or postgresql://user@host:5432/db for several monitors.")
@click.option("--http", "http", help="Serve /metrics and the dashboard on [HOST]:PORT, e.g. :9100.")
@click.option("--share", help="MQTT v5 shared-subscription group: several monitors split the load. With nats://, "
                               "monitors of the same fleet and group share one durable consumer.")
@click.option("--client-id", help="Stable MQTT client id (default edgeops-monitor-FLEET[-GROUP], 'all' for '+'); "
                                   "give each shared monitor its own. With nats://, it names the durable JetStream "
                                   "consumers (CLIENT_ID-telemetry, -bench, -status): the same on every worker.")
@click.option("--ack-wait", type=float, default=30.0, show_default=True,
              help="nats:// only: seconds after which a message a worker took and did not acknowledge (it died) "
                   "goes to another worker.")
@click.option("--alerts-broker", metavar="URL",
              help="nats:// only: the same servers' MQTT side (mqtt://n1:1883,...?protocol=3.1.1), where the "
                   "fleet's open alerts are published retained (over NATS they cannot be).")
@click.option("--max-clock-skew", type=float, default=300.0, show_default=True,
              help="Seconds a window may be dated ahead of this machine's clock; later ones are quarantined.")
@click.option("--quarantine-keep", type=int, default=10_000, show_default=True,
              help="Refused messages kept (raw bytes, topic, reason) in the quarantine table; the newest.")
@click.option("--ack-qos", type=click.IntRange(0, 1), default=1, show_default=True,
              help="QoS of the confirmations to devices over MQTT: 1 (the broker keeps one for a device that is "
                   "away) or 0 (a third less monitor CPU per window; a device that missed one sends the window "
                   "again, stored once).")
@click.option("--mqtt-client", type=click.Choice(["stream", "paho"]), default="stream", show_default=True,
              help="The monitor's MQTT connection: stream (reads and acknowledges in batches: about half the CPU "
                   "per window) or paho (paho-mqtt, one packet at a time).")
@click.option("--no-confirm", is_flag=True,
              help="Do not acknowledge committed windows to the devices (they then resend until a monitor does).")
@click.option("--bundle", "bundle_paths", multiple=True, type=click.Path(),
              help="A bundle whose reference profile drift is measured against (repeatable).")
@click.option("--bundles", "bundles_dir", type=click.Path(), help="A folder of bundles.")
@click.option("--webhook", help="POST alert openings and closings as JSON to this URL.")
@click.option("--retention-days", type=float, default=30.0, show_default=True, help="Delete windows older than this.")
@click.option("--recent-windows", type=int, default=10, show_default=True,
              help="Sliding window: the most recent N windows per device.")
@click.option("--min-samples", type=int, default=200, show_default=True, help="No drift verdict on fewer inferences.")
@click.option("--alpha", type=float, default=0.01, show_default=True, help="Per-feature test level after correction.")
@click.option("--correction", type=click.Choice(["bh", "bonferroni"]), default="bh", show_default=True)
@click.option("--psi-threshold", type=float, default=0.1, show_default=True,
              help="Effect floor: a feature alerts only with PSI at least this (and a significant change); "
                   "a bundle's drift_thresholds override it per bundle and per feature.")
@click.option("--floor-z", type=float, default=1.0, show_default=True,
              help="Confidence that a feature's change is at least the floor, in standard deviations of the PSI "
                   "a change at the floor shows (1.0: 84% one-sided; 1.645: 95%; 0: the floor plus the noise's "
                   "mean).")
@click.option("--ks-alpha", type=float, default=0.01, show_default=True,
              help="Level of the binned KS test across features (Bonferroni); 0 turns that path off.")
@click.option("--latency-factor", type=float, default=1.5, show_default=True,
              help="p95 above its baseline by this factor alerts.")
@click.option("--latency-min-increase-ms", type=float, default=1.0, show_default=True,
              help="A regression must also raise p95 by at least this much over its baseline.")
@click.option("--latency-sustain", type=int, default=3, show_default=True,
              help="A regression must hold in each of a device's last N windows.")
@click.option("--latency-slo-ms", type=float, help="Absolute p95 latency objective.")
@click.option("--error-rate", type=float, default=0.05, show_default=True)
@click.option("--close-after", type=int, default=3, show_default=True, help="Clear evaluations before an alert closes.")
@click.option("--horizon", type=int, default=1000, show_default=True,
              help="The drift tests treat the recent windows as at most this many independent inferences.")
@click.option("--design-effect/--no-design-effect", default=True, show_default=True,
              help="Divide the sample size by the design effect the windows show (repeated or correlated inputs).")
@click.option("--deff-confidence", type=float, default=0.9, show_default=True,
              help="The features' design effects at their upper bound at this confidence (few windows say little "
                   "about dependence); 0: the estimate itself.")
@click.option("--distinct-cap/--no-distinct-cap", default=True, show_default=True,
              help="The tests believe at most as many samples as the windows saw distinct rows (looped data).")
@click.option("--hold-alpha", type=float, default=0.05, show_default=True,
              help="An open drift alert holds while its change is significant at this level ...")
@click.option("--close-ratio", type=float, default=0.5, show_default=True,
              help="... and its effect is at least this share of the opening threshold.")
@click.option("--min-open-seconds", type=float, default=60.0, show_default=True,
              help="An alert stays open at least this long.")
@click.option("--rejected-rate", type=float, default=0.05, show_default=True,
              help="Alert when more than this share of a device's attempted inferences were refused ...")
@click.option("--rejected-min-attempts", type=int, default=100, show_default=True,
              help="... once this many were attempted.")
@click.option("--confidence-min-psi", type=float, default=0.1, show_default=True,
              help="Confidence drift: the top-class probabilities' PSI against the holdout's must reach this ...")
@click.option("--confidence-alpha", type=float, default=0.001, show_default=True,
              help="... and be significant at this level.")
@click.option("--out-of-range-rate", type=float, default=0.25, show_default=True,
              help="Alert when a feature has this share of its values outside the calibration data's range.")
@click.option("--accuracy-drop", type=float, default=0.05, show_default=True,
              help="Alert when the accuracy on labelled inferences is more than this (absolute) below the bundle's "
                   "holdout accuracy ...")
@click.option("--accuracy-min-labelled", type=int, default=100, show_default=True,
              help="... once this many labelled inferences were seen over the recent windows ...")
@click.option("--accuracy-alpha", type=float, default=0.01, show_default=True,
              help="... and a one-sided binomial test says so at this level.")
@click.option("--on-alert-exec", metavar="CMD",
              help="Run CMD when a drift or accuracy alert opens, the incident as JSON on its stdin "
                   "(split like a shell command, not run by a shell; never blocks the monitor).")
@click.option("--on-alert-webhook", metavar="URL", help="POST the incident of a drift or accuracy alert that opens.")
@click.option("--on-alert-timeout", type=float, default=60.0, show_default=True,
              help="Seconds --on-alert-exec may run before it is killed.")
@click.option("--username", help="MQTT (or NATS) username.")
@click.option("--password", envvar="EDGEOPS_MQTT_PASSWORD", help="MQTT (or NATS) password (or EDGEOPS_MQTT_PASSWORD).")
@click.option("--ca", "ca_file", type=click.Path(), help="CA certificate for mqtts:// (or a NATS server's TLS).")
@click.option("--topic-prefix", default="edgeops", show_default=True)
@click.option("--duration", type=float, help="Stop after S seconds (default: run until interrupted).")
def monitor_cmd(broker, fleet, db, http, share, client_id, ack_wait, alerts_broker, ack_qos, mqtt_client,
                max_clock_skew, quarantine_keep, no_confirm, bundle_paths, bundles_dir, webhook, retention_days,
                recent_windows, min_samples, alpha, correction, psi_threshold, ks_alpha, latency_factor,
                latency_min_increase_ms, latency_sustain, latency_slo_ms, error_rate, close_after, username, password,
                ca_file, topic_prefix, duration, **judgments):
    """Consume fleet telemetry: validate, store, detect drift and latency regressions, alert."""
    from edge_runtime.mqtt import parse_broker_url
    from telemetry import store
    from telemetry.evaluate import MonitorConfig
    from telemetry.monitor import FleetMonitor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    trigger = _alert_trigger(judgments.pop("on_alert_exec"), judgments.pop("on_alert_webhook"),
                             judgments.pop("on_alert_timeout"))
    config = MonitorConfig(recent_windows=recent_windows, min_samples=min_samples, alpha=alpha, correction=correction,
                           psi_threshold=psi_threshold, ks_alpha=ks_alpha or None, latency_factor=latency_factor,
                           latency_min_increase_ms=latency_min_increase_ms, latency_sustain=latency_sustain,
                           latency_slo_ms=latency_slo_ms,
                           error_rate=error_rate, close_after=close_after, **judgments)
    from telemetry.jetstream import JetStreamMonitor, is_nats_url, nats_address

    if not 0.0 <= config.deff_confidence < 1.0:
        raise InvalidInputError(f"--deff-confidence {config.deff_confidence}: must be at least 0 and below 1")
    if is_nats_url(broker):
        if ack_wait <= 0:
            raise InvalidInputError(f"--ack-wait {ack_wait}: must be positive")
        address, make = nats_address(broker, username, password, ca_file), JetStreamMonitor
        extra = {"ack_wait": ack_wait, "alerts_broker": alerts_broker and parse_broker_url(
            alerts_broker, username, password, ca_file)}
    else:
        if alerts_broker:
            raise InvalidInputError("--alerts-broker goes with a nats:// --broker (over MQTT the alerts are "
                                    "retained on the broker itself)")
        address, make = parse_broker_url(broker, username, password, ca_file), FleetMonitor
        extra = {"ack_qos": ack_qos, "mqtt_client": mqtt_client}
    try:
        monitor = make(address, db, fleet=fleet, share=share, client_id=client_id, config=config,
                       bundles=_bundles(bundle_paths, bundles_dir), webhook=webhook, prefix=topic_prefix,
                       max_skew=max_clock_skew, quarantine_keep=quarantine_keep, confirm=not no_confirm,
                       trigger=trigger, **extra)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad URL or an unreachable server
        if "sqlalchemy" in type(exc).__module__ or "psycopg" in type(exc).__module__:
            raise InvalidInputError(f"--db {db}: {str(exc).splitlines()[0][:200]}") from None
        raise
    server = None
    if http:
        from telemetry.http import start_http

        host, _, port = http.rpartition(":")
        server = start_http(monitor, host or "127.0.0.1", int(port))
        log.info("metrics and dashboard on http://%s:%s/", host or "127.0.0.1", server.server_address[1])

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)      # also when started with SIGINT ignored (a background job)
    monitor.start()
    log.info("watching %s/%s/+ on %s, storing to %s%s", topic_prefix, fleet, address.url, db,
             f", shared group {share}" if share else "")
    started = time.monotonic()
    last_prune = 0.0
    try:
        while duration is None or time.monotonic() - started < duration:
            time.sleep(0.2)
            if time.monotonic() - last_prune > 3600:
                store.prune(monitor.engine, retention_days)
                last_prune = time.monotonic()
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        monitor.stop()
        if server is not None:
            server.shutdown()
    s = monitor.stats
    log.info("received %d messages: %d windows stored, %d duplicates, rejected %s", s.received, s.stored,
             s.duplicates, dict(s.rejected) or "none")


def _alert_trigger(command: str | None, webhook: str | None, timeout: float):
    if not command and not webhook:
        return None
    from telemetry.retrain import AlertTrigger

    try:
        return AlertTrigger(command, webhook, timeout)
    except ValueError as exc:        # shlex: an unbalanced quote
        raise InvalidInputError(f"--on-alert-exec {command!r}: {exc}") from None


class UnknownAlert(click.ClickException):
    exit_code = 2


@click.command("export")
@click.option("--alert", "alert_id", type=int, required=True, help="The alert's id (the dashboard, /api/alerts, "
                                                                     "or alert_id in the incident).")
@click.option("--db", default="sqlite:///monitor.db", show_default=True, help="The monitor's database URL.")
@click.option("--out", "out", type=click.Path(), help="Folder to write (default: alert-ID).")
@click.option("--windows", type=int, default=100, show_default=True,
              help="The most recent windows of the alert's device (or fleet) and bundle version to write.")
def export_cmd(alert_id, db, out, windows):
    """Write what the monitor's store holds about an alert, for a training pipeline: the alert and its
    incident, the recent windows (JSON lines), merged statistics, labelled counts and the reference profile
    summary. Exit 2 for an unknown alert id."""
    from telemetry import store
    from telemetry.retrain import export_alert

    try:
        engine = store.connect(db)
        engine.connect().close()
    except Exception as exc:  # noqa: BLE001 - SQLAlchemy raises many kinds for a bad URL or an unreachable server
        raise InvalidInputError(f"--db {db}: {str(exc).splitlines()[0][:200]}") from None
    path = export_alert(engine, alert_id, out or f"alert-{alert_id}", windows)
    if path is None:
        raise UnknownAlert(f"no alert {alert_id} in {db}")
    click.echo(f"wrote {path}")


@click.command("report")
@click.option("--db", required=True, help="The monitor's database URL.")
@click.option("--out", "out", required=True, type=click.Path(), help="report.png or report.html")
def report_cmd(db, out):
    """Write the one-page fleet report (PNG or HTML) from a monitor database."""
    from telemetry.report import write_report

    path = write_report(db, out)
    click.echo(f"wrote {path}")
