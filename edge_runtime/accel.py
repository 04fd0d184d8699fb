"""Delegates (LiteRT) and execution providers (ONNX Runtime): what was asked, what ran, and why not.

An :class:`Acceleration` says what a model should run on beyond the plain CPU
kernels: an external LiteRT delegate library (Coral's ``libedgetpu.so.1``, Arm
NN, a vendor NPU) with its options, ONNX Runtime execution providers in order,
and whether LiteRT's default CPU delegate (XNNPACK) is used. When what was
asked is absent or fails to load, the model runs on the CPU and the reason is
kept in an :class:`AccelReport` (and logged on one line); with ``require``, it
is an :class:`~edge_runtime.errors.AcceleratorError` instead (exit code 6).

    >>> parse_delegate("/usr/lib/libedgetpu.so.1:device=usb,performance=max")
    ('/usr/lib/libedgetpu.so.1', {'device': 'usb', 'performance': 'max'})
    >>> parse_provider("openvino:device_type=CPU")
    ('OpenVINOExecutionProvider', {'device_type': 'CPU'})
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import sys
from dataclasses import dataclass, field
from typing import Callable

from edge_runtime.errors import AcceleratorError, InvalidInputError, ModelFormatError

log = logging.getLogger("edgeops.runtime")

CPU_PROVIDER = "CPUExecutionProvider"


def _options(text: str, what: str) -> dict[str, str]:
    """``k=v,k2=v2`` as a dict (InvalidInputError naming ``what`` otherwise)."""
    out: dict[str, str] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidInputError(f"{what}: option {item!r} is not KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def parse_delegate(spec: str) -> tuple[str, dict[str, str]]:
    """``PATH[:k=v,...]`` (a ``--delegate`` value) as (library path, options)."""
    path, _, opts = spec.partition(":")
    if not path.strip():
        raise InvalidInputError(f"--delegate {spec!r}: expected PATH[:KEY=VALUE,...]")
    return path.strip(), _options(opts, f"--delegate {spec!r}")


def parse_provider(spec: str) -> tuple[str, dict[str, str]]:
    """``NAME[:k=v,...]`` (a ``--provider`` value) as (ONNX Runtime provider name, options).

    ``cpu``, ``openvino``, ``xnnpack`` ... stand for ``CPUExecutionProvider`` and so on: the
    name is matched without case and without the ``ExecutionProvider`` suffix against the
    providers ONNX Runtime knows (when it is installed).
    """
    name, _, opts = spec.partition(":")
    name = name.strip()
    if not name:
        raise InvalidInputError(f"--provider {spec!r}: expected NAME[:KEY=VALUE,...]")
    return _canonical_provider(name), _options(opts, f"--provider {spec!r}")


def _canonical_provider(name: str) -> str:
    try:
        import onnxruntime as ort
    except ImportError:
        return name
    short = name.lower().removesuffix("executionprovider")
    for known in ort.get_all_providers():
        if known.lower().removesuffix("executionprovider") == short:
            return known
    return name


@dataclass(frozen=True)
class Acceleration:
    """What to run a model on.

    Attributes:
        delegate: an external LiteRT delegate library (path or a name the dynamic loader finds).
        delegate_options: its options, passed to ``load_delegate`` as strings.
        providers: ONNX Runtime execution providers in order, each (name, options);
            ``CPUExecutionProvider`` is always appended last.
        xnnpack: let LiteRT apply its default CPU delegate, XNNPACK (op resolver BUILTIN);
            False runs the builtin kernels alone (BUILTIN_WITHOUT_DEFAULT_DELEGATES).
        require: refuse to run (AcceleratorError) when the delegate or a provider does not load,
            instead of falling back to the CPU.
    """

    delegate: str | None = None
    delegate_options: dict[str, str] = field(default_factory=dict)
    providers: tuple[tuple[str, dict[str, str]], ...] = ()
    xnnpack: bool = True
    require: bool = False

    @classmethod
    def from_specs(cls, delegate: str | None = None, providers: tuple[str, ...] | list[str] = (),
                   xnnpack: bool = True, require: bool = False) -> Acceleration:
        """From command-line values: ``--delegate PATH[:k=v,...]`` and ``--provider NAME[:k=v,...]``."""
        path, opts = parse_delegate(delegate) if delegate else (None, {})
        return cls(path, opts, tuple(parse_provider(p) for p in providers), xnnpack, require)

    def to_dict(self) -> dict:
        return {"delegate": self.delegate, "delegate_options": dict(self.delegate_options),
                "providers": [[n, dict(o)] for n, o in self.providers], "xnnpack": self.xnnpack,
                "require": self.require}

    @classmethod
    def from_dict(cls, d: dict) -> Acceleration:
        return cls(d.get("delegate"), dict(d.get("delegate_options") or {}),
                   tuple((n, dict(o)) for n, o in d.get("providers") or ()), bool(d.get("xnnpack", True)),
                   bool(d.get("require", False)))


@dataclass(frozen=True)
class AccelReport:
    """What a model actually runs on.

    Attributes:
        delegate: for TFLite, the external delegate library that runs, ``"xnnpack"`` (LiteRT's default
            CPU delegate took nodes of the graph) or ``None`` (builtin CPU kernels only); None for ONNX.
        providers: for ONNX, the session's execution providers in priority order; empty for TFLite.
        fallback: why something asked for does not run (None: everything asked for runs).
        delegated_nodes: graph nodes a delegate took (TFLite; None where the interpreter does not say).
    """

    delegate: str | None = None
    providers: tuple[str, ...] = ()
    fallback: str | None = None
    delegated_nodes: int | None = None

    def to_dict(self) -> dict:
        return {"delegate": self.delegate, "providers": list(self.providers), "fallback": self.fallback,
                "delegated_nodes": self.delegated_nodes}


def report_of(backend) -> AccelReport:
    """The backend's AccelReport (one describing its defaults when it was opened without an Acceleration)."""
    report = getattr(backend, "accel", None)
    if report is not None:
        return report
    if getattr(backend, "name", "") == "onnxruntime":
        return AccelReport(providers=tuple(getattr(backend, "providers", (CPU_PROVIDER,))))
    it = getattr(backend, "_it", None)
    nodes = delegated_nodes(it) if it is not None else None
    return AccelReport(delegate="xnnpack" if nodes else None, delegated_nodes=nodes)


def delegated_nodes(interpreter) -> int | None:
    """How many nodes of the interpreter's graph a delegate runs (None where it cannot tell)."""
    try:
        return sum(1 for op in interpreter._get_ops_details() if op.get("op_name") == "DELEGATE")
    except Exception:  # noqa: BLE001 - a private API of the interpreter: absent or different elsewhere
        return None


def _fail(accel: Acceleration, message: str) -> str:
    """Raise for ``require``; otherwise log the fallback and return its one-line reason."""
    if accel.require:
        raise AcceleratorError(message)
    log.warning("%s; running on the CPU instead", message)
    return message


# -- LiteRT -------------------------------------------------------------------------------------------


def delegate_library_problem(path: str) -> str | None:
    """Why ``path`` cannot be a LiteRT external delegate (None when it looks like one).

    Checked with ctypes before LiteRT sees it: ``load_delegate`` on a library without the
    delegate entry points fails inside its destructor too, printing a traceback.
    """
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        return f"delegate {path} cannot be loaded ({' '.join(str(exc).split())[:200]})"
    missing = [s for s in ("tflite_plugin_create_delegate", "tflite_plugin_destroy_delegate") if not hasattr(lib, s)]
    if missing:
        return f"delegate {path} is not a LiteRT external delegate (no {missing[0]})"
    return None


def _load_delegate_fn(cls) -> Callable | None:
    module = sys.modules.get(cls.__module__)
    fn = getattr(module, "load_delegate", None)
    if fn is None:  # tensorflow.lite keeps it in tf.lite.experimental
        tf = sys.modules.get("tensorflow")
        fn = getattr(getattr(getattr(tf, "lite", None), "experimental", None), "load_delegate", None)
    return fn


def _resolver_kwargs(cls, accel: Acceleration) -> tuple[dict, str | None]:
    """Interpreter keyword arguments that turn XNNPACK off, or why this interpreter cannot."""
    if accel.xnnpack:
        return {}, None
    if "experimental_op_resolver_type" not in inspect.signature(cls).parameters:
        return {}, "this interpreter cannot turn its default delegate (XNNPACK) off"
    resolver = getattr(sys.modules.get(cls.__module__), "OpResolverType", None)
    if resolver is None:
        return {}, "this interpreter has no OpResolverType to turn XNNPACK off"
    return {"experimental_op_resolver_type": resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES}, None


def _delegate_factory(cls, accel: Acceleration) -> tuple[Callable[[], list] | None, str | None]:
    """A function making a fresh delegate for each interpreter, or the reason there is none."""
    load = _load_delegate_fn(cls)
    if load is None:
        return None, f"this interpreter ({cls.__module__}) cannot load external delegates"
    problem = delegate_library_problem(accel.delegate)
    if problem:
        return None, problem
    try:
        first = [load(accel.delegate, dict(accel.delegate_options))]
    except Exception as exc:  # noqa: BLE001 - ValueError/OSError/RuntimeError from the delegate's own code
        text = " ".join(str(exc).split())[:200]
        return None, f"delegate {accel.delegate} failed to load ({type(exc).__name__}: {text})"
    made = iter([first])

    def make() -> list:
        # one delegate instance per interpreter (an Edge TPU delegate holds a device context)
        return next(made, None) or [load(accel.delegate, dict(accel.delegate_options))]

    return make, None


def _tflite_delegate(cls, accel: Acceleration, notes: list[str]):
    """The factory of the requested delegate, or None (no delegate asked, or it failed: noted)."""
    if not accel.delegate:
        return None
    make, problem = _delegate_factory(cls, accel)
    if problem:
        notes.append(_fail(accel, problem))
    return make


def open_tflite(data: bytes, where: str, threads: int | None, interpreter: tuple, accel: Acceleration):
    """A TFLiteBackend with ``accel`` applied where it loads, CPU otherwise; its ``accel`` says which.

    Args:
        data: the model's bytes.
        where: the model's path, for messages.
        threads: interpreter threads (XNNPACK's too).
        interpreter: (Interpreter class, backend name, version), as ``tflite_interpreter_class`` returns.
        accel: what to run on.
    """
    from edge_runtime.backends.tflite import TFLiteBackend

    cls, name, version = interpreter
    notes = []
    base, problem = _resolver_kwargs(cls, accel)
    if problem:
        notes.append(_fail(accel, problem))
    make = _tflite_delegate(cls, accel, notes)
    if make is not None:
        try:
            backend = TFLiteBackend(data, where, threads, cls, name, version,
                                    interpreter_kwargs=lambda: {**base, "experimental_delegates": make()})
        except ModelFormatError as exc:
            notes.append(_fail(accel, f"delegate {accel.delegate} could not be applied to {where} ({exc})"))
        else:
            nodes = delegated_nodes(backend._it)
            backend.accel = AccelReport(accel.delegate, (), "; ".join(notes) or None, nodes)
            log.info("%s runs with delegate %s", where, accel.delegate)
            return backend
    backend = TFLiteBackend(data, where, threads, cls, name, version, interpreter_kwargs=lambda: dict(base))
    nodes = delegated_nodes(backend._it)
    backend.accel = AccelReport("xnnpack" if nodes else None, (), "; ".join(notes) or None, nodes)
    log.info("%s runs on the CPU (%s)", where, "XNNPACK" if nodes else "builtin kernels")
    return backend


# -- ONNX Runtime -------------------------------------------------------------------------------------


def _provider_choice(pname: str, opts) -> str | tuple[str, dict]:
    """A provider as ONNX Runtime is asked for it: its name, with its options when it has some."""
    return (pname, dict(opts)) if opts else pname


def _chosen_providers(ort, accel: Acceleration) -> tuple[list, list[str]]:
    """The providers to ask ONNX Runtime for (CPU last) and the notes about those this build lacks."""
    known, available = ort.get_all_providers(), ort.get_available_providers()
    chosen, notes = [], []
    for pname, opts in accel.providers:
        if pname not in known:
            raise InvalidInputError(f"--provider {pname}: ONNX Runtime {ort.__version__} knows no such provider; "
                                    f"available here: {', '.join(available)}")
        if pname not in available:
            notes.append(_fail(accel, f"provider {pname} is not in this ONNX Runtime build "
                                      f"(available: {', '.join(available)})"))
        elif pname != CPU_PROVIDER:
            chosen.append(_provider_choice(pname, opts))
    cpu_opts = next((dict(o) for n, o in accel.providers if n == CPU_PROVIDER and o), None)
    chosen.append((CPU_PROVIDER, cpu_opts) if cpu_opts else CPU_PROVIDER)
    return chosen, notes


def _provider_name(choice) -> str:
    """The name of a provider as ONNX Runtime is asked for it: a name, or (name, options)."""
    return choice if isinstance(choice, str) else choice[0]


def _onnx_session(data: bytes, where: str, threads: int | None, chosen: list, accel: Acceleration,
                  notes: list[str]):
    """An OnnxRuntimeBackend on the chosen providers, else (noted) on the default ones."""
    from edge_runtime.backends.onnx import OnnxRuntimeBackend

    try:
        return OnnxRuntimeBackend(data, where, threads, providers=chosen)
    except ModelFormatError as exc:
        if chosen == [CPU_PROVIDER]:
            raise
        notes.append(_fail(accel, f"providers {[_provider_name(c) for c in chosen]} failed ({exc})"))
        return OnnxRuntimeBackend(data, where, threads)


def open_onnx(data: bytes, where: str, threads: int | None, accel: Acceleration):
    """An OnnxRuntimeBackend on the requested providers that load (CPU always last); its ``accel`` says which."""
    from edge_runtime.backends.onnx import OnnxRuntimeBackend

    try:
        import onnxruntime as ort
    except ImportError:
        return OnnxRuntimeBackend(data, where, threads)  # raises BackendUnavailableError
    chosen, notes = _chosen_providers(ort, accel)
    backend = _onnx_session(data, where, threads, chosen, accel, notes)
    actual = tuple(backend.providers)
    for pname in (_provider_name(c) for c in chosen):
        if pname not in actual:
            notes.append(_fail(accel, f"provider {pname} did not initialise (the session runs on {', '.join(actual)})"))
    if accel.delegate:
        notes.append(f"delegate {accel.delegate} applies to TFLite models, not to {where} (ONNX)")
    backend.accel = AccelReport(None, actual, "; ".join(notes) or None, None)
    log.info("%s runs on %s", where, ", ".join(actual))
    return backend
