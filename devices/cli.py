"""`edgeops flash` and `edgeops devices`."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import click

from edge_runtime.errors import QualityCheckError, VerificationError


def _broker_options(f):
    for opt in reversed([
        click.option("--broker", required=True, help="mqtt://host:port or mqtts://user:pass@host:8883"),
        click.option("--username", help="MQTT username (or in the URL)."),
        click.option("--password", envvar="EDGEOPS_MQTT_PASSWORD", help="MQTT password (or EDGEOPS_MQTT_PASSWORD)."),
        click.option("--ca", "ca_file", type=click.Path(), help="CA certificate for mqtts://."),
        click.option("--cert", "cert_file", type=click.Path(), help="Client certificate for mqtts://."),
        click.option("--key", "key_file", type=click.Path(), help="Client key for mqtts://."),
        click.option("--topic-prefix", default="edgeops", show_default=True),
    ]):
        f = opt(f)
    return f


def _address(broker, username, password, ca_file, cert_file, key_file):
    from edge_runtime.mqtt import parse_broker_url

    return parse_broker_url(broker, username, password, ca_file, cert_file, key_file)


def _say(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan", bold=True) + msg, err=True)


def _result_exit(res: dict) -> int:
    if res.get("ok"):
        after = res.get("after") or {}
        return 1 if after.get("type") == "auto_rollback" else 0
    msg = res.get("message") or ""
    if msg.startswith("refused"):
        return VerificationError.exit_code
    if "health check" in msg:
        return QualityCheckError.exit_code
    return 1


@click.command("flash")
@click.argument("bundle", required=False, type=click.Path())
@click.option("--device", "device", help="Flash this one device.")
@click.option("--fleet", default="default", show_default=True, help="The device's fleet, or the fleet to roll out to.")
@click.option("--rollback", is_flag=True, help="Return --device to its previous bundle (no BUNDLE).")
@click.option("--canary", help="Roll out to the whole fleet: first this share of devices (e.g. 10%), then waves.")
@click.option("--waves", type=int, default=2, show_default=True, help="Waves after the canary set.")
@click.option("--clean-windows", type=int, default=3, show_default=True,
              help="Clean telemetry windows of the new version each device must send before the next wave.")
@click.option("--canary-samples", type=click.IntRange(min=0), default=200, show_default=True,
              help="Inferences of the new version each device must have in windows the monitor stored before the "
                   "next wave (the monitor's --min-samples: fewer cannot show drift); 0: do not wait for the monitor.")
@click.option("--evaluation-wait", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds after --canary-samples are stored before a wave is judged clear (the monitor evaluates "
                   "once a second).")
@click.option("--force-schema", is_flag=True,
              help="Flash even when the bundle's inputs (kind, shape, dtype, feature names) do not fit what the "
                   "device runs; the device is told to take it too.")
@click.option("--devices", "device_list", help="Comma-separated devices to roll out to (default: every device "
                                               "whose retained status says online).")
@click.option("--state-file", type=click.Path(),
              help="Rollout state (default: ~/.local/state/edgeops/rollouts/ID.json).")
@click.option("--resume", type=click.Path(exists=True), help="Resume the rollout saved in this state file.")
@click.option("--public-key", type=click.Path(), help="Check BUNDLE's signature here before sending it.")
@click.option("--timeout", type=float, default=180.0, show_default=True,
              help="Seconds to wait for each device's answer.")
@click.option("--window-timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for a wave's clean windows.")
@click.option("--wait-probation", type=float, default=0.0,
              help="After a single-device flash, wait up to S seconds for the device's own verdict on its first "
                   "windows.")
@click.option("--url", help="The device fetches the bundle from this http(s) URL (BUNDLE: the same .tar.gz file).")
@click.option("--max-latency-ms", type=float, help="Refuse BUNDLE when its stored bench p50 on --profile exceeds this.")
@click.option("--profile", "profile_id", help="Board profile for --max-latency-ms (see `edgeops devices profiles`).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_broker_options
def flash_cmd(bundle, device, fleet, rollback, canary, waves, clean_windows, canary_samples, evaluation_wait,
              force_schema, device_list, state_file, resume, public_key, timeout, window_timeout, wait_probation,
              url, max_latency_ms, profile_id, as_json, broker, username, password, ca_file, cert_file, key_file,
              topic_prefix):
    """Flash BUNDLE to a running device (--device) or roll it out to a fleet (--canary).

    Exit codes: 0 done; 1 failed, stopped or rolled back; 4 the bundle was refused (hash,
    signature, or inputs that do not fit the device's bundle); 5 the device's health check failed.
    """
    from devices import rollout as fl

    address = _address(broker, username, password, ca_file, cert_file, key_file)
    run = functools.partial(_run_rollout, address, topic_prefix, timeout, window_timeout, public_key,
                            evaluation_wait, as_json)
    if resume:
        path = Path(resume)
        r = fl.Rollout.load(path)
        _say(f"resuming rollout {r.id} of {r.name} {r.version} to fleet {r.fleet}")
        run(r, path)
        return
    if rollback:
        _rollback_one(address, fleet, device, bundle, topic_prefix, timeout, as_json)
    if not bundle:
        raise click.UsageError("give a BUNDLE (or --rollback / --resume)")
    from convert.mlflow_io import resolved_bundle  # BUNDLE may be models:/NAME-edge/...: downloaded until exit

    bundle = str(click.get_current_context().with_resource(resolved_bundle(bundle)))
    if max_latency_ms is not None:
        _check_budget(bundle, profile_id, max_latency_ms)
    if device:
        if canary:
            raise click.UsageError("--canary rolls out to a fleet; do not give --device with it")
        options = fl.FlashOptions(timeout=timeout, public_key=public_key, wait_probation=wait_probation, url=url,
                                  force_schema=force_schema)
        _flash_one(address, fleet, device, bundle, topic_prefix, options, as_json)
    if not canary:
        raise click.UsageError("give --device ID, or --canary SHARE to roll out to the fleet")
    share = fl.parse_fraction(canary)
    targets = _rollout_targets(address, fleet, topic_prefix, device_list)
    r = fl.new_rollout(bundle, fleet, targets, share, waves, clean_windows, public_key, canary_samples, force_schema)
    path = Path(state_file) if state_file else fl.default_rollout_dir() / f"{r.id}.json"
    r.save(path)
    _say(f"rollout {r.id}: {r.name} {r.version} to {len(targets)} devices of {fleet}: canary "
         f"{', '.join(r.groups[0])}, then {len(r.groups) - 1} wave(s); state in {path}")
    run(r, path)


def _run_rollout(address, topic_prefix, timeout, window_timeout, public_key, evaluation_wait, as_json,  # noqa: PLR0913
                 r, path) -> None:
    """Carry the rollout forward from its saved state, print how it ended and exit with its code."""
    from devices.rollout import RolloutRunner

    r = RolloutRunner(address, r, path, topic_prefix, timeout, window_timeout, public_key, _say,
                      evaluation_wait=evaluation_wait).run()
    _finish_rollout(r, path, as_json)


def _rollback_one(address, fleet, device, bundle, topic_prefix, timeout, as_json) -> None:  # noqa: PLR0913
    """``--rollback``: return one device to its previous bundle, print its answer and exit with its code."""
    from devices.rollout import rollback_device

    if not device or bundle:
        raise click.UsageError("--rollback takes --device and no BUNDLE")
    res = rollback_device(address, fleet, device, prefix=topic_prefix, timeout=timeout)
    _print_result(res, as_json)
    sys.exit(_result_exit(res))


def _flash_one(address, fleet, device, bundle, topic_prefix, options, as_json) -> None:  # noqa: PLR0913
    """``--device``: flash one device, print its answer and exit with its code."""
    from devices.rollout import flash_device

    _say(f"flashing {bundle} to {device} (fleet {fleet})")
    res = flash_device(address, fleet, device, bundle, prefix=topic_prefix, options=options)
    _print_result(res, as_json)
    sys.exit(_result_exit(res))


def _rollout_targets(address, fleet, topic_prefix, device_list) -> list[str]:
    """The devices given with --devices, else those of the fleet online that accept a flash."""
    from devices.rollout import inventory

    if device_list:
        return [d.strip() for d in device_list.split(",") if d.strip()]
    statuses, _ = inventory(address, fleet, topic_prefix)
    return [d for d, s in statuses.items() if s.get("online") and s.get("accepts_flash", True)]


def _check_budget(bundle, profile_id, max_latency_ms):
    from devices.boards import get_profile, stored_latency

    if not profile_id:
        raise click.UsageError("--max-latency-ms needs --profile")
    get_profile(profile_id)
    p50 = stored_latency(bundle, profile_id)
    if p50 is None:
        raise click.ClickException(f"no stored bench result of {bundle} on profile {profile_id}; run "
                                   f"`edgeops bench {bundle} --store-profile {profile_id}` on that board first")
    if p50 > max_latency_ms:
        raise QualityCheckError(f"{bundle}: p50 {p50:.3f} ms on {profile_id} is over the budget of "
                                f"{max_latency_ms:g} ms; not flashed")
    _say(f"latency budget: p50 {p50:.3f} ms on {profile_id} is within {max_latency_ms:g} ms")


def _print_result(res: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res, indent=2))
        return
    mark = click.style("ok", fg="green") if res.get("ok") else click.style("FAILED", fg="red")
    click.echo(f"{res.get('device_id')}: {mark} {res.get('stage')}: {res.get('message')}")
    after = res.get("after")
    if after:
        click.echo(f"{after.get('device_id')}: after the flash: {after.get('type')} {after.get('stage')}: "
                   f"{after.get('message')}")


def _finish_rollout(r, path, as_json: bool) -> None:
    from dataclasses import asdict

    if as_json:
        click.echo(json.dumps({**asdict(r), "state_file": str(path)}, indent=2))
    else:
        for d, st in sorted(r.devices.items()):
            click.echo(f"{d:24s} {st['state']:14s} {st.get('message') or ''}")
        click.echo(f"rollout {r.id}: {r.phase}" + (f" ({r.reason})" if r.reason else ""))
    sys.exit(0 if r.phase == "done" else 1)


@click.group("devices")
def devices_group():
    """Device inventory, identities (provision, revoke) and board profiles."""


@devices_group.command("list")
@click.option("--fleet", default="+", show_default=True, help="Fleet ('+' for every fleet).")
@click.option("--wait", type=float, default=1.0, show_default=True, help="Seconds to collect retained statuses.")
@click.option("--json", "as_json", is_flag=True)
@_broker_options
def devices_list(fleet, wait, as_json, broker, username, password, ca_file, cert_file, key_file, topic_prefix):
    """Devices that announced themselves on their status topic, with last-seen and open alerts."""
    address = _address(broker, username, password, ca_file, cert_file, key_file)
    statuses, alerts_by_fleet = _collect_statuses(address, fleet, topic_prefix, wait)
    now = time.time()
    rows = [_device_row(dev, s, alerts_by_fleet, now) for dev, s in sorted(statuses.items())]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no devices in fleet {fleet!r} on {address.url}")
        return
    _print_devices_table(rows)


def _collect_statuses(address, fleet: str, topic_prefix: str, wait: float) -> tuple[dict[str, dict], dict[str, dict]]:
    """The retained statuses of the fleet's devices and, by fleet, the retained open alerts, after ``wait`` s."""
    from devices.rollout import FleetLink

    alerts_by_fleet: dict[str, dict] = {}
    with FleetLink(address, fleet, topic_prefix) as link:
        # alerts are retained per fleet: subscribe to every fleet's
        link.link.client.subscribe(f"{topic_prefix}/+/alerts", qos=1)
        orig = link._on_message

        def grab(topic_name, payload):
            if topic_name.endswith("/alerts"):
                try:
                    alerts_by_fleet[topic_name.split("/")[-2]] = json.loads(payload)
                except ValueError:
                    pass
            orig(topic_name, payload)

        link.link._on_message = grab
        time.sleep(wait)
        statuses = dict(link.statuses)
    return statuses, alerts_by_fleet


def _alert_name(a: dict) -> str:
    return f"{a['detector']}" + (f"({','.join(a.get('features') or [])})" if a.get("features") else "")


def _device_row(dev: str, s: dict, alerts_by_fleet: dict[str, dict], now: float) -> dict:
    """One device of ``devices list``: where it runs, what it runs, when it was last seen, its open alerts."""
    f = s.get("fleet")
    open_ = [a for a in (alerts_by_fleet.get(f) or {}).get("open", []) if a.get("device_id") == dev]
    plat, model = s.get("platform") or {}, s.get("model") or {}
    ts = s.get("ts")
    return {
        "device_id": dev, "fleet": f, "online": s.get("online"), "arch": plat.get("machine"),
        "board": plat.get("board"), "os": plat.get("os") or plat.get("system"),
        "runtime_version": s.get("runtime_version"), "bundle": model.get("name"), "version": model.get("version"),
        "free_disk_bytes": s.get("free_disk_bytes"), "last_seen": s.get("ts"),
        "last_seen_ago_s": round(now - ts, 1) if ts else None,
        "alerts": [_alert_name(a) for a in open_],
    }


def _table_cells(r: dict) -> list[str]:
    """A device row as the table's cells ("-" for what it does not report)."""
    disk = f"{r['free_disk_bytes'] / 2**30:.1f} GiB" if r["free_disk_bytes"] else "-"
    seen = f"{r['last_seen_ago_s']:.0f}s ago" if r["last_seen_ago_s"] is not None else "-"
    return [r["device_id"], _or_dash(r["fleet"]), "online" if r["online"] else "offline",
            *(_or_dash(r[k]) for k in ("arch", "board", "os", "runtime_version")),
            f"{r['bundle']} {r['version']}", disk, seen, _or_dash(", ".join(r["alerts"]))]


def _or_dash(value):
    """The value, or "-" for one the device does not report (None or empty)."""
    return value or "-"


def _print_devices_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"devices ({len(rows)})")
    for col in ("device", "fleet", "state", "arch", "board", "os", "runtime", "bundle", "free disk", "last seen",
                "alerts"):
        t.add_column(col, no_wrap=col in ("device", "fleet", "state", "bundle"))
    for r in rows:
        t.add_row(*_table_cells(r))
    Console(width=None if sys.stdout.isatty() else 200).print(t)   # piped: do not squeeze ids to 80 columns


@devices_group.command("profiles")
@click.option("--json", "as_json", is_flag=True)
def devices_profiles(as_json):
    """The board catalogue (Raspberry Pi Zero 2 W, 3B+, 4B, 5, generic ARM64, x86)."""
    from devices.boards import PROFILES

    if as_json:
        click.echo(json.dumps([p.to_dict() for p in PROFILES.values()], indent=2))
        return
    for p in PROFILES.values():
        click.echo(f"{p.id:14s} {p.name:30s} {p.arch:8s} {p.cores} cores  {p.memory_mb:6d} MiB  {p.cpu}")


def _identity_files(f):
    from devices.provision import ETC

    for opt in reversed([
        click.option("--fleet", required=True, help="The device's fleet."),
        click.option("--device", required=True, help="The device's id."),
        click.option("--password-file", type=click.Path(dir_okay=False), default=str(ETC / "passwd"),
                     show_default=True, help="The broker's password file for devices."),
        click.option("--acl", "acl_file", type=click.Path(dir_okay=False), default=str(ETC / "acl"),
                     show_default=True, help="The broker's ACL file."),
        click.option("--ca-dir", type=click.Path(file_okay=False), default=str(ETC), show_default=True,
                     help="The fleet CA: ca.crt, ca.key, issued.txt and the CRL crl.pem."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        f = opt(f)
    return f


@devices_group.command("provision")
@_identity_files
@click.option("--out", type=click.Path(file_okay=False),
              help="Folder for the device's files (default: ./FLEET-DEVICE).")
@click.option("--cert", is_flag=True, help="A client certificate from the fleet CA instead of a password.")
@click.option("--broker", help="The broker URL the agent uses (default: mqtts://localhost:8883, 8884 with --cert).")
@click.option("--topic-prefix", default="edgeops", show_default=True)
def devices_provision(fleet, device, password_file, acl_file, ca_dir, as_json, out, cert, broker, topic_prefix):
    """Give a device its own identity: username FLEET/DEVICE with a password (or --cert, a client
    certificate), an ACL block that allows its own topics only, and a ready-to-copy agent folder
    (run-agent.sh, agent.env, ca.crt). Again on the same device: rotates its credential.
    Send the broker SIGHUP afterwards."""
    from devices.provision import BrokerFiles, provision

    made = provision(fleet, device, Path(out or f"{fleet}-{device}"),
                     BrokerFiles(Path(password_file), Path(acl_file), Path(ca_dir)),
                     cert=cert, broker=broker, prefix=topic_prefix)
    if as_json:
        click.echo(json.dumps(made.to_dict(), indent=2))
        return
    credential = f"certificate serial {made.cert_serial}" if cert else f"password in {made.password_file}"
    click.echo(f"{made.username}: {credential}; ACL block in {made.acl_file}; agent files in {made.out}\n"
               f"on the device: {made.out}/run-agent.sh BUNDLE   (then: kill -HUP the broker)")


@devices_group.command("revoke")
@_identity_files
def devices_revoke(fleet, device, password_file, acl_file, ca_dir, as_json):
    """Take a device's identity away: its password entry, its ACL block and (in the CRL) its
    certificates. Send the broker SIGHUP afterwards; the device is then refused at connect."""
    from devices.provision import revoke

    done = revoke(fleet, device, Path(password_file), Path(acl_file), Path(ca_dir))
    if as_json:
        click.echo(json.dumps(done, indent=2))
        return
    serials = ", ".join(done["revoked_serials"]) or "none"
    click.echo(f"{done['username']}: password entry {'removed' if done['password_removed'] else 'absent'}, ACL block "
               f"{'removed' if done['acl_removed'] else 'absent'}, certificates revoked: {serials} "
               "(then: kill -HUP the broker)")
