"""`edgeops serve` facing hostile clients: every request is refused with a JSON 4xx, the host stays safe.

Each test is a finding measured on the standard-library server this one replaced.
"""

from __future__ import annotations

import json
import threading
from io import BytesIO

import numpy as np
import pytest

import edge_runtime
from helpers import eventually
from helpers.serve_helpers import call, closed_by_server, open_raw, served


def _png(tmp_path, name="digit.png"):
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(np.full((32, 32), 200, np.uint8), mode="L").save(path, format="PNG")
    return path


def test_a_client_cannot_make_the_server_open_its_own_files(digits_cnn_bundle, tmp_path):
    """A string in `inputs` was opened as a path: an oracle for which files exist, and any image could be read."""
    on_server = _png(tmp_path)
    with served(digits_cnn_bundle) as url:
        answers = [call(url + "/predict", {"inputs": [path]})
                   for path in ("/etc/hostname", "/no/such/file.png", str(on_server))]
    assert [status for status, _ in answers] == [422, 422, 422]
    details = {json.dumps(body["detail"]) for _, body in answers}
    assert len(details) == 1, f"the answers tell the paths apart: {details}"
    assert all(body["error"] == "invalid_input" and "expected numbers" in body["detail"] for _, body in answers)


def test_a_body_nested_100000_deep_is_a_400_not_a_crash(bc_mlp_bundle):
    with served(bc_mlp_bundle) as url:
        status, body = call(url + "/predict", b"[" * 100_000 + b"]" * 100_000)
        assert status == 400 and body["error"] == "bad_request" and "nested" in body["detail"]
        status, body = call(url + "/predict", b'{"inputs": ' + b"[" * 40 + b"]" * 40 + b"}")
        assert status == 400 and "nested 41 levels deep" in body["detail"]
        assert call(url + "/healthz")[0] == 200


@pytest.mark.timeout(60)
@pytest.mark.parametrize("body,status,fragment", [
    (b'{"inputs": ["' + b'\\"' * 400_000 + b'"]}', 422, "escaped quotes"),     # backtracks a string pattern
    (b'"' * 4_000_000, 413, "strings"),
    (b'{"inputs": [' + b"1" * 5000 + b"]}", 422, "4300 digits"),                    # int() refuses it
], ids=["escaped-quotes", "quotes", "5000-digit-integer"])
def test_bodies_built_to_make_the_parser_work_hard_are_refused_at_once(bc_mlp_bundle, body, status, fragment):
    with served(bc_mlp_bundle) as url:
        got_status, got = call(url + "/predict", body)
    assert got_status == status and fragment in got["detail"], got


def test_slow_clients_hold_no_threads_and_are_dropped(bc_mlp_bundle):
    """200 connections that never finish their headers: no thread each, and closed after the header timeout."""
    with served(bc_mlp_bundle, header_timeout_s=1.0) as url:
        threads_before = threading.active_count()
        slow = [open_raw(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: appl") for _ in range(200)]
        try:
            assert call(url + "/healthz")[0] == 200          # a normal client is still served meanwhile
            assert threading.active_count() - threads_before < 5
            assert eventually(lambda: all(closed_by_server(s) for s in slow), timeout=15)
        finally:
            for s in slow:
                s.close()


def test_headers_sent_a_byte_at_a_time_do_not_keep_the_connection(bc_mlp_bundle):
    """Every byte received cancels uvicorn's own idle timer; the header deadline is not moved by them."""
    with served(bc_mlp_bundle, header_timeout_s=1.0) as url:
        s = open_raw(url, b"POST /predict HTTP/1.1\r\n")
        try:
            def one_more_byte_then_closed() -> bool:
                try:
                    s.send(b"X")
                except OSError:
                    return True
                return closed_by_server(s)

            assert eventually(one_more_byte_then_closed, timeout=15, interval=0.2)
        finally:
            s.close()


def test_a_body_that_trickles_in_gets_a_408(bc_mlp_bundle):
    with served(bc_mlp_bundle, body_timeout_s=1.0) as url:
        s = open_raw(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"inputs\": [")
        try:
            got = bytearray()
            assert eventually(lambda: closed_by_server(s, got), timeout=15)
            assert got.startswith(b"HTTP/1.1 408") and b'"error":"timeout"' in got.replace(b" ", b"")
        finally:
            s.close()


def test_bodies_batches_and_in_flight_bytes_are_bounded(bc_mlp_bundle):
    with served(bc_mlp_bundle, max_body_bytes=64 * 1024, max_batch=16, max_in_flight_bytes=64 * 1024,
                body_timeout_s=5.0, admission_timeout_s=0.5) as url:
        status, body = call(url + "/predict", b"[" + b"0," * 40_000 + b"0]")
        assert status == 413 and body["error"] == "too_large" and "65536" in body["detail"]
        status, body = call(url + "/predict", {"inputs": [[0.0] * 30] * 17})
        assert status == 413 and "batch of 17" in body["detail"] and "16" in body["detail"]
        # a client that announced a maximum-size body holds the whole in-flight budget ...
        hog = open_raw(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 65536\r\n\r\n[")
        try:
            status, body = call(url + "/predict", {"inputs": [0.0] * 30})
            assert status == 503 and body["error"] == "busy" and "in flight" in body["detail"]
        finally:
            hog.close()
        # ... and gives it back when it goes
        assert eventually(lambda: call(url + "/predict", {"inputs": [0.0] * 30})[0] == 200, timeout=10)


def test_a_chunked_body_over_the_limit_is_cut_off(bc_mlp_bundle):
    with served(bc_mlp_bundle, max_body_bytes=64 * 1024) as url:
        def chunks():
            for _ in range(100):
                yield b"0," * 1000

        import http.client
        host, port = url.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        try:
            conn.request("POST", "/predict", body=chunks(), headers={"Content-Type": "application/json"},
                         encode_chunked=True)
            resp = conn.getresponse()
            assert resp.status == 413 and json.loads(resp.read())["error"] == "too_large"
        except (BrokenPipeError, ConnectionResetError):
            pass    # the server may close before the client has sent every chunk: refused all the same
        finally:
            conn.close()


def test_a_client_that_goes_away_is_not_an_error(bc_mlp_bundle):
    with served(bc_mlp_bundle) as url:
        s = open_raw(url, b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 1000\r\n\r\n{\"inputs\": [1,")
        s.close()

        def metrics():
            return call(url + "/metrics")[1]

        assert eventually(lambda: "edgeops_client_disconnects_total 1" in metrics(), timeout=10)
        assert "edgeops_errors_total{" not in metrics()


@pytest.mark.parametrize("body,ctype,status,kind,fragment", [
    ({"inputs": [True] * 30}, "application/json", 422, "invalid_input", "booleans"),
    ({"inputs": [[1.0] * 29 + [False]]}, "application/json", 422, "invalid_input", "booleans"),
    (json.dumps({"inputs": [0.0] * 30}).encode("utf-16"), "application/json", 415, "unsupported_media_type", "UTF-8"),
    (json.dumps({"inputs": [0.0] * 30}).encode("utf-16-le"), "application/json", 415, "unsupported_media_type",
     "UTF-8"),
    (json.dumps({"inputs": [0.0] * 30}).encode(), "application/json; charset=utf-16", 415,
     "unsupported_media_type", "UTF-8"),
    (b'{"inputs": [NaN' + b", 0" * 29 + b"]}", "application/json", 422, "invalid_input", "finite"),
    (b'{"inputs": [1e999' + b", 0" * 29 + b"]}", "application/json", 422, "invalid_input", "finite"),
    (b'{"inputs": [3.402823466385289e+38' + b", 0" * 29 + b"]}", "application/json", 422, "invalid_input",
     "float32"),
    (b"inputs=1", "application/x-www-form-urlencoded", 415, "unsupported_media_type", "application/json"),
    (b"\x1f\x8b\x08\x00", "application/json", 415, "unsupported_media_type", "UTF-8"),
], ids=["booleans", "a-boolean-in-a-batch", "utf-16-with-bom", "utf-16-le", "charset-utf-16", "nan", "overflow",
        "past-float32-max",
        "form-encoded", "gzip-bytes"])
def test_booleans_encodings_and_non_numbers_are_refused(bc_mlp_bundle, body, ctype, status, kind, fragment):
    with served(bc_mlp_bundle) as url:
        got_status, got = call(url + "/predict", body, method="POST", ctype=ctype)
    assert (got_status, got["error"]) == (status, kind) and fragment in got["detail"], got


def test_a_compressed_body_is_refused_not_inflated(bc_mlp_bundle):
    with served(bc_mlp_bundle) as url:
        status, body = call(url + "/predict", b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert status == 415 and "Content-Encoding gzip" in body["detail"]


def test_a_decompression_bomb_is_refused_before_it_is_decoded(digits_cnn_bundle):
    from PIL import Image

    buf = BytesIO()
    Image.new("L", (6000, 6000)).save(buf, format="PNG")     # 36 Mpx in about 40 kB
    with served(digits_cnn_bundle, max_image_pixels=4_000_000) as url:
        status, body = call(url + "/predict", buf.getvalue(), ctype="image/png")
    assert status == 413 and body["error"] == "too_large" and "36000000 pixels" in body["detail"]


def test_importing_the_runtime_loads_no_web_stack(bc_mlp_bundle):
    import subprocess
    import sys

    code = ("import sys, edge_runtime, edge_runtime.cli; m = edge_runtime.load(sys.argv[1]); m.predict([0.0] * 30); "
            "print(sorted(n for n in ('starlette', 'uvicorn', 'multipart', 'anyio', 'h11') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(bc_mlp_bundle)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert edge_runtime.__name__ == "edge_runtime"
