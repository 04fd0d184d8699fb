"""`edgeops fleet`: emulated fleets (development tools, not needed on a device)."""

from __future__ import annotations

import click

from devtools.fleet_emulation import emulate_cmd


@click.group("fleet")
def fleet_group():
    """Emulated fleets."""


fleet_group.add_command(emulate_cmd)
