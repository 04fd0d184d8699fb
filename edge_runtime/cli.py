"""`edgeops run` and `edgeops serve`: the device-side commands."""

from __future__ import annotations

import logging
import signal
import sys

import click

from edge_runtime.accel_options import accel_options

log = logging.getLogger("edgeops.agent")


def _common_broker_options(f):
    for opt in reversed([
        click.option("--username", help="MQTT username (or in the URL)."),
        click.option("--password", help="MQTT password (or in the URL; or env EDGEOPS_MQTT_PASSWORD).",
                     envvar="EDGEOPS_MQTT_PASSWORD"),
        click.option("--ca", "ca_file", type=click.Path(), help="CA certificate for mqtts://."),
        click.option("--cert", "cert_file", type=click.Path(), help="Client certificate for mqtts://."),
        click.option("--key", "key_file", type=click.Path(), help="Client key for mqtts://."),
        click.option("--topic-prefix", default="edgeops", show_default=True, help="MQTT topic prefix."),
    ]):
        f = opt(f)
    return f


@click.command("run")
@click.argument("bundle", type=click.Path())
@click.option("--device-id", required=True, help="This device's id (letters, digits, . _ -).")
@click.option("--fleet", default="default", show_default=True, help="Fleet the device belongs to.")
@click.option("--broker", required=True, help="mqtt://host:port or mqtts://user:pass@host:8883")
@click.option("--input", "source", default="-", show_default=True,
              help="A .csv/.npy/.npz file to replay, a folder of images, - for JSON lines on stdin, mqtt:TOPIC "
                   "(JSON arrays or {\"id\": ..., \"x\": [...]} on the --broker), video:PATH, camera:N or rtsp://...")
@click.option("--rate", type=float, help="Inferences per second (default: as fast as inputs come).")
@click.option("--loop", is_flag=True, help="Replay the input file forever.")
@click.option("--label-column", metavar="NAME",
              help="The .csv column (by header name, or number from 0) holding each row's true label: joined to "
                   "its prediction and reported per window (a .npz carries labels as y). Labels also come on "
                   "<prefix>/<fleet>/<device>/labels.")
@click.option("--window-seconds", type=float, default=10.0, show_default=True, help="Close a window after S seconds.")
@click.option("--window-size", type=int, help="Close a window after M inferences.")
@click.option("--state-dir", type=click.Path(),
              help="Spool and identity (default: ~/.local/state/edgeops/<device-id>).")
@click.option("--artifact", help="Artifact file of the bundle to run (default: the bundle's choice).")
@click.option("--threads", type=int, help="Inference threads.")
@click.option("--public-key", type=click.Path(), help="Trusted Ed25519 key: refuse bundles it did not sign.")
@click.option("--allow-unsigned", is_flag=True,
              help="Take flashes of unsigned bundles (without --public-key, flashes are refused otherwise).")
@click.option("--skip-test-vectors", is_flag=True, help="Load bundles without running their manifest test vectors.")
@click.option("--nan-policy", type=click.Choice(["reject", "count"]), default="reject", show_default=True)
@click.option("--max-inferences", type=int, help="Stop after N inputs.")
@click.option("--duration", type=float, help="Stop after S seconds.")
@click.option("--stop-timeout", type=click.FloatRange(min=1.0), default=45.0, show_default=True,
              help="Longest a stop may take (closing and sending the last window included); past it the "
                   "process ends, writing its threads' stacks to <state-dir>/stop-stacks.txt. Unsent windows "
                   "stay in the spool.")
@click.option("--flash/--no-flash", "accept_flash", default=True, show_default=True,
              help="Take flash and rollback commands on the device's cmd topic.")
@click.option("--rollback-windows", type=int, default=3, show_default=True,
              help="A flashed bundle is judged on this many first windows (0: never roll back by itself).")
@click.option("--rollback-latency-factor", type=float, default=2.0, show_default=True,
              help="Roll back when p95 latency after a flash exceeds the one before by this factor ...")
@click.option("--rollback-min-increase-ms", type=float, default=1.0, show_default=True,
              help="... and by at least this many milliseconds.")
@click.option("--rollback-error-rate", type=float, default=0.05, show_default=True,
              help="Roll back when the error rate after a flash is above this.")
@click.option("--rollback-rejected-rate", type=click.FloatRange(0, 1), default=0.2, show_default=True,
              help="Roll back when the share of inputs the new bundle refuses (wrong shape, NaN) is above this.")
@click.option("--ab", "ab_bundle", type=click.Path(exists=True),
              help="A/B: also run this bundle (variant B) on a share of the inputs (--ab-split).")
@click.option("--ab-split", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Share of inputs that go to the --ab bundle.")
@click.option("--shadow", "shadow_bundle", type=click.Path(exists=True),
              help="Shadow: also run this bundle on every input (results unused) and report its agreement.")
@click.option("--compress", is_flag=True, help="Send telemetry windows zlib-compressed (about 2.5x fewer bytes).")
@click.option("--encoding", type=click.Choice(["json", "zlib", "cbor", "cbor-exact", "cbor-ref"]), default=None,
              help="How telemetry windows go on the wire: json (default), zlib (= --compress), cbor (compact, floats "
                   "in half precision, about 4x fewer bytes than JSON), cbor-exact (compact and lossless) or "
                   "cbor-ref (moments coded against the bundle's reference profile, the fewest bytes; the monitor "
                   "must have the bundle registered; docs/telemetry.md).")
@click.option("--confirm", type=click.Choice(["monitor", "broker"]), default="monitor", show_default=True,
              help="When a window leaves the spool: once the monitor confirms it is stored (end to end), or at "
                   "the broker's acknowledgement (for a deployment without an edgeops monitor).")
@click.option("--http", "http_addr", metavar="[HOST]:PORT",
              help="Serve the agent's own /metrics and /healthz here (e.g. :9101; HOST defaults to 127.0.0.1).")
@click.option("--resend-after", type=float, default=30.0, show_default=True,
              help="Seconds before a window the monitor has not confirmed is sent again (doubling per attempt).")
@click.option("--output", "outputs", multiple=True,
              help="Where predictions go (repeatable): stdout (JSON lines), jsonl:PATH[?max_mb=10&backups=3], "
                   "mqtt[?qos=0&batch=100&seconds=1&rate=10] (on <prefix>/<fleet>/<device>/predictions), http:URL.")
@click.option("--output-variants", type=click.Choice(["primary", "all"]), default="primary", show_default=True,
              help="primary: the prediction the device acts on, one per input; all: the --shadow bundle's too.")
@click.option("--learn", is_flag=True,
              help="Fine-tune the bundle's trainable artifact on the labels joined to predictions (bundles "
                   "converted with --trainable; checkpoints in the state folder; docs/training.md).")
@_common_broker_options
@accel_options
def run_cmd(bundle, device_id, fleet, broker, source, rate, loop, label_column, window_seconds, window_size,
            state_dir, artifact, threads, public_key, allow_unsigned, skip_test_vectors, nan_policy, max_inferences,
            duration, stop_timeout, accept_flash, rollback_windows,
            rollback_latency_factor, rollback_min_increase_ms, rollback_error_rate, rollback_rejected_rate, ab_bundle,
            ab_split, shadow_bundle, compress, confirm, http_addr, resend_after, outputs, output_variants,
            learn,
            username, password, ca_file, cert_file, key_file, topic_prefix, accel, encoding):
    """Run BUNDLE on a stream of inputs and publish telemetry windows over MQTT.

    With a bundle (folder or .tar.gz), the device keeps an active and a previous
    bundle in its state folder and takes flashes over MQTT: after a flash or a
    restart it runs the active one. A BUNDLE other than the one it started
    from last time becomes the active bundle.
    """
    import edge_runtime
    from edge_runtime.agent import DeviceAgent, RollbackPolicy, samples_from
    from edge_runtime.mqtt import parse_broker_url
    from edge_runtime.state import check_id, prepare_state_dir

    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    address = parse_broker_url(broker, username, password, ca_file, cert_file, key_file)
    check_id(device_id, "device id")
    check_id(fleet, "fleet")
    state = prepare_state_dir(state_dir, device_id, fleet)

    def reload(path):
        return edge_runtime.load(path, artifact=artifact, threads=threads, public_key=public_key,
                                 nan_policy=nan_policy, verify_vectors=not skip_test_vectors, accel=accel)

    slots, bundle = _flash_slots(state, bundle, accept_flash, public_key, allow_unsigned)
    model = reload(bundle)
    learner = _learner(model, state) if learn else None
    if learner is not None:
        model = learner.trainer.model       # predictions use the weights being trained
    samples = samples_from(source, model, loop, broker=address, client_id=f"edgeops-{fleet}-{device_id}-input",
                           label_column=label_column)
    second = _second_model(reload, model, bundle, ab_bundle, shadow_bundle)
    policy = RollbackPolicy(rollback_windows, rollback_latency_factor, rollback_min_increase_ms, rollback_error_rate,
                            rollback_rejected_rate) if rollback_windows > 0 else None
    agent = DeviceAgent(model, device_id, fleet, address, state_dir=state, window_seconds=window_seconds,
                        window_size=window_size, prefix=topic_prefix, slots=slots, reload=reload,
                        rollback_policy=policy, second=second, mode="shadow" if shadow_bundle else "ab",
                        split=ab_split, compress=compress, confirm=confirm, resend_after=resend_after,
                        outputs=outputs, output_variants=output_variants, encoding=encoding)
    log.info("device %s (fleet %s) runs %r, telemetry to %s", device_id, fleet, model, address.url)
    if learner is not None:
        agent.learn(learner)

    _run_until_done(agent, samples, source, rate, max_inferences, duration, http_addr, stop_timeout)
    sys.exit(0)


def _run_until_done(agent, samples, source, rate, max_inferences, duration, http_addr,  # noqa: PLR0913
                    stop_timeout: float = 45.0) -> None:
    """The agent's run loop with signals, the device's HTTP port and the systemd watchdog around it; stops
    the agent (sending its partial window) however the loop ends."""
    # a signal only asks the run loop to finish its inference: raising from the handler anywhere else
    # could interrupt a window half-way into the spool and lose it
    # The handler itself takes no lock (see edge_runtime.signals): the relay's thread interrupts the agent.
    from edge_runtime.signals import SignalRelay

    stop_guard = _StopGuard(agent.state_dir, stop_timeout)
    relay = SignalRelay(agent.interrupt, "edgeops-stop-relay")

    def on_signal(signum, frame):
        stop_guard.signalled(signum)
        relay.fire()
        if agent.waiting_input:
            raise KeyboardInterrupt   # leaves a blocking read of the input (no window is half-spooled then)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _stack_dumps_on_sigusr1()
    device_http = _device_http(agent, http_addr)
    agent.start()
    # systemd (Type=notify, WatchdogSec=) and container health checks: a beat while the run loop progresses
    from edge_runtime import sdnotify

    watchdog = sdnotify.Watchdog(lambda: None if agent.waiting_input
                                 else agent.inferences + agent.bad_inputs,
                                 stall_after=max(60.0, 3.0 / rate if rate else 0.0)).start()
    sdnotify.notify("READY=1")
    try:
        agent.run(samples, rate=rate, max_inferences=max_inferences, duration=duration)
    except KeyboardInterrupt:
        log.info("stopping")
    finally:
        sdnotify.notify("STOPPING=1")
        stop_guard.arm()
        relay.close()
        watchdog.stop()
        left = agent.stop()
        if device_http is not None:
            device_http.close()
        if hasattr(samples, "close"):
            samples.close()
        if getattr(samples, "dropped", 0):
            log.warning("input %s: %d of %d inputs dropped (the model was slower than the source)", source,
                        samples.dropped, samples.received)
    log.info("%d inferences, %d bad inputs, %d windows left in the spool", agent.inferences, agent.bad_inputs, left)


def _stack_dumps_on_sigusr1() -> None:
    """``kill -USR1 <pid>`` writes every thread's stack to stderr (what an agent that hangs is doing)."""
    import faulthandler

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True, chain=False)


class _StopGuard:
    """The agent's stop is bounded: once it starts (or a stop signal came), a watchdog thread of the
    interpreter ends the process after ``timeout`` seconds (``--stop-timeout``; the default leaves room for
    the 10 s drain, 5 s for the publisher and 5 s for the link), writing every thread's stack to
    ``<state>/stop-stacks.txt`` first (a file: stderr may be a full pipe, the very thing that can hang a
    process that logs). A second SIGTERM/SIGINT ends the process at once. Nothing is lost either way:
    windows not yet confirmed are in the spool on disk (a committed SQLite transaction), sent by the
    next run, as after a power cut."""

    def __init__(self, state_dir, timeout: float):
        self.path = state_dir / "stop-stacks.txt"
        self.timeout = timeout
        self._file = None
        self._signals = 0

    def signalled(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            import os

            os._exit(128 + signum)
        self.arm()

    def arm(self) -> None:
        import faulthandler

        if self._file is None:
            import atexit

            self._file = open(self.path, "w")  # noqa: SIM115 - kept open for the watchdog thread
            faulthandler.dump_traceback_later(self.timeout, exit=True, file=self._file)
            atexit.register(self._disarm)   # atexit runs after the interpreter joined the other threads

    def _disarm(self) -> None:
        import faulthandler

        faulthandler.cancel_dump_traceback_later()
        self._file.close()
        if self.path.stat().st_size == 0:
            self.path.unlink()


def _flash_slots(state, bundle, accept_flash: bool, public_key, allow_unsigned: bool):
    """The device's bundle slots when it takes flashes (None otherwise), and the bundle to run."""
    if public_key and allow_unsigned:
        raise click.UsageError("--public-key and --allow-unsigned: choose one")
    if not accept_flash or str(bundle).endswith((".tflite", ".onnx")):
        return None, bundle
    from edge_runtime.slots import NO_TRUSTED_KEY, BundleSlots

    if allow_unsigned:
        log.warning("--allow-unsigned: this device takes unsigned bundles from anyone who may publish on its "
                    "cmd topic")
    elif public_key is None:
        log.warning("flash commands will be refused (%s)", NO_TRUSTED_KEY)
    slots = BundleSlots(state, public_key=public_key, allow_unsigned=allow_unsigned)
    return slots, str(_choose_bundle(slots, bundle))


def _second_model(reload, model, bundle, ab_bundle, shadow_bundle):
    """The --ab or --shadow bundle, loaded, which must take the same inputs (None without one)."""
    if ab_bundle and shadow_bundle:
        raise click.UsageError("--ab and --shadow: choose one")
    if not (ab_bundle or shadow_bundle):
        return None
    second = reload(ab_bundle or shadow_bundle)
    if second.input_spec.shape != model.input_spec.shape:
        raise click.UsageError(f"{ab_bundle or shadow_bundle} takes inputs of shape {second.input_spec.shape}, "
                               f"{bundle} takes {model.input_spec.shape}: they cannot share inputs")
    return second


def _device_http(agent, http_addr: str | None):
    """The agent's /metrics and /healthz server when --http is given."""
    if not http_addr:
        return None
    from edge_runtime.device_http import DeviceHTTP
    from edge_runtime.errors import InvalidInputError

    host, _, port = http_addr.rpartition(":")
    try:
        return DeviceHTTP(agent, host or "127.0.0.1", int(port))
    except (ValueError, OSError) as exc:
        raise InvalidInputError(f"--http {http_addr}: cannot serve there ({exc})") from None


def _choose_bundle(slots, given):
    """The bundle to run: the active slot, unless the command line names a new bundle."""
    import hashlib
    import json
    from pathlib import Path

    from edge_runtime.bundle import opened_bundle

    record = slots.root / "given.json"
    with opened_bundle(given, public_key=slots.public_key) as b:
        digest = hashlib.sha256((b.root / "manifest.json").read_bytes()).hexdigest()
    try:
        last = json.loads(record.read_text()).get("manifest_sha256")
    except (OSError, ValueError):
        last = None
    if slots.active is None:
        active = slots.install_initial(given)
    elif last != digest:
        active = slots.adopt(given)
        log.info("a new bundle on the command line: %s %s is now active", b.name, b.version)
    else:
        active = slots.active
        if Path(active).resolve() != Path(b.root).resolve():
            log.info("running the active bundle %s (flashed earlier), not %s", Path(active).name, given)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps({"manifest_sha256": digest, "path": str(given)}))
    tmp.replace(record)
    return active


def _serve_limit_options(f):
    """`edgeops serve`'s bounds, one option per field of ServeLimits (same names, same defaults)."""
    from edge_runtime.serving.limits import ServeLimits

    d = ServeLimits()
    for opt in reversed([
        click.option("--max-body-bytes", type=click.IntRange(1), default=d.max_body_bytes, show_default=True,
                     help="Largest request body (413 above)."),
        click.option("--max-depth", type=click.IntRange(1), default=d.max_depth, show_default=True,
                     help="Deepest JSON nesting (400 above)."),
        click.option("--max-batch", type=click.IntRange(1), default=d.max_batch, show_default=True,
                     help="Most samples or images in one request (413 above)."),
        click.option("--max-in-flight-bytes", type=click.IntRange(1), default=d.max_in_flight_bytes,
                     show_default=True, help="Request-body bytes received or parsed at once, all clients together."),
        click.option("--max-image-pixels", type=click.IntRange(1), default=d.max_image_pixels, show_default=True,
                     help="Largest uploaded image, width x height (413 above, before decoding)."),
        click.option("--max-connections", type=click.IntRange(1), default=d.max_connections, show_default=True,
                     help="Open connections at once (503 above)."),
        click.option("--header-timeout", "header_timeout_s", type=click.FloatRange(0, min_open=True),
                     default=d.header_timeout_s, show_default=True, help="Seconds to send a request's headers."),
        click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(0, min_open=True),
                     default=d.body_timeout_s, show_default=True, help="Seconds to send a request's body (408 after)."),
        click.option("--keep-alive", "keep_alive_s", type=click.FloatRange(0, min_open=True),
                     default=d.keep_alive_s, show_default=True, help="Seconds an idle connection is kept."),
        click.option("--admission-timeout", "admission_timeout_s", type=click.FloatRange(0, min_open=True),
                     default=d.admission_timeout_s, show_default=True,
                     help="Seconds a request waits for room in --max-in-flight-bytes (503 after)."),
    ]):
        f = opt(f)
    return f


@click.command("serve")
@click.argument("bundle", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--artifact", help="Artifact file of the bundle to serve.")
@click.option("--threads", type=int, help="Inference threads.")
@click.option("--public-key", type=click.Path(), help="Trusted Ed25519 key.")
@click.option("--skip-test-vectors", is_flag=True, help="Load BUNDLE without running its manifest test vectors.")
@click.option("--broker", help="Also publish telemetry windows to this broker.")
@click.option("--device-id", help="Device id for telemetry (with --broker).")
@click.option("--fleet", default="default", show_default=True)
@click.option("--window-seconds", type=float, default=10.0, show_default=True)
@click.option("--state-dir", type=click.Path())
@_serve_limit_options
@_common_broker_options
@accel_options
def serve_cmd(bundle, host, port, artifact, threads, public_key, skip_test_vectors, broker, device_id, fleet,
              window_seconds, state_dir, username, password, ca_file, cert_file, key_file, topic_prefix, accel,
              **limit_options):
    """Serve BUNDLE over HTTP: POST /predict, GET /healthz, /metrics, /model, /openapi.json.

    Inputs are numbers (JSON) or uploaded images, never file paths; every request is
    bounded by the --max-* and --*-timeout options.
    """
    import edge_runtime
    from edge_runtime.serving import ServeLimits, serve_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    try:
        limits = ServeLimits(**limit_options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    model = edge_runtime.load(bundle, artifact=artifact, threads=threads, public_key=public_key,
                              verify_vectors=not skip_test_vectors, accel=accel)
    agent = None
    if broker:
        from edge_runtime.agent import DeviceAgent
        from edge_runtime.mqtt import parse_broker_url

        if not device_id:
            raise click.UsageError("--device-id is needed with --broker")
        agent = DeviceAgent(model, device_id, fleet, parse_broker_url(broker, username, password, ca_file, cert_file,
                                                                      key_file),
                            state_dir=state_dir, window_seconds=window_seconds, prefix=topic_prefix).start()
    serve_forever(model, host, port, agent=agent, limits=limits)


def _learner(model, state):
    """--learn: a Learner over the bundle's trainable artifact, checkpointing under STATE/training."""
    from edge_runtime.errors import BundleError
    from edge_runtime.training import Learner, trainer_for

    trainer = trainer_for(model, state / "training")
    if trainer is None:
        raise BundleError("--learn: the bundle has no trainable artifact (convert it with --trainable)")
    return Learner(trainer)
