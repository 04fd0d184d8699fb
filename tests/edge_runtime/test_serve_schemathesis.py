"""`edgeops serve` against its own OpenAPI description: property-based requests, valid and invalid.

Schemathesis generates bodies from /openapi.json (and bodies that violate it) and checks
that the server never answers 5xx, answers only documented statuses and content types,
that its answers match their schemas, and that invalid bodies are refused with a 4xx.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers.serve_helpers import served

# A refused invalid body may be 413 (over a limit, e.g. a batch over --max-batch) or 408 as well.
CONFIG = """
[checks.negative_data_rejection]
expected-statuses = [400, 405, 408, 413, 415, 422]
"""


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["bc_mlp_bundle", "digits_cnn_bundle"])
def test_the_server_keeps_to_its_openapi_description(bundle, request, tmp_path):
    path = request.getfixturevalue(bundle)
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    with served(path, max_batch=8) as url:
        out = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
             url + "/openapi.json", "--checks", "all", "--max-examples", "60", "--workers", "1",
             "--request-timeout", "10", "--max-time", "30", "--generation-database", "none",
             # an image field's schema cannot say "a decodable image": valid-by-schema base64 may be refused
             *(["--exclude-checks", "positive_data_acceptance"] if bundle == "digits_cnn_bundle" else [])],
            cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "failure" not in out.stdout.rsplit("SUMMARY", 1)[-1], out.stdout[-3000:]
