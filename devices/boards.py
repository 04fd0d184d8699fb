"""Board profiles: the kinds of device a fleet runs on.

A profile says what a board is (cores, memory, CPU) so that benchmark results
can be stored against it and a rollout can refuse a bundle whose measured
latency on that board exceeds a budget. ``detect_profile()`` names the
profile of the machine it runs on.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class BoardProfile:
    """One kind of board.

    Attributes:
        id: short stable id used on the command line and in the database.
        name: marketing name as /proc/device-tree/model spells it (prefix).
        arch: ``platform.machine()`` on it.
        cores: CPU cores.
        memory_mb: RAM of the common variant, in MiB.
        cpu: CPU core type.
        qemu_cpu: the QEMU CPU model that emulates it (for the emulated device), if any.
        delegate: the LiteRT external delegate the board wants (``PATH[:K=V,...]``, as ``--delegate``
            takes it); None: LiteRT's default, XNNPACK on the CPU.
        providers: ONNX Runtime execution providers the board wants, in order (``--provider`` values);
            CPUExecutionProvider is always last.
    """

    id: str
    name: str
    arch: str
    cores: int
    memory_mb: int
    cpu: str
    qemu_cpu: str | None = None
    delegate: str | None = None
    providers: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, BoardProfile] = {
    p.id: p
    for p in (
        BoardProfile("rpi-zero-2w", "Raspberry Pi Zero 2 W", "aarch64", 4, 512, "Cortex-A53 @ 1.0 GHz", "cortex-a53"),
        BoardProfile("rpi-3b-plus", "Raspberry Pi 3 Model B Plus", "aarch64", 4, 1024, "Cortex-A53 @ 1.4 GHz",
                     "cortex-a53"),
        BoardProfile("rpi-4b", "Raspberry Pi 4 Model B", "aarch64", 4, 4096, "Cortex-A72 @ 1.8 GHz", "cortex-a72"),
        BoardProfile("rpi-5", "Raspberry Pi 5", "aarch64", 4, 8192, "Cortex-A76 @ 2.4 GHz", "cortex-a76"),
        BoardProfile("arm64-generic", "Generic ARM64 box", "aarch64", 4, 4096, "ARMv8-A", "cortex-a72"),
        BoardProfile("x86-64", "x86-64 box", "x86_64", os.cpu_count() or 2, 8192, "x86-64"),
        # the Coral Dev Board's device tree calls it Phanbell; its Edge TPU runs models compiled for it
        BoardProfile("coral-dev-board", "Freescale i.MX8MQ Phanbell", "aarch64", 4, 1024, "Cortex-A53 @ 1.5 GHz",
                     "cortex-a53", delegate="libedgetpu.so.1"),
    )
}


def get_profile(profile_id: str) -> BoardProfile:
    """The profile named ``profile_id`` (ValueError listing the known ones otherwise)."""
    try:
        return PROFILES[profile_id]
    except KeyError:
        from edge_runtime.errors import InvalidInputError

        raise InvalidInputError(f"unknown board profile {profile_id!r}; known: {', '.join(PROFILES)}") from None


def board_model(device_tree: Path = Path("/proc/device-tree/model")) -> str | None:
    """The board's model string from the device tree (Raspberry Pi and most ARM boards), or None."""
    try:
        return device_tree.read_bytes().rstrip(b"\x00").decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def detect_profile(model: str | None = None, machine: str | None = None) -> BoardProfile:
    """The profile of this machine (or of the given device-tree model and architecture).

    >>> detect_profile("Raspberry Pi 4 Model B Rev 1.4", "aarch64").id
    'rpi-4b'
    >>> detect_profile(None, "x86_64").id
    'x86-64'
    """
    model = board_model() if model is None and machine is None else model
    machine = machine or platform.machine()
    named = _named_profile(model) if model else None
    if named is not None:
        return named
    if machine in ("aarch64", "arm64"):
        return PROFILES["arm64-generic"]
    return PROFILES["x86-64"]


def _named_profile(model: str) -> BoardProfile | None:
    """The profile whose board name the device-tree model starts with, if any."""
    return next((p for p in PROFILES.values() if model.startswith(p.name)), None)


# -- bench results stored against a profile -------------------------------------------------------


def bench_store(profile_id: str) -> Path:
    """Where bench results for a profile live (``EDGEOPS_BENCH_STORE`` or ~/.local/share/edgeops/bench)."""
    import os

    base = os.environ.get("EDGEOPS_BENCH_STORE") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share"), "edgeops", "bench")
    return Path(base) / f"{profile_id}.json"


def _bundle_key(bundle) -> str:
    import hashlib

    return hashlib.sha256((bundle.root / "manifest.json").read_bytes()).hexdigest()


def store_results(profile_id: str, items: list[dict], results: list[dict]) -> Path:
    """Record the p50 of every benchmarked bundle artifact against ``profile_id``."""
    import json
    import os
    import time

    get_profile(profile_id)
    path = bench_store(profile_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        doc = {}
    for item, r in zip(items, results, strict=True):
        p50 = (r.get("latency_ms") or {}).get("p50")
        if item.get("bundle") is None or p50 is None:
            continue
        b = item["bundle"]
        entry = doc.setdefault(_bundle_key(b), {"bundle": b.name, "version": b.version, "artifacts": {}})
        entry["artifacts"][Path(str(r["artifact"])).name] = {"p50_ms": p50, "p99_ms": r["latency_ms"].get("p99"),
                                                            "ts": round(time.time(), 3)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, path)
    return path


def stored_latency(bundle_path, profile_id: str) -> float | None:
    """The stored p50 (ms) on ``profile_id`` of the artifact a device would run from this bundle, if any."""
    import json

    from edge_runtime.bundle import open_bundle
    from edge_runtime.model import choose_artifact

    b = open_bundle(bundle_path)
    b.cleanup()              # the manifest is all this needs
    try:
        doc = json.loads(bench_store(profile_id).read_text())
    except (OSError, ValueError):
        return None
    entry = doc.get(_bundle_key(b))
    if not entry:
        return None
    chosen = Path(choose_artifact(b)["file"]).name
    hit = entry["artifacts"].get(chosen)
    if hit is None:   # not benchmarked: the slowest artifact that was, to stay on the safe side
        return max((a["p50_ms"] for a in entry["artifacts"].values()), default=None)
    return hit["p50_ms"]
