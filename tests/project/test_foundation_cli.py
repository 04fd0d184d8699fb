"""The `edgeops` dispatcher: help without heavy imports, usage errors, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


def run_edgeops(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeops", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_subcommand_without_importing_the_converter():
    code = (
        "import sys, json\n"
        "from edgeops.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    rc = e.code\n"
        "heavy = [m for m in ('tensorflow', 'keras', 'sklearn', 'convert', 'telemetry') if m in sys.modules]\n"
        "print(json.dumps({'rc': rc, 'heavy': heavy}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "heavy": []}
    for name in ("convert", "inspect", "run", "serve", "bench", "monitor", "report", "flash", "fleet", "demo"):
        assert f"  {name} " in out.stdout


def test_unknown_subcommand_is_a_usage_error():
    res = run_edgeops("frobnicate")
    assert res.returncode == 2
    assert "No such command" in res.stderr
    assert "Traceback" not in res.stderr


def test_version():
    res = run_edgeops("--version")
    assert res.returncode == 0 and "edgeops" in res.stdout
