"""Peak memory of the device agent: `edgeops run` on the Digits int8 bundle, paho and LiteRT loaded.

    python -m benchmarks.agent_rss [--json FILE] [--seconds S] [--bundle DIR]

Starts a private Mosquitto, runs the agent for a few seconds at 200
inferences/s with 1-second windows, and reads the agent process's peak
resident set (VmHWM) from /proc. Target: at most 80 MB.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json


def vm_value(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def _bundle(arg: str | None, work: Path) -> Path:
    """The bundle given, else the Digits CNN reference model (float and int8 TFLite) converted into work."""
    if arg:
        return Path(arg)
    from convert.reference import convert_reference

    bundle = work / "digits-cnn"
    convert_reference("cnn", "digits", bundle, quantize=("none", "int8"), formats=("tflite",))
    return bundle


def _watch_memory(proc: subprocess.Popen) -> tuple[float, float]:
    """(peak, last) resident MB of a process, read every 100 ms until it ends."""
    peak, rss = 0.0, 0.0
    while proc.poll() is None:
        peak = max(peak, vm_value(proc.pid, "VmHWM") or 0.0)
        rss = vm_value(proc.pid, "VmRSS") or rss
        time.sleep(0.1)
    return peak, rss


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results as JSON to this file")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--bundle", help="bundle to run (default: convert the Digits CNN reference model, int8)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from devtools.brokers import MosquittoBroker

    work = Path(tempfile.mkdtemp(prefix="edgeops-rss-"))
    atexit.register(shutil.rmtree, work, True)      # bundle, inputs, broker and state, whatever way it ends
    bundle = _bundle(args.bundle, work)
    from convert.reference import digits_images, load_reference_data

    np.save(work / "inputs.npy", digits_images(load_reference_data("digits").X_test))
    with MosquittoBroker(workdir=work / "broker") as broker:
        cmd = [sys.executable, "-m", "edgeops", "run", str(bundle), "--device-id", "rss-probe", "--broker", broker.url,
               "--input", str(work / "inputs.npy"), "--loop", "--rate", "200", "--window-seconds", "1",
               "--duration", str(args.seconds), "--state-dir", str(work / "state")]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        peak, rss = _watch_memory(proc)
        err = proc.stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"the agent failed: {err[-500:]}")
    row = {"bundle": bundle.name, "artifact": "model.int8.tflite", "seconds": args.seconds, "rate": 200,
           "peak_rss_mb": round(peak, 1), "last_rss_mb": round(rss, 1), "target_mb": 80, "met": peak <= 80}
    print_table([row], [("bundle", "bundle"), ("artifact", "artifact"), ("seconds", "seconds"), ("rate", "inf/s"),
                        ("peak_rss_mb", "peak RSS MB (VmHWM)"), ("last_rss_mb", "RSS at end MB"),
                        ("target_mb", "target MB"), ("met", "met")],
                title="edgeops run: peak resident memory of the agent process")
    doc = {"result": row}
    write_json(args.json, doc)
    return doc


if __name__ == "__main__":
    main()
