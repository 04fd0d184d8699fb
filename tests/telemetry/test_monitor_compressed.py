"""Windows sent zlib-compressed (`edgeops run --compress`): accepted, and no zip bomb gets through."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from telemetry.profile_check import Rejected, parse
from telemetry.synthetic import make_window, reference_manifest

TOPIC = "edgeops/f1/dev-1/telemetry"


def test_compressed_windows_parse_like_plain_ones_and_bombs_are_refused():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 12))
    manifest = reference_manifest(X, None, "m")
    win = make_window(X[:100], manifest, "dev-1", 7)
    plain = json.dumps(win).encode()
    packed = zlib.compress(plain, 6)
    assert len(packed) < len(plain) / 1.5
    assert parse(TOPIC, packed).doc == parse(TOPIC, plain).doc == json.loads(plain)
    bomb = zlib.compress(b"{" + b" " * (20 << 20) + b"}", 9)          # 20 MiB of JSON in a few KiB
    assert len(bomb) < 64 * 1024
    with pytest.raises(Rejected) as exc:
        parse(TOPIC, bomb)
    assert exc.value.reason == "oversized"
    with pytest.raises(Rejected) as exc:
        parse(TOPIC, b"x\x9cnot really zlib")
    assert exc.value.reason == "malformed_json"
