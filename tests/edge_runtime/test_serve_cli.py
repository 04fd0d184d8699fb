"""`edgeops serve` from the command line: limits are options, and SIGTERM stops it cleanly."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading

from helpers import eventually
from helpers.serve_helpers import call


def test_the_command_serves_with_its_limits_and_stops_on_sigterm(bc_mlp_bundle):
    proc = subprocess.Popen([sys.executable, "-m", "edgeops.cli", "serve", str(bc_mlp_bundle), "--port", "0",
                             "--max-batch", "4"], stderr=subprocess.PIPE, text=True)
    log: list[str] = []
    threading.Thread(target=lambda: log.extend(proc.stderr), daemon=True).start()
    try:
        assert eventually(lambda: any("running on http" in line for line in log) or proc.poll() is not None, 60)
        url = re.search(r"running on (http://[\d.]+:\d+)", "".join(log)).group(1)
        assert call(url + "/predict", {"inputs": [[0.0] * 30] * 4})[0] == 200
        status, body = call(url + "/predict", {"inputs": [[0.0] * 30] * 5})
        assert status == 413 and "--max-batch" in body["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


def test_limits_that_cannot_work_are_a_usage_error(bc_mlp_bundle):
    out = subprocess.run([sys.executable, "-m", "edgeops.cli", "serve", str(bc_mlp_bundle), "--max-body-bytes",
                          "1000", "--max-in-flight-bytes", "10"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 2 and "max_in_flight_bytes (10) is below max_body_bytes (1000)" in out.stderr
