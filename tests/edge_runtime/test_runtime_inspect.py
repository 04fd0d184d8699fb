"""`edgeops inspect` on bundles and bare files, text and JSON, signature status."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from edge_runtime import signing
from edge_runtime.bundle import write_manifest


def inspect(*args):
    return subprocess.run([sys.executable, "-m", "edgeops", "inspect", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_inspect_a_bundle_as_text_and_json(bc_mlp_bundle):
    res = inspect(bc_mlp_bundle)
    assert res.returncode == 0, res.stderr
    assert "breast-cancer-mlp 1.0.0" in res.stdout and "*model.int8.tflite" in res.stdout
    assert "q(scale=" in res.stdout
    info = json.loads(inspect(bc_mlp_bundle, "--json").stdout)
    assert info["hashes"] == "verified" and info["signature"] == "unsigned"
    int8 = next(a for a in info["artifacts"] if a["file"] == "model.int8.tflite")
    assert int8["inputs"][0]["quantization"]["scale"] > 0 and int8["parity"]["metric"] == "accuracy"


def test_inspect_a_bare_model_file(digits_cnn_bundle):
    info = json.loads(inspect(digits_cnn_bundle / "model.int8.tflite", "--json").stdout)
    assert info["kind"] == "model"
    assert info["inputs"][0]["dtype"] == "int8" and info["inputs"][0]["shape"] == [-1, 8, 8, 1]


def test_inspect_reports_signature_status(tmp_path, bc_rf_bundle):
    copy = tmp_path / "b"
    shutil.copytree(bc_rf_bundle, copy)
    key, pub = signing.generate_key_pair(tmp_path / "k")
    _, other_pub = signing.generate_key_pair(tmp_path / "o")
    write_manifest(copy, json.loads((copy / "manifest.json").read_text()), sign_key=key)
    assert json.loads(inspect(copy, "--json", "--public-key", pub).stdout)["signature"] == "verified"
    bad = inspect(copy, "--public-key", other_pub)
    assert bad.returncode == 4 and "signature INVALID" in bad.stderr and "Traceback" not in bad.stderr


def test_inspect_a_missing_path_is_a_one_line_error(tmp_path):
    res = inspect(tmp_path / "nothing")
    assert res.returncode == 3 and res.stderr.strip().startswith("edgeops: error:") and "Traceback" not in res.stderr
