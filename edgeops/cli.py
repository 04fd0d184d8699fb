"""The `edgeops` console script.

Each subcommand lives in the package that owns it and is imported only when
it runs, so `edgeops run` on a device never imports the converter (and with
it TensorFlow) and `edgeops --help` stays fast.

Exit codes (documented in README): 0 success, 1 failure, 2 usage error,
3 bad input (missing/corrupt file, invalid data), 4 verification refused
(hash or signature), 5 quality check failed (accuracy drop, health check),
130 interrupted.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from edgeops import __version__

# name -> (module, attribute, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "convert": ("convert.cli", "convert_cmd", "Convert a Keras/scikit-learn/ONNX/TFLite model into a bundle."),
    "keys": ("convert.cli", "keys_group", "Make and show Ed25519 signing keys."),
    "inspect": ("edge_runtime.inspection", "inspect_cmd",
                "Show a bundle's or model file's tensors, sizes, parity and signature."),
    "run": ("edge_runtime.cli", "run_cmd", "Run a bundle on a stream of inputs and report telemetry over MQTT."),
    "serve": ("edge_runtime.cli", "serve_cmd", "Serve a bundle over HTTP (POST /predict)."),
    "bench": ("benchmarks.cli", "bench_cmd", "Benchmark models or bundles on this machine."),
    "monitor": ("telemetry.cli", "monitor_cmd", "Consume fleet telemetry: drift, latency, alerts, metrics, dashboard."),
    "report": ("telemetry.cli", "report_cmd", "Write the one-page fleet report (PNG/HTML) from a monitor database."),
    "export": ("telemetry.cli", "export_cmd", "Export what the monitor holds about an alert, for retraining."),
    "flash": ("devices.cli", "flash_cmd", "Flash a bundle to a device or a fleet (canary, rollback)."),
    "fleet": ("devtools.cli", "fleet_group", "Emulated fleets and emulated devices."),
    "devices": ("devices.cli", "devices_group", "Device inventory and board profiles."),
    "demo": ("edgeops.demo", "demo_cmd", "Run the end-to-end demo on embedded defaults."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = SUBCOMMANDS.get(cmd_name)
        if entry is None:
            return None
        module_name, attr, short = entry
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr)
        except (ImportError, AttributeError) as exc:
            missing = getattr(exc, "name", None) or str(exc)
            if missing == module_name or isinstance(exc, AttributeError):
                reason = "it is not part of this version of edgeops yet"
            else:
                reason = f"it needs {missing}; install the matching extra, e.g. pip install 'edgeops[all]'"

            @click.command(cmd_name, help=short, context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple[str, ...]) -> None:
                raise click.ClickException(f"'edgeops {cmd_name}' is not available: {reason}")

            return unavailable

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # Show help lines without importing every package.
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgeops")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def cli(verbose: int) -> None:
    """edgeops: ship Keras and scikit-learn models to CPU devices and watch them there."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns project errors into one-line messages."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        cli.main(args=argv, prog_name="edgeops", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("edgeops: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("edgeops: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - last line of defence: one line, no traceback
        from edge_runtime.errors import EdgeOpsError

        if isinstance(exc, EdgeOpsError):
            click.echo(f"edgeops: error: {exc}", err=True)
            sys.exit(exc.exit_code)
        if os.environ.get("EDGEOPS_DEBUG"):
            raise
        click.echo(f"edgeops: unexpected error: {type(exc).__name__}: {exc} "
                   "(set EDGEOPS_DEBUG=1 for a traceback)", err=True)
        sys.exit(1)
    sys.exit(0)


if __name__ == "__main__":
    main()
