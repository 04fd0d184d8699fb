"""An emulated Raspberry Pi: aarch64 Debian userland and Python run under QEMU user mode.

It proves that the device side of edgeops installs, imports, loads bundles,
predicts the same numbers and talks MQTT on aarch64, on an x86_64 machine
without a board. It is for compatibility, never for timing: emulated
latencies are not Raspberry Pi latencies (one-row inference is 15 to 300
times slower than on the host, imports about 20 times; docs/emulated-arm.md).

What it is made of, all cached under one folder (``~/.cache/edgeops/arm64``
or ``$EDGEOPS_ARM_ROOT``):

- ``rootfs/``: an aarch64 Debian bookworm userland with Python 3.11, unpacked
  by ``mmdebstrap --variant=extract`` (nothing runs under emulation to make it),
- ``wheels/``: the device-side requirements (the base dependencies of
  ``pyproject.toml``, plus ``rich``) as manylinux aarch64 wheels, installed by
  the host's pip with ``--target``; the repository itself goes on
  ``PYTHONPATH``, it is not installed,
- ``boards/<board>/``: a hard-linked copy of ``rootfs/`` with the board's own
  ``/proc/cpuinfo`` and ``/proc/device-tree/model``.

How it runs: ``qemu-aarch64-static boards/<board>/usr/bin/python3.11`` with
``QEMU_LD_PREFIX`` pointing at the board folder. QEMU looks every absolute path
the guest opens up in that folder first and falls back to the host's, so the
guest sees the board's ``/proc/cpuinfo`` (ONNX Runtime crashes on import when it
reads an x86 one) and the host's ``/tmp``, ``/dev``, ``/proc/self`` and network.
``QEMU_CPU`` names the board's core: QEMU's default CPU (``max``) computes int8
TFLite kernels wrongly. Children the guest starts (``subprocess``,
``multiprocessing``) are aarch64 executables again: the kernel runs them
through QEMU only when binfmt_misc has the ``qemu-aarch64`` entry enabled,
which :func:`binfmt_enabled` does for a while and then undoes.

This module uses the standard library only: it runs on the host.

    python -m devtools.emulated_arm prepare
    python -m devtools.emulated_arm python -- -c "import platform; print(platform.machine())"
    python -m devtools.emulated_arm run -- run bundle/ --device-id pi-1 --broker mqtt://127.0.0.1:1883
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from edge_runtime.errors import EdgeOpsError

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Debian release of the userland and the Python it ships.
SUITE = "bookworm"
PYTHON_VERSION = "3.11"
PYTHON_BIN = "usr/bin/python3.11"
#: libstdc++6 must be named: ONNX Runtime's extension cannot load without it.
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")
#: Every manylinux aarch64 tag: pip does not fall back from one to another by itself,
#: and ai-edge-litert is tagged manylinux_2_27 only.
PLATFORM_TAGS = (
    "manylinux_2_28_aarch64",
    "manylinux_2_27_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)
#: Device-side extras beyond the base dependencies: rich (edgeops bench prints with it) and pytest
#: (a pytest session can run inside the device).
EXTRA_REQUIREMENTS = ("rich>=13", "pytest>=8", "pytest-timeout>=2.2")
#: Used when pyproject.toml cannot be read (the module copied elsewhere).
FALLBACK_REQUIREMENTS = (
    "numpy>=1.23",
    "paho-mqtt>=2.0",
    "ai-edge-litert>=1.2",
    "onnxruntime>=1.17",
    "click>=8.1",
    "cryptography>=41",
)
#: Packages a device must never import.
FORBIDDEN_MODULES = ("tensorflow", "sklearn", "keras")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: Bump when the layout of the cache changes: every part is rebuilt.
CACHE_FORMAT = 1

QEMU = "qemu-aarch64-static"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_ENTRY = "qemu-aarch64"
# The ELF header of an aarch64 executable and its mask, as Debian's qemu-user-static registers them.
_BINFMT_MAGIC = r"\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00"
_BINFMT_MASK = r"\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff"


class EmulationError(EdgeOpsError, RuntimeError):
    """The emulated device cannot be prepared or started; the message says what to do (exit status 1)."""

    exit_code = 1


class PrepareError(EmulationError):
    """A tool is missing or a step of :func:`prepare` failed."""


class BinfmtError(EmulationError):
    """binfmt_misc cannot be set up (not root, no kernel support, no qemu-user-static)."""


# --------------------------------------------------------------------------- boards


@dataclass(frozen=True)
class Board:
    """A board the emulated device pretends to be.

    Attributes:
        id: short id on the command line (``rpi4``).
        name: the board's model string, as its device tree spells it.
        qemu_cpu: the QEMU CPU model of its core (``QEMU_CPU``).
        profile_id: the matching id in :mod:`devices.boards`.
        cpu_part, cpu_variant, cpu_revision, features: what its ``/proc/cpuinfo`` says.
        revision: the board revision code in ``/proc/cpuinfo``.
    """

    id: str
    name: str
    qemu_cpu: str
    profile_id: str
    cpu_part: str
    cpu_variant: str
    cpu_revision: int
    features: str
    revision: str

    def cpuinfo(self, cores: int) -> str:
        """The text of ``/proc/cpuinfo`` on this board, with ``cores`` processors."""
        block = (
            "processor\t: {i}\n"
            "BogoMIPS\t: 108.00\n"
            f"Features\t: {self.features}\n"
            "CPU implementer\t: 0x41\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: {self.cpu_variant}\n"
            f"CPU part\t: {self.cpu_part}\n"
            f"CPU revision\t: {self.cpu_revision}\n\n"
        )
        text = "".join(block.format(i=i) for i in range(max(1, cores)))
        return text + f"Revision\t: {self.revision}\nModel\t\t: {self.device_tree_model()}\n"

    def device_tree_model(self) -> str:
        """``/proc/device-tree/model``: the board's name, marked as emulated."""
        return f"{self.name} (emulated, QEMU user mode {self.qemu_cpu})"


BOARDS: dict[str, Board] = {
    b.id: b
    for b in (
        Board("rpi4", "Raspberry Pi 4 Model B Rev 1.4", "cortex-a72", "rpi-4b",
              "0xd08", "0x0", 3, "fp asimd evtstrm crc32 cpuid", "d03114"),
        Board("rpi5", "Raspberry Pi 5 Model B Rev 1.0", "cortex-a76", "rpi-5",
              "0xd0b", "0x4", 1,
              "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
              "lrcpc dcpop asimddp", "d04170"),
    )
}
DEFAULT_BOARD = "rpi4"


def get_board(board: str | Board) -> Board:
    """The board named ``board`` (ValueError listing the known ones otherwise)."""
    if isinstance(board, Board):
        return board
    try:
        return BOARDS[board]
    except KeyError:
        raise ValueError(f"unknown board {board!r}; known: {', '.join(BOARDS)}") from None


# --------------------------------------------------------------------------- preparing


def default_root() -> Path:
    """The cache folder: ``$EDGEOPS_ARM_ROOT`` or ``~/.cache/edgeops/arm64``."""
    env = os.environ.get("EDGEOPS_ARM_ROOT")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "edgeops" / "arm64"


def missing_tools() -> list[str]:
    """Host tools :func:`prepare` and running need that are not installed (Debian package names)."""
    missing = []
    if not shutil.which(QEMU):
        missing.append("qemu-user-static")
    if not shutil.which("mmdebstrap"):
        missing.append("mmdebstrap")
    return missing


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses for the main archive (``$EDGEOPS_DEBIAN_MIRROR`` first)."""
    env = os.environ.get("EDGEOPS_DEBIAN_MIRROR")
    if env:
        return env
    apt = Path("/etc/apt")
    candidates = [*_deb822_sources(sorted(apt.glob("sources.list.d/*.sources"))),
                  *_one_line_sources([apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))])]
    return _main_archive(candidates) or DEFAULT_MIRROR


def _main_archive(candidates: list[tuple[list[str], list[str], list[str]]]) -> str | None:
    """The first URI of a ``deb`` source for SUITE that is not the security archive."""
    for types, uris, suites in candidates:
        if "deb" in types and SUITE in suites:
            uri = next((u for u in uris if "security" not in u), None)
            if uri is not None:
                return uri.rstrip("/")
    return None


def _read_apt_file(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _deb822_sources(paths: list[Path]) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each stanza of apt's deb822 ``.sources`` files."""
    found = []
    for text in filter(None, map(_read_apt_file, paths)):
        for stanza in text.split("\n\n"):
            fields = _stanza_fields(stanza)
            found.append((fields.get("types", "").split(), fields.get("uris", "").split(),
                          fields.get("suites", "").split()))
    return found


def _stanza_fields(stanza: str) -> dict[str, str]:
    """The ``Key: value`` fields of a deb822 stanza, keys lowercased (comments and continuations skipped)."""
    fields: dict[str, str] = {}
    for line in stanza.splitlines():
        if line.startswith("#") or ":" not in line or line[:1].isspace():
            continue
        key, _, value = line.partition(":")
        fields[key.strip().lower()] = value.strip()
    return fields


def _one_line_sources(paths: list[Path]) -> list[tuple[list[str], list[str], list[str]]]:
    """(types, uris, suites) of each ``deb URI SUITE COMPONENTS`` line of apt's ``.list`` files."""
    found = []
    for text in filter(None, map(_read_apt_file, paths)):
        for line in text.splitlines():
            words = _source_words(line)
            if len(words) >= 3 and words[0] == "deb":
                found.append((["deb"], [words[1]], [words[2]]))
    return found


def _source_words(line: str) -> list[str]:
    """The words of a ``.list`` line without its comment and its ``[options]``."""
    line = line.split("#", 1)[0].strip()
    if "[" in line and "]" in line:  # deb [arch=... signed-by=...] URI SUITE COMPONENTS
        line = line[:line.index("[")] + line[line.index("]") + 1:]
    return line.split()


def _evaluate_marker(requirement: str) -> str | None:
    """``requirement`` without its marker if the marker holds on the aarch64 device, else None.

    pip would evaluate markers against the host (x86_64); the device is what matters.
    """
    spec, sep, marker = requirement.partition(";")
    if not sep:
        return requirement.strip()
    env = {
        "platform_machine": "aarch64",
        "platform_system": "Linux",
        "sys_platform": "linux",
        "os_name": "posix",
        "python_version": PYTHON_VERSION,
        "python_full_version": PYTHON_VERSION + ".2",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }
    try:
        from pip._vendor.packaging.markers import Marker  # the host's pip is there: prepare uses it
    except ImportError:  # pragma: no cover - pip without its vendored packaging
        return spec.strip()
    return spec.strip() if Marker(marker.strip()).evaluate(env) else None


def device_requirements(pyproject: Path = REPO_ROOT / "pyproject.toml") -> list[str]:
    """What the device installs: the base dependencies of ``pyproject.toml`` plus ``rich``."""
    try:
        import tomllib

        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (ImportError, OSError, KeyError, ValueError):
        deps = list(FALLBACK_REQUIREMENTS)
    wanted = [r for r in (_evaluate_marker(d) for d in [*deps, *EXTRA_REQUIREMENTS]) if r]
    return sorted(dict.fromkeys(wanted))


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _read_stamp(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_stamp(path: Path, stamp: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _run_step(cmd: list[str], what: str, log, env: dict | None = None) -> None:
    log(f"emulated-arm: {what}")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise PrepareError(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _rootfs_stamp() -> dict:
    return {"format": CACHE_FORMAT, "suite": SUITE, "arch": "arm64", "packages": sorted(DEBIAN_PACKAGES)}


def _fix_userland(tmp: Path) -> None:
    """Drop the userland's /tmp and /dev, and say what system it is."""
    # The host's /tmp and /dev are the ones to use: QEMU would look the rootfs's up first.
    for name in ("tmp", "dev"):
        target = tmp / name
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.exists():
            shutil.rmtree(target)
    # base-files is not unpacked: say what system this is.
    os_release = tmp / "etc" / "os-release"
    if not os_release.exists():
        os_release.write_text(
            'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nNAME="Debian GNU/Linux"\n'
            'VERSION_ID="12"\nVERSION="12 (bookworm)"\nVERSION_CODENAME=bookworm\nID=debian\n')


def _cached(force: bool, stamp_path: Path, want: dict, present: bool) -> bool:
    """A part is cached: not forced, its stamp says what is wanted, and it is there."""
    return not force and _read_stamp(stamp_path) == want and present


def _pip_wheels_command(target: Path, requirements: Sequence[str]) -> list[str]:
    """pip installing the aarch64 CPython wheels of the requirements into target."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(target), "--only-binary=:all:",
           "--implementation", "cp", "--python-version", PYTHON_VERSION,
           "--abi", "cp" + PYTHON_VERSION.replace(".", "")]
    for tag in PLATFORM_TAGS:
        cmd += ["--platform", tag]
    return cmd + list(requirements)


def _ensure_rootfs(root: Path, mirror: str | None, force: bool, log) -> dict:
    want = _rootfs_stamp()
    stamp_path = root / "rootfs.stamp.json"
    if _cached(force, stamp_path, want, (root / "rootfs" / PYTHON_BIN).exists()):
        log("emulated-arm: rootfs cached")
        return want
    stamp_path.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="rootfs.tmp-", dir=root))
    tmp.rmdir()  # mmdebstrap wants to create it
    try:
        _run_step(
            ["mmdebstrap", "--variant=extract", "--arch=arm64", "--include=" + ",".join(DEBIAN_PACKAGES),
             SUITE, str(tmp), mirror or debian_mirror()],
            f"unpacking an aarch64 Debian {SUITE} userland with {', '.join(DEBIAN_PACKAGES)}", log)
        _fix_userland(tmp)
        if not (tmp / PYTHON_BIN).exists():
            raise PrepareError(f"mmdebstrap finished but {PYTHON_BIN} is missing in the userland")
        _replace_dir(tmp, root / "rootfs")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_stamp(stamp_path, want)
    return want


def _wheels_stamp(requirements: Sequence[str]) -> dict:
    return {"format": CACHE_FORMAT, "python": PYTHON_VERSION, "platforms": list(PLATFORM_TAGS),
            "requirements": sorted(requirements)}


def _ensure_wheels(root: Path, requirements: Sequence[str], force: bool, log) -> dict:
    want = _wheels_stamp(requirements)
    stamp_path = root / "wheels.stamp.json"
    if _cached(force, stamp_path, want, (root / "wheels").is_dir()):
        log("emulated-arm: wheels cached")
        return want
    stamp_path.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="wheels.tmp-", dir=root))
    cmd = _pip_wheels_command(tmp, requirements)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.pop("PIP_REQUIRE_VIRTUALENV", None)
    try:
        _run_step(cmd, f"installing aarch64 wheels: {' '.join(requirements)}", log, env=env)
        _replace_dir(tmp, root / "wheels")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_stamp(stamp_path, want)
    return want


def _board_stamp(board: Board, rootfs: dict, cores: int) -> dict:
    return {"format": CACHE_FORMAT, "board": board.id, "rootfs": _digest(rootfs), "cores": cores,
            "cpuinfo": _digest(board.cpuinfo(cores))}


def _ensure_board(root: Path, board: Board, rootfs: dict, force: bool, log) -> None:
    cores = os.cpu_count() or 1
    want = _board_stamp(board, rootfs, cores)
    boards = root / "boards"
    boards.mkdir(exist_ok=True)
    stamp_path = boards / f"{board.id}.stamp.json"
    final = boards / board.id
    if _cached(force, stamp_path, want, (final / PYTHON_BIN).exists()):
        log(f"emulated-arm: board {board.id} cached")
        return
    stamp_path.unlink(missing_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{board.id}.tmp-", dir=boards))
    try:
        # Hard links: the board costs no disk space beyond its /proc files.
        tmp.rmdir()
        _run_step(["cp", "-al", str(root / "rootfs"), str(tmp)], f"laying out board {board.id}", log)
        proc = tmp / "proc"
        (proc / "device-tree").mkdir(parents=True, exist_ok=True)
        (proc / "cpuinfo").write_text(board.cpuinfo(cores))
        (proc / "device-tree" / "model").write_bytes(board.device_tree_model().encode() + b"\0")
        _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _write_stamp(stamp_path, want)


def prepare(
    root: str | Path | None = None,
    board: str | Board = DEFAULT_BOARD,
    *,
    requirements: Sequence[str] | None = None,
    mirror: str | None = None,
    force: bool = False,
    quiet: bool = False,
) -> "EmulatedArmDevice":
    """Build (or find cached) the userland, the wheels and the board; return the device.

    Each part is rebuilt only when its stamp file differs from what is wanted
    (Debian packages; requirements and platform tags; board and core count),
    or with ``force``. Several processes may prepare the same folder at once:
    one builds, the others wait for it.

    Raises:
        PrepareError: a tool is missing (the message names the Debian packages) or a step failed.
    """
    root = Path(root) if root is not None else default_root()
    board = get_board(board)
    log = (lambda msg: None) if quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    missing = missing_tools()
    if missing:
        raise PrepareError(
            f"the emulated aarch64 device needs {' and '.join(missing)}: "
            f"apt-get install {' '.join(missing)} binfmt-support (or run .ci/arm64-setup)")
    reqs = list(requirements) if requirements is not None else device_requirements()
    root.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with _locked(root / ".lock"):
        rootfs = _ensure_rootfs(root, mirror, force, log)
        _ensure_wheels(root, reqs, force, log)
        _ensure_board(root, board, rootfs, force, log)
    log(f"emulated-arm: {board.id} ready in {root} ({time.monotonic() - start:.1f} s)")
    return EmulatedArmDevice(root, board)


def is_prepared(root: str | Path | None = None, board: str | Board = DEFAULT_BOARD) -> bool:
    """Whether :func:`prepare` has completed for ``board`` under ``root`` (stamps present)."""
    root = Path(root) if root is not None else default_root()
    board = get_board(board)
    return ((root / "rootfs.stamp.json").exists() and (root / "wheels.stamp.json").exists()
            and (root / "boards" / f"{board.id}.stamp.json").exists()
            and (root / "boards" / board.id / PYTHON_BIN).exists())


# --------------------------------------------------------------------------- binfmt_misc

_binfmt_lock = threading.Lock()
_binfmt_users = 0
_binfmt_undo: list[str] = []


def binfmt_state() -> dict:
    """What the kernel says now: ``mounted``, ``registered`` (the qemu-aarch64 entry) and ``enabled``."""
    mounted = (BINFMT_DIR / "status").exists()
    entry = BINFMT_DIR / BINFMT_ENTRY
    registered = mounted and entry.exists()
    enabled = registered and _says_enabled(entry, first_line=True)
    global_on = mounted and _says_enabled(BINFMT_DIR / "status", first_line=False)
    return {"mounted": mounted, "registered": registered, "enabled": enabled and global_on}


def _says_enabled(path: Path, first_line: bool) -> bool:
    """Whether a binfmt_misc file (its first line, for an entry) reads "enabled"; False when unreadable."""
    try:
        text = path.read_text()
        return (text.splitlines()[0] if first_line else text).strip() == "enabled"
    except (OSError, IndexError):
        return False


def _binfmt_write(path: Path, text: str) -> None:
    try:
        path.write_text(text)
    except OSError as exc:
        raise BinfmtError(f"cannot write {path}: {exc}") from exc


def _binfmt_mount() -> None:
    proc = subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise BinfmtError(f"cannot mount binfmt_misc on {BINFMT_DIR}: {proc.stderr.strip()}")


def _update_binfmts_enabled(entry: Path) -> bool:
    """Whether update-binfmts is installed and enabled the entry."""
    return bool(shutil.which("update-binfmts")) and subprocess.run(
        ["update-binfmts", "--enable", BINFMT_ENTRY], capture_output=True).returncode == 0 and entry.exists()


def _binfmt_register() -> None:
    """Register qemu-aarch64-static for aarch64 executables."""
    qemu = shutil.which(QEMU)
    if not qemu:
        raise BinfmtError("qemu-user-static is not installed: apt-get install qemu-user-static binfmt-support")
    # F: the kernel opens the interpreter now, so it works in any mount namespace.
    _binfmt_write(BINFMT_DIR / "register",
                  f":{BINFMT_ENTRY}:M::{_BINFMT_MAGIC}:{_BINFMT_MASK}:{qemu}:PF")


def _binfmt_entry_on() -> str:
    """Switch the aarch64 entry on (registering it when missing); the undo step for what was done."""
    entry = BINFMT_DIR / BINFMT_ENTRY
    if entry.exists():
        _binfmt_write(entry, "1")
        return "entry-off"
    if not _update_binfmts_enabled(entry):
        _binfmt_register()
    return "entry-remove"


def _binfmt_enable() -> list[str]:
    """Enable the aarch64 entry; return the steps that undo exactly what was changed."""
    state = binfmt_state()
    if state["enabled"]:
        return []
    if os.geteuid() != 0:
        raise BinfmtError("starting aarch64 child processes needs binfmt_misc, which only root can "
                          "set up: run as root, or enable it once with `update-binfmts --enable qemu-aarch64`")
    undo: list[str] = []
    if not state["mounted"]:
        _binfmt_mount()
        undo.append("umount")
    try:
        if (BINFMT_DIR / "status").read_text().strip() != "enabled":
            _binfmt_write(BINFMT_DIR / "status", "1")
            undo.append("status-off")
        undo.append(_binfmt_entry_on())
        if not binfmt_state()["enabled"]:
            raise BinfmtError(f"the {BINFMT_ENTRY} binfmt_misc entry did not come up")
    except BaseException:
        _binfmt_restore(undo)
        raise
    return undo


def _binfmt_restore(undo: list[str]) -> None:
    for step in reversed(undo):
        try:
            _UNDO_STEPS.get(step, lambda: None)()
        except OSError:  # best effort: restoring must not hide the caller's own error
            pass


def _remove_entry() -> None:
    entry = BINFMT_DIR / BINFMT_ENTRY
    if entry.exists():
        entry.write_text("-1")


# how to undo each step of _binfmt_enable
_UNDO_STEPS = {
    "umount": lambda: subprocess.run(["umount", str(BINFMT_DIR)], capture_output=True),
    "status-off": lambda: (BINFMT_DIR / "status").write_text("0"),
    "entry-off": lambda: (BINFMT_DIR / BINFMT_ENTRY).write_text("0"),
    "entry-remove": _remove_entry,
}


@contextlib.contextmanager
def binfmt_enabled() -> Iterator[dict]:
    """Let the kernel run aarch64 executables through QEMU for the duration of the block.

    Records the binfmt_misc state first (mounted? entry registered? enabled?)
    and restores exactly that on exit, also when the block raises. Nested and
    concurrent uses within a process share one setup. Yields the state found.

    Raises:
        BinfmtError: not root, or the kernel refuses.
    """
    global _binfmt_users, _binfmt_undo
    before = binfmt_state()
    with _binfmt_lock:
        if _binfmt_users == 0:
            _binfmt_undo = _binfmt_enable()
        _binfmt_users += 1
    try:
        yield before
    finally:
        with _binfmt_lock:
            _binfmt_users -= 1
            if _binfmt_users == 0:
                _binfmt_restore(_binfmt_undo)
                _binfmt_undo = []


# --------------------------------------------------------------------------- the device


class EmulatedArmDevice:
    """A prepared emulated board: runs the aarch64 Python with the device-side wheels.

    Args:
        root: the cache folder :func:`prepare` filled (default :func:`default_root`).
        board: ``rpi4`` (Cortex-A72) or ``rpi5`` (Cortex-A76).
        repo: put this source tree on the guest's ``PYTHONPATH`` (default: this repository;
            ``None`` for none).

    Child processes of the guest need :func:`binfmt_enabled` around the call;
    the guest Python itself does not (it is started through ``qemu-aarch64-static``).
    """

    def __init__(self, root: str | Path | None = None, board: str | Board = DEFAULT_BOARD,
                 repo: str | Path | None = REPO_ROOT) -> None:
        self.root = Path(root) if root is not None else default_root()
        self.board = get_board(board)
        self.sysroot = self.root / "boards" / self.board.id
        self.wheels = self.root / "wheels"
        self.repo = Path(repo) if repo is not None else None
        self.executable = self.sysroot / PYTHON_BIN

    def __repr__(self) -> str:
        return f"EmulatedArmDevice(board={self.board.id!r}, cpu={self.board.qemu_cpu!r}, root={str(self.root)!r})"

    @property
    def prepared(self) -> bool:
        return is_prepared(self.root, self.board)

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The guest's environment: the host's, minus host Python settings, plus QEMU's and ``extra``."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONEXECUTABLE")
               and not k.startswith("QEMU_")}
        path = [str(self.wheels)] + ([str(self.repo)] if self.repo is not None else [])
        env.update({
            # Inherited by the guest's children, unlike qemu's -L.
            "QEMU_LD_PREFIX": str(self.sysroot),
            "QEMU_CPU": self.board.qemu_cpu,
            "PYTHONPATH": os.pathsep.join(path),
            "PYTHONNOUSERSITE": "1",
            "EDGEOPS_EMULATED": f"qemu-user:{self.board.id}:{self.board.qemu_cpu}",
        })
        if extra:
            env.update(extra)
        return env

    def command(self, args: Sequence[str]) -> list[str]:
        """The host command line that runs ``python3.11 ARGS`` on the board."""
        qemu = shutil.which(QEMU)
        if not qemu:
            raise EmulationError("qemu-user-static is not installed: apt-get install qemu-user-static")
        if not self.executable.exists():
            raise EmulationError(f"the emulated {self.board.id} is not prepared under {self.root}: "
                                 "run `python -m devtools.emulated_arm prepare`")
        return [qemu, str(self.executable), *[str(a) for a in args]]

    def python(self, args: Sequence[str], env: dict[str, str] | None = None, *, check: bool = False,
               capture_output: bool = True, text: bool = True, timeout: float | None = None,
               **kwargs) -> subprocess.CompletedProcess:
        """Run the guest Python with ``args`` and wait (``subprocess.run`` keyword arguments pass through).

        ``env`` adds to (and overrides) :meth:`env`'s variables.
        """
        kwargs.setdefault("cwd", str(self.repo) if self.repo is not None else None)
        return subprocess.run(self.command(args), env=self.env(env), check=check, capture_output=capture_output,
                              text=text, timeout=timeout, **kwargs)

    def popen(self, args: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
        """Start the guest Python with ``args`` and return at once (``subprocess.Popen`` keyword arguments)."""
        kwargs.setdefault("cwd", str(self.repo) if self.repo is not None else None)
        return subprocess.Popen(self.command(args), env=self.env(env), **kwargs)

    def edgeops(self, args: Sequence[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
        """Run ``edgeops ARGS`` on the board (``python -m edgeops.cli ARGS``) and wait."""
        return self.python(["-m", "edgeops.cli", *args], env=env, **kwargs)

    def describe(self, timeout: float = 120) -> dict:
        """What the guest says about itself: machine, Python, CPU part, os-release, device-tree model."""
        code = (
            "import json, platform, sys, os\n"
            "part = [l.split(':')[1].strip() for l in open('/proc/cpuinfo') if l.startswith('CPU part')]\n"
            "model = open('/proc/device-tree/model','rb').read().rstrip(b'\\0').decode()\n"
            "print(json.dumps({'machine': platform.machine(), 'python': platform.python_version(),\n"
            "  'executable': sys.executable, 'cpu_part': part[0] if part else None,\n"
            "  'cpus': len(part), 'model': model, 'qemu_cpu': os.environ.get('QEMU_CPU')}))\n"
        )
        proc = self.python(["-c", code], timeout=timeout)
        if proc.returncode != 0:
            raise EmulationError(f"the emulated {self.board.id} did not start: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- command line


def _forward(cmd_args: list[str], device: EmulatedArmDevice, use_binfmt: bool) -> int:
    """Run the guest with the terminal's stdio and return its exit code (Ctrl-C goes to the guest)."""
    stack = contextlib.ExitStack()
    with stack:
        if use_binfmt:
            try:
                stack.enter_context(binfmt_enabled())
            except BinfmtError as exc:
                print(f"emulated-arm: warning: {exc}; the guest cannot start child processes",
                      file=sys.stderr)
        proc = device.popen(cmd_args)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devtools.emulated_arm",
        description="An emulated Raspberry Pi (aarch64 Debian + Python 3.11 under QEMU user mode) for "
                    "compatibility checks of the device side. Emulated latencies are not Raspberry Pi latencies.",
    )
    parser.add_argument("--root", type=Path, default=None,
                        help="cache folder (default: $EDGEOPS_ARM_ROOT or ~/.cache/edgeops/arm64)")
    parser.add_argument("--board", choices=sorted(BOARDS), default=DEFAULT_BOARD,
                        help="rpi4 = Cortex-A72, rpi5 = Cortex-A76 (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_prep = sub.add_parser("prepare", help="build or refresh the cached userland, wheels and board")
    p_prep.add_argument("--force", action="store_true", help="rebuild every part")
    p_prep.add_argument("--mirror", help="Debian mirror (default: the one apt uses)")
    p_prep.add_argument("--check", action="store_true", help="then start the guest once and print what it says")

    sub.add_parser("info", help="show the cache, the board and the binfmt_misc state (as JSON)")

    for name, text in (("python", "run the guest python3.11 with ARGS"),
                       ("run", "run `edgeops ARGS` on the guest (e.g. run -- run BUNDLE --broker ...)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--no-binfmt", action="store_true",
                       help="do not enable binfmt_misc (the guest then cannot start child processes)")
        p.add_argument("args", nargs=argparse.REMAINDER, help="arguments (put them after --)")

    ns = parser.parse_args(argv)
    device = EmulatedArmDevice(ns.root, ns.board)
    try:
        return _COMMANDS.get(ns.command, _guest_command)(ns, device)
    except EmulationError as exc:
        print(f"emulated-arm: error: {exc}", file=sys.stderr)
        return 1


def _prepare_command(ns: argparse.Namespace, device: EmulatedArmDevice) -> int:
    device = prepare(ns.root, ns.board, mirror=ns.mirror, force=ns.force)
    if ns.check:
        print(json.dumps(device.describe(), indent=2))
    return 0


def _info_command(ns: argparse.Namespace, device: EmulatedArmDevice) -> int:
    print(json.dumps({
        "root": str(device.root), "board": device.board.id, "qemu_cpu": device.board.qemu_cpu,
        "prepared": device.prepared, "missing_tools": missing_tools(),
        "requirements": device_requirements(), "binfmt": binfmt_state(),
    }, indent=2))
    return 0


def _guest_command(ns: argparse.Namespace, device: EmulatedArmDevice) -> int:
    """``python ARGS`` or ``run ARGS`` (edgeops) on the guest; its exit status."""
    args = list(ns.args)
    if args and args[0] == "--":
        args = args[1:]
    if ns.command == "run":
        args = ["-m", "edgeops.cli", *args]
    return _forward(args, device, use_binfmt=not ns.no_binfmt)


_COMMANDS = {"prepare": _prepare_command, "info": _info_command}


if __name__ == "__main__":
    sys.exit(main())
