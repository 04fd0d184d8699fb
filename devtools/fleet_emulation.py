"""Emulated fleets: N real device agents replaying reference data, with scheduled events.

``edgeops fleet emulate --devices N --bundle B --broker URL [--scenario FILE]`` starts worker
processes, each running a group of real :class:`edge_runtime.agent.DeviceAgent` instances in
threads (its own device id, state folder, spool, status and bundle slots, so flashing works).
Every device replays rows of a reference data set (all of it, train and test, shuffled per
device, so a clean device's stream has the distribution of the training data the bundle's
reference profile describes).

A scenario file (JSON, or YAML when PyYAML is installed; see docs/fleet-emulation.md) schedules
events at ``at`` seconds after the start:

``drift``   inputs change on some devices: ``shift`` one of scale, offset, noise, missing, prior
            (class priors), with ``factor`` and optionally ``features`` (names or indices);
``offline`` a device drops off the network (its last will says offline) for ``seconds``;
``slow``    ``added_latency_ms`` on every inference from then on;
``flash``   ``bundle`` sent over MQTT to the devices, as ``edgeops flash`` does.

Devices of an event: ``devices`` (a list of ids), or ``count`` (the first N devices), or
``fraction``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import click
import numpy as np

from devices.children import TAIL_LINES, Supervisor, python_command
from edge_runtime.errors import InvalidInputError

log = logging.getLogger("edgeops.fleet")

EVENT_KINDS = ("drift", "offline", "slow", "flash")
SHIFTS = ("scale", "offset", "noise", "missing", "prior")


class ScenarioError(InvalidInputError):
    """A scenario (file or dict) that is not valid; the message names the event and the field."""


@dataclass
class Event:
    at: float
    kind: str
    devices: list[str]
    params: dict = field(default_factory=dict)


def device_ids(n: int, prefix: str = "dev") -> list[str]:
    return [f"{prefix}-{i:03d}" for i in range(n)]


def load_scenario(source: str | Path | dict | None, devices: list[str]) -> list[Event]:
    """Parse and check a scenario (file path or dict); errors name the event and the field."""
    if source is None:
        return []
    if isinstance(source, dict):
        doc, where, folder = source, "scenario", None
    else:
        doc, where, folder = _read_scenario_file(Path(source)), str(Path(source)), Path(source).parent
    if not isinstance(doc, dict) or not isinstance(doc.get("events"), list):
        raise ScenarioError(f"{where}: expected an object with a list 'events'")
    events = [_parse_event(e, f"{where}: events[{i}]", devices, folder) for i, e in enumerate(doc["events"])]
    return sorted(events, key=lambda ev: ev.at)


def _read_scenario_file(p: Path):
    """The document in a scenario file: YAML for .yaml/.yml, JSON otherwise."""
    try:
        text = p.read_text()
    except OSError as exc:
        raise ScenarioError(f"{p}: cannot read the scenario ({exc.strerror})") from None
    is_yaml = p.suffix.lower() in (".yaml", ".yml")
    parse = _yaml_loader(p) if is_yaml else json.loads
    try:
        return parse(text)
    except Exception as exc:  # noqa: BLE001 - yaml errors are not ValueErrors
        raise ScenarioError(f"{p}: not valid {'YAML' if is_yaml else 'JSON'}: {exc}") from None


def _yaml_loader(p: Path):
    try:
        import yaml
    except ImportError:
        raise ScenarioError(f"{p}: YAML scenarios need PyYAML (pip install pyyaml), or use JSON") from None
    return yaml.safe_load


def _parse_event(e, at: str, devices: list[str], folder: Path | None) -> Event:
    """One checked event; ``at`` names it in errors, ``folder`` resolves a relative flash bundle."""
    if not isinstance(e, dict):
        raise ScenarioError(f"{at}: expected an object")
    kind = e.get("kind")
    if kind not in EVENT_KINDS:
        raise ScenarioError(f"{at}: 'kind' must be one of {', '.join(EVENT_KINDS)}, not {kind!r}")
    t = _event_time(e, at)
    chosen = _event_devices(e, at, devices)
    params = {k: v for k, v in e.items() if k not in ("at", "kind", "devices", "count", "fraction")}
    return Event(t, kind, chosen, _event_params(kind, params, at, folder))


def _event_time(e: dict, at: str) -> float:
    """When an event happens: seconds after the start, a finite number >= 0."""
    try:
        t = float(e.get("at", 0))
    except (TypeError, ValueError):
        t = -1.0
    if not 0 <= t < float("inf"):
        raise ScenarioError(f"{at}: 'at' must be seconds after the start (a number >= 0)")
    return t


def _event_devices(e: dict, at: str, devices: list[str]) -> list[str]:
    """The devices an event names: ``devices``, ``count`` (the first N) or ``fraction``."""
    for key, choose in (("devices", _named_devices), ("count", _first_devices), ("fraction", _share_of_devices)):
        if key in e:
            return choose(e[key], at, devices)
    raise ScenarioError(f"{at}: name the devices with 'devices', 'count' or 'fraction'")


def _named_devices(value, at: str, devices: list[str]) -> list[str]:
    if not isinstance(value, list):
        raise ScenarioError(f"{at}: 'devices' must be a list of device ids")
    chosen = [str(d) for d in value]
    unknown = [d for d in chosen if d not in devices]
    if unknown:
        raise ScenarioError(f"{at}: unknown devices {unknown[:5]} "
                            f"(the fleet has {devices[0]} .. {devices[-1]})")
    return chosen


def _first_devices(count, at: str, devices: list[str]) -> list[str]:
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= len(devices):
        raise ScenarioError(f"{at}: 'count' must be a whole number of devices from 1 to {len(devices)}")
    return devices[:count]


def _share_of_devices(f, at: str, devices: list[str]) -> list[str]:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
        raise ScenarioError(f"{at}: 'fraction' must be a number in (0, 1]")
    return devices[:max(1, round(len(devices) * f))]


def _event_params(kind: str, params: dict, at: str, folder: Path | None) -> dict:
    """An event's parameters, checked for its kind, with the defaults filled in."""
    if kind == "drift":
        _drift_params(params, at)
    elif kind == "offline":
        params.setdefault("seconds", 30.0)
    elif kind == "slow":
        params.setdefault("added_latency_ms", 5.0)
    elif kind == "flash":
        _flash_params(params, at, folder)
    return params


def _drift_params(params: dict, at: str) -> None:
    """A drift names a known shift; its factor defaults to one that a monitor sees."""
    if params.get("shift") not in SHIFTS:
        raise ScenarioError(f"{at}: drift 'shift' must be one of {', '.join(SHIFTS)}")
    params.setdefault("factor", {"scale": 1.6, "offset": 1.5, "noise": 1.0, "missing": 0.3,
                                 "prior": 0.8}[params["shift"]])


def _flash_params(params: dict, at: str, folder: Path | None) -> None:
    """A flash names a bundle; a relative path is taken from the scenario file's folder."""
    if not params.get("bundle"):
        raise ScenarioError(f"{at}: a flash needs 'bundle'")
    b = Path(params["bundle"])
    if not b.is_absolute() and folder is not None:
        params["bundle"] = str((folder / b).resolve())


def feature_indices(spec, names: list[str], n_features: int) -> np.ndarray:
    """Column indices of a drift's ``features`` (names or indices; all columns when empty)."""
    if not spec:
        return np.arange(n_features)
    if not isinstance(spec, list):
        raise ScenarioError(f"drift 'features' must be a list of feature names or indices, not {spec!r}")
    return np.asarray([_feature_index(f, names, n_features) for f in spec])


def _feature_index(f, names: list[str], n_features: int) -> int:
    """The column of one drift feature: an index (a number or digits), else a feature name."""
    if isinstance(f, int) and not isinstance(f, bool) or (isinstance(f, str) and f.isdigit()):
        if not 0 <= int(f) < n_features:
            raise ScenarioError(f"drift feature index {f} is out of range (the data has {n_features} columns)")
        return int(f)
    if f in names:
        return names.index(f)
    raise ScenarioError(f"drift feature {f!r} is not a feature of the data ({', '.join(names[:5])} ...)")


def check_features(events: list[Event], names: list[str], n_features: int) -> None:
    """ScenarioError if a drift event names a feature the replayed data does not have."""
    for i, e in enumerate(events):
        if e.kind == "drift":
            try:
                feature_indices(e.params.get("features"), names, n_features)
            except ScenarioError as exc:
                raise ScenarioError(f"drift event {i} at {e.at:g} s: {exc}") from None


# -- the input stream of one device -------------------------------------------------------------


class DeviceStream:
    """Rows for one device, shuffled per device; drift transforms switch on when an event says so."""

    def __init__(self, X: np.ndarray, y: np.ndarray | None, feature_names: list[str], seed: int,
                 shape: tuple[int, ...] | None = None):
        self.X, self.y, self.names = X, y, feature_names
        self.rng = np.random.default_rng(seed)
        self.shape = shape
        self.mean = np.nanmean(X, axis=0)
        self.std = np.nanstd(X, axis=0) + 1e-6
        self.drift: dict | None = None
        self.stopped = threading.Event()

    def set_drift(self, params: dict) -> None:
        d = dict(params)
        d["idx"] = feature_indices(d.get("features"), self.names, self.X.shape[1])
        if d["shift"] == "prior" and self.y is not None:
            target = int(d.get("target_class", np.unique(self.y)[0]))
            d["pool"] = np.flatnonzero(self.y == target)
        self.drift = d

    def _row_index(self, d: dict | None) -> int:
        """The next row: at random, or under a prior shift a row of the target class for its share of rows."""
        if d is not None and d["shift"] == "prior" and len(d.get("pool", [])):
            share = float(d["factor"])   # this share of rows comes from the target class
            return int(self.rng.choice(d["pool"])) if self.rng.random() < share else int(self.rng.integers(len(self.X)))
        return int(self.rng.integers(len(self.X)))

    def _scale(self, row: np.ndarray, idx: np.ndarray, f: float) -> None:
        row[idx] *= f

    def _offset(self, row: np.ndarray, idx: np.ndarray, f: float) -> None:
        row[idx] += f * self.std[idx]

    def _noise(self, row: np.ndarray, idx: np.ndarray, f: float) -> None:
        row[idx] += self.rng.normal(0, f * self.std[idx]).astype(np.float32)

    def _missing(self, row: np.ndarray, idx: np.ndarray, f: float) -> None:
        row[idx[self.rng.random(len(idx)) < f]] = np.nan

    # how each shift changes a row in place (a prior shift changes which rows come, not their values)
    _SHIFTS = {"scale": _scale, "offset": _offset, "noise": _noise, "missing": _missing}

    def _row(self) -> np.ndarray:
        d = self.drift
        row = self.X[self._row_index(d)].astype(np.float32, copy=True)
        if d is not None and d["shift"] in self._SHIFTS:
            self._SHIFTS[d["shift"]](self, row, d["idx"], float(d["factor"]))
        return row.reshape(self.shape) if self.shape else row

    def __iter__(self):
        while not self.stopped.is_set():
            yield self._row()


# -- a worker process: a group of agents -------------------------------------------------------


def _worker(spec: dict) -> None:
    """Run a group of agents until the duration ends or SIGTERM; print one JSON line per event."""
    from edge_runtime.mqtt import parse_broker_url

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    agents, streams = _start_agents(spec, parse_broker_url(spec["broker"]))
    _emit(event="started", devices=list(agents))
    threads = _drive(agents, streams, spec["rate"])
    schedule = _WorkerSchedule(agents, streams, [Event(**e) for e in spec["events"]], spec["start"],
                               Path(spec["state_root"]) / "control.jsonl")
    _run_schedule(schedule, stop, spec["start"] + spec["duration"] if spec.get("duration") else None)
    schedule.bring_online(list(schedule.offline_until))
    for s in streams.values():
        s.stopped.set()
    for t in threads:
        t.join(timeout=5)
    _emit(event="stopped", stats=_stop_agents(agents))


def _run_schedule(schedule: "_WorkerSchedule", stop: threading.Event, deadline: float | None) -> None:
    """Apply the scenario's events as they fall due, until stopped or the deadline passes."""
    while not stop.is_set() and (deadline is None or time.time() < deadline):
        schedule.step()
        time.sleep(0.1)


def _stop_agents(agents: dict) -> dict:
    """Stop each agent (its spool drained for up to 5 s); per device, inferences, unsent windows, version."""
    stats = {}
    for dev, agent in agents.items():
        left = agent.stop(drain_timeout=5.0)
        stats[dev] = {"inferences": agent.inferences, "unsent_windows": left,
                      "version": agent.recorder.model_info.get("version")}
    return stats


def _plain_params(params: dict) -> dict:
    """An event's parameters that print as plain JSON values (numbers, strings, lists)."""
    return {k: v for k, v in params.items() if isinstance(v, (int, float, str, list))}


def _emit(**kw) -> None:
    """One event of the worker, as a JSON line the fleet reads."""
    print(json.dumps(kw), flush=True)


def _replay_arrays(path: str) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """X, y (None when absent) and the feature names of the fleet's replay file."""
    data = np.load(path)
    X = data["X"]
    y = data["y"] if "y" in data.files else None
    names = json.loads(str(data["names"])) if "names" in data.files else [f"f{i}" for i in range(X.shape[1])]
    return X, y, names


def slow_down(model, seconds: float):
    """An emulated slow device: every inference of ``model`` takes ``seconds`` longer, inside the time the
    model measures (the backend's run is wrapped; the runtime itself has no such knob). 0 undoes it."""
    run = getattr(model, "_emulation_fast_run", None) or model._run
    model._emulation_fast_run = run
    if seconds <= 0:
        model._run = run
        return model

    def slow_run(inputs):
        out = run(inputs)
        time.sleep(seconds)
        return out

    model._run = slow_run
    return model


def _start_agents(spec: dict, address) -> tuple[dict, dict[str, DeviceStream]]:
    """Each device of the group: its bundle slots, its agent (started) and its input stream."""
    import edge_runtime
    from edge_runtime.agent import DeviceAgent, RollbackPolicy
    from edge_runtime.slots import BundleSlots

    X, y, names = _replay_arrays(spec["data"])

    def reload(path):
        return edge_runtime.load(path, public_key=spec.get("public_key"))

    def reload_on(dev: str):
        """A flashed bundle runs as slowly as the device did (a ``slow`` event lasts)."""
        return lambda path: slow_down(reload(path), getattr(agents.get(dev), "emulated_latency_s", 0.0))

    rollback = RollbackPolicy(**spec["rollback"]) if spec.get("rollback") else RollbackPolicy()
    agents, streams = {}, {}
    for k, dev in enumerate(spec["devices"]):
        state = Path(spec["state_root"]) / dev
        slots = BundleSlots(state, public_key=spec.get("public_key"), allow_unsigned=spec.get("allow_unsigned", False))
        model = reload(slots.install_initial(spec["bundle"]))
        shape = tuple(model.input_spec.shape) if len(model.input_spec.shape) > 1 else None
        streams[dev] = DeviceStream(X, y, names, seed=spec["seed"] + k, shape=shape)
        agents[dev] = DeviceAgent(model, dev, spec["fleet"], address, state_dir=state,
                                  window_size=spec["window_size"], window_seconds=None, slots=slots,
                                  reload=reload_on(dev), rollback_policy=rollback,
                                  confirm=spec.get("confirm", "monitor"))
        agents[dev].start()
    return agents, streams


def _drive(agents: dict, streams: dict[str, DeviceStream], rate: float) -> list[threading.Thread]:
    """One thread per device feeding its stream to its agent; a device that fails is reported, not fatal."""
    def drive(dev):
        try:
            agents[dev].run(streams[dev], rate=rate)
        except Exception as exc:  # noqa: BLE001 - one device failing must not stop the others
            _emit(event="device_failed", device=dev, error=str(exc))

    threads = [threading.Thread(target=drive, args=(dev,), daemon=True) for dev in agents]
    for t in threads:
        t.start()
    return threads


class _WorkerSchedule:
    """The events of a worker's devices: the scenario's, and those the fleet injects through the control file.

    Flashes are not here: the fleet sends them over MQTT as an operator would.
    """

    def __init__(self, agents: dict, streams: dict[str, DeviceStream], events: list[Event], t0: float,
                 control: Path):
        self.agents, self.streams, self.t0, self.control = agents, streams, t0, control
        self.pending = [e for e in events if e.kind != "flash"]
        self.control_pos = 0
        self.offline_until: dict[str, float] = {}

    def step(self) -> None:
        """Take the injected events, apply those now due, bring back devices whose outage is over."""
        now = time.time() - self.t0
        self._read_control(now)
        while self.pending and self.pending[0].at <= now:
            self._apply(self.pending.pop(0), now)
        self.bring_online([dev for dev, until in self.offline_until.items() if time.time() >= until], announce=True)

    def _read_control(self, now: float) -> None:
        if not self.control.exists() or self.control.stat().st_size <= self.control_pos:
            return
        with open(self.control) as fh:
            fh.seek(self.control_pos)
            for line in fh:
                if not line.endswith("\n"):
                    break   # a line still being written: next time
                self.control_pos += len(line.encode())
                e = json.loads(line)
                self.pending.append(Event(now, e["kind"], e["devices"], e.get("params") or {}))
        self.pending.sort(key=lambda ev: ev.at)

    def _apply(self, e: Event, now: float) -> None:
        mine = [d for d in e.devices if d in self.agents]
        action = self._ACTIONS.get(e.kind)
        for dev in mine if action is not None else ():
            action(self, dev, e.params)
        if mine:
            _emit(event=e.kind, devices=mine, at=round(now, 1), **_plain_params(e.params))

    def _drift(self, dev: str, params: dict) -> None:
        self.streams[dev].set_drift(params)

    def _slow(self, dev: str, params: dict) -> None:
        agent = self.agents[dev]
        agent.emulated_latency_s = float(params["added_latency_ms"]) / 1000.0
        slow_down(agent.model, agent.emulated_latency_s)

    def _offline(self, dev: str, params: dict) -> None:
        self.agents[dev].link.pause()
        self.offline_until[dev] = time.time() + float(params["seconds"])

    # what an event does to each of this worker's devices it names (a flash goes through the broker instead)
    _ACTIONS = {"drift": _drift, "slow": _slow, "offline": _offline}

    def bring_online(self, devices: list[str], announce: bool = False) -> None:
        for dev in devices:
            self.agents[dev].link.resume()
            del self.offline_until[dev]
            if announce:
                _emit(event="online", devices=[dev], at=round(time.time() - self.t0, 1))


# -- the fleet, from the operator's side ----------------------------------------------------------


def _event_line(line: str) -> dict | None:
    """The event a worker's output line carries (a JSON object with "event"), None for other lines."""
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) and "event" in doc else None


def _flash_all(fl, image, devices: list[str]) -> dict[str, str]:
    """Flash the devices at once; per device, the stage its flash ended at ("no answer" within 120 s)."""
    tids = {d: fl.start_flash(d, image) for d in devices}
    results = {d: fl.final_result(t, 120) for d, t in tids.items()}
    return {d: (r or {}).get("stage", "no answer") for d, r in results.items()}


def _worker_env() -> dict:
    """The environment of a worker process: this checkout importable, TensorFlow quiet."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


class EmulatedFleet:
    """Starts and stops the worker processes of an emulated fleet.

    Args:
        bundle: the bundle every device starts with.
        broker: broker URL the devices report to.
        n_devices: how many devices.
        data: (X, y, feature_names) to replay.
        state_root: one state folder per device under it.
        scenario: events (see :func:`load_scenario`).
        per_process: agents per worker process.
        rate: inferences per second per device.
        window_size: inferences per telemetry window.
        public_key: devices take only bundles this key signed.
        allow_unsigned: without a key, devices take unsigned flashes (otherwise they refuse every flash).
        confirm: when a device forgets a window: "monitor" (confirmed committed, the default) or "broker".
        supervisor: watches the worker processes (with the run's other children); a worker that dies
            makes every wait of the fleet raise :class:`devices.children.ChildProcessDied`.
    """

    def __init__(self, bundle: str | Path, broker: str, n_devices: int, data: tuple, state_root: str | Path,
                 fleet: str = "emulated", scenario: list[Event] | None = None, per_process: int = 10,
                 rate: float = 20.0, window_size: int = 50, duration: float | None = None, prefix: str = "dev",
                 public_key: str | None = None, rollback: dict | None = None, on_event=None, seed: int = 0,
                 allow_unsigned: bool = False, supervisor: Supervisor | None = None, confirm: str = "monitor"):
        self.bundle, self.broker, self.fleet = str(bundle), broker, fleet
        self.devices = device_ids(n_devices, prefix)
        self.state_root = Path(state_root)
        self.scenario = scenario or []
        self.per_process, self.rate, self.window_size, self.duration = per_process, rate, window_size, duration
        self.public_key, self.rollback, self.seed = public_key, rollback, seed
        self.allow_unsigned = allow_unsigned
        self.confirm = confirm
        self.on_event = on_event or (lambda doc: None)
        self.supervisor = supervisor or Supervisor()
        self.procs: list[subprocess.Popen] = []
        self.readers: list[threading.Thread] = []
        self.events: list[dict] = []
        self.stats: dict[str, dict] = {}
        X, y, names = data
        self.feature_names, self.n_features = list(names), np.asarray(X).shape[1]
        self.state_root.mkdir(parents=True, exist_ok=True)
        self.data_file = self.state_root / "replay.npz"
        (self.state_root / "control.jsonl").unlink(missing_ok=True)
        arrays = {"X": np.asarray(X, dtype=np.float32), "names": np.asarray(json.dumps(list(names)))}
        if y is not None:
            arrays["y"] = np.asarray(y)
        np.savez(self.data_file, **arrays)
        self._flasher: threading.Thread | None = None

    def start(self) -> "EmulatedFleet":
        self.t0 = time.time()
        env = _worker_env()
        events = [{"at": e.at, "kind": e.kind, "devices": e.devices, "params": e.params} for e in self.scenario]
        for g in range(0, len(self.devices), self.per_process):
            self._start_worker(self._worker_spec(g, events), env)
        flashes = [e for e in self.scenario if e.kind == "flash"]
        if flashes:
            self._flasher = threading.Thread(target=self._flash_events, args=(flashes,), daemon=True)
            self._flasher.start()
        return self

    def _worker_spec(self, g: int, events: list[dict]) -> dict:
        """What the worker of the device group starting at index g runs."""
        return {"devices": self.devices[g:g + self.per_process], "bundle": self.bundle, "broker": self.broker,
                "fleet": self.fleet, "state_root": str(self.state_root), "data": str(self.data_file),
                "rate": self.rate, "window_size": self.window_size, "duration": self.duration,
                "start": self.t0, "events": events, "seed": self.seed + g, "public_key": self.public_key,
                "allow_unsigned": self.allow_unsigned, "confirm": self.confirm,
                "rollback": self.rollback}

    def _start_worker(self, spec: dict, env: dict) -> None:
        """Start a worker process, read its output on two threads, and have the supervisor watch it."""
        p = subprocess.Popen(python_command(["-m", "devtools.fleet_emulation", json.dumps(spec)]), env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        tail: deque[str] = deque(maxlen=TAIL_LINES)
        readers = [threading.Thread(target=self._read, args=(stream, tail), daemon=True)
                   for stream in (p.stdout, p.stderr)]
        for t in readers:
            t.start()
        self.procs.append(p)
        self.readers += readers
        group = spec["devices"]
        self.supervisor.watch(f"device worker {len(self.procs)} ({group[0]} .. {group[-1]})", p,
                              self._tail_of(readers, tail), may_finish=self.duration is not None)

    @staticmethod
    def _tail_of(readers: list[threading.Thread], tail: deque[str]):
        """The last lines a worker wrote, once its readers have reached the end of its output."""
        def lines() -> list[str]:
            for t in readers:
                t.join(timeout=2)
            return list(tail)
        return lines

    def _read(self, stream, tail: deque[str]) -> None:
        for line in stream:
            line = line.rstrip()
            if not line:
                continue
            doc = _event_line(line)
            if doc is not None:
                self._event(doc)
                continue
            tail.append(line)
            if "WARNING" in line or "ERROR" in line or "Traceback" in line:
                log.warning("device worker: %s", line)

    def _event(self, doc: dict) -> None:
        """Record an event a worker printed (its final device stats, when it stopped) and pass it on."""
        self.events.append(doc)
        if doc["event"] == "stopped":
            self.stats.update(doc["stats"])
        self.on_event(doc)

    def _flash_events(self, flashes: list[Event]) -> None:
        from devices.rollout import BundleImage, FleetLink
        from edge_runtime.mqtt import parse_broker_url

        with FleetLink(parse_broker_url(self.broker), self.fleet) as fl:
            for e in flashes:
                delay = self.t0 + e.at - time.time()
                if delay > 0:
                    time.sleep(delay)
                image = BundleImage.from_path(e.params["bundle"], self.public_key)
                results = _flash_all(fl, image, e.devices)
                doc = {"event": "flashed", "at": round(time.time() - self.t0, 1), "results": results}
                self.events.append(doc)
                self.on_event(doc)

    def inject(self, kind: str, devices: list[str], **params) -> None:
        """Apply an event now (drift, offline, slow) on running devices."""
        ev = load_scenario({"events": [{"kind": kind, "devices": devices, **params}]}, self.devices)[0]
        if ev.kind == "flash":
            raise ScenarioError("flash devices with devices.rollout (edgeops flash), not inject")
        check_features([ev], self.feature_names, self.n_features)
        with open(self.state_root / "control.jsonl", "a") as fh:
            fh.write(json.dumps({"kind": ev.kind, "devices": ev.devices, "params": ev.params}) + "\n")

    def wait_started(self, timeout: float = 120.0) -> bool:
        """True once every device runs, False after ``timeout``; ChildProcessDied if a worker dies first."""
        def started() -> bool:
            return sum(len(e["devices"]) for e in self.events if e.get("event") == "started") >= len(self.devices)
        return self.supervisor.wait(started, timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Until every worker has ended (its duration is over); ChildProcessDied as soon as one dies.

        Returns False if ``timeout`` passes first."""
        ended = self.supervisor.wait(lambda: all(p.poll() is not None for p in self.procs), timeout)
        for t in self.readers:
            t.join(timeout=5)
        return ended

    def stop(self, timeout: float = 30.0) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for t in self.readers:
            t.join(timeout=5)

    def __enter__(self) -> "EmulatedFleet":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _dataset_of(bundle_name: str) -> str:
    """The reference data set a bundle's name mentions; UsageError when it names none."""
    lowered = bundle_name.lower().replace("-", "_")
    dataset = next((d for d in ("breast_cancer", "wine", "digits") if d in lowered), None)
    if dataset is None:
        raise click.UsageError(f"cannot tell which data {bundle_name} takes: give --dataset or --data")
    return dataset


def replay_data(bundle: str | Path, dataset: str | None, data_file: str | None) -> tuple:
    """What the devices replay: --data FILE, --dataset NAME, or the data set the bundle's name suggests."""
    from edge_runtime.bundle import open_bundle

    b = open_bundle(bundle)
    b.cleanup()              # only the manifest is read here
    names = [f["name"] for f in ((b.manifest.get("reference_profile") or {}).get("features") or [])]
    if data_file:
        from edge_runtime.inputs import read_rows

        X = read_rows(Path(data_file), None)
        return X, None, names or [f"f{i}" for i in range(X.shape[1])]
    X, y, data_names = _reference_rows(dataset if dataset is not None else _dataset_of(b.name), b.manifest)
    return X, y, names or data_names


def _reference_rows(dataset: str, manifest: dict) -> tuple:
    """(rows, labels, feature names) of a reference data set, train and test; Digits as flat images for an
    image bundle."""
    from convert.reference import digits_images, load_reference_data

    d = load_reference_data(dataset)
    X = np.concatenate([d.X_train, d.X_test])
    y = np.concatenate([d.y_train, d.y_test])
    inp = (manifest.get("input_schema") or {})
    if dataset == "digits" and inp.get("kind") == "image":
        X = digits_images(X).reshape(len(X), -1)
    return X, y, list(d.feature_names)


@click.command("emulate")
@click.option("--devices", "n_devices", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--bundle", required=True, type=click.Path(exists=True), help="The bundle every device starts with.")
@click.option("--broker", required=True, help="mqtt://host:port")
@click.option("--fleet", default="emulated", show_default=True)
@click.option("--scenario", type=click.Path(exists=True),
              help="Events to inject (JSON or YAML; docs/fleet-emulation.md).")
@click.option("--dataset", type=click.Choice(["breast_cancer", "wine", "digits"]), help="Data to replay.")
@click.option("--data", "data_file", type=click.Path(exists=True), help="Rows to replay (.npy/.npz/.csv).")
@click.option("--rate", type=float, default=20.0, show_default=True, help="Inferences per second per device.")
@click.option("--window-size", type=int, default=50, show_default=True, help="Inferences per telemetry window.")
@click.option("--duration", type=float, help="Stop after S seconds (default: until Ctrl-C).")
@click.option("--per-process", type=click.IntRange(1), default=10, show_default=True, help="Agents per worker process.")
@click.option("--state-root", type=click.Path(), default="fleet-state", show_default=True,
              help="One state folder per device under it.")
@click.option("--device-prefix", default="dev", show_default=True)
@click.option("--public-key", type=click.Path(exists=True), help="Devices refuse bundles this key did not sign.")
@click.option("--allow-unsigned", is_flag=True, help="Devices take flashes of unsigned bundles (no --public-key).")
@click.option("--confirm", type=click.Choice(["monitor", "broker"]), default="monitor", show_default=True,
              help="When devices forget a window: once a monitor confirms it is stored, or at the broker's "
                   "acknowledgement (a fleet without an edgeops monitor).")
@click.option("--json", "as_json", is_flag=True, help="Print the events and final device stats as JSON.")
def emulate_cmd(n_devices, bundle, broker, fleet, scenario, dataset, data_file, rate, window_size, duration,
                per_process, state_root, device_prefix, public_key, allow_unsigned, confirm, as_json):
    """Start N real device agents replaying reference data, with scheduled drift, outages, slowness and flashes."""
    devices = device_ids(n_devices, device_prefix)
    events = load_scenario(scenario, devices)   # ScenarioError: bad input, exit status 3
    data = replay_data(bundle, dataset, data_file)
    check_features(events, list(data[2]), np.asarray(data[0]).shape[1])

    def show(doc):
        if not as_json:
            click.echo(f"[{time.strftime('%H:%M:%S')}] {doc.get('event')}: "
                       + ", ".join(f"{k}={v}" for k, v in doc.items() if k not in ("event", "stats")), err=True)

    fleet_ = EmulatedFleet(bundle, broker, n_devices, data, state_root, fleet=fleet, scenario=events,
                           per_process=per_process, rate=rate, window_size=window_size, duration=duration,
                           prefix=device_prefix, public_key=public_key, on_event=show, allow_unsigned=allow_unsigned,
                           confirm=confirm)
    fleet_.start()
    try:   # a worker that dies stops the run: ChildProcessDied names it and quotes its last lines
        if not fleet_.wait_started():
            raise click.ClickException("the device workers did not start in time; see the messages above")
        fleet_.wait()
    except KeyboardInterrupt:
        click.echo("stopping the emulated fleet", err=True)
    finally:
        fleet_.stop()
    if as_json:
        click.echo(json.dumps({"events": fleet_.events, "stats": fleet_.stats}, indent=2, default=str))
    else:
        total = sum(s["inferences"] for s in fleet_.stats.values())
        click.echo(f"{len(fleet_.stats)} devices, {total} inferences, "
                   f"{sum(s['unsent_windows'] for s in fleet_.stats.values())} windows left unsent")


if __name__ == "__main__":
    from edge_runtime.errors import EdgeOpsError

    try:
        _worker(json.loads(sys.argv[1]))
    except EdgeOpsError as exc:   # a refused bundle, a bad drift: one line for the fleet's error, no traceback
        print(f"edgeops: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)
