"""What machine a benchmark ran on."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (x86 'model name'; ARM 'CPU part' mapped to a core name)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or "unknown"
    name = _cpuinfo_value(text, ("model name", "Model Name", "cpu model", "Processor"))
    if name is not None:
        return name
    part = _cpuinfo_value(text, ("CPU part",))
    if part is not None:
        return ARM_PARTS.get(part.lower(), f"ARM part {part}")
    return platform.processor() or "unknown"


ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd4f": "Neoverse-V2"}


def _cpuinfo_value(text: str, keys: tuple[str, ...]) -> str | None:
    """The value of the first /proc/cpuinfo line whose key is one of keys."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def board_model() -> str | None:
    try:
        return Path("/proc/device-tree/model").read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def machine_info() -> dict:
    """The machine block of a benchmark result."""
    try:
        os_name = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
        ).get("PRETTY_NAME", "").strip('"')
    except OSError:
        os_name = ""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "arch": platform.machine(),
        "os": os_name or f"{platform.system()} {platform.release()}",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "board": board_model(),
    }


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024.0, 1)
    except OSError:
        pass
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1)
    except (ImportError, OSError):
        return None
