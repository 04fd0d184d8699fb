"""`edgeops demo`: the end-to-end path on embedded defaults, nothing else to start.

1. trains the reference models on Breast Cancer, Wine and Digits and converts them into
   checked bundles (accuracy of every artifact next to its source);
2. benchmarks the Digits CNN's artifacts side by side (`edgeops bench`);
3. starts a private Mosquitto on a free port, the monitor (`edgeops monitor`) on SQLite with its
   dashboard, and an emulated fleet of 20 devices running the signed Breast Cancer bundle 1.0.0;
4. rolls out bundle 1.1.0 with a canary (`edgeops flash --canary`), the devices verifying its
   signature and health-checking it before switching;
5. injects drift on three devices and waits for the monitor's verdicts, then prints which devices
   and features were flagged, checks that they are exactly the injected ones, and writes the
   dashboard report (PNG and HTML).

Ctrl-C stops everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from devices.children import Supervisor, python_command, stop_process

REFERENCE = [("mlp", "breast_cancer"), ("mlp", "wine"), ("cnn", "digits"),
             ("rf", "breast_cancer"), ("rf", "wine"), ("rf", "digits")]


def _say(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + msg, err=True)


@click.command("demo")
@click.option("--out", "out_dir", type=click.Path(), default="edgeops-demo", show_default=True,
              help="Folder for the bundles and results.")
@click.option("--quick", is_flag=True, help="Fewer benchmark runs and a shorter agent session (for CI).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--broker-kind", type=click.Choice(["auto", "mosquitto", "amqtt"]), default="auto", show_default=True,
              help="The private broker: Mosquitto when installed (auto), else the pure-Python amqtt (MQTT 3.1.1).")
@click.option("--install-broker", is_flag=True,
              help="Install Debian's mosquitto with apt-get first when it is missing (as root).")
def demo_cmd(out_dir, quick, force, broker_kind, install_broker):
    """Train, convert, benchmark and run the reference models end to end."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    t_start = time.monotonic()
    out = Path(out_dir)
    _fresh_folder(out, force)
    if broker_kind != "amqtt" and install_broker:
        _ensure_mosquitto()
    summary = _convert_references(out)
    _print_conversions(summary)
    (out / "conversion.json").write_text(json.dumps(summary, indent=2))
    _bench_digits(out, quick)
    ok = _run_fleet(out, quick, broker_kind)
    _say(f"done in {time.monotonic() - t_start:.0f} s; results in {out}/")
    if not ok:
        sys.exit(1)



def _fresh_folder(out: Path, force: bool) -> None:
    """Make ``out/bundles``; an existing ``out`` is replaced with ``force`` only."""
    if out.exists():
        if not force:
            raise click.ClickException(f"{out} exists; pass --force to replace it or --out to choose another folder")
        shutil.rmtree(out)
    (out / "bundles").mkdir(parents=True)


def _convert_references(out: Path) -> list[dict]:
    """Train and convert every reference model into ``out/bundles``; one summary row per artifact."""
    from convert.reference import convert_reference

    summary = []
    for i, (kind, dataset) in enumerate(REFERENCE, 1):
        _say(f"[{i}/{len(REFERENCE)}] training and converting the {dataset} {kind.upper()}")
        result, _ = convert_reference(kind, dataset, out / "bundles" / f"{dataset}-{kind}")
        summary += [_summary_row(result.manifest["name"], a) for a in result.manifest["artifacts"]]
    return summary


def _summary_row(bundle: str, a: dict) -> dict:
    """An artifact of the conversion summary: its size and accuracy against the source."""
    p = a["parity"]
    return {"bundle": bundle, "artifact": a["file"], "bytes": a["size_bytes"],
            "size_ratio": a["size_ratio"], "accuracy": p["artifact_metric"],
            "drop_points": p["metric_drop_points"], "label_agreement": p["label_agreement"]}


def _print_conversions(summary: list[dict]) -> None:
    click.echo()
    click.echo(f"{'bundle':<20}{'artifact':<22}{'bytes':>9}{'ratio':>7}{'accuracy':>10}{'drop':>7}{'agree':>7}")
    for r in summary:
        click.echo(f"{r['bundle']:<20}{r['artifact']:<22}{r['bytes']:>9}{r['size_ratio'] or 0:>7.2f}"
                   f"{r['accuracy']:>10.4f}{r['drop_points']:>7.2f}{r['label_agreement']:>7.3f}")


def _bench_digits(out: Path, quick: bool) -> None:
    """``edgeops bench`` of the Digits CNN's artifacts side by side, into ``out/bench.json``."""
    _say("benchmarking the Digits CNN's artifacts side by side (edgeops bench --dataset digits)")
    from edgeops.cli import main as edgeops_main

    bench_args = ["bench", str(out / "bundles" / "digits-cnn"), "--dataset", "digits", "--runs",
                  "50" if quick else "300", "--json", str(out / "bench.json")]
    try:
        edgeops_main(bench_args)
    except SystemExit as exc:
        if exc.code:
            raise


def _ensure_mosquitto() -> None:
    """On a fresh Debian machine, install Mosquitto (otherwise the demo runs on amqtt)."""
    from devtools.brokers import find_mosquitto

    if find_mosquitto():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        _say("mosquitto is not installed and cannot be installed here (apt-get, as root): the demo uses amqtt")
        return
    _say("mosquitto is not installed: installing Debian's package with apt-get")
    _apt_install_mosquitto()


def _apt_install_mosquitto() -> None:
    """apt-get install mosquitto, after an apt-get update when the first try fails."""
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "mosquitto"]
    if subprocess.run(cmd, env=env, capture_output=True).returncode == 0:
        return
    subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        _say(f"apt-get could not install mosquitto: {res.stderr.strip()[-300:]}")


#: Drift injected on these devices (none of them a canary): the demo must flag them and only them.
DRIFTS = {
    "dev-004": {"shift": "scale", "factor": 1.6},
    "dev-011": {"shift": "offset", "factor": 2.0, "features": ["mean radius", "mean perimeter", "mean area",
                                                                "worst radius", "worst perimeter", "worst area"]},
    "dev-017": {"shift": "noise", "factor": 1.5},
}
DRIFT_DETECTORS = ("feature_drift", "prediction_drift", "missing_values")


def _signed_versions(out: Path) -> tuple[Path, Path, Path]:
    """Bundle 1.0.0 and 1.1.0 of the Breast Cancer MLP, signed with a demo key; returns (v1, v2, public key)."""
    from edge_runtime import signing

    key, pub = signing.generate_key_pair(out / "keys", "demo")
    v1, v2 = (_signed_copy(out, version, key) for version in ("1.0.0", "1.1.0"))
    return v1, v2, pub


def _signed_copy(out: Path, version: str, key) -> Path:
    """A copy of the Breast Cancer MLP bundle as ``version``, its manifest signed with ``key``."""
    from edge_runtime.bundle import write_manifest

    dest = out / "fleet-bundles" / f"breast-cancer-mlp-{version}"
    shutil.copytree(out / "bundles" / "breast_cancer-mlp", dest)
    doc = json.loads((dest / "manifest.json").read_text())
    doc["version"] = version
    (dest / "manifest.sig").unlink(missing_ok=True)
    write_manifest(dest, doc, sign_key=key)
    return dest


# Ten emulated devices share one process and all twenty share this machine's cores: a 15 µs model's p95 then
# carries the scheduling waits of its neighbours (several ms while a wave of devices loads a new bundle, tens of
# ms on a busy machine), and the canary gate now waits for 200 inferences the monitor judged, which is longer.
# The demo injects no slowness: the monitor and the devices' own rollback judge latency with a margin (x3 and
# +25 ms) that scheduling noise does not reach and a real regression of a model this fast would.
EMULATED_LATENCY_MARGIN_MS = 25.0
EMULATED_LATENCY = ("--latency-factor", "3", "--latency-min-increase-ms", str(EMULATED_LATENCY_MARGIN_MS))


def start_monitor(out: Path, broker_url: str, db: str, bundles: list[Path], http_port: int,
                  supervisor: Supervisor) -> subprocess.Popen:
    """``edgeops monitor`` as a child (its output in OUT/monitor.log), watched by ``supervisor``.

    Started with :func:`devices.children.python_command`: from a folder that holds a folder named like one
    of the project's packages (the clone, seen from its parent), ``python -m edgeops`` would import that.
    """
    bundle_args = [arg for b in bundles for arg in ("--bundle", str(Path(b).resolve()))]
    log_path = out / "monitor.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(python_command([
            "-m", "edgeops", "monitor", "--broker", broker_url, "--fleet", "demo", "--db", db, *bundle_args,
            "--http", f"127.0.0.1:{http_port}", "--client-id", "demo-monitor", *EMULATED_LATENCY]),
            stdout=log, stderr=subprocess.STDOUT)
    return supervisor.watch("the monitor (edgeops monitor)", proc, log_path)


def _run_fleet(out: Path, quick: bool, broker_kind: str = "auto") -> bool:
    """The fleet part; False when it ends in a wrong verdict, ChildProcessDied when a child it needs dies."""
    broker = _start_demo_broker(out, broker_kind)
    if broker is None:
        return False
    children = Supervisor()   # every wait below raises ChildProcessDied as soon as a child died
    children.watch(f"the broker ({broker.name})", broker.proc, broker.log_path)
    procs: list[subprocess.Popen] = []
    fleet = None
    try:
        v1, v2, pub = _signed_versions(out)
        db = f"sqlite:///{(out / 'monitor.db').resolve()}"
        procs.append(_start_demo_monitor(out, broker.url, db, [v1, v2], children))
        rate, window = (40.0, 40) if quick else (20.0, 50)
        fleet = _start_demo_fleet(out, broker.url, v1, pub, rate, window, children)
        if not fleet.wait_started(180):
            _say("the emulated devices did not start in time")
            return False
        children.sleep(window / rate * 2)
        if not _canary_rollout(out, broker.url, v2, pub, fleet.devices, children):
            return False
        ok = _flag_drift(out, db, fleet, 90 if quick else 150, window / rate * 2, children)
        _write_reports(out, db)
        return ok
    finally:
        _stop_all(fleet, procs, broker)


def _start_demo_broker(out: Path, broker_kind: str):
    """The private broker (Mosquitto, else amqtt); None when neither can run."""
    from devtools.brokers import AmqttBroker, BrokerUnavailable, start_broker

    try:
        broker = start_broker(out / "broker", prefer=broker_kind)
    except BrokerUnavailable as exc:
        _say(f"cannot run the fleet part: no broker: {exc}")
        return None
    if isinstance(broker, AmqttBroker):
        _say(("mosquitto is not installed: u" if broker_kind == "auto" else "U")
             + "sing the pure-Python amqtt broker (MQTT 3.1.1; checked with paho-mqtt)")
    return broker


def _stop_all(fleet, procs: list[subprocess.Popen], broker) -> None:
    """Stop the emulated fleet, the monitor and the broker."""
    if fleet is not None:
        fleet.stop()
    for p in procs:
        stop_process(p)
    broker.stop()


def _start_demo_monitor(out: Path, broker_url: str, db: str, bundles: list[Path],
                        children: Supervisor) -> subprocess.Popen:
    """The monitor on the demo's SQLite database, its dashboard on a free port."""
    from devtools.brokers import free_port

    http_port = free_port()
    _say(f"broker {broker_url}; starting the monitor (SQLite {out / 'monitor.db'}, dashboard "
         f"http://127.0.0.1:{http_port}/)")
    return start_monitor(out, broker_url, db, bundles, http_port, children)


def _start_demo_fleet(out: Path, broker_url: str, v1: Path, pub: Path, rate: float, window: int,
                      children: Supervisor):
    """Twenty emulated devices on bundle ``v1``, replaying Breast Cancer rows (started, not yet running)."""
    from devtools.fleet_emulation import EmulatedFleet, replay_data

    n = 20
    _say(f"starting an emulated fleet of {n} devices on {v1.name} (signature checked with {pub.name}), "
         f"{rate:g} inferences/s each, a window every {window} inferences")

    def show(doc):
        if doc.get("event") in ("started", "drift", "device_failed"):
            _say(f"fleet: {doc['event']} " + ", ".join(doc.get("devices") or [doc.get("device", "")]))

    return EmulatedFleet(v1, broker_url, n, replay_data(v1, "breast_cancer", None), out / "fleet-state",
                         fleet="demo", per_process=10, rate=rate, window_size=window, public_key=str(pub),
                         # 20 emulated devices share this machine's cores with the health checks of a
                         # whole wave: judge latency after a flash with a wider margin than a real device
                         rollback={"windows": 3, "latency_factor": 3.0,  # as the monitor's
                                   "min_increase_ms": EMULATED_LATENCY_MARGIN_MS},
                         on_event=show, supervisor=children).start()


def _canary_rollout(out: Path, broker_url: str, v2: Path, pub: Path, devices: list[str],
                    children: Supervisor) -> bool:
    """Roll ``v2`` out with a canary then two waves; False when the rollout does not finish."""
    from devices.rollout import RolloutRunner, new_rollout
    from edge_runtime.mqtt import parse_broker_url

    address = parse_broker_url(broker_url)
    rollout = new_rollout(v2, "demo", devices, 0.1, 2, 2, public_key=str(pub))
    _say(f"rolling out {v2.name} with a canary: {', '.join(rollout.groups[0])} first, then "
         f"{len(rollout.groups) - 1} waves")
    r = children.call(RolloutRunner(address, rollout, out / "rollout.json", flash_timeout=120,
                                    window_timeout=120, public_key=str(pub), progress=_say).run)
    if r.phase != "done":
        _say(f"the rollout did not finish: {r.reason}")
        return False
    return True


def _flag_drift(out: Path, db: str, fleet, timeout: float, settle: float, children: Supervisor) -> bool:
    """Inject :data:`DRIFTS`, wait for the monitor's alerts, print and save them (OUT/flagged.json).

    True when exactly the injected devices are flagged, after ``settle`` more seconds for clean
    devices to prove they stay clean.
    """
    from telemetry import store

    for dev, params in DRIFTS.items():
        fleet.inject("drift", [dev], **params)
    injected = ", ".join(f"{d} ({p['shift']})" for d, p in DRIFTS.items())
    _say(f"injected drift on {injected}; waiting for the monitor")
    engine = store.connect(db)
    children.wait(lambda: set(DRIFTS) <= set(_flagged(engine)), timeout, interval=1.0)
    children.sleep(settle)   # a little longer: clean devices must stay clean
    found = _flagged(engine)
    _print_flagged(found)
    ok = set(found) == set(DRIFTS)
    _say(f"flagged: {', '.join(sorted(found)) or 'nobody'} -> {_verdict(found, ok)}")
    _save_flagged(out / "flagged.json", found, ok)
    engine.dispose()
    return ok


def _verdict(found: dict[str, list], ok: bool) -> str:
    if ok:
        return "the injected devices and only them"
    return f"MISMATCH: injected {sorted(DRIFTS)}, flagged {sorted(found)}"


def _save_flagged(path: Path, found: dict[str, list], ok: bool) -> None:
    """The injected drifts, each flagged device's alerts (detector, features, statistic, version), the verdict."""
    keys = ("detector", "features", "statistic", "model_version")
    flagged = {d: [{k: a[k] for k in keys} for a in v] for d, v in found.items()}
    path.write_text(json.dumps({"injected": DRIFTS, "flagged": flagged, "ok": ok}, indent=2, default=float))


def _flagged(engine) -> dict[str, list]:
    """Device -> its open drift alerts in the demo fleet (the fleet-wide "*" ones left out)."""
    from telemetry import store

    found: dict[str, list] = {}
    for a in store.open_alerts(engine, "demo"):
        if a["detector"] in DRIFT_DETECTORS and a["device_id"] != "*":
            found.setdefault(a["device_id"], []).append(a)
    return found


def _print_flagged(found: dict[str, list]) -> None:
    click.echo()
    click.echo(f"{'device':<10}{'version':<9}{'detector':<18}{'statistic':>10}  features")
    for dev in sorted(found):
        for a in found[dev]:
            click.echo(_flagged_line(dev, a))


def _flagged_line(dev: str, a: dict) -> str:
    """A flagged device's alert: version, detector, statistic and (the first six) features."""
    feats = ", ".join(a["features"][:6]) + (" ..." if len(a["features"]) > 6 else "")
    return f"{dev:<10}{a['model_version']:<9}{a['detector']:<18}{a['statistic'] or 0:>10.3f}  {feats}"


def _write_reports(out: Path, db: str) -> None:
    from telemetry.report import write_report

    for suffix in ("png", "html"):
        write_report(db, out / f"report.{suffix}")
    _say(f"report written: {out / 'report.png'} and {out / 'report.html'}")
