"""`edgeops bench`: speed, memory and accuracy of models and bundles, side by side."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import click

from edge_runtime.accel_options import accel_options
from edge_runtime.errors import EdgeOpsError, InvalidInputError

QUANTIZED = ("int8", "int16x8", "dynamic", "static", "float16")


def expand(paths: tuple[str, ...], artifact: str | None) -> list[dict]:
    """Model files to benchmark: bare files as given; bundles give each artifact (or --artifact)."""
    from edge_runtime.bundle import open_bundle

    items = []
    for raw in paths:
        p = Path(raw)
        if _is_model_file(p):
            items.append({"path": p, "bundle": None, "artifact": None})
            continue
        bundle = open_bundle(p)
        arts = [bundle.artifact(artifact)] if artifact else bundle.artifacts
        items += [{"path": bundle.root / a["file"], "bundle": bundle, "artifact": a} for a in arts]
    return items


def _is_model_file(p: Path) -> bool:
    """True for a bare .tflite/.onnx file, False for a bundle (directory or .tar.gz); InvalidInputError else."""
    if not p.exists():
        raise InvalidInputError(f"{p}: no such file or directory")
    if p.is_file() and p.suffix.lower() in (".tflite", ".onnx"):
        return True
    if p.is_file() and not p.name.endswith((".tar.gz", ".tgz")):
        raise InvalidInputError(f"{p}: not a model (.tflite, .onnx) or a bundle (directory or .tar.gz)")
    return False


def measure_in_child(path: Path, opts: dict) -> dict:
    """Run one measurement in a fresh interpreter so that init time and peak RSS are this artifact's alone."""
    args = json.dumps({"path": str(path), **opts})
    # -P: the child never imports packages from the current folder in place of this installation
    res = subprocess.run([sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "benchmarks.runner",
                          args], capture_output=True, text=True, env=_child_env(), timeout=3600)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    if res.returncode != 0 or not lines:
        tail = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise EdgeOpsError(f"{path.name}: the benchmark process failed ({tail})")
    return _child_result(json.loads(lines[-1]))


def _child_env() -> dict:
    """This environment, with this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _child_result(doc: dict) -> dict:
    """The measurement a child printed, or the error it reported (with its exit code) raised here."""
    if "error" in doc:
        err = InvalidInputError(doc["error"])
        err.exit_code = doc.get("exit_code", 3)
        raise err
    return doc["ok"]


def _load_for_accuracy(item: dict, threads: int | None):
    import edge_runtime

    if item["bundle"] is not None:
        return edge_runtime.load(item["bundle"].root, artifact=item["artifact"]["file"], threads=threads)
    return edge_runtime.load(item["path"], threads=threads)


def _predicted_classes(out):
    """Class indices from model outputs: a threshold at 0.5 for one score, the argmax otherwise."""
    import numpy as np

    if out.ndim == 1 or out.shape[-1] == 1:
        return (out.reshape(-1) > 0.5).astype(np.int64)
    return out.argmax(axis=1)


def _label_indices(y, labels):
    """The labels y as class indices: names are looked up in the model's labels (-1 when unknown)."""
    import numpy as np

    y = np.asarray(y)
    if labels and y.dtype.kind not in "iu":
        lookup = {str(label): i for i, label in enumerate(labels)}
        y = np.array([lookup.get(str(v), -1) for v in y])
    return y


def accuracy(item: dict, X, y, threads: int | None) -> float | None:
    import numpy as np

    from benchmarks.datasets import to_model_inputs

    model = _load_for_accuracy(item, threads)
    Xm = to_model_inputs(X, model.manifest, model.input_spec.shape)
    pred = _predicted_classes(model.predict(Xm))
    y = _label_indices(y, model.labels)
    return round(float((pred == y.astype(np.int64)).mean()), 6)


def _fill_ratios(results: list[dict]) -> None:
    """Speed-up and size ratio of each result against the first; no result recommended yet."""
    base = results[0]
    for r in results:
        p50 = r["latency_ms"]["p50"]
        r["speedup_vs_first"] = round(base["latency_ms"]["p50"] / p50, 3) if p50 else None
        r["size_ratio_vs_first"] = round(r["model_bytes"] / base["model_bytes"], 4)
        r["recommended"] = False


def _within_budget(results: list[dict], budget: float) -> list[dict]:
    """The results whose accuracy is within budget points of the best (all of them when none has an accuracy)."""
    accs = [r["accuracy"] for r in results if r.get("accuracy") is not None]
    if not accs:
        return results
    best = max(accs)
    return [r for r in results if r.get("accuracy") is not None and (best - r["accuracy"]) * 100 <= budget]


def _float_originals(r: dict, results: list[dict]) -> list[dict]:
    """The unquantized results of the same bundle and format as r."""
    return [o for o in results if o.get("bundle") == r.get("bundle") and o.get("format") == r.get("format")
            and o.get("quantization") == "none"]


def _slower_than_float(r: dict, results: list[dict]) -> str | None:
    """A warning when the quantized result r is slower than its float original, else None."""
    q = r.get("quantization")
    if q not in QUANTIZED:
        return None
    floats = _float_originals(r, results)
    # 5% slack: below that, "slower" is noise on a shared CPU
    if not floats or r["latency_ms"]["p50"] <= 1.05 * floats[0]["latency_ms"]["p50"]:
        return None
    ratio = r["latency_ms"]["p50"] / floats[0]["latency_ms"]["p50"]
    return (f"{Path(r['artifact']).name} ({q}) is {ratio:.2f}x SLOWER than its float original "
            f"{Path(floats[0]['artifact']).name} on this CPU: quantization saves size here, "
            "not time")


def compare(results: list[dict], budget: float) -> list[str]:
    """Fill speed-up and size ratio against the first result, mark the pick, and return warnings."""
    _fill_ratios(results)
    eligible = _within_budget(results, budget)
    if eligible:
        min(eligible, key=lambda r: r["latency_ms"]["p50"])["recommended"] = True
    return [w for w in (_slower_than_float(r, results) for r in results) if w is not None]


TABLE_COLUMNS = ["artifact", "backend", "runs on", "size KB", "init ms", "first ms", "p50 ms", "p90 ms", "p99 ms",
                 "mean±std ms", "inf/s", "RSS MB", "accuracy", "speed-up", "size x"]


def _table_title(results: list[dict], machine: dict) -> str:
    bundles = sorted({r["bundle"] for r in results if r.get("bundle")})
    return (f"edgeops bench{' ' + ', '.join(bundles) if bundles else ''} on {machine['cpu']} "
            f"({machine['arch']}, {machine['cores']} cores"
            + (f", {machine['board']}" if machine.get("board") else "") + ")")


def _runs_on(r: dict) -> str:
    return r.get("delegate") or r.get("provider") or "cpu"


def _accuracy_cell(r: dict) -> str:
    return "-" if r.get("accuracy") is None else f"{r['accuracy'] * 100:.2f}%"


def _speedup_cell(r: dict) -> str:
    return f"{r['speedup_vs_first']:.2f}x" if r.get("speedup_vs_first") else "-"


def _table_row(r: dict) -> list[str]:
    lat = r["latency_ms"]
    return [
        ("* " if r.get("recommended") else "  ") + Path(r["artifact"]).name, r["backend"], _runs_on(r),
        f"{r['model_bytes'] / 1024:.1f}", f"{r['init_ms']:.1f}", f"{r['first_ms']:.3f}",
        f"{lat['p50']:.4f}", f"{lat['p90']:.4f}", f"{lat['p99']:.4f}", f"{lat['mean']:.4f}±{lat['std']:.4f}",
        f"{r['throughput_ips']:.0f}", f"{r['peak_rss_mb']}", _accuracy_cell(r), _speedup_cell(r),
        f"{r['size_ratio_vs_first']:.2f}",
    ]


def _table_footer(results: list[dict]) -> str:
    versions = ", ".join(sorted({f"{r['backend']} {r['backend_version']}" for r in results}))
    first = results[0]
    return (f"{first['latency_ms']['runs']} measured runs per artifact after {first['warmup']['runs']} warm-up, "
            f"batch {first['batch']}, threads {first['threads'] or 'default'}; {versions}; "
            "speed-up and size against the first row; * = fastest within the accuracy budget")


def _fallback_notes(results: list[dict]) -> list[str]:
    return [f"note: {Path(r['artifact']).name}: {r['accelerator']['fallback']}; "
            f"ran on {r.get('delegate') or r.get('provider') or 'the builtin CPU kernels'}"
            for r in results if (r.get("accelerator") or {}).get("fallback")]


def render_table(results: list[dict], machine: dict, warnings: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    table = Table(title=_table_title(results, machine))
    for c in TABLE_COLUMNS:
        table.add_column(c, justify="left" if c in ("artifact", "backend") else "right", no_wrap=True)
    for r in results:
        table.add_row(*_table_row(r))
    console.print(table)
    console.print(_table_footer(results))
    for note in _fallback_notes(results):
        console.print(note)
    for w in warnings:
        console.print(f"warning: {w}")


@click.command("bench")
@click.argument("paths", nargs=-1, required=True)
@click.option("--runs", default=100, show_default=True, type=click.IntRange(1), help="Measured runs per artifact.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0), help="Warm-up runs, reported apart.")
@click.option("--duration", type=float, help="Also measure for at least S seconds.")
@click.option("--threads", type=int, help="Inference threads (default: the backend's).")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1),
              help="Size of a dynamic batch dimension.")
@click.option("--input-shape", "input_shape", multiple=True, help="NAME=D1,D2,... for inputs with dynamic dimensions.")
@click.option("--artifact", help="Benchmark only this artifact of each bundle.")
@click.option("--data", type=click.Path(), help="Labelled data (.npz X,y or .csv label last) for accuracy.")
@click.option("--dataset", type=click.Choice(["digits", "wine", "breast_cancer"]),
              help="A bundled data set for accuracy.")
@click.option("--accuracy-budget", default=1.0, show_default=True,
              help="Points of accuracy the pick may lose to the best.")
@click.option("--json", "json_out", help="Write results as JSON to FILE ('-' for stdout).")
@click.option("--csv", "csv_out", type=click.Path(), help="Write one row per artifact to FILE.")
@click.option("--publish", help="Send the result to mqtt://host:port on edgeops/<fleet>/<device>/bench.")
@click.option("--device-id", default=lambda: os.uname().nodename.split(".")[0], help="Device id for --publish.")
@click.option("--fleet", default="default", show_default=True, help="Fleet for --publish.")
@click.option("--store-profile", help="Also store the results against this board profile (for flash latency budgets).")
@click.option("--in-process", is_flag=True, help="Measure in this process (faster; init time and RSS then accumulate).")
@click.option("--profile", "board", help="A board profile: use the delegate it names (unless --delegate is given), "
                                         "with a fallback to the CPU.")
@accel_options
def bench_cmd(paths, runs, warmup, duration, threads, batch, input_shape, artifact, data, dataset, accuracy_budget,
              json_out, csv_out, publish, device_id, fleet, store_profile, in_process, board, accel):
    """Benchmark PATHS (.tflite, .onnx, bundle dirs or .tar.gz) on this machine."""
    if store_profile:
        from devices.boards import get_profile

        get_profile(store_profile)
    from benchmarks.machine import machine_info
    from benchmarks.runner import parse_input_shapes

    shapes = parse_input_shapes(input_shape)
    accel = board_acceleration(board, accel)
    items = expand(paths, artifact)
    _cleanup_bundles_on_close(items)
    labelled = _labelled_data(data, dataset)
    settings = {"runs": runs, "warmup": warmup, "duration": duration, "threads": threads, "batch": batch}
    measure_one = _measurer(in_process, settings, shapes, accel)
    results = _measure_all(items, measure_one, labelled, threads, show_progress=sys.stderr.isatty() and json_out != "-")
    warnings = compare(results, accuracy_budget)
    machine = machine_info()
    doc = {"schema_version": 1, "machine": machine, "profile": board, "data": labelled[2] if labelled else None,
           "accuracy_budget_points": accuracy_budget, "warnings": warnings,
           "results": [{**r, "machine": machine} for r in results]}
    _write_outputs(doc, results, machine, warnings, json_out, csv_out)
    if publish:
        publish_result(publish, fleet, device_id, doc)
    if store_profile:
        from devices.boards import store_results

        where = store_results(store_profile, items, results)
        click.echo(f"stored against profile {store_profile} in {where}", err=True)


def _cleanup_bundles_on_close(items: list[dict]) -> None:
    """A .tar.gz bundle was unpacked into a temporary folder: removed when the command ends, however it ends."""
    click.get_current_context().call_on_close(lambda: [b.cleanup() for b in {id(i["bundle"]): i["bundle"]
                                                                          for i in items if i["bundle"]}.values()])


def _labelled_data(data, dataset):
    """(X, y, description) for accuracy, or None when neither --data nor --dataset is given."""
    if not (data or dataset):
        return None
    from benchmarks.datasets import load_labelled

    return load_labelled(data, dataset)


def _measurer(in_process: bool, settings: dict, shapes: dict, accel):
    """The function measuring one model file: in this process, or in a fresh interpreter."""
    if in_process:
        from benchmarks.runner import measure

        return lambda path: measure(path, **settings, input_shapes=shapes, accel=accel)
    opts = {**settings, "input_shapes": {k: list(v) for k, v in shapes.items()}, "accel": accel.to_dict()}
    return lambda path: measure_in_child(path, opts)


def _describe_item(r: dict, item: dict, labelled, threads) -> dict:
    """Add the bundle, its version, the quantization and the accuracy of item to its measurement r."""
    r["bundle"] = item["bundle"].name if item["bundle"] else None
    r["bundle_version"] = item["bundle"].version if item["bundle"] else None
    r["quantization"] = item["artifact"]["quantization"] if item["artifact"] else None
    r["accuracy"] = accuracy(item, labelled[0], labelled[1], threads) if labelled else None
    return r


def _measure_all(items: list[dict], measure_one, labelled, threads, show_progress: bool) -> list[dict]:
    from rich.progress import Progress

    results = []
    with Progress(transient=True, disable=not show_progress) as progress:
        task = progress.add_task("benchmarking", total=len(items))
        for item in items:
            progress.update(task, description=f"benchmarking {item['path'].name}")
            results.append(_describe_item(measure_one(item["path"]), item, labelled, threads))
            progress.advance(task)
    return results


def _write_outputs(doc: dict, results: list[dict], machine: dict, warnings: list[str], json_out, csv_out) -> None:
    """The JSON document on stdout ('-'), or the table (and the JSON file); the CSV file."""
    if json_out == "-":
        click.echo(json.dumps(doc, indent=2))
    else:
        render_table(results, machine, warnings)
        if json_out:
            Path(json_out).write_text(json.dumps(doc, indent=2) + "\n")
    if csv_out:
        write_csv(csv_out, results)


def board_acceleration(board: str | None, accel):
    """The Acceleration to measure with: the options given, completed by the board profile's delegate/providers."""
    from edge_runtime.accel import Acceleration

    accel = accel or Acceleration()
    if not board:
        return accel
    from devices.boards import get_profile

    return _with_profile(accel, get_profile(board))


def _with_profile(accel, profile):
    """The profile's delegate and providers where accel names none."""
    from dataclasses import replace

    from edge_runtime.accel import Acceleration

    if profile.delegate and not accel.delegate:
        accel = replace(accel, delegate=Acceleration.from_specs(profile.delegate).delegate,
                        delegate_options=Acceleration.from_specs(profile.delegate).delegate_options)
    if profile.providers and not accel.providers:
        accel = replace(accel, providers=Acceleration.from_specs(providers=profile.providers).providers)
    return accel


def write_csv(path: str, results: list[dict]) -> None:
    fields = ["artifact", "bundle", "quantization", "backend", "backend_version", "threads", "batch", "model_bytes",
              "delegate", "provider", "accelerator_fallback",
              "init_ms", "first_ms", "mean", "std", "min", "p50", "p90", "p99", "max", "runs", "throughput_ips",
              "peak_rss_mb", "accuracy", "speedup_vs_first", "size_ratio_vs_first", "recommended"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({**r, **r["latency_ms"], "accelerator_fallback": (r.get("accelerator") or {}).get("fallback")})


def publish_result(url: str, fleet: str, device_id: str, doc: dict, prefix: str = "edgeops") -> None:
    """Send a bench result (QoS 1) to <prefix>/<fleet>/<device>/bench and wait for the broker's ack."""
    from edge_runtime import wire
    from edge_runtime.mqtt import connect_args, make_client, parse_broker_url
    from edge_runtime.state import check_id

    check_id(device_id, "device id")
    check_id(fleet, "fleet")
    addr = parse_broker_url(url)
    client = make_client(addr, f"edgeops-bench-{device_id}", session_expiry=0)
    try:
        client.connect(**connect_args(addr, session_expiry=0))
    except OSError as exc:
        raise EdgeOpsError(f"--publish {url}: cannot reach the broker ({exc})") from None
    client.loop_start()
    payload = {**doc, "type": "bench", "device_id": device_id, "fleet": fleet}
    info = client.publish(wire.topic(prefix, fleet, device_id, "bench"), wire.encode(payload), qos=1)
    try:
        info.wait_for_publish(timeout=10)
    finally:
        client.loop_stop()
        client.disconnect()
    if not info.is_published():
        raise EdgeOpsError(f"--publish {url}: the broker did not acknowledge the result within 10 s")
    click.echo(f"published to {addr.url} {wire.topic(prefix, fleet, device_id, 'bench')}", err=True)
