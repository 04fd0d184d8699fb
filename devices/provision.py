"""Device identities for the broker in ``deploy/mosquitto``: credentials, ACL block and agent config.

A device's MQTT username is ``<fleet>/<device>``. Fleet and device ids never contain ``/``
(``[A-Za-z0-9][A-Za-z0-9_.-]{0,63}``), so the username names exactly one device of one fleet,
and it is the device's identity everywhere the broker looks: the device listeners set
``use_username_as_clientid`` (a device cannot pick another device's client id, so it cannot take
over its session), the certificate listener takes the username from the certificate's CN
(``use_identity_as_username``), and the ACL gives each username one ``user`` block that allows
its own topics only.

Provisioning is idempotent: provisioning a device again rotates its password (or issues a new
certificate) and rewrites its ACL block. Mosquitto reads the password file, the ACL and the CRL
again on SIGHUP; nothing here signals the broker.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shlex
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge_runtime.errors import InvalidInputError
from edge_runtime.wire import CMD, CMD_RESULT, DEFAULT_PREFIX, ID

ETC = Path("/etc/mosquitto/edgeops")
PASSWORD_PORT, CERTIFICATE_PORT = 8883, 8884
PBKDF2_ITERATIONS = 101          # what mosquitto_passwd 2.x writes (format $7$)


def device_username(fleet: str, device: str) -> str:
    """``<fleet>/<device>``, after checking both ids (InvalidInputError, exit 3, otherwise).

    >>> device_username("lab", "pi-7")
    'lab/pi-7'
    >>> device_username("lab", "pi/7")
    Traceback (most recent call last):
    ...
    edge_runtime.errors.InvalidInputError: device id 'pi/7': use 1-64 letters, digits, '.', '_' or '-' (starting ...)
    """
    for what, value in (("fleet", fleet), ("device", device)):
        if not isinstance(value, str) or not ID.match(value):
            raise InvalidInputError(f"{what} id {value!r}: use 1-64 letters, digits, '.', '_' or '-' "
                                    "(starting with a letter or digit)")
    return f"{fleet}/{device}"


def acl_block(fleet: str, device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The ACL lines of one device: write its own telemetry, status, bench and cmd/result; read its own
    cmd (and below) and ack. Anything else is denied.

    >>> print(acl_block("lab", "pi-7"))
    # device lab/pi-7 (edgeops devices provision; `edgeops devices revoke` removes it)
    user lab/pi-7
    topic write edgeops/lab/pi-7/telemetry
    topic write edgeops/lab/pi-7/status
    topic write edgeops/lab/pi-7/bench
    topic write edgeops/lab/pi-7/cmd/result
    topic read edgeops/lab/pi-7/cmd
    topic read edgeops/lab/pi-7/cmd/#
    topic read edgeops/lab/pi-7/ack
    """
    user = device_username(fleet, device)
    base = f"{prefix}/{fleet}/{device}"
    writes = [f"{base}/{kind}" for kind in ("telemetry", "status", "bench", CMD_RESULT)]
    reads = [f"{base}/{CMD}", f"{base}/{CMD}/#", f"{base}/ack"]
    return "\n".join([_marker(user), f"user {user}"] + [f"topic write {t}" for t in writes]
                     + [f"topic read {t}" for t in reads])


def _marker(username: str) -> str:
    return f"# device {username} (edgeops devices provision; `edgeops devices revoke` removes it)"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """A password hash in Mosquitto 2's password-file format (``$7$``: PBKDF2-HMAC-SHA512, 101 rounds)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ITERATIONS)
    return f"$7${PBKDF2_ITERATIONS}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace a file the broker reads in one step (it may reload at any moment), keeping the mode, owner and
    group of the file it replaces (Mosquitto reads them as its own user): ``mode`` is for a new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.stat() if path.exists() else None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, old.st_mode & 0o777 if old else mode)
        if old:
            try:
                os.chown(tmp, old.st_uid, old.st_gid)
            except PermissionError:
                pass          # not root: the file stays ours, as the one it replaces was
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str, mode: int) -> None:
    replace_file(path, text.encode(), mode)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def set_password(password_file: Path, username: str, password: str) -> None:
    """Add or replace ``username``'s entry in a Mosquitto password file."""
    kept = [line for line in _lines(password_file) if line.split(":", 1)[0] != username]
    _write_text(password_file, "\n".join(kept + [f"{username}:{hash_password(password)}"]) + "\n", 0o640)


def remove_password(password_file: Path, username: str) -> bool:
    """Remove ``username``'s entry; False when it had none."""
    lines = _lines(password_file)
    kept = [line for line in lines if line.split(":", 1)[0] != username]
    if len(kept) == len(lines):
        return False
    _write_text(password_file, "".join(line + "\n" for line in kept), 0o640)
    return True


def remove_acl_block(acl_file: Path, username: str) -> bool:
    """Remove the ``user <username>`` block (its marker comment and topic lines); False when there was none."""
    kept, found = _without_block(_lines(acl_file), username)
    if found:
        while kept and not kept[-1].strip():
            kept.pop()
        _write_text(acl_file, "".join(line + "\n" for line in kept), 0o644)
    return found


def _without_block(lines: list[str], username: str) -> tuple[list[str], bool]:
    """The ACL lines without ``username``'s block and marker, no runs of blank lines left; and whether the
    block was there."""
    kept: list[str] = []
    skipping = found = False
    marker = _marker(username)
    for line in lines:
        if line.strip() == marker:
            continue
        words = line.split(None, 1)
        skipping = _in_block(words, username, skipping)
        found = found or (words[:1] == ["user"] and skipping)
        if not skipping and (line.strip() or (kept and kept[-1].strip())):
            kept.append(line)
    return kept, found


def _in_block(words: list[str], username: str, skipping: bool) -> bool:
    """Whether a line (its first words) belongs to ``username``'s block, given whether the line before did:
    a ``user`` line starts a block; the block ends at the first line that is not an ACL rule."""
    if words[:1] == ["user"]:
        return words[1:] == [username]
    return skipping and words[:1] in (["topic"], ["pattern"])


def set_acl_block(acl_file: Path, fleet: str, device: str, prefix: str = DEFAULT_PREFIX) -> None:
    """Add the device's block at the end of the ACL (replacing a block it had)."""
    remove_acl_block(acl_file, device_username(fleet, device))
    text = acl_file.read_text().rstrip("\n") + "\n\n" if acl_file.exists() else ""
    _write_text(acl_file, text + acl_block(fleet, device, prefix) + "\n", 0o644)


@dataclass
class ProvisionedDevice:
    """What ``provision`` made for one device: where its credential went and its agent files."""

    fleet: str
    device: str
    username: str
    broker: str
    out: str
    acl_file: str
    password_file: str | None = None
    cert_serial: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BrokerFiles:
    """Where the broker keeps its identities: the password file, the ACL file and the fleet CA folder."""

    password_file: Path
    acl_file: Path
    ca_dir: Path


def provision(fleet: str, device: str, out: Path, files: BrokerFiles, *,
              cert: bool = False, broker: str | None = None, prefix: str = DEFAULT_PREFIX) -> ProvisionedDevice:
    """Make one device's credential (a password, or with ``cert`` a client certificate from the fleet CA
    in ``files.ca_dir``), its ACL block and, in ``out``, the files to copy to the device.

    ``out`` receives ``agent.env`` (the password, mode 0600), ``run-agent.sh`` (``edgeops run`` with
    the broker, username and TLS files, relative to itself), ``ca.crt`` and, with ``cert``,
    ``device.crt``/``device.key``.
    """
    password_file, acl_file, ca_dir = files.password_file, files.acl_file, files.ca_dir
    username = device_username(fleet, device)
    broker = broker or f"mqtts://localhost:{CERTIFICATE_PORT if cert else PASSWORD_PORT}"
    out.mkdir(parents=True, exist_ok=True)
    made = ProvisionedDevice(fleet, device, username, broker, str(out), str(acl_file))
    args = ["--fleet", fleet, "--device-id", device, "--broker", broker, "--topic-prefix", prefix]
    if (ca_dir / "ca.crt").exists() or cert:
        args += _tls_files(made, ca_dir, out, cert)
    if not cert:
        args += _password_credential(made, password_file, out)
    set_acl_block(acl_file, fleet, device, prefix)
    made.command = ["edgeops", "run", "BUNDLE"] + args
    _write_text(out / "run-agent.sh", _run_script(args), 0o755)
    made.files = {p.name: str(p) for p in sorted(out.iterdir()) if p.is_file()}
    return made


def _tls_files(made: ProvisionedDevice, ca_dir: Path, out: Path, cert: bool) -> list[str]:
    """Copy the fleet CA into ``out`` (and with ``cert`` issue the device's certificate): the agent's options."""
    from devices import fleet_ca  # cryptography: imported only to provision

    args = []
    if cert:
        serial = fleet_ca.issue(ca_dir, made.username, out / "device.crt", out / "device.key")
        made.cert_serial = f"{serial:x}"
        args += ["--cert", "device.crt", "--key", "device.key"]
    shutil.copyfile(ca_dir / "ca.crt", out / "ca.crt")
    return args + ["--ca", "ca.crt"]


def _password_credential(made: ProvisionedDevice, password_file: Path, out: Path) -> list[str]:
    """A new password for the device, in the broker's password file and in ``out/agent.env``: the agent's options."""
    password = secrets.token_urlsafe(24)
    set_password(password_file, made.username, password)
    made.password_file = str(password_file)
    _write_text(out / "agent.env", f"EDGEOPS_MQTT_PASSWORD={password}\n", 0o600)
    return ["--username", made.username]


def _run_script(args: list[str]) -> str:
    """A shell script that runs the agent from the folder it was copied to: ``run-agent.sh BUNDLE [options]``."""
    return ("#!/bin/sh\n# Made by `edgeops devices provision`. Usage: run-agent.sh BUNDLE [more edgeops run options]\n"
            "set -e\ncd \"$(dirname \"$0\")\"\n"
            "if [ -f agent.env ]; then set -a; . ./agent.env; set +a; fi\n"
            "bundle=\"$1\"; shift\n"
            f"exec edgeops run \"$bundle\" {shlex.join(args)} \"$@\"\n")


def revoke(fleet: str, device: str, password_file: Path, acl_file: Path, ca_dir: Path) -> dict:
    """Remove a device's password entry and ACL block and revoke its certificates (in the CRL).

    InvalidInputError (exit 3) when none of them knew the device. The broker applies it on SIGHUP.
    """
    from devices import fleet_ca

    username = device_username(fleet, device)
    done = {"fleet": fleet, "device": device, "username": username,
            "password_removed": remove_password(password_file, username),
            "acl_removed": remove_acl_block(acl_file, username),
            "revoked_serials": [f"{s:x}" for s in fleet_ca.revoke(ca_dir, username)]}
    if not (done["password_removed"] or done["acl_removed"] or done["revoked_serials"]):
        raise InvalidInputError(f"{username}: nothing to revoke (no entry in {password_file}, no block in "
                                f"{acl_file}, no certificate in {ca_dir / fleet_ca.ISSUED} that is not revoked yet)")
    return done
