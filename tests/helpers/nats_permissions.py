"""A real nats-server (MQTT 3.1.1 on, JetStream for its sessions) whose user ``monitor`` may subscribe only
as a rule says, changed at run time (the server reloads its configuration on SIGHUP). ``device`` may do
anything. Used where a broker must refuse a subscription: Mosquitto grants wildcard subscriptions and
filters deliveries by its ACL instead, nats-server answers SUBACK 0x80."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import eventually

CONFIG = """
listen: 127.0.0.1:{client_port}
server_name: perms
jetstream {{ store_dir: "{store}" }}
mqtt {{ listen: 127.0.0.1:{mqtt_port} }}
authorization {{
  users = [
    {{user: monitor, password: pw, permissions: {{subscribe: {rule}}}}},
    {{user: device, password: pw}}
  ]
}}
"""

DENY_FLEET_TOPICS = '{deny: ["edgeops.>"]}'
ALLOW_ALL = '{allow: [">"]}'


class NatsWithPermissions:
    """Start with ``rule`` for ``monitor``; :meth:`set_rule` changes it. ``mqtt_port`` is the MQTT listener."""

    def __init__(self, workdir: Path, rule: str = DENY_FLEET_TOPICS):
        from devtools.brokers import free_port
        from devtools.nats_cluster import find_nats

        binary = find_nats()
        if binary is None:
            assert not os.environ.get("CI"), "nats-server is not installed (.ci/run installs it)"
            pytest.skip("nats-server is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ports = {"client_port": free_port(), "mqtt_port": free_port(), "store": str(workdir / "js")}
        self.mqtt_port = self.ports["mqtt_port"]
        self.conf, self.log_path = workdir / "nats.conf", workdir / "nats.log"
        self._write(rule)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=self._log, stderr=self._log)
        if not eventually(lambda: b"Server is ready" in self.log_path.read_bytes(), 15):
            log = self.log_path.read_bytes()[-2000:]
            self.close()
            raise AssertionError(f"nats-server did not start: {log!r}")

    def _write(self, rule: str) -> None:
        self.conf.write_text(CONFIG.format(rule=rule, **self.ports))

    def set_rule(self, rule: str) -> None:
        self._write(rule)
        self.proc.send_signal(signal.SIGHUP)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()
