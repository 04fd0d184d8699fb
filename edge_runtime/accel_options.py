"""The command-line options of edge_runtime.accel, shared by `edgeops run`, `serve` and `bench`."""

from __future__ import annotations

import functools

import click

from edge_runtime.accel import Acceleration


def accel_options(f):
    """Add --delegate, --provider, --require-delegate and --xnnpack/--no-xnnpack, passed on as one ``accel``.

    ``accel`` is None when none of them is given (the backends' defaults: XNNPACK on the CPU for
    TFLite, the CPU provider for ONNX).
    """

    @functools.wraps(f)
    def wrapper(*args, delegate, providers, require_delegate, xnnpack, **kwargs):
        accel = None
        if delegate or providers or not xnnpack or require_delegate:
            accel = Acceleration.from_specs(delegate, providers, xnnpack, require_delegate)
        return f(*args, accel=accel, **kwargs)

    for opt in reversed([
        click.option("--delegate", metavar="PATH[:K=V,...]",
                     help="A LiteRT external delegate library and its options (e.g. libedgetpu.so.1); "
                          "TFLite models fall back to the CPU when it does not load."),
        click.option("--provider", "providers", multiple=True, metavar="NAME[:K=V,...]",
                     help="An ONNX Runtime execution provider and its options (repeatable, in order; "
                          "CPUExecutionProvider is always last)."),
        click.option("--require-delegate", is_flag=True,
                     help="Fail (exit code 6) instead of falling back to the CPU when the delegate or a "
                          "provider does not load."),
        click.option("--xnnpack/--no-xnnpack", default=True, show_default=True,
                     help="LiteRT's default CPU delegate (XNNPACK); --no-xnnpack runs the builtin kernels alone."),
    ]):
        wrapper = opt(wrapper)
    return wrapper
